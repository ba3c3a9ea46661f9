"""The GPU check in one script: agreement with a reference, planner vs measured peak, bf16 SPF step, throughput.

``python -m bench gpu [--small] [--out FILE] [--skip-tests]``

No download: every model is built from a config with random weights. On a CUDA machine (target: under 8
minutes on one H100):

1. ``cuda-tests``: the project's CUDA tests (pytest ``-k "cuda or gpu"`` on the files that hold them).
2. ``agreement``: the tiny Llama on the CPU (float32) vs on CUDA (float32): per-sample factors of every
   linear module, the Gram matrix (ghost and dense routes), an SPF conflict projection, greedy generation.
   Relative errors ``||a - b|| / ||a||`` against 1e-4 (generation: share of identical completions).
3. ``planner``: a 7B-shape random Llama (hidden 4096, 32 layers, bf16): the planner's predicted capture
   memory (model + capture) vs the measured CUDA peak of one capture pass, and the capture time vs one plain
   forward + backward over the same batch.
4. ``spf-bf16``: a 1B-shape random Llama in bf16: a plain AdamW step vs an SPF step (safety basis refresh:
   safety backward + top-k per module; projection only), medians, and the amortised ratio over R = 10 steps.
5. ``throughput``: greedy generation tokens/s of the 1B-shape model at several batch sizes.

Without CUDA, ``--small`` runs the CPU parts under a minute: agreement of float32 against a float64
reference on the CPU, the planner on a small random Llama against the resident-memory peak, the SPF step
on a small model in bf16, throughput of the small model. Writes one JSON (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512),
}
TOLERANCE = 1e-4


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def random_llama(shape: str, device: str, dtype, seed: int = 0):
    """A randomly initialised Llama of one of :data:`SHAPES`, built on ``device`` (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_batch(n: int, length: int, vocab: int, device, seed: int = 0):
    """A TokenizedBatch of random tokens: the second half of each row is the response (carries the loss)."""
    import torch

    from analysis.llm.formatting import TokenizedBatch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    positions = torch.arange(length).expand(n, length).clone()
    return TokenizedBatch(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                          labels=labels.to(device), position_ids=positions.to(device), truncated=[False] * n,
                          template="random")


def _relative(a, b) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = float(a.norm())
    return float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())


def agreement(device_b: str, dtype_b) -> dict:
    """The tiny Llama (float32, CPU) against a copy on ``device_b`` in ``dtype_b``: factors, Gram, SPF, generation."""
    import torch

    from analysis.engine.capture import capture_batch
    from analysis.engine.gram import gram_matrix
    from analysis.lab.spf import project_gradients, top_k_basis
    from analysis.llm.anatomy import find_linear_modules
    from analysis.llm.models import tiny_model
    from analysis.safety.generation import generate

    model_a, tokenizer = tiny_model("tiny-llama", seed=0)
    model_a.eval()
    model_b = copy.deepcopy(model_a).to(device=device_b, dtype=dtype_b).eval()
    modules = find_linear_modules(model_a)
    out: dict = {}
    batch_a = random_batch(4, 24, len(tokenizer), "cpu", seed=1)
    batch_b = random_batch(4, 24, len(tokenizer), device_b, seed=1)
    fa, fb = capture_batch(model_a, batch_a, modules), capture_batch(model_b, batch_b, modules)
    out["factors"] = max(max(_relative(fa.inputs[m.name], fb.inputs[m.name]),
                             _relative(fa.output_grads[m.name], fb.output_grads[m.name])) for m in modules)
    widest = max(modules, key=lambda m: m.d_out * m.d_in).name
    pairs_a = [fa.sample_factors(widest, i) for i in range(fa.n_samples)]
    pairs_b = [fb.sample_factors(widest, i) for i in range(fb.n_samples)]
    gram_a, _ = gram_matrix(pairs_a, "ghost")
    out["gram_ghost"] = _relative(torch.as_tensor(gram_a), torch.as_tensor(gram_matrix(pairs_b, "ghost")[0]))
    out["gram_dense"] = _relative(torch.as_tensor(gram_a), torch.as_tensor(gram_matrix(pairs_b, "dense")[0]))
    safety_a = sum(fa.sample_gradient(widest, i) for i in range(2))
    safety_b = sum(fb.sample_gradient(widest, i) for i in range(2))
    utility_a = sum(fa.sample_gradient(widest, i) for i in range(2, 4))
    utility_b = sum(fb.sample_gradient(widest, i) for i in range(2, 4))
    projected = []
    for safety, utility in ((safety_a, utility_a), (safety_b, utility_b)):
        U, _, V = top_k_basis(safety, 2, method="exact")
        G = utility.clone()
        project_gradients({widest: G}, {widest: (U, V)}, "conflict")
        projected.append(G)
    out["spf_conflict_projection"] = _relative(*projected)
    contexts = [[{"role": "user", "content": text}] for text in ("hello", "how are you?", "name a colour", "2+2=")]
    texts_a = generate(model_a, tokenizer, contexts, 8, 4)
    texts_b = generate(model_b, tokenizer, contexts, 8, 4)
    out["generation_identical_share"] = sum(a == b for a, b in zip(texts_a, texts_b)) / len(contexts)
    return out


def planner_check(shape: str, device: str, dtype, batch: int, length: int, modules_per_pass: int) -> dict:
    """Planner prediction vs measured peak of one capture pass, and capture time vs one forward + backward."""
    import torch

    from analysis.core.config import ModelConfig
    from analysis.engine.capture import capture_batch
    from analysis.engine.collect_task import CollectionConfig
    from analysis.engine.planner import architecture, measure_capture_peak, plan_collection
    from analysis.llm.anatomy import select_modules
    from analysis.llm.formatting import per_sample_loss

    dtype_name = str(dtype).removeprefix("torch.")
    model = random_llama(shape, device, dtype)
    model_config = ModelConfig(source=f"random-{shape}", dtype=dtype_name)
    arch = architecture(model_config, model=model)
    collection = CollectionConfig(model=model_config, n_safety=batch, n_utility=batch, batch_size=batch,
                                  max_length=length, modules_per_pass=modules_per_pass)
    plan = plan_collection(collection, arch, device=device)
    modules = select_modules(arch.modules)[:plan.modules_per_pass]
    data = random_batch(batch, length, SHAPES[shape]["vocab_size"], device, seed=2)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        factors, capture_seconds = _timed(lambda: capture_batch(model, data, modules), device)
        measured_capture = torch.cuda.max_memory_allocated() - before
        measured_peak = torch.cuda.max_memory_allocated()
        del factors
    else:
        measured_capture = measure_capture_peak(model, data, modules)
        measured_peak = arch.n_params * arch.param_bytes + measured_capture
        _, capture_seconds = _timed(lambda: capture_batch(model, data, modules), device)

    def forward_backward():
        losses = per_sample_loss(model(**data.model_inputs(), use_cache=False).logits, data.labels)
        losses.sum().backward()

    forward_backward()  # warm-up (allocations, kernel choice) of the plain pass, as the capture had its own
    model.zero_grad(set_to_none=True)
    _, plain_seconds = _timed(forward_backward, device)
    model.zero_grad(set_to_none=True)
    predicted_peak = plan.model_bytes + plan.capture_bytes
    return {"shape": shape, "dtype": dtype_name, "params": arch.n_params, "batch": batch, "tokens": length,
            "modules": len(modules), "passes": plan.passes, "predicted_capture_bytes": plan.capture_bytes,
            "measured_capture_bytes": int(measured_capture), "predicted_peak_bytes": predicted_peak,
            "measured_peak_bytes": int(measured_peak), "peak_ratio": measured_peak / predicted_peak,
            "capture_seconds": capture_seconds, "forward_backward_seconds": plain_seconds,
            "capture_ratio": capture_seconds / plain_seconds}


def spf_step_check(shape: str, device: str, dtype, batch: int, length: int, k: int = 8, refresh: int = 10,
                   repeats: int = 3) -> dict:
    """A plain AdamW step vs an SPF step (refresh: safety backward + top-k bases; projection only), in ``dtype``."""
    import torch

    from analysis.lab.spf import project_gradients, top_k_basis
    from analysis.llm.anatomy import as_out_in, find_linear_modules
    from analysis.llm.formatting import per_sample_loss

    model = random_llama(shape, device, dtype)
    model.train()
    vocab = SHAPES[shape]["vocab_size"]
    utility, safety = random_batch(batch, length, vocab, device, 3), random_batch(batch, length, vocab, device, 4)
    modules = {m.name: dict(model.named_modules())[m.name] for m in find_linear_modules(model)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    generator = torch.Generator().manual_seed(0)  # top_k_basis draws its test matrix on the CPU

    def backward(data):
        optimizer.zero_grad(set_to_none=True)
        per_sample_loss(model(**data.model_inputs(), use_cache=False).logits, data.labels).mean().backward()

    def gradients():
        return {name: as_out_in(module, module.weight.grad) for name, module in modules.items()}

    basis: dict = {}

    def plain():
        backward(utility)
        optimizer.step()

    def refresh_step():
        backward(safety)
        basis.clear()
        for name, G in gradients().items():
            U, _, V = top_k_basis(G, k, generator=generator)
            basis[name] = (U, V)
        backward(utility)
        project_gradients(gradients(), basis, "conflict")
        optimizer.step()

    def project_step():
        backward(utility)
        removed = project_gradients(gradients(), basis, "conflict")
        optimizer.step()
        return removed

    times: dict[str, list[float]] = {"plain": [], "refresh": [], "project": []}
    removed = {}
    for repeat in range(repeats + 1):  # the first round warms up
        for name, step in (("plain", plain), ("refresh", refresh_step), ("project", project_step)):
            result, seconds = _timed(step, device)
            if repeat:
                times[name].append(seconds)
            if name == "project":
                removed = result
    median = {name: statistics.median(values) for name, values in times.items()}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    amortised = (median["refresh"] + (refresh - 1) * median["project"]) / (refresh * median["plain"])
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "k": k, "R": refresh,
            "plain_seconds": median["plain"], "refresh_seconds": median["refresh"],
            "project_seconds": median["project"], "refresh_ratio": median["refresh"] / median["plain"],
            "project_ratio": median["project"] / median["plain"], "amortised_ratio": amortised,
            "removed_mean": statistics.fmean(f for f, _ in removed.values()) if removed else math.nan,
            "parameters_finite": finite}


def throughput(shape: str, device: str, dtype, batch_sizes, prompt: int, new_tokens: int) -> dict:
    """Greedy generation tokens/s (new tokens of the whole batch) at each batch size, forced to full length."""
    import torch

    model = random_llama(shape, device, dtype)
    vocab = SHAPES[shape]["vocab_size"]
    out = {}
    for size in batch_sizes:
        ids = torch.randint(0, vocab, (size, prompt), generator=torch.Generator().manual_seed(size)).to(device)

        def run(ids=ids):
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                               temperature=None, top_p=None, top_k=None)

        run()
        _, seconds = _timed(run, device)
        out[size] = size * new_tokens / seconds
    return {"shape": shape, "dtype": str(dtype).removeprefix("torch."), "prompt_tokens": prompt,
            "new_tokens": new_tokens, "tokens_per_second": out}


def cuda_tests() -> dict:
    """The project's CUDA tests in a subprocess: exit code and pytest's summary line."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_precision.py",
               "tests/test_models.py", "-k", "cuda or gpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return {"returncode": done.returncode, "summary": lines[-1] if lines else done.stderr[-300:]}


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def table_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, check, value, target, status) rows of the printed table."""
    rows = []

    def add(section, check, value, target, ok):
        rows.append((section, check, value, target, "ok" if ok else "CHECK"))

    for section, result in results.items():
        if "error" in result:
            rows.append((section, "error", result["error"][:70], "", "ERROR"))
        elif "skipped" in result:
            rows.append((section, "skipped", result["skipped"], "", "-"))
        elif section == "cuda-tests":
            add(section, "pytest", result["summary"][:60], "rc 0", result["returncode"] == 0)
        elif section == "agreement":
            for key, value in result.items():
                if key in ("reference", "device", "dtype", "seconds"):
                    continue
                if key == "generation_identical_share":
                    add(section, key, f"{value:.0%}", ">= 75%", value >= 0.75)
                else:
                    add(section, f"{key} rel. error", f"{value:.1e}", f"<= {TOLERANCE:.0e}", value <= TOLERANCE)
        elif section == "planner":
            add(section, f"peak, {result['shape']} {result['dtype']}",
                f"{_gib(result['measured_peak_bytes'])} vs {_gib(result['predicted_peak_bytes'])} ({result['peak_ratio']:.2f}x)",
                "ratio 0.5-1.5", 0.5 <= result["peak_ratio"] <= 1.5)
            add(section, "capture / fwd+bwd time", f"{result['capture_ratio']:.2f}x", "<= 2", result["capture_ratio"] <= 2)
        elif section == "spf-bf16":
            add(section, f"amortised SPF / plain step (R={result['R']})", f"{result['amortised_ratio']:.2f}x",
                "<= 1.2", result["amortised_ratio"] <= 1.2)
            add(section, "refresh step / plain", f"{result['refresh_ratio']:.2f}x", "", True)
            add(section, "parameters finite", str(result["parameters_finite"]), "True", result["parameters_finite"])
        elif section == "throughput":
            for size, rate in result["tokens_per_second"].items():
                add(section, f"batch {size}", f"{rate:.0f} tok/s", "", True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (the CPU path; a test runs it)")
    parser.add_argument("--out", default=None, help="JSON file (default: $OUT/gpu.json if $OUT is set, else cache/bench)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the CUDA pytest subset")
    parser.add_argument("--threads", type=int, default=1)
    args, _unknown = parser.parse_known_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    big = cuda and not args.small
    started = time.perf_counter()
    print(f"bench gpu: device {device}{' (' + torch.cuda.get_device_name(0) + ')' if cuda else ''}, "
          f"{'full' if big else 'small'} shapes, torch {torch.__version__}", flush=True)
    steps = {
        "cuda-tests": (lambda: cuda_tests()) if cuda and not args.skip_tests else None,
        "agreement": (lambda: {"reference": "cpu float32", "device": device,
                               "dtype": "float32" if cuda else "float64",
                               **agreement(device, torch.float32 if cuda else torch.float64)}),
        "planner": (lambda: planner_check("7b", device, torch.bfloat16, batch=4, length=256, modules_per_pass=0)) if big
        else (lambda: planner_check("small", "cpu", torch.float32, batch=4, length=64, modules_per_pass=0)),
        "spf-bf16": (lambda: spf_step_check("1b", device, torch.bfloat16, batch=4, length=256)) if big
        else (lambda: spf_step_check("small", device, torch.bfloat16, batch=2, length=32, k=4, repeats=2)),
        "throughput": (lambda: throughput("1b", device, torch.bfloat16, (1, 8, 32), 64, 64)) if big
        else (lambda: throughput("small", device, torch.float32, (1, 4), 16, 8)),
    }
    results: dict = {}
    for name, step in steps.items():
        if step is None:
            results[name] = {"skipped": "no CUDA" if not cuda else "--skip-tests"}
            continue
        start = time.perf_counter()
        try:
            results[name] = step()
        except Exception as error:  # noqa: BLE001 - one failing check must not hide the others
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name]["seconds"] = time.perf_counter() - start
        print(f"  {name}: {results[name]['seconds']:.1f} s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    rows = table_rows(results)
    width = max(len(r[1]) for r in rows)
    print(f"\n{'section':11s} {'check':{width}s} {'value':38s} {'target':14s} status")
    for section, check, value, target, status in rows:
        print(f"{section:11s} {check:{width}s} {value:38s} {target:14s} {status}")
    report = {"device": device, "gpu": torch.cuda.get_device_name(0) if cuda else None, "small": not big,
              "torch": torch.__version__, "python": platform.python_version(), "results": results,
              "rows": [dict(zip(("section", "check", "value", "target", "status"), r)) for r in rows],
              "seconds": time.perf_counter() - started}
    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu.json"
    else:
        from analysis.core.config import cache_dir

        out = cache_dir() / "bench" / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out} ({report['seconds']:.0f} s in all)")
    return 1 if any(r[4] == "ERROR" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
