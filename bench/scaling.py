"""How the capture's cost grows: time and peak memory of per-sample factor capture on random-initialised
Llama configs, vs model width, depth, tokens per sample and number of samples; growth exponents from
log-log fits, and the planner's prediction beside each measured peak.

``python -m bench scaling [--big] [--threads 1]``. Each point runs in a fresh subprocess (so its peak RSS is
its own): a random Llama (vocabulary 8000, float32) (head size 64, GQA 3:1 or 4:1) is built, one capture of every linear module
is measured for peak resident memory (``planner.measure_capture_peak``: VmHWM reset, RSS above the loaded
and paged-in model) and then timed over ``n / batch`` batches (process CPU seconds with one thread, which
is the work itself on a shared machine; wall-clock printed too). Exponent b of y ~ x^b is the least-squares
slope of log y on log x. ``--big`` adds the SmolLM2-135M shape and a 1.1B (TinyLlama) shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

POINT = r"""
import json, sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from analysis.llm.anatomy import find_linear_modules
from analysis.engine.capture import capture_batch
from analysis.engine.planner import architecture, measure_capture_peak, plan_collection
from analysis.engine.collect_task import CollectionConfig
from analysis.llm.formatting import TokenizedBatch
p = json.loads(sys.argv[1])
torch.set_num_threads(p["threads"])
heads = max(1, p["h"] // 64)
kv = heads // 3 if heads % 3 == 0 else heads // 4 if heads % 4 == 0 else heads
cfg = LlamaConfig(vocab_size=p["V"], hidden_size=p["h"], intermediate_size=p["i"], num_hidden_layers=p["L"],
                  num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                  max_position_embeddings=4096)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
modules = find_linear_modules(model)
B, T = p["B"], p["T"]
def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p["V"], (B, T), generator=g)
    labels = ids.clone(); labels[:, : T // 2] = -100
    return TokenizedBatch(ids, torch.ones_like(ids), labels, torch.arange(T).expand(B, T).contiguous(), [False] * B, "")
peak = measure_capture_peak(model, batch(0), modules)
cpu0, wall0 = time.process_time(), time.perf_counter()
for b in range(p["n"] // B):
    capture_batch(model, batch(b + 1), modules)
cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
arch = architecture("tiny-llama", model=model)
plan = plan_collection(CollectionConfig(model="tiny-llama", n_safety=B, n_utility=B, batch_size=B, max_length=T), arch)
print(json.dumps({"params": arch.n_params, "peak": peak, "predicted": plan.capture_bytes, "cpu": cpu, "wall": wall}))
"""


def _llama(h: int, L: int, **extra) -> dict:
    return dict(h=h, i=int(8 * h / 3) // 64 * 64, L=L, V=8000, B=4, T=64, n=8, **extra)


def sweeps(big: bool) -> dict[str, tuple[str, list[dict]]]:
    """{sweep name: (the varied key, points)}; every point a dict of h, i, L, V, B, T, n."""
    out = {
        "width": ("params", [_llama(h, 4) for h in (256, 512, 1024)]),
        "depth": ("L", [_llama(512, L) for L in (2, 4, 8)]),
        "tokens": ("T", [dict(_llama(512, 4), T=T) for T in (32, 64, 128)]),
        "samples": ("n", [dict(_llama(512, 4), n=n) for n in (4, 8, 16)]),
    }
    if big:
        out["size"] = ("params", [dict(h=576, i=1536, L=30, V=49152, B=4, T=64, n=4),
                                  dict(h=2048, i=5632, L=22, V=32000, B=4, T=64, n=4)])
    return out


def measure(point: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run([sys.executable, "-c", POINT, json.dumps(dict(point, threads=threads))],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"point {point} failed:\n{out.stderr[-2000:]}")
    return dict(point, **json.loads(out.stdout.strip().splitlines()[-1]))


def exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="add the 135M and 1.1B shapes (minutes, ~8 GB)")
    parser.add_argument("--threads", type=int, default=1)
    args, _ = parser.parse_known_args(argv)
    print(f"{'sweep':8s} {'h':>5s} {'L':>3s} {'T':>4s} {'n':>3s} {'params':>8s} {'peak MiB':>9s} {'plan MiB':>9s} "
          f"{'cpu s':>7s} {'wall s':>7s}")
    summary, seen = [], {}
    for name, (key, points) in sweeps(args.big).items():
        rows = []
        for point in points:  # the sweeps share their middle point: measured once
            tag = json.dumps(point, sort_keys=True)
            seen[tag] = seen.get(tag) or measure(point, args.threads)
            rows.append(seen[tag])
        for r in rows:
            print(f"{name:8s} {r['h']:5d} {r['L']:3d} {r['T']:4d} {r['n']:3d} {r['params'] / 1e6:7.1f}M "
                  f"{r['peak'] / 2**20:9.0f} {r['predicted'] / 2**20:9.0f} {r['cpu']:7.2f} {r['wall']:7.2f}", flush=True)
        xs = [r[key] for r in rows]
        summary.append((name, key, exponent(xs, [r["cpu"] for r in rows]), exponent(xs, [r["peak"] for r in rows])))
    print("\ngrowth exponents b (y ~ x^b): capture CPU time and peak memory")
    for name, key, time_b, memory_b in summary:
        print(f"  {name:8s} vs {key:6s}: time {time_b:5.2f}   memory {memory_b:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
