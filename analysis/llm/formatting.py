"""Chat formatting and tokenisation with a response-only loss mask.

A conversation's last message is the assistant response that carries the loss. The prompt (all earlier
messages, rendered with the generation prompt) and the response are tokenised separately and concatenated,
so the mask boundary is exact whatever the tokenizer merges. Labels are -100 on prompt and padding tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100

# Used for models without a chat template (e.g. GPT-2); the UI says when it is in use.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


class FormattingError(ValueError):
    """A conversation cannot be formatted (e.g. it does not end with an assistant message)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_source(tokenizer) -> str:
    """``"model"`` if the tokenizer has its own chat template, else ``"fallback"``."""
    return "model" if has_chat_template(tokenizer) else "fallback"


def _render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt,
        chat_template=None if has_chat_template(tokenizer) else FALLBACK_TEMPLATE,
    )


def with_system(messages: Sequence[dict], system: str | None) -> list[dict]:
    """A copy of ``messages`` with ``system`` as a leading system message (kept as is when it has one)."""
    messages = [dict(m) for m in messages]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(tokenizer, messages: Sequence[dict]) -> str:
    """Text the model sees before it answers: ``messages`` (no assistant reply) + generation prompt."""
    return _render(tokenizer, messages, add_generation_prompt=True)


def split_prompt_response(tokenizer, messages: Sequence[dict]) -> tuple[str, str]:
    """(prompt text, response text) of a conversation whose last message is the assistant's."""
    if not messages or messages[-1].get("role") != "assistant":
        raise FormattingError("a training conversation must end with an assistant message")
    prompt = render_prompt(tokenizer, messages[:-1])
    full = _render(tokenizer, messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise FormattingError(
            "the chat template renders the prompt differently inside the full conversation, so the "
            "response cannot be located; use a model whose template supports add_generation_prompt"
        )
    return prompt, full[len(prompt):]


@dataclasses.dataclass
class TokenizedBatch:
    """A padded batch. Shapes: (n, T) for the tensors.

    ``labels`` is -100 except on response tokens; ``position_ids`` count real tokens only, so a sample
    gets the same positions (and the same gradients) whatever its padding.
    ``truncated[i]`` says whether sample i was cut to ``max_length``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    truncated: list[bool]
    template: str

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a HF causal LM forward (no labels: losses are computed per sample)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}

    def response_token_counts(self) -> torch.Tensor:
        """(n,) number of loss-carrying tokens per sample (after the shift by one)."""
        return (self.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def tokenize_conversation(tokenizer, messages: Sequence[dict], max_length: int) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, truncated) for one conversation, at most ``max_length`` tokens.

    Over-long conversations keep the whole prompt and cut the response's end; if the prompt alone
    leaves fewer than ``max_length // 4`` response tokens, the prompt is cut from the left instead.
    """
    if max_length < 4:
        raise FormattingError(f"max_length {max_length} is too short; use at least 16 tokens")
    prompt, response = split_prompt_response(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if not response_ids:
        raise FormattingError("the response is empty after tokenisation")
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        keep_response = max(max_length - len(prompt_ids), min(len(response_ids), max_length // 4))
        response_ids = response_ids[:keep_response]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return ids, labels, truncated


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_rows(rows: Sequence[Sequence[int] | tuple[Sequence[int], Sequence[int]]], pad_id: int,
             side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token rows into one batch: the one padding helper for training, scoring and generation.

    ``rows``: (ids, labels) pairs of lists (labels as long as ids, -100 where no loss) or plain id lists.
    ``side``: "right" (training and scoring) or "left" (generation: every row ends at the last column).
    Returns (n, T) long tensors ``input_ids``, ``attention_mask`` (1 on real tokens), ``position_ids``
    (counting real tokens only, so a row's positions do not depend on its padding) and, for pairs,
    ``labels`` (-100 on padding).
    """
    if side not in ("left", "right"):
        raise FormattingError(f"padding side must be 'left' or 'right', not {side!r}")
    if not rows:
        raise FormattingError("no rows to pad")
    pairs = len(rows[0]) == 2 and isinstance(rows[0][0], (list, tuple))
    ids_of = [row[0] if pairs else row for row in rows]
    width = max(len(ids) for ids in ids_of)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (row, ids) in enumerate(zip(rows, ids_of)):
        span = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        if pairs:
            labels[i, span] = torch.tensor(row[1], dtype=torch.long)
        attention_mask[i, span] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if pairs:
        batch["labels"] = labels
    return batch


def tokenize_batch(
    tokenizer, conversations: Sequence[Sequence[dict]], max_length: int = 256, padding_side: str = "right"
) -> TokenizedBatch:
    """Tokenise conversations (each a list of role/content messages ending with the assistant's) and pad.

    ``padding_side`` is ``"right"`` or ``"left"``; the pad id is the tokenizer's pad token (eos if none).
    """
    if padding_side not in ("left", "right"):
        raise FormattingError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    if not conversations:
        raise FormattingError("no conversations to tokenise: the selection is empty")
    rows = [tokenize_conversation(tokenizer, messages, max_length) for messages in conversations]
    batch = pad_rows([(ids, labels) for ids, labels, _ in rows], pad_token_id(tokenizer), padding_side)
    input_ids, attention_mask, labels, position_ids = (batch[key] for key in
                                                        ("input_ids", "attention_mask", "labels", "position_ids"))
    return TokenizedBatch(input_ids, attention_mask, labels, position_ids,
                          [t for _, _, t in rows], template_source(tokenizer))


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(n,) mean cross-entropy over each sample's response tokens (logits (n, T, V), labels (n, T)).

    Every sample weighs the same whatever its length (unlike HF's batch token-mean).
    """
    shifted_logits = logits[:, :-1, :]
    if shifted_logits.dtype not in (torch.float32, torch.float64):
        shifted_logits = shifted_logits.float()
    shifted_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def _uses_plain_lm_head(model) -> bool:
    config = model.config
    return (getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) is None
            and model.get_output_embeddings() is not None)


def response_losses(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """(n,) the same values as ``per_sample_loss(model(**inputs).logits, labels)``, cheaper.

    Applies the LM head only at positions that predict a response token: the head (vocab x hidden) is a
    large share of a small model's compute, and most positions are prompt or padding. A peft model is
    unwrapped with ``get_base_model()`` (its adapters live inside the base model's layers).
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    if not _uses_plain_lm_head(model):
        return per_sample_loss(model(**inputs).logits, labels)
    hidden = model.base_model(**inputs).last_hidden_state  # (n, T, d)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logits = model.get_output_embeddings()(hidden[:, :-1][mask])
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    token_loss = torch.nn.functional.cross_entropy(logits, targets[mask], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    return sums / mask.sum(dim=1).clamp(min=1)


def response_logits(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions that predict a response token (sample-major order; float32, or float64
    for a float64 model) and the sample index (N,) of each; the LM head is applied only there, as in
    :func:`response_losses` (the same logits that function's cross-entropy sees)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    if _uses_plain_lm_head(model):
        hidden = model.base_model(**inputs).last_hidden_state  # (n, T, d)
        logits = model.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = model(**inputs).logits[:, :-1][mask]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return logits, rows
