"""Chat formatting: response-only label masks, padding sides, truncation, fallback template."""

import pytest
import torch

from analysis.llm.formatting import (
    IGNORE_INDEX,
    FormattingError,
    pad_rows,
    per_sample_loss,
    split_prompt_response,
    tokenize_batch,
)

CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I'm sorry, but I can't help with that."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
]


def _response_texts(loaded, batch):
    return [loaded.tokenizer.decode(batch.input_ids[i][batch.labels[i] != IGNORE_INDEX])
            for i in range(len(batch.input_ids))]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_labels_cover_exactly_the_response(request, fixture, side):
    loaded = request.getfixturevalue(fixture)
    batch = tokenize_batch(loaded.tokenizer, CONVERSATIONS, max_length=512, padding_side=side)
    for i, messages in enumerate(CONVERSATIONS):
        _, response = split_prompt_response(loaded.tokenizer, messages)
        assert _response_texts(loaded, batch)[i] == response
        assert response.startswith(messages[-1]["content"])
    real = batch.attention_mask.bool()
    assert (batch.labels[~real] == IGNORE_INDEX).all()
    assert batch.template == ("model" if fixture == "tiny_llama" else "fallback")
    edge = 0 if side == "right" else -1
    assert batch.attention_mask[:, edge].all()  # padding is on the requested side


def test_padding_side_does_not_change_per_sample_loss(tiny_llama):
    losses = []
    for side in ("left", "right"):
        batch = tokenize_batch(tiny_llama.tokenizer, CONVERSATIONS, max_length=512, padding_side=side)
        with torch.no_grad():
            logits = tiny_llama.model(**batch.model_inputs()).logits
        losses.append(per_sample_loss(logits, batch.labels))
    alone = []
    for messages in CONVERSATIONS:
        batch = tokenize_batch(tiny_llama.tokenizer, [messages], max_length=512)
        with torch.no_grad():
            alone.append(per_sample_loss(tiny_llama.model(**batch.model_inputs()).logits, batch.labels))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses[0], torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_per_sample_loss_is_response_token_mean():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    expected = []
    for i in range(2):
        positions = [t for t in range(1, 5) if labels[i, t] != IGNORE_INDEX]
        expected.append(torch.stack([torch.nn.functional.cross_entropy(logits[i, t - 1], labels[i, t])
                                     for t in positions]).mean())
    torch.testing.assert_close(per_sample_loss(logits, labels), torch.stack(expected))


def test_truncation_is_reported_and_keeps_response_tokens(tiny_llama):
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Short answer."}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "long " * 200}]
    batch = tokenize_batch(tiny_llama.tokenizer, [long_prompt, long_answer, CONVERSATIONS[1]], max_length=64)
    assert batch.truncated == [True, True, False] and batch.n_truncated == 2
    assert batch.input_ids.shape[1] == 64
    assert (batch.response_token_counts()[:2] >= 64 // 4 - 1).all()
    # an over-long answer keeps the whole prompt
    assert "Hi" in tiny_llama.tokenizer.decode(batch.input_ids[1])


def test_bad_conversations_raise_clear_errors(tiny_llama):
    with pytest.raises(FormattingError, match="end with an assistant"):
        tokenize_batch(tiny_llama.tokenizer, [[{"role": "user", "content": "hi"}]])
    with pytest.raises(FormattingError, match="empty"):
        tokenize_batch(tiny_llama.tokenizer, [])
    with pytest.raises(FormattingError, match="padding_side"):
        tokenize_batch(tiny_llama.tokenizer, CONVERSATIONS, padding_side="middle")


@pytest.mark.slow
def test_real_tokenizer_masks_response_only(default_model):
    tokenizer = default_model.tokenizer
    batch = tokenize_batch(tokenizer, CONVERSATIONS, max_length=256, padding_side="left")
    texts = _response_texts(default_model, batch)
    assert texts[0] == "I'm sorry, but I can't help with that.<|im_end|>\n"
    assert texts[1] == "4<|im_end|>\n"
    prompt_text = tokenizer.decode(batch.input_ids[0][(batch.labels[0] == IGNORE_INDEX) & batch.attention_mask[0].bool()])
    assert prompt_text.endswith("<|im_start|>assistant\n") and "How do I pick a lock?" in prompt_text


def test_pad_rows_pads_either_side_with_real_token_positions():
    pairs = [([5, 6, 7], [IGNORE_INDEX, 6, 7]), ([8], [8])]
    right = pad_rows(pairs, 0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    left = pad_rows([[5, 6, 7], [8]], 0, side="left")
    assert set(left) == {"input_ids", "attention_mask", "position_ids"}
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(FormattingError):
        pad_rows(pairs, 0, side="middle")
