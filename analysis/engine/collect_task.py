"""Exact per-sample gradient geometry of a model's linear modules: the collection task.

Public API (what the dashboard and the CLI use)
-----------------------------------------------
``CollectionConfig``            frozen, validated dataclass and task (``kind = "collect"``): what to collect
                                (model, datasets, n, modules, tokens, batch size, top-k, seed, Gram route,
                                overlap-vs-n curve settings). ``.run_id()`` is the id of its stored run (hash
                                of the config, the model's identity, the chosen examples' fingerprints and
                                ENGINE_VERSION; cheap: no model is loaded); ``.execute(ctx)`` collects it
                                (``analysis.engine.collect.collect``) and returns :func:`collection_summary`.
``load_set(config, which)``     the examples a collection uses for "safety" or "utility" (a Dataset).
``CollectionCancelled``         raised when the task is cancelled (an ``analysis.core.tasks.Cancelled``
                                with the partial run's ``run_id``); the work done so far is kept for resuming.
The work itself: ``analysis.engine.collect`` (the capture -> analyse -> store loop, progress and live data),
``analysis.engine.analyse`` (one module's results), ``analysis.engine.gram`` (exact Gram routes).

Pipeline, exactness and memory (DESIGN.md notation: A_i, D_i, G_i = D_i^T A_i)
------------------------------------------------------------------------------
The Gram matrix needs every pair of samples, also across batches, and there is no room to keep what it
needs in memory: the factors of all samples for all modules of SmolLM2 (n = 64, 64 tokens) are
n T sum(d_in + d_out) x 4 B = 64 x 63 x 305k x 4 B = 4.9 GB, the dense G_i 27 GB. So the work is split in
two passes that meet on disk:

1. capture (per batch): one batched forward + one backward of sum_i L_i gives the factors A_i, D_i of every
   sample for every selected module (``analysis.engine.capture``). They are written in float32 (float64 for a
   float64 model; a bfloat16 model's factors are widened to float32, so every sum and Gram product after
   the capture accumulates in float32 or float64) to one safetensors file per batch in the run's ``work/``.
   ``modules_per_pass`` splits the modules into groups captured by one pass each (analysed and deleted
   before the next pass): memory and disk of the factors shrink to one group's, the results are identical.
   Several processes (``torchrun``, :mod:`analysis.engine.sharded`) share the batches of a pass.
   Memory: model + one batch's autograd graph + that batch's factors (8 x 64 tokens: ~0.6 GB).
   Disk: all factors of the run (4.9 GB = 4.6 GiB above), deleted when the run completes.
2. analyse (per module): the factors of all n samples for ONE module are read back (each batch file is
   memory-mapped only while its rows are copied) and everything is computed exactly from them: the Gram
   matrix K (n x n) by the cheaper exact route (``gram.gram_costs``: ghost, or dense chunks of vec(G_i) whose
   size is bounded by ``chunk_bytes``), the set sums of G_i (dense, one module at a time), full spectra and
   top-k bases of the batch means (``analyse.batch_svd``), per-sample top-k SVDs and single-sample overlaps
   (``geometry.factored_svd_batched``, no dense G_i), cross-set cosine / principal angles / overlap, Gram-derived
   sample-view metrics, and the overlap-vs-n curve for the curve modules (``geometry.overlap_vs_n``). Every
   module's row comes first; the curves (the costliest part: bootstrap subsets, their dense subset sums
   decomposed by the top-k eigenpairs of their Gram) follow in a second pass, so the whole table is there early.
   Memory: one module's factors (gate_proj above: 35 MB) + one dense chunk (<= chunk_bytes; 226 MB).
Measured on SmolLM2, all 210 modules, n = 64, batch 8: peak RSS 2.1 GiB, of which 0.4 GiB is the loaded
model (bench/engine.py); the capture stage sets the peak.
Every number is exact up to floating-point rounding unless ``projection_dim`` is set (off by default): then
the factors of modules wider than it are sketched at capture (:mod:`analysis.engine.sketch`, which says
which metrics stay meaningful) and the run's manifest says so (``"projection"``). Products run in the
model dtype (float32: Gram entries to ~1e-6 relative); spectra, SVDs and overlaps in float64 (geometry).
numpy's BLAS runs single-threaded (``analysis.engine.collect.numpy_single_threaded``) with ``workers``
modules analysed in parallel; torch keeps the threads its process was given (``TaskContext.threads``).

The work files are the checkpoints: a restarted run skips finished batches and modules and gives arrays
identical to an uninterrupted run (tests/test_store.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from analysis.core.config import ConfigError, ModelConfig, config_hash
from analysis.core.options import check_bounds, identity_values, option
from analysis.core.tasks import Cancelled, TaskContext, register_task
from analysis.engine.results import SETS
from analysis.llm.anatomy import ALL_KINDS, ModuleInfo, parse_layers

if TYPE_CHECKING:
    from analysis.engine.results import RunResults

__all__ = [
    "CURVE_AUTO_LAYERS", "ENGINE_VERSION", "GRAM_ROUTES", "CollectionCancelled", "CollectionConfig",
    "collection_summary", "curve_modules", "load_set", "run_identity",
]

#: Bump when the engine's numbers change for the same config (invalidates stored runs).
ENGINE_VERSION = 1
GRAM_ROUTES = ("auto", "ghost", "dense")
PADDING_SIDES = ("left", "right")
#: Layers that get an overlap-vs-n curve with ``curve_layers="auto"`` (evenly spaced, first and last included).
CURVE_AUTO_LAYERS = 3



# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@register_task
@dataclasses.dataclass(frozen=True)
class CollectionConfig:
    """What to collect. Validated on construction (ConfigError names the field and what is allowed).

    model: which model (``ModelConfig``; a source string is accepted and converted).
    safety / utility: shipped dataset name (``"safety"``, ``"utility"``, ...) or a file path
        (see ``analysis.llm.data.load_any``); ``*_split``: only that split of the file (None = all).
    n_safety / n_utility: samples per set, taken with ``Dataset.take(n, seed)``.
    layers / kinds / regex: module selection (``analysis.engine.capture.select_modules``), e.g. "0-3,7", "q,v,down".
    max_length: tokens per sample (longer conversations are truncated, see ``analysis.llm.formatting``).
    batch_size: samples per forward/backward; padding_side: "right" or "left".
    top_k: subspace dimension k of the batch and per-sample top-k SVDs.
    seed: sample selection, randomized SVD, bootstrap of the overlap-vs-n curve.
    gram_route: "auto" (cheaper of the two by the cost model), "ghost" or "dense"; both exact.
    curve_layers: layers whose modules get an overlap-vs-n curve: "auto" (first, middle and last selected
        layer), "all", "none" or a layer list "0,10,20"; curve_boot: random subsets per n. The curve costs
        about twice the rest of a module's analysis (a dense SVD per large subset), hence a subset of layers.
    n_boot / n_perm: bootstrap replicates (95% percentile intervals of every per-module metric) and
        permutations (null model of claims I-III) computed beside the point estimates and stored with the run
        (:mod:`analysis.engine.resampling`; seeded by ``seed``; 0: none). In the run id unless both are 0.
    modules_per_pass: capture the factors of at most this many modules (in model order) per forward +
        backward pass over all samples, analyse and delete them, then the next group (0: all in one pass).
        Bounds the memory and disk of the factors by the group's; costs one more pass per group. A
        performance setting: the results are identical, so it is not part of the run id (``run_id=False``).
    projection_dim: None (default, exact) or p: modules with min(d_out, d_in) > p get their factors sketched
        to p dims on both sides at capture (gradients P_out G_i P_in^T (p, p); memory and disk / (d/p)^2).
        Spectra, CER, ranks and cosines become Johnson-Lindenstrauss estimates; angles, overlaps and bases
        are in the sketch space, not weight space (:mod:`analysis.engine.sketch`). In the run id when set.
    memory_budget / disk_budget (GiB), workers, chunk_mb, force, keep_work, store: how to run it (refuse a plan
        over budget, modules analysed in parallel, dense chunk size, recompute, keep factor files, runs folder);
        they never change the numbers, so they are not in the run id.
    """

    model: ModelConfig = option(help="the model whose gradients are collected", default_factory=ModelConfig)
    safety: str = option("safety", help="shipped dataset name or file (refusals to harmful prompts)")
    utility: str = option("utility", help="shipped dataset name or file (benign tasks)")
    n_safety: int = option(32, help="safety samples", minimum=1, maximum=100_000)
    n_utility: int = option(32, help="utility samples", minimum=1, maximum=100_000)
    safety_split: str | None = option(None, help="use only this split of the safety file")
    utility_split: str | None = option(None, help="use only this split of the utility file")
    layers: str = option("all", help="layers, e.g. 0-29, 0-3,7 or all")
    kinds: str = option("all", flag="--modules", help="module kinds, e.g. q,k,v,o,gate,up,down or all")
    regex: str | None = option(None, help="select modules whose HF path matches (replaces --layers/--modules)")
    max_length: int = option(128, help="tokens per sample", minimum=16, maximum=131_072)
    batch_size: int = option(8, help="samples per forward + backward", minimum=1, maximum=4096)
    padding_side: str = option("right", help="padding side of a batch", choices=("right", "left"))
    top_k: int = option(8, help="subspace dimension k (at most the smaller side of a module)", minimum=1,
                        maximum=4096)
    seed: int = option(0, help="sample selection, randomized SVD, bootstrap of the curve")
    gram_route: str = option("auto", help="exact Gram route (auto: the cheaper by the cost model)",
                             choices=("auto", "ghost", "dense"))
    curve_layers: str = option("auto", help="overlap-vs-n curve layers: auto, all, none, 0,10")
    curve_boot: int = option(8, help="random subsets per n for the overlap-vs-n curve", minimum=1, maximum=10_000)
    n_boot: int = option(200, minimum=0, maximum=100_000,
                         help="bootstrap replicates (prompts resampled) for the metrics' 95% intervals (0: none)")
    n_perm: int = option(200, minimum=0, maximum=100_000,
                         help="label permutations for the null model's p-values (0: none)")
    modules_per_pass: int = option(0, help="capture at most this many modules per forward+backward pass (0: all; "
                                           "bounds memory and disk; same numbers)", minimum=0, run_id=False)
    projection_dim: int | None = option(None, metavar="P", legacy=True, minimum=1,
                                        help="sketch the factors of modules with min(d_out, d_in) > P to P dims "
                                             "(random projection; spectra/cosines approximate, angles in sketch "
                                             "space; off: exact)")
    # how to run it: never changes the numbers, so never in the run id
    memory_budget: float | None = option(None, metavar="GiB", run_id=False, minimum=0,
                                         help="refuse to start when the planned peak memory is above this")
    disk_budget: float | None = option(None, metavar="GiB", run_id=False, minimum=0,
                                       help="refuse to start when the planned factor files need more disk than this")
    workers: int | None = option(None, run_id=False, minimum=1, maximum=256,
                                 help="modules analysed in parallel (off: min(2, CPUs))")
    chunk_mb: int = option(512, run_id=False, minimum=1, maximum=1_048_576,
                           help="memory for one module's dense G_i chunk (MiB)")
    force: bool = option(False, run_id=False, help="recompute even if the run exists")
    keep_work: bool = option(False, run_id=False, help="keep the per-batch factor files of the run")
    store: str | None = option(None, run_id=False, metavar="FOLDER", help="runs folder (off: cache/runs)")

    kind: ClassVar[str] = "collect"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", ModelConfig.coerce(self.model))
        if not isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", ",".join(self.kinds))
        kinds = [k.strip() for k in self.kinds.split(",") if k.strip()]
        if self.kinds.strip().lower() not in ("all", "*", "") and all(k in ALL_KINDS for k in kinds):
            object.__setattr__(self, "kinds", ",".join(k for k in ALL_KINDS if k in kinds))  # canonical order
        for name in ("safety", "utility"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} dataset is empty: give a shipped name (e.g. {name!r}) or a file path")
        for name in ("n_safety", "n_utility", "max_length", "batch_size", "top_k", "curve_boot", "n_boot", "n_perm",
                     "modules_per_pass", "projection_dim", "workers", "chunk_mb"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
        check_bounds(self)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}")
        if self.gram_route not in GRAM_ROUTES:
            raise ConfigError(f"gram_route must be one of {GRAM_ROUTES}, got {self.gram_route!r}")
        if not isinstance(self.curve_layers, str):
            raise ConfigError(f"curve_layers must be 'auto', 'all', 'none' or a layer list, got {self.curve_layers!r}")

    @classmethod
    def from_dict(cls, values: dict) -> CollectionConfig:
        """Inverse of ``to_jsonable(config)`` (e.g. ``RunResults.config``); unknown keys raise ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown collection settings {unknown}")
        values = dict(values)
        if isinstance(values.get("model"), dict):
            values["model"] = ModelConfig(**values["model"])
        return cls(**values)

    @property
    def n_total(self) -> int:
        return self.n_safety + self.n_utility


    def run_id(self, datasets: Mapping[str, Any] | None = None) -> str:
        """Id of this config's stored run: hash of the config, ``model_identity(self.model)``, the chosen
        examples' fingerprints and ENGINE_VERSION. Cheap: reads the dataset files, never the model weights.
        ``datasets``: the already loaded ``{set: load_set(self, set)}`` (else they are loaded)."""
        from analysis.llm.models import model_identity

        if datasets is None:
            datasets = {which: load_set(self, which) for which in SETS}
        return config_hash(run_identity(self, model_identity(self.model), datasets))

    def announce(self, device: str = "cpu") -> list[str]:
        """The plan (memory, disk, time; :mod:`analysis.engine.planner`) printed before a run; raises an InputError
        when it is over ``memory_budget`` / ``disk_budget``."""
        from analysis.engine.planner import plan_collection

        plan = plan_collection(self, device=device, chunk_bytes=self.chunk_mb * 2**20)
        plan.check(memory_budget=None if self.memory_budget is None else self.memory_budget * 2**30,
                   disk_budget=None if self.disk_budget is None else self.disk_budget * 2**30)
        return plan.lines()

    def execute(self, ctx: TaskContext) -> dict[str, Any]:
        """Collect (or resume, or reuse) the run on ``ctx.device``; returns :func:`collection_summary`."""
        import time

        from analysis.engine.collect import collect
        from analysis.engine.results import CollectionStore

        start = time.perf_counter()
        results = collect(self, store=CollectionStore(self.store), ctx=ctx, force=self.force,
                          keep_work=self.keep_work, workers=self.workers, chunk_bytes=self.chunk_mb * 2**20)
        return dict(collection_summary(results), seconds=round(time.perf_counter() - start, 3))

    @staticmethod
    def print_result(summary: Mapping[str, Any]) -> None:
        """The printed summary of a finished collection (its run read back from the summary's folder)."""
        from pathlib import Path

        from analysis.engine.cli import print_summary
        from analysis.engine.results import CollectionStore

        if "seconds" in summary:
            print(f"done in {summary['seconds']:.1f} s")
        print_summary(CollectionStore(Path(summary["folder"]).parent).load(summary["run_id"]))


class CollectionCancelled(Cancelled):
    """The collection was cancelled; finished batches/modules are kept and the next collect() resumes.
    ``run_id`` names the partial run."""


# --------------------------------------------------------------------------------------------------
# datasets, modules, run id
# --------------------------------------------------------------------------------------------------


def load_set(config: CollectionConfig, which: str):
    """The examples a collection uses for one set ("safety" or "utility"): ``analysis.llm.data.Dataset`` of
    ``n_<set>`` examples taken with ``Dataset.take(n, seed)`` (file order). Raises DataError/ConfigError."""
    from analysis.llm.data import load_any

    dataset = load_any(getattr(config, which))
    split = getattr(config, f"{which}_split")
    if split:
        dataset = dataset.split(split)
    if dataset.prompts_only:
        raise ConfigError(f"{which} dataset {getattr(config, which)!r} has no responses: a gradient needs a "
                          "response to score")
    return dataset.take(getattr(config, f"n_{which}"), seed=config.seed)



def curve_modules(config: CollectionConfig, modules: Sequence[ModuleInfo]) -> list[str]:
    """HF paths of the selected ``modules`` that get an overlap-vs-n curve (``config.curve_layers``)."""
    text = config.curve_layers.strip().lower()
    layers = sorted({m.layer for m in modules if m.layer is not None})
    if text == "none" or not layers:
        return []
    if text == "all":
        wanted = set(layers)
    elif text == "auto":
        picks = np.unique(np.round(np.linspace(0, len(layers) - 1, min(CURVE_AUTO_LAYERS, len(layers)))).astype(int))
        wanted = {layers[i] for i in picks}
    else:
        wanted = set(parse_layers(text, max(layers) + 1))
    return [m.name for m in modules if m.layer in wanted]



def run_identity(config: CollectionConfig, model_identity: str, datasets: Mapping[str, Any]) -> dict:
    """What a run id hashes: the config's identity values (:func:`analysis.core.options.identity_values`: without
    the fields that only say how or where it runs, and ``projection_dim`` while it is None, so exact runs keep
    their ids), the model's identity, the examples' fingerprints, ENGINE_VERSION. Legacy exception beside the
    declared ones: a run without resampling (n_boot = n_perm = 0) keeps the id it had before they existed."""
    settings = identity_values(config)
    if not config.n_boot and not config.n_perm:
        settings.pop("n_boot", None)
        settings.pop("n_perm", None)
    return {
        "config": settings,
        "model_identity": model_identity,
        "datasets": {which: datasets[which].fingerprint() for which in SETS},
        "engine": ENGINE_VERSION,
    }


def collection_summary(results: RunResults) -> dict[str, Any]:
    """JSON-able summary of a finished run (what ``execute`` returns): run id, folder, sizes, timings, notes."""
    manifest = results.manifest
    return {"run_id": results.run_id, "folder": str(results.folder), "n_modules": len(results.modules),
            "n_safety": int(results.config["n_safety"]), "n_utility": int(results.config["n_utility"]),
            "top_k": results.top_k, "timings": dict(manifest.get("timings", {})),
            "n_truncated": int(manifest.get("n_truncated", 0)), "messages": list(results.messages)}
