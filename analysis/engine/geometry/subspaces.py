"""Subspaces and cosines: orthonormal bases, overlap phi, principal angles (radians), random baseline, cosines
between gradients (also from Gram matrices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.linalg as sla

from analysis.engine.geometry.base import GeometryError, as_array, check_k, check_orthonormal
from analysis.engine.geometry.svd import top_singular

__all__ = [
    "cosine", "cosines_per_layer", "cross_cosines_from_gram", "fraction_negative", "gram_cosines",
    "orthonormal_basis", "principal_angles", "random_overlap_baseline", "subspace_overlap"
]

# --------------------------------------------------------------------------------------------------
# subspaces
# --------------------------------------------------------------------------------------------------


def orthonormal_basis(matrix: Any, k: int | None = None, rtol: float | None = None) -> np.ndarray:
    """Orthonormal basis (m, r) of the column span of ``matrix`` (m, n), ordered by singular value.

    Columns are the top left singular vectors; those with s_j <= rtol * s_1 are dropped (default
    rtol = max(m, n) * machine eps, numpy's matrix_rank rule), so r = min(k, numerical rank) may be
    smaller than k. A zero matrix gives an empty basis (m, 0).
    """
    M = as_array(matrix, "matrix", ndim=2)
    U, s, _ = top_singular(M, min(M.shape) if k is None else k, method="exact")
    if rtol is None:
        rtol = max(M.shape) * np.finfo(np.float64).eps
    if s.size == 0 or s[0] == 0:
        return np.zeros((M.shape[0], 0))
    return U[:, s > rtol * s[0]]


def subspace_overlap(Q_a: Any, Q_b: Any) -> float:
    """Subspace overlap phi = ||Q_a^T Q_b||_F^2 / k in [0, 1], k = min(k_a, k_b).

    Q_a (d, k_a), Q_b (d, k_b) with orthonormal columns (checked, GeometryError otherwise). phi is the
    mean of cos^2 of the k principal angles: 1 iff the smaller subspace lies inside the larger, 0 iff
    orthogonal. For two independent random subspaces E[phi] = max(k_a, k_b) / d (= k / d for equal k).
    An empty basis raises GeometryError.
    """
    A = as_array(Q_a, "Q_a", ndim=2, allow_empty=True)
    B = as_array(Q_b, "Q_b", ndim=2, allow_empty=True)
    if A.shape[0] != B.shape[0]:
        raise GeometryError(f"Q_a and Q_b live in different spaces: {A.shape} vs {B.shape}")
    k = min(A.shape[1], B.shape[1])
    if k == 0:
        raise GeometryError(f"subspace_overlap: empty basis (shapes {A.shape}, {B.shape})")
    check_orthonormal(A, "Q_a")
    check_orthonormal(B, "Q_b")
    return float(np.clip(np.sum((A.T @ B) ** 2) / k, 0.0, 1.0))


def principal_angles(Q_a: Any, Q_b: Any) -> np.ndarray:
    """Principal angles (radians, ascending, in [0, pi/2]) between span(Q_a) and span(Q_b).

    Q_a (d, k_a), Q_b (d, k_b): any columns spanning the subspaces (orthonormalised internally by
    ``scipy.linalg.subspace_angles``, which also uses a sine formula for accurate small angles).
    Returns min(rank_a, rank_b) angles. scipy returns them descending; here they are ascending, so
    angles[0] belongs to the best-aligned pair of directions. A zero span raises GeometryError.
    """
    A = as_array(Q_a, "Q_a", ndim=2)
    B = as_array(Q_b, "Q_b", ndim=2)
    if A.shape[0] != B.shape[0]:
        raise GeometryError(f"Q_a and Q_b live in different spaces: {A.shape} vs {B.shape}")
    if not np.any(A) or not np.any(B):
        raise GeometryError("principal_angles: a subspace is spanned by zero vectors only")
    theta = sla.subspace_angles(A, B)
    return np.clip(np.sort(theta), 0.0, np.pi / 2)


def random_overlap_baseline(d: int, k: int, n_draws: int = 200, seed: int = 0) -> dict[str, float]:
    """Distribution of phi between two independent Haar-random k-dim subspaces of R^d.

    By rotation invariance one subspace is fixed to span(e_1..e_k); the other is the Q factor of a
    seeded Gaussian d x k matrix (Haar). Returns dict(expected=k/d, mean, std, q05, q95, d, k, n_draws)
    (expected, mean, std, q05, q95 floats; d, k, n_draws ints). The band narrows as d grows
    (std ~ sqrt(2) / d for k << d), so for d ~ 1000 a few hundred draws pin it down.
    """
    d, k, n_draws = check_k(d, "d"), check_k(k, "k"), check_k(n_draws, "n_draws")
    if k > d:
        raise GeometryError(f"random_overlap_baseline: k = {k} > d = {d}")
    rng = np.random.default_rng(seed)
    phis = np.empty(n_draws)
    for i in range(n_draws):
        Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
        phis[i] = np.sum(Q[:k] ** 2) / k
    return {
        "expected": k / d,
        "mean": float(phis.mean()),
        "std": float(phis.std(ddof=1)) if n_draws > 1 else 0.0,
        "q05": float(np.quantile(phis, 0.05)),
        "q95": float(np.quantile(phis, 0.95)),
        "d": d,
        "k": k,
        "n_draws": n_draws,
    }


# --------------------------------------------------------------------------------------------------
# cosines
# --------------------------------------------------------------------------------------------------


def cosine(G_a: Any, G_b: Any) -> float:
    """Frobenius cosine <G_a, G_b>_F / (||G_a||_F ||G_b||_F) in [-1, 1] of two same-shape arrays.

    Negative: a descent step on b raises loss a to first order. A zero-norm input raises GeometryError.
    """
    a = as_array(G_a, "G_a")
    b = as_array(G_b, "G_b")
    if a.shape != b.shape:
        raise GeometryError(f"cosine: shapes differ, {a.shape} vs {b.shape}")
    sa, sb = np.max(np.abs(a)), np.max(np.abs(b))
    if sa == 0 or sb == 0:
        raise GeometryError("cosine: undefined for a zero gradient (norm 0)")
    a, b = (a / sa).ravel(), (b / sb).ravel()  # scale first: no overflow in the squares
    return float(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))


def cross_cosines_from_gram(K_ab: Any, diag_a: Any, diag_b: Any) -> np.ndarray:
    """Cosine matrix (n_a, n_b): K_ab[i, j] / sqrt(diag_a[i] diag_b[j]), clipped to [-1, 1].

    K_ab (n_a, n_b) = <G_i^a, G_j^b>_F, diag_a (n_a,) = ||G_i^a||^2, diag_b (n_b,) = ||G_j^b||^2.
    A zero or negative squared norm raises GeometryError (names the sample indices).
    """
    K = as_array(K_ab, "K_ab", ndim=2)
    da = as_array(diag_a, "diag_a", ndim=1)
    db = as_array(diag_b, "diag_b", ndim=1)
    if K.shape != (da.size, db.size):
        raise GeometryError(f"K_ab shape {K.shape} does not match diagonals ({da.size}, {db.size})")
    for name, dd in (("diag_a", da), ("diag_b", db)):
        bad = np.flatnonzero(dd <= 0)
        if bad.size:
            raise GeometryError(f"{name}: squared norms must be > 0; zero/negative at indices {bad[:10].tolist()}")
    return np.clip(K / np.sqrt(da)[:, None] / np.sqrt(db)[None, :], -1.0, 1.0)


def gram_cosines(K: Any) -> np.ndarray:
    """Cosine matrix (n, n) of the samples of a Gram matrix K (n, n): K_ij / sqrt(K_ii K_jj)."""
    Km = as_array(K, "K", ndim=2)
    if Km.shape[0] != Km.shape[1]:
        raise GeometryError(f"K must be square, got {Km.shape}")
    d = np.diag(Km)
    return cross_cosines_from_gram(Km, d, d)


def fraction_negative(cosines: Any) -> float:
    """Fraction of entries strictly below 0 (any shape); empty input raises GeometryError."""
    c = as_array(cosines, "cosines")
    return float(np.count_nonzero(c < 0) / c.size)


def cosines_per_layer(pairs: Mapping[str, tuple[Any, Any]]) -> dict[str, float]:
    """{module name: cosine(G_a, G_b)} for a mapping name -> (G_a, G_b); errors name the module."""
    out = {}
    for name, (ga, gb) in pairs.items():
        try:
            out[name] = cosine(ga, gb)
        except GeometryError as exc:
            raise GeometryError(f"{name}: {exc}") from exc
    return out
