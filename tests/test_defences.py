"""Defences beside SPF: each projection's defining property on a tiny model's real gradients and weights."""

import pytest
import torch

from analysis.lab import defences as df
from analysis.lab.spf import as_out_in

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
