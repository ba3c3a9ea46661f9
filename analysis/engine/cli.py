"""CLI commands ``runs`` and ``delete`` of the collection store (see ``analysis/__main__.py``), and the printed
summary of a collection run (the ``collect`` command itself is generated from
:class:`~analysis.engine.collect_task.CollectionConfig`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "delete":
        parser.add_argument("run", help="run id (or a unique prefix)")
    parser.add_argument("--store", default=None, help="runs folder (default cache/runs)")


def print_summary(results) -> None:
    """A few headline numbers of a run (medians over modules)."""
    table = results.table
    timings = results.manifest.get("timings", {})
    from analysis.engine.sketch import label

    print(f"run {results.run_id}: {len(results.modules)} modules, {results.config['n_safety']} safety + "
          f"{results.config['n_utility']} utility samples, k = {results.top_k}, {label(results.manifest)}  "
          f"({results.folder})")
    if timings:
        print(f"  capture {timings.get('capture_seconds', 0):.1f} s, analysis {timings.get('analyse_seconds', 0):.1f} s")
    if results.manifest.get("n_truncated"):
        print(f"  {results.manifest['n_truncated']} samples were truncated to max_length")
    rows = [
        ("median k@0.9", table["safety_k90"].median(), table["utility_k90"].median()),
        ("median effective rank", table["safety_effective_rank"].median(), table["utility_effective_rank"].median()),
        ("mean single-sample phi", table["safety_sample_phi_mean"].mean(), table["utility_sample_phi_mean"].mean()),
        ("mean |<u1_i, u1>|", table["safety_sample_top1_mean"].mean(), table["utility_sample_top1_mean"].mean()),
    ]
    print(f"  {'':26s} {'safety':>10s} {'utility':>10s}")
    for name, safety, utility in rows:
        print(f"  {name:26s} {safety:10.3f} {utility:10.3f}")
    negative = (table["cosine_su"] < 0).mean()
    print(f"  cos(G_safety, G_utility): median {table['cosine_su'].median():+.3f}, negative in {negative:.0%} of modules")
    print(f"  overlap phi(safety, utility top-k): median {table['phi_su'].median():.3f} "
          f"(random baseline median {table['phi_baseline'].median():.4f})")
    print(f"  per-sample cross cosines negative: {table['cross_cos_frac_negative'].mean():.0%} on average")
    for message in results.messages:
        print(f"  note: {message}")


def run(args: argparse.Namespace) -> int:
    from analysis.core.store import StoreError
    from analysis.engine.results import CollectionStore

    store = CollectionStore(args.store)
    if args.command == "runs":
        runs = store.list_runs()
        if runs.empty:
            print(f"no runs in {store.root}")
        else:
            import pandas as pd

            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print(runs.to_string(index=False))
        return 0
    matches = [run_id for run_id in store.run_ids() if run_id.startswith(args.run)]
    if len(matches) != 1:
        print(f"error: {'no run' if not matches else 'several runs'} match {args.run!r} in {store.root}")
        return 2
    try:
        store.delete(matches[0])
    except StoreError as error:
        print(f"error: {error}")
        return 2
    print(f"deleted run {matches[0]}")
    return 0
