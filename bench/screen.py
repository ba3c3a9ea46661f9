"""Cost of screening (:mod:`analysis.engine.screening`) relative to one forward + backward over the same tokens.

``python -m bench screen [--model default] [-n 16] [--batch-size 8] [--max-length 256] [--layers all]
[--repeats 2] [--threads 1]``: on the embedded SmolLM2-135M-Instruct, the same batches of ``utility`` examples
(sorted by length, as the task does) are run three ways, each ``repeats`` times (the fastest kept):

* ``train``: a fine-tuning step's forward + backward (``loss.backward()`` with every block weight requiring grad,
  so weight gradients are formed) - the baseline of the ratio;
* ``capture``: forward + backward to the embedding output with per-sample factors captured and dropped
  (:func:`stream_batch` with a no-op consumer): what any per-sample method pays;
* ``score``: the screening itself (factors streamed into :class:`Scorer`: two reference inner products,
  ||G_i||^2 and the safety-subspace energy per module).

Prints seconds, the ratio score / train (target <= 1.5), examples / second and tokens / second, and the one-off
anchor cost (two mean gradients + the top-k bases) for ``n_anchors`` anchors. Use one torch thread on a shared
machine (the ratio is what is compared; absolute times follow the machine's load).

``python -m bench screen --memory 1000,10000 [--model tiny-llama]``: instead, the whole screening task
(:func:`analysis.lab.screen.screen`) on pools of that many examples (utility rows repeated under new ids, as an
Alpaca file), each in a fresh process; prints the peak resident memory and seconds of each, to show that memory
grows only with the stored scores (n x modules x 4 numbers), not with the factors.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from analysis.core.config import ModelConfig
    from analysis.engine.collect import numpy_single_threaded
    from analysis.engine.screening import ReferenceSums, Scorer, safety_basis, stream_batch
    from analysis.lab.screen import batches_by_length
    from analysis.llm.anatomy import find_linear_modules, select_modules
    from analysis.llm.data import load_shipped
    from analysis.llm.formatting import per_sample_loss, tokenize_batch, tokenize_conversation
    from analysis.llm.models import load_model
    from analysis.safety.nll import affirmative_target

    parser = argparse.ArgumentParser(prog="python -m bench screen", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("-n", type=int, default=16, help="pool examples (utility analysis split)")
    parser.add_argument("--n-anchors", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--kinds", default="all")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", default=None, help="comma-separated pool sizes: peak memory of the whole task")
    args, _ = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory:
        return memory(args)

    loaded = load_model(ModelConfig(source=args.model))
    net, tokenizer = loaded.model.eval(), loaded.tokenizer
    modules = select_modules(find_linear_modules(net), args.layers, args.kinds)
    pool = [list(ex.messages) for ex in load_shipped("utility").split("analysis").take(args.n, seed=0)]
    lengths = [len(tokenize_conversation(tokenizer, c, args.max_length)[0]) for c in pool]
    batches = [tokenize_batch(tokenizer, [pool[i] for i in b], args.max_length) for b in batches_by_length(lengths, args.batch_size)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    harmful = load_shipped("safety").split("analysis").take(args.n_anchors, seed=0)
    refusal = [list(ex.messages) for ex in harmful]
    compliance = [list(ex.context) + [{"role": "assistant", "content": affirmative_target(ex.prompt)}] for ex in harmful]
    print(f"model {loaded.name}: {len(modules)} modules ({args.layers} / {args.kinds}), {args.n} utility examples, "
          f"{tokens} tokens in {len(batches)} batches of <= {args.batch_size}, {args.threads} torch thread(s)")

    # anchors: two mean gradients and the bases (one-off)
    start = time.perf_counter()
    for p in net.parameters():
        p.requires_grad_(False)
    sums = {}
    for name, convs in (("compliance", compliance), ("refusal", refusal)):
        sums[name] = ReferenceSums(len(convs))
        for b in batches_by_length([0] * len(convs), args.batch_size):
            stream_batch(net, tokenize_batch(tokenizer, [convs[i] for i in b], args.max_length), modules,
                         sums[name].consume)
    capture_anchors = time.perf_counter() - start
    with numpy_single_threaded():  # as the task does: multi-threaded BLAS on a busy machine costs more than it gives
        basis = {m.name: safety_basis(sums["refusal"].gradients[m.name], args.k) for m in modules}
    anchor_seconds = time.perf_counter() - start
    scorer = Scorer(modules, {n: s.gradients for n, s in sums.items()}, basis)

    named = dict(net.named_modules())
    weights = [named[m.name].weight for m in modules]

    def train() -> None:
        for w in weights:
            w.requires_grad_(True)
        for batch in batches:
            loss = per_sample_loss(net(**batch.model_inputs(), use_cache=False).logits, batch.labels).sum()
            loss.backward()
        for w in weights:
            w.grad = None
            w.requires_grad_(False)

    def capture() -> None:
        for batch in batches:
            stream_batch(net, batch, modules, lambda *a: None)

    def score() -> None:
        for batch in batches:
            scorer.start(batch.input_ids.shape[0])
            stream_batch(net, batch, modules, scorer.consume)
            scorer.finish()

    seconds = {}
    for name, step in (("train", train), ("capture", capture), ("score", score)):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        seconds[name] = min(times)
        print(f"  {name:8s} {seconds[name]:7.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times)})")
    ratio = seconds["score"] / seconds["train"]
    print(f"scoring / one forward+backward (training step) over the same tokens: {ratio:.2f}x (target <= 1.5); "
          f"capture alone {seconds['capture'] / seconds['train']:.2f}x")
    print(f"{args.n / seconds['score']:.2f} examples/s, {tokens / seconds['score']:.0f} tokens/s scored")
    print(f"anchors (one-off): {anchor_seconds:.1f} s for 2 x {args.n_anchors} conversations "
          f"(capture {capture_anchors:.1f} s, top-{args.k} bases {anchor_seconds - capture_anchors:.1f} s)")
    print(f"reference gradients held: {sum(g.numel() for s in sums.values() for g in s.gradients.values()) * 4 / 2**20:.0f} MiB")
    return 0


def memory(args) -> int:
    """Peak RSS of the screening task on pools of growing size, each in its own process."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from analysis.llm.data import load_shipped

    model = args.model if args.model != "default" else "tiny-llama"
    base = [ex for ex in load_shipped("utility")]
    script = ("import json, resource, sys, time, torch; torch.set_num_threads({threads}); "
              "from analysis.lab.screen import ScreenTask, screen; t = time.perf_counter(); "
              "s = screen(ScreenTask(data=sys.argv[1], model={model!r}, n_anchors=8, max_length=128), root=sys.argv[2]); "
              "print(json.dumps({{'seconds': time.perf_counter() - t, 'n': s['n_examples'], 'modules': s['n_modules'], "
              "'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))")
    print(f"model {model}: peak resident memory of the whole screening task by pool size (fresh process each)")
    with tempfile.TemporaryDirectory() as folder:
        for n in (int(x) for x in args.memory.split(",")):
            path = Path(folder) / f"pool{n}.jsonl"
            rows = [{"instruction": base[i % len(base)].prompt, "input": f"(copy {i // len(base)})",
                     "output": base[i % len(base)].response} for i in range(n)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            out = subprocess.run([sys.executable, "-c", script.format(threads=args.threads, model=model), str(path),
                                  str(Path(folder) / f"store{n}")], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  n = {result['n']:6d}: peak {result['peak_mib']:7.0f} MiB, {result['seconds']:6.1f} s, "
                  f"{result['modules']} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
