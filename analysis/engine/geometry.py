"""Pure maths on gradient geometry: spectra, energy ratios, ranks, subspaces, Gram view, SPF projections.

Arrays in, arrays out. Every public function accepts numpy arrays or torch tensors; torch is converted
to numpy float64 at the boundary (:func:`as_array`) and all computation runs in float64. Results are
numpy arrays or plain Python scalars, except the SPF projections (:func:`project_conflict`,
:func:`project_orthogonal`) which run natively in torch and return a tensor when given a tensor.

Notation (see DESIGN.md, "The maths"): for one linear module with weight W (d_out x d_in), a gradient
G (d_out x d_in) = sum_t d_t a_t^T = D^T A with D (T, d_out) output gradients and A (T, d_in) inputs.
Gradients carry the loss's units per weight unit; singular values have the same units as G, energies
(s^2, CER numerators) its square; angles are in radians; overlaps, cosines, CER and fractions are
dimensionless.

Conventions for degenerate input (all tested in tests/test_geometry.py):

* NaN or Inf anywhere raises :class:`GeometryError`; nothing returns a silent NaN.
* A zero spectrum (all s_j = 0, or an empty spectrum) is the spectrum of a rank-0 matrix: CER(k) = 1 for
  every k ("nothing to capture"), ``k_at_energy`` = 0, effective / stable rank and participation
  ratio = 0.
* A zero matrix has a defined SVD (singular values 0, arbitrary orthonormal vectors). Functions that need
  a *direction* from it (cosine with a zero gradient, an overlap with an empty subspace, a principal
  angle with a zero span) raise :class:`GeometryError` instead.
* Projections of a zero utility gradient return it unchanged with removed fraction 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.linalg as sla

__all__ = [
    "GeometryError",
    "as_array",
    # matrix view
    "singular_values",
    "top_singular",
    "factored_svd",
    "factored_svd_many",
    "factored_svd_batched",
    "stack_factors",
    "cumulative_energy",
    "k_at_energy",
    "effective_rank",
    "stable_rank",
    "participation_ratio",
    "spectrum_summary",
    "orthonormal_basis",
    "subspace_overlap",
    "principal_angles",
    "random_overlap_baseline",
    "cosine",
    "cross_cosines_from_gram",
    "gram_cosines",
    "fraction_negative",
    "cosines_per_layer",
    # sample view
    "gram_spectrum",
    "gram_effective_rank",
    "gram_basis",
    "gram_principal_angles",
    "gram_subspace_overlap",
    # single sample
    "single_sample_overlap",
    "overlap_vs_n",
    # SPF
    "project_conflict",
    "project_orthogonal",
]

#: ``top_singular(method="auto")`` uses randomized SVD only when min(m, n) >= this ...
#: (measured: for a 576 x 1536 matrix the exact SVD takes ~0.2 s on one core, no slower than randomized,
#: and randomized top-k subspaces of flat spectra drift (phi ~ 0.65 vs exact at k = 8), so exact is the
#: default at this project's sizes; randomized pays off for bigger layers with decaying spectra.)
RANDOMIZED_MIN_DIM = 2048
#: ... and k <= this fraction of min(m, n); otherwise the exact LAPACK SVD.
RANDOMIZED_MAX_FRACTION = 0.1
#: Tolerance on max |Q^T Q - I| when a function requires orthonormal columns (loose enough for bases
#: computed in float32 and converted).
ORTHONORMAL_TOL = 1e-5
#: :func:`factored_svd_batched` recovers vectors as (...) / s_j; below this s_j / s_1 it uses the QR route.
BATCHED_NULL_RTOL = 1e-6


class GeometryError(ValueError):
    """Bad input to a geometry function (NaN/Inf, wrong shape, undefined direction, ...)."""


# --------------------------------------------------------------------------------------------------
# boundary helpers
# --------------------------------------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    """True if x is a torch tensor (without importing torch if nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_array(x: Any, name: str = "array", ndim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Convert numpy / torch / array-like to a finite float64 numpy array.

    Torch tensors are detached and moved to CPU. Raises GeometryError on NaN/Inf, complex input, a wrong
    number of dimensions (if ``ndim`` is given) or an empty array (unless ``allow_empty``).
    """
    if _is_torch(x):
        if x.is_complex():
            raise GeometryError(f"{name}: complex tensors are not supported")
        import torch

        arr = x.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        if np.iscomplexobj(x):
            raise GeometryError(f"{name}: complex arrays are not supported")
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise GeometryError(f"{name}: cannot convert to a float64 array ({exc})") from exc
    if ndim is not None and arr.ndim != ndim:
        raise GeometryError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise GeometryError(f"{name}: empty array (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        n_bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise GeometryError(f"{name}: contains {n_bad} NaN/Inf value(s) (shape {arr.shape})")
    return arr


def _check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise GeometryError(f"{name} must be a positive integer, got {k!r}")
    if k < 1:
        raise GeometryError(f"{name} must be >= 1, got {k}")
    return int(k)


def _sign_fix(U: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic SVD signs: the largest-|.| entry of each column of U is made positive.

    Same convention as ``sklearn.utils.extmath.svd_flip(u_based_decision=True)``; written out here to
    avoid depending on that helper's changing signature.
    """
    if U.shape[1] == 0:
        return U, Vt
    idx = np.argmax(np.abs(U), axis=0)
    signs = np.sign(U[idx, np.arange(U.shape[1])])
    signs[signs == 0] = 1.0
    return U * signs, Vt * signs[:, None]


def _exact_svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vt) via LAPACK gesdd, falling back to gesvd if gesdd does not converge."""
    try:
        U, s, Vt = sla.svd(M, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:
        U, s, Vt = sla.svd(M, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return U, s, Vt


def _check_orthonormal(Q: np.ndarray, name: str, tol: float = ORTHONORMAL_TOL) -> None:
    err = np.max(np.abs(Q.T @ Q - np.eye(Q.shape[1]))) if Q.shape[1] else 0.0
    if err > tol:
        raise GeometryError(
            f"{name}: columns are not orthonormal (max |Q^T Q - I| = {err:.2e} > {tol:g}); "
            "use orthonormal_basis() first"
        )


# --------------------------------------------------------------------------------------------------
# matrix view: SVDs
# --------------------------------------------------------------------------------------------------


def singular_values(matrix: Any) -> np.ndarray:
    """Singular values of a 2-D matrix (m, n), descending, shape (min(m, n),), units of the matrix.

    Uses ``scipy.linalg.svdvals``. A zero matrix gives zeros; an empty matrix raises GeometryError.
    """
    M = as_array(matrix, "matrix", ndim=2)
    return sla.svdvals(M, check_finite=False)


def top_singular(
    matrix: Any, k: int, *, method: str = "auto", seed: int = 0, n_iter: int | str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k singular triplets of a matrix (m, n): U_k (m, k), s_k (k,) descending, V_k (n, k).

    ``k`` larger than min(m, n) is clipped to min(m, n) (so the output may have fewer than k columns).
    If k exceeds the rank, the trailing triplets have s = 0 and their vectors are an arbitrary (but
    deterministic) orthonormal completion; use :func:`orthonormal_basis` to drop them.

    ``method``: "exact" (LAPACK SVD), "randomized" (``sklearn.utils.extmath.randomized_svd``, seeded by
    ``seed``, oversampling max(10, k), ``n_iter`` power iterations) or "auto": randomized only when
    min(m, n) >= RANDOMIZED_MIN_DIM and k <= RANDOMIZED_MAX_FRACTION * min(m, n), and the matrix is
    nonzero; exact otherwise. Randomized is approximate: accurate when the spectrum decays past k,
    biased when it is flat (then the top-k subspace is ill-conditioned anyway). Signs follow a fixed convention (largest-|.| entry of each u_j positive), so
    the output is deterministic.
    """
    M = as_array(matrix, "matrix", ndim=2)
    k = min(_check_k(k), min(M.shape))
    if method not in ("auto", "exact", "randomized"):
        raise GeometryError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    small = min(M.shape)
    use_random = method == "randomized" or (
        method == "auto" and small >= RANDOMIZED_MIN_DIM and k <= RANDOMIZED_MAX_FRACTION * small
    )
    if use_random and k < small and np.any(M):
        from sklearn.utils.extmath import randomized_svd  # lazy: importing sklearn costs ~1 s

        U, s, Vt = randomized_svd(
            M, k, n_oversamples=max(10, k), n_iter=n_iter, random_state=seed, flip_sign=False
        )
    else:  # exact; also the route for zero matrices (randomized range finder is ill-defined there)
        U, s, Vt = _exact_svd(M)
        U, s, Vt = U[:, :k], s[:k], Vt[:k]
    U, Vt = _sign_fix(U, Vt)
    return U, s, Vt.T


def _drop_zero_rows(D: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop rows t where d_t or a_t is exactly zero: their term d_t a_t^T of D^T A vanishes."""
    keep = np.any(D != 0, axis=1) & np.any(A != 0, axis=1)
    return D[keep], A[keep]


def factored_svd(
    D: Any, A: Any, k: int | None = None, *, method: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact SVD of G = D^T A without forming G (when that is cheaper).

    D (T, d_out) output gradients, A (T, d_in) inputs, G (d_out, d_in) = sum_t d_t a_t^T.
    Rows where d_t or a_t is exactly zero (padding, masked prompt tokens) are dropped first; T' rows
    remain. "qr" route: D^T = Q_d R_d, A^T = Q_a R_a (economic QR), SVD of the small core
    R_d R_a^T = Uc diag(s) Vc^T, then U = Q_d Uc, V = Q_a Vc. "dense" route: SVD of D^T A. "auto" picks the
    cheaper by a flop estimate (QR wins when T' << min(d_out, d_in)). Both are exact.

    Returns U (d_out, r), s (r,) descending, V (d_in, r) with r = min(T', d_out, d_in), or
    r = min(k, that) if ``k`` is given. Singular values beyond the rank bound T' are known to be 0 and are
    not returned; if all rows are zero (T' = 0) the result is empty: shapes (d_out, 0), (0,), (d_in, 0).
    Signs as in :func:`top_singular`.
    """
    Dm = as_array(D, "D", ndim=2, allow_empty=True)
    Am = as_array(A, "A", ndim=2, allow_empty=True)
    if Dm.shape[0] != Am.shape[0]:
        raise GeometryError(f"D and A need the same number of rows T, got {Dm.shape} and {Am.shape}")
    if Dm.shape[1] == 0 or Am.shape[1] == 0:
        raise GeometryError(f"D and A need d_out, d_in >= 1, got {Dm.shape} and {Am.shape}")
    if method not in ("auto", "qr", "dense"):
        raise GeometryError(f"method must be 'auto', 'qr' or 'dense', got {method!r}")
    kk = None if k is None else _check_k(k)
    Dm, Am = _drop_zero_rows(Dm, Am)
    T, d_out = Dm.shape
    d_in = Am.shape[1]
    if T == 0:
        return np.zeros((d_out, 0)), np.zeros(0), np.zeros((d_in, 0))
    r = min(T, d_out, d_in)
    if method == "auto":
        qr_cost = 2.0 * T * (d_out * min(d_out, T) + d_in * min(d_in, T)) + 4.0 * T**3
        dense_cost = 2.0 * T * d_out * d_in + 4.0 * min(d_out, d_in) ** 2 * max(d_out, d_in)
        method = "qr" if qr_cost <= dense_cost else "dense"
    if method == "qr":
        Qd, Rd = sla.qr(Dm.T, mode="economic", check_finite=False)
        Qa, Ra = sla.qr(Am.T, mode="economic", check_finite=False)
        Uc, s, Vct = _exact_svd(Rd @ Ra.T)
        U, Vt = Qd @ Uc, Vct @ Qa.T
    else:
        U, s, Vt = _exact_svd(Dm.T @ Am)
    r = r if kk is None else min(r, kk)
    U, s, Vt = U[:, :r], s[:r], Vt[:r]
    U, Vt = _sign_fix(U, Vt)
    return U, s, Vt.T


def stack_factors(pairs: Sequence[tuple[Any, Any]], weights: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate factors so that D_cat^T A_cat = sum_i w_i D_i^T A_i.

    pairs: sequence of (D_i (T_i, d_out), A_i (T_i, d_in)); weights: (n,) or None (all 1). Weights
    multiply the D rows. Returns D_cat (sum T_i, d_out), A_cat (sum T_i, d_in). Feed to
    :func:`factored_svd` for the SVD of a sum or mean of per-sample gradients (the mean has the same
    singular vectors as the sum, singular values divided by n).
    """
    if len(pairs) == 0:
        raise GeometryError("stack_factors: no (D, A) pairs given")
    w = np.ones(len(pairs)) if weights is None else as_array(weights, "weights", ndim=1)
    if len(w) != len(pairs):
        raise GeometryError(f"stack_factors: {len(pairs)} pairs but {len(w)} weights")
    Ds, As = [], []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise GeometryError(f"stack_factors: item {i} is not a (D, A) pair")
        Di = as_array(pair[0], f"D[{i}]", ndim=2, allow_empty=True)
        Ai = as_array(pair[1], f"A[{i}]", ndim=2, allow_empty=True)
        if Di.shape[0] != Ai.shape[0]:
            raise GeometryError(f"pair {i}: D and A row counts differ ({Di.shape} vs {Ai.shape})")
        Ds.append(w[i] * Di)
        As.append(Ai)
    try:
        return np.concatenate(Ds, axis=0), np.concatenate(As, axis=0)
    except ValueError as exc:
        raise GeometryError(f"stack_factors: inconsistent d_out / d_in across pairs ({exc})") from exc


def factored_svd_many(
    pairs: Sequence[tuple[Any, Any]], k: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`factored_svd` for each (D_i, A_i) of many samples; a list of (U_i, s_i, V_i).

    A plain loop (full results, any k); for top-k of many samples of one module
    :func:`factored_svd_batched` gives the same results ~1.6x cheaper (stacked LAPACK, no Q formed).
    """
    return [factored_svd(D, A, k) for D, A in pairs]


def _native(x: Any, name: str) -> Any:
    """A float32/float64 torch tensor as a numpy view (no copy); anything else through :func:`as_array`."""
    if _is_torch(x) and x.device.type == "cpu" and x.dtype.is_floating_point and x.element_size() >= 4:
        return x.detach().numpy()
    return as_array(x, name, ndim=2, allow_empty=True)


def factored_svd_batched(
    pairs: Sequence[tuple[Any, Any]], k: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``factored_svd(D_i, A_i, k)`` for many samples at once (same U_i, s_i, V_i up to rounding), batched.

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)), same d_out / d_in for all i. All are zero-padded to
    T = max T_i: zero rows (padding, masked tokens) only add zero columns to D_i^T, A_i^T, so the nonzero
    singular values do not change; as in :func:`factored_svd`, r_i = min(k, T'_i, d_out, d_in) with T'_i
    the rows where d_t and a_t are both nonzero. Steps, all stacked numpy
    LAPACK in float64: R factors only of D_i^T = Q_d R_d and A_i^T = Q_a R_a (no Q is formed: half the QR
    cost), SVD of the cores R_d R_a^T = Uc diag(s) Vc^T (n, T, T), then only the k vectors needed,
    U_k = D_i^T R_a^T Vc_k / s_k and V_k = A_i^T R_d^T Uc_k / s_k (since D_i Q_d = R_d^T, A_i Q_a = R_a^T).
    The division loses accuracy for s_j ~ 0, so a sample whose r_i-th value is <= BATCHED_NULL_RTOL s_1
    (rank below k, rare) is redone by :func:`factored_svd`. Signs as in :func:`top_singular`.
    Returns a list of (U_i (d_out, r_i), s_i (r_i,), V_i (d_in, r_i)).
    """
    kk = _check_k(k)
    if len(pairs) == 0:
        return []
    shapes = [(tuple(D.shape), tuple(A.shape)) for D, A in pairs]
    d_out, d_in = shapes[0][0][-1], shapes[0][1][-1]
    for i, (sd, sa) in enumerate(shapes):
        if len(sd) != 2 or len(sa) != 2 or sd[0] != sa[0] or (sd[1], sa[1]) != (d_out, d_in) or 0 in (d_out, d_in):
            raise GeometryError(f"pair {i}: bad factor shapes {sd} and {sa} (need (T_i, {d_out}), (T_i, {d_in}))")
    T = max(sd[0] for sd, _ in shapes)
    Ds, As = np.zeros((len(pairs), T, d_out)), np.zeros((len(pairs), T, d_in))  # zero-padded D_i, A_i
    for i, (D, A) in enumerate(pairs):  # one float64 copy per factor, checked once below
        Ds[i, : shapes[i][0][0]], As[i, : shapes[i][0][0]] = _native(D, f"D[{i}]"), _native(A, f"A[{i}]")
    if not (np.isfinite(Ds).all() and np.isfinite(As).all()):
        raise GeometryError("factored_svd_batched: NaN/Inf in the factors")
    rows = np.count_nonzero(np.any(Ds != 0, axis=2) & np.any(As != 0, axis=2), axis=1)  # T'_i
    if T == 0 or not rows.any():
        return [(np.zeros((d_out, 0)), np.zeros(0), np.zeros((d_in, 0))) for _ in pairs]
    Dt, At = np.swapaxes(Ds, 1, 2), np.swapaxes(As, 1, 2)  # D_i^T, A_i^T as (Fortran-order) views
    Rd, Ra = np.linalg.qr(Dt, mode="r"), np.linalg.qr(At, mode="r")  # (n, min(d, T), T)
    Uc, s, Vct = np.linalg.svd(Rd @ np.swapaxes(Ra, 1, 2))
    r = min(kk, s.shape[1])
    Uc, s, Vc = Uc[:, :, :r], s[:, :r], np.swapaxes(Vct[:, :r], 1, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        U = Dt @ (np.swapaxes(Ra, 1, 2) @ Vc) / s[:, None, :]  # (n, d_out, r)
        V = At @ (np.swapaxes(Rd, 1, 2) @ Uc) / s[:, None, :]  # (n, d_in, r)
    out = []
    for i, (D, A) in enumerate(pairs):
        r_i = min(r, int(rows[i]))
        if r_i and not s[i, r_i - 1] > BATCHED_NULL_RTOL * s[i, 0]:
            out.append(factored_svd(D, A, kk, method="qr"))
            continue
        U_i, Vt_i = _sign_fix(U[i, :, :r_i], V[i, :, :r_i].T)
        out.append((U_i, s[i, :r_i].copy(), Vt_i.T))
    return out


# --------------------------------------------------------------------------------------------------
# spectrum metrics
# --------------------------------------------------------------------------------------------------


def _spectrum(s: Any) -> np.ndarray:
    """Validate a spectrum: 1-D, finite, >= 0; returned sorted descending. Empty is allowed."""
    arr = as_array(s, "spectrum", ndim=1, allow_empty=True)
    if np.any(arr < 0):
        raise GeometryError(f"spectrum: singular values must be >= 0, min is {arr.min():.3e}")
    return np.sort(arr)[::-1]


def cumulative_energy(s: Any) -> np.ndarray:
    """Cumulative energy ratio CER(k) = sum_{j<=k} s_j^2 / sum_j s_j^2 for k = 1..len(s), shape (len(s),).

    s is sorted descending first. The last entry is exactly 1. Zero spectrum: all ones (a rank-0 matrix
    has all of its zero energy in zero directions).
    """
    sv = _spectrum(s)
    if sv.size == 0:
        return np.zeros(0)
    if sv[0] == 0:
        return np.ones(sv.size)
    c = np.cumsum((sv / sv[0]) ** 2)  # scaled by s_1 against overflow / underflow
    return c / c[-1]


def k_at_energy(s: Any, eta: float = 0.9) -> int:
    """Smallest k with CER(k) >= eta, eta in (0, 1]; an int in [1, len(s)] (dimensionless count).

    A relative slack of 1e-12 absorbs rounding (so eta = 1 gives the number of nonzero s_j).
    Zero or empty spectrum: 0.
    """
    if not (isinstance(eta, (int, float, np.floating)) and 0.0 < float(eta) <= 1.0):
        raise GeometryError(f"eta must be in (0, 1], got {eta!r}")
    cer = cumulative_energy(s)
    if cer.size == 0 or _spectrum(s)[0] == 0:
        return 0
    return int(np.argmax(cer >= float(eta) - 1e-12)) + 1


def effective_rank(s: Any) -> float:
    """Effective rank exp(H(p)), p_j = s_j / sum s, H = -sum p_j log p_j (Roy & Vetterli 2007).

    In [1, number of nonzero s_j] for a nonzero spectrum; 0 for a zero or empty spectrum.
    """
    sv = _spectrum(s)
    if sv.size == 0 or sv[0] == 0:
        return 0.0
    p = sv / sv.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def stable_rank(s: Any) -> float:
    """Stable rank sum s_j^2 / s_1^2 = ||G||_F^2 / ||G||_2^2, in [1, rank]; 0 for a zero spectrum."""
    sv = _spectrum(s)
    if sv.size == 0 or sv[0] == 0:
        return 0.0
    return float(np.sum((sv / sv[0]) ** 2))


def participation_ratio(s: Any) -> float:
    """Participation ratio (sum s_j^2)^2 / sum s_j^4, in [1, rank]; 0 for a zero spectrum."""
    sv = _spectrum(s)
    if sv.size == 0 or sv[0] == 0:
        return 0.0
    e = (sv / sv[0]) ** 2
    return float(e.sum() ** 2 / np.sum(e**2))


def spectrum_summary(s: Any, eta: float = 0.9) -> dict[str, float | int]:
    """Scalar metrics of a spectrum for tables (plain Python numbers).

    Keys: n (len(s)), s1 (largest singular value), energy (sum s^2), top1_energy (CER(1)), eta,
    k_eta (:func:`k_at_energy`), effective_rank, stable_rank, participation_ratio.
    """
    sv = _spectrum(s)
    cer = cumulative_energy(sv)
    return {
        "n": int(sv.size),
        "s1": float(sv[0]) if sv.size else 0.0,
        "energy": float(np.sum(sv**2)),
        "top1_energy": float(cer[0]) if sv.size and sv[0] > 0 else 0.0,
        "eta": float(eta),
        "k_eta": k_at_energy(sv, eta),
        "effective_rank": effective_rank(sv),
        "stable_rank": stable_rank(sv),
        "participation_ratio": participation_ratio(sv),
    }


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
    _check_orthonormal(A, "Q_a")
    _check_orthonormal(B, "Q_b")
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
    d, k, n_draws = _check_k(d, "d"), _check_k(k, "k"), _check_k(n_draws, "n_draws")
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
        return samples, _check_k(n_samples, "n_samples")
    if isinstance(samples, (list, tuple)) and len(samples) and _is_pair(samples[0]):
        pairs = [(as_array(D, f"D[{i}]", 2, True), as_array(A, f"A[{i}]", 2, True)) for i, (D, A) in enumerate(samples)]
        return (lambda idx: stack_factors([pairs[i] for i in idx])), len(pairs)
    G = as_array(samples if not isinstance(samples, (list, tuple)) else np.stack([as_array(g, "G_i", 2) for g in samples]),
                 "per-sample gradients", ndim=3)
    return (lambda idx: G[idx].sum(axis=0)), G.shape[0]


def _subset_basis(obj: Any, k: int, side: str, rtol: float, seed: int) -> np.ndarray:
    """Top-k left (side="left") or right singular basis of a dense matrix or factor pair, null dropped."""
    if _is_pair(obj):
        U, s, V = factored_svd(obj[0], obj[1], k)
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
    :func:`subspace_overlap` (so k = min of the two dimensions).

    Returns dict(n (len(ns),) int, mean, std, q05, q95, top1_mean (mean |<u1_subset, u1_ref>|),
    phi (len(ns), n_boot) all draws, k, n_boot, n_samples, baseline = k_ref / d, the expected phi of
    a random subspace against the reference).
    """
    k = _check_k(k)
    n_boot = _check_k(n_boot, "n_boot")
    if side not in ("left", "right"):
        raise GeometryError(f"side must be 'left' or 'right', got {side!r}")
    get, N = _subset_source(samples, n_samples)
    ns_arr = np.asarray([_check_k(n, "n") for n in ns], dtype=int)
    if ns_arr.size == 0 or ns_arr.max() > N:
        raise GeometryError(f"ns must be a non-empty list of sizes in [1, {N}], got {list(ns)}")
    if reference is None:
        ref = _subset_basis(get(np.arange(N)), k, side, rtol, seed)
    else:
        ref = as_array(reference, "reference", ndim=2)
        _check_orthonormal(ref, "reference")
    phi = np.empty((ns_arr.size, n_boot))
    top1 = np.empty((ns_arr.size, n_boot))
    for a, n in enumerate(ns_arr):
        rng = np.random.default_rng([seed, int(n)])
        for b in range(n_boot):
            idx = np.sort(rng.choice(N, size=int(n), replace=False))
            basis = _subset_basis(get(idx), k, side, rtol, seed)
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


# --------------------------------------------------------------------------------------------------
# SPF projections (torch-native)
# --------------------------------------------------------------------------------------------------


def _torch_operands(G_u: Any, *bases: Any, check: bool) -> tuple[Any, list[Any], Any, bool]:
    """Return (G as torch in compute dtype, bases as torch, original dtype, given_as_torch)."""
    import torch

    given_torch = _is_torch(G_u)
    if given_torch:
        G = G_u.detach()
        orig_dtype = G.dtype
        dtype = torch.promote_types(orig_dtype, torch.float32)  # bf16/fp16 grads: compute in fp32
        G = G.to(dtype)
    else:
        G = torch.from_numpy(as_array(G_u, "G_u", ndim=2, allow_empty=True))
        orig_dtype = dtype = torch.float64
    if G.ndim != 2:
        raise GeometryError(f"G_u: expected a 2-D gradient, got shape {tuple(G.shape)}")
    out = []
    for i, Bm in enumerate(bases):
        name = ("U_k", "V_k")[i]
        if _is_torch(Bm):
            Bt = Bm.detach().to(device=G.device, dtype=dtype)
        else:
            Bt = torch.from_numpy(as_array(Bm, name, ndim=2, allow_empty=True)).to(device=G.device, dtype=dtype)
        if Bt.ndim != 2 or Bt.shape[0] != G.shape[i]:
            raise GeometryError(f"{name}: shape {tuple(Bt.shape)} does not match G_u {tuple(G.shape)} on axis {i}")
        out.append(Bt)
    if check:
        if not bool(torch.isfinite(G).all()) or not all(bool(torch.isfinite(b).all()) for b in out):
            raise GeometryError("projection: NaN/Inf in G_u or in the safety basis")
        tol = ORTHONORMAL_TOL if dtype == torch.float64 else 1e-3
        for name, Bt in zip(("U_k", "V_k"), out):
            if Bt.shape[1]:
                err = (Bt.T @ Bt - torch.eye(Bt.shape[1], dtype=dtype, device=Bt.device)).abs().max().item()
                if err > tol:
                    raise GeometryError(f"{name}: columns are not orthonormal (max |B^T B - I| = {err:.2e})")
    return G, out, orig_dtype, given_torch


def _finish(G_u: Any, G_new: Any, removed: Any, orig_dtype: Any, given_torch: bool) -> tuple[Any, float]:
    norm = float(G_u.norm())
    frac = 0.0 if norm == 0 else float(removed.norm()) / norm
    if given_torch:
        return G_new.to(orig_dtype), frac
    return G_new.numpy(), frac


def project_conflict(G_u: Any, U_k: Any, V_k: Any, *, check: bool = True) -> tuple[Any, float]:
    """SPF "conflict" projection: remove the safety-basis components of G_u that are negative.

    G_u (m, p) utility gradient, U_k (m, k), V_k (p, k) orthonormal columns (top-k singular vectors of the
    safety gradient). With B_j = u_j v_j^T (orthonormal under <.,.>_F) and c_j = <G_u, B_j>_F = u_j^T G_u v_j:
    G' = G_u - sum_{j: c_j < 0} c_j B_j, so <G', B_j>_F = max(c_j, 0) >= 0.
    Returns (G', removed_fraction = ||G_u - G'||_F / ||G_u||_F, 0 for zero G_u). Runs in torch: torch in
    -> torch out (same dtype/device; fp16/bf16 are computed in fp32), numpy in -> numpy float64 out.
    ``check`` verifies finiteness and orthonormality (tolerance 1e-5 in float64, 1e-3 otherwise).
    """
    G, (U, V), orig_dtype, given_torch = _torch_operands(G_u, U_k, V_k, check=check)
    if U.shape[1] != V.shape[1]:
        raise GeometryError(f"U_k and V_k need the same k, got {U.shape[1]} and {V.shape[1]}")
    c = ((U.T @ G) * V.T).sum(dim=1)  # c_j = u_j^T G v_j, shape (k,)
    removed = (U * c.clamp(max=0)) @ V.T
    return _finish(G, G - removed, removed, orig_dtype, given_torch)


def project_orthogonal(G_u: Any, U_k: Any, *, check: bool = True) -> tuple[Any, float]:
    """SPF "orthogonal" projection: G' = G_u - U_k U_k^T G_u (remove the whole left safety subspace).

    G_u (m, p), U_k (m, k) orthonormal. Afterwards u_j^T G' = 0 for every j, hence <G', u_j w^T>_F = 0 for
    any w. Returns (G', removed_fraction = ||U_k U_k^T G_u||_F / ||G_u||_F, 0 for zero G_u). Torch in ->
    torch out; numpy in -> numpy out (see :func:`project_conflict`).
    """
    G, (U,), orig_dtype, given_torch = _torch_operands(G_u, U_k, check=check)
    removed = U @ (U.T @ G)
    return _finish(G, G - removed, removed, orig_dtype, given_torch)
