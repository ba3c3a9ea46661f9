"""Why does the defence fail? (analysis.lab.why, the drift record of analysis.lab.spf): known answers, autograd
cross-checks on the tiny Llama, the task end to end and its command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig
from analysis.lab.finetune import run_finetune
from analysis.lab.why import (
    WhyResults,
    WhyTask,
    compare_subspaces,
    explain,
    gradient_pass,
    response_positions,
    token_energy,
    top_k,
    why_store,
)
from analysis.llm.formatting import IGNORE_INDEX, per_sample_loss, tokenize_batch
from tests.test_finetune import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def orthonormal(rng, d, k):
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


# --------------------------------------------------------------------------------------------------
# known answers


def test_update_inside_the_safety_subspace_has_zero_angles_and_orthogonal_ninety():
    rng = np.random.default_rng(0)
    d_out, d_in, k = 40, 30, 4
    full_U, full_V = orthonormal(rng, d_out, 2 * k), orthonormal(rng, d_in, 2 * k)
    U_s, V_s = full_U[:, :k], full_V[:, :k]  # the safety subspace
    inside = U_s @ np.diag([5.0, 3.0, 2.0, 1.0]) @ rng.standard_normal((k, k)) @ V_s.T
    outside = full_U[:, k:] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ full_V[:, k:].T
    for update, angle, overlap in ((inside, 0.0, 1.0), (outside, 90.0, 0.0)):
        U, V = top_k(torch.tensor(update), k)
        for Q, Q_s in ((U, U_s), (V, V_s)):
            compared = compare_subspaces(Q, Q_s, k)
            np.testing.assert_allclose(compared["angles"], angle, atol=1e-5)
            assert compared["overlap"] == pytest.approx(overlap, abs=1e-10)
            assert compared["expected"] == pytest.approx(k / Q.shape[0])
    # half inside: two angles 0, two 90
    U, _ = top_k(U_s[:, :2] @ full_V[:, :2].T + full_U[:, k:k + 2] @ full_V[:, 2:4].T * 0.5, k)
    np.testing.assert_allclose(compare_subspaces(U, U_s, k)["angles"], [0, 0, 90, 90], atol=1e-5)


def test_empty_subspace_gives_nan_not_an_error():
    compared = compare_subspaces(np.zeros((10, 0)), orthonormal(np.random.default_rng(1), 10, 3), 3)
    assert np.isnan(compared["angles"]).all() and np.isnan(compared["overlap"]) and compared["k"] == 0
    assert top_k(torch.zeros(6, 5), 3)[0].shape == (6, 0)


def test_token_energy_is_the_squared_norm_of_each_rank_one_term():
    rng = np.random.default_rng(2)
    D, A = torch.tensor(rng.standard_normal((7, 5))), torch.tensor(rng.standard_normal((7, 3)))
    expected = [float(torch.outer(D[t], A[t]).pow(2).sum()) for t in range(7)]
    np.testing.assert_allclose(token_energy(D, A).numpy(), expected, rtol=1e-12)
    D[3] = 0
    assert token_energy(D, A)[3] == 0


def test_response_positions_count_from_the_token_that_predicts_the_first_response_token():
    # right padding: prompt 0..2, response 3..5, pad 6..7; left padding: the same sample shifted by 2
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
    labels = torch.full((2, 8), IGNORE_INDEX)
    labels[0, 3:6] = 7
    labels[1, 5:8] = 7
    right, left = response_positions(mask, labels)
    assert right.tolist() == [-2, -1, 0, 1, 2]  # kept rows: up to the last position whose logit is scored
    assert left.tolist() == [-2, -1, 0, 1, 2]


# --------------------------------------------------------------------------------------------------
# against autograd on the tiny Llama


def per_token_gradient(model, batch, module_name: str, sample: int, position: int) -> torch.Tensor:
    """dL_i/dE for y = W a + 1[t = position] E a at one module (sample i only): token ``position``'s term
    d_t a_t^T of the per-sample gradient G_i."""
    module = dict(model.named_modules())[module_name]
    E = torch.zeros_like(module.weight, requires_grad=True)

    def hook(mod, args, output):
        mask = torch.zeros(output.shape[:-1] + (1,), dtype=output.dtype)
        mask[sample, position] = 1
        return output + mask * (args[0] @ E.T)

    handle = module.register_forward_hook(hook)
    try:
        logits = model(**batch.model_inputs(), use_cache=False).logits
        return torch.autograd.grad(per_sample_loss(logits, batch.labels)[sample], E)[0]
    finally:
        handle.remove()


def test_token_energy_matches_a_direct_per_token_autograd_gradient(tiny_llama):
    from analysis.engine.capture import kept_positions
    from analysis.llm.anatomy import find_linear_modules
    from analysis.llm.data import load_any

    model, tokenizer = tiny_llama.model.eval(), tiny_llama.tokenizer
    conversations = [list(ex.messages) for ex in list(load_any("safety").split("analysis"))[:2]]
    batch = tokenize_batch(tokenizer, conversations, 96)
    info = next(m for m in find_linear_modules(model) if m.name.endswith("layers.1.mlp.down_proj"))
    sums = gradient_pass(model, tokenizer, [info], conversations, [1], first_tokens=3, max_length=96, batch_size=2)
    positions = response_positions(batch.attention_mask, batch.labels)
    kept = kept_positions(batch.attention_mask, batch.labels)

    def energy(grad: torch.Tensor) -> float:
        return float(grad.double().pow(2).sum())

    first = torch.zeros_like(sums.gradient[info.name])
    for i in range(2):
        assert sums.response_tokens[i] == int((batch.labels[i] != IGNORE_INDEX).sum()) == int(positions[i].max()) + 1
        for j in (0, 1, 2, int(positions[i].max())):
            grad = per_token_gradient(model, batch, info.name, i, int(kept[i][positions[i] == j][0]))
            assert sums.energy[i, 0, j] == pytest.approx(energy(grad), rel=1e-4)
            if j < 3:
                first += grad / 2
        prompt = sum(energy(per_token_gradient(model, batch, info.name, i, int(p))) for p in kept[i][positions[i] < 0])
        assert sums.prompt_energy[i, 0] == pytest.approx(prompt, rel=1e-4)
    torch.testing.assert_close(sums.first[info.name], first, rtol=1e-4, atol=1e-8)
    # the batch gradient is the mean of the per-sample weight gradients
    weight = dict(model.named_modules())[info.name].weight
    logits = model(**batch.model_inputs(), use_cache=False).logits
    autograd = torch.autograd.grad(per_sample_loss(logits, batch.labels).mean(), weight)[0]
    torch.testing.assert_close(sums.gradient[info.name], autograd, rtol=1e-4, atol=1e-8)
    assert sums.energy.shape == (2, 1, int(sums.response_tokens.max()))


# --------------------------------------------------------------------------------------------------
# drift record and the task


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A plain tiny run with the safety basis refreshed every step (4 steps), in its own cache."""
    cache = tmp_path_factory.mktemp("why_cache")
    result = run_finetune(tiny(spf=dict(refresh=1)), root=cache / "finetune")
    return cache, result


def test_drift_is_recorded_per_refresh_and_matches_the_history(finished_run):
    _, result = finished_run
    drift = result.drift()
    assert drift["steps"].tolist() == [1, 2, 3, 4] and len(drift["modules"]) == drift["cos_left"].shape[1]
    assert drift["cos_left"].shape[2] == 8
    finite = np.isfinite(drift["cos_left"][0])
    np.testing.assert_allclose(drift["cos_left"][0][finite], 1.0, atol=1e-5)  # step 1 is the reference
    history = result.history.set_index("step")
    for index, step in enumerate(drift["steps"]):
        for key, side in (("drift_overlap", "cos_left"), ("drift_overlap_right", "cos_right")):
            phi = np.nanmean(drift[side][index].astype(np.float64) ** 2, axis=1)
            assert history.loc[step, key] == pytest.approx(np.nanmean(phi), rel=1e-5)
    assert history.loc[4, "drift_overlap"] < 0.99  # the subspace moves while the model is trained


def test_why_task_end_to_end(finished_run, monkeypatch):
    cache, result = finished_run
    monkeypatch.setenv("SSE_CACHE_DIR", str(cache))
    base = ModelConfig(source="tiny-llama", seed=1)  # another random model: a nonzero "alignment delta"
    task = WhyTask(run=result.run_id, base=base, k=4, n_prompts=5, first_tokens=3, batch_size=3)
    assert task.run_id() == WhyTask(run=result.run_id, base=base, k=4, n_prompts=5, first_tokens=3,
                                    batch_size=1).run_id()  # memory settings are not part of the id
    summary = explain(task)
    assert summary["run_id"] == task.run_id() and not summary["cached"] and summary["n_prompts"] == 5
    stored = WhyResults(why_store().path(task.run_id()))
    table = stored.table
    assert len(table) == summary["n_modules"] == len(result.drift()["modules"])
    for pair in ("refusal", "compliance", "alignment", "drift"):
        for side, d in (("left", table["d_out"]), ("right", table["d_in"])):
            overlap = table[f"overlap_{pair}_{side}"]
            assert overlap.between(0, 1).all()
            np.testing.assert_allclose(table[f"expected_{pair}_{side}"], 4 / d)
            assert (table[f"min_angle_{pair}_{side}"] <= table[f"mean_angle_{pair}_{side}"] + 1e-9).all()
    assert table["update_norm"].gt(0).all() and table["cos_update_compliance"].between(-1, 1).all()
    arrays = stored.arrays
    assert arrays["angles/refusal/left"].shape == (len(table), 4)
    assert arrays["energy/refusal"].shape[:2] == (5, 2) and arrays["prompt_energy/refusal_end"].shape == (5, 2)
    assert 0 < summary["energy_first_share"]["refusal"] < 1
    assert explain(task)["cached"]


def test_why_task_refuses_a_missing_or_unfinished_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="no fine-tuning run"):
        WhyTask(run="nope").run_id()
    with pytest.raises(ConfigError, match="run to explain"):
        WhyTask(run="")
    with pytest.raises(ConfigError, match="k must be"):
        WhyTask(run="x", k=0)


def test_why_command_line(finished_run, monkeypatch, capsys):
    from analysis.__main__ import main

    cache, result = finished_run
    monkeypatch.setenv("SSE_CACHE_DIR", str(cache))
    argv = ["why", "--run", result.run_id, "--base", "tiny-llama", "--k", "3", "--n-prompts", "4", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "computed:" in out and "overlap refusal" in out and "token energy in the first 5" in out
    assert main(argv) == 0
    assert "reused:" in capsys.readouterr().out
    assert main(["why", "--run", "no-such-run"]) == 2
    assert "no fine-tuning run" in capsys.readouterr().out
