"""Fine-tuning attacks and SPF (safety-preserving fine-tuning), with live safety / utility metrics.

Layout of the fine-tuning lab
-----------------------------
:mod:`analysis.lab.config`         ``FinetuneConfig``, ``SPFConfig``, the Qi et al. presets (``PRESETS``, ``preset``).
:mod:`analysis.lab.spf`            the SPF projector: safety basis, projections (sign convention documented there).
:mod:`analysis.lab.loop`           the one training loop (optimizer, clipping, warm-up, checkpoints, cancel),
                                   shared with alignment (:mod:`analysis.lab.align`).
:mod:`analysis.lab.finetune_data`  training / safety / held-out data, seeded batch order, evaluations.
:mod:`analysis.lab.results`        reading runs (``FinetuneResults``), listing them, comparison tables.
this module                        the task (``FinetuneTask``, ``python -m analysis finetune``), a run
                                   (``run_finetune``) and its trainer (``FinetuneTrainer``).

``FinetuneTask(config, compare=False)``: kind "finetune"; ``compare=True`` runs the plain and the SPF arm of
the same config (one job). ``run_id()`` is cheap (no model load); ``execute(ctx)`` trains on ``ctx.device``,
reports ``ctx.report(fraction, message, live={"rows": {method: [history rows]}})``, stops at the next step
boundary (or inside an evaluation) when ``ctx`` is cancelled: a checkpoint is saved, ``FinetuneCancelled``
(an ``analysis.core.tasks.Cancelled``) is raised, and running the same task again resumes with the same
numbers as an uninterrupted run. ``run_finetune(config, ctx, root=..., model=...)`` runs one arm.

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

Design choices
--------------
* Trainable parameters: default ``trainable="blocks"``: every parameter of every transformer block (linear
  weights + RMSNorm gains); the tied input embedding / output head (28 M of SmolLM2-135M's 135 M parameters)
  and the final norm stay frozen. Not LoRA, because SPF is defined on the weight gradient G (d_out x d_in)
  of each linear module: with LoRA the weight change is s*(B A)' and a projection of the adapters'
  gradients gives no guarantee on it, so ``method="spf"`` with LoRA is refused. ``"last"`` (last
  ``n_last_layers`` blocks) is the cheap option (the backward stops at the first trained block);
  ``"linear"`` trains only the blocks' linear weights, so SPF covers every trained parameter; ``"all"`` also
  trains the embeddings; ``"lora"`` (peft) is there for plain runs.
* Loss: mean over the batch of per-sample response-token means (DESIGN.md), logits computed only at the
  positions that carry loss (``formatting.response_losses``).
* Randomness: the data order of epoch e and the safety batch of step t are pure functions of
  (seed, e) / (seed, t), so a resumed run needs no sampler state; the global torch RNG state is saved too
  (for models with dropout). Evaluations run under ``torch.random.fork_rng`` and never disturb training.
* Checkpoints: :class:`analysis.lab.loop.TrainingLoop` checkpoints (trainable weights, optimizer state, SPF
  basis, RNG state, metric history), every ``checkpoint_every`` steps and on cancel; runs live in
  ``cache_dir()/"finetune"/<run_id>`` through ``analysis.core.store.RunStore``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from analysis.core.config import ConfigError, config_hash, to_jsonable
from analysis.core.store import atomic_write_json, file_sha256, finite_or_none
from analysis.core.tasks import TaskContext
from analysis.engine.capture import layer_index
from analysis.lab.config import (
    METHODS,
    PRESETS,
    SAFETY_LOSSES,
    SPF_MODES,
    SPF_TARGETS,
    TRAINABLE,
    FinetuneConfig,
    SPFConfig,
    preset,
)
from analysis.lab.finetune_data import (
    FORMAT_VERSION,
    FinetuneData,
    batch_indices,
    eval_key,
    generation_eval,
    load_data,
    nll_arrays,
    nll_metrics,
    safety_indices,
    seeded,
    total_steps,
)
from analysis.lab.loop import Clock, TrainingCancelled, TrainingLoop, save_model
from analysis.lab.results import (
    FinetuneResults,
    comparison_table,
    finetune_root,
    finetune_store,
    format_summary,
    list_finetune_runs,
    load_finetune_run,
)
from analysis.lab.spf import SPFProjector, spf_modules

CHECKPOINT = "checkpoint.safetensors"

# what pages and the CLI use from here (defined in the lab's other modules)
__all__ = ["CHECKPOINT", "METHODS", "PRESETS", "SAFETY_LOSSES", "SPF_MODES", "SPF_TARGETS", "TRAINABLE",
           "FinetuneCancelled", "FinetuneConfig", "FinetuneResults", "FinetuneTask", "FinetuneTrainer",
           "SPFConfig", "comparison_table", "finetune_root", "list_finetune_runs", "load_finetune_run", "preset",
           "run_finetune", "run_id_for", "set_trainable"]


class FinetuneCancelled(TrainingCancelled):
    """A fine-tuning run was cancelled; a checkpoint was saved and the run resumes with the same config."""


# --------------------------------------------------------------------------------------------------
# run id
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


def run_id_for(config: FinetuneConfig, identity: str | None = None,
               fingerprints: Mapping[str, str] | None = None) -> str:
    """``<preset>-<method>-<hash>``; the hash covers the config (for a plain run without the projection-only
    SPF settings), the model's weight identity (default: ``models.model_identity``, no weights loaded) and
    the data fingerprints (default: loaded from ``config``)."""
    if identity is None:
        from analysis.llm.models import model_identity

        identity = model_identity(config.model)
    if fingerprints is None:
        fingerprints = load_data(config).fingerprints
    digest = config_hash({"format": FORMAT_VERSION, "config": _hashed_config(config), "model": identity,
                          "data": dict(fingerprints)}, 12)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.preset)}-{config.method}-{digest}"


# --------------------------------------------------------------------------------------------------
# trainable parameters
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


# --------------------------------------------------------------------------------------------------
# the trainer: one fine-tuning step and the measurements between steps
# --------------------------------------------------------------------------------------------------


class FinetuneTrainer:
    """Model, optimizer loop and SPF projector of one fine-tuning run, set up on construction.

    ``train_step(step)`` trains optimizer step ``step`` (1-based) and returns its metrics row;
    ``measure(row)`` adds the live NLLs / generation evaluation due after it. Tests and the benchmark use the
    trainer alone (``FinetuneTrainer.create(config)``); :func:`run_finetune` adds the run store.
    """

    def __init__(self, config: FinetuneConfig, loaded, data: FinetuneData, device: str = "cpu",
                 cancelled: Callable[[], bool] | None = None):
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.data = data
        self.device = torch.device(device)
        self.cancelled = cancelled
        self.total = total_steps(config, len(data.train))
        torch.manual_seed(config.seed)
        self.model, self.trainable = set_trainable(loaded.model.to(self.device), config)
        self.model.train()
        self.theta0 = {name: p.detach().clone() for name, p in self.trainable}
        self.loop = TrainingLoop(self.trainable, self.total, optimizer=config.optimizer, lr=config.lr,
                                 weight_decay=config.weight_decay, grad_clip=config.max_grad_norm)
        modules = (spf_modules(self.model, config.spf) if (config.method == "spf" or config.track_conflict)
                   and config.trainable != "lora" else [])
        self.projector = SPFProjector(modules, config.spf, config.seed, project=config.method == "spf")
        self.evals: list[dict] = []
        self.eval_cache: Path | None = None  # folder of the shared initial evaluations (None: not cached)

    @classmethod
    def create(cls, config: FinetuneConfig, loaded=None, device: str = "cpu") -> FinetuneTrainer:
        """A trainer without a store (loads the model and data): call ``train_step(1)``, ``train_step(2)``, ..."""
        from analysis.llm.models import load_model

        loaded = loaded if loaded is not None else load_model(config.model)
        return cls(config, loaded, load_data(config), device)

    # -- losses ------------------------------------------------------------------------------------
    def tokenize(self, conversations):
        from analysis.llm.formatting import tokenize_batch

        return tokenize_batch(self.tokenizer, conversations, self.config.max_length)

    def losses(self, conversations) -> torch.Tensor:
        """(n,) per-sample response losses of ``conversations`` at the current weights."""
        from analysis.llm.formatting import response_losses

        batch = self.tokenize(conversations)
        inputs = {key: value.to(self.device) for key, value in batch.model_inputs().items()}
        return response_losses(self.model, inputs, batch.labels.to(self.device))

    def safety_gradients(self, step: int) -> dict[str, torch.Tensor]:
        """G_safety (d_out, d_in) of every SPF module at the current weights, from the step's safety batch."""
        indices = safety_indices(self.config, len(self.data.safety), step)
        refusals = [self.data.safety[i] for i in indices]
        loss = self.losses(refusals).mean()
        if self.config.spf.safety_loss == "contrast":
            from analysis.safety.evaluate import affirmative_target

            affirmative = [c[:-1] + [{"role": "assistant", "content": affirmative_target(c[-2]["content"])}]
                           for c in refusals]
            loss = loss - self.losses(affirmative).mean()
        return self.projector.safety_gradients(loss)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Forward/backward on the step's batch, optional safety basis refresh and projection, update."""
        config, projector = self.config, self.projector
        indices, epoch = batch_indices(config, len(self.data.train), step)
        loss = self.losses([self.data.train[i] for i in indices]).mean()
        self.loop.backward(loss)
        per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        row: dict[str, Any] = {"step": step, "epoch": epoch + ((step - 1) % per_epoch + 1) / per_epoch,
                               "train_loss": float(loss.detach()), "grad_norm": self.loop.grad_norm()}
        if projector.refresh_due(step):
            safety = self.safety_gradients(step)
            if config.track_conflict:
                row.update(projector.conflict_cosines(safety))
            if projector.project:
                projector.refresh_basis(safety, step, seeded(config.seed, "basis", step))
            del safety
        removed: dict[str, tuple[float, float]] = {}
        if projector.project and config.spf.target == "gradient":
            removed = projector.project_gradients()
        if projector.project and config.spf.target == "update":
            removed = self.loop.update(projector.projected_step)
        else:
            self.loop.update()
        if removed:
            row.update(projector.removed_metrics(step, removed))
        return row

    # -- measurements ------------------------------------------------------------------------------
    def weight_distance(self) -> float:
        total = 0.0
        with torch.no_grad():
            for name, parameter in self.trainable:
                total += float((parameter - self.theta0[name]).pow(2).sum())
        return math.sqrt(total)

    def measure(self, row: dict) -> dict:
        """Add the metrics due after ``row["step"]``: live NLLs every ``eval_every`` steps, a generation
        evaluation (appended to ``evals``) at step 0, every ``gen_every`` steps and at the end."""
        config, step = self.config, row["step"]
        gen_due = step == 0 or step == self.total or (config.gen_every and step % config.gen_every == 0)
        nll = None
        if gen_due or step % config.eval_every == 0:
            with torch.random.fork_rng(devices=[]):
                nll = nll_arrays(self.model, self.tokenizer, self.data, config, self.cancelled)
            row.update(nll_metrics(nll))
            row["weight_distance"] = self.weight_distance()
        if gen_due:
            entry = self.full_eval(step, step == self.total, nll)
            self.evals.append(entry)
            metrics = entry["metrics"]
            row.update({key: metrics.get(key) for key in ("asr", "over_refusal", "asr_arditi", "over_refusal_arditi")})
        return row

    def full_eval(self, step: int, final: bool, nll: Mapping[str, np.ndarray]) -> dict:
        """Generation evaluation; the initial model's is shared between runs through ``eval_cache``."""
        cache_path = None
        if step == 0 and self.eval_cache is not None:
            cache_path = self.eval_cache / f"{eval_key(self.loaded.identity, self.config, self.data)}.json"
            if cache_path.is_file():
                try:
                    return dict(json.loads(cache_path.read_text()), step=0, final=final)
                except (OSError, ValueError):
                    pass
        with torch.random.fork_rng(devices=[]):
            result = generation_eval(self.model, self.tokenizer, self.data, self.config, nll, self.cancelled)
        entry = finite_or_none({"step": step, "final": final, **result})
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, entry)
        return entry


# --------------------------------------------------------------------------------------------------
# a stored run
# --------------------------------------------------------------------------------------------------

# progress of one arm: (step, total steps, the history so far)
ArmProgress = Callable[[int, int, list], None]


def run_finetune(config: FinetuneConfig, ctx: TaskContext | None = None, *, root: str | Path | None = None,
                 force: bool = False, keep_checkpoint: bool = False, model=None,
                 on_start: Callable[[str, Path], None] | None = None,
                 progress: ArmProgress | None = None) -> FinetuneResults:
    """Fine-tune ``config.model`` on ``ctx.device`` and store the run (or resume it, or reuse a finished one).

    ``model``: an already loaded ``LoadedModel`` to train in place (tests); default: load it. ``progress``
    receives every finished metrics row with the history so far (default: ``ctx.report`` with
    ``live={"rows": {method: history}}``). ``on_start(run_id, folder)`` once the run id is known. Returns the
    run's :class:`FinetuneResults` (``.cached`` when a finished run was reused). Raises ``FinetuneCancelled``,
    ``ConfigError`` for unusable settings/data, ``ModelLoadError`` for a missing model.
    """
    from analysis.llm.models import load_model

    ctx = ctx if ctx is not None else TaskContext()
    data = load_data(config)
    loaded = model if model is not None else load_model(config.model)
    store = finetune_store(root)
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
    if progress is None:
        progress = ArmsProgress(ctx, [config.method]).arm(config.method)
    trainer = FinetuneTrainer(config, loaded, data, ctx.device, lambda: ctx.cancelled)
    trainer.eval_cache = store.root / "_initial_evals"
    return FinetuneRun(trainer, store, run_id, progress, keep_checkpoint).run(ctx)


class ArmsProgress:
    """Reports the arms of a task as one: fraction over all arms, ``live={"rows": {method: history}}``."""

    def __init__(self, ctx: TaskContext, methods: Sequence[str]):
        self.ctx = ctx
        self.methods = list(methods)
        self.rows: dict[str, list] = {method: [] for method in methods}

    def arm(self, method: str) -> ArmProgress:
        index = self.methods.index(method)

        def report(step: int, total: int, history: list) -> None:
            self.rows[method] = list(history)
            self.ctx.report((index + step / max(total, 1)) / len(self.methods), f"{method}: step {step}/{total}",
                            {"rows": {m: list(r) for m, r in self.rows.items()}})

        return report


class FinetuneRun:
    """The stored side of a run: manifest, live history, checkpoints, the final model and files."""

    def __init__(self, trainer: FinetuneTrainer, store, run_id: str, progress: ArmProgress, keep_checkpoint: bool):
        self.trainer = trainer
        self.store = store
        self.run_id = run_id
        self.progress = progress
        self.keep_checkpoint = keep_checkpoint
        self.history: list[dict] = []
        self.writer = None  # the RunWriter while the run is open

    def manifest(self) -> dict:
        trainer, config = self.trainer, self.trainer.config
        loaded = trainer.loaded
        return {
            "kind": "finetune", "format": FORMAT_VERSION, "config": to_jsonable(config), "label": config.label,
            "model": {"source": loaded.source, "name": loaded.name, "identity": loaded.identity},
            "data": trainer.data.fingerprints, "train_ids": trainer.data.train_ids, "total_steps": trainer.total,
            "spf_modules": [m.name for m in trainer.projector.modules] if config.method == "spf" else [],
            "trainable": {"n_tensors": len(trainer.trainable),
                          "n_parameters": int(sum(p.numel() for _, p in trainer.trainable))},
            "preset_description": PRESETS[config.preset].description if config.preset in PRESETS else "",
        }

    def run(self, ctx: TaskContext) -> FinetuneResults:
        with self.store.open_run(self.run_id, self.manifest()) as writer:
            self.writer = writer
            pending = self.resume()
            loop = self.trainer.loop
            loop.run(self.trainer.train_step, self.emit, pending=pending, measure=self.measure,
                     cancelled=lambda: ctx.cancelled, save=self.checkpoint, save_every=self.trainer.config.checkpoint_every,
                     what="fine-tuning", run_id=self.run_id, error=FinetuneCancelled)
            return self.finish()

    # -- checkpoints -------------------------------------------------------------------------------
    def resume(self) -> dict | None:
        """Restore the checkpoint if there is one; returns the metrics row still to be measured."""
        trainer = self.trainer
        path = self.writer.work / CHECKPOINT
        if not path.is_file():
            trainer.loop.clock = Clock()
            return {"step": 0}
        meta, arrays = trainer.loop.load(path)
        trainer.loop.step = meta["step"]
        self.history, trainer.evals = meta["history"], meta["evals"]
        trainer.projector.removed_rows = [tuple(r) for r in meta["removed_rows"]]
        trainer.projector.basis = {key[len("basis.U/"):]: (value, arrays[f"basis.V/{key[len('basis.U/'):]}"])
                                   for key, value in arrays.items() if key.startswith("basis.U/")}
        trainer.loop.clock = Clock(meta["wall_seconds"], meta["cpu_seconds"])
        self.write_live()
        return meta.get("pending")

    def checkpoint(self, step: int, pending: dict | None = None) -> None:
        trainer = self.trainer
        wall, cpu = trainer.loop.clock.read()
        state = {"step": step, "history": self.history, "evals": trainer.evals, "pending": pending,
                 "removed_rows": trainer.projector.removed_rows, "wall_seconds": wall, "cpu_seconds": cpu,
                 "format": FORMAT_VERSION}
        arrays = {}
        for name, (U, V) in trainer.projector.basis.items():
            arrays[f"basis.U/{name}"] = U
            arrays[f"basis.V/{name}"] = V
        trainer.loop.save(self.writer.work / CHECKPOINT, finite_or_none(state), arrays)
        self.writer.write_manifest(checkpoint_step=step)

    # -- rows --------------------------------------------------------------------------------------
    def measure(self, row: dict) -> dict:
        row = self.trainer.measure(row)
        row["wall_seconds"], row["cpu_seconds"] = self.trainer.loop.clock.read()
        return row

    def write_live(self) -> None:
        atomic_write_json(self.writer.folder / "history.json", finite_or_none(self.history))

    def emit(self, row: dict) -> None:
        self.history.append(finite_or_none(row))
        self.write_live()
        self.progress(row["step"], self.trainer.total, self.history)

    # -- the end -----------------------------------------------------------------------------------
    def save_model(self) -> Path:
        trainer = self.trainer
        model = trainer.model
        if trainer.config.trainable == "lora":
            model = copy.deepcopy(model).merge_and_unload()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        loaded = trainer.loaded
        info = {"run_id": self.run_id, "base_model": {"source": loaded.source, "name": loaded.name,
                                                      "identity": loaded.identity},
                "config": to_jsonable(trainer.config)}
        return save_model(model, trainer.tokenizer, self.writer.folder / "model", {"finetune.json": info})

    def finish(self) -> FinetuneResults:
        trainer = self.trainer
        self.save_model()
        wall, cpu = trainer.loop.clock.read()
        arrays = {}
        rows = trainer.projector.removed_rows
        if rows:
            arrays["spf.safetensors"] = {"steps": np.array([r[0] for r in rows], dtype=np.int64),
                                         "removed": np.array([r[1] for r in rows], dtype=np.float32)}
        final = next((e for e in reversed(trainer.evals) if e.get("final")), None)
        final_metrics = None
        if final is not None:
            m = final["metrics"]
            final_metrics = {k: m.get(k) for k in ("asr", "asr_arditi", "over_refusal", "over_refusal_arditi",
                                                   "refusal_nll", "affirmative_nll", "utility_nll")}
        self.writer.finish(arrays, {"history.json": finite_or_none(self.history),
                                    "evals.json": finite_or_none(trainer.evals)},
                           keep_work=self.keep_checkpoint, timings={"wall_seconds": wall, "cpu_seconds": cpu},
                           final_metrics=finite_or_none(final_metrics))
        files = dict(self.writer.manifest["files"])
        for path in sorted((self.writer.folder / "model").iterdir()):
            if path.is_file():
                files[f"model/{path.name}"] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        self.writer.write_manifest(files=files)
        return FinetuneResults(self.writer.folder, dict(self.writer.manifest))


# --------------------------------------------------------------------------------------------------
# the task: python -m analysis finetune
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetuneTask:
    """One fine-tuning job: ``config`` alone, or (``compare``) its plain and SPF arms with everything else
    equal (seed, data, settings; the initial evaluation is shared)."""

    kind: ClassVar[str] = "finetune"

    config: FinetuneConfig
    compare: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.config, Mapping):
            object.__setattr__(self, "config", FinetuneConfig(**self.config))
        if not isinstance(self.config, FinetuneConfig):
            raise ConfigError("FinetuneTask.config must be a FinetuneConfig")

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def arms(self) -> dict[str, FinetuneConfig]:
        """{method: its config}: plain and spf when comparing, else the config's own method."""
        methods = METHODS if self.compare else (self.config.method,)
        return {method: dataclasses.replace(self.config, method=method) for method in methods}

    def run_ids(self) -> dict[str, str]:
        """{method: run id} of the arms (no model loaded)."""
        from analysis.llm.models import model_identity

        identity = model_identity(self.config.model)
        fingerprints = load_data(self.config).fingerprints
        return {method: run_id_for(arm, identity, fingerprints) for method, arm in self.arms.items()}

    def run_id(self) -> str:
        """The single arm's run id, or ``compare-<hash of both arms' ids>``."""
        ids = self.run_ids()
        if not self.compare:
            return next(iter(ids.values()))
        return f"{self.config.preset}-compare-{config_hash(ids, 12)}"

    def execute(self, ctx: TaskContext, *, root: str | Path | None = None, force: bool = False,
                model_loader: Callable[[], Any] | None = None) -> dict:
        """Train every arm (resuming / reusing stored runs); returns {"run_id", "runs": {method: run id},
        "table": comparison rows}. ``model_loader()`` (tests): a fresh LoadedModel per arm."""
        progress = ArmsProgress(ctx, list(self.arms))
        results = {}
        for method, arm in self.arms.items():
            ctx.check_cancel("cancelled before the " + method + " arm")
            results[method] = run_finetune(arm, ctx, root=root, force=force,
                                           model=model_loader() if model_loader is not None else None,
                                           progress=progress.arm(method))
        table = comparison_table(list(results.values()))
        runs = {method: result.run_id for method, result in results.items()}
        run_id = runs[self.config.method] if not self.compare else \
            f"{self.config.preset}-compare-{config_hash(runs, 12)}"
        return {"run_id": run_id, "runs": runs, "cached": {m: r.cached for m, r in results.items()},
                "table": json.loads(table.to_json(orient="records"))}


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from analysis.core.cli import add_task_arguments

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
    parser.add_argument("--list", action="store_true", help="list stored fine-tuning runs and exit")
    add_task_arguments(parser)


def task_from_args(args: argparse.Namespace) -> FinetuneTask:
    """The task the command-line options describe (``--mode both``: a comparison of the two arms)."""
    overrides: dict[str, Any] = {"model": args.model, "method": "plain" if args.mode == "both" else args.mode,
                                 "seed": args.seed}
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
    return FinetuneTask(preset(args.preset, **overrides), compare=args.mode == "both")


def print_result(result: Mapping[str, Any]) -> None:
    import pandas as pd

    for method, run_id in result["runs"].items():
        print(f"{method}: {'stored run reused' if result['cached'][method] else 'done'} -> {finetune_root() / run_id}")
    print()
    print(format_summary(pd.DataFrame(result["table"])))


def run(args: argparse.Namespace) -> int:
    from analysis.core.cli import load_task, run_task
    from analysis.llm.data import DataError
    from analysis.llm.models import ModelLoadError

    if args.list:
        print(list_finetune_runs().to_string(index=False))
        return 0
    try:
        task = load_task(args.config, FinetuneTask) if args.config else task_from_args(args)
        return run_task(task, args, print_result)
    except (ConfigError, DataError, ModelLoadError) as error:
        print(f"error: {error}")
        return 2
