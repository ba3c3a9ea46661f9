"""Benchmark of the per-sample gradient engine on the embedded SmolLM2-135M-Instruct.

One run, all 210 linear modules, n = 64 samples (32 safety + 32 utility, shipped data), <= 64 tokens each.
Every timing is taken in this run with the same thread settings (torch and BLAS on ``--threads`` threads,
default 1) and printed as ratios. Each step is timed twice: wall-clock and CPU time of this process. The
machine is shared, so wall-clock time depends on what the neighbours do at that moment (which differs
between steps minutes apart); with one thread the CPU time is the work itself, so the ratios are given
in CPU time first, wall-clock after.

1. capture: per-sample factors of all modules (hooks, one batched forward + backward of sum_i L_i) vs one
   plain batched forward + backward (parameter gradients) over the same tokens; batches interleaved.
2. engine vs naive: the complete per-module results (batch SVDs, per-sample top-k SVD + single-sample
   overlaps, Gram matrix; no overlap-vs-n curve) of ``analysis.engine.collect.collect`` for all modules and all
   samples, vs the naive route: one backward per sample, a dense copy of every G_i, a dense SVD of every
   G_i and of the batch means, a dense Gram. The naive route is measured on one layer (7 modules) and
   ``--naive-samples`` samples and extrapolated linearly (x 30 layers; x n / n_sub samples for the
   per-sample backward and SVDs); its dense Gram (n^2 d_out d_in) is timed at the full n on random
   matrices of the layer's shapes. The engine is also timed on exactly the subset (like for like).
3. factored per-sample top-k SVD (``geometry.factored_svd`` of (D_i, A_i)) vs the dense SVD of G_i giving the
   same outputs (``geometry.top_singular(G_i, k, method="exact")``: U_k, s_k, V_k), same singular values
   (rtol 1e-4), on the subset's (module, sample) pairs; the dense values-only SVD is printed too.
4. peak resident memory of the full collection (run in a subprocess, VmHWM) vs the process after loading
   the model + 2 GiB.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYER_FOR_NAIVE = 15


class Clock:
    """Accumulates wall-clock and CPU seconds (this process, all threads) per named step."""

    def __init__(self):
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, step: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[step] += time.perf_counter() - wall
            self.cpu[step] += time.process_time() - cpu

    def add(self, step: str, wall: float, cpu: float) -> None:
        self.wall[step] += wall
        self.cpu[step] += cpu


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench engine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="samples, half safety and half utility")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    parser.add_argument("--naive-samples", type=int, default=8, help="samples of the measured naive subset")
    parser.add_argument("--capture-batches", type=int, default=2, help="batches timed for the capture ratio")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: full collection
    return parser


def _config(args):
    from analysis.engine.collect_task import CollectionConfig

    return CollectionConfig(model="default", n_safety=args.n // 2, n_utility=args.n - args.n // 2,
                            max_length=args.max_length, batch_size=args.batch_size, top_k=args.top_k,
                            curve_layers="none")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


# ------------------------------------------------------------------------------------------------
# 2 (engine, all modules) and 4: the whole collection in a fresh process
# ------------------------------------------------------------------------------------------------


def _worker(args) -> int:
    """Run the full collection in this (fresh) process and print one JSON line with timings and memory."""
    _set_threads(args.threads)
    from analysis.core.tasks import TaskContext
    from analysis.engine.collect import collect
    from analysis.engine.results import CollectionStore
    from analysis.llm.models import load_model

    loaded = load_model("default")
    rss_after_load = _status_kib("VmRSS")
    param_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    marks = {"start": (time.perf_counter(), time.process_time())}
    last = [time.perf_counter()]

    def progress(event):
        live = event.live or {}
        if live.get("stage") == "capture" and live.get("done_samples") == live.get("total_samples"):
            marks["captured"] = (time.perf_counter(), time.process_time())  # end of the capture stage
        if time.perf_counter() - last[0] > 30 or live.get("stage") == "done":
            last[0] = time.perf_counter()
            print(f"  [collect {event.fraction:4.0%}] {event.message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="sse-bench-") as root:
        results = collect(_config(args), model=loaded, store=CollectionStore(root), ctx=TaskContext(progress=progress),
                          workers=1, keep_work=True)
        marks["end"] = (time.perf_counter(), time.process_time())
        work_bytes = sum(p.stat().st_size for p in (results.folder / "work").glob("batch_*"))
        out = {"capture_wall": marks["captured"][0] - marks["start"][0],
               "capture_cpu": marks["captured"][1] - marks["start"][1],
               "analyse_wall": marks["end"][0] - marks["captured"][0],
               "analyse_cpu": marks["end"][1] - marks["captured"][1],
               "rss_after_load_kib": rss_after_load, "peak_kib": _status_kib("VmHWM"), "param_bytes": param_bytes,
               "n_modules": len(results.modules), "total_tokens": results.manifest["total_tokens"],
               "factor_bytes": work_bytes, "routes": results.table["route"].value_counts().to_dict()}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def _full_collection(args) -> dict:
    command = [sys.executable, "-m", "bench.engine", "--worker", "1", "--n", str(args.n), "--max-length",
               str(args.max_length), "--batch-size", str(args.batch_size), "--top-k", str(args.top_k),
               "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    process = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not lines:
        raise RuntimeError(f"the collection subprocess failed (exit {process.returncode}):\n{process.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ------------------------------------------------------------------------------------------------
# 1-3 in this process
# ------------------------------------------------------------------------------------------------


def _batches(args, tokenizer):
    from analysis.engine.collect_task import load_set
    from analysis.llm.formatting import tokenize_batch

    config = _config(args)
    batches = []
    for which in ("safety", "utility"):
        examples = load_set(config, which).examples
        for start in range(0, len(examples), args.batch_size):
            chunk = examples[start:start + args.batch_size]
            batches.append(tokenize_batch(tokenizer, [e.messages for e in chunk], args.max_length))
    return config, batches


def _capture_ratio(args, loaded, batches, clock: Clock) -> None:
    """Interleaved: plain forward+backward (parameter grads) and factor capture, on the same batches."""
    from analysis.engine.capture import capture_batch
    from analysis.llm.anatomy import find_linear_modules
    from analysis.llm.formatting import per_sample_loss

    model = loaded.model
    modules = find_linear_modules(model)
    picks = np.unique(np.round(np.linspace(0, len(batches) - 1, args.capture_batches)).astype(int))
    for batch in [batches[i] for i in picks]:  # spread over safety and utility batches
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        with clock("plain"):
            loss = per_sample_loss(model(**batch.model_inputs(), use_cache=False).logits, batch.labels).mean()
            loss.backward()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
        with clock("capture"):
            factors = capture_batch(model, batch, modules)
        del factors


@contextlib.contextmanager
def _single_threaded(torch_too: bool = True):
    """numpy BLAS (and torch, if ``torch_too``) on one thread inside the block; this benchmark process owns
    its threads (the engine itself never sets torch's)."""
    import torch

    from analysis.engine.collect import numpy_single_threaded

    before = torch.get_num_threads()
    if torch_too:
        torch.set_num_threads(1)
    try:
        with numpy_single_threaded():
            yield
    finally:
        torch.set_num_threads(before)


def _naive_and_subset(args, loaded, config, clock: Clock) -> dict:
    """Naive route and the engine on the same subset: one layer, ``naive_samples`` samples."""
    import torch

    from analysis.engine import geometry as geo
    from analysis.engine.analyse import analyse_module
    from analysis.engine.capture import capture_batch
    from analysis.engine.collect_task import load_set
    from analysis.llm.anatomy import find_linear_modules, weight_grad_as_out_in
    from analysis.llm.formatting import per_sample_loss, tokenize_batch

    model = loaded.model
    modules = [m for m in find_linear_modules(model) if m.layer == LAYER_FOR_NAIVE]
    lookup = dict(model.named_modules())
    half = args.naive_samples // 2
    examples = load_set(config, "safety").examples[:half] + load_set(config, "utility").examples[:args.naive_samples - half]
    k = args.top_k

    # naive: one backward per sample, dense copy of every G_i
    for p in model.parameters():
        p.requires_grad_(True)
    dense = {m.name: [] for m in modules}
    for example in examples:
        batch = tokenize_batch(loaded.tokenizer, [example.messages], args.max_length)
        with clock("naive_backward"):
            model.zero_grad(set_to_none=True)
            per_sample_loss(model(**batch.model_inputs(), use_cache=False).logits, batch.labels)[0].backward()
            for m in modules:
                dense[m.name].append(weight_grad_as_out_in(lookup[m.name]).detach().clone())
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)

    with _single_threaded():
        # naive: dense SVDs of every G_i and of the batch means, single-sample overlaps
        for m in modules:
            G = [g.double().numpy() for g in dense[m.name]]
            with clock("naive_sample_svd"):
                per_sample = [geo.top_singular(g, k, method="exact") for g in G]
            with clock("naive_batch_svd"):
                bases = []
                for group in (G[:half], G[half:]):
                    U, s, V = geo.top_singular(np.mean(group, axis=0), min(G[0].shape), method="exact")
                    bases.append(U[:, :k])
                for i, (U_i, _, _) in enumerate(per_sample):
                    geo.single_sample_overlap(U_i, bases[0 if i < half else 1])
        # naive: dense Gram at the full n (its cost is n^2 d_out d_in whatever the values: random G_i)
        generator = torch.Generator().manual_seed(0)
        for m in modules:
            flat = torch.randn(args.n, m.d_out * m.d_in, generator=generator)
            with clock("naive_gram_full_n"):
                (flat @ flat.T).double()
            del flat

    # the engine on the same subset: one batched capture + analyse_module per module
    batch = tokenize_batch(loaded.tokenizer, [e.messages for e in examples], args.max_length)
    with clock("engine_subset_capture"):
        factors = capture_batch(model, batch, modules)
    with _single_threaded(), clock("engine_subset_analyse"):
        for m in modules:
            analyse_module(m, [factors.sample_factors(m.name, i) for i in range(len(examples))], half, k)

    # factored vs dense per-sample SVD on the same G_i (and the capture equals the naive .grad)
    worst_value_error = worst_gradient_error = 0.0
    with _single_threaded():
        for m in modules:
            for i in range(len(examples)):
                D, A = factors.sample_factors(m.name, i)
                D64, A64 = D.double().numpy(), A.double().numpy()
                with clock("factored_svd"):
                    _, s_factored, _ = geo.factored_svd(D64, A64, k)
                G = D64.T @ A64
                with clock("dense_svd"):
                    _, s_dense, _ = geo.top_singular(G, k, method="exact")  # same outputs as factored_svd
                with clock("dense_svd_values_only"):
                    geo.singular_values(G)
                worst_value_error = max(worst_value_error, float(np.max(np.abs(s_factored - s_dense) / s_dense)))
                reference = dense[m.name][i].double().numpy()
                worst_gradient_error = max(worst_gradient_error,
                                           float(np.linalg.norm(G - reference) / np.linalg.norm(reference)))
    return {"modules": len(modules), "samples": len(examples), "svd_rel_error": worst_value_error,
            "capture_vs_grad_rel_error": worst_gradient_error}


def _row(name: str, value: str, target: str = "", ok: bool | None = None) -> str:
    verdict = "" if ok is None else ("ok" if ok else "MISSED")
    return f"  {name:50s} {value:>34s}  {target:>9s}  {verdict}"


def _ratio(clock: Clock, numerator: float | str, denominator: float | str, kind: str) -> float:
    table = clock.cpu if kind == "cpu" else clock.wall
    top = table[numerator] if isinstance(numerator, str) else numerator
    bottom = table[denominator] if isinstance(denominator, str) else denominator
    return top / bottom


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    _set_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from analysis.llm.models import load_model

    bench_start = time.perf_counter()
    print(f"engine benchmark: SmolLM2-135M, n = {args.n}, max_length = {args.max_length}, batch {args.batch_size}, "
          f"k = {args.top_k}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
          flush=True)
    loaded = load_model("default")
    config, batches = _batches(args, loaded.tokenizer)
    clock = Clock()
    with _single_threaded(torch_too=False):
        print("- capture vs plain forward+backward ...", flush=True)
        _capture_ratio(args, loaded, batches, clock)
        print("- naive route and engine on one layer x a few samples ...", flush=True)
        subset = _naive_and_subset(args, loaded, config, clock)
    del loaded
    print("- full collection (all modules, all samples) in a subprocess ...", flush=True)
    full = _full_collection(args)
    clock.add("engine_full", full["capture_wall"] + full["analyse_wall"], full["capture_cpu"] + full["analyse_cpu"])

    # extrapolate the naive route linearly from its subset to all modules and samples
    layers = full["n_modules"] / subset["modules"]
    samples = args.n / subset["samples"]
    for table in (clock.wall, clock.cpu):
        table["naive_full"] = (table["naive_backward"] * samples + table["naive_sample_svd"] * layers * samples
                               + table["naive_batch_svd"] * layers + table["naive_gram_full_n"] * layers)
        table["naive_subset"] = (table["naive_backward"] + table["naive_sample_svd"] + table["naive_batch_svd"]
                                 + table["naive_gram_full_n"] * (subset["samples"] / args.n) ** 2)
        table["engine_subset"] = table["engine_subset_capture"] + table["engine_subset_analyse"]
    budget_kib = full["rss_after_load_kib"] + 2 * 2**20

    def both(numerator: str, denominator: str) -> tuple[float, str]:
        cpu, wall = (_ratio(clock, numerator, denominator, kind) for kind in ("cpu", "wall"))
        return cpu, (f"{cpu:.2f}x cpu ({clock.cpu[numerator]:.0f}/{clock.cpu[denominator]:.0f} s), "
                     f"{wall:.2f}x wall")

    print()
    print(f"  {'measure':50s} {'value':>34s}  {'target':>9s}")
    ratio, text = both("capture", "plain")
    print(_row(f"capture / plain fwd+bwd ({args.capture_batches} batches x {args.batch_size})", text, "<= 1.5x",
               ratio <= 1.5))
    ratio, text = both("naive_full", "engine_full")
    print(_row(f"naive / engine, all {full['n_modules']} modules, n = {args.n}", text, ">= 10x", ratio >= 10))
    ratio, text = both("naive_subset", "engine_subset")
    print(_row(f"naive / engine, subset ({subset['modules']} modules, n = {subset['samples']})", text))
    ratio, text = both("dense_svd", "factored_svd")
    print(_row(f"dense / factored top-k SVD ({subset['modules'] * subset['samples']} G_i)", text, ">= 20x",
               ratio >= 20))
    _, text = both("dense_svd_values_only", "factored_svd")
    print(_row("  dense values-only SVD / factored", text))
    print(_row("  same singular values: max relative difference", f"{subset['svd_rel_error']:.1e}", "<= 1e-4",
               subset["svd_rel_error"] <= 1e-4))
    print(_row("  captured G_i vs naive .grad: max rel. difference", f"{subset['capture_vs_grad_rel_error']:.1e}"))
    print(_row("peak RSS of the full collection (subprocess)", f"{full['peak_kib'] / 2**20:.2f} GiB",
               f"<= {budget_kib / 2**20:.2f}", full["peak_kib"] <= budget_kib))
    print(_row("  RSS after loading the model (parameters)",
               f"{full['rss_after_load_kib'] / 2**20:.2f} GiB ({full['param_bytes'] / 2**20:.0f} MiB)"))
    print()
    print(f"  engine, full run: capture {full['capture_cpu']:.0f} s cpu / {full['capture_wall']:.0f} s wall, analysis "
          f"{full['analyse_cpu']:.0f} s cpu / {full['analyse_wall']:.0f} s wall; {full['total_tokens']} kept tokens, "
          f"factors on disk {full['factor_bytes'] / 2**30:.2f} GiB, Gram routes {full['routes']}")
    c = clock.cpu
    print(f"  naive, one layer (cpu s): backward {c['naive_backward']:.1f} and per-sample dense SVD "
          f"{c['naive_sample_svd']:.1f} for {subset['samples']} samples, batch SVD {c['naive_batch_svd']:.1f}, dense "
          f"Gram at n = {args.n} {c['naive_gram_full_n']:.1f}; engine, same {subset['samples']} samples: capture "
          f"{c['engine_subset_capture']:.1f}, analysis {c['engine_subset_analyse']:.1f}")
    print(f"  naive extrapolation: linear, x{layers:.0f} (all modules / one layer), x{samples:.0f} (samples) for the "
          "per-sample backward and SVDs; the Gram is timed at the full n")
    print(f"  benchmark time {time.perf_counter() - bench_start:.0f} s; load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
