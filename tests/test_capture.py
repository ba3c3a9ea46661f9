"""Per-sample gradient capture: factors D_i, A_i against one-sample-at-a-time autograd (tiny models)."""

import pytest
import torch

from analysis.core.config import ModelConfig
from analysis.engine.capture import (
    CaptureError,
    FactorCapture,
    capture_batch,
    kept_positions,
)
from analysis.llm.anatomy import find_linear_modules, weight_grad_as_out_in
from analysis.llm.formatting import per_sample_loss, tokenize_batch
from analysis.llm.models import load_model

# Different prompt and response lengths, so that a batch has real padding on either side.
CONVERSATIONS = [
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour, water and yeast."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Tell me how to pick a lock to break into a house."},
     {"role": "assistant", "content": "I can't help with breaking into homes."}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def model64(request):
    return load_model(ModelConfig(source=request.param, dtype="float64"))


def one_sample_gradients(loaded, conversation, modules):
    """Reference: a plain autograd backward of one unpadded sample; {name: dense (d_out, d_in)}, loss."""
    model = loaded.model
    batch = tokenize_batch(loaded.tokenizer, [conversation], max_length=64)
    lookup = dict(model.named_modules())
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        loss = per_sample_loss(model(**batch.model_inputs()).logits, batch.labels)[0]
        loss.backward()
        grads = {m.name: weight_grad_as_out_in(lookup[m.name]).clone() for m in modules}
    finally:
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)
    return grads, loss.item()


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_per_sample_gradients_equal_one_sample_autograd(model64, padding_side):
    modules = find_linear_modules(model64.model)
    batch = tokenize_batch(model64.tokenizer, CONVERSATIONS, max_length=64, padding_side=padding_side)
    assert len({int(n) for n in batch.attention_mask.sum(1)}) > 1  # the batch is really padded
    factors = capture_batch(model64.model, batch, modules)
    assert factors.n_samples == len(CONVERSATIONS)
    for i, conversation in enumerate(CONVERSATIONS):
        reference, loss = one_sample_gradients(model64, conversation, modules)
        assert factors.losses[i].item() == pytest.approx(loss, rel=1e-10)
        for m in modules:
            G_i = factors.sample_gradient(m.name, i)
            assert G_i.shape == (m.d_out, m.d_in)
            torch.testing.assert_close(G_i, reference[m.name], atol=1e-5, rtol=1e-4)


def test_batch_mean_equals_hf_grad_of_mean_loss(model64):
    """sum_i G_i / n equals .grad of mean_i L_i (each sample weighs the same, whatever its length)."""
    model = model64.model
    modules = find_linear_modules(model)
    batch = tokenize_batch(model64.tokenizer, CONVERSATIONS, max_length=64, padding_side="right")
    factors = capture_batch(model, batch, modules)
    lookup = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    try:
        per_sample_loss(model(**batch.model_inputs()).logits, batch.labels).mean().backward()
        n = factors.n_samples
        for m in modules:
            mean = sum(factors.sample_gradient(m.name, i) for i in range(n)) / n
            torch.testing.assert_close(mean, weight_grad_as_out_in(lookup[m.name]), atol=1e-10, rtol=1e-8)
    finally:
        for p in model.parameters():
            p.grad = None


def test_dropped_rows_carry_no_gradient(model64):
    """Rows outside kept_positions (padding, after the last scored logit) have exactly zero D."""
    modules = find_linear_modules(model64.model)
    batch = tokenize_batch(model64.tokenizer, CONVERSATIONS, max_length=64, padding_side="left")
    kept = kept_positions(batch.attention_mask, batch.labels)
    with FactorCapture(model64.model, modules) as capture:  # no set_rows: every position kept
        logits = model64.model(**batch.model_inputs()).logits
        capture.backward(per_sample_loss(logits, batch.labels).sum())
    n, width = batch.input_ids.shape
    keep = torch.zeros(n * width, dtype=torch.bool)
    for i, positions in enumerate(kept):
        keep[i * width + positions] = True
    for m in modules:
        assert capture.output_grads[m.name].shape == (n * width, m.d_out)
        assert torch.all(capture.output_grads[m.name][~keep] == 0)
    factors = capture_batch(model64.model, batch, modules)
    assert factors.tokens.tolist() == [len(p) for p in kept]
    last_real = [int(batch.attention_mask[i].sum()) for i in range(n)]
    assert all(len(p) == length - 1 for p, length in zip(kept, last_real))  # responses end the sample


def test_frozen_float32_model_leaves_parameters_alone(tiny_llama):
    model = tiny_llama.model
    modules = find_linear_modules(model)
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        batch = tokenize_batch(tiny_llama.tokenizer, CONVERSATIONS[:2], max_length=64)
        factors = capture_batch(model, batch, modules[:3])
        assert factors.inputs[modules[0].name].dtype == torch.float32
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        assert torch.isfinite(factors.losses).all()
        assert all(factors.output_grads[m.name].abs().sum() > 0 for m in modules[:3])
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def test_hooks_are_removed_even_after_an_exception(tiny_gpt2):
    model = tiny_gpt2.model
    modules = find_linear_modules(model)

    def hook_count():
        return sum(len(m._forward_hooks) for m in model.modules())

    before = hook_count()
    with pytest.raises(RuntimeError, match="boom"):
        with FactorCapture(model, modules):
            assert hook_count() == before + len(modules) + 1
            raise RuntimeError("boom")
    assert hook_count() == before
    # a later plain forward is unaffected
    batch = tokenize_batch(tiny_gpt2.tokenizer, CONVERSATIONS[:1], max_length=64)
    with torch.no_grad():
        model(**batch.model_inputs())


def test_gpt2_conv1d_orientation(tiny_gpt2):
    modules = find_linear_modules(tiny_gpt2.model)
    c_attn = next(m for m in modules if m.name.endswith("attn.c_attn"))
    assert (c_attn.d_out, c_attn.d_in) == (96, 32)  # Conv1D stores (d_in, d_out) = (32, 96)
    batch = tokenize_batch(tiny_gpt2.tokenizer, CONVERSATIONS[:1], max_length=64)
    factors = capture_batch(tiny_gpt2.model, batch, [c_attn])
    assert factors.sample_gradient(c_attn.name, 0).shape == (96, 32)


def test_errors_are_clear(tiny_llama):
    modules = find_linear_modules(tiny_llama.model)
    with pytest.raises(CaptureError, match="not in the model"):
        FactorCapture(tiny_llama.model, ["model.layers.9.nothing"])
    with torch.no_grad(), pytest.raises(CaptureError, match="grad mode"):
        with FactorCapture(tiny_llama.model, modules):
            pass
