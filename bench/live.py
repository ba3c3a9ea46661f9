"""Benchmark of the time to an answer: the Setup default collection vs one batched forward+backward (issue 12).

Setup defaults: the embedded SmolLM2-135M, 8 safety + 8 utility samples, layers 0,10,19,29 x 7 kinds = 28
modules, 128 tokens, batch 8, k = 8, overlap-vs-n curves on the 'auto' layers with 10 draws per n. In one
process and one run (torch and BLAS on ``--threads`` threads, default 1), each timed in CPU seconds of this
process (all threads) and in wall-clock seconds:

* fb: one plain batched forward + backward (parameter gradients) of the same samples, batch by batch; timed
  before and after the collection, the mean is the unit of every ratio;
* first answer: from the start of ``collect`` (model already loaded) to the first progress event with a
  numeric live answer (the preview's singular values after the first batch);
* first cosine: the first event whose preview also has cos(G_s, G_u);
* table: every module's row (all answers) is there; only overlap-vs-n curves may follow;
* total: ``collect`` done (everything stored).
Targets (issue 12): total <= 4x fb, first answer <= 1.5x fb. ``--full`` adds the full collection (all 210
modules, n = 64 = 32 + 32, ``--full-length`` tokens, no curves as in bench/engine.py) vs its own fb, target 3x.
On a shared machine the wall-clock ratios depend on the neighbours; with one thread the CPU ratios are the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

#: Setup's defaults (pages/setup.py) for a 30-layer model.
SETUP_DEFAULTS = {"n_safety": 8, "n_utility": 8, "layers": "0,10,19,29", "max_length": 128, "batch_size": 8,
                  "top_k": 8, "curve_layers": "auto", "curve_boot": 10}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench live", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--workers", type=int, default=1, help="modules analysed in parallel")
    parser.add_argument("--full", action="store_true", help="also the 210-module n = 64 collection")
    parser.add_argument("--full-length", type=int, default=64, help="tokens per sample of the full collection")
    parser.add_argument("--skip-setup", action="store_true", help="skip the Setup default collection")
    return parser


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def _plain_fb(loaded, config) -> tuple[float, float]:
    """(wall, cpu) seconds of a plain forward + backward of ``config``'s samples, batch by batch."""
    from analysis.engine.collect_task import load_set
    from analysis.llm.formatting import per_sample_loss, tokenize_batch

    model = loaded.model
    model.eval()
    examples = [e for which in ("safety", "utility") for e in load_set(config, which).examples]
    batches = [tokenize_batch(loaded.tokenizer, [e.messages for e in examples[i:i + config.batch_size]],
                              config.max_length, config.padding_side) for i in range(0, len(examples), config.batch_size)]
    for p in model.parameters():
        p.requires_grad_(True)
    start = _clock()
    for batch in batches:
        per_sample_loss(model(**batch.model_inputs(), use_cache=False).logits, batch.labels).sum().backward()
        model.zero_grad(set_to_none=True)
    elapsed = _since(start)
    for p in model.parameters():
        p.requires_grad_(False)
    return elapsed


def _collect(loaded, config, workers: int) -> dict[str, tuple[float, float]]:
    """Marks (wall, cpu) of one fresh collection: first answer, first cosine, total."""
    from analysis.core.tasks import TaskContext
    from analysis.engine.collect import collect
    from analysis.engine.results import CollectionStore

    marks: dict[str, tuple[float, float]] = {}

    def progress(event):
        preview = (event.live or {}).get("preview") or {}
        if "first_answer" not in marks and any(e.get("safety") or e.get("utility") for e in preview.values()):
            marks["first_answer"] = _since(start)
        if "first_cosine" not in marks and any(e.get("cosine") is not None for e in preview.values()):
            marks["first_cosine"] = _since(start)
        live = event.live or {}
        if live.get("stage") == "analyse" and "captured" not in marks:
            marks["captured"] = _since(start)
        if live.get("stage") == "analyse" and live.get("done_modules") == live.get("total_modules") \
                and "table" not in marks:
            marks["table"] = _since(start)

    with tempfile.TemporaryDirectory(prefix="sse-bench-live-") as root:
        start = _clock()
        collect(config, model=loaded, store=CollectionStore(root), ctx=TaskContext(progress=progress), workers=workers)
        marks["total"] = _since(start)
    return marks


def _measure(loaded, config, workers: int, title: str, targets: dict[str, float]) -> None:
    print(f"- {title}: plain forward+backward, collection, plain forward+backward ...", flush=True)
    before = _plain_fb(loaded, config)
    marks = _collect(loaded, config, workers)
    after = _plain_fb(loaded, config)
    fb = ((before[0] + after[0]) / 2, (before[1] + after[1]) / 2)
    print(f"  one batched forward+backward of its {config.n_total} samples: {fb[1]:.1f} s cpu, {fb[0]:.1f} s wall "
          f"(before {before[1]:.1f} / after {after[1]:.1f} s cpu)")
    print(f"  {'mark':28s} {'cpu s':>8s} {'/ fb':>7s} {'wall s':>8s} {'/ fb':>7s}  target")
    for name in ("first_answer", "first_cosine", "captured", "table", "total"):
        if name not in marks:
            continue
        wall, cpu = marks[name]
        target = targets.get(name)
        verdict = "" if target is None else f"<= {target:g}x  {'ok' if cpu / fb[1] <= target else 'MISSED'} (cpu)"
        print(f"  {name:28s} {cpu:8.1f} {cpu / fb[1]:6.2f}x {wall:8.1f} {wall / fb[0]:6.2f}x  {verdict}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from threadpoolctl import threadpool_limits

    from analysis.engine.collect_task import CollectionConfig
    from analysis.llm.models import load_model

    print(f"live benchmark: SmolLM2-135M, {args.threads} thread(s), {args.workers} worker(s); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    loaded = load_model("default")
    with threadpool_limits(limits=args.threads, user_api="blas"):
        if not args.skip_setup:
            _measure(loaded, CollectionConfig(model="default", **SETUP_DEFAULTS), args.workers,
                     "Setup defaults (28 modules, 8 + 8 samples, 128 tokens)", {"first_answer": 1.5, "total": 4.0})
        if args.full:
            full = CollectionConfig(model="default", n_safety=32, n_utility=32, max_length=args.full_length,
                                    batch_size=8, top_k=8, curve_layers="none")
            _measure(loaded, full, args.workers, f"all modules, n = 32 + 32, {args.full_length} tokens",
                     {"total": 3.0})
    print(f"  load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
