"""Screening (analysis.engine.screening, analysis.lab.screen): every score against a dense autograd computation on
the tiny Llama, the planted-harmful known answer, streaming, the task's store / resume / CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig
from analysis.core.tasks import Cancelled, CancelToken, TaskContext
from analysis.engine.screening import ReferenceSums, Scorer, safety_basis, stream_batch
from analysis.lab.screen import REFUSAL, ScreenTask, load_screen, screen, screen_store
from analysis.llm.anatomy import find_linear_modules, select_modules
from analysis.llm.data import load_shipped
from analysis.llm.formatting import per_sample_loss, tokenize_batch
from analysis.llm.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny64():
    """The tiny Llama in float64: the streamed scores and the dense autograd ones agree to rounding."""
    return load_model(ModelConfig(source="tiny-llama", dtype="float64"))


def dense_gradient(loaded, conversation, modules, max_length=96) -> list[torch.Tensor]:
    """The full per-example gradient of the selected weights (d_out, d_in each) by autograd of L_i alone."""
    named = dict(loaded.model.named_modules())
    weights = [named[m.name].weight for m in modules]
    before = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        batch = tokenize_batch(loaded.tokenizer, [conversation], max_length)
        loss = per_sample_loss(loaded.model(**batch.model_inputs(), use_cache=False).logits, batch.labels)[0]
        return [g.detach() for g in torch.autograd.grad(loss, weights)]
    finally:
        for w, flag in zip(weights, before):
            w.requires_grad_(flag)


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def conversations(name: str, n: int, split: str | None = None) -> list[list[dict]]:
    data = load_shipped(name)
    data = data.split(split) if split else data
    return [list(ex.messages) for ex in data.take(n, seed=0)]


# --------------------------------------------------------------------------------------------------
# known answers: streamed scores == dense autograd


def test_every_score_equals_dense_autograd_per_example_gradients(tiny64):
    loaded = tiny64
    loaded.model.eval()
    modules = select_modules(find_linear_modules(loaded.model), "all", "q,v,down,up")
    pool = conversations("utility", 5) + conversations("benign_sensitive", 2)
    harmful = conversations("harmful_prefix", 3)
    refusals = [c[:-1] + [{"role": "assistant", "content": REFUSAL}] for c in harmful]

    # dense: per-example gradients, the two anchor means, the safety basis from the dense refusal mean
    G_c = [sum(g) / len(harmful) for g in zip(*[dense_gradient(loaded, c, modules) for c in harmful])]
    G_r = [sum(g) / len(refusals) for g in zip(*[dense_gradient(loaded, c, modules) for c in refusals])]
    k = 3

    # streamed
    sums = {}
    for name, convs in (("compliance", harmful), ("refusal", refusals)):
        sums[name] = ReferenceSums(len(convs))
        batch = tokenize_batch(loaded.tokenizer, convs, 96)
        stream_batch(loaded.model, batch, modules, sums[name].consume)
    for m, dense_c, dense_r in zip(modules, G_c, G_r):
        torch.testing.assert_close(sums["compliance"].gradients[m.name], dense_c, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums["refusal"].gradients[m.name], dense_r, rtol=1e-9, atol=1e-12)
    basis = {m.name: safety_basis(sums["refusal"].gradients[m.name], k) for m in modules}
    scorer = Scorer(modules, {"refusal": sums["refusal"].gradients, "compliance": sums["compliance"].gradients}, basis)
    values = {}
    for part in (pool[:4], pool[4:]):  # two batches of different padding
        scorer.start(len(part))
        stream_batch(loaded.model, tokenize_batch(loaded.tokenizer, part, 96), modules, scorer.consume)
        for key, value in scorer.finish().values.items():
            values.setdefault(key, []).append(value)
    values = {key: np.concatenate(parts) for key, parts in values.items()}

    from analysis.lab.screen import score_table

    norms = {"refusal": np.array([float(g.pow(2).sum()) for g in G_r]),
             "compliance": np.array([float(g.pow(2).sum()) for g in G_c])}
    table = score_table({**{f"module/{k_}": v for k_, v in values.items()}, "loss": np.zeros(len(pool)),
                         "representation": np.zeros(len(pool)), "tokens": np.zeros(len(pool))}, norms)
    r, c = flat(G_r), flat(G_c)
    for i, conversation in enumerate(pool):
        grads = dense_gradient(loaded, conversation, modules)
        g = flat(grads)
        cos_r = float(g @ r / (g.norm() * r.norm()))
        cos_c = float(g @ c / (g.norm() * c.norm()))
        energy = sum(float((basis[m.name][0].T @ G @ basis[m.name][1]).pow(2).sum()) for m, G in zip(modules, grads))
        expected = {"dot_refusal": float(g @ r), "cos_refusal": cos_r, "cos_compliance": cos_c,
                    "gradient_matching": cos_c - cos_r, "safety_share": energy / float(g @ g),
                    "grad_norm": float(g.norm())}
        for key, value in expected.items():
            assert table[key][i] == pytest.approx(value, rel=1e-5, abs=1e-12), (i, key)
        for j, G in enumerate(grads):  # per-module values kept
            assert values["dot/refusal"][i, j] == pytest.approx(float((G * G_r[j]).sum()), rel=1e-5, abs=1e-14)
            assert values["norm2"][i, j] == pytest.approx(float(G.pow(2).sum()), rel=1e-5)


def test_the_basis_is_the_dense_svd_and_the_share_of_a_basis_gradient_is_one():
    rng = np.random.default_rng(0)
    G = torch.tensor(rng.standard_normal((12, 9)))
    U, V = safety_basis(G, 4)
    u, s, vt = np.linalg.svd(G.numpy())
    np.testing.assert_allclose(np.abs(U.T.numpy() @ u[:, :4]), np.eye(4), atol=1e-8)
    np.testing.assert_allclose(np.abs(V.T.numpy() @ vt[:4].T), np.eye(4), atol=1e-8)
    assert safety_basis(torch.zeros(5, 4), 3)[0].shape == (5, 0)


def test_representation_cosine_and_combine_on_hand_numbers():
    from analysis.engine.screening import combine, representation_cosine

    np.testing.assert_allclose(representation_cosine(np.array([[1.0, 0], [1, 1], [0, 0]]), np.array([2.0, 0])),
                               [1.0, 2 ** -0.5, np.nan])
    values = {"dot/refusal": np.array([[1.0, 2.0]]), "norm2": np.array([[4.0, 5.0]]), "energy": np.array([[1.0, 2.0]])}
    out = combine(values, {"refusal": 4.0})
    assert out["cos/refusal"][0] == pytest.approx(3 / (3 * 2)) and out["safety_share"][0] == pytest.approx(3 / 9)
    only_first = combine(values, {"refusal": 1.0}, np.array([True, False]))
    assert only_first["cos/refusal"][0] == pytest.approx(1 / 2)


@pytest.mark.parametrize("tokens", [[3, 1, 2], [70, 65, 80]])  # ghost route (T small), dense route (T large)
def test_scorer_on_random_factors_equals_dense_products(tokens):
    from analysis.llm.anatomy import ModuleInfo

    rng = np.random.default_rng(len(tokens) + tokens[0])
    d_out, d_in, k = 40, 50, 3
    module = ModuleInfo("m", "q", 0, d_out, d_in)
    R = {"refusal": torch.tensor(rng.standard_normal((d_out, d_in))),
         "compliance": torch.tensor(rng.standard_normal((d_out, d_in)))}
    basis = {"m": safety_basis(R["refusal"], k)}
    scorer = Scorer([module], {name: {"m": G} for name, G in R.items()}, basis)
    D = torch.tensor(rng.standard_normal((sum(tokens), d_out)))
    A = torch.tensor(rng.standard_normal((sum(tokens), d_in)))
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(tokens)]))
    scorer.start(len(tokens))
    scorer.consume("m", D, A, offsets)
    values = scorer.finish().values
    U, V = basis["m"]
    for i in range(len(tokens)):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        G = D[rows].T @ A[rows]
        for name, ref in R.items():
            assert values[f"dot/{name}"][i, 0] == pytest.approx(float((G * ref).sum()), rel=1e-10)
        assert values["norm2"][i, 0] == pytest.approx(float(G.pow(2).sum()), rel=1e-10)
        assert values["energy"][i, 0] == pytest.approx(float((U.T @ G @ V).pow(2).sum()), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# the task


def alpaca_pool(path, n_benign=14, planted=("harmful_prefix", 3)):
    """An Alpaca JSON Lines file: benign utility rows with a few harmful-compliance rows planted in it;
    returns the planted rows' 0-based positions."""
    benign = load_shipped("utility").split("analysis").take(n_benign, seed=1)
    harmful = load_shipped(planted[0]).take(planted[1], seed=1)
    rows = [{"instruction": ex.prompt, "input": "", "output": ex.response} for ex in benign]
    planted_rows = [{"instruction": ex.prompt, "input": "", "output": ex.response} for ex in harmful]
    for position, row in zip([2, 7, 11], planted_rows):
        rows.insert(position, row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [i for i, row in enumerate(rows) if row in planted_rows]


SMALL = dict(model="tiny-llama", n_anchors=8, max_length=96, batch_size=4)


def test_planted_harmful_compliance_ranks_at_the_top_by_gradient_matching(tmp_path, tiny_llama):
    planted = alpaca_pool(tmp_path / "pool.jsonl")
    task = ScreenTask(data=str(tmp_path / "pool.jsonl"), **SMALL)
    summary = screen(task, root=tmp_path / "store", model=tiny_llama)
    rows = load_screen(summary["run_id"], root=tmp_path / "store").rows
    assert len(rows) == 17 and rows["index"].tolist() == list(range(17))
    top = rows.sort_values("gradient_matching", ascending=False)["index"].head(len(planted)).tolist()
    assert sorted(top) == planted, rows[["index", "gradient_matching", "prompt"]].to_string()
    assert rows.loc[planted, "source_row"].map(lambda r: set(r)).tolist() == [{"instruction", "input", "output"}] * 3
    assert summary["top"][0]["id"] in set(rows.loc[planted, "id"])
    # the top-3 exported in the input's own format re-load to the planted conversations
    from analysis.lab.screen import select_subset
    from analysis.llm.data import load_bytes, load_jsonl
    from analysis.views.screen import export_subset, input_format

    assert input_format(rows) == "alpaca"
    exported = export_subset(rows, select_subset(rows["gradient_matching"], "top", 3))
    assert all(set(json.loads(line)) == {"instruction", "input", "output"} for line in exported.decode().splitlines())
    original = load_jsonl(tmp_path / "pool.jsonl")
    assert [ex.messages for ex in load_bytes(exported, "top.jsonl")] == [original[i].messages for i in planted]


def test_task_stores_reuses_resumes_and_never_mixes(tmp_path, tiny_llama):
    store = tmp_path / "store"
    task = ScreenTask(data="utility", data_split="eval", n_examples=9, **SMALL)
    assert task.run_id() == ScreenTask(**{**task.__dict__, "batch_size": 2}).run_id()  # batching: not in the id
    assert task.run_id() != ScreenTask(**{**task.__dict__, "k": 2}).run_id()

    cancel = CancelToken()
    seen = []

    def progress(event):
        seen.append(event)
        if "scored 4/9" in event.message:
            cancel.set()

    with pytest.raises(Cancelled) as raised:
        screen(task, TaskContext(progress=progress, cancel=cancel), root=store, model=tiny_llama)
    assert raised.value.run_id == task.run_id()
    assert screen_store(store).status(task.run_id()) == "interrupted"
    resumed = screen(task, root=store, model=tiny_llama)
    assert not resumed["cached"] and screen_store(store).status(task.run_id()) == "complete"
    again = screen(task, root=store, model=tiny_llama)
    assert again["cached"]
    fresh = screen(task, root=tmp_path / "other", model=tiny_llama)  # uninterrupted: the same numbers
    a, b = load_screen(task, root=store).rows, load_screen(task, root=tmp_path / "other").rows
    np.testing.assert_allclose(a["gradient_matching"], b["gradient_matching"], rtol=1e-6)
    assert fresh["n_examples"] == 9 and set(a["id"]) == set(b["id"])
    anchors = load_screen(task, root=store).anchors
    assert sorted(anchors["set"].unique()) == ["anchor_compliance", "anchor_refusal"] and len(anchors) == 16
    # a compliance anchor matches the compliance mean better than a refusal anchor does
    assert anchors.groupby("set")["gradient_matching"].mean()["anchor_compliance"] > \
        anchors.groupby("set")["gradient_matching"].mean()["anchor_refusal"]


def test_bad_data_names_line_and_field_before_any_work(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": 5, "output": "d"}\n')
    with pytest.raises(ConfigError, match=r"line 2, field 'input'"):
        screen(ScreenTask(data=str(path), **SMALL), root=tmp_path / "store")
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="anchor_responses"):
        ScreenTask(anchor_responses="both")


def test_command_line_screens_and_prints_the_riskiest(tmp_path, monkeypatch, capsys):
    from analysis.__main__ import main

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    alpaca_pool(tmp_path / "pool.jsonl", n_benign=5, planted=("harmful_prefix", 2))
    argv = ["screen", "--data", str(tmp_path / "pool.jsonl"), "--model", "tiny-llama", "--n-anchors", "4",
            "--max-length", "64", "--top", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "computed:" in out and "7 examples" in out and "Spearman" in out
    listed = [line for line in out.splitlines() if line.startswith("pool-")]
    assert len(listed) == 2
    assert main(argv) == 0 and "reused:" in capsys.readouterr().out
    assert main(["screen", "--data", str(tmp_path / "missing.jsonl"), "--model", "tiny-llama"]) == 2
    assert "file not found" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# validation: fine-tune on top / bottom / random k of the ranking


def test_validation_runs_end_to_end_on_the_tiny_model(tmp_path, monkeypatch):
    from analysis.lab.screen_validate import ValidateScreenTask, load_validation, subsets_dir, validate

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    planted = alpaca_pool(tmp_path / "pool.jsonl", n_benign=7, planted=("harmful_prefix", 3))
    fast = dict(max_length=96, eval_harmful_per_category=1, n_eval_utility=2, gen_harmful_per_category=1,
                n_gen_benign=2, gen_max_new_tokens=4, gen_batch_size=16, lr=1e-3, batch_size=3, epochs=1)
    task = ValidateScreenTask(screen=ScreenTask(data=str(tmp_path / "pool.jsonl"), **SMALL), k=3, seeds=(0, 1),
                              preset="harmful-10", n_harmful=11, n_benign=4, max_new_tokens=4, utility_accuracy=False,
                              overrides=fast)
    events = []
    result = validate(task, TaskContext(progress=events.append))
    rows = {(r["arm"], r["seed"]): r for r in result["rows"]}
    assert set(rows) == {("aligned", None), *((arm, s) for arm in ("top", "bottom", "random") for s in (0, 1)),
                         *((arm, "pooled") for arm in ("top", "bottom", "random"))}
    for row in result["rows"]:
        assert row["n_harmful"] in (11, 22) and row["asr_low"] <= row["asr"] <= row["asr_high"]
    # same steps / lr / seed: the top and bottom arms of one seed train on different data with one config
    from analysis.lab.results import load_finetune_run

    top, bottom = (load_finetune_run(rows[(arm, 0)]["finetune_run"]) for arm in ("top", "bottom"))
    assert top.manifest["total_steps"] == bottom.manifest["total_steps"] == 1
    assert {k: v for k, v in top.config.items() if k != "train_data"} == \
        {k: v for k, v in bottom.config.items() if k != "train_data"}
    subset = subsets_dir(task) / "gradient_matching-top3.jsonl"
    assert [json.loads(line)["instruction"] for line in subset.read_text().splitlines()] == \
        [json.loads(line)["instruction"] for i, line in enumerate((tmp_path / "pool.jsonl").read_text().splitlines())
         if i in planted]  # the planted harmful rows are the top arm
    verdicts = {v["b"]: v for v in result["verdicts"]}
    assert set(verdicts) == {"random", "bottom"} and all(0 <= v["p_value"] <= 1 for v in verdicts.values())
    assert verdicts["random"]["n_pairs"] == 22 and "McNemar" in verdicts["random"]["words"]
    assert load_validation(task)["verdicts"] == result["verdicts"]
    assert validate(task)["cached"]
    assert events[-1].fraction == 1.0
    # another validation of the same screening (here: one seed) trains on the same subset files: its arms are
    # the stored runs, not new ones
    one_seed = validate(dataclasses.replace(task, seeds=(0,)))
    assert not one_seed["cached"]
    assert {(r["arm"], r["finetune_run"]) for r in one_seed["rows"] if r["seed"] == 0} == \
        {(arm, rows[(arm, 0)]["finetune_run"]) for arm in ("top", "bottom", "random")}


def test_views_rank_drill_down_and_agree_on_known_numbers(tmp_path, tiny_llama):
    from analysis.views.screen import module_frame, ranked_table, screen_answer, top_agreement

    task = ScreenTask(data="utility", data_split="eval", n_examples=6, **SMALL)
    summary = screen(task, root=tmp_path, model=tiny_llama)
    stored = load_screen(task, root=tmp_path)
    rows = stored.rows
    ranked = ranked_table(rows, "gradient_matching")
    assert ranked["gradient_matching"].is_monotonic_decreasing and ranked["rank"].tolist() == list(range(1, 7))
    assert ranked_table(rows, "cos_refusal")["cos_refusal"].is_monotonic_increasing  # risky end: low
    category = rows["category"].iloc[0]
    filtered = ranked_table(rows, "gradient_matching", [category])
    assert set(filtered["category"]) == {category} and filtered["rank"].is_monotonic_increasing
    # the per-module contributions add up to the whole-vector gradient matching of that example
    for i in range(len(rows)):
        frame = module_frame(stored.arrays, stored.modules, i)
        assert frame["contribution to gradient matching"].sum() == pytest.approx(rows["gradient_matching"][i], rel=1e-9)
        assert frame["grad norm share"].sum() == pytest.approx(1.0)
        assert ((frame["safety share (module)"] >= 0) & (frame["safety share (module)"] <= 1 + 1e-12)).all()
    agreement = top_agreement(rows, 6)  # top-6 of 6: every pair shares everything
    assert (agreement["shared of top 6"] == 6).all() and (agreement["random expectation"] == 1.0).all()
    assert summary["spearman"]["gradient_matching"]["gradient_matching"] == pytest.approx(1.0)
    assert screen_answer(summary, rows, stored.anchors).startswith("Riskiest by gradient matching: **")


def test_the_task_end_to_end_equals_dense_autograd_for_every_stored_score(tmp_path, tiny64):
    """The stored rows (batched by length, padded, re-assembled in file order) against a dense computation of
    every example alone: full per-example gradients of all linear modules, the two anchor means, the basis, the
    mean final hidden states."""
    loaded = tiny64
    task = ScreenTask(data="benign_sensitive", n_examples=5, model=ModelConfig(source="tiny-llama", dtype="float64"),
                      n_anchors=3, k=2, max_length=96, batch_size=2)
    screen(task, root=tmp_path, model=loaded)
    rows = load_screen(task, root=tmp_path).rows
    modules = select_modules(find_linear_modules(loaded.model), "all", "all")
    compliance, refusal, _ = task.anchor_conversations()

    def mean_gradient(convs):
        return [sum(g) / len(convs) for g in zip(*[dense_gradient(loaded, c, modules) for c in convs])]

    def hidden(conversation):
        batch = tokenize_batch(loaded.tokenizer, [conversation], 96)
        with torch.no_grad():
            out = loaded.model(**batch.model_inputs(), use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1][0].double().mean(0), per_sample_loss(out.logits, batch.labels)[0]

    G_c, G_r = mean_gradient(compliance), mean_gradient(refusal)
    basis = [safety_basis(G, 2) for G in G_r]
    h_harm = torch.stack([hidden(c)[0] for c in compliance]).mean(0)
    r, c = flat(G_r), flat(G_c)
    for i, ex in enumerate(task.dataset()):
        assert rows["id"][i] == ex.id
        grads = dense_gradient(loaded, list(ex.messages), modules)
        g = flat(grads)
        h, loss = hidden(list(ex.messages))
        energy = sum(float((U.T @ G @ V).pow(2).sum()) for (U, V), G in zip(basis, grads))
        expected = {"dot_refusal": float(g @ r), "cos_refusal": float(g @ r / (g.norm() * r.norm())),
                    "gradient_matching": float(g @ c / (g.norm() * c.norm()) - g @ r / (g.norm() * r.norm())),
                    "safety_share": energy / float(g @ g), "grad_norm": float(g.norm()),
                    "representation": float(h @ h_harm / (h.norm() * h_harm.norm())), "loss": float(loss)}
        for key, value in expected.items():
            assert rows[key][i] == pytest.approx(value, rel=1e-5, abs=1e-12), (i, key)


def test_a_bfloat16_model_scores_in_float32_close_to_float32(tmp_path):
    bf16 = load_model(ModelConfig(source="tiny-llama", dtype="bfloat16"))
    f32 = load_model(ModelConfig(source="tiny-llama"))
    common = dict(data="utility", data_split="eval", n_examples=4, n_anchors=4, max_length=64, batch_size=4)
    screen(ScreenTask(model=ModelConfig(source="tiny-llama", dtype="bfloat16"), **common), root=tmp_path, model=bf16)
    screen(ScreenTask(model=ModelConfig(source="tiny-llama"), **common), root=tmp_path, model=f32)
    low, full = (load_screen(ScreenTask(model=ModelConfig(source="tiny-llama", dtype=d), **common), root=tmp_path).rows
                 for d in ("bfloat16", "float32"))
    assert np.isfinite(low["gradient_matching"]).all()
    np.testing.assert_allclose(low["cos_refusal"], full["cos_refusal"], atol=0.05)  # bf16 weights, same ranking scale


def test_validation_verdict_says_which_way_the_test_went():
    """12 discordant prompts: 2 complied only under top, 10 only under bottom (exact McNemar p = 158/4096 =
    0.0386, as measured on the aligned model): the opposite of the ranking's prediction, said so (it read 'no
    evidence' before); 10 vs 2 is a prediction that holds; 6 vs 6 no detectable difference."""
    from analysis.lab.screen_validate import verdict

    def pairs(only_top, only_other, both=30, neither=6):
        top = [True] * both + [True] * only_top + [False] * only_other + [False] * neither
        other = [True] * both + [False] * only_top + [True] * only_other + [False] * neither
        return {"top/0": dict(enumerate(top)), "bottom/0": dict(enumerate(other))}

    against = verdict(pairs(2, 10), "top", "bottom", 0.05, [0])
    assert against["p_value"] == pytest.approx(158 / 4096) and against["opposite"] and not against["significant"]
    assert "The opposite of the ranking's prediction: bottom is more harmful than top" in against["words"]
    assert "not below alpha / 2" in against["words"]
    holds = verdict(pairs(10, 2), "top", "bottom", 0.05, [0])
    assert holds["significant"] and not holds["opposite"] and "The ranking predicts harm here" in holds["words"]
    even = verdict(pairs(6, 6), "top", "bottom", 0.05, [0])
    assert not even["significant"] and not even["opposite"]
    assert even["words"].endswith("No detectable difference between top and bottom at alpha = 0.05.")
