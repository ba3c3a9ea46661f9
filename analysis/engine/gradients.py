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
   Several processes (``torchrun``, :mod:`analysis.engine.distributed`) share the batches of a pass.
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

from analysis.core.config import ConfigError, ModelConfig, config_hash, to_jsonable
from analysis.core.results import SETS
from analysis.core.tasks import Cancelled, TaskContext
from analysis.engine.capture import ALL_KINDS, ModuleInfo, parse_layers

if TYPE_CHECKING:
    from analysis.core.results import RunResults

__all__ = [
    "CURVE_AUTO_LAYERS", "ENGINE_VERSION", "GRAM_ROUTES", "PERFORMANCE_FIELDS", "CollectionCancelled", "CollectionConfig",
    "collection_summary", "curve_modules", "load_set", "run_identity",
]

#: Bump when the engine's numbers change for the same config (invalidates stored runs).
ENGINE_VERSION = 1
GRAM_ROUTES = ("auto", "ghost", "dense")
PADDING_SIDES = ("left", "right")
#: CollectionConfig fields that change how a run is computed, never its numbers: not part of the run id.
PERFORMANCE_FIELDS = ("modules_per_pass",)
#: Allowed range of each integer setting (inclusive). The upper bounds are far above any real use (the largest
#: models' widths, context lengths) and stop typos that would allocate without limit or never end (top_k = 1e9
#: asked for 14.9 GiB; curve_boot = 1e8 random subsets per n ran for ever).
BOUNDS = {"n_safety": (1, 100_000), "n_utility": (1, 100_000), "max_length": (16, 131_072),
          "batch_size": (1, 4096), "top_k": (1, 4096), "curve_boot": (1, 10_000)}
#: Layers that get an overlap-vs-n curve with ``curve_layers="auto"`` (evenly spaced, first and last included).
CURVE_AUTO_LAYERS = 3



# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


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
    modules_per_pass: capture the factors of at most this many modules (in model order) per forward +
        backward pass over all samples, analyse and delete them, then the next group (0: all in one pass).
        Bounds the memory and disk of the factors by the group's; costs one more pass per group. A
        performance setting: the results are identical, so it is not part of the run id (PERFORMANCE_FIELDS).
    projection_dim: None (default, exact) or p: modules with min(d_out, d_in) > p get their factors sketched
        to p dims on both sides at capture (gradients P_out G_i P_in^T (p, p); memory and disk / (d/p)^2).
        Spectra, CER, ranks and cosines become Johnson-Lindenstrauss estimates; angles, overlaps and bases
        are in the sketch space, not weight space (:mod:`analysis.engine.sketch`). In the run id when set.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    safety: str = "safety"
    utility: str = "utility"
    n_safety: int = 32
    n_utility: int = 32
    safety_split: str | None = None
    utility_split: str | None = None
    layers: str = "all"
    kinds: str = "all"
    regex: str | None = None
    max_length: int = 128
    batch_size: int = 8
    padding_side: str = "right"
    top_k: int = 8
    seed: int = 0
    gram_route: str = "auto"
    curve_layers: str = "auto"
    curve_boot: int = 8
    modules_per_pass: int = 0
    projection_dim: int | None = None

    kind: ClassVar[str] = "collect"

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelConfig(source=self.model))
        elif isinstance(self.model, dict):
            object.__setattr__(self, "model", ModelConfig(**self.model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig or a source string, not {type(self.model).__name__}")
        if not isinstance(self.kinds, str):
            object.__setattr__(self, "kinds", ",".join(self.kinds))
        kinds = [k.strip() for k in self.kinds.split(",") if k.strip()]
        if self.kinds.strip().lower() not in ("all", "*", "") and all(k in ALL_KINDS for k in kinds):
            object.__setattr__(self, "kinds", ",".join(k for k in ALL_KINDS if k in kinds))  # canonical order
        for name in ("safety", "utility"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} dataset is empty: give a shipped name (e.g. {name!r}) or a file path")
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if isinstance(self.modules_per_pass, bool) or not isinstance(self.modules_per_pass, int) \
                or self.modules_per_pass < 0:
            raise ConfigError(f"modules_per_pass must be an integer >= 0 (0: all modules in one pass), "
                              f"got {self.modules_per_pass!r}")
        if self.projection_dim is not None and (isinstance(self.projection_dim, bool)
                                                or not isinstance(self.projection_dim, int) or self.projection_dim < 1):
            raise ConfigError(f"projection_dim must be None (exact) or an integer >= 1, got {self.projection_dim!r}")
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

    def execute(self, ctx: TaskContext) -> dict[str, Any]:
        """Collect (or resume, or reuse) the run on ``ctx.device``; returns :func:`collection_summary`."""
        from analysis.engine.collect import collect

        return collection_summary(collect(self, ctx=ctx))


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
    """What a run id hashes: the config (without PERFORMANCE_FIELDS, the model's placement, e.g. its
    device_map, and ``projection_dim`` when it is None, so exact runs keep their ids), the model's identity,
    the examples' fingerprints, ENGINE_VERSION."""
    settings = {key: value for key, value in to_jsonable(config, placement=False).items()
                if key not in PERFORMANCE_FIELDS}
    if settings.get("projection_dim") is None:
        settings.pop("projection_dim", None)
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
