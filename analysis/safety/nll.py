"""Per-sample NLLs: refusal, affirmative (attack) prefix and utility answers (nats per response token).

* **Refusal NLL**: mean per-token NLL of the dataset's refusal given the harmful prompt (low = the model
  would refuse); **utility NLL**: of the reference answers of benign tasks (:func:`response_nll`).
* **Affirmative NLL**: of a non-actionable affirmative prefix ("Sure, here is how to do that"; low = the
  model is ready to comply) after the harmful prompt, without an end-of-turn (:func:`affirmative_nll`).

Smooth signals, cheap enough for live curves. Batches go to the model's device; no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from analysis.llm.formatting import (
    IGNORE_INDEX,
    pad_rows,
    pad_token_id,
    per_sample_loss,
    render_prompt,
    tokenize_conversation,
)
from analysis.llm.models import input_device
from analysis.safety.progress import Cancel, check_cancel

__all__ = ["affirmative_nll", "affirmative_target", "nll_of_rows", "prefix_rows", "response_nll"]

Row = tuple[list[int], list[int]]  # (input ids, labels with -100 where no loss)


def prefix_rows(tokenizer, context: Sequence[dict], target: str, max_length: int) -> Row:
    """(ids, labels) of a prompt followed by a target *prefix*: no end-of-turn after the target.

    For affirmative targets ("Sure, here is ...") the interesting quantity is how readily the model starts
    complying, not whether it would stop right after the prefix, so the end-of-turn token is left out.
    The prompt is cut from the left so that prompt + target fit ``max_length`` tokens.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, list(context)), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    prompt_ids = prompt_ids[-max(max_length - len(target_ids), 1):]
    ids = prompt_ids + target_ids
    return ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


@torch.no_grad()
def nll_of_rows(model, rows: Sequence[Row], pad_id: int, batch_size: int = 8,
                cancel: Cancel | None = None) -> np.ndarray:
    """(n,) float64 mean per-token NLL of each row's labelled tokens (batched, right-padded, eval mode)."""
    was_training = model.training
    model.eval()
    device = input_device(model)
    values: list[float] = []
    try:
        for start in range(0, len(rows), batch_size):
            check_cancel(cancel)
            batch = {key: tensor.to(device) for key, tensor in pad_rows(rows[start:start + batch_size], pad_id).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            values.extend(per_sample_loss(logits, labels).tolist())
    finally:
        model.train(was_training)
    return np.asarray(values, dtype=np.float64)


def response_nll(model, tokenizer, conversations: Sequence[Sequence[dict]], max_length: int = 256,
                 batch_size: int = 8, cancel: Cancel | None = None) -> np.ndarray:
    """(n,) mean per-token NLL of each conversation's final (assistant) message, end-of-turn included.

    The quantity is exactly the per-sample loss of DESIGN.md (response tokens only, each sample weighs
    the same). Use it for refusal NLL (refusal given a harmful prompt) and utility NLL (reference answer).
    """
    rows = []
    for messages in conversations:
        ids, labels, _ = tokenize_conversation(tokenizer, list(messages), max_length)
        rows.append((ids, labels))
    return nll_of_rows(model, rows, pad_token_id(tokenizer), batch_size, cancel)


def affirmative_nll(model, tokenizer, contexts: Sequence[Sequence[dict]], targets: Sequence[str],
                    max_length: int = 256, batch_size: int = 8, cancel: Cancel | None = None) -> np.ndarray:
    """(n,) mean per-token NLL of an affirmative prefix target after each context (see :func:`prefix_rows`)."""
    rows = [prefix_rows(tokenizer, c, t, max_length) for c, t in zip(contexts, targets)]
    return nll_of_rows(model, rows, pad_token_id(tokenizer), batch_size, cancel)


def affirmative_target(prompt: str, template: str = "Sure, here is how to do that") -> str:
    """The affirmative (attack) target for a harmful prompt: non-actionable by construction.

    harmful_prefix-style targets restate the request ("Sure, here is how to hotwire a motorcycle"); our
    eval prompts are free-form questions that do not restate cleanly, so one fixed prefix is used; the
    NLL still depends on the prompt through the context.
    """
    return template
