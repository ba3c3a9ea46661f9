"""Sample view: spectra, ranks and subspace overlaps from Gram matrices K (n x n) of per-sample gradients, and
single-sample estimates (overlap of one sample's top-k with the batch, overlap vs n)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg as sla

from analysis.engine.geometry.base import GeometryError, as_array, check_k, check_orthonormal
from analysis.engine.geometry.spectra import effective_rank
from analysis.engine.geometry.subspaces import subspace_overlap
from analysis.engine.geometry.svd import factored_svd, stack_factors, top_singular, top_singular_eig

__all__ = [
    "gram_basis", "gram_effective_rank", "gram_principal_angles", "gram_spectrum", "gram_subspace_overlap",
    "overlap_vs_n", "single_sample_overlap"
]

# --------------------------------------------------------------------------------------------------
# sample view (Gram matrices)
# --------------------------------------------------------------------------------------------------


def _gram(K: Any, name: str, psd_tol: float) -> np.ndarray:
    """Validate a Gram matrix: square, symmetric to psd_tol * max|K|; returns its symmetric part."""
    Km = as_array(K, name, ndim=2)
    if Km.shape[0] != Km.shape[1]:
        raise GeometryError(f"{name} must be square, got {Km.shape}")
    scale = np.max(np.abs(Km))
    if np.max(np.abs(Km - Km.T)) > psd_tol * scale:
        raise GeometryError(f"{name} is not symmetric (relative tolerance {psd_tol:g})")
    return 0.5 * (Km + Km.T)


def gram_basis(K: Any, floor: float = 1e-10, psd_tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-basis of a Gram matrix kept above a relative floor: (E (n, r), L (r,) descending).

    K = E L E^T + (discarded part); eigenvalues <= floor * max eigenvalue are discarded (they are rounding
    noise or near-duplicate samples; in singular-value terms the cut is sqrt(floor) relative). The
    columns of E L^{-1/2} give the coefficients of an orthonormal basis of span{g_i} in terms of the g_i.
    Eigenvalues below -psd_tol * max|eig| mean K is not a Gram matrix: GeometryError. A zero K gives an
    empty basis (n, 0).
    """
    Km = _gram(K, "K", psd_tol)
    lam, E = sla.eigh(Km, check_finite=False)
    lam, E = lam[::-1], E[:, ::-1]
    top = max(lam[0], 0.0)
    if lam[-1] < -psd_tol * max(top, np.max(np.abs(lam))):
        raise GeometryError(f"K is not positive semi-definite (min eigenvalue {lam[-1]:.3e}, max {lam[0]:.3e})")
    if top == 0:
        return np.zeros((Km.shape[0], 0)), np.zeros(0)
    keep = lam > floor * top
    return E[:, keep], lam[keep]


def gram_spectrum(K: Any, psd_tol: float = 1e-6) -> np.ndarray:
    """Singular values of the stacked matrix [vec G_1 ... vec G_n] from K (n, n), K_ij = <G_i, G_j>_F.

    = sqrt(eigvalsh(K)) with negative rounding noise clipped to 0, descending, shape (n,), units of G.
    K must be symmetric (relative tolerance psd_tol) and not clearly indefinite (GeometryError).
    """
    Km = _gram(K, "K", psd_tol)
    lam = sla.eigvalsh(Km, check_finite=False)[::-1]
    if lam[-1] < -psd_tol * np.max(np.abs(lam)):
        raise GeometryError(f"K is not positive semi-definite (min eigenvalue {lam[-1]:.3e}, max {lam[0]:.3e})")
    return np.sqrt(np.clip(lam, 0.0, None))


def gram_effective_rank(K: Any) -> float:
    """Effective rank (Roy & Vetterli) of the sample span, from :func:`gram_spectrum`; 0 for zero K."""
    return effective_rank(gram_spectrum(K))


def _gram_cosines_of_spans(K_ss: Any, K_su: Any, K_uu: Any, floor: float) -> np.ndarray:
    """Cosines of the principal angles between span{g^s} and span{g^u}, descending, from Gram blocks."""
    Es, Ls = gram_basis(K_ss, floor)
    Eu, Lu = gram_basis(K_uu, floor)
    Ksu = as_array(K_su, "K_su", ndim=2)
    if Ksu.shape != (Es.shape[0], Eu.shape[0]):
        raise GeometryError(f"K_su shape {Ksu.shape} != ({Es.shape[0]}, {Eu.shape[0]})")
    if Ls.size == 0 or Lu.size == 0:
        raise GeometryError("gram principal angles: a sample span is zero (all-zero Gram block)")
    C = (Es / np.sqrt(Ls)).T @ Ksu @ (Eu / np.sqrt(Lu))
    return np.clip(sla.svdvals(C, check_finite=False), 0.0, 1.0)


def gram_principal_angles(K_ss: Any, K_su: Any, K_uu: Any, floor: float = 1e-10) -> np.ndarray:
    """Principal angles (radians, ascending) between span{g_i^s} and span{g_j^u} from Gram blocks only.

    K_ss (n_s, n_s), K_su (n_s, n_u), K_uu (n_u, n_u) with K_ab[i, j] = <G_i^a, G_j^b>_F. Each diagonal
    block is whitened by its eigendecomposition K = E L E^T keeping eigenvalues > floor * max eigenvalue
    (relative floor; this handles rank-deficient blocks, e.g. duplicated samples), then
    C = L_s^{-1/2} E_s^T K_su E_u L_u^{-1/2} and angles = arccos(clip(svd(C), 0, 1)).
    Returns min(r_s, r_u) angles. Accuracy: arccos is ill-conditioned at 0, so angles below ~1e-7 rad
    read as 0; directions close to the floor amplify errors in K_su. A zero block raises GeometryError.
    """
    return np.arccos(_gram_cosines_of_spans(K_ss, K_su, K_uu, floor))


def gram_subspace_overlap(K_ss: Any, K_su: Any, K_uu: Any, floor: float = 1e-10) -> float:
    """phi between the two sample spans (mean cos^2 of :func:`gram_principal_angles`), in [0, 1]."""
    c = _gram_cosines_of_spans(K_ss, K_su, K_uu, floor)
    return float(np.mean(c**2))


# --------------------------------------------------------------------------------------------------
# single-sample estimates
# --------------------------------------------------------------------------------------------------


def single_sample_overlap(U_i: Any, U_batch: Any) -> dict[str, float]:
    """How well one sample's subspace U_i (d, k_i) matches the batch subspace U_batch (d, k).

    Both orthonormal, columns ordered by singular value. Returns dict(phi=:func:`subspace_overlap`,
    top1_abs_cos=|<u1_i, u1>| of the two leading directions, k=min(k_i, k)).
    """
    A = as_array(U_i, "U_i", ndim=2, allow_empty=True)
    B = as_array(U_batch, "U_batch", ndim=2, allow_empty=True)
    phi = subspace_overlap(A, B)
    return {"phi": phi, "top1_abs_cos": float(min(abs(A[:, 0] @ B[:, 0]), 1.0)), "k": min(A.shape[1], B.shape[1])}


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2


def _subset_source(samples: Any, n_samples: int | None) -> tuple[Callable[[np.ndarray], Any], int]:
    """Normalise the inputs of overlap_vs_n to (subset -> matrix or (D, A) pair, n_total)."""
    if callable(samples):
        if n_samples is None:
            raise GeometryError("overlap_vs_n: pass n_samples when samples is a callable")
        return samples, check_k(n_samples, "n_samples")
    if isinstance(samples, (list, tuple)) and len(samples) and _is_pair(samples[0]):
        pairs = [(as_array(D, f"D[{i}]", 2, True), as_array(A, f"A[{i}]", 2, True)) for i, (D, A) in enumerate(samples)]
        return (lambda idx: stack_factors([pairs[i] for i in idx])), len(pairs)
    G = as_array(samples if not isinstance(samples, (list, tuple)) else np.stack([as_array(g, "G_i", 2) for g in samples]),
                 "per-sample gradients", ndim=3)
    return (lambda idx: G[idx].sum(axis=0)), G.shape[0]


def _subset_basis(obj: Any, k: int, side: str, rtol: float, seed: int, dense: str = "svd") -> np.ndarray:
    """Top-k left (side="left") or right singular basis of a dense matrix or factor pair, null dropped.
    dense: "svd" (:func:`top_singular`) or "eig" (:func:`top_singular_eig`) for a dense matrix."""
    if _is_pair(obj):
        U, s, V = factored_svd(obj[0], obj[1], k)
    elif dense == "eig":
        U, s, V = top_singular_eig(obj, k)
    else:
        U, s, V = top_singular(obj, k, seed=seed)
    if s.size == 0 or s[0] == 0:
        raise GeometryError("overlap_vs_n: a subset gradient is zero")
    B = U if side == "left" else V
    return B[:, s > rtol * s[0]]


def overlap_vs_n(
    samples: Any,
    k: int,
    ns: Sequence[int],
    *,
    n_boot: int = 20,
    seed: int = 0,
    side: str = "left",
    n_samples: int | None = None,
    reference: Any = None,
    rtol: float = 1e-10,
    dense: str = "svd",
) -> dict[str, Any]:
    """Overlap of the top-k subspace of a random n-sample mean gradient with the full-batch one, vs n.

    ``samples`` is one of
      * a list of factor pairs (D_i (T_i, d_out), A_i (T_i, d_in)) with G_i = D_i^T A_i (preferred: the
        subset sum is [D_1; ...; D_n]^T [A_1; ...; A_n] and its SVD is :func:`factored_svd`, no dense G_i);
      * dense per-sample gradients, an array (N, m, p) or a list of (m, p);
      * a callable idx -> (subset sum or mean) as a matrix or a (D, A) pair, with ``n_samples`` = N.
    For each n in ``ns`` (1 <= n <= N), ``n_boot`` subsets of size n are drawn without replacement from a
    generator seeded by (seed, n), so each n's numbers do not depend on the other entries of ``ns``.
    The subset's top-k basis (left, or right with side="right"; directions with s <= rtol * s_1 dropped)
    is compared with ``reference`` (orthonormal (d, k'); default: top-k basis of all N samples) by
    :func:`subspace_overlap` (so k = min of the two dimensions). ``dense``: how a dense subset matrix is
    decomposed, "svd" (exact LAPACK SVD) or "eig" (top-k eigenpairs of its Gram, :func:`top_singular_eig`:
    same subspaces up to rounding, ~5x cheaper; then directions below EIG_NULL_RTOL s_1 are null).

    Returns dict(n (len(ns),) int, mean, std, q05, q95, top1_mean (mean |<u1_subset, u1_ref>|),
    phi (len(ns), n_boot) all draws, k, n_boot, n_samples, baseline = k_ref / d, the expected phi of
    a random subspace against the reference).
    """
    k = check_k(k)
    n_boot = check_k(n_boot, "n_boot")
    if side not in ("left", "right"):
        raise GeometryError(f"side must be 'left' or 'right', got {side!r}")
    if dense not in ("svd", "eig"):
        raise GeometryError(f"dense must be 'svd' or 'eig', got {dense!r}")
    get, N = _subset_source(samples, n_samples)
    ns_arr = np.asarray([check_k(n, "n") for n in ns], dtype=int)
    if ns_arr.size == 0 or ns_arr.max() > N:
        raise GeometryError(f"ns must be a non-empty list of sizes in [1, {N}], got {list(ns)}")
    if reference is None:
        ref = _subset_basis(get(np.arange(N)), k, side, rtol, seed, dense)
    else:
        ref = as_array(reference, "reference", ndim=2)
        check_orthonormal(ref, "reference")
    phi = np.empty((ns_arr.size, n_boot))
    top1 = np.empty((ns_arr.size, n_boot))
    for a, n in enumerate(ns_arr):
        rng = np.random.default_rng([seed, int(n)])
        for b in range(n_boot):
            idx = np.sort(rng.choice(N, size=int(n), replace=False))
            basis = _subset_basis(get(idx), k, side, rtol, seed, dense)
            if basis.shape[0] != ref.shape[0]:
                raise GeometryError(f"subset basis dimension {basis.shape[0]} != reference {ref.shape[0]}")
            phi[a, b] = subspace_overlap(basis, ref)
            top1[a, b] = min(abs(basis[:, 0] @ ref[:, 0]), 1.0)
    return {
        "n": ns_arr,
        "mean": phi.mean(axis=1),
        "std": phi.std(axis=1),
        "q05": np.quantile(phi, 0.05, axis=1),
        "q95": np.quantile(phi, 0.95, axis=1),
        "top1_mean": top1.mean(axis=1),
        "phi": phi,
        "k": k,
        "n_boot": n_boot,
        "n_samples": N,
        "baseline": ref.shape[1] / ref.shape[0],
    }
