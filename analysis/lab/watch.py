"""Watch (and optionally protect) a Hugging Face ``Trainer`` / TRL run: :class:`SafetyGeometryCallback`.

One line in a training script, ``trainer.add_callback(SafetyGeometryCallback(tokenizer))``, records the
safety geometry of every update while the run trains, into a run folder the dashboard reads live
(:mod:`analysis.lab.watch_store`; page "Watch a training run").

What is measured (DESIGN.md notation), at ``on_pre_optimizer_step`` (after accumulation and clipping,
before ``optimizer.step()``) of optimizer steps 0, N, 2N, ... (``interval`` N; row ``step`` = the number
of updates already taken, so the row describes the weights theta_step and the update step + 1):

* Measured modules: every module of a registered linear layer type (``capture.LAYER_TYPES``) whose weight
  is trainable, without the output head. Full fine-tuning: the linear weights of the blocks. PEFT/LoRA:
  the adapter factors ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r), each its own matrix (the frozen
  base weights carry no gradient). Trainable parameters outside them (norms, biases, embeddings) are not
  measured; the manifest lists what is and how many parameters are not (``measured``).
* G_train (d_out, d_in): the module's ``weight.grad`` as the optimizer is about to use it (all micro-batches
  accumulated, clipped). G_safety = (1/n) sum_i G_i over a fixed safety batch of n refusals (shipped
  ``safety`` analysis split by default): one capture pass (``FactorCapture`` as in
  :func:`analysis.engine.capture.capture_batch`, per-sample response-token losses, no ``.grad`` written),
  G_safety = D^T A / n from the stacked factors.
  The capture runs in eval mode (dropout off) under a forked RNG, so the training run is bitwise unchanged.
* Safety subspace: U_k, V_k, the top-k singular vectors of G_safety, by the lab's SPF basis
  (``spf.top_k_basis``, ``svd="auto"``: exact when a side is <= 128, else the seeded randomized range finder
  with 2 power iterations; ``svd="exact"`` for exact bases at ~0.5 s per SmolLM2 matrix); directions with
  s_j <= ``spf.BASIS_RTOL`` s_1 are dropped, as SPF does.
* Per module and in total (all measured modules as one vector): ``cos`` = cos(G_train, G_safety);
  ``share`` = ||U_k^T G_train||_F^2 / ||G_train||_F^2, the share of the update's energy in the (left) safety
  subspace (= the squared fraction SPF's "orthogonal" mode removes; a random direction gives ~k/d_out);
  ``dloss`` = <G_safety, W_after - W_before>, the first-order change of the safety loss caused by the
  update actually taken (any optimizer; exact to first order, measured after the step);
  ``dloss_sgd`` = -lr <G_safety, G_train>, what a plain SGD step would cause (for Adam only an estimate
  of the direction of the effect, since Adam rescales coordinates); ``drift`` = the subspace overlap phi
  (mean cos^2 of the principal angles, ``geometry.subspace_overlap``) of U_k against the first recorded
  U_k (1: unchanged; random: ~k/d_out). ``safety_loss``: the mean refusal loss of the safety batch.
* Every ``eval_every`` steps, at step 0 and at the end: ``refusal_nll`` (mean response NLL of the refusals
  of ``n_eval`` held-out harmful prompts, the ``eval`` split) and ``refusal_rate`` (keyword refusal rate of
  greedy completions of the same prompts, ``safety.keywords.is_refusal``).

Acting (``mode``): "spf" projects every measured module's gradient against its safety basis (SPF modes
"conflict" / "orthogonal" / "same") and "pcgrad" the whole gradient against the whole safety gradient,
in place, before the optimizer steps, with the lab's implementation (:func:`apply_defence`, the one call
site); the basis (or PCGrad's reference gradient) is refreshed every ``refresh`` optimizer steps. Rows then
also hold the gradient after the projection (``cos_applied``, ``share_applied``) and the removed share.

Precision and placement: G_safety in float32 (float64 for a float64 model), every sum accumulated in float64,
on the module's device; bf16/fp16 models capture in their
dtype. fp16 with ``max_grad_norm = 0``: the gradients may still carry the loss scale at this hook (cosines
and shares are scale-free; dloss_sgd is not). DDP: with ``mode="watch"`` only rank 0 measures and writes;
with a defence every rank computes the same basis (same weights, same fixed batch) and projects its own
(already all-reduced) gradient; rank 0 writes. Tested: gradient accumulation, bf16 weights / autocast, LoRA, DDP
(gloo); fp16 and ``device_map`` models are handled as described but untested (no GPU here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from analysis.core.config import ConfigError, to_jsonable
from analysis.lab.config import SPF_MODES, SVD_METHODS
from analysis.lab.watch_geometry import (
    SafetyGradient,
    WatchedModule,
    apply_defence,
    capture_factors,
    measure,
    measured_statement,
    safety_gradients,
    watched_modules,
    weight_dot,
)
from analysis.lab.watch_store import MODULE_METRICS

#: "watch" (measure only) or a training defence of the registry that projects gradients (spf, pcgrad, ...)
WATCH = "watch"

__all__ = ["MODULE_METRICS", "WATCH", "SafetyGeometryCallback", "SafetyGradient", "WatchConfig", "WatchedModule",
           "apply_defence", "capture_factors", "load_conversations", "measure", "measured_statement",
           "safety_gradients", "watched_modules", "weight_dot"]


@dataclasses.dataclass(frozen=True)
class WatchConfig:
    """Settings of :class:`SafetyGeometryCallback` (validated; a bad value raises ``ConfigError``).

    interval: record every N optimizer steps (and step 0). eval_every: refusal NLL / keyword refusal rate
    every M steps (0: only at step 0 and at the end; None: never). k: safety-subspace size per module.
    mode: "watch" | "spf" | "pcgrad"; spf_mode: "conflict" | "orthogonal" | "same"; refresh: R, recompute
    the basis every R optimizer steps (defences only; the measurement always uses the current step's).
    safety_data / safety_split / safety_batch: the fixed safety batch (a shipped name or a file of
    refusals). eval_data / eval_split / n_eval / eval_max_new_tokens: the held-out harmful prompts.
    max_length: tokens per conversation. modules: regex on HF paths to restrict the measured modules.
    svd: how the top-k basis is computed (``lab.spf.top_k_basis``: "auto", "exact", "randomized", "lowrank").
    """

    interval: int = 10
    eval_every: int | None = 50
    k: int = 8
    mode: str = "watch"
    spf_mode: str = "conflict"
    refresh: int = 10
    safety_data: str = "safety"
    safety_split: str | None = "analysis"
    safety_batch: int = 4
    eval_data: str = "safety"
    eval_split: str | None = "eval"
    n_eval: int = 8
    eval_max_new_tokens: int = 32
    max_length: int = 256
    modules: str | None = None
    svd: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("interval", "k", "refresh", "safety_batch", "n_eval", "eval_max_new_tokens", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"watch.{name} must be an integer >= 1, got {value!r}")
        if self.eval_every is not None and (isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int)
                                            or self.eval_every < 0):
            raise ConfigError(f"watch.eval_every must be an integer >= 0 or None, got {self.eval_every!r}")
        if self.eval_every and self.eval_every % self.interval:
            raise ConfigError(f"watch.eval_every ({self.eval_every}) must be a multiple of watch.interval "
                              f"({self.interval}): evaluations run on recorded steps")
        if self.svd not in SVD_METHODS:
            raise ConfigError(f"watch.svd {self.svd!r} is not one of {', '.join(SVD_METHODS)}")
        if self.mode != WATCH:
            from analysis.lab.defences import training_defence, training_names

            if self.mode not in training_names():
                raise ConfigError(f"watch.mode {self.mode!r} is not 'watch' or a training defence: "
                                  f"{', '.join(training_names())}")
            if not training_defence(self.mode).needs.weight_gradients:
                raise ConfigError(f"watch.mode {self.mode!r} does not act on gradients: use 'watch' or a projecting "
                                  "defence such as 'spf' or 'pcgrad'")
        if self.spf_mode not in SPF_MODES:
            raise ConfigError(f"watch.spf_mode {self.spf_mode!r} is not one of {', '.join(SPF_MODES)}")
        if self.modules is not None:
            import re

            try:
                re.compile(self.modules)
            except re.error as error:
                raise ConfigError(f"watch.modules {self.modules!r} is not a valid regular expression: {error}") from None


# --------------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------------


def _tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def load_conversations(source: str | Sequence, split: str | None, n: int, seed: int, what: str) -> list[list[dict]]:
    """``n`` conversations (seeded ``take``) of a shipped dataset / file, or the given list of conversations."""
    from analysis.llm.data import DataError, load_any

    if not isinstance(source, str):
        conversations = [list(c) for c in source]
        if not conversations:
            raise ConfigError(f"{what}: the given list of conversations is empty")
        return conversations[:n]
    try:
        dataset = load_any(source)
        if split:
            dataset = dataset.split(split)
        dataset = dataset.take(min(n, len(dataset)), seed=seed)
    except DataError as error:
        raise ConfigError(f"{what}: {error}") from None
    return [list(ex.messages) for ex in dataset]


class SafetyGeometryCallback(TrainerCallback):
    """Measures (and with ``mode="spf"`` / ``"pcgrad"`` protects) a ``transformers.Trainer`` or TRL run; see the
    module docstring for every recorded quantity.

    ``tokenizer``: the model's tokenizer (default: the trainer's ``processing_class``). ``run_dir``: the run
    folder to write (default ``<cache>/watch/<output_dir name>-<time>``); the unfinished folder of a run whose
    process is gone is resumed (its rows and step-0 basis kept); a complete one, or one a live process still
    holds (e.g. a crashed ``train()`` earlier in the same notebook), raises ``WatchRunError``. ``safety`` / ``eval_conversations``: lists of conversations instead of the shipped sets.
    Other keyword arguments are :class:`WatchConfig` fields (or pass ``config``). ``run_dir`` is set once
    training has begun (``self.run_dir``)."""

    def __init__(self, tokenizer=None, run_dir: str | Path | None = None, config: WatchConfig | None = None,
                 safety: Sequence | None = None, eval_conversations: Sequence | None = None, **settings: Any):
        self.config = config if config is not None else WatchConfig(**settings)
        if config is not None and settings:
            self.config = dataclasses.replace(config, **settings)
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._safety_source = safety if safety is not None else self.config.safety_data
        self._eval_source = eval_conversations if eval_conversations is not None else self.config.eval_data
        self.modules: list[WatchedModule] = []
        self.writer = None
        self.rows: list[dict] = []  # every row written (rank 0), also kept in memory for tests and scripts
        self._batch = None
        self._eval: list[list[dict]] = []
        self._reference: dict[str, np.ndarray] | None = None
        self._defence: dict[str, SafetyGradient] | None = None  # the basis / reference gradient in use
        self._pending: dict | None = None
        self._before: dict[str, torch.Tensor] | None = None
        self._measured_safety: dict[str, SafetyGradient] | None = None
        self._last_eval_step: int | None = None

    # -- setup ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        from analysis.llm.formatting import tokenize_batch

        config = self.config
        self.tokenizer = self.tokenizer if self.tokenizer is not None else _tokenizer_of(processing_class)
        if self.tokenizer is None:
            raise ConfigError("SafetyGeometryCallback needs the tokenizer: pass it, or give the trainer a "
                              "processing_class")
        self.modules = watched_modules(model, config.modules)
        safety = load_conversations(self._safety_source, config.safety_split, config.safety_batch, config.seed,
                                    "safety batch")
        self._batch = tokenize_batch(self.tokenizer, safety, config.max_length)
        if config.eval_every is not None:
            self._eval = load_conversations(self._eval_source, config.eval_split, config.n_eval, config.seed,
                                            "held-out harmful prompts")
        if state.is_world_process_zero:
            self._open(args, model, safety)

    def _open(self, args, model, safety) -> None:
        import datetime as _dt

        from analysis.core.config import cache_dir
        from analysis.lab.watch_store import open_watch_run

        if self.run_dir is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = Path(str(getattr(args, "output_dir", None) or "run")).name or "run"
            self.run_dir = cache_dir() / "watch" / f"{name}-{stamp}"
        base = getattr(model, "get_base_model", lambda: model)()
        manifest = {
            "kind": "watch",
            "config": to_jsonable(self.config),
            "model": {"name": str(getattr(getattr(base, "config", None), "_name_or_path", "") or type(base).__name__),
                      "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
            "measured": measured_statement(model, self.modules),
            "modules": [m.describe() for m in self.modules],
            "safety_batch": {"source": self._safety_source if isinstance(self._safety_source, str) else "(given)",
                             "prompts": [c[-2]["content"] if len(c) > 1 else "" for c in safety]},
            "training": {key: _plain(getattr(args, key, None)) for key in (
                "learning_rate", "optim", "per_device_train_batch_size", "gradient_accumulation_steps",
                "max_grad_norm", "bf16", "fp16", "max_steps", "num_train_epochs", "world_size", "seed")},
        }
        self.writer = open_watch_run(self.run_dir, manifest)
        self._reference = self.writer.load_reference()

    # -- every optimizer step ----------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        config, step = self.config, state.global_step
        rank0 = state.is_world_process_zero
        measure_due = rank0 and step % config.interval == 0
        acting = config.mode != WATCH
        refresh_due = acting and (self._defence is None or step % config.refresh == 0)
        if not (measure_due or refresh_due):
            return self._act(control) if acting else None
        from analysis.lab.finetune_data import seeded

        safety_loss, safety = safety_gradients(model, self._batch, self.modules, config.k, config.svd,
                                               seeded(config.seed, "watch", step))
        if refresh_due:  # a basis-only defence (SPF) keeps only the bases; PCGrad needs the whole G_safety
            from analysis.lab.defences import training_defence

            basis_only = training_defence(config.mode).needs.safety_basis
            self._defence = safety if not basis_only else {
                name: dataclasses.replace(s, G=s.G.new_empty(0)) for name, s in safety.items()}
        if measure_due:
            lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")
            if self._reference is None:
                self._reference = {name: s.U_host for name, s in safety.items()}
                self.writer.save_reference(self._reference)
            totals, per = measure(self.modules, safety, lr, self._reference)
            row = {"step": step, "epoch": state.epoch, "lr": lr, "safety_loss": safety_loss, **totals,
                   "refreshed": bool(refresh_due), "modules": per}
            if self._eval_due(step):
                row.update(self._evaluate(model))
                self._last_eval_step = step
            self._pending, self._measured_safety = row, safety
            with torch.no_grad():
                self._before = {m.name: m.weight.detach().clone() for m in self.modules}
        if acting:
            self._act(control)
        return None

    def _act(self, control):
        grads = {m.name: m.grad_view(m.weight.grad) for m in self.modules if m.weight.grad is not None}
        metrics = apply_defence(self.config.mode, self.config.spf_mode, grads, self._defence)
        if self._pending is not None:
            totals, _ = measure(self.modules, self._measured_safety, self._pending["lr"])
            self._pending.update({"cos_applied": totals["cos"], "share_applied": totals["share"], **metrics})
        return None

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._pending is None:
            return
        row, self._pending = self._pending, None
        dots = weight_dot(self.modules, self._measured_safety, self._before)
        row["modules"]["dloss"] = dots
        row["dloss"] = float(sum(dots))
        self._before = self._measured_safety = None
        self._write(row)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or self.writer is None:
            return
        try:
            step = state.global_step
            if self.config.eval_every is not None and self._last_eval_step != step:
                self._write({"step": step, "epoch": state.epoch, "final": True, **self._evaluate(model)})
            self.writer.finish(self.rows)
        finally:
            self.writer.close()

    # -- evaluation and writing ----------------------------------------------------------------------
    def _eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return every is not None and (step == 0 or (every > 0 and step % every == 0))

    def _evaluate(self, model) -> dict[str, float]:
        """Refusal NLL and keyword refusal rate on the held-out harmful prompts (no grad, RNG forked)."""
        from analysis.safety.generation import generate
        from analysis.safety.keywords import is_refusal
        from analysis.safety.nll import response_nll

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            nll = response_nll(model, self.tokenizer, self._eval, self.config.max_length)
            completions = generate(model, self.tokenizer, [c[:-1] for c in self._eval],
                                   self.config.eval_max_new_tokens)
        refused = [is_refusal(text) for text in completions]
        return {"refusal_nll": float(np.mean(nll)), "refusal_rate": float(np.mean(refused)), "n_eval": len(refused)}

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            self.writer.write_row(row)


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
