"""CLI commands ``collect``, ``runs`` and ``delete`` (see ``analysis/__main__.py``).

``collect`` builds a :class:`~analysis.engine.gradients.CollectionConfig` from its options (or reads it
with ``--config FILE``) and runs it through ``analysis.core.cli.run_task`` (``--device``, ``--threads``,
``--job``); the store, ``--force``, ``--keep-work``, ``--workers`` and ``--chunk-mb`` do not change the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import ClassVar

from analysis.core.cli import add_device_map_argument, add_task_arguments, bounded_int
from analysis.core.config import InputError, ModelConfig


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "collect":
        from analysis.engine.gradients import BOUNDS, CollectionConfig

        defaults = CollectionConfig()
        add = parser.add_argument
        size = {name: bounded_int(*bounds) for name, bounds in BOUNDS.items()}
        add("--model", default="default", help="default, tiny-llama, tiny-gpt2, hub id or checkpoint folder")
        add("--dtype", default="float32", help="model dtype: float32 (default), float64, bfloat16")
        add_device_map_argument(parser)
        add("--safety", default=defaults.safety, help="shipped dataset name or file (refusals to harmful prompts)")
        add("--utility", default=defaults.utility, help="shipped dataset name or file (benign tasks)")
        add("--safety-split", default=None, help="use only this split of the safety file")
        add("--utility-split", default=None, help="use only this split of the utility file")
        add("-n", type=bounded_int(2, 2 * BOUNDS["n_safety"][1]), default=None,
            help="total samples (>= 2), split evenly between safety and utility")
        add("--n-safety", type=size["n_safety"], default=None, help=f"safety samples (default {defaults.n_safety})")
        add("--n-utility", type=size["n_utility"], default=None, help=f"utility samples (default {defaults.n_utility})")
        add("--layers", default=defaults.layers, help="layers, e.g. 0-29, 0-3,7 or all")
        add("--modules", default=defaults.kinds, help="module kinds, e.g. q,k,v,o,gate,up,down or all")
        add("--regex", default=None, help="select modules whose HF path matches (replaces --layers/--modules)")
        add("--max-length", type=size["max_length"], default=defaults.max_length, help="tokens per sample")
        add("--batch-size", type=size["batch_size"], default=defaults.batch_size)
        add("--padding-side", choices=("right", "left"), default=defaults.padding_side)
        add("--top-k", type=size["top_k"], default=defaults.top_k, help="subspace dimension k")
        add("--seed", type=int, default=defaults.seed)
        add("--gram-route", choices=("auto", "ghost", "dense"), default=defaults.gram_route)
        add("--curve-layers", default=defaults.curve_layers, help="overlap-vs-n curve layers: auto, all, none, 0,10")
        add("--curve-boot", type=size["curve_boot"], default=defaults.curve_boot, help="random subsets per n for the curve")
        add("--modules-per-pass", type=bounded_int(0), default=defaults.modules_per_pass,
            help="capture at most this many modules per forward+backward pass (0: all; bounds memory and disk)")
        add("--projection-dim", type=bounded_int(1), default=None, metavar="P",
            help="sketch the factors of modules with min(d_out, d_in) > P to P dims (random projection; "
                 "spectra/cosines approximate, angles in sketch space; default: exact)")
        add("--memory-budget", type=float, default=None, metavar="GiB",
            help="refuse to start when the planned peak memory is above this (the plan is printed first)")
        add("--disk-budget", type=float, default=None, metavar="GiB",
            help="refuse to start when the planned factor files need more disk than this")
        add("--workers", type=bounded_int(1, 256), default=None,
            help="modules analysed in parallel, >= 1 (default: min(2, CPUs))")
        add("--chunk-mb", type=bounded_int(1, 2**20), default=512, help="memory for one module's dense G_i chunk (MiB, >= 1)")
        add("--force", action="store_true", help="recompute even if the run exists")
        add("--keep-work", action="store_true", help="keep the per-batch factor files of the run")
        add("--store", default=None, help="runs folder (default cache/runs)")
        add_task_arguments(parser)
    elif command == "runs":
        parser.add_argument("--store", default=None, help="runs folder (default cache/runs)")
    elif command == "delete":
        parser.add_argument("run", help="run id (or a unique prefix)")
        parser.add_argument("--store", default=None, help="runs folder (default cache/runs)")


def _config(args: argparse.Namespace):
    from analysis.engine.gradients import CollectionConfig

    defaults = CollectionConfig()
    given = args.n is not None
    n_safety = args.n_safety if args.n_safety is not None else (args.n // 2 if given else defaults.n_safety)
    n_utility = args.n_utility if args.n_utility is not None else (args.n - args.n // 2 if given else defaults.n_utility)
    return CollectionConfig(
        model=ModelConfig(source=args.model, dtype=args.dtype, device_map=args.device_map),
        safety=args.safety, utility=args.utility,
        safety_split=args.safety_split, utility_split=args.utility_split, n_safety=n_safety, n_utility=n_utility,
        layers=args.layers, kinds=args.modules, regex=args.regex, max_length=args.max_length,
        batch_size=args.batch_size, padding_side=args.padding_side, top_k=args.top_k, seed=args.seed,
        gram_route=args.gram_route, curve_layers=args.curve_layers, curve_boot=args.curve_boot,
        modules_per_pass=args.modules_per_pass, projection_dim=args.projection_dim)


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


@dataclasses.dataclass(frozen=True)
class CollectRun:
    """The collect task as the CLI runs it: the config plus how to run it (store, force, keep_work, workers,
    chunk size), none of which changes the numbers, hence not in the run id."""

    config: object  # CollectionConfig
    store: str | None = None
    force: bool = False
    keep_work: bool = False
    workers: int | None = None
    chunk_bytes: int = 512 * 2**20

    kind: ClassVar[str] = "collect"

    def run_id(self) -> str:
        return self.config.run_id()

    def execute(self, ctx) -> dict:
        from analysis.core.store import RunStore
        from analysis.engine.collect import collect
        from analysis.engine.gradients import collection_summary

        start = time.perf_counter()
        results = collect(self.config, store=RunStore(self.store), ctx=ctx, force=self.force,
                          keep_work=self.keep_work, workers=self.workers, chunk_bytes=self.chunk_bytes)
        return dict(collection_summary(results), seconds=round(time.perf_counter() - start, 3))


def print_result(summary) -> None:
    """The printed summary of a finished collect task (its run read back from the summary's folder)."""
    from analysis.core.store import RunStore

    folder = Path(summary["folder"])
    if "seconds" in summary:
        print(f"done in {summary['seconds']:.1f} s")
    print_summary(RunStore(folder.parent).load(summary["run_id"]))


def _collect(args: argparse.Namespace) -> int:
    from analysis.core.cli import load_task, run_task
    from analysis.core.distributed import leader_process
    from analysis.engine.gradients import CollectionConfig
    from analysis.engine.planner import plan_collection

    try:
        config = load_task(args.config, CollectionConfig) if args.config else _config(args)
        task = CollectRun(config, store=args.store, force=args.force, keep_work=args.keep_work,
                          workers=args.workers, chunk_bytes=args.chunk_mb * 2**20)
        plan = plan_collection(config, device=args.device, chunk_bytes=task.chunk_bytes)
        if leader_process():  # torchrun: rank 0 speaks
            print("\n".join(plan.lines()), flush=True)
        plan.check(memory_budget=None if args.memory_budget is None else args.memory_budget * 2**30,
                   disk_budget=None if args.disk_budget is None else args.disk_budget * 2**30)
        return run_task(task, args, print_result)
    except (InputError, ValueError) as error:
        print(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume from the last finished batch")
        return 130


def run(args: argparse.Namespace) -> int:
    from analysis.core.store import RunStore, StoreError

    if args.command == "collect":
        return _collect(args)
    store = RunStore(args.store)
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
