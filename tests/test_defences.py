"""Defences beside SPF: each projection's defining property on a tiny model's real gradients and weights."""

import json

import pytest
import torch

from analysis.lab import defences as df
from analysis.llm.anatomy import as_out_in

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_modules(model):
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "layers." in name}


def gradients(loaded, conversations):
    from analysis.llm.formatting import response_losses, tokenize_batch

    model = loaded.model
    modules = linear_modules(model)
    batch = tokenize_batch(loaded.tokenizer, conversations, 64)
    loss = response_losses(model, batch.model_inputs(), batch.labels).mean()
    grads = torch.autograd.grad(loss, [m.weight for m in modules.values()])
    return {name: as_out_in(m, g).clone() for (name, m), g in zip(modules.items(), grads)}


@pytest.fixture(scope="module")
def real_gradients(tiny_llama):
    from analysis.llm.data import load_shipped

    attack = [list(ex.messages) for ex in load_shipped("harmful_prefix").take(4, 0)]
    refusals = [list(ex.messages) for ex in load_shipped("safety").take(4, 0)]
    return gradients(tiny_llama, attack), gradients(tiny_llama, refusals)


def dot(a, b):
    return sum(float((a[n].double() * b[n].double()).sum()) for n in a)


def test_pcgrad_leaves_no_negative_inner_product(real_gradients):
    fine_tune, safety = real_gradients
    # the real pair, and a forced conflict: the safety gradient pointing against the fine-tuning step
    forced = {n: -fine_tune[n] + 0.3 * safety[n] for n in fine_tune}
    for g_s in (safety, forced):
        g = {n: t.clone() for n, t in fine_tune.items()}
        before = dot(g, g_s)
        info = df.pcgrad_project(g, g_s)
        after = dot(g, g_s)
        assert info["pcgrad_dot"] == pytest.approx(before)
        assert after >= -1e-6 * (dot(g_s, g_s) * dot(fine_tune, fine_tune)) ** 0.5
        if before < 0:
            assert abs(after) < 1e-6 * abs(before) and info["pcgrad_removed"] > 0
            # only the component along g_s changed: g - g' is parallel to g_s
            diff = {n: fine_tune[n] - g[n] for n in g}
            cos = dot(diff, g_s) / (dot(diff, diff) * dot(g_s, g_s)) ** 0.5
            assert abs(cos) == pytest.approx(1.0, abs=1e-5)
        else:
            assert info["pcgrad_removed"] == 0 and all(torch.equal(g[n], fine_tune[n]) for n in g)
    assert dot(forced, fine_tune) < 0  # the forced case really conflicted


def weights(model):
    return {name: as_out_in(m, m.weight).detach().clone() for name, m in linear_modules(model).items()}


def test_safe_lora_projected_delta_lies_in_the_alignment_subspace(tiny_llama):
    generator = torch.Generator().manual_seed(0)
    base = weights(tiny_llama.model)
    # an "aligned" model: base plus a rank-2 change per module; a fine-tune: aligned plus a random delta
    aligned = {n: W + 0.1 * torch.randn(W.shape[0], 2, generator=generator) @ torch.randn(2, W.shape[1], generator=generator)
               for n, W in base.items()}
    finetuned = {n: W + 0.01 * torch.randn(W.shape, generator=generator) for n, W in aligned.items()}
    for n in list(finetuned)[:2]:  # two modules whose update stays inside the alignment subspace
        finetuned[n] = aligned[n] + 0.5 * (aligned[n] - base[n])
    new, report = df.safe_lora_project(finetuned, aligned, base, threshold=0.5, rank=2)
    assert {r.name for r in report} == set(finetuned)
    for r in report:
        delta = (new[r.name] - aligned[r.name]).double()
        P = df.alignment_projector(aligned[r.name] - base[r.name], rank=2)
        if r.projected:
            assert r.cosine < 0.5
            torch.testing.assert_close(P @ delta, delta, atol=1e-5, rtol=1e-4)  # lies in the subspace
            assert torch.allclose(P @ P, P, atol=1e-8)                            # P is a projector
        else:
            assert r.cosine >= 0.5 and torch.equal(new[r.name], finetuned[r.name])
    inside = [r for r in report if r.name in list(finetuned)[:2]]
    assert all(not r.projected and r.cosine == pytest.approx(1.0, abs=1e-5) for r in inside)
    assert any(r.projected for r in report)
    # the threshold decides: above 1 every module is projected, below -1 none is
    _, every = df.safe_lora_project(finetuned, aligned, base, threshold=1.01, rank=2)
    _, none = df.safe_lora_project(finetuned, aligned, base, threshold=-1.01, rank=2)
    assert all(r.projected for r in every) and not any(r.projected for r in none)


def test_safe_lora_paper_mode_and_errors():
    V = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    torch.testing.assert_close(df.alignment_projector(V, mode="paper"), (V @ V.T / 5.0).double())
    torch.testing.assert_close(df.alignment_projector(V, rank=1), torch.tensor([[0.0, 0.0], [0.0, 1.0]]).double())
    with pytest.raises(ValueError, match="mode"):
        df.alignment_projector(V, mode="lora")


# --- in the fine-tuning trainer ------------------------------------------------------------------------------

FAST = dict(model="tiny-llama", max_length=96, eval_harmful_per_category=1, n_eval_utility=2,
            gen_harmful_per_category=1, n_gen_benign=2, gen_max_new_tokens=4, gen_batch_size=16)


def tiny_config(**overrides):
    from analysis.lab.config import preset

    values = dict(FAST, lr=1e-3, n_train=6, batch_size=3, epochs=2)
    values.update(overrides)
    return preset("harmful-10", **values)


def test_pcgrad_step_in_the_trainer_has_no_negative_inner_product_with_the_safety_gradient():
    from analysis.core.config import ModelConfig
    from analysis.lab.trainer import FinetuneTrainer

    lr = 1e-3
    config = tiny_config(method="pcgrad", optimizer="sgd", trainable="linear", lr=lr,
                         model=ModelConfig("tiny-llama", dtype="float64"),
                         spf=dict(refresh=1, safety_batch=2, safety_loss="compliance"))
    assert config.label == "harmful-10 / pcgrad (R=1, compliance)"
    trainer = FinetuneTrainer.create(config)
    modules = trainer.projector.modules
    before = {m.name: m.weight.detach().clone() for m in modules}
    row = trainer.train_step(1)
    applied = {m.name: as_out_in(m.module, (before[m.name] - m.weight.detach()) / lr) for m in modules}
    reference = trainer.defence.reference  # PCGrad's last safety gradient
    assert row["pcgrad_dot"] < 0 and row["pcgrad_removed"] > 0  # the attack conflicts with "do not comply"
    scale = (dot(applied, applied) * dot(reference, reference)) ** 0.5
    assert abs(dot(applied, reference)) <= 1e-8 * scale  # projected onto the hyperplane <g, g_s> = 0
    assert not trainer.projector.basis  # no SPF basis is computed for pcgrad


def test_the_compliance_safety_loss_is_the_contrast_minus_the_refusal_term():
    from analysis.core.config import ModelConfig
    from analysis.lab.trainer import FinetuneTrainer

    def safety(loss):
        config = tiny_config(method="spf", trainable="linear", model=ModelConfig("tiny-llama", dtype="float64"),
                             spf=dict(safety_batch=2, safety_loss=loss))
        return FinetuneTrainer.create(config).safety_gradients(1)

    refusal, contrast, compliance = safety("refusal"), safety("contrast"), safety("compliance")
    for name in refusal:
        torch.testing.assert_close(contrast[name], refusal[name] + compliance[name])
    assert dot(compliance, refusal) != 0


def test_pcgrad_is_refused_with_lora_and_is_a_method():
    from analysis.core.config import ConfigError
    from analysis.lab.config import DEFENCES, METHODS

    assert "pcgrad" in DEFENCES and "pcgrad" not in METHODS  # a comparison still runs plain and SPF
    with pytest.raises(ConfigError, match="pcgrad"):
        tiny_config(method="pcgrad", trainable="lora")
    with pytest.raises(ConfigError, match="is not one of"):
        tiny_config(method="safe-grad")


def test_the_safe_lora_task_writes_a_defended_model_whose_projected_deltas_lie_in_the_subspace(monkeypatch, tmp_path):
    from analysis.__main__ import main
    from analysis.core.tasks import TaskContext
    from analysis.lab.safe_lora import SafeLoraTask
    from analysis.llm.models import load_model

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))
    generator = torch.Generator().manual_seed(1)
    folders = {}
    model = load_model("tiny-llama")
    for name, scale in (("aligned", 0.1), ("finetuned", 0.02)):
        with torch.no_grad():
            for module in linear_modules(model.model).values():
                W = module.weight
                if name == "aligned":  # a rank-2 alignment change
                    W.add_(scale * torch.randn(W.shape[0], 2, generator=generator) @ torch.randn(2, W.shape[1],
                                                                                                generator=generator))
                else:
                    W.add_(scale * torch.randn(W.shape, generator=generator))
        folders[name] = tmp_path / name
        model.model.save_pretrained(folders[name])
        model.tokenizer.save_pretrained(folders[name])
    task = SafeLoraTask(finetuned=str(folders["finetuned"]), aligned=str(folders["aligned"]), base="tiny-llama",
                        threshold=0.9, rank=2)
    assert task.run_id() == SafeLoraTask(**{**task.__dict__}).run_id()
    code = main(["safe-lora", "--finetuned", str(folders["finetuned"]), "--aligned", str(folders["aligned"]),
                 "--base", "tiny-llama", "--threshold", "0.9", "--rank", "2"])
    assert code == 0  # the CLI ran the same task
    out = tmp_path / "cache" / "safe_lora" / task.run_id() / "model"
    rows = {r["name"]: r for r in json.loads((out / "safe_lora.json").read_text())}
    defended = weights(load_model(str(out)).model)
    aligned = weights(load_model(str(folders["aligned"])).model)
    base = weights(load_model("tiny-llama").model)
    assert rows and all(r["projected"] for r in rows.values())  # random deltas stray from a rank-2 subspace
    for name, W in defended.items():
        P = df.alignment_projector(aligned[name] - base[name], rank=2)
        delta = (W - aligned[name]).double()
        torch.testing.assert_close(P @ delta, delta, atol=1e-5, rtol=1e-4)
    summary = task.execute(TaskContext())
    assert summary["cached"] and summary["n_projected"] == len(rows) and summary["run_id"] == task.run_id()


# --- CERT-Lab's "same" / "orth" arms as SPF modes -------------------------------------------------------------


def test_same_and_orthogonal_modes_split_a_known_matrix_along_the_subspace():
    from analysis.lab.spf import project_gradients

    G = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    U = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # rows 1 and 3 span the subspace
    V = torch.eye(2, dtype=torch.float64)
    same, orth = G.clone(), G.clone()
    info_same = project_gradients({"m": same}, {"m": (U, V)}, "same")["m"]
    info_orth = project_gradients({"m": orth}, {"m": (U, V)}, "orthogonal")["m"]
    torch.testing.assert_close(same, torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(orth, torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(same + orth, G)  # the two arms split the plain step
    eye = torch.eye(3, dtype=torch.float64)
    assert float(((eye - U @ U.T) @ same).abs().max()) == 0 and float((U.T @ orth).abs().max()) == 0
    assert info_same[0] == pytest.approx(5.0 / float(G.norm())) and info_same[1] == pytest.approx(float(G.norm()))
    assert info_orth[0] == pytest.approx(float(same.norm() / G.norm()))
    # an empty basis projects nothing, in every mode
    for mode in ("same", "orthogonal", "conflict"):
        kept = G.clone()
        assert project_gradients({"m": kept}, {"m": (G.new_zeros(3, 0), G.new_zeros(2, 0))}, mode)["m"][0] == 0
        assert torch.equal(kept, G)


def test_same_and_orthogonal_on_real_gradients(real_gradients):
    from analysis.lab.spf import project_gradients, top_k_basis

    fine_tune, safety = real_gradients
    basis = {}
    for name, G_s in safety.items():
        U, _, V = top_k_basis(G_s.double(), 3, "exact")
        basis[name] = (U, V)
    same = {n: g.double().clone() for n, g in fine_tune.items()}
    orth = {n: g.double().clone() for n, g in fine_tune.items()}
    project_gradients(same, basis, "same")
    project_gradients(orth, basis, "orthogonal")
    for name, G in fine_tune.items():
        U = basis[name][0]
        scale = float(G.norm()) + 1e-30
        assert float((same[name] - U @ (U.T @ same[name])).abs().max()) <= 1e-10 * scale  # (I - U U^T) G' = 0
        assert float((U.T @ orth[name]).abs().max()) <= 1e-10 * scale                      # U^T G' = 0
        torch.testing.assert_close(same[name] + orth[name], G.double())


# --- the KL-to-aligned safety signal ----------------------------------------------------------------------------


def kl_config(**overrides):
    from analysis.core.config import ModelConfig

    values = dict(method="spf", optimizer="sgd", trainable="linear", model=ModelConfig("tiny-llama", dtype="float64"),
                  spf=dict(k=4, refresh=1, safety_batch=2, safety_loss="kl"))
    values.update(overrides)
    return tiny_config(**values)


def test_the_kl_safety_gradient_matches_a_direct_autograd_computation():
    from analysis.lab.finetune_data import safety_indices
    from analysis.lab.trainer import FinetuneTrainer
    from analysis.llm.formatting import tokenize_batch
    from analysis.llm.models import load_model

    config = kl_config(lr=0.05)
    trainer = FinetuneTrainer.create(config)
    reference = load_model(config.model).model  # the initial weights, a separate copy
    trainer.train_step(1)
    trainer.train_step(2)  # theta != theta_0 now
    step = 3
    refusals = [trainer.data.safety[i] for i in safety_indices(config, len(trainer.data.safety), step)]
    batch = tokenize_batch(trainer.tokenizer, refusals, config.max_length)
    with torch.no_grad():
        log_ref = torch.log_softmax(reference(**batch.model_inputs()).logits[:, :-1], dim=-1)
    log_theta = torch.log_softmax(trainer.model(**batch.model_inputs()).logits[:, :-1], dim=-1)
    mask = batch.labels[:, 1:] != -100
    token_kl = (log_ref.exp() * (log_ref - log_theta)).sum(dim=-1)  # (n, T-1)
    kl = ((token_kl * mask).sum(dim=1) / mask.sum(dim=1)).mean()
    assert float(kl.detach()) > 1e-8
    modules = trainer.projector.modules
    expected = torch.autograd.grad(kl, [m.weight for m in modules])
    got = trainer.safety_gradients(step)
    for module, g in zip(modules, expected):
        torch.testing.assert_close(got[module.name], as_out_in(module.module, g), rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(trainer.kl_losses(refusals).mean(), kl.detach(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", ["spf", "pcgrad"])
def test_kl_at_step_one_is_zero_and_keeps_no_basis(method):
    from analysis.lab.trainer import FinetuneTrainer

    trainer = FinetuneTrainer.create(kl_config(method=method, lr=0.05))
    safety = trainer.safety_gradients(1)
    assert all(float(g.abs().max()) == 0 for g in safety.values())  # theta = theta_0: exactly zero
    first = trainer.train_step(1)
    assert first["basis_skipped"] == 1.0 and first["safety_grad_norm"] == 0
    assert not trainer.projector.basis and getattr(trainer.defence, "reference", None) is None
    assert "spf_removed_mean" not in first and "pcgrad_dot" not in first  # nothing projected
    second = trainer.train_step(2)
    assert second["basis_skipped"] == 0.0 and second["safety_grad_norm"] > 0
    if method == "spf":
        assert trainer.projector.basis and second["spf_removed_mean"] > 0
    else:
        assert trainer.defence.reference is not None and "pcgrad_dot" in second


def test_a_resumed_pcgrad_run_keeps_its_reference_gradient(tmp_path):
    """The PCGrad reference (refreshed at step 1 only here) is checkpointed: cancelled after step 2 and resumed,
    steps 3 and 4 project against the same reference as an uninterrupted run."""
    import pandas.testing
    from safetensors.torch import load_file

    from analysis.core.tasks import TaskContext
    from analysis.lab.finetune import FinetuneCancelled, run_finetune

    config = tiny_config(method="pcgrad", trainable="linear", eval_every=2, checkpoint_every=1,
                         spf=dict(refresh=4, safety_batch=2, safety_loss="compliance"))
    whole = run_finetune(config, root=tmp_path / "a")

    def progress(event):
        (history,) = event.live["rows"].values()
        if history[-1]["step"] == 2:
            ctx.cancel.set()

    ctx = TaskContext(progress=progress)
    with pytest.raises(FinetuneCancelled):
        run_finetune(config, ctx, root=tmp_path / "b")
    resumed = run_finetune(config, root=tmp_path / "b")
    assert whole.history["pcgrad_dot"].notna().sum() == 4
    for key in ("pcgrad_dot", "pcgrad_removed", "train_loss"):
        pandas.testing.assert_series_equal(resumed.history[key], whole.history[key], check_exact=True)
    a, b = (load_file(str(r.model_path / "model.safetensors")) for r in (whole, resumed))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_the_cli_accepts_the_same_mode_and_the_kl_loss():

    from analysis.__main__ import parse_task
    from analysis.lab.trainer import run_id_for

    task = parse_task("finetune", ["--model", "tiny-llama", "--mode", "spf", "--spf-mode", "same", "--safety-loss", "kl"])
    assert task.config.spf.mode == "same" and task.config.spf.safety_loss == "kl"
    assert task.config.label == "harmful-10 / spf (same, kl, k=8, R=10)"
    ids = {run_id_for(tiny_config(method="spf", spf=dict(mode=mode, safety_loss=loss)), "weights")
           for mode in ("orthogonal", "same") for loss in ("refusal", "kl")}
    assert len(ids) == 4


def test_spf_with_the_kl_signal_trains_a_bfloat16_model():
    """bfloat16: the reference is the bf16 initial weights; the basis is computed (and kept) in float32, since
    QR / LAPACK have no bf16 kernels (this used to raise in ``top_k_basis``)."""
    from analysis.core.config import ModelConfig
    from analysis.lab.trainer import FinetuneTrainer

    trainer = FinetuneTrainer.create(kl_config(model=ModelConfig("tiny-llama", dtype="bfloat16"), lr=0.05,
                                               spf=dict(k=4, refresh=1, safety_batch=2, safety_loss="kl",
                                                        svd="randomized", oversample=2)))
    assert trainer.train_step(1)["basis_skipped"] == 1.0
    second = trainer.train_step(2)
    assert second["basis_skipped"] == 0.0 and second["spf_removed_mean"] > 0
    assert {U.dtype for U, _ in trainer.projector.basis.values()} == {torch.float32}
    assert all(m.weight.dtype == torch.bfloat16 for m in trainer.projector.modules)
