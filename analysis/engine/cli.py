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
    ]
    print(f"  point estimates, over modules  {'safety':>10s} {'utility':>10s}")
    for name, safety, utility in rows:
        print(f"  {name:30s} {safety:10.3f} {utility:10.3f}")
    print(f"  overlap phi(safety, utility top-k): median {table['phi_su'].median():.3f} "
          f"(random baseline median {table['phi_baseline'].median():.4f})")
    _print_intervals(results)
    print(f"  verdicts by stated tests, with n: python -m analysis findings --run {results.run_id}")
    for message in results.messages:
        print(f"  note: {message}")


def _print_intervals(results) -> None:
    """The across-module summaries of :data:`analysis.engine.evidence.SUMMARIES` that the pages show (one
    definition each), with their 95% bootstrap intervals over prompts when the run has resampling."""
    from analysis.engine import evidence as ev
    from analysis.engine.resampling import load_evidence

    try:
        evidence = load_evidence(results)
    except (OSError, KeyError, ValueError):
        evidence = None
    print("  with 95% bootstrap intervals over prompts:" if evidence is not None else "  (no resampling stored):")
    for key, spec_text in (("median_cosine", "+.3f"), ("median_pair_share", ".0%"), ("median_sample_phi", ".3f"),
                           ("median_sample_top1", ".3f")):
        spec = ev.SUMMARIES[key]
        if evidence is None:
            print(f"    {spec.name}: {results.table[spec.stat].astype(float).median():{spec_text}}")
            continue
        result = ev.summary(results.table, evidence, key)
        print(f"    {spec.name}: {result.value:{spec_text}} [{result.lo:{spec_text}}, {result.hi:{spec_text}}]")


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
