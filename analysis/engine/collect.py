"""The collection loop: capture every batch, analyse every module, write the run (see
:mod:`analysis.engine.collect_task` for the pipeline, its exactness and memory).

``collect(config, *, model=None, store=None, ctx=None, force=False, keep_work=False, chunk_bytes=512 MiB,
workers=None) -> RunResults`` runs (or resumes, or reuses) a collection. Same config -> the stored run is
loaded instantly; an interrupted run resumes from its last finished batch/module; a damaged run is
recomputed (the reason is in ``results.messages``).

Progress goes to ``ctx.report(fraction, message, live)`` after every captured batch, every analysed module and
every overlap-vs-n curve (the curves come after all modules' rows: the answers first, the costliest part last).
``live`` is plain JSON (lists, numbers, None for NaN or missing; see :data:`LIVE_KEYS`): per-sample losses
so far, running spectra / CER / effective rank / cosine of a few preview modules while capturing, and the
per-module metrics rows finished so far while analysing. Cancel: ``ctx.cancel``, checked between batches
and between modules (raises ``CollectionCancelled``; the work is kept).

Device: the model and each tokenised batch are moved to ``ctx.device``, so the capture (forward + backward)
and the analysis's Gram products run there; factors are checkpointed to CPU files, and spectra, SVDs and
overlaps run in float64 numpy on the CPU. On the CPU nothing moves and the numbers are those of before.
A model dispatched by accelerate (``ModelConfig.device_map``) is not moved: batches go to its first device.

Passes and ranks: ``config.modules_per_pass`` captures the modules group by group (:meth:`_Collection.run`);
under torchrun every rank captures its share of each pass's batches and rank 0 writes and analyses
(:mod:`analysis.engine.sharded`). The cost of a config before any work: :mod:`analysis.engine.planner`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from analysis.core import distributed as group
from analysis.core.config import ConfigError, config_hash, package_versions, to_jsonable
from analysis.core.store import RunWriter, StoreError, finite_or_none, json_default
from analysis.core.tasks import TaskContext, resolve_device
from analysis.engine import geometry as geo
from analysis.engine import sharded
from analysis.engine.analyse import analyse_module, curve_sizes, or_nan, overlap_curve
from analysis.engine.capture import BatchFactors, capture_batch
from analysis.engine.collect_task import (
    ENGINE_VERSION,
    CollectionCancelled,
    CollectionConfig,
    curve_modules,
    load_set,
    run_identity,
)
from analysis.engine.gram import DEFAULT_CHUNK_BYTES
from analysis.engine.results import (
    SAMPLES_FILE,
    SETS,
    TABLE_COLUMNS,
    TABLE_FILE,
    CollectionStore,
    RunResults,
    result_location,
)
from analysis.engine.sketch import Sketch, describe
from analysis.llm.anatomy import ModuleInfo, find_linear_modules, select_modules
from analysis.llm.formatting import tokenize_batch

if TYPE_CHECKING:
    from analysis.llm.models import LoadedModel

__all__ = ["CAPTURE_SHARE", "LIVE_KEYS", "PREVIEW_MODULES", "collect", "default_workers", "numpy_single_threaded"]

#: Number of modules whose running spectra are shown while capturing.
PREVIEW_MODULES = 4
#: Share of the progress fraction given to the capture stage (the analysis gets the rest).
CAPTURE_SHARE = 0.4
#: Keys of the ``live`` mapping of every progress event. stage: "capture", "analyse" or "done"; fraction in
#: [0, 1]; losses: (n,) per-sample losses so far (nats; None for samples not reached yet), safety first;
#: preview (while capturing, else {}): {module HF path: {"label", "safety" (singular values of the running
#: batch-mean gradient, or None before the first batch of the set), "safety_cer", "safety_effective_rank",
#: the same for "utility", "cosine" (cos(G_s, G_u) so far, or None)}}; labels: {preview module: label};
#: table (while analysing and when done, else None): {"columns": TABLE_COLUMNS, "data": one list per
#: finished module}.
LIVE_KEYS = ("run_id", "stage", "fraction", "done_samples", "total_samples", "done_modules", "total_modules",
             "losses", "preview", "labels", "table")


def collect(config: CollectionConfig, *, model: LoadedModel | None = None, store: CollectionStore | None = None,
            ctx: TaskContext | None = None, force: bool = False, keep_work: bool = False,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None) -> RunResults:
    """Collect (or resume, or reuse) the run of ``config`` and return its results.

    model: an already loaded ``analysis.llm.models.LoadedModel`` for ``config.model`` (else it is loaded;
    a model whose identity is not the config's is refused). store: where runs live (default ``CollectionStore()``
    under cache_dir()/runs). ctx: device, progress and cancel (default: CPU, no progress); the model and
    each batch are moved to ``ctx.device`` (a given model is moved back afterwards).
    force: recompute even if a complete run exists. keep_work: keep the per-batch factor files.
    chunk_bytes: memory for one module's dense G_i chunk. workers: modules analysed in parallel (threads;
    default :func:`default_workers`); the numbers do not depend on it.
    A complete, intact run is loaded without computing; a damaged one (size/sha256 mismatch) is
    recomputed and the returned results carry the reason in ``.messages`` (also warned).
    """
    from analysis.llm.models import dispatched, input_device, load_model, model_identity, place

    ctx = ctx if ctx is not None else TaskContext()
    device = torch.device(resolve_device(ctx.device))  # "auto" -> a GPU if there is one; checked before any work
    ranks, device = group.start(device, config.model.device_map)  # torchrun: rank r on its own GPU
    store = store if store is not None else CollectionStore()
    session_start = time.perf_counter()
    identity = model_identity(config.model)
    if model is None:
        ctx.report(0.0, f"loading model {config.model.source}")
        model = load_model(config.model)
    elif model.source != config.model.source or model.identity != identity:
        raise ConfigError(f"the given model is {model.source!r} (identity {model.identity}) but the config asks "
                          f"for {config.model.source!r} (identity {identity})")
    if dispatched(model.model):  # accelerate placed it (ModelConfig.device_map): batches go where it starts
        device = input_device(model.model)
    datasets = {which: load_set(config, which) for which in SETS}
    modules = select_modules(find_linear_modules(model.model), config.layers, config.kinds, config.regex)
    run_id = config_hash(run_identity(config, identity, datasets))
    sketch = Sketch(config.projection_dim, config.seed, modules) if config.projection_dim is not None else None

    examples = [ex for which in SETS for ex in datasets[which].examples]
    if ranks is not None and not ranks.leader:
        try:
            return _follow(config, model, modules, examples, ranks, store, run_id, device, sketch)
        finally:
            ranks.close()

    def lead() -> RunResults:
        messages: list[str] = []
        status = store.status(run_id)
        if status == "complete" and not force:
            problems = store.verify(run_id, full=True)
            if not problems:
                return store.load(run_id)
            messages.append(f"run {run_id} was damaged ({'; '.join(problems)}); recomputing it")
        if status == "corrupted":
            try:
                problems = store.verify(run_id, full=False)
            except StoreError as error:
                problems = [str(error)]
            messages.append(f"run {run_id} was damaged ({'; '.join(problems)}); recomputing it")
        if status in ("complete", "corrupted") or (force and status != "missing"):
            store.delete(run_id)
        for message in messages:
            warnings.warn(message, stacklevel=3)

        curves = set(curve_modules(config, modules))
        manifest = {
            "config": to_jsonable(config),
            "model": {"source": model.source, "name": model.name, "identity": model.identity,
                      "family": getattr(model.model.config, "model_type", type(model.model).__name__)},
            "datasets": {which: {"source": datasets[which].source, "name": datasets[which].name,
                                 "content_hash": datasets[which].content_hash,
                                 "fingerprint": datasets[which].fingerprint(), "n": len(datasets[which])}
                         for which in SETS},
            "modules": [dataclasses.asdict(m) for m in modules],
            "curve_modules": [m.name for m in modules if m.name in curves],
            "n_batches": len(_plan_batches(config)),
            "projection": describe(config.projection_dim, config.seed, modules),
            "versions": {**package_versions(), "engine": str(ENGINE_VERSION)},
            "engine": ENGINE_VERSION,
        }
        writer = store.open_run(run_id, manifest)
        job = _Collection(config, model, modules, examples, curves, writer, ctx, device, chunk_bytes,
                          workers or default_workers())
        job.ranks, job.sketch = ranks, sketch
        was_training = model.model.training
        home = next(model.model.parameters()).device
        model.model.eval()  # dropout off: per-sample gradients are exact only in eval mode
        try:
            if home != device:
                place(model.model, device)
            with numpy_single_threaded():
                job.keep_work = keep_work
                rows, timings = job.run()
                timings["model_load_seconds"] = round(model.load_seconds, 3)
                return job.finish(rows, timings, messages, keep_work, session_start)
        finally:
            model.model.train(was_training)
            if home != device:
                place(model.model, home)
            writer.close()

    finished = False
    try:
        results = lead()
        finished = True
        return results
    finally:
        if ranks is not None:  # release the other ranks: they read the run (done) or raise (stop)
            ranks.send(("done",) if finished else ("stop", "rank 0 was cancelled or failed; see its output"))
            ranks.close()


@contextlib.contextmanager
def numpy_single_threaded() -> Iterator[None]:
    """numpy/scipy BLAS on one thread inside the block (threadpoolctl; restored afterwards). Torch's threads
    are not touched: they are the process's, set by whoever owns it (``TaskContext.threads``).

    The analysis stage is thousands of small and medium matrix products and LAPACK calls; on this kind of
    work a second BLAS/OpenMP thread buys little, and on a busy machine it costs a lot (every parallel
    region waits for a time slice for its second thread: measured 30 ms for a 48 x 64 product); the
    parallelism comes from analysing ``workers`` modules at once instead.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def default_workers() -> int:
    """Modules analysed in parallel: as many as fit beside torch's threads, at most 2, at least 1
    (min(2, CPUs) with one torch thread; 1 with torch using every core, so threads do not pile up)."""
    return max(1, min(2, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Batch:
    index: int
    which: str
    samples: range  # global sample indices (safety first)


def _plan_batches(config: CollectionConfig) -> list[_Batch]:
    batches = []
    offset = 0
    for which, count in (("safety", config.n_safety), ("utility", config.n_utility)):
        for start in range(0, count, config.batch_size):
            stop = min(start + config.batch_size, count)
            batches.append(_Batch(len(batches), which, range(offset + start, offset + stop)))
        offset += count
    return batches


def _factor_dtype(model) -> torch.dtype:
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types: numpy/torch to lists and numbers, NaN/inf to None."""
    return finite_or_none(json.loads(json.dumps(value, default=json_default)))


def _batch_arrays(factors: BatchFactors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CPU tensors of one batch checkpoint: losses, row offsets, and "D/<module>", "A/<module>" factors."""
    arrays = {"loss": factors.losses.detach().to("cpu", torch.float64), "row_offsets": factors.row_offsets.cpu()}
    for name in factors.inputs:
        arrays[f"D/{name}"] = factors.output_grads[name].to("cpu", dtype).contiguous()
        arrays[f"A/{name}"] = factors.inputs[name].to("cpu", dtype).contiguous()
    return arrays


def _holds(writer: RunWriter, index: int, names: set[str]) -> bool:
    """True if work file ``index`` is intact and holds the factors of every module in ``names`` (a file of
    another partitioning of the modules does not)."""
    from safetensors import safe_open

    if not writer.has_batch(index):
        return False
    with safe_open(str(writer.batch_path(index)), framework="pt") as handle:
        return {f"A/{name}" for name in names} <= set(handle.keys())


def _capture_arrays(config: CollectionConfig, model: LoadedModel, examples: Sequence, batch: _Batch,
                    modules: Sequence[ModuleInfo], device: torch.device, dtype: torch.dtype,
                    sketch: Sketch | None = None) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """One batch's checkpoint arrays (:func:`_batch_arrays`, on the CPU; sketched factors for the modules
    ``sketch`` projects) and its truncation flags."""
    tokenized = tokenize_batch(model.tokenizer, [examples[i].messages for i in batch.samples],
                               config.max_length, config.padding_side)
    factors = capture_batch(model.model, _to_device(tokenized, device), modules, sketch)
    return _batch_arrays(factors, dtype), list(tokenized.truncated)


def _follow(config: CollectionConfig, model: LoadedModel, modules: Sequence[ModuleInfo], examples: Sequence,
            ranks: group.Ranks, store: CollectionStore, run_id: str, device: torch.device,
            sketch: Sketch | None = None) -> RunResults:
    """A rank other than 0: capture the batches rank 0 deals out, then read the run rank 0 wrote."""
    from analysis.llm.models import place

    batches = _plan_batches(config)
    by_name = {m.name: m for m in modules}
    dtype = _factor_dtype(model.model)
    home, was_training = next(model.model.parameters()).device, model.model.training
    model.model.eval()
    try:
        place(model.model, device)
        sharded.follow(ranks, lambda index, names: _capture_arrays(
            config, model, examples, batches[index], [by_name[n] for n in names], device, dtype, sketch),
            lambda message: CollectionCancelled(message, run_id))
    finally:
        model.model.train(was_training)
        place(model.model, home)
    return store.load(run_id)


def _to_device(tokenized, device: torch.device):
    """The tokenised batch with its tensors on ``device`` (unchanged on the CPU)."""
    if device.type == "cpu":
        return tokenized
    return dataclasses.replace(tokenized, **{name: getattr(tokenized, name).to(device)
                                              for name in ("input_ids", "attention_mask", "labels", "position_ids")})


class _Preview:
    """Running batch-mean gradients of a few modules, for live charts while capturing.

    Spectra are recomputed only for the set that received samples since the last snapshot."""

    def __init__(self, modules: Sequence[ModuleInfo]):
        picks = np.unique(np.round(np.linspace(0, len(modules) - 1, min(PREVIEW_MODULES, len(modules)))).astype(int))
        self.modules = [modules[i] for i in picks]
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.entries: dict[str, dict[str, Any]] = {m.name: {"label": m.label, "cosine": None} for m in self.modules}
        for entry in self.entries.values():
            entry.update({f"{which}{suffix}": None for which in SETS for suffix in ("", "_cer", "_effective_rank")})
        self.dirty: set[str] = set()

    def add(self, which: str, n_samples: int, factors: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
            names: set[str] | None = None) -> None:
        """Add a batch of ``which`` to the sums of the preview modules among ``names`` (None: all)."""
        for m in self.modules:
            if names is not None and m.name not in names:
                continue
            D, A = factors(m.name)
            total = (D.T @ A).double()
            key = (m.name, which)
            self.sums[key] = total if key not in self.sums else self.sums[key] + total
            self.counts[key] = self.counts.get(key, 0) + n_samples
        self.dirty.add(which)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{module: entry} with numpy spectra (see LIVE_KEYS, "preview")."""
        for m in self.modules:
            entry = self.entries[m.name]
            means = {which: (self.sums[(m.name, which)] / self.counts[(m.name, which)]).numpy()
                     for which in SETS if (m.name, which) in self.sums}
            for which in self.dirty & set(means):
                spectrum = geo.singular_values(means[which])
                entry.update({which: spectrum, f"{which}_cer": geo.cumulative_energy(spectrum),
                              f"{which}_effective_rank": geo.effective_rank(spectrum)})
            if self.dirty and len(means) == 2:
                entry["cosine"] = or_nan(lambda means=means: geo.cosine(means["safety"], means["utility"]))
        self.dirty.clear()
        return {name: dict(entry) for name, entry in self.entries.items()}

    @property
    def labels(self) -> dict[str, str]:
        return {m.name: m.label for m in self.modules}


class _Collection:
    """One collection in progress: capture every batch, analyse every module, write the final files."""

    def __init__(self, config: CollectionConfig, model: LoadedModel, modules: list[ModuleInfo], examples: list,
                 curve_modules: set[str], writer: RunWriter, ctx: TaskContext, device: torch.device,
                 chunk_bytes: int, workers: int):
        self.config, self.model, self.modules, self.examples = config, model, modules, examples
        self.curve_modules, self.writer, self.ctx = curve_modules, writer, ctx
        self.chunk_bytes, self.workers = chunk_bytes, workers
        self.device = device
        self.batches = _plan_batches(config)
        self.n_total = config.n_total
        self.losses = np.full(self.n_total, np.nan)
        self.tokens = np.zeros(self.n_total, dtype=np.int64)
        self.truncated = [False] * self.n_total
        self.curve_indices = [i for i, m in enumerate(modules) if m.name in curve_modules]
        self.live = ctx.progress is not None  # live data (preview spectra) only when someone listens
        self.preview = _Preview(modules) if self.live else None
        self.captured = 0  # samples captured (or read back) so far, all passes together: progress only
        self.analysed = 0  # modules analysed (or read back) so far
        self.curves_done = 0  # overlap-vs-n curves added (or read back) so far
        self.keep_work = False
        self.ranks: group.Ranks | None = None  # several processes: batches captured by every rank
        self.sketch: Sketch | None = None  # config.projection_dim: factors of wide modules sketched at capture

    # -- progress and cancel ------------------------------------------------------------------------
    def report(self, message: str, stage: str, done_samples: int, done_modules: int,
               rows: Sequence[dict] | None = None) -> None:
        # analysis work units: one per module row, one per deferred overlap-vs-n curve (about the same cost)
        units = len(self.modules) + len(self.curve_indices)
        fraction = min(1.0, CAPTURE_SHARE * self.captured / (self.n_total * len(self.passes()))
                       + (1 - CAPTURE_SHARE) * (done_modules + self.curves_done) / units)
        live = None
        if self.live:
            table = None if rows is None else {"columns": list(TABLE_COLUMNS),
                                               "data": [[row.get(c) for c in TABLE_COLUMNS] for row in rows]}
            live = _plain({"run_id": self.writer.run_id, "stage": stage, "fraction": fraction,
                           "done_samples": done_samples, "total_samples": self.n_total,
                           "done_modules": done_modules, "total_modules": len(self.modules),
                           "losses": self.losses, "preview": self.preview.snapshot() if stage == "capture" else {},
                           "labels": self.preview.labels, "table": table})
        self.ctx.report(fraction, message, live)

    def check_cancel(self, where: str) -> None:
        if self.ctx.cancelled:
            raise CollectionCancelled(f"collection cancelled {where}; collect again with the same settings to "
                                      "resume from there", self.writer.run_id)

    # -- passes -------------------------------------------------------------------------------------
    def passes(self) -> list[list[int]]:
        """Module indices captured together by one forward + backward pass over all samples: consecutive
        groups of ``config.modules_per_pass`` (0: all modules in one pass)."""
        size = self.config.modules_per_pass or len(self.modules)
        return [list(range(start, min(start + size, len(self.modules)))) for start in range(0, len(self.modules), size)]

    def file_index(self, part: int, batch: _Batch) -> int:
        """Index of the work file holding pass ``part``'s factors of ``batch``."""
        return part * len(self.batches) + batch.index

    def run(self) -> tuple[list[dict], dict[str, float]]:
        """Every pass: capture its modules' factors (unless they are all analysed already), analyse them, then
        delete the pass's factor files (all but the last pass; ``keep_work`` keeps them). Returns the table
        rows of all modules in order and the capture / analyse seconds. The per-sample losses come from any
        capture; a resumed run whose modules are all analysed captures the last pass once more for them."""
        rows: list[dict] = []
        timings = {"capture_seconds": 0.0, "analyse_seconds": 0.0}
        losses_known = False
        parts = self.passes()
        for part, indices in enumerate(parts):
            last = part == len(parts) - 1
            if any(not self.writer.has_module(i) for i in indices) or (last and not losses_known):
                timings["capture_seconds"] += self.capture(part, indices)
                losses_known = True
            else:
                self.captured += self.n_total
            start = time.perf_counter()
            self.analyse(indices, rows)
            timings["analyse_seconds"] += time.perf_counter() - start
            if not last and not self.keep_work:
                for batch in self.batches:
                    self.writer.batch_path(self.file_index(part, batch)).unlink(missing_ok=True)
        return rows, {key: round(value, 3) for key, value in timings.items()}

    # -- 1. capture ---------------------------------------------------------------------------------
    def capture(self, part: int = 0, indices: Sequence[int] | None = None) -> float:
        """Capture the factors of the modules ``indices`` (default all) for every batch not yet checkpointed
        in pass ``part`` (checkpointed ones are read back). Returns seconds."""
        from safetensors import safe_open

        start = time.perf_counter()
        dtype = _factor_dtype(self.model.model)
        modules = [self.modules[i] for i in (range(len(self.modules)) if indices is None else indices)]
        names = {m.name for m in modules}
        n_passes = len(self.passes())
        where = f" (pass {part + 1}/{n_passes})" if n_passes > 1 else ""
        needed = [b.index for b in self.batches if not _holds(self.writer, self.file_index(part, b), names)]
        world = self.ranks.world if self.ranks is not None else 1
        rounds = [needed[i:i + world] for i in range(0, len(needed), world)]
        if self.ranks is not None and rounds:
            self.ranks.send(("capture", [m.name for m in modules], rounds))
        next_round = iter(rounds)
        pending: dict[int, tuple[dict, list[bool]]] = {}  # captured, not yet saved: batch -> (arrays, truncated)
        done = 0
        for batch in self.batches:
            samples = list(batch.samples)
            index = self.file_index(part, batch)
            if batch.index not in needed:
                with safe_open(str(self.writer.batch_path(index)), framework="pt") as handle:
                    losses, offsets = handle.get_tensor("loss"), handle.get_tensor("row_offsets")
                    truncated = json.loads(handle.metadata()["truncated"])
                    if self.preview is not None:
                        self.preview.add(batch.which, len(samples), lambda name: (
                            handle.get_tensor(f"D/{name}"), handle.get_tensor(f"A/{name}")), names)
                message = f"batch {batch.index + 1}/{len(self.batches)} ({batch.which}){where} read from checkpoint"
            else:
                if batch.index not in pending:
                    self.check_cancel(f"after {done} of {self.n_total} samples{where}")
                    shares = next(next_round)  # starts with this batch
                    self.report(f"capturing batch {batch.index + 1}/{len(self.batches)} ({batch.which}){where}: "
                                f"forward + backward of {len(samples)} samples"
                                + (" (the first batch also warms up the model)" if not done else ""),
                                "capture", done, self.analysed)
                    if self.ranks is not None:
                        self.ranks.send(("go",))
                    mine = _capture_arrays(self.config, self.model, self.examples, self.batches[shares[0]], modules,
                                           self.device, dtype, self.sketch)
                    gathered = self.ranks.gather(mine) if self.ranks is not None else [mine]
                    pending.update(zip(shares, gathered))
                arrays, truncated = pending.pop(batch.index)
                self.writer.save_batch(index, arrays, {"truncated": json.dumps(truncated), "set": batch.which})
                losses, offsets = arrays["loss"], arrays["row_offsets"]
                if self.preview is not None:
                    self.preview.add(batch.which, len(samples),
                                     lambda name, arrays=arrays: (arrays[f"D/{name}"], arrays[f"A/{name}"]), names)
                del arrays
                message = f"captured batch {batch.index + 1}/{len(self.batches)} ({batch.which}){where}"
            self.losses[samples] = losses.double().numpy()
            self.tokens[samples] = (offsets[1:] - offsets[:-1]).numpy()
            for j, i in enumerate(samples):
                self.truncated[i] = bool(truncated[j])
            done += len(samples)
            self.captured += len(samples)
            self.report(message, "capture", done, self.analysed)
        return time.perf_counter() - start

    # -- 2. analyse ---------------------------------------------------------------------------------
    def read_pairs(self, name: str, part: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(D_i, A_i) of every sample for one module (captured in pass ``part``). Each batch file is opened
        (memory-mapped) only while its rows are copied out, so the mapped pages do not pile up in this
        process's resident memory."""
        from safetensors import safe_open

        pairs = []
        for batch in self.batches:
            with safe_open(str(self.writer.batch_path(self.file_index(part, batch))), framework="pt") as handle:
                offset = handle.get_tensor("row_offsets")
                D, A = handle.get_tensor(f"D/{name}"), handle.get_tensor(f"A/{name}")
            pairs += [(D[offset[j]:offset[j + 1]], A[offset[j]:offset[j + 1]]) for j in range(len(offset) - 1)]
        return pairs

    def analyse(self, indices: Sequence[int] | None = None, rows: list[dict] | None = None) -> list[dict]:
        """Analyse the modules ``indices`` (default all; all of one pass) not yet checkpointed, ``workers``
        at a time (threads), then add the overlap-vs-n curves of their curve modules: the rows (every answer)
        are there before the costliest part. Checkpoints and progress reports happen in module order. Appends
        their table rows, in order, to ``rows`` (the rows of earlier passes) and returns it."""
        from concurrent.futures import ThreadPoolExecutor

        config, writer, modules = self.config, self.writer, self.modules
        indices = list(range(len(modules))) if indices is None else list(indices)
        part = indices[0] // (config.modules_per_pass or len(modules)) if indices else 0
        rows = [] if rows is None else rows
        references: dict[int, np.ndarray] = {}  # float64 safety bases of the deferred curves
        queue: collections.deque = collections.deque()  # (index, info, future, or None if checkpointed)

        def finish_oldest() -> None:
            index, info, future = queue.popleft()
            if future is not None:
                result = future.result()
                writer.save_module(index, result.arrays, result.row)
                if result.reference is not None:
                    references[index] = result.reference
            rows.append(writer.load_module(index)[1])
            self.analysed += 1
            self.report(f"analysed {info.label} ({index + 1}/{len(modules)})", "analyse", self.n_total,
                        self.analysed, rows)

        def arguments(info: ModuleInfo, curve_boot: int) -> tuple:
            return (info, self.read_pairs(info.name, part), config.n_safety, config.top_k, config.gram_route, config.seed,
                    curve_boot, self.chunk_bytes, str(self.device))

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for index in indices:
                info = modules[index]
                future = None
                if not writer.has_module(index):
                    self.check_cancel(f"after {index} of {len(modules)} modules")
                    curve_boot = config.curve_boot if info.name in self.curve_modules else 0
                    future = pool.submit(analyse_module, *arguments(info, curve_boot), defer_curve=True,
                                         n_boot=config.n_boot, n_perm=config.n_perm)
                queue.append((index, info, future))
                while queue and (queue[0][2] is None or sum(f is not None for _, _, f in queue) >= self.workers):
                    finish_oldest()
            while queue:
                finish_oldest()

            def add_curve(index: int) -> tuple[dict, dict]:
                info = modules[index]
                arrays, row = writer.load_module(index)
                if index not in references:  # resumed between the two passes: redo the module with its curve
                    result = analyse_module(*arguments(info, config.curve_boot), n_boot=config.n_boot,
                                            n_perm=config.n_perm)
                    return result.arrays, result.row
                pairs = self.read_pairs(info.name, part)[: config.n_safety]
                arrays.update(overlap_curve(pairs, references.pop(index), config.top_k, config.curve_boot,
                                            config.seed, self.chunk_bytes))
                return arrays, row

            in_pass = set(indices)
            pass_curves = [i for i in self.curve_indices if i in in_pass]
            todo = [i for i in pass_curves if rows[i]["has_curve"] and "curve.phi" not in writer.load_module(i)[0]]
            self.curves_done += len(pass_curves) - len(todo)
            curves: collections.deque = collections.deque()
            for index in todo:
                self.check_cancel(f"after {self.curves_done} of {len(self.curve_indices)} overlap-vs-n curves")
                curves.append((index, pool.submit(add_curve, index)))
                while curves and (len(curves) >= self.workers or index == todo[-1]):
                    finished, future = curves.popleft()
                    writer.save_module(finished, *future.result())
                    self.curves_done += 1
                    self.report(f"overlap-vs-n curve of {modules[finished].label} "
                                f"({self.curves_done}/{len(self.curve_indices)})", "analyse", self.n_total,
                                self.analysed, rows)
        return rows

    # -- 3. final files -----------------------------------------------------------------------------
    def finish(self, rows: list[dict], timings: dict, messages: list[str], keep_work: bool,
               session_start: float) -> RunResults:
        import pandas as pd

        files = ("spectra", "bases", "per_sample", "gram", "cross", "curves") + (
            ("resampling",) if self.config.n_boot or self.config.n_perm else ())
        arrays: dict[str, dict[str, np.ndarray]] = {f"{name}.safetensors": {} for name in files}
        arrays["per_sample.safetensors"].update(loss=self.losses, tokens=self.tokens)
        arrays["curves.safetensors"]["n"] = np.asarray(curve_sizes(self.config.n_safety))
        for index, info in enumerate(self.modules):
            module_arrays, _ = self.writer.load_module(index)
            for quantity, value in module_arrays.items():
                if quantity != "curve.n":
                    file, key = result_location(quantity, info.name)
                    arrays[file][key] = value
        set_of = ["safety"] * self.config.n_safety + ["utility"] * self.config.n_utility
        samples = [{"index": i, "set": set_of[i], "id": ex.id, "category": ex.category, "prompt": ex.prompt,
                    "response": ex.response, "n_tokens": int(self.tokens[i]), "truncated": self.truncated[i]}
                   for i, ex in enumerate(self.examples)]
        table = pd.DataFrame(list(rows), columns=list(TABLE_COLUMNS))
        table_json = {"columns": list(table.columns), "data": json.loads(table.to_json(orient="values")),
                      "dtypes": {column: str(dtype) for column, dtype in table.dtypes.items()}}
        timings["session_seconds"] = round(time.perf_counter() - session_start, 3)
        self.writer.finish(arrays, {SAMPLES_FILE: samples, TABLE_FILE: table_json}, keep_work=keep_work,
                           timings=timings, messages=messages, n_truncated=int(sum(self.truncated)),
                           total_tokens=int(self.tokens.sum()))
        results = self.writer.store.load(self.writer.run_id)
        self.report("done", "done", self.n_total, len(self.modules), rows)
        return results
