"""Our evaluation's time against a plain ``model.generate`` loop over the same prompts, and its per-stage shares.

``python -m bench eval [--model default] [--n-harmful 16] [--n-benign 8] [--n-utility 8] [--batch-sizes 4,8,16]
[--threads 1] [--json FILE] [--small]``

1. The evaluation (:func:`analysis.safety.evaluate.evaluate`, nothing reused, a temporary store), timed as a
   whole and per stage from its progress events (harmful / benign / utility answers, refusal / affirmative /
   utility NLLs, judge, metrics with their intervals, storing; setup = everything before the first stage).
2. The baseline: the same harmful + benign + scored-utility prompts, same new-token budgets and stop tokens,
   rendered, left-padded and passed to ``model.generate`` in their given order, at each batch size of
   ``--batch-sizes`` (before the evaluation), and the best one once more after it; their mean counts.

Times are wall-clock and CPU time of this process (with one thread, CPU time is the work itself and hardly
depends on what the neighbours of a shared machine do; it is the ratio to read there). Printed: the evaluation's generation time / the baseline's best (target <= 1.2), the whole evaluation / the
baseline's best (NLLs and scoring included), and each stage's share. ``--small``: the tiny random Llama and a
few prompts (a test runs it), under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

STAGE_PREFIXES = {"harmful answers": "harmful", "benign answers": "benign", "utility answers": "utility",
                  "refusal NLL": "refusal_nll", "affirmative NLL": "affirmative_nll", "utility NLL": "utility_nll",
                  "guard classifier": "guard", "judge": "judge", "metrics": "metrics", "storing": "store"}
GENERATION_STAGES = ("harmful", "benign", "utility")


def stage_seconds(events: list[tuple[float, str]], start: float, end: float) -> dict[str, float]:
    """Seconds per stage from (time, message) progress events: a generation message ("harmful answers: k/n")
    is sent after a batch of its stage, an NLL message when its stage starts; time before the first stage
    is "setup", after the last event up to ``end`` belongs to the stage then running."""
    seconds: dict[str, float] = {}
    current, last = "setup", start
    for when, message in events:
        label = next((stage for prefix, stage in STAGE_PREFIXES.items() if message.startswith(prefix)), None)
        if label is None:
            continue
        owner = label if label in GENERATION_STAGES else current  # generation: the batch just done is its own
        seconds[owner] = seconds.get(owner, 0.0) + when - last
        current, last = label, when
    seconds[current] = seconds.get(current, 0.0) + end - last
    return seconds


def plain_generate_seconds(loaded, contexts_and_tokens: list[tuple[list, int]], batch_size: int) -> tuple[float, float]:
    """(wall, CPU) seconds of a plain ``model.generate`` loop (greedy, left-padded, stop tokens as ours) over
    the (contexts, max_new_tokens) groups in their given order at ``batch_size``."""
    import torch

    from analysis.llm.formatting import pad_rows, pad_token_id, render_prompt
    from analysis.safety.generation import stop_ids

    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    pad, stops = pad_token_id(tokenizer), stop_ids(tokenizer)
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for contexts, new_tokens in contexts_and_tokens:
            for i in range(0, len(contexts), batch_size):
                rows = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"]
                        for c in contexts[i:i + batch_size]]
                batch = pad_rows(rows, pad, side="left")
                model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               max_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                               eos_token_id=stops or None, temperature=None, top_p=None, top_k=None)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model (tiny-llama with --small)")
    parser.add_argument("--n-harmful", type=int, default=None)
    parser.add_argument("--n-benign", type=int, default=None)
    parser.add_argument("--n-utility", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--utility-max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="the evaluation's batch size (default: EvalConfig's)")
    parser.add_argument("--batch-sizes", default=None, help="baseline batch sizes to try, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    parser.add_argument("--small", action="store_true", help="tiny random model, a few prompts (CPU, < 1 minute)")
    args, _unknown = parser.parse_known_args(argv)

    import torch

    from analysis.core.tasks import TaskContext
    from analysis.llm.formatting import with_system
    from analysis.llm.models import load_model
    from analysis.safety import evaluate as ev

    torch.set_num_threads(args.threads)
    small = {"model": "tiny-llama", "n_harmful": 6, "n_benign": 4, "n_utility": 4, "max_new_tokens": 8,
             "utility_max_new_tokens": 8, "batch_size": 4, "batch_sizes": "2,4"}
    big = {"model": "default", "n_harmful": 16, "n_benign": 8, "n_utility": 8, "max_new_tokens": None,
           "utility_max_new_tokens": None, "batch_size": None, "batch_sizes": "4,8,16"}
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v
              for k, v in (small if args.small else big).items()}
    settings = {k: chosen[k] for k in ("n_harmful", "n_benign", "n_utility", "max_new_tokens", "utility_max_new_tokens",
                                       "batch_size") if chosen[k] is not None}
    config = ev.EvalConfig(model=chosen["model"], **settings)
    loaded = load_model(config.model)
    print(f"model {chosen['model']}, {config.n_harmful} harmful + {config.n_benign} benign prompts x "
          f"{config.max_new_tokens} new tokens, {config.n_utility} utility prompts ({config.utility_max_new_tokens} new "
          f"tokens per scored answer), batch {config.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    harmful, benign, _ = ev.load_sets(config)
    _, scored = ev._generation_prompts(config, ev.load_sets(config))
    system = config.system_prompt
    groups = [([with_system(ex.context, system) for ex in list(harmful) + list(benign)], config.max_new_tokens),
              ([with_system(ex.context, system) for ex, _ in scored], config.utility_max_new_tokens)]
    sizes = [int(s) for s in str(chosen["batch_sizes"]).split(",") if s.strip()]
    baseline: dict[int, tuple[float, float]] = {}
    for size in sizes:  # before the evaluation ...
        baseline[size] = plain_generate_seconds(loaded, groups, size)
        print(f"  plain model.generate loop, batch {size:3d}: {baseline[size][0]:7.2f} s wall, "
              f"{baseline[size][1]:7.2f} s CPU", flush=True)

    events: list[tuple[float, str]] = []
    cpu_events: list[tuple[float, str]] = []

    def record(event) -> None:
        events.append((time.perf_counter(), event.message))
        cpu_events.append((time.process_time(), event.message))

    with tempfile.TemporaryDirectory() as folder:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = ev.evaluate(config, TaskContext(progress=record), model=loaded, store=ev.evals_store(folder),
                             use_cache=False)
        end, cpu_end = time.perf_counter(), time.process_time()
    ours, ours_cpu = end - start, cpu_end - cpu_start
    stages = stage_seconds(events, start, end)
    cpu_stages = stage_seconds(cpu_events, cpu_start, cpu_end)
    ours_generation = sum(stages.get(s, 0.0) for s in GENERATION_STAGES)
    ours_generation_cpu = sum(cpu_stages.get(s, 0.0) for s in GENERATION_STAGES)
    print(f"  our evaluation: {ours:7.2f} s wall, {ours_cpu:7.2f} s CPU", flush=True)

    best_size = min(baseline, key=lambda size: baseline[size][1])
    again = plain_generate_seconds(loaded, groups, best_size)  # ... and the best again after it (load drifts)
    print(f"  plain model.generate loop, batch {best_size:3d} again: {again[0]:7.2f} s wall, {again[1]:7.2f} s CPU",
          flush=True)
    best_wall = (baseline[best_size][0] + again[0]) / 2
    best_cpu = (baseline[best_size][1] + again[1]) / 2

    report = {"model": chosen["model"], "settings": {**settings, "n_scored_utility": len(scored)},
              "threads": torch.get_num_threads(), "evaluation_seconds": ours, "evaluation_cpu_seconds": ours_cpu,
              "evaluation_generation_seconds": ours_generation,
              "evaluation_generation_cpu_seconds": ours_generation_cpu, "stages_seconds": stages,
              "stages_cpu_seconds": cpu_stages, "stage_shares": {k: v / ours for k, v in stages.items()},
              "stage_cpu_shares": {k: v / ours_cpu for k, v in cpu_stages.items()},
              "baseline_seconds": {size: wall for size, (wall, _) in baseline.items()},
              "baseline_cpu_seconds": {size: cpu for size, (_, cpu) in baseline.items()},
              "baseline_best_batch": best_size, "baseline_best_again": {"wall": again[0], "cpu": again[1]},
              "ratio_generation": ours_generation / best_wall, "ratio_total": ours / best_wall,
              "ratio_generation_cpu": ours_generation_cpu / best_cpu, "ratio_total_cpu": ours_cpu / best_cpu,
              "asr": result.metrics.get("asr")}
    print(f"evaluation: {ours:.2f} s wall ({ours_cpu:.2f} s CPU) in all, generation {ours_generation:.2f} s wall "
          f"({ours_generation_cpu:.2f} s CPU)")
    print(f"plain loop, best batch size {best_size} (mean of the runs before and after): {best_wall:.2f} s wall, "
          f"{best_cpu:.2f} s CPU")
    print(f"ratio, generation / plain best: {report['ratio_generation_cpu']:.2f} CPU time, "
          f"{report['ratio_generation']:.2f} wall (target <= 1.2)")
    print(f"ratio, whole evaluation / plain best: {report['ratio_total_cpu']:.2f} CPU time, "
          f"{report['ratio_total']:.2f} wall (NLLs and scoring included)")
    print("share of the evaluation's time per stage (CPU time; wall):")
    for stage, seconds in sorted(cpu_stages.items(), key=lambda item: -item[1]):
        print(f"  {stage:18s} {seconds:7.2f} s  {seconds / ours_cpu:6.1%}   wall {stages.get(stage, 0.0):7.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
