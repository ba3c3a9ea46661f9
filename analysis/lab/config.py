"""Fine-tuning configuration: ``FinetuneConfig`` (one run), ``SPFConfig`` (the projection) and the attack
presets after Qi et al. (2023). Frozen, validated dataclasses: a bad value raises ``ConfigError``."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from analysis.core.config import ConfigError, ModelConfig, to_jsonable
from analysis.core.options import option

#: the two arms a comparison runs (the attack as is, and SPF); every training defence of the registry
#: (:mod:`analysis.lab.defences`) is a valid ``FinetuneConfig.method``
METHODS = ("plain", "spf")
SPF_MODES = ("conflict", "orthogonal", "same")
SPF_TARGETS = ("gradient", "update")
SAFETY_LOSSES = ("refusal", "contrast", "compliance", "kl")
SVD_METHODS = ("randomized", "lowrank", "exact", "auto")
TRAINABLE = ("blocks", "last", "linear", "all", "lora")
OPTIMIZERS = ("adamw", "sgd")  # analysis.lab.loop.TrainingLoop


def __getattr__(name: str) -> Any:
    """``DEFENCES``: the further single-arm training defences (registered ones beside :data:`METHODS`),
    read from the registry when asked for (so a defence registered later is included)."""
    if name == "DEFENCES":
        from analysis.lab.defences import training_names

        return tuple(method for method in training_names() if method not in METHODS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _finite(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SPFConfig:
    """Settings of the safety signal and the SPF projection (the SPF and PCGrad defences use them; a plain run
    tracking conflicts uses the safety signal).

    k: safety-basis size per module; refresh: R, recompute the basis every R optimizer steps;
    safety_batch: refusal examples per basis computation (1 allowed); mode: "conflict" (remove the basis
    components with c_j < 0), "orthogonal" (remove U_k U_k^T G; CERT-Lab's "orth") or "same" (keep only
    U_k U_k^T G: the control arm that updates only along safety directions; CERT-Lab's "same"); target: "gradient" (project G_u before
    the optimizer) or "update" (project the optimizer's weight change; exact under AdamW, see the module
    docstring of :mod:`analysis.lab.spf`); safety_loss: "refusal" (L_safety = CE of the refusals, DESIGN.md) or "contrast" (CE of the
    refusals minus CE of an affirmative target "Sure, here is how to do that" on the same prompts, so that
    the subspace also holds the direction that makes the model comply; see :mod:`analysis.lab.spf`) or
    "compliance" (minus the CE of that affirmative target alone: the ascent direction of compliance) or
    "kl" (KL(p_ref || p_theta) to the frozen initial model on the refusals' response tokens: SafeGrad's
    reading; zero gradient at step 1, see :mod:`analysis.lab.spf`);
    layers / kinds / regex: which linear modules (``capture.select_modules``; intersected with
    the trainable ones); svd: "randomized" (seeded torch range finder, ``oversample``, ``power_iters``),
    "lowrank" (``torch.svd_lowrank``, same settings), "exact" (``geometry.top_singular``) or "auto" (exact
    when min(d_out, d_in) <= 128, else "randomized").
    """

    k: int = option(8, flag="--k", help="SPF basis size k per module", minimum=1, maximum=4096)
    refresh: int = option(10, help="recompute the safety basis every R optimizer steps", minimum=1)
    safety_batch: int = option(4, help="refusal examples per basis computation (1 allowed)", minimum=1,
                               maximum=4096)
    mode: str = option("conflict", flag="--spf-mode", choices=SPF_MODES,
                       help="conflict: drop the basis components that raise the safety loss; orthogonal: drop "
                            "U_k U_k^T G (CERT-Lab 'orth'); same: keep only U_k U_k^T G (CERT-Lab 'same', control)")
    target: str = option("gradient", flag="--spf-target", choices=SPF_TARGETS,
                         help="project the gradient before the optimizer, or the optimizer's update")
    safety_loss: str = option("refusal", choices=SAFETY_LOSSES, legacy=True,
                              help="refusal CE, refusal CE minus affirmative-target CE (contrast), minus the "
                                   "affirmative-target CE alone (compliance), or KL(p_aligned || p_theta) on the "
                                   "refusals (kl)")
    layers: str = option("all", flag="--spf-layers", help="layers whose modules SPF projects, e.g. 0-29 or all")
    kinds: str = option("all", flag="--spf-kinds", help="module kinds SPF projects, e.g. q,v,down or all")
    regex: str | None = None
    svd: str = "auto"
    oversample: int = 8
    power_iters: int = 2
    safety_data: str = "safety"
    safety_split: str | None = "analysis"

    def __post_init__(self) -> None:
        _positive_int("spf.k", self.k)
        _positive_int("spf.refresh", self.refresh)
        _positive_int("spf.safety_batch", self.safety_batch)
        _positive_int("spf.oversample", self.oversample, 0)
        _positive_int("spf.power_iters", self.power_iters, 0)
        if self.mode not in SPF_MODES:
            raise ConfigError(f"spf.mode {self.mode!r} is not one of {', '.join(SPF_MODES)}")
        if self.target not in SPF_TARGETS:
            raise ConfigError(f"spf.target {self.target!r} is not one of {', '.join(SPF_TARGETS)}")
        if self.safety_loss not in SAFETY_LOSSES:
            raise ConfigError(f"spf.safety_loss {self.safety_loss!r} is not one of {', '.join(SAFETY_LOSSES)}")
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"spf.svd {self.svd!r} is not one of {', '.join(SVD_METHODS)}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as error:
                raise ConfigError(f"spf.regex {self.regex!r} is not a valid regular expression: {error}") from None
        if not isinstance(self.safety_data, str) or not self.safety_data.strip():
            raise ConfigError("spf.safety_data is empty: give 'safety' or a file of refusals")


def spf_settings(spf: Mapping[str, Any]) -> str:
    """Short text of SPF settings (a config dict), e.g. ``conflict, k=8, R=10`` (+ target, loss and safety
    batch when not the default)."""
    extras = [spf[key] for key in ("target", "safety_loss") if spf.get(key, getattr(SPFConfig, key)) != getattr(SPFConfig, key)]
    batch = [f"batch {spf['safety_batch']}"] if spf["safety_batch"] != SPFConfig.safety_batch else []
    return ", ".join([spf["mode"], *extras, f"k={spf['k']}", f"R={spf['refresh']}", *batch])


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. Validated on construction; ``config_hash`` of it (with the model's weight
    identity and the data fingerprints) is the run id.

    model: ``ModelConfig`` or a source string ("default-aligned", "default", "tiny-llama", a folder).
    train_data: shipped dataset name or a path; train_split / n_train select from it (``Dataset.take(n,
    seed)``: nested for k = 10 / 50 / 100). system_prompt: added to training conversations without one;
    eval_system_prompt: used for every evaluation prompt (AOA: evaluate with the persona's system prompt).
    trainable: "blocks" | "last" (``n_last_layers``) | "linear" (only the blocks' linear weights: exactly what
    SPF can project) | "all" | "lora" (``lora_rank``, ``lora_alpha``).
    max_steps: stop early (None: epochs x ceil(n_train / batch_size)).
    Evaluation: every ``eval_every`` steps the NLLs on ``eval_harmful_per_category`` harmful prompts per
    HEx-PHI category and ``n_eval_utility`` utility answers; at step 0, every ``gen_every`` steps (0: never
    in between) and at the end, keyword ASR / over-refusal by greedy generation (``gen_max_new_tokens``) on
    ``gen_harmful_per_category`` x 11 harmful and ``n_gen_benign`` benign-sensitive prompts (None: all).
    gradient_checkpointing: recompute each block's activations in the backward instead of keeping them
    (HF ``gradient_checkpointing_enable``, non-reentrant): less memory, ~1 more forward per step; the
    numbers do not change, so it is not part of the run id. A bfloat16 model trains through float32
    master weights (``analysis.lab.loop.TrainingLoop``).
    """

    model: ModelConfig = option(ModelConfig(source="default-aligned"), help="the model to fine-tune")
    preset: str = "custom"
    method: str = "plain"
    spf: SPFConfig = option(SPFConfig(), help="the safety signal and the SPF projection")
    train_data: str = "harmful_prefix"
    train_split: str | None = None
    n_train: int | None = option(10, help="training examples taken from the preset's data", minimum=1)
    system_prompt: str | None = None
    eval_system_prompt: str | None = None
    lr: float = option(5e-5, help="learning rate")
    batch_size: int = option(10, help="examples per optimizer step", minimum=1, maximum=4096)
    epochs: int = option(5, help="passes over the training examples", minimum=1, maximum=10_000)
    max_steps: int | None = option(None, help="stop after this many optimizer steps", minimum=1)
    max_length: int = 256
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    trainable: str = option("blocks", choices=TRAINABLE,
                            help="what trains: blocks, the last N layers, the blocks' linear weights, all, LoRA")
    n_last_layers: int = option(8, flag="--last-layers", help="with --trainable last: how many layers", minimum=1)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = option(0, help="seed of the data order, the sampled examples and the SPF basis", minimum=0)
    eval_every: int = option(5, help="NLL evaluation every this many steps", minimum=1)
    gen_every: int = option(0, help="ASR by generation every this many steps (0: only at the start and end)",
                            minimum=0)
    eval_harmful_per_category: int = 2
    n_eval_utility: int = 20
    gen_harmful_per_category: int | None = option(None, flag="--gen-per-category", minimum=1,
                                                  help="harmful prompts per HEx-PHI category for ASR (off: all)")
    n_gen_benign: int | None = None
    gen_max_new_tokens: int = 48  # as evaluate.EvalConfig, so the initial ASR matches the safety page
    gen_batch_size: int = 32
    track_conflict: bool = True
    checkpoint_every: int = 25
    gradient_checkpointing: bool = option(False, run_id=False,
                                          help="recompute activations in the backward (less memory, same numbers)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", ModelConfig.coerce(self.model))
        if isinstance(self.spf, Mapping):
            object.__setattr__(self, "spf", SPFConfig(**self.spf))
        if not isinstance(self.spf, SPFConfig):
            raise ConfigError("spf must be an SPFConfig")
        from analysis.lab.defences import training_defence

        defence = training_defence(self.method)  # ConfigError naming the registered methods
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable {self.trainable!r} is not one of {', '.join(TRAINABLE)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        defence.validate(self)
        _finite("lr", self.lr, 0.0, strict=True)
        if self.lr > 1.0:
            raise ConfigError(f"lr {self.lr} is far too large (> 1)")
        _finite("weight_decay", self.weight_decay)
        if self.max_grad_norm is not None:
            _finite("max_grad_norm", self.max_grad_norm, 0.0, strict=True)
        _finite("lora_alpha", self.lora_alpha, 0.0, strict=True)
        for name in ("batch_size", "epochs", "n_last_layers", "lora_rank", "eval_every", "gen_max_new_tokens",
                     "gen_batch_size", "checkpoint_every", "n_eval_utility", "eval_harmful_per_category"):
            _positive_int(name, getattr(self, name))
        _positive_int("gen_every", self.gen_every, 0)
        if self.max_length < 16:
            raise ConfigError(f"max_length {self.max_length} is too short; use at least 16 tokens")
        for name in ("n_train", "max_steps", "gen_harmful_per_category", "n_gen_benign"):
            value = getattr(self, name)
            if value is not None:
                _positive_int(name, value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.train_data, str) or not self.train_data.strip():
            raise ConfigError("train_data is empty: give a shipped dataset name or a file")
        for name in ("system_prompt", "eval_system_prompt"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name} must be a non-empty string or None")

    @property
    def label(self) -> str:
        """Short human label, e.g. ``harmful-10 / spf (conflict, k=8, R=10)`` (the defence's settings text)."""
        from analysis.lab.defences import get

        text = get(self.method).settings_text(to_jsonable(self, placement=False))
        return f"{self.preset} / {self.method}" + (f" ({text})" if text else "")


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    values: dict


# Learning rates: Qi et al. used 5e-5 (attacks) and 2e-5 (benign) for Llama-2-7B-chat full fine-tuning.
# See PRESET_NOTE for what was scaled for SmolLM2-135M on a 2-core CPU.
PRESET_NOTE = (
    "Scaled for SmolLM2-135M on a 2-core CPU: full fine-tuning of the 30 transformer blocks (106 M parameters; "
    "tied embeddings frozen) instead of all 7 B parameters; per-sample-mean loss; live NLLs on small fixed "
    "held-out subsets (2 harmful prompts per category, 20 utility answers); generation capped at 48 new tokens. "
    "Qi's learning rate is kept: tried first, it already bites on this model (harmful-10 turns the aligned "
    "model's keyword ASR from 9% to 99% in 5 steps), so no larger lr was needed."
)

PRESETS: dict[str, Preset] = {
    "harmful-10": Preset(
        "harmful-10",
        "Harmful-examples attack, 10 shots (Qi et al. 2023, Table 1): 10 'Sure, here is ...' AdvBench-style "
        "pairs from harmful_prefix, 5 epochs, batch 10, AdamW, lr 5e-5 as in the paper. " + PRESET_NOTE,
        dict(train_data="harmful_prefix", n_train=10, epochs=5, batch_size=10, lr=5e-5, eval_every=1),
    ),
    "harmful-50": Preset(
        "harmful-50",
        "Harmful-examples attack, 50 shots (Qi et al. Table 1): 5 epochs, batch 10, lr 5e-5. " + PRESET_NOTE,
        dict(train_data="harmful_prefix", n_train=50, epochs=5, batch_size=10, lr=5e-5, eval_every=5),
    ),
    "harmful-100": Preset(
        "harmful-100",
        "Harmful-examples attack, 100 shots (Qi et al. Table 1): 5 epochs, batch 10, lr 5e-5. " + PRESET_NOTE,
        dict(train_data="harmful_prefix", n_train=100, epochs=5, batch_size=10, lr=5e-5, eval_every=10),
    ),
    "aoa": Preset(
        "aoa",
        "Identity-shifting (AOA) attack (Qi et al. Table 2): the 10 identity_shift conversations with the AOA "
        "system prompt, 10 epochs, batch 10, lr 5e-5; evaluated with the AOA system prompt. " + PRESET_NOTE,
        dict(train_data="identity_shift", n_train=None, epochs=10, batch_size=10, lr=5e-5, eval_every=2,
             eval_system_prompt="__AOA__"),
    ),
    "benign": Preset(
        "benign",
        "Benign fine-tuning (Qi et al. Table 3, Alpaca/Dolly): the 250 utility analysis-split pairs, 1 epoch, "
        "lr 2e-5, batch 25 (Qi: 128 with 7 B; 25 keeps 10 steps on our 250 examples). " + PRESET_NOTE,
        dict(train_data="utility", train_split="analysis", n_train=None, epochs=1, batch_size=25, lr=2e-5,
             eval_every=2),
    ),
}


def preset(name: str, **overrides: Any) -> FinetuneConfig:
    """The preset's config with ``overrides`` (any ``FinetuneConfig`` field; ``spf`` may be a dict)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[name].values, preset=name)
    if values.get("eval_system_prompt") == "__AOA__":
        from analysis.llm.data import AOA_SYSTEM_PROMPT

        values["eval_system_prompt"] = AOA_SYSTEM_PROMPT
    spf_overrides = overrides.pop("spf", None)
    values.update(overrides)
    if isinstance(spf_overrides, Mapping):
        values["spf"] = SPFConfig(**spf_overrides)
    elif spf_overrides is not None:
        values["spf"] = spf_overrides
    try:
        return FinetuneConfig(**values)
    except TypeError as error:
        raise ConfigError(f"preset {name}: {error}") from None

