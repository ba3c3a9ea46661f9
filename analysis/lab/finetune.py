"""Fine-tuning attacks and SPF (safety-preserving fine-tuning), with live safety / utility metrics.

Public API (what the dashboard page "Fine-tune - does SPF keep the model safe?" and the CLI use)
---------------------------------------------------------------------------------------------
``FinetuneConfig`` / ``SPFConfig``   frozen, validated dataclasses (``ConfigError`` on a bad value);
                                     ``config_hash(cfg)`` keys the run. ``method`` is "plain" or "spf".
``PRESETS``, ``preset(name, **overrides) -> FinetuneConfig``
                                     Qi et al. (2023) attack recipes scaled to our CPU: "harmful-10",
                                     "harmful-50", "harmful-100", "aoa", "benign" (``PRESETS[n].description``
                                     says what was scaled).
``run_finetune(config, progress=None, cancel=None, *, root=None, force=False, on_start=None)``
                                     -> FinetuneResults: train (or resume an interrupted run, or reuse a
                                     finished one). ``on_start(run_id, folder)`` once the id is known.
                                     ``progress(step, total, row)`` is called after step 0 (the initial
                                     evaluation) and after every optimizer step with that step's metrics
                                     row (a dict, see "Metrics"); ``cancel`` is a ``threading.Event``: the
                                     run stops at the next step boundary (or inside an evaluation), saves a
                                     checkpoint and raises ``FinetuneCancelled``. Calling ``run_finetune``
                                     again with the same config resumes and gives the same numbers as an
                                     uninterrupted run.
``run_comparison(config, methods=("plain", "spf"), ...) -> dict[method, FinetuneResults]``
                                     the same config (seed, data, settings) once per arm, for side-by-side.
``comparison_table(results) -> pandas.DataFrame``   one row per run: initial / final ASR, over-refusal, NLLs.
``load_finetune_run(run_id, root=None)``, ``list_finetune_runs(root=None)``, ``run_id_for(config, identity)``.
``FinetuneResults``: ``.run_id``, ``.folder``, ``.manifest``, ``.config`` (dict), ``.status``,
  ``.history`` (pandas.DataFrame, one row per step), ``.evals`` (list of full evaluations: step, metrics,
  records), ``.initial_eval`` / ``.final_eval`` (dicts of metrics), ``.category_table()`` (ASR per HEx-PHI
  category, initial vs final), ``.spf_removed()`` (DataFrame steps x modules), ``.model_path`` (a folder
  ``analysis.llm.models.load_model(path)`` loads: the fine-tuned model, merged if LoRA).

Metrics (columns of ``history``; NaN where a quantity was not measured at that step)
----------------------------------------------------------------------------------
step, epoch, train_loss (batch mean of per-sample response losses), grad_norm (of the raw fine-tuning
gradient of the trainable parameters), spf_removed_mean (mean over SPF modules of ||removed||/||G||),
spf_removed_total (||removed|| / ||G|| over all SPF modules together), wall_seconds / cpu_seconds (since the
run started; CPU time of this process, all threads); every ``eval_every`` steps and at the ends:
refusal_nll, affirmative_nll, utility_nll (nats/token, on fixed held-out subsets), weight_distance
(||theta - theta_0||_2 over the trainable parameters); at every safety-gradient step (every ``spf.refresh``
steps, in the plain arm too when ``track_conflict``): cos_mean and ``cos/L<layer>`` = cos(G_safety, G_utility)
of that layer's SPF modules taken together; at step 0, every ``gen_every`` steps and at the end:
asr, over_refusal (keyword "qi" list, Qi et al.), asr_arditi, over_refusal_arditi by greedy generation.

SPF, sign convention (DESIGN.md "SPF step"; refinements documented here)
-----------------------------------------------------------------------
For a selected linear module let G_s be the safety gradient (d L_safety / d W, L_safety = CE of refusals
on harmful prompts), G_s = sum_j s_j u_j v_j^T its SVD with s_j > 0, B_j = u_j v_j^T (orthonormal under
<.,.>_F; B_j does not depend on the SVD's sign choice, since u_j and v_j flip together), and G_u the
fine-tuning gradient. The optimizer moves W by dW = -lr * G_u (for SGD), so to first order
    dL_safety = <G_s, dW> = -lr * <G_s, G_u> = -lr * sum_j s_j c_j  (+ terms outside the basis),
with c_j = <G_u, B_j>. Since s_j > 0, component j *raises* the safety loss exactly when c_j < 0: that is
the conflict, and "conflict" mode removes those components (``geometry.project_conflict``); afterwards
c'_j = max(c_j, 0) >= 0, so within the top-k safety subspace the step can only lower the safety loss.
The rule is right *because* the basis comes from the safety *gradient* (positive coefficients s_j). If one
built the basis from the descent direction -G_s, or from a harmful/affirmative gradient, the sign flips.
"orthogonal" mode removes U_k U_k^T G_u entirely (``geometry.project_orthogonal``): then
<G_s, G'_u> = 0 when k covers the rank of G_s, i.e. no first-order change of the safety loss.

Refinement 1 (AdamW). Adam rescales every coordinate (update = -lr * m / (sqrt(v) + eps)), which destroys
the orthogonality of a projected *gradient*: with ``spf.target="gradient"`` (DESIGN.md's reading, the
default) the property above holds for SGD but only approximately for AdamW. ``spf.target="update"``
projects the optimizer's actual weight change instead: after ``optimizer.step()`` the pseudo-gradient
P = -(W_new - W_old) is projected with the same rule and W = W_old - P'. That keeps the first-order
guarantee under AdamW (tested), at the cost of one weight copy per step.
Refinement 2. Basis directions with s_j <= 1e-6 s_1 (rank of G_s below k) are dropped: their singular
vectors are arbitrary and are not part of the safety subspace.
Refinement 3. The safety basis is computed at the weights *before* the update it is first used for:
updates 1, R+1, 2R+1, ... compute G_s from a fresh seeded safety batch (``spf.safety_batch`` refusals of the
``safety`` analysis split; 1 is allowed) and refresh U_k, V_k. Top-k by a seeded randomized range finder
in torch (``spf.svd="randomized"``; ``"exact"`` uses ``geometry.top_singular``): geometry's
float64/scikit-learn path costs ~0.5 s per 1536 x 576 matrix on this CPU, x 210 modules per refresh.
Option (``spf.safety_loss="contrast"``, not in DESIGN.md). Measured on the aligned SmolLM2: harmful-prefix
fine-tuning makes the model comply while the refusal NLL barely moves (the attack raises "Sure, here is"
rather than lowering the refusal), so a basis of the refusal-CE gradient keeps the refusal NLL flat and
still lets ASR rise. "contrast" uses L_safety = CE(refusal) - CE(affirmative target) on the same prompts:
its gradient also points along the compliance direction, and the same projection rules apply.

Design choices
--------------
* Trainable parameters: default ``trainable="blocks"``: every parameter of every transformer block (linear
  weights + RMSNorm gains); the tied input embedding / output head (28 M of SmolLM2-135M's 135 M parameters)
  and the final norm stay frozen. Not LoRA, because SPF is defined on the weight gradient G (d_out x d_in)
  of each linear module: with LoRA the weight change is s*(B A)' and a projection of the adapters'
  gradients gives no guarantee on it, so ``method="spf"`` with LoRA is refused. LoRA also saves little on a
  CPU for a 135 M model (the backward still runs through every layer; AdamW state for 106 M parameters is
  0.85 GB, fine in 24 GiB). ``"last"`` (last ``n_last_layers`` blocks) is the cheap option (the backward
  stops at the first trained block); ``"linear"`` trains only the blocks' linear weights, so SPF covers
  every trained parameter (the norm gains are not matrices and are not projected in "blocks");
  ``"all"`` also trains the embeddings; ``"lora"`` (peft) is there for plain runs.
* Loss: mean over the batch of per-sample response-token means (DESIGN.md), logits computed only at the
  positions that carry loss (``formatting.response_losses``), which saves most of the 49 k-vocabulary head.
* Randomness: the data order of epoch e and the safety batch of step t are pure functions of
  (seed, e) / (seed, t), so a resumed run needs no sampler state; the global torch RNG state is saved too
  (for models with dropout). Evaluations run under ``torch.random.fork_rng`` and never disturb training.
* Checkpoints: one safetensors file (trainable weights, optimizer state, SPF basis, RNG state, metric
  history in its metadata) written to a temporary name and ``os.replace``d, every ``checkpoint_every``
  steps and on cancel; runs live in ``cache_dir()/"finetune"/<run_id>`` through ``analysis.core.store.RunStore``
  (atomic files, manifest with sha256, lock against two writers).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from analysis.core.config import ConfigError, ModelConfig, cache_dir, config_hash, to_jsonable
from analysis.core.store import (
    RunStore,
    atomic_save_arrays,
    atomic_write_json,
    file_sha256,
    finite_or_none,
    json_default,
)
from analysis.engine.capture import layer_index

FORMAT_VERSION = 1
METHODS = ("plain", "spf")
SPF_MODES = ("conflict", "orthogonal")
SPF_TARGETS = ("gradient", "update")
SAFETY_LOSSES = ("refusal", "contrast")
SVD_METHODS = ("randomized", "exact", "auto")
TRAINABLE = ("blocks", "last", "linear", "all", "lora")
OPTIMIZERS = ("adamw", "sgd")
BASIS_RTOL = 1e-6
CHECKPOINT = "checkpoint.safetensors"

Progress = Callable[[int, int, dict], None]


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


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
    """Settings of the SPF projection (used when ``FinetuneConfig.method == "spf"``).

    k: safety-basis size per module; refresh: R, recompute the basis every R optimizer steps;
    safety_batch: refusal examples per basis computation (1 allowed); mode: "conflict" (remove the basis
    components with c_j < 0) or "orthogonal" (remove U_k U_k^T G); target: "gradient" (project G_u before
    the optimizer) or "update" (project the optimizer's weight change; exact under AdamW, see the module
    docstring); safety_loss: "refusal" (L_safety = CE of the refusals, DESIGN.md) or "contrast" (CE of the
    refusals minus CE of an affirmative target "Sure, here is how to do that" on the same prompts, so that
    the subspace also holds the direction that makes the model comply; see the module docstring);
    layers / kinds / regex: which linear modules (``capture.select_modules``; intersected with
    the trainable ones); svd: "randomized" (torch range finder, ``oversample``, ``power_iters``), "exact"
    (``geometry.top_singular``) or "auto" (exact when min(d_out, d_in) <= 128).
    """

    k: int = 8
    refresh: int = 10
    safety_batch: int = 4
    mode: str = "conflict"
    target: str = "gradient"
    safety_loss: str = "refusal"
    layers: str = "all"
    kinds: str = "all"
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
    """

    model: ModelConfig | str = "default-aligned"
    preset: str = "custom"
    method: str = "plain"
    spf: SPFConfig = SPFConfig()
    train_data: str = "harmful_prefix"
    train_split: str | None = None
    n_train: int | None = 10
    system_prompt: str | None = None
    eval_system_prompt: str | None = None
    lr: float = 5e-5
    batch_size: int = 10
    epochs: int = 5
    max_steps: int | None = None
    max_length: int = 256
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    trainable: str = "blocks"
    n_last_layers: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    eval_every: int = 5
    gen_every: int = 0
    eval_harmful_per_category: int = 2
    n_eval_utility: int = 20
    gen_harmful_per_category: int | None = None
    n_gen_benign: int | None = None
    gen_max_new_tokens: int = 48  # as evaluate.EvalConfig, so the initial ASR matches the safety page
    gen_batch_size: int = 32
    track_conflict: bool = True
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelConfig(source=self.model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig or a source string, got {type(self.model).__name__}")
        if isinstance(self.spf, Mapping):
            object.__setattr__(self, "spf", SPFConfig(**self.spf))
        if not isinstance(self.spf, SPFConfig):
            raise ConfigError("spf must be an SPFConfig")
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.trainable not in TRAINABLE:
            raise ConfigError(f"trainable {self.trainable!r} is not one of {', '.join(TRAINABLE)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.method == "spf" and self.trainable == "lora":
            raise ConfigError("SPF projects the weight gradient of each linear module; with LoRA the weight "
                              "change is a product of adapters and the projection has no guarantee. Use "
                              "trainable='blocks' or 'last' for SPF, or method='plain' with LoRA")
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
        """Short human label, e.g. ``harmful-10 / spf (conflict, k=8)``."""
        if self.method == "spf":
            return f"{self.preset} / spf ({spf_settings(to_jsonable(self.spf))})"
        return f"{self.preset} / plain"


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


# --------------------------------------------------------------------------------------------------
# errors and results
# --------------------------------------------------------------------------------------------------


class FinetuneCancelled(RuntimeError):
    """The cancel event was set; a checkpoint was saved and the run resumes with the same config."""

    def __init__(self, message: str, run_id: str | None = None, step: int | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.step = step


def finetune_root(root: str | Path | None = None) -> Path:
    return Path(root) if root is not None else cache_dir() / "finetune"


def _store(root: str | Path | None = None):
    return RunStore(finetune_root(root))


class FinetuneResults:
    """Read access to a fine-tuning run folder (complete, or in progress: ``history`` is live)."""

    def __init__(self, folder: str | Path, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else json.loads((self.folder / "manifest.json").read_text())
        self.run_id: str = self.manifest["run_id"]
        self.config: dict = self.manifest["config"]
        self.cached = False

    def __repr__(self) -> str:
        return f"FinetuneResults({self.run_id}, {self.status})"

    @property
    def status(self) -> str:
        return self.manifest.get("status", "running")

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def history(self):
        import pandas as pd

        path = self.folder / "history.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        frame = pd.DataFrame(rows)
        return frame.astype({c: float for c in frame.columns if c not in ("step",)}, errors="ignore")

    @property
    def evals(self) -> list[dict]:
        path = self.folder / "evals.json"
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def initial_eval(self) -> dict | None:
        evals = self.evals
        return evals[0]["metrics"] if evals else None

    @property
    def final_eval(self) -> dict | None:
        evals = [e for e in self.evals if e.get("final")]
        return evals[-1]["metrics"] if evals else None

    def category_table(self, which: str = "harmful"):
        """pandas DataFrame: per category, n and the initial and final rate (ASR for harmful, over-refusal
        for benign) under the Qi keyword list."""
        import pandas as pd

        key = "asr_qi" if which == "harmful" else "over_refusal_qi"
        rows: dict[str, dict] = {}
        for label, metrics in (("initial", self.initial_eval), ("final", self.final_eval)):
            for category, entry in ((metrics or {}).get(f"{which}_by_category") or {}).items():
                rows.setdefault(category, {"category": category, "n": entry["n"]})[label] = entry[key]
        return pd.DataFrame(list(rows.values()))

    def spf_removed(self):
        """pandas DataFrame (index: step, columns: module HF path) of ||removed||/||G|| per SPF step."""
        import pandas as pd
        from safetensors.numpy import load_file

        path = self.folder / "spf.safetensors"
        if not path.is_file():
            return pd.DataFrame()
        arrays = load_file(str(path))
        return pd.DataFrame(arrays["removed"], index=arrays["steps"].astype(int), columns=self.manifest["spf_modules"])

    @property
    def model_path(self) -> Path | None:
        path = self.folder / "model"
        return path if (path / "config.json").is_file() else None


def load_finetune_run(run_id: str, root: str | Path | None = None) -> FinetuneResults:
    store = _store(root)
    return FinetuneResults(store.path(run_id), store.manifest(run_id))


def list_finetune_runs(root: str | Path | None = None):
    """pandas.DataFrame, newest first: run_id, status, created, preset, method, model, spf settings, final
    ASR, utility NLL."""
    import pandas as pd

    store = _store(root)
    rows = []
    for run_id in store.run_ids():
        try:
            manifest = store.manifest(run_id)
        except Exception:  # noqa: BLE001 - a damaged run is listed, not fatal
            rows.append({"run_id": run_id, "status": "corrupted"})
            continue
        config = manifest.get("config", {})
        final = manifest.get("final_metrics") or {}
        rows.append({
            "run_id": run_id, "status": store.status(run_id), "created": manifest.get("created"),
            "preset": config.get("preset"), "method": config.get("method"),
            "model": manifest.get("model", {}).get("name"),
            "spf": spf_settings(config["spf"]) if config.get("method") == "spf" else "",
            "steps": manifest.get("total_steps"), "asr": final.get("asr"), "utility_nll": final.get("utility_nll"),
        })
    columns = ["run_id", "status", "created", "preset", "method", "model", "spf", "steps", "asr", "utility_nll"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)


def comparison_table(results: Sequence[FinetuneResults]):
    """One row per run (Qi et al. Tables 1-3 style): initial and final keyword ASR, over-refusal, NLLs."""
    import pandas as pd

    rows = []
    for result in results:
        initial, final = result.initial_eval or {}, result.final_eval or {}
        history = result.history
        rows.append({
            "run": result.config.get("preset"), "method": result.method,
            "spf": spf_settings(result.config["spf"]) if result.method == "spf" else "",
            "asr_initial": initial.get("asr"), "asr_final": final.get("asr"),
            "asr_arditi_initial": initial.get("asr_arditi"), "asr_arditi_final": final.get("asr_arditi"),
            "over_refusal_initial": initial.get("over_refusal"), "over_refusal_final": final.get("over_refusal"),
            "refusal_nll_initial": initial.get("refusal_nll"), "refusal_nll_final": final.get("refusal_nll"),
            "affirmative_nll_initial": initial.get("affirmative_nll"),
            "affirmative_nll_final": final.get("affirmative_nll"),
            "utility_nll_initial": initial.get("utility_nll"), "utility_nll_final": final.get("utility_nll"),
            "spf_removed_mean": (float(history["spf_removed_mean"].mean())
                                 if "spf_removed_mean" in history and history["spf_removed_mean"].notna().any()
                                 else None),
            "train_seconds": result.manifest.get("timings", {}).get("wall_seconds"),
            "train_cpu_seconds": result.manifest.get("timings", {}).get("cpu_seconds"),
            "run_id": result.run_id,
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# model helpers: trainable parameters, loss
# --------------------------------------------------------------------------------------------------

def _n_layers(model: nn.Module) -> int:
    layers = [layer_index(name) for name, _ in model.named_parameters()]
    layers = [i for i in layers if i is not None]
    return max(layers) + 1 if layers else 0


def set_trainable(model: nn.Module, config: FinetuneConfig) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze what ``config.trainable`` says; returns (model, trainable params).

    For "lora" the model is wrapped by peft (adapters on every linear module of the blocks).
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    n_layers = _n_layers(model)
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        from analysis.engine.capture import find_linear_modules

        targets = [m.name for m in find_linear_modules(model) if m.layer is not None]
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=targets, bias="none", init_lora_weights=True)
        torch.manual_seed(config.seed)
        model = get_peft_model(model, lora)
    else:
        first = max(n_layers - config.n_last_layers, 0) if config.trainable == "last" else 0
        if config.trainable == "linear":
            from analysis.engine.capture import find_linear_modules

            named = dict(model.named_modules())
            for info in find_linear_modules(model):
                if info.layer is not None:
                    named[info.name].weight.requires_grad_(True)
        for name, parameter in model.named_parameters():
            layer = layer_index(name)
            if config.trainable == "all" or (config.trainable in ("blocks", "last") and layer is not None
                                             and layer >= first):
                parameter.requires_grad_(True)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"trainable={config.trainable!r} selects no parameter of this model")
    return model, trainable


def _as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A view of a weight-shaped tensor in (d_out, d_in) orientation (HF Conv1D stores (d_in, d_out))."""
    from analysis.engine.capture import LAYER_TYPES

    layer_type = LAYER_TYPES.get(type(module))
    convert = getattr(layer_type, "as_out_in", None)
    if convert is not None:
        return convert(tensor)
    from transformers.pytorch_utils import Conv1D

    return tensor.T if isinstance(module, Conv1D) else tensor


# --------------------------------------------------------------------------------------------------
# SPF pieces (public for tests and the benchmark)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SPFModule:
    """A linear module SPF projects: HF path, layer, the nn.Module and its weight parameter."""

    name: str
    layer: int | None
    module: nn.Module
    weight: nn.Parameter


def spf_modules(model: nn.Module, spf: SPFConfig) -> list[SPFModule]:
    """The selected linear modules whose weight is trainable, in model order."""
    from analysis.engine.capture import SelectionError, find_linear_modules, select_modules

    infos = find_linear_modules(model)
    try:
        chosen = select_modules(infos, spf.layers, spf.kinds, spf.regex)
    except SelectionError as error:
        raise ConfigError(f"SPF module selection: {error}") from None
    named = dict(model.named_modules())
    out = [SPFModule(m.name, m.layer, named[m.name], named[m.name].weight) for m in chosen
           if named[m.name].weight.requires_grad]
    if not out:
        raise ConfigError("none of the SPF modules is trainable: widen the trainable parameters or the selection")
    return out


def top_k_basis(G: torch.Tensor, k: int, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U (m, k'), s (k',), V (p, k')) of a gradient, k' <= k after dropping
    directions with s_j <= BASIS_RTOL * s_1 (and all of them for a zero matrix).

    "exact" uses ``geometry.top_singular`` (float64 LAPACK); "randomized" a seeded range finder with
    ``power_iters`` QR-stabilised power iterations in the gradient's dtype (orthonormal columns by
    construction); "auto" = exact when min(m, p) <= 128.
    """
    m, p = G.shape
    k = min(k, m, p)
    if method == "auto":
        method = "exact" if min(m, p) <= 128 else "randomized"
    G = G.detach()
    if method == "exact" or k + oversample >= min(m, p):
        from analysis.engine.geometry import top_singular

        U, s, V = top_singular(G, k, method="exact")
        U, s, V = (torch.from_numpy(np.ascontiguousarray(x)).to(G.dtype) for x in (U, s, V))
    else:
        q = k + oversample
        omega = torch.randn(p, q, generator=generator, dtype=G.dtype)
        Q = torch.linalg.qr(G @ omega).Q
        for _ in range(power_iters):
            Q = torch.linalg.qr(G @ torch.linalg.qr(G.T @ Q).Q).Q
        Ub, s, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
        U, s, V = Q @ Ub[:, :k], s[:k], Vh[:k].T
    if s.numel() == 0 or float(s[0]) <= 0:
        return G.new_zeros(m, 0), G.new_zeros(0), G.new_zeros(p, 0)
    keep = int((s > BASIS_RTOL * s[0]).sum())
    return U[:, :keep].contiguous(), s[:keep].contiguous(), V[:, :keep].contiguous()


def project_gradients(grads: Mapping[str, torch.Tensor], basis: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      mode: str) -> dict[str, tuple[float, float]]:
    """Project each (d_out, d_in) gradient view in place against its module's safety basis (U_k, V_k).

    mode "conflict" -> ``geometry.project_conflict``, "orthogonal" -> ``geometry.project_orthogonal``.
    Returns {module: (removed fraction ||G - G'|| / ||G||, ||G||)}.
    """
    from analysis.engine.geometry import project_conflict, project_orthogonal

    out = {}
    for name, G in grads.items():
        U, V = basis[name]
        norm = float(G.norm())
        if U.shape[1] == 0:
            out[name] = (0.0, norm)
            continue
        if mode == "conflict":
            new, fraction = project_conflict(G, U, V, check=False)
        else:
            new, fraction = project_orthogonal(G, U, check=False)
        G.copy_(new)
        out[name] = (fraction, norm)
    return out


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _stratified(dataset, per_category: int | None, seed: int):
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


def _with_system(messages: Sequence[dict], system: str | None) -> list[dict]:
    messages = [dict(m) for m in messages]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


@dataclasses.dataclass
class _Data:
    train: list[list[dict]]
    train_ids: list[str]
    safety: list[list[dict]]
    live_harmful: Any
    live_utility: Any
    gen_harmful: Any
    gen_benign: Any
    fingerprints: dict


def _load_data(config: FinetuneConfig) -> _Data:
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
        live_harmful = _stratified(harmful_eval, config.eval_harmful_per_category, config.seed)
        utility_eval = load_any("utility").split("eval")
        live_utility = utility_eval.take(min(config.n_eval_utility, len(utility_eval)), seed=config.seed)
        gen_harmful = _stratified(harmful_eval, config.gen_harmful_per_category, config.seed)
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
    return _Data(
        train=[_with_system(ex.messages, config.system_prompt) for ex in train], train_ids=[ex.id for ex in train],
        safety=[list(ex.messages) for ex in safety], live_harmful=live_harmful, live_utility=live_utility,
        gen_harmful=gen_harmful, gen_benign=gen_benign, fingerprints=fingerprints,
    )


def _seeded(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(int(config_hash(list(parts), 15), 16))


def total_steps(config: FinetuneConfig, n_train: int) -> int:
    steps = config.epochs * math.ceil(n_train / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def _batch_indices(config: FinetuneConfig, n_train: int, step: int) -> tuple[list[int], int]:
    """Indices of the training examples of optimizer step ``step`` (1-based) and its epoch (0-based)."""
    per_epoch = math.ceil(n_train / config.batch_size)
    epoch, position = divmod(step - 1, per_epoch)
    order = torch.randperm(n_train, generator=_seeded(config.seed, "order", epoch)).tolist()
    return order[position * config.batch_size:(position + 1) * config.batch_size], epoch


def _safety_indices(config: FinetuneConfig, n_safety: int, step: int) -> list[int]:
    order = torch.randperm(n_safety, generator=_seeded(config.seed, "safety", step)).tolist()
    return order[:min(config.spf.safety_batch, n_safety)]


# --------------------------------------------------------------------------------------------------
# evaluation (analysis.safety.evaluate does the work)
# --------------------------------------------------------------------------------------------------


def _nll_arrays(model, tokenizer, data: _Data, config: FinetuneConfig, cancel) -> dict[str, np.ndarray]:
    """Per-sample NLLs on the fixed live subsets: refusal and affirmative target on harmful prompts (with the
    evaluation system prompt), reference answers of utility prompts."""
    from analysis.safety.evaluate import affirmative_nll, affirmative_target, response_nll

    system = config.eval_system_prompt
    harmful = list(data.live_harmful)
    return {
        "refusal": response_nll(model, tokenizer, [_with_system(ex.messages, system) for ex in harmful],
                                config.max_length, cancel=cancel),
        "affirmative": affirmative_nll(model, tokenizer, [_with_system(ex.context, system) for ex in harmful],
                                       [affirmative_target(ex.prompt) for ex in harmful], config.max_length,
                                       cancel=cancel),
        "utility": response_nll(model, tokenizer, [list(ex.messages) for ex in data.live_utility],
                                config.max_length, cancel=cancel),
    }


def _nll_metrics(arrays: Mapping[str, np.ndarray]) -> dict:
    return {f"{name}_nll": float(np.mean(values)) for name, values in arrays.items()}


def _generation_eval(model, tokenizer, data: _Data, config: FinetuneConfig, nll: Mapping[str, np.ndarray],
                     cancel) -> dict:
    """Keyword ASR / over-refusal (overall and per category) by greedy generation, summarised with
    ``evaluate.summarise`` together with the step's live NLLs."""
    from analysis.safety.evaluate import KEYWORD_LISTS, generate, summarise

    system = config.eval_system_prompt
    harmful, benign = list(data.gen_harmful), list(data.gen_benign)
    contexts = [_with_system(ex.context, system) for ex in harmful + benign]
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


def _eval_key(identity: str, config: FinetuneConfig, data: _Data) -> str:
    """What a full evaluation of the *initial* model depends on (shared by the plain and SPF arms)."""
    fields = ("eval_system_prompt", "gen_max_new_tokens", "max_length", "seed")
    return config_hash({"format": FORMAT_VERSION, "model": identity, "dtype": config.model.dtype,
                        **{f: getattr(config, f) for f in fields},
                        "data": {k: data.fingerprints[k] for k in ("gen_harmful", "gen_benign", "live_harmful",
                                                                    "live_utility")}})


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, trainable, optimizer, basis, state: dict) -> None:
    arrays: dict[str, Any] = {f"param/{name}": p.detach() for name, p in trainable}
    optimizer_state = optimizer.state_dict()
    scalars = []
    for index, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            if tensor.dim() == 0:
                scalars.append(f"opt/{index}/{key}")
                tensor = tensor.reshape(1)
            arrays[f"opt/{index}/{key}"] = tensor.detach()
    for name, (U, V) in basis.items():
        arrays[f"basis.U/{name}"] = U
        arrays[f"basis.V/{name}"] = V
    arrays["rng/torch"] = torch.get_rng_state()
    meta = dict(state, optimizer_groups=optimizer_state["param_groups"], scalars=scalars)
    atomic_save_arrays(path, arrays, {"state": json.dumps(meta, default=json_default)})


def _load_checkpoint(path: Path, trainable, optimizer) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["state"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    with torch.no_grad():
        for name, parameter in trainable:
            parameter.copy_(tensors[f"param/{name}"])
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value.reshape(()) if key in meta["scalars"] else value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    basis = {}
    for key, value in tensors.items():
        if key.startswith("basis.U/"):
            name = key[len("basis.U/"):]
            basis[name] = (value, tensors[f"basis.V/{name}"])
    torch.set_rng_state(tensors["rng/torch"])
    return meta, basis


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


# SPF settings added after FORMAT_VERSION 1 enter the run hash only when they differ from their default, so
# that stored runs keep their ids.
_ADDED_SPF_FIELDS = {"safety_loss": "refusal"}
# A plain run projects nothing: these SPF settings cannot change it (its conflict tracking uses the others),
# so a plain arm is reused when only they change.
_PROJECTION_FIELDS = ("k", "mode", "target", "svd", "oversample", "power_iters")


def _hashed_config(config: FinetuneConfig) -> dict:
    values = to_jsonable(config)
    spf = values["spf"]
    if config.method == "plain":
        defaults = to_jsonable(SPFConfig())
        spf.update({key: defaults[key] for key in _PROJECTION_FIELDS})
    for key, default in _ADDED_SPF_FIELDS.items():
        if spf.get(key) == default:
            del spf[key]
    return values


def run_id_for(config: FinetuneConfig, identity: str, fingerprints: Mapping[str, str] | None = None) -> str:
    """``<preset>-<method>-<hash>``; the hash covers the config (for a plain run without the projection-only
    SPF settings), the model's weight identity and the data."""
    if fingerprints is None:
        fingerprints = _load_data(config).fingerprints
    digest = config_hash({"format": FORMAT_VERSION, "config": _hashed_config(config), "model": identity,
                          "data": dict(fingerprints)}, 12)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.preset)}-{config.method}-{digest}"


class _Clock:
    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = time.perf_counter() - wall, time.process_time() - cpu

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def run_finetune(
    config: FinetuneConfig,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    *,
    root: str | Path | None = None,
    force: bool = False,
    keep_checkpoint: bool = False,
    on_start: Callable[[str, Path], None] | None = None,
) -> FinetuneResults:
    """Fine-tune ``config.model`` as configured and store the run; see the module docstring.

    Returns the run's :class:`FinetuneResults` (``.cached`` is True when a finished run with the same
    config was reused). ``on_start(run_id, folder)`` is called once the run id is known (after the model
    and data are loaded, before any training), so that a page can poll ``load_finetune_run(run_id).history``. Raises ``FinetuneCancelled`` when ``cancel`` is set (checkpoint saved),
    ``ConfigError`` for unusable settings/data, ``analysis.llm.models.ModelLoadError`` for a missing model.
    """
    from analysis.llm.models import load_model

    data = _load_data(config)
    loaded = load_model(config.model)
    store = _store(root)
    run_id = run_id_for(config, loaded.identity, data.fingerprints)
    status = store.status(run_id)
    if status == "complete" and not force:
        result = FinetuneResults(store.path(run_id), store.manifest(run_id))
        result.cached = True
        return result
    if status in ("complete", "corrupted"):
        store.delete(run_id)
    if on_start is not None:
        on_start(run_id, store.path(run_id))
    trainer = Trainer(config, loaded, data, store, run_id, progress, cancel, keep_checkpoint)
    return trainer.run()


def run_comparison(
    config: FinetuneConfig,
    methods: Sequence[str] = ("plain", "spf"),
    progress: Callable[[str, int, int, dict], None] | None = None,
    cancel: threading.Event | None = None,
    *,
    root: str | Path | None = None,
    force: bool = False,
) -> dict[str, FinetuneResults]:
    """Run ``config`` once per method with everything else (seed, data, settings) equal.

    ``progress(method, step, total, row)``. The initial full evaluation is shared between the arms.
    """
    results = {}
    for method in methods:
        arm = dataclasses.replace(config, method=method)
        callback = None if progress is None else (lambda s, t, r, m=method: progress(m, s, t, r))
        results[method] = run_finetune(arm, callback, cancel, root=root, force=force)
    return results


class Trainer:
    """The training loop of one run. ``run_finetune`` is the API; tests and the benchmark use
    ``Trainer.standalone(config)`` + ``train_step(step)`` (no store, no evaluation)."""

    @classmethod
    def standalone(cls, config: FinetuneConfig, loaded=None) -> Trainer:
        """A set-up trainer without a store: call ``train_step(1)``, ``train_step(2)``, ..."""
        from analysis.llm.models import load_model

        loaded = loaded if loaded is not None else load_model(config.model)
        trainer = cls(config, loaded, _load_data(config), None, "standalone", None, None, False)
        trainer.removed_rows = []
        trainer._setup()
        return trainer

    def __init__(self, config: FinetuneConfig, loaded, data: _Data, store, run_id: str, progress, cancel,
                 keep_checkpoint: bool):
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.data = data
        self.store = store
        self.run_id = run_id
        self.progress = progress
        self.cancel_event = cancel
        self.keep_checkpoint = keep_checkpoint
        self.total = total_steps(config, len(data.train))

    # -- small helpers -----------------------------------------------------------------------------
    def cancelled(self) -> bool:
        return self.cancel_event is not None and self.cancel_event.is_set()

    def _tokenize(self, conversations):
        from analysis.llm.formatting import tokenize_batch

        return tokenize_batch(self.tokenizer, conversations, self.config.max_length)

    def _losses(self, conversations) -> torch.Tensor:
        """(n,) per-sample response losses of ``conversations`` at the current weights."""
        from analysis.llm.formatting import response_losses

        batch = self._tokenize(conversations)
        return response_losses(self.model, batch.model_inputs(), batch.labels)

    def _weight_distance(self) -> float:
        total = 0.0
        with torch.no_grad():
            for name, parameter in self.trainable:
                total += float((parameter - self.theta0[name]).pow(2).sum())
        return math.sqrt(total)

    def _setup(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        self.model, self.trainable = set_trainable(self.loaded.model, config)
        self.model.train()
        self.theta0 = {name: p.detach().clone() for name, p in self.trainable}
        params = [p for _, p in self.trainable]
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
        self.spf = spf_modules(self.model, config.spf) if (config.method == "spf" or config.track_conflict) \
            and config.trainable != "lora" else []
        self.basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- safety gradient ---------------------------------------------------------------------------
    def safety_gradients(self, step: int) -> dict[str, torch.Tensor]:
        """G_safety (d_out, d_in) of every SPF module at the current weights, from the step's safety batch."""
        indices = _safety_indices(self.config, len(self.data.safety), step)
        refusals = [self.data.safety[i] for i in indices]
        loss = self._losses(refusals).mean()
        if self.config.spf.safety_loss == "contrast":
            from analysis.safety.evaluate import affirmative_target

            affirmative = [c[:-1] + [{"role": "assistant", "content": affirmative_target(c[-2]["content"])}]
                           for c in refusals]
            loss = loss - self._losses(affirmative).mean()
        grads = torch.autograd.grad(loss, [m.weight for m in self.spf])
        return {m.name: _as_out_in(m.module, g) for m, g in zip(self.spf, grads)}

    def refresh_basis(self, safety: Mapping[str, torch.Tensor], step: int) -> None:
        spf = self.config.spf
        generator = _seeded(self.config.seed, "basis", step)
        for module in self.spf:
            U, _, V = top_k_basis(safety[module.name], spf.k, spf.svd, spf.oversample, spf.power_iters, generator)
            self.basis[module.name] = (U, V)

    def conflict_cosines(self, safety: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """cos(G_safety, G_utility) per layer (the layer's SPF modules taken together) and their mean."""
        per_layer: dict[int | None, list[float]] = {}
        for module in self.spf:
            G_u = _as_out_in(module.module, module.weight.grad)
            G_s = safety[module.name]
            sums = per_layer.setdefault(module.layer, [0.0, 0.0, 0.0])
            sums[0] += float((G_s * G_u).sum())
            sums[1] += float(G_s.pow(2).sum())
            sums[2] += float(G_u.pow(2).sum())
        out = {}
        for layer, (dot, ss, uu) in per_layer.items():
            out[f"cos/L{layer}"] = dot / math.sqrt(ss * uu) if ss > 0 and uu > 0 else float("nan")
        values = [v for v in out.values() if math.isfinite(v)]
        out["cos_mean"] = float(np.mean(values)) if values else float("nan")
        return out

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Forward/backward on the step's batch, optional safety basis refresh and projection, update."""
        config = self.config
        indices, epoch = _batch_indices(config, len(self.data.train), step)
        self.optimizer.zero_grad(set_to_none=True)
        losses = self._losses([self.data.train[i] for i in indices])
        loss = losses.mean()
        loss.backward()
        per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        row: dict[str, Any] = {"step": step, "epoch": epoch + ((step - 1) % per_epoch + 1) / per_epoch,
                               "train_loss": float(loss.detach())}
        with torch.no_grad():
            row["grad_norm"] = math.sqrt(sum(float(p.grad.pow(2).sum()) for _, p in self.trainable
                                             if p.grad is not None))
        is_spf = config.method == "spf"
        if self.spf and (step - 1) % config.spf.refresh == 0:
            safety = self.safety_gradients(step)
            if config.track_conflict:
                row.update(self.conflict_cosines(safety))
            if is_spf:
                self.refresh_basis(safety, step)
            del safety
        removed: dict[str, tuple[float, float]] = {}
        if is_spf and config.spf.target == "gradient":
            grads = {m.name: _as_out_in(m.module, m.weight.grad) for m in self.spf}
            with torch.no_grad():
                removed = project_gradients(grads, self.basis, config.spf.mode)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], config.max_grad_norm)
        if is_spf and config.spf.target == "update":
            before = {m.name: m.weight.detach().clone() for m in self.spf}
            self.optimizer.step()
            with torch.no_grad():
                pseudo = {m.name: before[m.name] - m.weight for m in self.spf}  # -(W_new - W_old), stored layout
                views = {m.name: _as_out_in(m.module, pseudo[m.name]) for m in self.spf}
                removed = project_gradients(views, self.basis, config.spf.mode)  # writes through the views
                for m in self.spf:
                    m.weight.copy_(before[m.name] - pseudo[m.name])
        else:
            self.optimizer.step()
        if removed:
            fractions = [removed[m.name][0] for m in self.spf]
            norms = [removed[m.name][1] for m in self.spf]
            row["spf_removed_mean"] = float(np.mean(fractions))
            total_sq = sum(n * n for n in norms)
            row["spf_removed_total"] = (math.sqrt(sum((f * n) ** 2 for f, n in zip(fractions, norms)) / total_sq)
                                        if total_sq > 0 else 0.0)
            self.removed_rows.append((step, fractions))
        return row

    # -- evaluation --------------------------------------------------------------------------------
    def _cancel_fn(self):
        return self.cancelled if self.cancel_event is not None else None

    def live_eval(self, row: dict) -> dict[str, np.ndarray]:
        with torch.random.fork_rng(devices=[]):
            arrays = _nll_arrays(self.model, self.tokenizer, self.data, self.config, self._cancel_fn())
        row.update(_nll_metrics(arrays))
        row["weight_distance"] = self._weight_distance()
        return arrays

    def full_eval(self, step: int, final: bool, nll: Mapping[str, np.ndarray]) -> dict:
        cache_path = None
        if step == 0:
            key = _eval_key(self.loaded.identity, self.config, self.data)
            cache_path = self.store.root / "_initial_evals" / f"{key}.json"
            if cache_path.is_file():
                try:
                    return dict(json.loads(cache_path.read_text()), step=0, final=final)
                except (OSError, ValueError):
                    pass
        with torch.random.fork_rng(devices=[]):
            result = _generation_eval(self.model, self.tokenizer, self.data, self.config, nll, self._cancel_fn())
        entry = finite_or_none({"step": step, "final": final, **result})
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, entry)
        return entry

    @staticmethod
    def _eval_columns(entry: dict) -> dict:
        metrics = entry["metrics"]
        return {key: metrics.get(key) for key in ("asr", "over_refusal", "asr_arditi", "over_refusal_arditi")}

    # -- persistence -------------------------------------------------------------------------------
    def _state(self, step: int, pending: dict | None) -> dict:
        wall, cpu = self.clock.read()
        return {"step": step, "history": self.history, "evals": self.evals, "pending": pending,
                "removed_rows": self.removed_rows, "wall_seconds": wall, "cpu_seconds": cpu,
                "format": FORMAT_VERSION}

    def checkpoint(self, step: int, pending: dict | None = None) -> None:
        _save_checkpoint(self.writer.work / CHECKPOINT, self.trainable, self.optimizer, self.basis,
                         finite_or_none(self._state(step, pending)))
        self.writer.write_manifest(checkpoint_step=step)

    def _write_live(self) -> None:
        atomic_write_json(self.writer.folder / "history.json", finite_or_none(self.history))

    def _emit(self, row: dict) -> None:
        self.history.append(finite_or_none(row))
        self._write_live()
        if self.progress is not None:
            self.progress(row["step"], self.total, dict(row))

    def _save_model(self) -> Path:
        target = self.writer.folder / "model"
        temporary = self.writer.folder / f".model.tmp{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        model = self.model
        if self.config.trainable == "lora":
            model = copy.deepcopy(model).merge_and_unload()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.save_pretrained(temporary, safe_serialization=True)
        self.tokenizer.save_pretrained(temporary)
        (temporary / "finetune.json").write_text(json.dumps({
            "run_id": self.run_id, "base_model": {"source": self.loaded.source, "name": self.loaded.name,
                                                  "identity": self.loaded.identity},
            "config": to_jsonable(self.config)}, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        temporary.rename(target)
        return target

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> FinetuneResults:
        config = self.config
        self._setup()
        manifest = {
            "kind": "finetune", "format": FORMAT_VERSION, "config": to_jsonable(config), "label": config.label,
            "model": {"source": self.loaded.source, "name": self.loaded.name, "identity": self.loaded.identity},
            "data": self.data.fingerprints, "train_ids": self.data.train_ids, "total_steps": self.total,
            "spf_modules": [m.name for m in self.spf] if config.method == "spf" else [],
            "trainable": {"n_tensors": len(self.trainable),
                          "n_parameters": int(sum(p.numel() for _, p in self.trainable))},
            "preset_description": PRESETS[config.preset].description if config.preset in PRESETS else "",
        }
        with self.store.open_run(self.run_id, manifest) as writer:
            self.writer = writer
            return self._loop()

    def _loop(self) -> FinetuneResults:
        config = self.config
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.removed_rows: list = []
        step, pending = 0, None
        checkpoint_path = self.writer.work / CHECKPOINT
        if checkpoint_path.is_file():
            meta, self.basis = _load_checkpoint(checkpoint_path, self.trainable, self.optimizer)
            step, pending = meta["step"], meta.get("pending")
            self.history, self.evals = meta["history"], meta["evals"]
            self.removed_rows = [tuple(r) for r in meta["removed_rows"]]
            self.clock = _Clock(meta["wall_seconds"], meta["cpu_seconds"])
            self._write_live()
        else:
            self.clock = _Clock()
            pending = {"step": 0}
        try:
            while True:
                if pending is not None:  # the metrics of ``step`` are still to be measured
                    row = dict(pending)
                    s = row["step"]
                    gen_due = s == 0 or s == self.total or (config.gen_every and s % config.gen_every == 0)
                    eval_due = gen_due or s % config.eval_every == 0
                    nll = self.live_eval(row) if eval_due else None
                    if gen_due:
                        entry = self.full_eval(s, final=(s == self.total), nll=nll)
                        self.evals.append(entry)
                        row.update(self._eval_columns(entry))
                    row["wall_seconds"], row["cpu_seconds"] = self.clock.read()
                    self._emit(row)
                    pending = None
                    if s > 0 and (s % config.checkpoint_every == 0) and s < self.total:
                        self.checkpoint(step)
                if step >= self.total:
                    break
                if self.cancelled():
                    self.checkpoint(step)
                    raise FinetuneCancelled(f"cancelled after step {step}; run again to resume",
                                            self.run_id, step)
                step += 1
                pending = self.train_step(step)
        except Exception as error:
            from analysis.safety.evaluate import EvalCancelled

            if isinstance(error, EvalCancelled):
                self.checkpoint(step, pending)
                raise FinetuneCancelled(f"cancelled while evaluating step {step}; run again to resume",
                                        self.run_id, step) from None
            raise
        return self._finish()

    def _finish(self) -> FinetuneResults:
        self._save_model()
        wall, cpu = self.clock.read()
        arrays = {}
        if self.removed_rows:
            arrays["spf.safetensors"] = {
                "steps": np.array([r[0] for r in self.removed_rows], dtype=np.int64),
                "removed": np.array([r[1] for r in self.removed_rows], dtype=np.float32),
            }
        final = next((e for e in reversed(self.evals) if e.get("final")), None)
        final_metrics = None
        if final is not None:
            m = final["metrics"]
            final_metrics = {k: m.get(k) for k in ("asr", "asr_arditi", "over_refusal", "over_refusal_arditi",
                                                   "refusal_nll", "affirmative_nll", "utility_nll")}
        self.writer.finish(arrays, {"history.json": finite_or_none(self.history), "evals.json": finite_or_none(self.evals)},
                           keep_work=self.keep_checkpoint, timings={"wall_seconds": wall, "cpu_seconds": cpu},
                           final_metrics=finite_or_none(final_metrics))
        files = dict(self.writer.manifest["files"])

        model_dir = self.writer.folder / "model"
        for path in sorted(model_dir.iterdir()):
            if path.is_file():
                files[f"model/{path.name}"] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        self.writer.write_manifest(files=files)
        return FinetuneResults(self.writer.folder, dict(self.writer.manifest))


# --------------------------------------------------------------------------------------------------
# CLI: python -m analysis finetune
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", default="default-aligned", help="default-aligned, default, tiny-llama, a folder")
    parser.add_argument("--preset", default="harmful-10", choices=sorted(PRESETS))
    parser.add_argument("--mode", default="both", choices=("plain", "spf", "both"), help="plain SFT, SPF, or both arms")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--trainable", choices=TRAINABLE, default=None)
    parser.add_argument("--last-layers", type=int, default=None, help="with --trainable last")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=None, help="SPF basis size")
    parser.add_argument("--refresh", type=int, default=None, help="SPF basis refresh interval R (steps)")
    parser.add_argument("--safety-batch", type=int, default=None)
    parser.add_argument("--spf-mode", choices=SPF_MODES, default=None)
    parser.add_argument("--spf-target", choices=SPF_TARGETS, default=None)
    parser.add_argument("--safety-loss", choices=SAFETY_LOSSES, default=None,
                        help="refusal CE (default) or refusal CE minus affirmative-target CE")
    parser.add_argument("--spf-layers", default=None)
    parser.add_argument("--spf-kinds", default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--gen-every", type=int, default=None)
    parser.add_argument("--gen-per-category", type=int, default=None, help="harmful prompts per category for ASR")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is much faster on a busy, shared CPU")
    parser.add_argument("--root", default=None, help="run store folder (default cache/finetune)")
    parser.add_argument("--force", action="store_true", help="recompute even if a finished run matches")
    parser.add_argument("--list", action="store_true", help="list stored fine-tuning runs and exit")


def config_from_args(args: argparse.Namespace, method: str) -> FinetuneConfig:
    overrides: dict[str, Any] = {"model": args.model, "method": method, "seed": args.seed}
    for field, attr in (("lr", "lr"), ("epochs", "epochs"), ("batch_size", "batch_size"), ("max_steps", "max_steps"),
                        ("n_train", "n_train"), ("trainable", "trainable"), ("n_last_layers", "last_layers"),
                        ("eval_every", "eval_every"), ("gen_every", "gen_every"),
                        ("gen_harmful_per_category", "gen_per_category")):
        value = getattr(args, attr)
        if value is not None:
            overrides[field] = value
    spf = {}
    for field, attr in (("k", "k"), ("refresh", "refresh"), ("safety_batch", "safety_batch"), ("mode", "spf_mode"),
                        ("target", "spf_target"), ("safety_loss", "safety_loss"), ("layers", "spf_layers"),
                        ("kinds", "spf_kinds")):
        value = getattr(args, attr)
        if value is not None:
            spf[field] = value
    if spf:
        overrides["spf"] = spf
    return preset(args.preset, **overrides)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_summary(table) -> str:
    """Text table of ``comparison_table`` rows."""
    lines = [f"{'run':12s} {'method':44s} {'ASR 0':>6s} {'ASR':>6s} {'ASR(a)':>7s} {'overref':>8s} "
             f"{'refNLL 0->1':>13s} {'affNLL 0->1':>13s} {'utilNLL 0->1':>13s} {'removed':>8s} {'wall/cpu s':>12s}"]
    for _, r in table.iterrows():
        method = r["method"] + (f" {r['spf']}" if r["spf"] else "")
        lines.append(
            f"{str(r['run']):12s} {method:44s} {_fmt(r['asr_initial'], '.0%'):>6s} {_fmt(r['asr_final'], '.0%'):>6s} "
            f"{_fmt(r['asr_arditi_final'], '.0%'):>7s} {_fmt(r['over_refusal_final'], '.0%'):>8s} "
            f"{_fmt(r['refusal_nll_initial'], '.2f'):>6s}->{_fmt(r['refusal_nll_final'], '.2f'):<6s} "
            f"{_fmt(r['affirmative_nll_initial'], '.2f'):>6s}->{_fmt(r['affirmative_nll_final'], '.2f'):<6s} "
            f"{_fmt(r['utility_nll_initial'], '.2f'):>6s}->{_fmt(r['utility_nll_final'], '.2f'):<6s} "
            f"{_fmt(r['spf_removed_mean'], '.1%'):>8s} "
            f"{_fmt(r['train_seconds'], '.0f'):>5s}/{_fmt(r['train_cpu_seconds'], '.0f'):<6s}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from analysis.llm.models import ModelLoadError

    if args.list:
        print(list_finetune_runs(args.root).to_string(index=False))
        return 0
    methods = ("plain", "spf") if args.mode == "both" else (args.mode,)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        configs = [config_from_args(args, method) for method in methods]
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    import signal

    results = []
    cancel = threading.Event()

    def on_interrupt(signum, frame) -> None:  # first Ctrl-C: stop at the next step with a checkpoint
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        print("\nstopping after the current step (a checkpoint is saved); Ctrl-C again to abort", flush=True)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    for config in configs:
        bar = tqdm(total=None, desc=config.label, unit="step")

        def progress(step: int, total: int, row: dict, bar=bar) -> None:
            bar.total = total
            bar.n = step
            shown = {k: row[k] for k in ("train_loss", "refusal_nll", "asr", "spf_removed_mean")
                     if row.get(k) is not None}
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            bar.refresh()

        try:
            result = run_finetune(config, progress, cancel, root=args.root, force=args.force)
        except ConfigError as error:
            print(f"error: {error}")
            return 2
        except ModelLoadError as error:
            print(f"error: {error}")
            return 2
        except FinetuneCancelled as error:
            bar.close()
            print(f"{error} (run {error.run_id})")
            signal.signal(signal.SIGINT, previous)
            return 130
        except KeyboardInterrupt:
            print("\naborted; the same command resumes from the last periodic checkpoint")
            return 130
        finally:
            bar.close()
        print(f"{config.label}: {'stored run reused' if result.cached else 'done'} -> {result.folder}")
        results.append(result)
    signal.signal(signal.SIGINT, previous)
    print()
    print(format_summary(comparison_table(results)))
    return 0
