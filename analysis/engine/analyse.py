"""Per-module analysis: everything computed exactly from the factors (D_i, A_i) of all samples of one module.

:func:`analyse_module` gives the Gram matrix (:mod:`analysis.engine.gram`), the spectra and top-k bases of
the two set means (:func:`batch_svd`), per-sample top-k SVDs and single-sample overlaps, cross-set cosine,
principal angles and overlap, Gram-derived sample-view metrics, and optionally the overlap-vs-n curve.
Products run in the factors' dtype; spectra, SVDs and overlaps in float64 (``analysis.engine.geometry``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from analysis.engine import geometry as geo
from analysis.engine.gram import DEFAULT_CHUNK_BYTES, dense_gradients, gram_costs, gram_matrix
from analysis.engine.resampling import CORE_RANK, resample_module, unrelated_phi
from analysis.engine.results import ETAS, SETS
from analysis.llm.anatomy import ModuleInfo

__all__ = ["BASIS_FLOOR", "CURVE_DENSE", "NULL_RTOL", "ModuleAnalysis", "analyse_module", "batch_svd", "curve_sizes",
           "or_nan", "overlap_curve"]

#: Singular directions with s <= NULL_RTOL * s_1 are treated as null (dropped from bases).
NULL_RTOL = 1e-10
#: How the overlap-vs-n curve decomposes its dense subset sums (``geometry.overlap_vs_n(dense=...)``): "eig"
#: (top-k eigenpairs of the subset's Gram; ~5x cheaper than "svd", the exact SVD used before; same phi to
#: ~1e-10, tests/test_engine_speed.py).
CURVE_DENSE = "eig"


@dataclasses.dataclass
class ModuleAnalysis:
    """Everything computed for one module: ``arrays`` (quantity -> numpy array, keys as in
    ``ARRAY_FILES`` without the module part) and ``row`` (its metrics-table row)."""

    arrays: dict[str, np.ndarray]
    row: dict[str, Any]
    #: the safety top-k basis U_k (d_out, k') in float64 when the curve was deferred (``defer_curve``), else None;
    #: not stored (the stored "safety.U" is float32): :func:`overlap_curve` needs it to give the same numbers.
    reference: np.ndarray | None = None


def or_nan(function: Callable[[], Any]) -> Any:
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
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, device: str = "cpu",
                   curve_dense: str = CURVE_DENSE, defer_curve: bool = False, n_boot: int = 0,
                   n_perm: int = 0, core_rank: int = CORE_RANK) -> ModuleAnalysis:
    """All results of one module from the factors of all samples (safety first, then utility).

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)) torch tensors per sample (sketched factors (T_i, p) of a
    projected module, :mod:`analysis.engine.sketch`: the row keeps ``info``'s shape, the costs and the random
    overlap baseline use the factors' widths). ``curve_boot`` > 0 adds the
    overlap-vs-n curve of the safety set (subset sizes :func:`curve_sizes`, that many draws per size).
    Undefined quantities (e.g. a module whose gradient is exactly zero) are NaN. ``device``: where the
    Gram products run (the factors are copied there for them; everything else runs on the CPU).
    ``curve_dense``: decomposition of the curve's dense subset sums, "eig" (default) or "svd" (the old route).
    ``defer_curve``: leave the curve out (the row still says ``has_curve``) and return its float64 reference
    basis in ``.reference``; :func:`overlap_curve` adds it later with the same numbers.
    ``n_boot`` / ``n_perm`` > 0 add the bootstrap replicates / permutation null of the module's metrics
    (:func:`analysis.engine.resampling.resample_module`, arrays ``resampling.*``; ``core_rank``: directions per
    side of its spectral core, CORE_RANK by default).
    """
    n = len(pairs)
    n_utility = n - n_safety
    tokens = [D.shape[0] for D, _ in pairs]
    itemsize = pairs[0][0].element_size()
    d_out, d_in = pairs[0][0].shape[1], pairs[0][1].shape[1]  # info's shape, or (p, p) when sketched
    per_chunk = max(1, int(chunk_bytes // (2 * d_out * d_in * itemsize)))
    if route == "auto":
        costs = gram_costs(tokens, d_out, d_in, per_chunk)
        route = min(costs, key=costs.get)
    on_device = pairs if torch.device(device).type == "cpu" else [(D.to(device), A.to(device)) for D, A in pairs]
    K, sums = gram_matrix(on_device, route, chunk_bytes, (n_safety, n_utility))
    del on_device
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
        sample_bases = []
        for row_index, (U_i, s_i, _) in enumerate(per_sample):
            sample_s[row_index, : s_i.size] = s_i
            basis_i = _nonnull(U_i, s_i)
            sample_bases.append(basis_i)
            if basis_i.shape[1] and U_k.shape[1]:
                overlap = geo.single_sample_overlap(basis_i, U_k)
                phi[row_index], top1[row_index] = overlap["phi"], overlap["top1_abs_cos"]
        if which == "utility":  # claim III's baseline: an unrelated (utility) sample against the safety batch
            utility_to_safety = unrelated_phi(sample_bases, bases["safety"])
        arrays[f"{which}.s"], arrays[f"{which}.phi"], arrays[f"{which}.top1"] = sample_s, phi, top1
        row[f"{which}_sample_phi_mean"] = float(np.nanmean(phi)) if np.isfinite(phi).any() else float("nan")
        row[f"{which}_sample_top1_mean"] = float(np.nanmean(top1)) if np.isfinite(top1).any() else float("nan")
        block = K[members[which]][:, members[which]]
        row[f"{which}_gram_effective_rank"] = or_nan(lambda block=block: geo.gram_effective_rank(block))
    row["cosine_su"] = or_nan(lambda: geo.cosine(means["safety"], means["utility"]))
    k_su = min(bases["safety"].shape[1], bases["utility"].shape[1])
    angles = or_nan(lambda: geo.principal_angles(bases["safety"], bases["utility"])) if k_su else float("nan")
    arrays["angles"] = np.atleast_1d(np.asarray(angles, dtype=float))
    row["angle_su_min"] = float(np.nanmin(arrays["angles"])) if np.isfinite(arrays["angles"]).any() else float("nan")
    row["phi_su"] = or_nan(lambda: geo.subspace_overlap(bases["safety"], bases["utility"]))
    baseline = _random_baseline(d_out, max(1, min(top_k, d_out)))
    row.update(phi_baseline=baseline["expected"], phi_baseline_q05=baseline["q05"], phi_baseline_q95=baseline["q95"])
    K_ss, K_su, K_uu = K[:n_safety, :n_safety], K[:n_safety, n_safety:], K[n_safety:, n_safety:]
    cross = or_nan(lambda: geo.cross_cosines_from_gram(K_su, np.diag(K_ss), np.diag(K_uu)))
    row["cross_cos_mean"] = float(np.mean(cross)) if np.ndim(cross) else float("nan")
    row["cross_cos_frac_negative"] = geo.fraction_negative(cross) if np.ndim(cross) else float("nan")
    row["gram_phi_su"] = or_nan(lambda: geo.gram_subspace_overlap(K_ss, K_su, K_uu))
    if n_boot or n_perm:
        resampled = resample_module(pairs, K, n_safety, top_k, n_boot, n_perm, seed, row, arrays["safety.phi"],
                                    arrays["safety.top1"], utility_to_safety, core_rank)
        arrays.update({f"resampling.{key}": value for key, value in resampled.items()})
    row["has_curve"] = bool(curve_boot) and bases["safety"].shape[1] > 0
    if row["has_curve"] and defer_curve:
        return ModuleAnalysis(arrays, row, reference=bases["safety"])
    if row["has_curve"]:
        arrays.update(overlap_curve(pairs[:n_safety], bases["safety"], top_k, curve_boot, seed, chunk_bytes,
                                    curve_dense))
    return ModuleAnalysis(arrays, row)


def overlap_curve(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], reference: np.ndarray, top_k: int, n_boot: int,
                  seed: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES, dense_route: str = CURVE_DENSE) -> dict:
    """Overlap-vs-n curve of one set (geometry.overlap_vs_n) against its batch top-k basis ``reference``
    (float64 (d_out, k'), e.g. ``ModuleAnalysis.reference``); pairs: (D_i, A_i) of the set's samples.
    Returns {"curve.n" (m,), "curve.phi" (m, n_boot), "curve.top1" (m,)}.

    Subsets whose stacked rows are few use the factored route (a (D, A) pair); larger subsets are summed
    from dense per-sample gradients when those fit in ``chunk_bytes``. The full set (n = n_set) is one
    draw repeated: every subset of size n_set is the whole set.
    """
    n = len(pairs)
    d_out, d_in = pairs[0][0].shape[1], pairs[0][1].shape[1]
    dense = None
    if n * d_out * d_in * pairs[0][0].element_size() <= chunk_bytes:
        dense = dense_gradients(pairs).view(n, d_out, d_in)
    rows = np.array([D.shape[0] for D, _ in pairs])

    def subset(idx: np.ndarray):
        if dense is None or rows[idx].sum() < min(d_out, d_in) // 2:
            return (torch.cat([pairs[i][0] for i in idx]).numpy(), torch.cat([pairs[i][1] for i in idx]).numpy())
        return dense[torch.as_tensor(idx)].sum(dim=0).numpy()

    sizes = curve_sizes(n)
    partial = geo.overlap_vs_n(subset, top_k, sizes[:-1], n_boot=n_boot, seed=seed, n_samples=n,
                               reference=reference, dense=dense_route) if len(sizes) > 1 else None
    full = geo.overlap_vs_n(subset, top_k, sizes[-1:], n_boot=1, seed=seed, n_samples=n, reference=reference,
                            dense=dense_route)
    phi = np.vstack(([] if partial is None else [partial["phi"]]) + [np.repeat(full["phi"], n_boot, axis=1)])
    top1 = np.concatenate(([] if partial is None else [partial["top1_mean"]]) + [full["top1_mean"]])
    return {"curve.n": np.asarray(sizes), "curve.phi": phi, "curve.top1": top1}


