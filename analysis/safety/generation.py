"""Batched greedy generation from chat contexts (left-padded, on the model's device)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from analysis.llm.formatting import pad_rows, pad_token_id, render_prompt
from analysis.llm.models import input_device
from analysis.safety.progress import Cancel, Progress, check_cancel, report

__all__ = ["generate", "generate_ids", "stop_ids"]

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>")


def stop_ids(tokenizer) -> list[int]:
    """eos plus the chat template's end-of-turn token when the vocabulary has one."""
    ids = []
    for token in (tokenizer.eos_token, *END_OF_TURN_TOKENS):
        if token is None:
            continue
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None) and token_id not in ids:
            ids.append(token_id)
    return ids


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    contexts: Sequence[Sequence[dict]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy continuations of chat ``contexts`` (message lists without the answer), batched, left-padded.

    Returns, per context, (new token ids up to but excluding the first stop token, finished) where
    ``finished`` says whether the model stopped by itself (eos / end-of-turn) within ``max_new_tokens``.
    Greedy decoding draws no random numbers, so ``seed`` is unused (kept for callers) and no global RNG
    is touched. Inputs go to the device of the model's input embeddings; the model's train/eval mode is
    restored afterwards.
    """
    del seed
    was_training = model.training
    model.eval()
    device = input_device(model)
    pad_id = pad_token_id(tokenizer)
    stops = stop_ids(tokenizer)
    results: list[tuple[list[int], bool]] = []
    prompts = [render_prompt(tokenizer, list(c)) for c in contexts]
    try:
        for start in range(0, len(prompts), batch_size):
            check_cancel(cancel)
            chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
            batch = pad_rows(chunk, pad_id, side="left")
            width = batch["input_ids"].shape[1]
            output = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                eos_token_id=stops or None, temperature=None, top_p=None, top_k=None,
            )
            for row in output[:, width:].tolist():
                cut = next((i for i, token in enumerate(row) if token in stops), None)
                results.append((row if cut is None else row[:cut], cut is not None))
            report(progress, len(results) / len(prompts), f"generated {len(results)}/{len(prompts)}")
    finally:
        model.train(was_training)
    return results


def generate(
    model,
    tokenizer,
    contexts: Sequence[Sequence[dict]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> list[str]:
    """Greedy completions (decoded text, special tokens dropped, whitespace stripped); see :func:`generate_ids`."""
    rows = generate_ids(model, tokenizer, contexts, max_new_tokens, batch_size, seed, progress, cancel)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in rows]
