"""Overhead of SafetyGeometryCallback on a plain ``transformers.Trainer`` step, measured in one run.

``python -m bench.watch [--model default] [--steps 10] [--reps 2] [--threads 1] [--batch 2] [--max-length 64]``

Three arms train the same model from the same initial weights with the same data and seed, each in its own
``Trainer`` for ``--steps`` optimizer steps (AdamW, all parameters, batch ``--batch`` of ``--max-length`` tokens):
plain (no callback), watch at interval 10 and watch at interval 1 (``--steps-interval-1`` steps, every one
measured). The arms run in turn, ``--reps`` times (plain, 10, 1, plain, 10, 1, ...), so that load from other
processes on a shared machine hits all of them. A step is timed from ``on_step_begin`` to ``on_step_end`` (wall
clock and this process's CPU time), so trainer set-up is not counted. Reported:

* plain step (mean), watch step at interval 10 (mean over whole windows of 10 steps: one measured step, nine
  plain ones) and at interval 1 (mean), and their ratios to the plain step (target: <= 1.3 at interval 10);
* the cost of one measurement (safety capture + basis + metrics + weight copy) = interval-1 step - plain step.

The coarse evaluation (refusal NLL + greedy generation, ``eval_every``) is off here: it is timed once on its
own and printed beside, since its cost depends on ``n_eval`` and ``eval_max_new_tokens``, not on the step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time


class StepClock:
    """A TrainerCallback that times every optimizer step (wall, CPU)."""

    def __init__(self):
        self.wall, self.cpu = [], []
        self._start = None

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_begin(self, *args, **kwargs):
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, *args, **kwargs):
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=10, help="steps of the plain and interval-10 arms")
    parser.add_argument("--steps-interval-1", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--safety-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args, _unknown = parser.parse_known_args(argv)

    import torch
    from transformers import Trainer, TrainingArguments

    from analysis.lab.watch import SafetyGeometryCallback, load_conversations
    from analysis.llm.data import load_any
    from analysis.llm.formatting import pad_rows, pad_token_id, tokenize_conversation
    from analysis.llm.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    tokenizer = loaded.tokenizer
    rows = []
    for example in load_any("utility").split("analysis").take(args.batch * args.steps, seed=0):
        ids, labels, _ = tokenize_conversation(tokenizer, list(example.messages), args.max_length)
        rows.append({"input_ids": ids, "labels": labels})

    def collate(items):
        batch = pad_rows([(r["input_ids"], r["labels"]) for r in items], pad_token_id(tokenizer), "right")
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "position_ids")}

    initial = copy.deepcopy(loaded.model.state_dict())
    load_before = os.getloadavg()
    results: dict[str, list[StepClock]] = {"plain": [], "10": [], "1": []}
    with tempfile.TemporaryDirectory() as folder:
        for rep in range(args.reps):
            for arm in ("plain", "10", "1"):
                loaded.model.load_state_dict(initial)
                clock = StepClock()
                callbacks = [clock]
                if arm != "plain":
                    callbacks.append(SafetyGeometryCallback(
                        tokenizer, run_dir=f"{folder}/{arm}-{rep}", interval=int(arm), eval_every=None,
                        safety_batch=args.safety_batch, max_length=256))
                steps = args.steps_interval_1 if arm == "1" else args.steps
                training = TrainingArguments(
                    output_dir=f"{folder}/out", per_device_train_batch_size=args.batch, max_steps=steps,
                    learning_rate=1e-5, report_to="none", use_cpu=True, save_strategy="no", logging_steps=10_000,
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
                Trainer(model=loaded.model, args=training, train_dataset=rows, data_collator=collate,
                        callbacks=callbacks).train()
                results[arm].append(clock)
                print(f"rep {rep} arm {arm:>5}: {statistics.mean(clock.wall):6.2f} s/step wall, "
                      f"{statistics.mean(clock.cpu):6.2f} s/step CPU", file=sys.stderr)
        # the coarse evaluation, once, on its own
        evaluator = SafetyGeometryCallback(tokenizer, run_dir=f"{folder}/eval", eval_every=0, n_eval=8,
                                           eval_max_new_tokens=32, max_length=256)
        evaluator._eval = load_conversations("safety", "eval", 8, 0, "held-out harmful prompts")
        start = time.perf_counter()
        evaluator._evaluate(loaded.model)
        eval_seconds = time.perf_counter() - start
    load_after = os.getloadavg()

    def mean(arm: str, kind: str) -> float:
        return statistics.mean(t for clock in results[arm] for t in getattr(clock, kind))

    print(f"model {loaded.name}, {sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f}M parameters, "
          f"AdamW on all, batch {args.batch} x {args.max_length} tokens, safety batch {args.safety_batch}, "
          f"{args.threads} torch thread(s), {args.reps} reps; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after ({os.cpu_count()} CPUs)")
    for kind in ("wall", "cpu"):
        plain, every10, every1 = mean("plain", kind), mean("10", kind), mean("1", kind)
        print(f"{kind:>4}: plain step {plain:.2f} s | interval 10: {every10:.2f} s/step, ratio {every10 / plain:.2f}x "
              f"(target <= 1.3) | interval 1: {every1:.2f} s/step, ratio {every1 / plain:.2f}x | one measurement "
              f"costs {every1 - plain:.2f} s = {(every1 - plain) / plain:.2f} plain steps")
    print(f"coarse evaluation (8 prompts: refusal NLL + 32 greedy tokens): {eval_seconds:.1f} s wall, once per "
          "eval_every steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
