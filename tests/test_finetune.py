"""Fine-tuning and SPF (analysis.lab.finetune) on the tiny random Llama: fast, no download."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig, config_hash, from_jsonable, to_jsonable
from analysis.core.tasks import Cancelled, TaskContext
from analysis.lab.config import PRESETS, FinetuneConfig, preset
from analysis.lab.finetune import FinetuneCancelled, FinetuneTask, run_finetune
from analysis.lab.finetune_data import safety_indices
from analysis.lab.results import comparison_table, list_finetune_runs, load_finetune_run
from analysis.lab.spf import project_gradients, top_k_basis
from analysis.lab.trainer import FinetuneTrainer
from analysis.llm.anatomy import as_out_in
from analysis.llm.formatting import per_sample_loss, response_losses, tokenize_batch
from analysis.llm.models import load_model

# tiny matrices: one thread is faster, and much faster on a busy machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Small evaluation sets so that a whole run takes seconds on the tiny model.
FAST = dict(model="tiny-llama", max_length=96, eval_harmful_per_category=1, n_eval_utility=2,
            gen_harmful_per_category=1, n_gen_benign=2, gen_max_new_tokens=4, gen_batch_size=16)


def tiny(**overrides) -> FinetuneConfig:
    values = dict(FAST, lr=1e-3, n_train=6, batch_size=3, epochs=2)
    values.update(overrides)
    return preset("harmful-10", **values)


# --------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_follow_qi(name):
    config = preset(name)
    assert config.preset == name
    assert config.method == "plain" and config.model.source == "default-aligned"
    assert PRESETS[name].description
    if name.startswith("harmful-"):
        assert (config.n_train, config.epochs, config.batch_size) == (int(name.split("-")[1]), 5, 10)
    if name == "aoa":
        assert config.train_data == "identity_shift" and config.epochs == 10
        assert config.eval_system_prompt and "AOA" in config.eval_system_prompt
    if name == "benign":
        assert config.train_split == "analysis" and config.epochs == 1 and config.batch_size > 10


@pytest.mark.parametrize("overrides", [
    dict(lr=0.0), dict(lr=-1e-5), dict(lr=float("nan")), dict(lr=5.0), dict(batch_size=0), dict(epochs=0),
    dict(method="dpo"), dict(trainable="half"), dict(optimizer="lion"), dict(max_length=8), dict(n_train=0),
    dict(max_steps=0), dict(eval_every=0), dict(seed=-1), dict(weight_decay=-0.1), dict(max_grad_norm=0.0),
    dict(train_data=""), dict(eval_system_prompt="  "), dict(batch_size=2.5),
    dict(method="spf", trainable="lora"),
    dict(spf=dict(k=0)), dict(spf=dict(refresh=0)), dict(spf=dict(safety_batch=0)), dict(spf=dict(mode="cut")),
    dict(spf=dict(target="weights")), dict(spf=dict(svd="qr")), dict(spf=dict(regex="(")),
])
def test_bad_config_raises_config_error(overrides):
    with pytest.raises(ConfigError):
        preset("harmful-10", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("harmful-7")
    with pytest.raises(ConfigError):
        preset("aoa", learning_rate=1e-4)


def test_config_hash_identifies_the_run():
    a, b = preset("harmful-10"), preset("harmful-10")
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(dataclasses.replace(a, method="spf"))
    assert config_hash(a) != config_hash(preset("harmful-10", spf={"k": 4}))
    assert isinstance(FinetuneConfig(model="tiny-llama").model, ModelConfig)


def test_data_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data"):
        run_finetune(tiny(n_train=1000), root=tmp_path)


# --------------------------------------------------------------------------------------------------
# building blocks


def test_response_losses_equal_per_sample_loss(tiny_llama):
    from analysis.llm.data import load_shipped

    convs = [ex.messages for ex in load_shipped("safety").split("analysis").take(4, 0)]
    batch = tokenize_batch(tiny_llama.tokenizer, convs, 96)
    with torch.no_grad():
        full = per_sample_loss(tiny_llama.model(**batch.model_inputs()).logits, batch.labels)
        fast = response_losses(tiny_llama.model, batch.model_inputs(), batch.labels)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)


def test_top_k_basis_randomized_matches_exact():
    generator = torch.Generator().manual_seed(0)
    A, B = torch.randn(300, 6, generator=generator), torch.randn(6, 200, generator=generator)
    G = (A @ B).double()  # rank 6
    U, s, V = top_k_basis(G, 4, "randomized", generator=torch.Generator().manual_seed(1))
    Ue, se, Ve = top_k_basis(G, 4, "exact")
    torch.testing.assert_close(s, se, rtol=1e-8, atol=1e-10)
    assert float((U.T @ Ue).pow(2).sum()) / 4 == pytest.approx(1.0, abs=1e-8)  # same subspace
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=U.dtype), rtol=0, atol=1e-10)
    U8, s8, _ = top_k_basis(G, 10, "exact")  # rank 6 < k: zero directions are dropped
    assert U8.shape[1] == 6 and s8.shape == (6,)
    assert top_k_basis(torch.zeros(5, 4), 3, "exact")[0].shape == (5, 0)


@pytest.mark.parametrize("mode", ["conflict", "orthogonal", "same"])
def test_project_gradients_in_place(mode):
    generator = torch.Generator().manual_seed(0)
    G = torch.randn(12, 9, generator=generator, dtype=torch.float64)
    U, _, V = top_k_basis(torch.randn(12, 9, generator=generator, dtype=torch.float64), 4, "exact")
    original = G.clone()
    fraction, norm = project_gradients({"m": G}, {"m": (U, V)}, mode)["m"]
    c = ((U.T @ G) * V.T).sum(dim=1)
    if mode == "conflict":
        assert bool((c >= -1e-12).all())
        c0 = ((U.T @ original) * V.T).sum(dim=1)
        assert fraction == pytest.approx(float(c0.clamp(max=0).norm() / original.norm()))
    elif mode == "same":  # only the safety-subspace part is kept: (I - U U^T) G' = 0, U^T G' = U^T G
        outside = original - U @ (U.T @ original)
        assert float((G - U @ (U.T @ G)).abs().max()) < 1e-12
        torch.testing.assert_close(U.T @ G, U.T @ original, rtol=0, atol=1e-12)
        assert fraction == pytest.approx(float(outside.norm() / original.norm()))
    else:
        assert float((U.T @ G).abs().max()) < 1e-12
    assert norm == pytest.approx(float(original.norm()))


# --------------------------------------------------------------------------------------------------
# the projection inside the training loop


def _applied(trainer: FinetuneTrainer, step: int, lr: float) -> tuple[dict, dict]:
    """Run one step; return the applied pseudo-gradient (W_before - W_after)/lr per SPF module, (d_out, d_in)."""
    before = {m.name: m.weight.detach().clone() for m in trainer.projector.modules}
    trainer.train_step(step)
    return {m.name: as_out_in(m.module, (before[m.name] - m.weight.detach()) / lr) for m in trainer.projector.modules}, before


@pytest.mark.parametrize("mode", ["conflict", "orthogonal", "same"])
@pytest.mark.parametrize("target,optimizer", [("gradient", "sgd"), ("update", "adamw")])
def test_projection_applied_as_specified(tiny_llama, mode, target, optimizer):
    """After the step, the weight change's pseudo-gradient P has <P, u_j v_j^T> >= 0 for every basis direction
    (conflict), U_k^T P = 0 (orthogonal) or (I - U_k U_k^T) P = 0 (same), for the basis the trainer used."""
    lr = 1e-3
    config = tiny(method="spf", optimizer=optimizer, trainable="linear", lr=lr,
                  model=ModelConfig("tiny-llama", dtype="float64"),  # exact (W_before - W_after) / lr
                  spf=dict(k=4, refresh=1, mode=mode, target=target, safety_batch=2))
    trainer = FinetuneTrainer.create(config)
    applied, _ = _applied(trainer, 1, lr)
    assert len(trainer.projector.basis) == len(trainer.projector.modules) > 0
    removed_any = 0.0
    for name, P in applied.items():
        U, V = (x.to(P.dtype) for x in trainer.projector.basis[name])
        scale = float(P.norm()) + 1e-30
        if mode == "conflict":
            c = ((U.T @ P) * V.T).sum(dim=1)
            assert float(c.min()) >= -1e-9 * scale, name
        elif mode == "same":
            assert float((P - U @ (U.T @ P)).abs().max()) <= 1e-9 * scale, name
        else:
            assert float((U.T @ P).abs().max()) <= 1e-9 * scale, name
    removed_any = trainer.projector.removed_rows[-1][1]
    assert max(removed_any) > 0  # the projection did something


def test_plain_step_leaves_conflicting_components(tiny_llama):
    """Control for the test above: without SPF, some module has c_j < 0 or U^T P != 0 (the test can fail)."""
    lr = 1e-3
    spf_config = tiny(method="spf", optimizer="sgd", trainable="linear", lr=lr,
                      spf=dict(k=4, refresh=1, mode="conflict", safety_batch=2))
    reference = FinetuneTrainer.create(spf_config, load_model("tiny-llama"))
    reference.train_step(1)
    plain = FinetuneTrainer.create(dataclasses.replace(spf_config, method="plain"), load_model("tiny-llama"))
    applied, _ = _applied(plain, 1, lr)
    worst = min(float(((reference.projector.basis[n][0].T @ P) * reference.projector.basis[n][1].T).sum(dim=1).min() / P.norm())
                for n, P in applied.items())
    assert worst < -1e-3


def _safety_loss(trainer: FinetuneTrainer, step: int) -> float:
    indices = safety_indices(trainer.config, len(trainer.data.safety), step)
    batch = trainer.tokenize([trainer.data.safety[i] for i in indices])
    with torch.no_grad():
        return float(response_losses(trainer.model, batch.model_inputs(), batch.labels).mean())


@pytest.mark.parametrize("target,optimizer", [("update", "adamw"), ("gradient", "sgd")])
def test_orthogonal_spf_keeps_safety_loss_to_first_order(target, optimizer):
    """With k >= rank of every module's safety gradient and only linear weights trained, an orthogonal SPF
    step changes the safety loss (on the basis' own safety batch) only at second order: it shrinks ~lr^2,
    while a plain step changes it ~lr. float64 so that the differences are far above round-off."""
    def delta(method: str, lr: float) -> float:
        config = tiny(method=method, optimizer=optimizer, trainable="linear", lr=lr, seed=3,
                      model=ModelConfig("tiny-llama", dtype="float64"),
                      spf=dict(k=64, refresh=1, mode="orthogonal", target=target, safety_batch=1, svd="exact"))
        trainer = FinetuneTrainer.create(config)
        before = _safety_loss(trainer, 1)
        trainer.train_step(1)
        return _safety_loss(trainer, 1) - before

    lr = 1e-4 if optimizer == "adamw" else 1e-2
    plain, spf, spf_half = delta("plain", lr), delta("spf", lr), delta("spf", lr / 2)
    assert abs(plain) > 1e-7
    assert abs(spf) < 0.02 * abs(plain), (plain, spf)
    assert abs(spf_half) < 0.4 * abs(spf) + 1e-13, (spf, spf_half)  # second order: ~1/4


def test_gradient_projection_under_adamw_leaks_at_first_order():
    """Why ``spf.target="update"`` exists: AdamW rescales coordinates, so a projected *gradient* no longer
    gives an orthogonal step; the safety loss then moves linearly in lr (halving lr halves the change)."""
    def delta(lr: float) -> float:
        config = tiny(method="spf", optimizer="adamw", trainable="linear", lr=lr, seed=3,
                      model=ModelConfig("tiny-llama", dtype="float64"),
                      spf=dict(k=64, refresh=1, mode="orthogonal", target="gradient", safety_batch=1, svd="exact"))
        trainer = FinetuneTrainer.create(config)
        before = _safety_loss(trainer, 1)
        trainer.train_step(1)
        return _safety_loss(trainer, 1) - before

    full, half = delta(1e-4), delta(5e-5)
    assert abs(full) > 1e-6
    assert half / full == pytest.approx(0.5, abs=0.05)


def test_conflict_spf_does_not_raise_safety_loss_to_first_order():
    """Conflict mode with a full-rank basis: first-order change -lr <G_s, P'> <= 0 whatever the data."""
    lr = 1e-4
    config = tiny(method="spf", optimizer="adamw", trainable="linear", lr=lr, seed=5,
                  model=ModelConfig("tiny-llama", dtype="float64"),
                  spf=dict(k=64, refresh=1, mode="conflict", target="update", safety_batch=1, svd="exact"))
    trainer = FinetuneTrainer.create(config)
    safety = trainer.safety_gradients(1)
    applied, _ = _applied(trainer, 1, lr)
    first_order = -lr * sum(float((safety[n] * P).sum()) for n, P in applied.items())
    assert first_order <= 1e-12


def test_plain_run_id_ignores_projection_only_spf_settings():
    from analysis.lab.trainer import run_id_for

    def run_id(method, **spf):
        return run_id_for(tiny(method=method, spf=spf), "weights")

    assert run_id("plain") == run_id("plain", k=64, mode="orthogonal", target="update") != run_id("plain", safety_batch=8)
    assert run_id("spf") != run_id("spf", k=64) != run_id("spf", safety_loss="contrast")


def test_contrast_safety_gradient_is_refusal_minus_affirmative_gradient():
    config = tiny(method="spf", model=ModelConfig("tiny-llama", dtype="float64"),
                  spf=dict(safety_batch=2, safety_loss="contrast"))
    trainer = FinetuneTrainer.create(config)
    contrast = trainer.safety_gradients(3)
    refusals = [trainer.data.safety[i] for i in safety_indices(config, len(trainer.data.safety), 3)]
    affirmative = [c[:-1] + [{"role": "assistant", "content": "Sure, here is how to do that"}] for c in refusals]
    weights = [m.weight for m in trainer.projector.modules]
    refusal = torch.autograd.grad(trainer.losses(refusals).mean(), weights)
    comply = torch.autograd.grad(trainer.losses(affirmative).mean(), weights)
    for module, g_refusal, g_comply in zip(trainer.projector.modules, refusal, comply):
        expected = as_out_in(module.module, g_refusal - g_comply)
        torch.testing.assert_close(contrast[module.name], expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="safety_loss"):
        tiny(method="spf", spf=dict(safety_loss="affirmative"))


# --------------------------------------------------------------------------------------------------
# whole runs: store, resume, comparison


def _same_history(a, b):
    drop = ["wall_seconds", "cpu_seconds"]
    left, right = a.history.drop(columns=drop), b.history.drop(columns=drop)
    assert list(left.columns) == list(right.columns)
    import pandas.testing

    pandas.testing.assert_frame_equal(left, right, check_exact=True)


def _weights(result):
    from safetensors.torch import load_file

    return load_file(str(result.model_path / "model.safetensors"))


RESUME = dict(method="spf", max_steps=None, eval_every=2, checkpoint_every=2, spf=dict(k=3, refresh=3))


def rows_context(on_row) -> TaskContext:
    """A context whose progress events call ``on_row(ctx, row)`` with each new metrics row (the last of the
    live history); checks that every event's live data is JSON."""
    def progress(event):
        json.dumps(event.live)
        (history,) = event.live["rows"].values()
        on_row(ctx, history[-1])

    ctx = TaskContext(progress=progress)
    return ctx


def test_resume_after_cancel_and_after_crash_equals_uninterrupted(tmp_path):
    config = tiny(**RESUME)
    whole = run_finetune(config, root=tmp_path / "a")
    assert whole.status == "complete" and whole.history["step"].tolist() == list(range(5))

    def stop_at_3(ctx, row):
        if row["step"] == 3:
            ctx.cancel.set()

    with pytest.raises(FinetuneCancelled) as info:
        run_finetune(config, rows_context(stop_at_3), root=tmp_path / "b")
    assert info.value.step == 3
    assert isinstance(info.value, Cancelled)
    partial = load_finetune_run(info.value.run_id, tmp_path / "b")
    assert partial.status == "running" and partial.history["step"].max() == 3

    def crash_at_3(ctx, row):  # checkpoint_every=2: resumes from step 2, redoes step 3
        if row["step"] == 3:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        run_finetune(config, rows_context(crash_at_3), root=tmp_path / "c")

    for folder in ("b", "c"):
        seen = []
        resumed = run_finetune(config, rows_context(lambda ctx, row, seen=seen: seen.append(row["step"])), root=tmp_path / folder)
        assert resumed.status == "complete"
        assert seen == ([4] if folder == "b" else [3, 4])
        _same_history(whole, resumed)
        for key, tensor in _weights(whole).items():
            assert torch.equal(tensor, _weights(resumed)[key]), key
        assert resumed.evals == whole.evals
        assert resumed.spf_removed().equals(whole.spf_removed())
        for key in ("steps", "cos_left", "cos_right"):  # the drift reference basis survives the checkpoint
            np.testing.assert_array_equal(resumed.drift()[key], whole.drift()[key])


def test_cancel_during_evaluation_resumes(tmp_path, monkeypatch):
    config = tiny(method="plain", max_steps=2, eval_every=1)
    whole = run_finetune(config, root=tmp_path / "a")
    ctx = TaskContext()
    calls = {"n": 0}
    from analysis.safety import nll as evaluate_nll

    original = evaluate_nll.nll_of_rows

    def nll_then_cancel(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            ctx.cancel.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_nll, "nll_of_rows", nll_then_cancel)
    with pytest.raises(FinetuneCancelled) as info:
        run_finetune(config, ctx, root=tmp_path / "b")
    assert info.value.step == 1  # inside step 1's live evaluation (step 0 made 3 NLL calls)
    monkeypatch.setattr(evaluate_nll, "nll_of_rows", original)
    resumed = run_finetune(config, root=tmp_path / "b")
    _same_history(whole, resumed)


def test_run_is_stored_reused_and_loadable(tmp_path, monkeypatch):
    config = tiny(method="plain", max_steps=2, eval_every=1)
    rows, events = [], []
    ctx = TaskContext(progress=events.append)
    first = run_finetune(config, ctx, root=tmp_path,
                         progress=lambda step, total, history: rows.append((step, total, history[-1])))
    assert [s for s, _, _ in rows] == [0, 1, 2] and all(t == 2 for _, t, _ in rows)
    assert {"train_loss", "refusal_nll", "affirmative_nll", "utility_nll", "weight_distance", "cos_mean"} <= set(rows[1][2])
    assert {"asr", "over_refusal"} <= set(rows[0][2]) and {"asr", "over_refusal"} <= set(rows[2][2])
    assert rows[0][2]["weight_distance"] == 0 and rows[2][2]["weight_distance"] > 0
    assert not events  # an explicit progress hook replaces the context's reports
    from analysis.llm import models

    with monkeypatch.context() as patch:
        patch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a stored run is reused without the model"))
        again = run_finetune(config, root=tmp_path)
    assert again.cached and again.run_id == first.run_id
    assert first.final_eval is not None and first.initial_eval is not None
    assert set(first.category_table()["category"]) == set(first.initial_eval["harmful_by_category"])
    loaded = load_model(str(first.model_path))
    from analysis.llm.models import model_identity

    assert model_identity(str(first.model_path)) == loaded.identity  # run ids need no model load
    assert model_identity(config.model) == load_model(config.model).identity
    from safetensors.torch import load_file

    stored = load_file(str(first.model_path / "model.safetensors"))
    for name, tensor in loaded.model.state_dict().items():
        if name in stored:
            assert torch.equal(tensor, stored[name])
    assert not torch.equal(loaded.model.model.layers[0].mlp.up_proj.weight,
                           load_model("tiny-llama").model.model.layers[0].mlp.up_proj.weight)
    listing = list_finetune_runs(tmp_path)
    assert listing["run_id"].tolist() == [first.run_id] and listing["status"].tolist() == ["complete"]
    from analysis.core.store import RunStore

    assert RunStore(tmp_path).verify(first.run_id) == []


def test_comparison_shares_seed_data_and_initial_eval(tmp_path):
    config = tiny(max_steps=2, eval_every=2, spf=dict(k=2, refresh=1))
    task = FinetuneTask(config, compare=True)
    events = []
    summary = task.execute(TaskContext(progress=events.append), root=tmp_path)
    assert summary["run_id"] == task.run_id() and set(summary["runs"]) == {"plain", "spf"}
    plain, spf = (load_finetune_run(summary["runs"][m], tmp_path) for m in ("plain", "spf"))
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [r["step"] for r in events[-1].live["rows"]["plain"]] == [0, 1, 2] == \
        [r["step"] for r in events[-1].live["rows"]["spf"]]
    assert plain.manifest["train_ids"] == spf.manifest["train_ids"]
    assert plain.initial_eval == spf.initial_eval
    # same first batch and weights at step 0 -> same first training loss; SPF removed something
    assert plain.history["train_loss"][1] == spf.history["train_loss"][1]
    assert spf.history["spf_removed_mean"].dropna().gt(0).any()
    assert "spf_removed_mean" not in plain.history or plain.history["spf_removed_mean"].isna().all()
    table = comparison_table([plain, spf])
    assert table["method"].tolist() == ["plain", "spf"] and table["asr_final"].notna().all()
    assert spf.spf_removed().shape == (2, len(spf.manifest["spf_modules"]))
    # the command line prints every rate with its n and Wilson interval, every NLL mean with its interval
    from analysis.lab.results import format_run

    text = format_run(spf)
    n = spf.final_eval["n_harmful"]
    assert re.search(rf"ASR \(keyword\): \d+/{n} = \d+% \[\d+-\d+%\] -> \d+/{n} = \d+% \[\d+-\d+%\]", text), text
    assert re.search(r"refusal NLL \(nats/token\): [\d.]+ \[[\d.]+, [\d.]+\] \(n=\d+\) ->", text), text
    assert "SPF removed on average" in text and "SPF removed" not in format_run(plain)


def test_lora_plain_run_saves_a_merged_model(tmp_path):
    config = tiny(method="plain", trainable="lora", lora_rank=2, max_steps=2, eval_every=2, lr=1e-2)
    result = run_finetune(config, root=tmp_path)
    loaded = load_model(str(result.model_path))
    assert not any("lora" in name for name, _ in loaded.model.named_parameters())
    base = load_model("tiny-llama").model
    assert not torch.equal(loaded.model.model.layers[1].self_attn.q_proj.weight, base.model.layers[1].self_attn.q_proj.weight)


def test_trainable_choices(tiny_llama):
    from analysis.lab.trainer import set_trainable

    def names(kind, **extra):
        model = load_model("tiny-llama").model
        _, params = set_trainable(model, tiny(trainable=kind, **extra))
        return {n for n, _ in params}

    blocks, linear, last, everything = names("blocks"), names("linear"), names("last", n_last_layers=1), names("all")
    assert all(".layers." in n for n in blocks) and any("norm" in n for n in blocks)
    assert linear < blocks and not any("norm" in n for n in linear)
    assert last < blocks and all(".layers.1." in n for n in last)
    assert blocks < everything and any("embed" in n for n in everything)


def test_cli_runs_both_arms(tmp_path, capsys, monkeypatch):
    from analysis.__main__ import main

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    options = ["--model", "tiny-llama", "--preset", "harmful-10", "--mode", "both", "--max-steps", "1",
               "--n-train", "3", "--batch-size", "3", "--gen-per-category", "1", "--k", "2"]
    code = main(["finetune", *options, "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "plain" in out and "spf" in out and "ASR" in out
    assert len(list_finetune_runs(tmp_path / "finetune")) == 2
    # the same task as a job file (what the web app starts): the very same runs, reused
    from analysis.__main__ import parse_task

    task = parse_task("finetune", options)
    (tmp_path / "task.json").write_text(json.dumps({"kind": "finetune", "config": to_jsonable(task)}))
    assert main(["finetune", "--config", str(tmp_path / "task.json")]) == 0
    again = capsys.readouterr().out
    assert again.count("stored run reused") == 2
    for run_id in task.run_ids().values():
        assert run_id in out and run_id in again


# --------------------------------------------------------------------------------------------------
# the task: JSON round trip, CLI options == --config file


CLI_OPTIONS = ["--model", "tiny-llama", "--preset", "aoa", "--mode", "both", "--max-steps", "3", "--n-train", "4",
               "--lr", "2e-4", "--k", "5", "--spf-mode", "orthogonal", "--safety-loss", "contrast", "--seed", "2"]


def test_task_round_trips_through_json():
    for task in (FinetuneTask(tiny(method="spf", spf=dict(k=3, target="update"))),
                 FinetuneTask(preset("aoa", model=ModelConfig("tiny-llama", dtype="float64")), compare=True)):
        data = json.loads(json.dumps(to_jsonable(task)))
        again = from_jsonable(FinetuneTask, data)
        assert again == task and again.run_id() == task.run_id()
    single, both = FinetuneTask(tiny()), FinetuneTask(tiny(), compare=True)
    assert single.run_id() == single.run_ids()["plain"] and "compare" in both.run_id() != single.run_id()
    with pytest.raises(ConfigError):
        from_jsonable(FinetuneTask, {"config": {"lr": -1.0}})


def test_cli_config_file_gives_the_same_task_as_options(tmp_path):
    from analysis.__main__ import parse_task

    from_options = parse_task("finetune", CLI_OPTIONS)
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"kind": "finetune", "config": to_jsonable(from_options)}))
    from analysis.core.cli import load_task

    from_file = parse_task("finetune", ["--config", str(path)])
    assert from_file == from_options and from_file.run_id() == from_options.run_id()
    assert from_options.compare and from_options.config.spf.k == 5 and from_options.config.lr == 2e-4
    (tmp_path / "fields.json").write_text(json.dumps(to_jsonable(from_options)))  # the bare fields work too
    assert load_task(tmp_path / "fields.json", FinetuneTask).run_id() == from_options.run_id()


def test_lowrank_basis_spans_the_exact_subspace():
    generator = torch.Generator().manual_seed(0)
    for shape in ((300, 200), (200, 300)):  # svd_lowrank transposes wide matrices internally
        A, B = torch.randn(shape[0], 6, generator=generator), torch.randn(6, shape[1], generator=generator)
        G = (A @ B).double()
        U, s, V = top_k_basis(G, 4, "lowrank", generator=torch.Generator().manual_seed(1))
        Ue, se, Ve = top_k_basis(G, 4, "exact")
        torch.testing.assert_close(s, se, rtol=1e-8, atol=1e-10)
        assert U.shape == (shape[0], 4) and V.shape == (shape[1], 4)
        assert float((U.T @ Ue).pow(2).sum()) / 4 == pytest.approx(1.0, abs=1e-8)
        assert float((V.T @ Ve).pow(2).sum()) / 4 == pytest.approx(1.0, abs=1e-8)
        again = top_k_basis(G, 4, "lowrank", generator=torch.Generator().manual_seed(1))[0]
        assert torch.equal(U, again)  # seeded by the generator, not by the global RNG
