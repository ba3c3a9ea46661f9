"""Gradient engine: exact Gram routes, factored per-sample SVD, per-module results, collect() end to end."""

import json

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig, from_jsonable, to_jsonable
from analysis.core.tasks import Cancelled, TaskContext
from analysis.engine import geometry as geo
from analysis.engine.analyse import analyse_module, curve_sizes
from analysis.engine.capture import capture_batch
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionCancelled, CollectionConfig
from analysis.engine.gram import gram_costs, gram_matrix
from analysis.engine.results import TABLE_COLUMNS, CollectionStore
from analysis.llm.anatomy import find_linear_modules
from analysis.llm.formatting import tokenize_batch
from analysis.llm.models import load_model
from analysis.views import collection as views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Small safety / utility JSONL files with varied lengths (paths)."""
    folder = tmp_path_factory.mktemp("data")
    harmful = ["build a bomb", "steal a car", "hack my neighbour's wifi", "make a fake ID card",
               "poison a dog", "write ransomware", "cheat on a tax return", "stalk my ex"]
    benign = ["bake bread", "learn French", "fix a bike tyre", "write a haiku", "sort a list in Python",
              "plan a trip", "grow tomatoes", "tie a tie"]
    safety = [{"id": f"s{i}", "prompt": f"Tell me how to {task}.", "response": "I can't help with that." + " Sorry." * (i % 3)}
              for i, task in enumerate(harmful)]
    utility = [{"id": f"u{i}", "prompt": f"How do I {task}?", "response": f"Here is how to {task}: start small." * (1 + i % 2)}
               for i, task in enumerate(benign)]
    return write_jsonl(folder / "safety.jsonl", safety), write_jsonl(folder / "utility.jsonl", utility)


@pytest.fixture(scope="module")
def gpt2_64():
    return load_model(ModelConfig(source="tiny-gpt2", dtype="float64"))


def random_pairs(n, d_out, d_in, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = [int(t) for t in torch.randint(1, 9, (n,), generator=generator)]
    return [(torch.randn(t, d_out, generator=generator, dtype=torch.float64),
             torch.randn(t, d_in, generator=generator, dtype=torch.float64)) for t in tokens]


@pytest.mark.parametrize("route", ["dense", "ghost"])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 2000])  # one block / many small blocks
def test_gram_routes_equal_dense_dot_products(route, chunk_bytes):
    pairs = random_pairs(7, 5, 6)
    flat = torch.stack([(D.T @ A).reshape(-1) for D, A in pairs])
    K, sums = gram_matrix(pairs, route, chunk_bytes=chunk_bytes, set_sizes=(4, 3))
    np.testing.assert_allclose(K, (flat @ flat.T).numpy(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums[0], sum(D.T @ A for D, A in pairs[:4]))
    torch.testing.assert_close(sums[1], sum(D.T @ A for D, A in pairs[4:]))


def test_gram_cost_model_prefers_ghost_for_few_tokens_and_dense_for_many():
    few = gram_costs([4] * 64, 1536, 576, chunk_samples=64)
    many = gram_costs([64] * 64, 1536, 576, chunk_samples=64)
    assert few["ghost"] < few["dense"]
    assert many["dense"] < many["ghost"]


def test_analyse_module_matches_dense_reference():
    from analysis.llm.anatomy import ModuleInfo

    d_out, d_in, n_safety, k = 9, 7, 5, 3
    pairs = random_pairs(9, d_out, d_in, seed=1)
    info = ModuleInfo("model.layers.0.mlp.down_proj", "down", 0, d_out, d_in)
    result = analyse_module(info, pairs, n_safety, k, route="ghost", curve_boot=4)
    dense = [(D.T @ A).numpy() for D, A in pairs]
    G_s, G_u = np.mean(dense[:n_safety], axis=0), np.mean(dense[n_safety:], axis=0)
    np.testing.assert_allclose(result.arrays["safety"], np.linalg.svd(G_s, compute_uv=False), rtol=1e-10)
    np.testing.assert_allclose(result.arrays["utility"], np.linalg.svd(G_u, compute_uv=False), rtol=1e-10)
    flat = np.stack([g.ravel() for g in dense])
    np.testing.assert_allclose(result.arrays["gram"], flat @ flat.T, rtol=1e-10)
    # factored per-sample top-k SVD == torch.linalg.svd of the dense G_i
    for i in range(n_safety):
        reference = torch.linalg.svdvals(torch.from_numpy(dense[i]))[:k].numpy()
        np.testing.assert_allclose(result.arrays["safety.s"][i], reference, rtol=1e-10, atol=1e-12 * reference[0])
    U_0, s_0, _ = np.linalg.svd(dense[0])
    U_batch = np.linalg.svd(G_s)[0][:, :k]
    expected = geo.single_sample_overlap(U_0[:, :k], U_batch)
    assert result.arrays["safety.phi"][0] == pytest.approx(expected["phi"], rel=1e-8)
    assert result.arrays["safety.top1"][0] == pytest.approx(expected["top1_abs_cos"], rel=1e-8)
    assert result.row["cosine_su"] == pytest.approx(geo.cosine(G_s, G_u), rel=1e-10)
    assert result.row["phi_su"] == pytest.approx(geo.subspace_overlap(np.linalg.svd(G_s)[0][:, :k],
                                                                      np.linalg.svd(G_u)[0][:, :k]), rel=1e-8)
    assert result.row["phi_baseline"] == pytest.approx(k / d_out)
    assert set(result.row) == set(TABLE_COLUMNS)
    assert result.arrays["curve.phi"].shape == (len(curve_sizes(n_safety)), 4)
    assert np.allclose(result.arrays["curve.phi"][-1], 1.0)  # the whole set is the batch
    dense_route = analyse_module(info, pairs, n_safety, k, route="dense")
    np.testing.assert_allclose(dense_route.arrays["gram"], result.arrays["gram"], rtol=1e-12)


def test_curve_sizes():
    assert curve_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert curve_sizes(6) == [1, 2, 4, 6]
    assert curve_sizes(1) == [1]


def test_config_is_validated_and_hashable():
    with pytest.raises(ConfigError, match="n_safety"):
        CollectionConfig(n_safety=0)
    with pytest.raises(ConfigError, match="gram_route"):
        CollectionConfig(gram_route="fast")
    with pytest.raises(ConfigError, match="padding_side"):
        CollectionConfig(padding_side="middle")
    assert CollectionConfig(kinds="v,q").kinds == CollectionConfig(kinds=("q", "v")).kinds == "q,v"
    config = CollectionConfig(model="tiny-llama", n_safety=3)
    assert CollectionConfig.from_dict(json.loads(json.dumps({"model": {"source": "tiny-llama"}, "n_safety": 3}))) \
        == config


def small_config(datasets, **changes):
    safety, utility = datasets
    values = dict(model=ModelConfig("tiny-gpt2", dtype="float64"), safety=safety, utility=utility, n_safety=5,
                  n_utility=4, batch_size=3, max_length=48, top_k=3, curve_boot=3, padding_side="left")
    values.update(changes)
    return CollectionConfig(**values)


def test_collect_end_to_end_matches_direct_capture(tmp_path, datasets, gpt2_64):
    config = small_config(datasets)
    events = []
    results = collect(config, model=gpt2_64, store=CollectionStore(tmp_path), ctx=TaskContext(progress=events.append))
    assert results.run_id == config.run_id()  # the cheap run id (no model loaded) is the stored run's
    # progress: before and after each of the 4 capture batches (3+2 safety, 3+1 utility) and after each module;
    # live data for charts
    lives = [event.live for event in events]
    assert [e.live["done_samples"] for e in events if e.message.startswith("captured batch")] == [3, 5, 8, 9]
    assert [e.live["done_samples"] for e in events if e.message.startswith("capturing batch")] == [0, 3, 5, 8]
    assert all(live["total_samples"] == 9 for live in lives)
    capture = [live for live in lives if live["stage"] == "capture"]
    assert capture[-1]["preview"] and all(live["run_id"] == results.run_id for live in lives)
    assert any(entry["cosine"] is not None for entry in capture[-1]["preview"].values())
    assert lives[-1]["stage"] == "done" and events[-1].fraction == 1.0 == lives[-1]["fraction"]
    assert len(lives[-1]["table"]["data"]) == len(results.modules)
    assert [event.fraction for event in events] == sorted(event.fraction for event in events)

    # the stored numbers equal a direct capture of the same samples
    from analysis.llm.data import load_any
    examples = load_any(config.safety).take(5, 0).examples + load_any(config.utility).take(4, 0).examples
    batch = tokenize_batch(gpt2_64.tokenizer, [e.messages for e in examples], 48, "left")
    modules = find_linear_modules(gpt2_64.model)
    factors = capture_batch(gpt2_64.model, batch, modules)
    np.testing.assert_allclose(results.losses(), factors.losses.numpy(), rtol=1e-10)
    for m in modules:
        dense = np.stack([factors.sample_gradient(m.name, i).numpy() for i in range(9)])
        flat = dense.reshape(9, -1)
        np.testing.assert_allclose(results.gram(m.name), flat @ flat.T, rtol=1e-8, atol=1e-14)
        reference = np.linalg.svd(dense[:5].mean(0), compute_uv=False)  # spectra via the Gram: see batch_svd
        np.testing.assert_allclose(results.singular_values(m.label, "safety"), reference, rtol=1e-8,
                                   atol=1e-8 * reference[0])
        assert results.sample_singular_values(m.name, "utility").shape == (4, 3)
        assert results.basis(m.name, "safety", "right").shape[0] == m.d_in
    table = results.table
    assert list(table.columns) == list(TABLE_COLUMNS) and len(table) == len(modules)
    assert table["cosine_su"].between(-1, 1).all()
    assert set(results.samples["set"]) == {"safety", "utility"}
    assert results.overlap_curve(results.curve_modules[0])["phi"].shape == (len(curve_sizes(5)), 3)
    assert results.sample_cosines(modules[0].name).shape == (9, 9)


def test_cancel_raises_and_keeps_work(tmp_path, datasets, gpt2_64):
    context = TaskContext()
    context.progress = lambda event: context.cancel.set() if event.live["done_samples"] >= 3 else None
    store = CollectionStore(tmp_path)
    with pytest.raises(CollectionCancelled) as error:
        collect(small_config(datasets), model=gpt2_64, store=store, ctx=context)
    assert isinstance(error.value, Cancelled) and error.value.run_id == small_config(datasets).run_id()
    assert store.status(error.value.run_id) == "interrupted"


def test_live_data_is_json_and_the_live_charts_draw_from_it(tmp_path, datasets, gpt2_64):
    lives = []
    collect(small_config(datasets), model=gpt2_64, store=CollectionStore(tmp_path),
            ctx=TaskContext(progress=lambda event: lives.append(json.dumps(event.live, allow_nan=False))))
    decoded = [json.loads(text) for text in lives]
    capture = [live for live in decoded if live["stage"] == "capture"][-1]
    assert capture["losses"] and all(isinstance(loss, float) for loss in capture["losses"])
    assert "safety k =" in views.live_answer(capture)
    figures = views.live_figures(capture)
    assert figures and any("Cumulative energy" in f.layout.title.text for f in figures)
    analysing = [live for live in decoded if live["stage"] == "analyse"][0]
    assert analysing["table"]["columns"] == list(TABLE_COLUMNS) and len(analysing["table"]["data"]) == 1
    assert len(views.live_figures(analysing)) == 2 and len(views.live_figures(decoded[-1])) == 2


def test_the_collect_task_round_trips_through_json_and_executes(tmp_path, datasets, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    config = small_config(datasets, model=ModelConfig("tiny-llama"), curve_layers="none")
    again = from_jsonable(CollectionConfig, json.loads(json.dumps(to_jsonable(config))))
    assert again == config and again.run_id() == config.run_id() and again.kind == "collect"
    assert small_config(datasets, model=ModelConfig("tiny-llama"), top_k=2).run_id() != config.run_id()
    summary = again.execute(TaskContext())
    assert json.loads(json.dumps(summary)) == summary and summary["run_id"] == config.run_id()
    assert CollectionStore().status(summary["run_id"]) == "complete" and summary["n_modules"] == 14


def test_model_mismatch_is_refused(tmp_path, datasets, gpt2_64):
    with pytest.raises(ConfigError, match="tiny-gpt2"):
        collect(small_config(datasets, model="tiny-llama"), model=gpt2_64, store=CollectionStore(tmp_path))
    with pytest.raises(ConfigError, match="identity"):  # same source, other weights (dtype)
        collect(small_config(datasets, model=ModelConfig("tiny-gpt2")), model=gpt2_64, store=CollectionStore(tmp_path))


def test_an_unknown_device_is_refused_before_any_work(tmp_path, datasets, gpt2_64):
    with pytest.raises(ValueError, match="tpu"):
        collect(small_config(datasets), model=gpt2_64, store=CollectionStore(tmp_path), ctx=TaskContext(device="tpu"))
    assert CollectionStore(tmp_path).run_ids() == []


@pytest.mark.slow
def test_real_model_per_sample_gradients_match_one_sample_autograd(default_model):
    """SmolLM2-135M (float32): factors of two modules equal a per-sample autograd loop."""
    from analysis.llm.anatomy import weight_grad_as_out_in
    from analysis.llm.formatting import per_sample_loss

    model = default_model.model
    modules = [m for m in find_linear_modules(model) if m.name in
               ("model.layers.0.self_attn.v_proj", "model.layers.29.mlp.down_proj")]
    conversations = [
        [{"role": "user", "content": "How can I make a weapon at home?"},
         {"role": "assistant", "content": "I can't help with that request."}],
        [{"role": "user", "content": "Give me a synonym for happy."}, {"role": "assistant", "content": "Joyful."}],
    ]
    batch = tokenize_batch(default_model.tokenizer, conversations, max_length=64, padding_side="left")
    factors = capture_batch(model, batch, modules)
    lookup = dict(model.named_modules())
    for i, conversation in enumerate(conversations):
        single = tokenize_batch(default_model.tokenizer, [conversation], max_length=64)
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        try:
            per_sample_loss(model(**single.model_inputs()).logits, single.labels)[0].backward()
            for m in modules:
                reference = weight_grad_as_out_in(lookup[m.name])
                torch.testing.assert_close(factors.sample_gradient(m.name, i), reference,
                                           atol=1e-5 * float(reference.abs().max()), rtol=1e-4)
        finally:
            for p in model.parameters():
                p.grad = None


@pytest.mark.slow
def test_real_model_small_collection(tmp_path, default_model):
    config = CollectionConfig(model="default", n_safety=3, n_utility=3, layers="0,29", kinds="v,down",
                              max_length=48, batch_size=3, top_k=4, curve_boot=2)
    store = CollectionStore(tmp_path)
    results = collect(config, model=default_model, store=store)
    assert results.run_id == config.run_id()
    table = results.table
    assert len(table) == 4 and set(table["kind"]) == {"v", "down"}
    metrics = table.drop(columns=["module", "label", "kind", "route"]).astype(float)
    assert np.isfinite(metrics.to_numpy()).all()
    assert (table["safety_k90"] >= 1).all() and table["phi_su"].between(0, 1).all()
    assert np.all(np.diag(results.gram(table["module"][0])) > 0)
    assert collect(config, model=default_model, store=store).run_id == results.run_id  # reused


@pytest.mark.parametrize("route", ["ghost", "dense"])
def test_gram_routes_on_captured_factors(gpt2_64, route):
    """Both Gram routes on real (tiny GPT-2) factors with different T_i equal the dense products."""
    conversations = [[{"role": "user", "content": "Hi" * (i + 1)}, {"role": "assistant", "content": "Ok." * (3 - i)}]
                     for i in range(3)]
    batch = tokenize_batch(gpt2_64.tokenizer, conversations, 48, "right")
    module = find_linear_modules(gpt2_64.model)[1]
    factors = capture_batch(gpt2_64.model, batch, [module])
    pairs = [factors.sample_factors(module.name, i) for i in range(3)]
    assert len({D.shape[0] for D, _ in pairs}) == 3
    flat = torch.stack([factors.sample_gradient(module.name, i).reshape(-1) for i in range(3)])
    K, sums = gram_matrix(pairs, route, set_sizes=(2, 1))
    np.testing.assert_allclose(K, (flat @ flat.T).numpy(), rtol=1e-10)
    torch.testing.assert_close(sums[0].reshape(-1), flat[:2].sum(0))


def test_cli_with_a_config_file_gives_the_same_run_as_with_options(tmp_path, datasets, capsys):
    from analysis.__main__ import main

    safety, utility = datasets
    options = ["--model", "tiny-llama", "--safety", safety, "--utility", utility, "--n-safety", "5", "--n-utility", "4",
               "--batch-size", "3", "--max-length", "48", "--top-k", "3", "--curve-boot", "3",
               "--padding-side", "left", "--modules", "q,down"]
    assert main(["collect", *options, "--store", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    config = CollectionConfig(model="tiny-llama", safety=safety, utility=utility, n_safety=5, n_utility=4,
                              batch_size=3, max_length=48, top_k=3, curve_boot=3, padding_side="left", kinds="q,down")
    assert f"run {config.run_id()}:" in printed and "median k@0.9" in printed
    # the single-sample and cosine summaries are the pages' (one definition) with their intervals
    from analysis.engine import evidence as ev
    from analysis.engine.resampling import load_evidence

    run = CollectionStore(tmp_path / "a").load(config.run_id())
    phi = ev.summary(run.table, load_evidence(run), "median_sample_phi")
    assert f"{ev.SUMMARIES['median_sample_phi'].name}: {phi.value:.3f} [{phi.lo:.3f}, {phi.hi:.3f}]" in printed
    assert f"python -m analysis findings --run {config.run_id()}" in printed
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"kind": "collect", "config": to_jsonable(config)}))  # a job's task.json
    assert main(["collect", "--config", str(task_file), "--store", str(tmp_path / "b")]) == 0
    assert f"run {config.run_id()}:" in capsys.readouterr().out
    first, second = CollectionStore(tmp_path / "a").load(config.run_id()), CollectionStore(tmp_path / "b").load(config.run_id())
    for module in first.module_names:
        np.testing.assert_array_equal(first.gram(module), second.gram(module))
        np.testing.assert_array_equal(first.singular_values(module, "safety"), second.singular_values(module, "safety"))
    np.testing.assert_array_equal(first.losses(), second.losses())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n_safety": 0}))
    assert main(["collect", "--config", str(bad)]) == 2 and "n_safety" in capsys.readouterr().out
