"""``python -m analysis findings --run ID [--json]``: the findings table of a stored run with intervals and tests."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--run", required=True, help="run id (or a unique prefix) of a stored collection run")
    parser.add_argument("--json", action="store_true", help="print the table as JSON records (NaN as null)")
    parser.add_argument("--modules", action="store_true",
                        help="also print the per-module intervals, p-values and Benjamini-Hochberg significance")
    parser.add_argument("--store", default=None, help="runs folder (default cache/runs)")


def run(args: argparse.Namespace) -> int:
    from analysis.core.store import StoreError, finite_or_none, json_default
    from analysis.engine.resampling import RESAMPLING_FILE, load_evidence
    from analysis.engine.results import CollectionStore
    from analysis.views import findings as fv

    store = CollectionStore(args.store)
    matches = [run_id for run_id in store.run_ids() if run_id.startswith(args.run)]
    if len(matches) != 1:
        print(f"error: {'no run' if not matches else 'several runs'} match {args.run!r} in {store.root}")
        return 2
    try:
        results = store.load(matches[0])
    except StoreError as error:
        print(f"error: {error}")
        return 2
    progress = None
    if not (results.folder / RESAMPLING_FILE).exists():
        print("note: this run was stored before intervals existed; resampling its Gram matrices now "
              "(rank and single-sample tests need a new collection)", file=sys.stderr)
        progress = _bar(len(results.modules))
    evidence = load_evidence(results, progress=progress)
    frame, text = fv.findings(results, evidence)
    modules = fv.module_table(results, evidence) if args.modules else None
    if args.json:
        payload = {"run_id": results.run_id, "n_safety": evidence.n_safety, "n_utility": evidence.n_utility,
                   "n_boot": evidence.n_boot, "n_perm": evidence.n_perm, "evidence": evidence.source,
                   "findings": frame.to_dict(orient="records")}
        if modules is not None:
            payload["modules"] = modules.to_dict(orient="records")
        print(json.dumps(finite_or_none(json.loads(json.dumps(payload, default=json_default))), indent=1))
        return 0
    print(text)
    print()
    columns = ["claim", "measure", "shown", "verdict", "n_needed"]
    import pandas as pd

    with pd.option_context("display.max_colwidth", 90, "display.width", 250):
        print(frame[columns].to_string(index=False))
        if modules is not None:
            keep = [c for c in modules.columns if c in ("label", "diff_k90", "diff_k90_lo", "diff_k90_hi", "diff_k90_q",
                                                      "cosine_su", "cosine_su_lo", "cosine_su_hi", "cosine_su_zero_q")]
            print()
            print(modules[keep].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def _bar(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="module", file=sys.stderr)

    def update(fraction: float) -> None:
        bar.n = round(fraction * total)
        bar.refresh()
        if bar.n >= total:
            bar.close()

    return update
