"""Optional random projection of the factors (analysis.engine.sketch): identity when nothing is wide enough,
a derived Johnson-Lindenstrauss bound on a known spectrum, the run id, the planner and the CLI flag."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig
from analysis.engine.capture import capture_batch
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionConfig, run_identity
from analysis.engine.planner import architecture, plan_collection
from analysis.engine.results import CollectionStore
from analysis.engine.sketch import (
    Sketch,
    compare_projection,
    factor_widths,
    is_projected,
    label,
    projection_error,
    sketch_matrix,
)
from analysis.llm.anatomy import ModuleInfo, find_linear_modules
from analysis.llm.formatting import tokenize_batch
from analysis.llm.models import load_model
from analysis.views import collection as views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    safety = [{"id": f"s{i}", "prompt": f"Tell me how to do harm number {i}.",
               "response": "I can't help with that." + " Sorry." * (i % 3)} for i in range(6)]
    utility = [{"id": f"u{i}", "prompt": f"How do I do task {i}?",
                "response": f"Here is how to do task {i}: start small." * (1 + i % 2)} for i in range(6)]
    paths = []
    for name, rows in (("safety", safety), ("utility", utility)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def gpt2_64():
    return load_model(ModelConfig(source="tiny-gpt2", dtype="float64"))


def small_config(datasets, **changes):
    safety, utility = datasets
    values = dict(model=ModelConfig("tiny-gpt2", dtype="float64"), safety=safety, utility=utility, n_safety=4,
                  n_utility=3, batch_size=4, max_length=48, top_k=3, curve_boot=2)
    values.update(changes)
    return CollectionConfig(**values)


def test_sketch_matrices_are_seeded_fixed_and_scaled():
    P = sketch_matrix(300, 50, seed=3, side="in")
    np.testing.assert_array_equal(P, sketch_matrix(300, 50, seed=3, side="in"))
    assert not torch.equal(P, sketch_matrix(300, 50, seed=3, side="out"))  # P_in, P_out independent
    assert not torch.equal(P, sketch_matrix(300, 50, seed=4, side="in"))
    assert P.shape == (50, 300) and abs(float(P.pow(2).sum()) / 300 - 1) < 0.05  # E ||P e_j||^2 = 1
    wide, narrow = ModuleInfo("a", "up", 0, 128, 64), ModuleInfo("b", "k", 0, 16, 64)
    assert is_projected(wide, 32) and not is_projected(narrow, 32) and not is_projected(wide, None)
    assert factor_widths(wide, 32) == (32, 32) and factor_widths(narrow, 32) == (16, 64)
    with pytest.raises(ConfigError):
        CollectionConfig(projection_dim=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_known_spectrum_keeps_its_top_singular_values_within_the_jl_bound(seed):
    """G = U diag(s) V^T of rank r from factors D^T = U diag(s), A^T = V (T = r rows). P_out U and P_in V are
    p x r matrices of iid N(0, 1/p) entries (U, V orthonormal), so with probability >= 1 - 2 exp(-t^2 / 2)
    each has every singular value in [1 - delta, 1 + delta], delta = (sqrt(r) + t) / sqrt(p) (Gaussian
    extreme singular values, Davidson-Szarek / Vershynin HDP Thm 4.6.1). Then s_j(X S Y^T) lies in
    [(1 - delta)^2 s_j, (1 + delta)^2 s_j]: relative error <= 2 delta + delta^2. Here r = 4, p = 512, t = 4:
    delta = 0.265, bound 0.60, failure probability <= 4 exp(-8) = 1.3e-3 per seed."""
    d_out, d_in, r, p, t = 768, 1024, 4, 512, 4.0
    generator = torch.Generator().manual_seed(100 + seed)
    U = torch.linalg.qr(torch.randn(d_out, r, generator=generator, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d_in, r, generator=generator, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 5.0, 2.0, 1.0], dtype=torch.float64)
    D, A = (U * s).T.contiguous(), V.T.contiguous()  # G = D^T A = U diag(s) V^T
    sketch = Sketch(p, seed, [ModuleInfo("m", "up", 0, d_out, d_in)])
    D_p, A_p = sketch.project("m", D, A)
    assert D_p.shape == (r, p) and A_p.shape == (r, p) and D_p.dtype == torch.float64
    s_p = torch.linalg.svdvals(D_p.T @ A_p)
    delta = (math.sqrt(r) + t) / math.sqrt(p)
    error = (s_p[:r] / s - 1).abs()
    assert float(error.max()) <= 2 * delta + delta**2
    assert float(s_p[r]) < 1e-10 * float(s_p[0])  # the rank is kept: P_out G P_in^T has rank r
    # the same bound for the exact top singular values of the unprojected G (sanity of the construction)
    np.testing.assert_allclose(torch.linalg.svdvals(D.T @ A)[:r], s, rtol=1e-12)
    assert sketch.project("other", D, A) == (D, A)  # a module the sketch does not project passes unchanged


def test_projection_wider_than_every_module_equals_the_exact_route(tmp_path, datasets, gpt2_64):
    exact_config = small_config(datasets)
    wide = small_config(datasets, projection_dim=10_000)
    store = CollectionStore(tmp_path)
    exact, same = collect(exact_config, model=gpt2_64, store=store), collect(wide, model=gpt2_64, store=store)
    assert same.run_id != exact.run_id and same.manifest["projection"]["modules"] == []
    assert label(exact.manifest) == "exact" and exact.manifest["projection"] is None
    assert views.projection_notice(exact) is None and views.run_summary(exact)["projection"] == "exact"
    np.testing.assert_array_equal(exact.losses(), same.losses())
    for m in exact.modules:
        np.testing.assert_array_equal(exact.gram(m.name), same.gram(m.name))
        for which in ("safety", "utility"):
            np.testing.assert_array_equal(exact.singular_values(m.name, which), same.singular_values(m.name, which))
    assert exact.table.drop(columns="module").equals(same.table.drop(columns="module"))


def test_projected_run_stores_the_sketched_gradients_and_labels_itself(tmp_path, datasets, gpt2_64):
    p = 24
    config = small_config(datasets, projection_dim=p, n_safety=3, n_utility=2, curve_layers="none")
    results = collect(config, model=gpt2_64, store=CollectionStore(tmp_path))
    modules = find_linear_modules(gpt2_64.model)
    projected = [m for m in modules if min(m.d_out, m.d_in) > p]
    assert projected and results.manifest["projection"]["modules"] == [m.name for m in projected]
    assert label(results.manifest) == f"projected p={p} ({len(projected)} modules)"
    assert "Projected run" in views.projection_notice(results)
    assert views.run_summary(results)["projection"] == label(results.manifest)
    # the stored Gram is that of P_out G_i P_in^T, G_i from a direct exact capture of the same samples
    from analysis.llm.data import load_any
    examples = load_any(config.safety).take(3, 0).examples + load_any(config.utility).take(2, 0).examples
    batch = tokenize_batch(gpt2_64.tokenizer, [e.messages for e in examples], 48, "right")
    factors = capture_batch(gpt2_64.model, batch, modules)
    for m in modules:
        G = np.stack([factors.sample_gradient(m.name, i).numpy() for i in range(5)])
        if m in projected:
            G = sketch_matrix(m.d_out, p, 0, "out").numpy() @ G @ sketch_matrix(m.d_in, p, 0, "in").numpy().T
        flat = G.reshape(5, -1)
        np.testing.assert_allclose(results.gram(m.name), flat @ flat.T, rtol=1e-8, atol=1e-12 * np.abs(flat).max() ** 2)
        assert results.singular_values(m.name, "safety").shape == (min(G.shape[1:]),)
    row = results.table.set_index("module").loc[projected[0].name]
    assert (row["d_out"], row["d_in"]) == (projected[0].d_out, projected[0].d_in)  # the real shape
    assert row["phi_baseline"] == pytest.approx(3 / p, rel=0.3)  # random baseline k / p of the sketch space


def test_run_id_changes_only_when_projection_is_on(datasets):
    config = small_config(datasets)
    assert "projection_dim" not in run_identity(config, "id", {"safety": _Fingerprint(), "utility": _Fingerprint()})["config"]
    ids = {config.run_id(), small_config(datasets, projection_dim=16).run_id(),
           small_config(datasets, projection_dim=32).run_id()}
    assert len(ids) == 3
    assert small_config(datasets, projection_dim=16).run_id() == small_config(datasets, projection_dim=16).run_id()


class _Fingerprint:
    def fingerprint(self):
        return "x"


def test_planner_counts_the_sketched_factors(datasets):
    arch = architecture("tiny-llama")
    config = CollectionConfig(model="tiny-llama", n_safety=8, n_utility=8, max_length=64)
    exact, sketched = plan_collection(config), plan_collection(dataclasses.replace(config, projection_dim=16))
    widths = sum(sum(factor_widths(m, 16)) for m in arch.modules)
    assert sketched.disk_bytes == 16 * 64 * widths * 4 < exact.disk_bytes
    assert sketched.analysis_bytes < exact.analysis_bytes
    assert sketched.projected_modules == sum(is_projected(m, 16) for m in arch.modules) < len(arch.modules)  # k, v: 16 wide
    assert "sketched to p = 16" in sketched.lines()[-1]
    assert exact.projection_dim is None and "projected" not in " ".join(exact.lines())


def test_compare_projection_reports_errors_per_kind(tmp_path, datasets, gpt2_64):
    out = compare_projection(small_config(datasets, curve_layers="none"), 24, model=gpt2_64, store=CollectionStore(tmp_path))
    errors, summary = out["errors"], out["summary"]
    assert set(errors["kind"]) == {"qkv", "o", "up", "down"} and set(summary.index) == set(errors["kind"])
    assert {"s_top_rel mean", "cer1_rel max", "cer16_rel mean", "effective_rank_rel mean", "cosine_abs max"} <= set(summary.columns)
    assert (errors[["s_top_rel", "cer4_rel", "cosine_abs"]] >= 0).all().all()
    assert out["factor_bytes"]["projected"] < out["factor_bytes"]["exact"]
    assert projection_error(out["exact"], out["exact"]).empty  # an exact run has no projected modules


def test_cli_projection_flag(tmp_path, datasets, capsys):
    from analysis.__main__ import main

    safety, utility = datasets
    options = ["--model", "tiny-llama", "--safety", safety, "--utility", utility, "--n-safety", "2", "--n-utility", "2",
               "--max-length", "32", "--modules", "up,down", "--curve-layers", "none", "--projection-dim", "16"]
    assert main(["collect", *options, "--store", str(tmp_path)]) == 0
    config = CollectionConfig(model="tiny-llama", safety=safety, utility=utility, n_safety=2, n_utility=2,
                              max_length=32, kinds="up,down", curve_layers="none", projection_dim=16)
    printed = capsys.readouterr().out
    assert f"run {config.run_id()}:" in printed and "projected p=16" in printed


def test_bench_sketch_runs_on_the_tiny_model(capsys):
    from bench import sketch as bench_sketch

    assert bench_sketch.main(["--model", "tiny-llama", "-n", "2", "--layers", "all", "--max-length", "32",
                              "--projection-dim", "16,1000"]) == 0
    printed = capsys.readouterr().out
    assert "p = 16:" in printed and "cosine_abs" in printed and "no module is wider than p" in printed
