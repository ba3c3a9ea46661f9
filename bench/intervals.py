"""Benchmark of the intervals and the null model (issue 19): their cost as a ratio to the point-estimate analysis of
the same modules and to one forward + backward over the same tokens.

Setup defaults (embedded SmolLM2-135M, 8 safety + 8 utility samples, layers 0,10,19,29 x 7 kinds = 28 modules,
128 tokens, k = 8, overlap-vs-n curves on the 'auto' layers, 10 draws per n), the collection's defaults for the
resampling (n_boot, n_perm of ``CollectionConfig``). The factors are captured once (``capture_batch``); then each
module is analysed twice, alternating the order: ``analyse_module`` without resampling (the point estimates:
Gram, spectra, bases, per-sample SVDs, overlaps, curve) and with it. CPU seconds of this process, torch and BLAS on
one thread (``--threads``). Prints per-kind and total times, the ratio (with - without) / without (target <= 2),
the ratio to one plain batched forward + backward, the smallest share of a replicate's energy that the spectral
core holds (1 = exact) and in how many modules k@0.9 is certified exact (the modules the claim-I test uses).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict


def _parser() -> argparse.ArgumentParser:
    from analysis.engine.collect_task import CollectionConfig

    defaults = CollectionConfig()
    parser = argparse.ArgumentParser(prog="python -m bench intervals", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--layers", default="0,10,19,29")
    parser.add_argument("-n", type=int, default=8, help="samples per set")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--n-boot", type=int, default=defaults.n_boot)
    parser.add_argument("--n-perm", type=int, default=defaults.n_perm)
    parser.add_argument("--model", default="default")
    parser.add_argument("--core-rank", type=int, default=None,
                        help="directions per side of the spectral core (default CORE_RANK; 4096: exact)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, _ = _parser().parse_known_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    from analysis.engine.analyse import analyse_module
    from analysis.engine.capture import capture_batch
    from analysis.engine.collect_task import CollectionConfig, curve_modules, load_set
    from analysis.llm.anatomy import find_linear_modules, select_modules
    from analysis.llm.models import load_model
    from bench.live import _plain_fb

    torch.set_num_threads(args.threads)
    config = CollectionConfig(model=args.model, n_safety=args.n, n_utility=args.n, layers=args.layers,
                              max_length=args.max_length, batch_size=8, top_k=8, curve_layers="auto", curve_boot=10)
    loaded = load_model(config.model)
    model = loaded.model.eval()
    modules = select_modules(find_linear_modules(model), config.layers, config.kinds, config.regex)
    curves = set(curve_modules(config, modules))
    from analysis.llm.formatting import tokenize_batch

    examples = [e for which in ("safety", "utility") for e in load_set(config, which).examples]
    pairs = defaultdict(list)
    for start in range(0, len(examples), config.batch_size):
        batch = tokenize_batch(loaded.tokenizer, [e.messages for e in examples[start:start + config.batch_size]],
                               config.max_length, config.padding_side)
        factors = capture_batch(model, batch, modules)
        for info in modules:
            pairs[info.name] += [factors.sample_factors(info.name, i) for i in range(factors.n_samples)]
    fb_wall, fb_cpu = _plain_fb(loaded, config)
    rows = sum(D.shape[0] for D, _ in pairs[modules[0].name])
    print(f"{args.model}: {len(modules)} modules, n = {args.n} + {args.n}, {rows} response rows; n_boot = "
          f"{args.n_boot}, n_perm = {args.n_perm}; {args.threads} thread(s)")
    per_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    captured, certified, ranks = [], [], []
    core = {} if args.core_rank is None else {"core_rank": args.core_rank}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for index, info in enumerate(modules):
            boot = info.name in curves and config.curve_boot
            order = (False, True) if index % 2 else (True, False)
            for resampled in order:
                start = time.process_time()
                result = analyse_module(info, pairs[info.name], args.n, config.top_k, seed=config.seed,
                                        curve_boot=boot, n_boot=args.n_boot if resampled else 0,
                                        n_perm=args.n_perm if resampled else 0, **core)
                per_kind[info.kind][int(resampled)] += time.process_time() - start
                if resampled:
                    captured.append(float(result.arrays["resampling.captured_min"][0]))
                    certified.append(float(result.arrays["resampling.certified_k90"][0]))
                    ranks.append(int(result.arrays["resampling.core_rank"][0]))
    point = sum(v[0] for v in per_kind.values())
    total = sum(v[1] for v in per_kind.values())
    extra = total - point
    print(f"{'kind':6s} {'point s':>9s} {'+resampling s':>14s} {'ratio':>6s}")
    for kind, (p, t) in per_kind.items():
        print(f"{kind:6s} {p:9.2f} {t - p:14.2f} {(t - p) / p:6.2f}")
    print(f"total  {point:9.2f} {extra:14.2f} {extra / point:6.2f}   <- intervals + null / point estimates "
          "(target <= 2)")
    print(f"one forward+backward over the same {2 * args.n} samples: {fb_cpu:.2f} CPU s ({fb_wall:.2f} s wall); "
          f"intervals + null = {extra / fb_cpu:.1f}x it, point analysis = {point / fb_cpu:.1f}x it")
    from analysis.engine.resampling import CORE_EXACT, K90_CERTIFIED

    print(f"spectral core: rank {min(ranks)}-{max(ranks)} per side; smallest share of a replicate mean's energy "
          f"inside it: {min(captured):.4f} (1 = exact); k@0.9 certified in >= {K90_CERTIFIED:.0%} of replicates "
          f"in {sum(c >= K90_CERTIFIED for c in certified)} of {len(certified)} modules; core exact (>= "
          f"{CORE_EXACT:.1%}) in {sum(c >= CORE_EXACT for c in captured)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
