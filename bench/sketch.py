"""Error of the optional random projection (``CollectionConfig.projection_dim``) against the exact route.

``python -m bench sketch [--model default] [--projection-dim 128,256] [-n 32] [--layers 0,15,29]
[--max-length 64]``: collects the same config exactly and projected at each p
(``analysis.engine.sketch.compare_projection``, runs in a temporary store) on the embedded SmolLM2-135M-Instruct,
and prints per module kind the mean and max over modules and sets of the relative error of the top-8
singular values of the safety / utility batch means, of s_1, of CER(k) at k = 1, 4, 16, of effective and
stable rank, and the absolute error of cos(G_safety, G_utility) (its relative error is printed too, but means
little near 0). Also the factor bytes per token of the selected modules and the collection seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

COLUMNS = ("s_top_rel", "s1_rel", "cer1_rel", "cer4_rel", "cer16_rel", "effective_rank_rel", "stable_rank_rel",
           "cosine_abs", "cosine_rel")


def main(argv: list[str] | None = None) -> int:
    from analysis.core.config import ModelConfig
    from analysis.engine.collect_task import CollectionConfig
    from analysis.engine.results import CollectionStore
    from analysis.engine.sketch import compare_projection
    from analysis.llm.models import load_model

    parser = argparse.ArgumentParser(prog="python -m bench sketch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--projection-dim", default="128,256", help="comma-separated p values")
    parser.add_argument("-n", type=int, default=32, help="samples per set")
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(source=args.model))
    config = CollectionConfig(model=ModelConfig(source=args.model), n_safety=args.n, n_utility=args.n,
                              layers=args.layers, max_length=args.max_length, curve_layers="none")
    print(f"model {model.name}, layers {args.layers}, n = {args.n} + {args.n}, <= {args.max_length} tokens, "
          f"errors of the projected run vs the exact run (mean / max over modules and the two sets)")
    with tempfile.TemporaryDirectory() as folder:
        store = CollectionStore(folder)
        for p in (int(x) for x in args.projection_dim.split(",")):
            start = time.perf_counter()
            out = compare_projection(config, p, model=model, store=store)
            summary = out["summary"]
            n_projected = len(out["projected"].manifest["projection"]["modules"])
            print(f"\np = {p}: {n_projected} of {len(out['exact'].modules)} modules projected; factor bytes per token "
                  f"{out['factor_bytes']['exact'] / 1e3:.1f} kB exact -> {out['factor_bytes']['projected'] / 1e3:.1f} kB; "
                  f"collection {out['seconds']['exact']:.1f} s exact, {out['seconds']['projected']:.1f} s projected "
                  f"({time.perf_counter() - start:.0f} s wall incl. both)")
            if summary.empty:
                print("  (no module is wider than p)")
                continue
            print(f"  {'kind':6s}" + "".join(f"{c:>20s}" for c in COLUMNS))
            for kind, row in summary.iterrows():
                print(f"  {kind:6s}" + "".join(f"{row[c + ' mean']:>10.4f}/{row[c + ' max']:<9.4f}" for c in COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
