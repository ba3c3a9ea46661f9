"""Fine-tuning attacks and SPF (safety-preserving fine-tuning), with live safety / utility metrics.

Layout of the fine-tuning lab
-----------------------------
:mod:`analysis.lab.config`         ``FinetuneConfig``, ``SPFConfig``, the Qi et al. presets (``PRESETS``, ``preset``).
:mod:`analysis.lab.spf`            the SPF projector: safety basis, projections (sign convention documented there).
:mod:`analysis.lab.loop`           the one training loop (optimizer, clipping, warm-up, checkpoints, cancel),
                                   shared with alignment (:mod:`analysis.lab.align`).
:mod:`analysis.lab.finetune_data`  training / safety / held-out data, seeded batch order, evaluations.
:mod:`analysis.lab.results`        reading runs (``FinetuneResults``), listing them, comparison tables.
:mod:`analysis.lab.trainer`        trainable parameters, run id, ``FinetuneTrainer`` (one step + measurements).
this module                        the task (``FinetuneTask``, ``python -m analysis finetune``) and a stored
                                   run (``run_finetune``: resume, checkpoints, live history, final model).

``FinetuneTask(config, compare=False, force=False)``: kind "finetune"; ``compare=True`` runs the plain and the
SPF arm of the same config (one job); ``force`` retrains finished runs (not part of the run id). ``run_id()`` is cheap (no model load); ``execute(ctx)`` trains on ``ctx.device``,
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
of that layer's SPF modules taken together, and safety_grad_norm (||G_safety|| over the SPF modules); with
method spf / pcgrad also basis_skipped (1: the safety gradient was ~0, e.g. ``safety_loss="kl"`` at step 1, so
no basis / reference was kept and nothing is projected until the next refresh; else 0); (plain and SPF arms)
drift_overlap / drift_overlap_right = mean over modules of the overlap phi between the safety basis of this step
and that of the first refresh (left / right singular subspaces; the run's ``drift.safetensors`` keeps the
per-module principal-angle cosines); at step 0, every ``gen_every`` steps and at the end:
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
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from analysis.core.config import ConfigError, config_hash, to_jsonable
from analysis.core.options import option, option_values
from analysis.core.store import atomic_write_json, file_sha256, finite_or_none
from analysis.core.tasks import Event, TaskContext, register_task
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
from analysis.lab.finetune_data import FORMAT_VERSION, load_data
from analysis.lab.loop import Clock, TrainingCancelled, save_model
from analysis.lab.results import (
    FinetuneResults,
    comparison_table,
    finetune_root,
    finetune_store,
    format_run,
    list_finetune_runs,
    load_finetune_run,
    stored_runs,
)
from analysis.lab.trainer import FinetuneTrainer, run_id_for, set_trainable

CHECKPOINT = "checkpoint.safetensors"

# what pages and the CLI use from here (defined in the lab's other modules)
__all__ = ["CHECKPOINT", "METHODS", "PRESETS", "SAFETY_LOSSES", "SPF_MODES", "SPF_TARGETS", "TRAINABLE",
           "FinetuneCancelled", "FinetuneConfig", "FinetuneResults", "FinetuneTask", "FinetuneTrainer",
           "SPFConfig", "comparison_table", "finetune_root", "list_finetune_runs", "load_finetune_run", "preset",
           "run_finetune", "run_id_for", "set_trainable", "stored_runs"]


class FinetuneCancelled(TrainingCancelled):
    """A fine-tuning run was cancelled; a checkpoint was saved and the run resumes with the same config."""


# --------------------------------------------------------------------------------------------------
# a stored run
# --------------------------------------------------------------------------------------------------

def run_finetune(config: FinetuneConfig, ctx: TaskContext | None = None, *, root: str | Path | None = None,
                 force: bool = False, keep_checkpoint: bool = False, model=None,
                 on_start: Callable[[str, Path], None] | None = None,
                 progress: Callable[[int, int, list], None] | None = None) -> FinetuneResults:
    """Fine-tune ``config.model`` on ``ctx.device`` and store the run (or resume it, or reuse a finished one).

    ``model``: an already loaded ``LoadedModel`` to train in place (tests); default: load it. Every finished
    metrics row is reported as ``ctx.report(step / total, "<method>: step s/total", live={"rows": {method:
    history so far}})`` (a part of a larger task passes ``ctx.sub(...)``); ``progress(step, total, history)``,
    when given, receives the rows instead (a hook for tests). ``on_start(run_id, folder)`` once
    the run id is known. Returns the run's :class:`FinetuneResults` (``.cached`` when a finished run was
    reused). Raises ``FinetuneCancelled``, ``ConfigError`` for unusable settings/data, ``ModelLoadError`` for a
    missing model.
    """
    from analysis.llm.models import load_model, model_identity

    ctx = ctx if ctx is not None else TaskContext()
    data = load_data(config)
    store = finetune_store(root)
    identity = model.identity if model is not None else model_identity(config.model)
    run_id = run_id_for(config, identity, data.fingerprints)
    status = store.status(run_id)
    if status == "complete" and not force:  # reused without loading the model
        result = FinetuneResults(store.path(run_id), store.manifest(run_id))
        result.cached = True
        return result
    loaded = model if model is not None else load_model(config.model)
    if status in ("complete", "corrupted"):
        store.delete(run_id)
    if on_start is not None:
        on_start(run_id, store.path(run_id))
    trainer = FinetuneTrainer(config, loaded, data, ctx.device, lambda: ctx.cancelled,
                              eval_cache=store.root / "_initial_evals")
    return FinetuneRun(trainer, store, run_id, ctx, keep_checkpoint, progress).run()


class FinetuneRun:
    """The stored side of a run: manifest, live history, checkpoints, the final model and files."""

    def __init__(self, trainer: FinetuneTrainer, store, run_id: str, ctx: TaskContext, keep_checkpoint: bool,
                 progress: Callable[[int, int, list], None] | None = None):
        self.trainer = trainer
        self.store = store
        self.run_id = run_id
        self.ctx = ctx
        self.progress = progress  # None: report to ctx
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
            "spf_modules": [m.name for m in trainer.projector.modules] if trainer.defence.needs.safety_basis else [],
            "trainable": {"n_tensors": len(trainer.trainable),
                          "n_parameters": int(sum(p.numel() for _, p in trainer.trainable))},
            "preset_description": PRESETS[config.preset].description if config.preset in PRESETS else "",
        }

    def run(self) -> FinetuneResults:
        ctx = self.ctx
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
        trainer.projector.drift_rows = [tuple(r) for r in meta.get("drift_rows", [])]
        devices = {m.name: m.weight.device for m in trainer.projector.modules}  # a dispatched model: several
        for prefix, attribute in (("basis", "basis"), ("reference", "reference")):
            names = [key[len(f"{prefix}.U/"):] for key in arrays if key.startswith(f"{prefix}.U/")]
            setattr(trainer.projector, attribute, {
                name: (arrays[f"{prefix}.U/{name}"].to(devices.get(name, trainer.device)),
                       arrays[f"{prefix}.V/{name}"].to(devices.get(name, trainer.device))) for name in names})
        trainer.defence.load_state(arrays)
        trainer.loop.clock = Clock(meta["wall_seconds"], meta["cpu_seconds"])
        self.write_live()
        return meta.get("pending")

    def checkpoint(self, step: int, pending: dict | None = None) -> None:
        trainer = self.trainer
        wall, cpu = trainer.loop.clock.read()
        state = {"step": step, "history": self.history, "evals": trainer.evals, "pending": pending,
                 "removed_rows": trainer.projector.removed_rows, "drift_rows": trainer.projector.drift_rows,
                 "wall_seconds": wall, "cpu_seconds": cpu, "format": FORMAT_VERSION}
        arrays = {}
        for prefix, basis in (("basis", trainer.projector.basis), ("reference", trainer.projector.reference)):
            for name, (U, V) in basis.items():
                arrays[f"{prefix}.U/{name}"] = U
                arrays[f"{prefix}.V/{name}"] = V
        arrays.update(trainer.defence.state())  # e.g. PCGrad's reference gradient
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
        step, total, method = row["step"], self.trainer.total, self.trainer.config.method
        if self.progress is not None:
            self.progress(step, total, self.history)
        else:
            self.ctx.report(step / max(total, 1), f"{method}: step {step}/{total}", {"rows": {method: list(self.history)}})

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
        drift = trainer.projector.drift_rows
        if drift:
            arrays["drift.safetensors"] = {"steps": np.array([r[0] for r in drift], dtype=np.int64),
                                           "cos_left": np.array([r[1] for r in drift], dtype=np.float32),
                                           "cos_right": np.array([r[2] for r in drift], dtype=np.float32)}
        final = next((e for e in reversed(trainer.evals) if e.get("final")), None)
        final_metrics = None
        if final is not None:
            m = final["metrics"]
            final_metrics = {k: m.get(k) for k in ("asr", "asr_arditi", "over_refusal", "over_refusal_arditi",
                                                   "refusal_nll", "affirmative_nll", "utility_nll")}
        self.writer.finish(arrays, {"history.json": finite_or_none(self.history),
                                    "evals.json": finite_or_none(trainer.evals)},
                           keep_work=self.keep_checkpoint, timings={"wall_seconds": wall, "cpu_seconds": cpu},
                           final_metrics=finite_or_none(final_metrics),
                           drift_modules=[m.name for m in trainer.projector.modules] if drift else [])
        files = dict(self.writer.manifest["files"])
        for path in sorted((self.writer.folder / "model").iterdir()):
            if path.is_file():
                files[f"model/{path.name}"] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        self.writer.write_manifest(files=files)
        return FinetuneResults(self.writer.folder, dict(self.writer.manifest))


# --------------------------------------------------------------------------------------------------
# the task: python -m analysis finetune
# --------------------------------------------------------------------------------------------------


@register_task
@dataclasses.dataclass(frozen=True)
class FinetuneTask:
    """One fine-tuning job: ``config`` alone, or (``compare``) its plain and SPF arms with everything else
    equal (seed, data, settings; the initial evaluation is shared). ``force``: retrain finished runs."""

    kind: ClassVar[str] = "finetune"
    #: on the command line, the run's settings start from the chosen preset (--preset), not from the field defaults
    cli_default_note: ClassVar[str] = "the preset's"

    config: FinetuneConfig = option(default_factory=FinetuneConfig, help="the run's settings")
    compare: bool = False  # --mode both
    force: bool = option(False, run_id=False, help="retrain even if a finished run matches")

    @staticmethod
    def add_extra_options(parser: argparse.ArgumentParser) -> None:
        """``--preset`` (the attack the settings start from), ``--mode`` (a training defence, or both arms) and
        ``--list``: options of the command, not fields of a run."""
        from analysis.lab.defences import get, training_names

        group = parser.add_argument_group("attack and method")
        group.add_argument("--preset", default="harmful-10", metavar="PRESET",
                           help=f"the attack after Qi et al. (default: harmful-10; one of: {', '.join(PRESETS)})")
        group.add_argument("--mode", default="both", metavar="METHOD",
                           help="; ".join(f"{name}: {get(name).description}" for name in training_names())
                           + f"; both: the arms {' and '.join(METHODS)} side by side (default: both)")
        group.add_argument("--list", action="store_true", help="list stored fine-tuning runs and exit")

    @staticmethod
    def from_options(args: argparse.Namespace) -> FinetuneTask:
        """The preset with the settings given on the command line (``--mode both``: a comparison of the arms)."""
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}: choose from {', '.join(PRESETS)}")
        values = option_values(FinetuneConfig, vars(args), prefix="config.", partial=True)
        values["method"] = METHODS[0] if args.mode == "both" else args.mode
        return FinetuneTask(preset(args.preset, **values), compare=args.mode == "both",
                            force=getattr(args, "force", False))

    @staticmethod
    def run_command(args: argparse.Namespace) -> int | None:
        """``--list``: print the stored fine-tuning runs instead of training."""
        if not args.list:
            return None
        print(list_finetune_runs().to_string(index=False))
        return 0

    @staticmethod
    def print_result(result: Mapping[str, Any]) -> None:
        print_finetune(result)

    def __post_init__(self) -> None:
        if isinstance(self.config, Mapping):
            object.__setattr__(self, "config", FinetuneConfig(**self.config))
        if not isinstance(self.config, FinetuneConfig):
            raise ConfigError("FinetuneTask.config must be a FinetuneConfig")

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
        """The single arm's run id, or ``<preset>-compare-<hash of both arms' ids>``."""
        return self.combined_id(self.run_ids())

    def combined_id(self, arm_ids: Mapping[str, str]) -> str:
        if not self.compare:
            return arm_ids[self.config.method]
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.config.preset)}-compare-{config_hash(dict(arm_ids), 12)}"

    def execute(self, ctx: TaskContext, *, root: str | Path | None = None) -> dict:
        """Train every arm (resuming / reusing stored runs; ``root``: another run store, for tests); returns
        {"run_id", "runs": {method: run id}, "cached": {method: reused?}, "table": comparison rows}."""
        arms = self.arms
        rows: dict[str, list] = {method: [] for method in arms}  # every arm's live history, reported together

        def all_rows(event: Event) -> None:
            rows.update((event.live or {}).get("rows", {}))
            ctx.report(event.fraction, event.message, {"rows": {m: list(r) for m, r in rows.items()}})

        whole = dataclasses.replace(ctx, progress=all_rows if ctx.progress is not None else None)
        results = {}
        for index, (method, arm) in enumerate(arms.items()):
            ctx.check_cancel(f"cancelled before the {method} arm")
            part = whole.sub(index / len(arms), (index + 1) / len(arms), keep_live=True)
            results[method] = run_finetune(arm, part, root=root, force=self.force)
        table = comparison_table(list(results.values()))
        runs = {method: result.run_id for method, result in results.items()}
        return {"run_id": self.combined_id(runs), "runs": runs, "cached": {m: r.cached for m, r in results.items()},
                "table": json.loads(table.to_json(orient="records"))}


def print_finetune(result: Mapping[str, Any]) -> None:
    """What ``finetune`` prints: where each arm's run is, and each run's numbers with their n and intervals
    (the paired tests between the arms are on the Fine-tune page)."""
    for method, run_id in result["runs"].items():
        print(f"{method}: {'stored run reused' if result['cached'][method] else 'done'} -> {finetune_root() / run_id}")
    for run_id in result["runs"].values():
        print()
        print(format_run(load_finetune_run(run_id)))
