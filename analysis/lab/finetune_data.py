"""Data and measurements of a fine-tuning run: the training / safety / held-out sets of a
``FinetuneConfig``, the seeded batch order, and the live NLLs and generation evaluations
(``analysis.safety.evaluate`` does the work)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from analysis.core.config import ConfigError, config_hash
from analysis.lab.config import FinetuneConfig
from analysis.llm.formatting import with_system

FORMAT_VERSION = 1


def stratified(dataset, per_category: int | None, seed: int):
    """Up to ``per_category`` examples of each category (seeded ``take``), in file order."""
    if per_category is None:
        return dataset
    from analysis.llm.data import Dataset

    chosen = set()
    for category in dataset.categories():
        members = Dataset(dataset.name, [ex for ex in dataset if (ex.category or "(none)") == category])
        chosen.update(ex.id for ex in members.take(min(per_category, len(members)), seed=seed))
    return Dataset(f"{dataset.name}:per_category{per_category}", [ex for ex in dataset if ex.id in chosen],
                   dataset.source, dataset.content_hash)


@dataclasses.dataclass
class FinetuneData:
    """Conversations to train on (``train``, with the training system prompt; ``train_ids``), refusals for the
    safety gradient (``safety``), the fixed evaluation subsets (Datasets) and every set's fingerprint."""

    train: list[list[dict]]
    train_ids: list[str]
    safety: list[list[dict]]
    live_harmful: Any
    live_utility: Any
    gen_harmful: Any
    gen_benign: Any
    fingerprints: dict


def load_data(config: FinetuneConfig) -> FinetuneData:
    from analysis.llm.data import DataError, load_any

    try:
        train = load_any(config.train_data)
        if config.train_split:
            train = train.split(config.train_split)
        if config.n_train is not None:
            train = train.take(config.n_train, seed=config.seed)
        safety = load_any(config.spf.safety_data)
        if config.spf.safety_split:
            safety = safety.split(config.spf.safety_split)
        harmful_eval = load_any("safety").split("eval")
        live_harmful = stratified(harmful_eval, config.eval_harmful_per_category, config.seed)
        utility_eval = load_any("utility").split("eval")
        live_utility = utility_eval.take(min(config.n_eval_utility, len(utility_eval)), seed=config.seed)
        gen_harmful = stratified(harmful_eval, config.gen_harmful_per_category, config.seed)
        benign = load_any("benign_sensitive", require_response=False)
        gen_benign = benign if config.n_gen_benign is None else benign.take(min(config.n_gen_benign, len(benign)),
                                                                            seed=config.seed)
    except DataError as error:
        raise ConfigError(f"data: {error}") from None
    if train.prompts_only or len(train) == 0:
        raise ConfigError(f"training data {config.train_data!r} has no responses to train on")
    fingerprints = {name: ds.fingerprint() for name, ds in (
        ("train", train), ("safety", safety), ("live_harmful", live_harmful), ("live_utility", live_utility),
        ("gen_harmful", gen_harmful), ("gen_benign", gen_benign))}
    return FinetuneData(
        train=[with_system(ex.messages, config.system_prompt) for ex in train], train_ids=[ex.id for ex in train],
        safety=[list(ex.messages) for ex in safety], live_harmful=live_harmful, live_utility=live_utility,
        gen_harmful=gen_harmful, gen_benign=gen_benign, fingerprints=fingerprints,
    )


def seeded(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(int(config_hash(list(parts), 15), 16))


def total_steps(config: FinetuneConfig, n_train: int) -> int:
    steps = config.epochs * math.ceil(n_train / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def batch_indices(config: FinetuneConfig, n_train: int, step: int) -> tuple[list[int], int]:
    """Indices of the training examples of optimizer step ``step`` (1-based) and its epoch (0-based)."""
    per_epoch = math.ceil(n_train / config.batch_size)
    epoch, position = divmod(step - 1, per_epoch)
    order = torch.randperm(n_train, generator=seeded(config.seed, "order", epoch)).tolist()
    return order[position * config.batch_size:(position + 1) * config.batch_size], epoch


def safety_indices(config: FinetuneConfig, n_safety: int, step: int) -> list[int]:
    order = torch.randperm(n_safety, generator=seeded(config.seed, "safety", step)).tolist()
    return order[:min(config.spf.safety_batch, n_safety)]


# --------------------------------------------------------------------------------------------------
# evaluation (analysis.safety.evaluate does the work)
# --------------------------------------------------------------------------------------------------


def nll_arrays(model, tokenizer, data: FinetuneData, config: FinetuneConfig, cancel) -> dict[str, np.ndarray]:
    """Per-sample NLLs on the fixed live subsets: refusal and affirmative target on harmful prompts (with the
    evaluation system prompt), reference answers of utility prompts."""
    from analysis.safety.evaluate import affirmative_nll, affirmative_target, response_nll

    system = config.eval_system_prompt
    harmful = list(data.live_harmful)
    return {
        "refusal": response_nll(model, tokenizer, [with_system(ex.messages, system) for ex in harmful],
                                config.max_length, cancel=cancel),
        "affirmative": affirmative_nll(model, tokenizer, [with_system(ex.context, system) for ex in harmful],
                                       [affirmative_target(ex.prompt) for ex in harmful], config.max_length,
                                       cancel=cancel),
        "utility": response_nll(model, tokenizer, [list(ex.messages) for ex in data.live_utility],
                                config.max_length, cancel=cancel),
    }


def nll_metrics(arrays: Mapping[str, np.ndarray]) -> dict:
    return {f"{name}_nll": float(np.mean(values)) for name, values in arrays.items()}


def generation_eval(model, tokenizer, data: FinetuneData, config: FinetuneConfig, nll: Mapping[str, np.ndarray],
                     cancel) -> dict:
    """Keyword ASR / over-refusal (overall and per category) by greedy generation, summarised with
    ``evaluate.summarise`` together with the step's live NLLs."""
    from analysis.safety.evaluate import KEYWORD_LISTS, generate, summarise

    system = config.eval_system_prompt
    harmful, benign = list(data.gen_harmful), list(data.gen_benign)
    contexts = [with_system(ex.context, system) for ex in harmful + benign]
    completions = generate(model, tokenizer, contexts, config.gen_max_new_tokens, config.gen_batch_size,
                           config.seed, cancel=cancel)
    records = []
    for i, (ex, completion) in enumerate(zip(harmful + benign, completions)):
        record = {"set": "harmful" if i < len(harmful) else "benign", "id": ex.id, "category": ex.category,
                  "prompt": ex.prompt, "completion": completion}
        for name, matcher in KEYWORD_LISTS.items():
            record[f"refused_{name}"] = matcher.is_refusal(completion)
        record["refused"] = record["refused_qi"]
        records.append(record)
    return {"metrics": summarise(records, dict(nll), "qi"), "records": records}


def eval_key(identity: str, config: FinetuneConfig, data: FinetuneData) -> str:
    """What a full evaluation of the *initial* model depends on (shared by the plain and SPF arms)."""
    fields = ("eval_system_prompt", "gen_max_new_tokens", "max_length", "seed")
    return config_hash({"format": FORMAT_VERSION, "model": identity, "dtype": config.model.dtype,
                        **{f: getattr(config, f) for f in fields},
                        "data": {k: data.fingerprints[k] for k in ("gen_harmful", "gen_benign", "live_harmful",
                                                                    "live_utility")}})

