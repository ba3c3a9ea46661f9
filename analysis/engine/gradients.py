"""Exact per-sample gradient geometry of a model's linear modules: the collection engine.

Public API (what the dashboard and the CLI use)
-----------------------------------------------
``CollectionConfig``            frozen, validated dataclass: what to collect (model, datasets, n, modules,
                                tokens, batch size, top-k, seed, Gram route, overlap-curve settings).
``collect(config, *, model=None, store=None, progress=None, cancel=None, force=False, keep_work=False,
          chunk_bytes=512 MiB, workers=None) -> RunResults``
                                run (or resume, or reuse) a collection and return its results
                                (``analysis.core.store.RunResults``). Same config -> the stored run is loaded
                                instantly; an interrupted run resumes from its last finished batch/module;
                                a damaged run is recomputed (the reason is in ``results.messages``).
``run_id_for(config, model=None) -> str``
                                the run id (= hash of config, model identity, the chosen examples'
                                fingerprints and ENGINE_VERSION) without collecting.
``load_set(config, which)``     the examples a collection uses for "safety" or "utility" (a Dataset).
``Progress``                    the ``partial_results`` object passed to the progress callback.
``CollectionCancelled``         raised when ``cancel`` is set; the work done so far is kept for resuming.
Building blocks (tested, used by the bench): ``analyse_module``, ``gram_matrix``, ``gram_costs``, ``batch_svd``.

Progress callback: ``progress(done_samples, total_samples, message, partial: Progress)``, called after every
captured batch and every analysed module (during analysis done_samples == total_samples; use
``partial.fraction`` for one overall bar). ``partial`` carries live data for charts: per-sample losses so
far, running spectra / CER / effective rank / cosine of a few preview modules while capturing, and the
per-module metrics rows finished so far while analysing.
Cancel: a ``threading.Event``; checked between batches and between modules.

Pipeline, exactness and memory (DESIGN.md notation: A_i, D_i, G_i = D_i^T A_i)
------------------------------------------------------------------------------
The Gram matrix needs every pair of samples, also across batches, and there is no room to keep what it
needs in memory: the factors of all samples for all modules of SmolLM2 (n = 64, 64 tokens) are
n T sum(d_in + d_out) x 4 B = 64 x 63 x 305k x 4 B = 4.9 GB, the dense G_i 27 GB. So the work is split in
two passes that meet on disk:

1. capture (per batch): one batched forward + one backward of sum_i L_i gives the factors A_i, D_i of every
   sample for every selected module (``analysis.engine.capture``). They are written, in the model dtype (float32;
   float64 for a float64 model), to one safetensors file per batch in the run's ``work/`` folder.
   Memory: model + one batch's autograd graph + that batch's factors (8 x 64 tokens: ~0.6 GB).
   Disk: all factors of the run (4.9 GB = 4.6 GiB above), deleted when the run completes.
2. analyse (per module): the factors of all n samples for ONE module are read back (each batch file is
   memory-mapped only while its rows are copied) and everything is computed exactly from them: the Gram
   matrix K (n x n) by the cheaper exact route (``gram_costs``: ghost, or dense chunks of vec(G_i) whose
   size is bounded by ``chunk_bytes``), the set sums of G_i (dense, one module at a time), full spectra and
   top-k bases of the batch means (``batch_svd``), per-sample top-k SVDs and single-sample overlaps
   (``geometry.factored_svd_batched``, no dense G_i), cross-set cosine / principal angles / overlap, Gram-derived
   sample-view metrics, and the overlap-vs-n curve for the curve modules (``geometry.overlap_vs_n``).
   Memory: one module's factors (gate_proj above: 35 MB) + one dense chunk (<= chunk_bytes; 226 MB).
Measured on SmolLM2, all 210 modules, n = 64, batch 8: peak RSS 2.1 GiB, of which 0.4 GiB is the loaded
model (bench/engine.py); the capture stage sets the peak.
Every number is exact up to floating-point rounding; no random projection is used. Products run in the
model dtype (float32: Gram entries to ~1e-6 relative); spectra, SVDs and overlaps in float64 (geometry).
The analysis runs single-threaded per module (``single_threaded``) with ``workers`` modules in parallel.

The work files are the checkpoints: a restarted run skips finished batches and modules and gives arrays
identical to an uninterrupted run (tests/test_store.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import platform
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Sequence

import numpy as np
import torch

from analysis.core.config import ConfigError, ModelConfig, config_hash, to_jsonable
from analysis.core.store import ETAS, SETS, RunResults, RunStore, RunWriter, StoreError
from analysis.engine import geometry as geo
from analysis.engine.capture import (
    ALL_KINDS,
    BatchFactors,
    ModuleInfo,
    capture_batch,
    find_linear_modules,
    parse_layers,
    select_modules,
)
from analysis.llm.formatting import tokenize_batch

if TYPE_CHECKING:
    from analysis.llm.models import LoadedModel

__all__ = [
    "CollectionCancelled", "CollectionConfig", "ENGINE_VERSION", "GRAM_ROUTES", "ModuleAnalysis", "Progress",
    "analyse_module", "batch_svd", "collect", "curve_sizes", "gram_costs", "gram_matrix", "load_set", "run_id_for",
    "single_threaded",
]

#: Bump when the engine's numbers change for the same config (invalidates stored runs).
ENGINE_VERSION = 1
GRAM_ROUTES = ("auto", "ghost", "dense")
PADDING_SIDES = ("left", "right")
#: Memory for one module's dense G_i chunk (dense Gram route) or row blocks (ghost route), in bytes.
DEFAULT_CHUNK_BYTES = 512 * 2**20
#: Layers that get an overlap-vs-n curve with ``curve_layers="auto"`` (evenly spaced, first and last included).
CURVE_AUTO_LAYERS = 3
#: Number of modules whose running spectra are shown while capturing.
PREVIEW_MODULES = 4


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
        positive = {"n_safety": 1, "n_utility": 1, "max_length": 16, "batch_size": 1, "top_k": 1, "curve_boot": 1}
        for name, low in positive.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
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


class CollectionCancelled(RuntimeError):
    """The cancel event was set; finished batches/modules are kept and the next collect() resumes."""

    def __init__(self, run_id: str, message: str):
        super().__init__(message)
        self.run_id = run_id


@dataclasses.dataclass
class Progress:
    """``partial_results`` of the progress callback (live data for charts).

    stage: "capture" (forward/backward per batch) or "analyse" (per module) or "done"; fraction: overall
    in [0, 1] (capture is counted as the first ``capture_share`` of the work). losses: (n,) per-sample
    losses so far (nats, NaN for samples not reached yet), safety first. preview (while capturing, for
    ``PREVIEW_MODULES`` modules spread over the selection): {module HF path: {"label", "safety" (singular
    values of the running batch-mean gradient, or None before the first batch of the set),
    "safety_cer", "safety_effective_rank", the same for "utility", "cosine" (cos(G_s, G_u) so far or None)}}.
    table: per-module metric rows finished so far (pandas.DataFrame, columns as ``RunResults.table``).
    """

    run_id: str
    stage: str
    fraction: float
    done_samples: int
    total_samples: int
    done_modules: int
    total_modules: int
    losses: np.ndarray
    preview: dict[str, dict[str, Any]]
    table: Any = None
    capture_share: float = 0.4


ProgressFn = Callable[[int, int, str, Progress], None]


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


def _select(config: CollectionConfig, model) -> list[ModuleInfo]:
    return select_modules(find_linear_modules(model), config.layers, config.kinds, config.regex)


def _curve_modules(config: CollectionConfig, modules: Sequence[ModuleInfo]) -> list[str]:
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


def _identity(config: CollectionConfig, loaded, datasets: dict) -> dict:
    return {
        "config": to_jsonable(config),
        "model_identity": loaded.identity,
        "datasets": {which: datasets[which].fingerprint() for which in SETS},
        "engine": ENGINE_VERSION,
    }


def run_id_for(config: CollectionConfig, model: LoadedModel | None = None) -> str:
    """Run id = hash of the config, the model's identity, the chosen examples and the engine version."""
    from analysis.llm.models import load_model

    loaded = model if model is not None else load_model(config.model)
    datasets = {which: load_set(config, which) for which in SETS}
    return config_hash(_identity(config, loaded, datasets))


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "engine": str(ENGINE_VERSION)}
    for package in ("torch", "transformers", "numpy", "scipy", "safetensors", "scikit-learn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


# --------------------------------------------------------------------------------------------------
# Gram matrices (exact) from factors
# --------------------------------------------------------------------------------------------------


def gram_costs(tokens: Sequence[int], d_out: int, d_in: int, chunk_samples: int) -> dict[str, float]:
    """Multiply-adds of the two exact Gram routes (DESIGN.md cost model) for samples with ``tokens`` rows.

    ghost: (sum_i T_i)^2 (d_in + d_out): the products D D^T and A A^T over all rows.
    dense: forming the G_i (T_i d_out d_in each) plus n^2 d_out d_in for the products vec(G) vec(G)^T. With
    chunks of ``chunk_samples`` (memory bound), B chunks, the block loop forms (B + 1) / 2 chunks per chunk.
    Per pair of samples this is T^2 (d_in + d_out) vs about (T (B + 1) / 2n + 1) d_out d_in.
    """
    n = len(tokens)
    rows = float(sum(tokens))
    size = float(d_out) * d_in
    formations = (math.ceil(n / max(1, chunk_samples)) + 1) / 2
    return {"ghost": rows * rows * (d_in + d_out), "dense": formations * rows * size + n * n * size}


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _dense_gradients(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(c, d_out * d_in): the rows vec(G_i) = vec(D_i^T A_i) of a chunk of samples.

    One batched product over factors zero-padded to the longest T_i (zero rows add nothing; one bmm is
    about twice as fast as c separate products)."""
    D = torch.nn.utils.rnn.pad_sequence([D for D, _ in pairs], batch_first=True)
    A = torch.nn.utils.rnn.pad_sequence([A for _, A in pairs], batch_first=True)
    return torch.bmm(D.transpose(1, 2), A).reshape(len(pairs), -1)


def _self_gram(F: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """F F^T (c, c) as float64 from rows F (c, P), computing only the lower block triangle of ``parts`` x
    ``parts`` blocks and mirroring it: (parts + 1) / (2 parts) of the multiply-adds of one full product."""
    K = torch.empty(F.shape[0], F.shape[0], dtype=torch.float64)
    cuts = _chunks(F.shape[0], max(1, math.ceil(F.shape[0] / parts)))
    for p, rows_p in enumerate(cuts):
        for rows_q in cuts[: p + 1]:
            block = (F[rows_p] @ F[rows_q].T).double()
            K[rows_p, rows_q] = block
            K[rows_q, rows_p] = block.T
    return K


def _ghost_blocks(tokens: Sequence[int], max_rows: int) -> list[slice]:
    """Consecutive samples grouped so that each block has at most ``max_rows`` rows (or one sample)."""
    blocks, start, rows = [], 0, 0
    for i, t in enumerate(tokens):
        if rows and rows + t > max_rows:
            blocks.append(slice(start, i))
            start, rows = i, 0
        rows += t
    blocks.append(slice(start, len(tokens)))
    return blocks


def gram_matrix(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], route: str,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES, set_sizes: Sequence[int] = ()
                ) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Exact Gram matrix K (n, n), K_ij = <G_i, G_j>_F of G_i = D_i^T A_i, as float64 numpy.

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)) per sample, torch. route "dense": chunks of vec(G_i) (two
    chunks alive, at most ``chunk_bytes``) multiplied together; "ghost": K_ij = sum_ts (D_i D_j^T)_ts
    (A_i A_j^T)_ts over row blocks (two (rows x rows) products alive, at most ``chunk_bytes``). Products run
    in the factors' dtype (float32 for a float32 model: relative error ~1e-6 of ||G_i|| ||G_j||).
    Also returns the sum of G_i over each group of consecutive samples of sizes ``set_sizes`` (e.g.
    (n_s, n_u)), dense (d_out, d_in): free on the dense route, one matmul per group on the ghost route.
    """
    n = len(pairs)
    d_out, d_in = pairs[0][0].shape[1], pairs[0][1].shape[1]
    dtype = pairs[0][0].dtype
    itemsize = pairs[0][0].element_size()
    group_starts = np.concatenate([[0], np.cumsum(set_sizes)]).astype(int)
    K = torch.zeros(n, n, dtype=torch.float64)
    sums = [torch.zeros(d_out, d_in, dtype=dtype) for _ in set_sizes]
    if route == "dense":
        blocks = _chunks(n, max(1, int(chunk_bytes // (2 * d_out * d_in * itemsize))))
        for a, block_a in enumerate(blocks):
            left = _dense_gradients(pairs[block_a])
            for g in range(len(set_sizes)):  # group sums from the rows of this chunk
                lo, hi = max(group_starts[g], block_a.start), min(group_starts[g + 1], block_a.stop)
                if lo < hi:
                    sums[g] += left[lo - block_a.start:hi - block_a.start].sum(dim=0).view(d_out, d_in)
            K[block_a, block_a] = _self_gram(left)
            for block_b in blocks[:a]:
                block = (left @ _dense_gradients(pairs[block_b]).T).double()
                K[block_a, block_b] = block
                K[block_b, block_a] = block.T
    elif route == "ghost":
        tokens = [D.shape[0] for D, _ in pairs]

        def stacked(block: slice):
            """Rows of a block of samples, and the (samples x rows) 0/1 matrix summing rows per sample."""
            D = torch.cat([pairs[i][0] for i in range(block.start, block.stop)])
            A = torch.cat([pairs[i][1] for i in range(block.start, block.stop)])
            owner = torch.repeat_interleave(torch.arange(block.stop - block.start), torch.tensor(tokens[block]))
            segments = torch.zeros(block.stop - block.start, D.shape[0], dtype=dtype)
            segments[owner, torch.arange(D.shape[0])] = 1
            return D, A, segments

        blocks = _ghost_blocks(tokens, max(1, int(math.sqrt(chunk_bytes / (2 * itemsize)))))
        for a, block_a in enumerate(blocks):
            Da, Aa, Sa = stacked(block_a)
            for block_b in blocks[: a + 1]:
                Db, Ab, Sb = (Da, Aa, Sa) if block_b == block_a else stacked(block_b)
                block = (Sa @ ((Da @ Db.T) * (Aa @ Ab.T)) @ Sb.T).double()
                K[block_a, block_b] = block
                K[block_b, block_a] = block.T
        for g in range(len(set_sizes)):
            group = pairs[group_starts[g]:group_starts[g + 1]]
            sums[g] = torch.cat([D for D, _ in group]).T @ torch.cat([A for _, A in group])
    else:
        raise ConfigError(f"gram route must be 'ghost' or 'dense', got {route!r}")
    K = 0.5 * (K + K.T)
    return K.numpy(), sums


# --------------------------------------------------------------------------------------------------
# per-module analysis
# --------------------------------------------------------------------------------------------------

#: Singular directions with s <= NULL_RTOL * s_1 are treated as null (dropped from bases).
NULL_RTOL = 1e-10


@dataclasses.dataclass
class ModuleAnalysis:
    """Everything computed for one module: ``arrays`` (quantity -> numpy array, keys as in
    ``analysis.core.store.ARRAY_FILES`` without the module part) and ``row`` (its metrics-table row)."""

    arrays: dict[str, np.ndarray]
    row: dict[str, Any]


def _or_nan(function: Callable[[], Any]) -> Any:
    """Value of ``function()``, or NaN when geometry says it is undefined (e.g. a zero gradient)."""
    try:
        return function()
    except geo.GeometryError:
        return float("nan")


@functools.lru_cache(maxsize=64)
def _random_baseline(d: int, k: int) -> dict:
    return geo.random_overlap_baseline(d, k, n_draws=200)


def _nonnull(U: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Columns of U whose singular value is above the null threshold."""
    if s.size == 0 or s[0] <= 0:
        return U[:, :0]
    return U[:, s > NULL_RTOL * s[0]]


def _spectrum_row(prefix: str, s: np.ndarray) -> dict[str, float]:
    summary = geo.spectrum_summary(s, eta=0.9)
    row = {
        f"{prefix}_s1": summary["s1"],
        f"{prefix}_frobenius": math.sqrt(summary["energy"]),
        f"{prefix}_top1_energy": summary["top1_energy"],
        f"{prefix}_effective_rank": summary["effective_rank"],
        f"{prefix}_stable_rank": summary["stable_rank"],
        f"{prefix}_participation_ratio": summary["participation_ratio"],
    }
    for eta in ETAS:
        row[f"{prefix}_k{round(eta * 100)}"] = geo.k_at_energy(s, eta)
    return row


#: Eigenvalue floor (relative) of the batch basis: directions with s_j <= 1e-6 s_1 are not kept in U_k / V_k.
BASIS_FLOOR = 1e-12


def batch_svd(G: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All singular values s (min(d_out, d_in),) and top-k singular vectors U_k (d_out, k'), V_k (d_in, k')
    of a dense gradient G (d_out, d_in), float64, from the Gram matrix of its smaller side.

    C = G G^T (or G^T G) is the Gram matrix of G's rows (columns): ``geometry.gram_basis(C)`` gives its
    eigenvalues s_j^2 (zeros and rounding negatives read as s_j = 0, as in ``geometry.gram_spectrum``) and
    eigenvectors; the top k are U_k (or V_k), and the other side is G^T U_k / s_k (or G V_k / s_k). Exact up to rounding and 2-3x cheaper than a dense SVD with vectors (1536 x 576: 0.13 s vs
    0.33 s). Rounding: the relative error of s_j is ~1e-16 (s_1 / s_j)^2 (1e-12 at s_j = 1e-2 s_1, 1e-8 at
    1e-4 s_1); values below ~1e-8 s_1 are noise (clipped at 0). Directions with
    s_j <= 1e-6 s_1 (BASIS_FLOOR on eigenvalues) are dropped from the bases, so k' <= k.
    """
    left_small = G.shape[0] <= G.shape[1]
    C = G @ G.T if left_small else G.T @ G
    E, L = geo.gram_basis(C, floor=0.0)  # every positive eigenvalue (one eigendecomposition)
    s = np.zeros(min(G.shape))
    s[: L.size] = np.sqrt(L)
    keep = min(k, int(np.count_nonzero(L > BASIS_FLOOR * L[0]))) if L.size else 0
    E, s_k = E[:, :keep], s[:keep]
    other = (G.T @ E if left_small else G @ E) / s_k
    U_k, V_k = (E, other) if left_small else (other, E)
    return s, U_k, V_k


def curve_sizes(n_safety: int) -> list[int]:
    """Subset sizes of the overlap-vs-n curve: 1, 2, 4, ... below n_safety, then n_safety."""
    sizes = [1 << p for p in range(max(1, n_safety).bit_length()) if (1 << p) < n_safety]
    return sizes + [n_safety]


def analyse_module(info: ModuleInfo, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], n_safety: int,
                   top_k: int, route: str = "auto", seed: int = 0, curve_boot: int = 0,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ModuleAnalysis:
    """All results of one module from the factors of all samples (safety first, then utility).

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)) torch tensors per sample. ``curve_boot`` > 0 adds the
    overlap-vs-n curve of the safety set (subset sizes :func:`curve_sizes`, that many draws per size).
    Undefined quantities (e.g. a module whose gradient is exactly zero) are NaN.
    """
    n = len(pairs)
    n_utility = n - n_safety
    tokens = [D.shape[0] for D, _ in pairs]
    itemsize = pairs[0][0].element_size()
    per_chunk = max(1, int(chunk_bytes // (2 * info.d_out * info.d_in * itemsize)))
    if route == "auto":
        costs = gram_costs(tokens, info.d_out, info.d_in, per_chunk)
        route = min(costs, key=costs.get)
    K, sums = gram_matrix(pairs, route, chunk_bytes, (n_safety, n_utility))
    arrays: dict[str, np.ndarray] = {"gram": K}
    row: dict[str, Any] = {"module": info.name, "label": info.label, "layer": info.layer, "kind": info.kind,
                           "d_out": info.d_out, "d_in": info.d_in, "route": route}
    means, bases = {}, {}
    members = {"safety": range(0, n_safety), "utility": range(n_safety, n)}
    for which, total in zip(SETS, sums):
        G = (total.double() / len(members[which])).numpy()
        s, U_k, V_k = batch_svd(G, top_k)
        means[which], bases[which] = G, U_k
        arrays[which] = s
        arrays[f"{which}.U"] = U_k.astype(np.float32)
        arrays[f"{which}.V"] = V_k.astype(np.float32)
        row.update(_spectrum_row(which, s))
        sample_s = np.zeros((len(members[which]), top_k))
        phi = np.full(len(members[which]), np.nan)
        top1 = np.full(len(members[which]), np.nan)
        per_sample = geo.factored_svd_batched([pairs[i] for i in members[which]], top_k)
        for row_index, (U_i, s_i, _) in enumerate(per_sample):
            sample_s[row_index, : s_i.size] = s_i
            basis_i = _nonnull(U_i, s_i)
            if basis_i.shape[1] and U_k.shape[1]:
                overlap = geo.single_sample_overlap(basis_i, U_k)
                phi[row_index], top1[row_index] = overlap["phi"], overlap["top1_abs_cos"]
        arrays[f"{which}.s"], arrays[f"{which}.phi"], arrays[f"{which}.top1"] = sample_s, phi, top1
        row[f"{which}_sample_phi_mean"] = float(np.nanmean(phi)) if np.isfinite(phi).any() else float("nan")
        row[f"{which}_sample_top1_mean"] = float(np.nanmean(top1)) if np.isfinite(top1).any() else float("nan")
        block = K[members[which]][:, members[which]]
        row[f"{which}_gram_effective_rank"] = _or_nan(lambda: geo.gram_effective_rank(block))
    row["cosine_su"] = _or_nan(lambda: geo.cosine(means["safety"], means["utility"]))
    k_su = min(bases["safety"].shape[1], bases["utility"].shape[1])
    angles = _or_nan(lambda: geo.principal_angles(bases["safety"], bases["utility"])) if k_su else float("nan")
    arrays["angles"] = np.atleast_1d(np.asarray(angles, dtype=float))
    row["angle_su_min"] = float(np.nanmin(arrays["angles"])) if np.isfinite(arrays["angles"]).any() else float("nan")
    row["phi_su"] = _or_nan(lambda: geo.subspace_overlap(bases["safety"], bases["utility"]))
    baseline = _random_baseline(info.d_out, max(1, min(top_k, info.d_out)))
    row.update(phi_baseline=baseline["expected"], phi_baseline_q05=baseline["q05"], phi_baseline_q95=baseline["q95"])
    K_ss, K_su, K_uu = K[:n_safety, :n_safety], K[:n_safety, n_safety:], K[n_safety:, n_safety:]
    cross = _or_nan(lambda: geo.cross_cosines_from_gram(K_su, np.diag(K_ss), np.diag(K_uu)))
    row["cross_cos_mean"] = float(np.mean(cross)) if np.ndim(cross) else float("nan")
    row["cross_cos_frac_negative"] = geo.fraction_negative(cross) if np.ndim(cross) else float("nan")
    row["gram_phi_su"] = _or_nan(lambda: geo.gram_subspace_overlap(K_ss, K_su, K_uu))
    row["has_curve"] = bool(curve_boot) and bases["safety"].shape[1] > 0
    if row["has_curve"]:
        arrays.update(_overlap_curve(pairs[:n_safety], bases["safety"], top_k, curve_boot, seed, chunk_bytes))
    return ModuleAnalysis(arrays, row)


def _overlap_curve(pairs, reference: np.ndarray, top_k: int, n_boot: int, seed: int, chunk_bytes: int) -> dict:
    """Overlap-vs-n curve of one set (geometry.overlap_vs_n) against its batch top-k basis ``reference``.

    Subsets whose stacked rows are few use the factored route (a (D, A) pair); larger subsets are summed
    from dense per-sample gradients when those fit in ``chunk_bytes``. The full set (n = n_set) is one
    draw repeated: every subset of size n_set is the whole set.
    """
    n = len(pairs)
    d_out, d_in = pairs[0][0].shape[1], pairs[0][1].shape[1]
    dense = None
    if n * d_out * d_in * pairs[0][0].element_size() <= chunk_bytes:
        dense = _dense_gradients(pairs).view(n, d_out, d_in)
    rows = np.array([D.shape[0] for D, _ in pairs])

    def subset(idx: np.ndarray):
        if dense is None or rows[idx].sum() < min(d_out, d_in) // 2:
            return (torch.cat([pairs[i][0] for i in idx]).numpy(), torch.cat([pairs[i][1] for i in idx]).numpy())
        return dense[torch.as_tensor(idx)].sum(dim=0).numpy()

    sizes = curve_sizes(n)
    partial = geo.overlap_vs_n(subset, top_k, sizes[:-1], n_boot=n_boot, seed=seed, n_samples=n,
                               reference=reference) if len(sizes) > 1 else None
    full = geo.overlap_vs_n(subset, top_k, sizes[-1:], n_boot=1, seed=seed, n_samples=n, reference=reference)
    phi = np.vstack(([] if partial is None else [partial["phi"]]) + [np.repeat(full["phi"], n_boot, axis=1)])
    top1 = np.concatenate(([] if partial is None else [partial["top1_mean"]]) + [full["top1_mean"]])
    return {"curve.n": np.asarray(sizes), "curve.phi": phi, "curve.top1": top1}


# --------------------------------------------------------------------------------------------------
# collection: capture -> analyse -> store
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


class _Preview:
    """Running batch-mean gradients of a few modules, for live charts while capturing.

    Spectra are recomputed only for the set that received samples since the last snapshot."""

    def __init__(self, modules: Sequence[ModuleInfo]):
        picks = np.unique(np.round(np.linspace(0, len(modules) - 1, min(PREVIEW_MODULES, len(modules)))).astype(int))
        self.modules = [modules[i] for i in picks]
        self.sums: dict[tuple[str, str], torch.Tensor] = {}
        self.counts = {which: 0 for which in SETS}
        self.entries: dict[str, dict[str, Any]] = {m.name: {"label": m.label, "cosine": None} for m in self.modules}
        for entry in self.entries.values():
            entry.update({f"{which}{suffix}": None for which in SETS for suffix in ("", "_cer", "_effective_rank")})
        self.dirty: set[str] = set()

    def add(self, which: str, n_samples: int, factors: Callable[[str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.counts[which] += n_samples
        for m in self.modules:
            D, A = factors(m.name)
            total = (D.T @ A).double()
            key = (m.name, which)
            self.sums[key] = total if key not in self.sums else self.sums[key] + total
        self.dirty.add(which)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        for m in self.modules:
            entry = self.entries[m.name]
            means = {which: (self.sums[(m.name, which)] / self.counts[which]).numpy()
                     for which in SETS if (m.name, which) in self.sums}
            for which in self.dirty & set(means):
                spectrum = geo.singular_values(means[which])
                entry.update({which: spectrum, f"{which}_cer": geo.cumulative_energy(spectrum),
                              f"{which}_effective_rank": geo.effective_rank(spectrum)})
            if self.dirty and len(means) == 2:
                entry["cosine"] = _or_nan(lambda: geo.cosine(means["safety"], means["utility"]))
        self.dirty.clear()
        return {name: dict(entry) for name, entry in self.entries.items()}


def _batch_arrays(factors: BatchFactors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one batch checkpoint: losses, row offsets, and "D/<module>", "A/<module>" factors."""
    arrays = {"loss": factors.losses.double(), "row_offsets": factors.row_offsets}
    for name in factors.inputs:
        arrays[f"D/{name}"] = factors.output_grads[name].to(dtype).contiguous()
        arrays[f"A/{name}"] = factors.inputs[name].to(dtype).contiguous()
    return arrays


def _table(rows: Sequence[dict]):
    import pandas as pd

    from analysis.core.store import TABLE_COLUMNS

    return pd.DataFrame(list(rows), columns=list(TABLE_COLUMNS))


def collect(config: CollectionConfig, *, model: LoadedModel | None = None, store: RunStore | None = None,
            progress: ProgressFn | None = None, cancel: threading.Event | None = None, force: bool = False,
            keep_work: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES, workers: int | None = None) -> RunResults:
    """Collect (or resume, or reuse) the run of ``config`` and return its results.

    model: an already loaded ``analysis.llm.models.LoadedModel`` for ``config.model`` (else it is loaded).
    store: where runs live (default ``RunStore()`` under cache_dir()/runs).
    progress: ``progress(done_samples, total_samples, message, partial: Progress)``; cancel: a
    threading.Event checked between batches and modules (raises CollectionCancelled, work is kept).
    force: recompute even if a complete run exists. keep_work: keep the per-batch factor files.
    chunk_bytes: memory for one module's dense G_i chunk. workers: modules analysed in parallel (threads,
    each single-threaded; default min(2, CPUs)); the numbers do not depend on it.
    A complete, intact run is loaded without computing; a damaged one (size/sha256 mismatch) is
    recomputed and the returned results carry the reason in ``.messages`` (also warned).
    """
    from analysis.llm.models import load_model

    store = store if store is not None else RunStore()
    session_start = time.perf_counter()
    if model is None:
        model = load_model(config.model)
    elif model.source != config.model.source:
        raise ConfigError(f"the given model is {model.source!r} but the config asks for {config.model.source!r}")
    datasets = {which: load_set(config, which) for which in SETS}
    modules = _select(config, model.model)
    run_id = config_hash(_identity(config, model, datasets))

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
        warnings.warn(message, stacklevel=2)

    curve_modules = set(_curve_modules(config, modules))
    manifest = {
        "config": to_jsonable(config),
        "model": {"source": model.source, "name": model.name, "identity": model.identity,
                  "family": getattr(model.model.config, "model_type", type(model.model).__name__)},
        "datasets": {which: {"source": datasets[which].source, "name": datasets[which].name,
                             "content_hash": datasets[which].content_hash,
                             "fingerprint": datasets[which].fingerprint(), "n": len(datasets[which])}
                     for which in SETS},
        "modules": [dataclasses.asdict(m) for m in modules],
        "curve_modules": [m.name for m in modules if m.name in curve_modules],
        "n_batches": len(_plan_batches(config)),
        "versions": _versions(),
        "engine": ENGINE_VERSION,
    }
    writer = store.open_run(run_id, manifest)
    job = _Collection(config, model, modules, [ex for which in SETS for ex in datasets[which].examples],
                      curve_modules, writer, progress, cancel, chunk_bytes, workers or min(2, os.cpu_count() or 1))
    was_training = model.model.training
    model.model.eval()  # dropout off: per-sample gradients are exact only in eval mode
    try:
        with single_threaded(torch_too=False):
            capture_seconds = job.capture()
            analyse_start = time.perf_counter()
            with single_threaded():
                rows = job.analyse()
            timings = {"capture_seconds": round(capture_seconds, 3),
                       "analyse_seconds": round(time.perf_counter() - analyse_start, 3),
                       "model_load_seconds": round(model.load_seconds, 3)}
            return job.finish(rows, timings, messages, keep_work, session_start)
    finally:
        model.model.train(was_training)
        writer.close()


@contextlib.contextmanager
def single_threaded(torch_too: bool = True):
    """Run numpy/scipy BLAS (and torch, if ``torch_too``) on one thread inside the block (restored afterwards).

    The analysis stage is thousands of small and medium matrix products and LAPACK calls; on this kind of
    work a second BLAS/OpenMP thread buys little, and on a busy machine it costs a lot (every parallel
    region waits for a time slice for its second thread: measured 30 ms for a 48 x 64 product). The
    capture stage (large model matmuls) keeps torch's threads; numpy is single-threaded throughout.
    """
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    if torch_too:
        torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


class _Collection:
    """One collection in progress: capture every batch, analyse every module, write the final files."""

    CAPTURE_SHARE = 0.4  # share of the progress bar given to the capture stage

    def __init__(self, config: CollectionConfig, model: LoadedModel, modules: list[ModuleInfo], examples: list,
                 curve_modules: set[str], writer: RunWriter, progress: ProgressFn | None,
                 cancel: threading.Event | None, chunk_bytes: int, workers: int):
        self.config, self.model, self.modules, self.examples = config, model, modules, examples
        self.curve_modules, self.writer, self.progress, self.cancel = curve_modules, writer, progress, cancel
        self.chunk_bytes, self.workers = chunk_bytes, workers
        self.batches = _plan_batches(config)
        self.n_total = config.n_total
        self.losses = np.full(self.n_total, np.nan)
        self.tokens = np.zeros(self.n_total, dtype=np.int64)
        self.truncated = [False] * self.n_total
        self.preview = _Preview(modules) if progress is not None else None

    # -- progress and cancel ------------------------------------------------------------------------
    def report(self, message: str, stage: str, done_samples: int, done_modules: int, rows=None) -> None:
        if self.progress is None:
            return
        share = self.CAPTURE_SHARE
        fraction = share * done_samples / self.n_total + (1 - share) * done_modules / len(self.modules)
        partial = Progress(self.writer.run_id, stage, min(1.0, fraction), done_samples, self.n_total,
                           done_modules, len(self.modules), self.losses.copy(),
                           self.preview.snapshot() if stage == "capture" else {},
                           None if rows is None else _table(rows), share)
        self.progress(done_samples, self.n_total, message, partial)

    def check_cancel(self, where: str) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CollectionCancelled(self.writer.run_id, f"collection cancelled {where}; collect again with the "
                                                          "same settings to resume from there")

    # -- 1. capture ---------------------------------------------------------------------------------
    def capture(self) -> float:
        """Capture every batch not yet checkpointed (finished ones are read back). Returns seconds."""
        from safetensors import safe_open

        start = time.perf_counter()
        dtype = _factor_dtype(self.model.model)
        done = 0
        for batch in self.batches:
            samples = list(batch.samples)
            if self.writer.has_batch(batch.index):
                with safe_open(str(self.writer.batch_path(batch.index)), framework="pt") as handle:
                    losses, offsets = handle.get_tensor("loss"), handle.get_tensor("row_offsets")
                    truncated = json.loads(handle.metadata()["truncated"])
                    if self.preview is not None:
                        self.preview.add(batch.which, len(samples),
                                         lambda name: (handle.get_tensor(f"D/{name}"), handle.get_tensor(f"A/{name}")))
                message = f"batch {batch.index + 1}/{len(self.batches)} ({batch.which}) read from checkpoint"
            else:
                self.check_cancel(f"after {done} of {self.n_total} samples")
                tokenized = tokenize_batch(self.model.tokenizer, [self.examples[i].messages for i in samples],
                                           self.config.max_length, self.config.padding_side)
                factors = capture_batch(self.model.model, tokenized, self.modules)
                self.writer.save_batch(batch.index, _batch_arrays(factors, dtype),
                                       {"truncated": json.dumps(tokenized.truncated), "set": batch.which})
                losses, offsets, truncated = factors.losses, factors.row_offsets, tokenized.truncated
                if self.preview is not None:
                    self.preview.add(batch.which, len(samples),
                                     lambda name: (factors.output_grads[name], factors.inputs[name]))
                del factors
                message = f"captured batch {batch.index + 1}/{len(self.batches)} ({batch.which})"
            self.losses[samples] = losses.double().numpy()
            self.tokens[samples] = (offsets[1:] - offsets[:-1]).numpy()
            for j, i in enumerate(samples):
                self.truncated[i] = bool(truncated[j])
            done += len(samples)
            self.report(message, "capture", done, 0)
        return time.perf_counter() - start

    # -- 2. analyse ---------------------------------------------------------------------------------
    def read_pairs(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(D_i, A_i) of every sample for one module. Each batch file is opened (memory-mapped) only while
        its rows are copied out, so the mapped pages do not pile up in this process's resident memory."""
        from safetensors import safe_open

        pairs = []
        for batch in self.batches:
            with safe_open(str(self.writer.batch_path(batch.index)), framework="pt") as handle:
                offset = handle.get_tensor("row_offsets")
                D, A = handle.get_tensor(f"D/{name}"), handle.get_tensor(f"A/{name}")
            pairs += [(D[offset[j]:offset[j + 1]], A[offset[j]:offset[j + 1]]) for j in range(len(offset) - 1)]
        return pairs

    def analyse(self) -> list[dict]:
        """Analyse every module not yet checkpointed, ``workers`` at a time (threads); checkpoints and
        progress reports happen in module order. Returns the table rows of all modules, in order."""
        from concurrent.futures import ThreadPoolExecutor

        config, writer, modules = self.config, self.writer, self.modules
        rows: list[dict] = []
        queue: collections.deque = collections.deque()  # (index, info, future, or None if checkpointed)

        def finish_oldest() -> None:
            index, info, future = queue.popleft()
            if future is not None:
                result = future.result()
                writer.save_module(index, result.arrays, result.row)
            rows.append(writer.load_module(index)[1])
            self.report(f"analysed {info.label} ({index + 1}/{len(modules)})", "analyse", self.n_total, index + 1, rows)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for index, info in enumerate(modules):
                future = None
                if not writer.has_module(index):
                    self.check_cancel(f"after {index} of {len(modules)} modules")
                    curve_boot = config.curve_boot if info.name in self.curve_modules else 0
                    future = pool.submit(analyse_module, info, self.read_pairs(info.name), config.n_safety,
                                         config.top_k, config.gram_route, config.seed, curve_boot, self.chunk_bytes)
                queue.append((index, info, future))
                while queue and (queue[0][2] is None or sum(f is not None for _, _, f in queue) >= self.workers):
                    finish_oldest()
            while queue:
                finish_oldest()
        return rows

    # -- 3. final files -----------------------------------------------------------------------------
    def finish(self, rows: list[dict], timings: dict, messages: list[str], keep_work: bool,
               session_start: float) -> RunResults:
        from analysis.core.store import SAMPLES_FILE, TABLE_FILE, result_location

        files = ("spectra", "bases", "per_sample", "gram", "cross", "curves")
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
        table = _table(rows)
        table_json = {"columns": list(table.columns), "data": json.loads(table.to_json(orient="values")),
                      "dtypes": {column: str(dtype) for column, dtype in table.dtypes.items()}}
        timings["session_seconds"] = round(time.perf_counter() - session_start, 3)
        self.writer.finish(arrays, {SAMPLES_FILE: samples, TABLE_FILE: table_json}, keep_work=keep_work,
                           timings=timings, messages=messages, n_truncated=int(sum(self.truncated)),
                           total_tokens=int(self.tokens.sum()))
        results = self.writer.store.load(self.writer.run_id)
        self.report("done", "done", self.n_total, len(self.modules), rows)
        return results
