"""``python -m bench [name ...] [-- options]``: run the registered benchmarks (all by default).

Each benchmark is a module with ``main(argv) -> int``; register a new one with one line in ``BENCHMARKS``.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module with main(argv), one-line description)
BENCHMARKS = {
    "engine": ("bench.engine", "per-sample gradient engine on SmolLM2-135M: capture, factored SVD, Gram, memory"),
    "scaling": ("bench.scaling", "capture time and peak memory vs width, depth, tokens, samples; growth exponents"),
    "live": ("bench.live", "time to the first live answer and to the end of the Setup default collection vs one fwd+bwd"),
    "sketch": ("bench.sketch", "error of the random projection (projection_dim) vs the exact route: spectra, CER, ranks, cosine"),
    "watch": ("bench.watch", "overhead of the SafetyGeometryCallback on a plain Trainer step, interval 1 and 10 (ratios)"),
    "intervals": ("bench.intervals", "cost of the bootstrap intervals + permutation null vs the point estimates and one fwd+bwd"),
    "finetune": ("bench.finetune", "cost of an SPF fine-tuning step relative to a plain step (ratio in one run)"),
    "gpu": ("bench.gpu", "the GPU check: CPU-vs-CUDA agreement, 7B-shape planner vs peak, bf16 SPF step, throughput"),
    "eval": ("bench.eval", "the safety evaluation's time vs a plain model.generate loop (best batch size); stage shares"),
    "screen": ("bench.screen", "cost of per-example screening scores relative to one forward+backward; examples/s"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in argv if a in BENCHMARKS] or list(BENCHMARKS)
    options = [a for a in argv if a not in BENCHMARKS and a != "--"]
    if "-h" in options or "--help" in options:
        for name, (_, text) in BENCHMARKS.items():
            print(f"{name:10s} {text}")
        print("other arguments are passed to each benchmark:")
    status = 0
    for name in names:
        module = importlib.import_module(BENCHMARKS[name][0])
        status = max(status, module.main(options))
    return status


if __name__ == "__main__":
    sys.exit(main())
