"""Resampling maths: bootstrap weights, permutation splits, intervals, p-values, multiple comparisons, and the
spectra of many resampled batch means from one small "core" per sample (never a dense per-sample gradient).

Conventions. Samples are ordered safety first (n_s), then utility (n_u). A bootstrap replicate is a row of
integer weights w (n,) (multinomial counts: each set resampled with replacement at its own size); its batch
means are G_s(w) = sum_{i<n_s} w_i G_i / n_s and G_u(w) likewise. A permutation is a boolean row (n,) with n_s
True: the pooled samples split at random into a pseudo-safety and a pseudo-utility set of the original sizes.
Every function is seeded; the same (sizes, count, seed) gives the same rows, so all modules of a run share
their replicates and across-module summaries resample prompts, not modules.

Core (DESIGN.md notation, G_i = D_i^T A_i, d_out x d_in): a resampled mean is D^T W A (W: the weights on the
stacked rows). Its spectrum is computed in an m-dim basis P (d_out, m), Q (d_in, m) of the per-sample energy
(top-m eigenvectors of sum_i G_i G_i^T and sum_i G_i^T G_i, from the factors): C_i = P^T G_i Q (m, m) once per
sample, then C(w) = sum w_i C_i / n per replicate (one GEMM for all replicates) and its eigenvalues. When m >=
the rank of the stacked factors this is exact; otherwise the singular values of C(w) are lower bounds of
those of G(w) (interlacing) and the energy outside the core, ||G(w)||^2 - ||C(w)||^2, is known exactly from
the Gram matrix (:func:`captured_share`). The basis depends on the pooled samples only, so a permutation test
computed in the core is exact whatever m.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.linalg as sla

from analysis.engine.geometry.base import GeometryError, as_array, check_k

__all__ = [
    "SpectralCore", "bootstrap_p_value", "captured_share", "core_spectra",
    "n_needed", "percentile_interval", "permutation_masks", "permutation_p_value", "resample_weights",
    "spectrum_stats", "weighted_cosines",
]


def resample_weights(n_safety: int, n_utility: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_s + n_u) integer bootstrap counts: each set resampled with replacement at its own size
    (each row's safety block sums to n_s, its utility block to n_u). Seeded by (seed, sizes)."""
    n_s, n_u, n_boot = check_k(n_safety, "n_safety"), check_k(n_utility, "n_utility"), check_k(n_boot, "n_boot")
    rng = np.random.default_rng([int(seed), 19, n_s, n_u])
    safety = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=n_boot)
    utility = rng.multinomial(n_u, np.full(n_u, 1.0 / n_u), size=n_boot)
    return np.hstack([safety, utility]).astype(np.float64)


def permutation_masks(n_safety: int, n_utility: int, n_perm: int, seed: int) -> np.ndarray:
    """(n_perm, n_s + n_u) bool: True marks the pseudo-safety set of a random split of the pooled samples
    (n_s True per row). Seeded by (seed, sizes)."""
    n_s, n_u, n_perm = check_k(n_safety, "n_safety"), check_k(n_utility, "n_utility"), check_k(n_perm, "n_perm")
    rng = np.random.default_rng([int(seed), 191, n_s, n_u])
    masks = np.zeros((n_perm, n_s + n_u), dtype=bool)
    for row in masks:
        row[rng.choice(n_s + n_u, size=n_s, replace=False)] = True
    return masks


def percentile_interval(replicates: Any, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (lo, hi) of bootstrap replicates (any shape: the last axis is taken as draws
    only for 1-D input); NaN draws are ignored; all-NaN gives (NaN, NaN)."""
    r = np.asarray(replicates, dtype=float).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(r, [tail, 1.0 - tail])
    return float(lo), float(hi)


def bootstrap_p_value(replicates: Any, null: float = 0.0) -> float:
    """Two-sided bootstrap p-value of H0: theta = ``null`` from replicates of theta-hat:
    2 min((1 + #{theta* <= null}), (1 + #{theta* >= null})) / (B + 1), at most 1 (the smallest alpha at which
    the percentile interval excludes ``null``). NaN draws are ignored."""
    r = np.asarray(replicates, dtype=float).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0:
        return float("nan")
    low, high = np.count_nonzero(r <= null), np.count_nonzero(r >= null)
    return float(min(1.0, 2.0 * (1 + min(low, high)) / (r.size + 1)))


def permutation_p_value(observed: float, null_draws: Any) -> float:
    """Two-sided permutation p-value: 2 min(1 + #{T* >= T}, 1 + #{T* <= T}) / (P + 1), at most 1 (valid for a
    null distribution that is not centred at 0, e.g. cosines of random halves). NaN draws are ignored."""
    r = np.asarray(null_draws, dtype=float).ravel()
    r = r[~np.isnan(r)]
    if r.size == 0 or not np.isfinite(observed):
        return float("nan")
    return float(min(1.0, 2.0 * (1 + min(np.count_nonzero(r >= observed), np.count_nonzero(r <= observed)))
                     / (r.size + 1)))


def n_needed(estimate: float, lo: float, hi: float, n: int, null: float = 0.0, level_z: float = 1.96) -> float:
    """Estimated n per set at which a 95% interval of half-width ~ z SE(n), SE(n) = SE(n0) sqrt(n0 / n), would
    exclude ``null``: n0 (z SE / |estimate - null|)^2, with SE from the interval's width (hi - lo) / (2 z).
    An extrapolation from the bootstrap spread (assumes the estimate stays put and SE ~ 1/sqrt(n)); inf when
    the estimate equals the null, NaN when undefined."""
    if not all(np.isfinite([estimate, lo, hi])):
        return float("nan")
    se = (hi - lo) / (2 * level_z)
    gap = abs(estimate - null)
    if gap == 0:
        return float("inf")
    return float(max(1.0, n * (level_z * se / gap) ** 2))


# --------------------------------------------------------------------------------------------------
# Gram-exact statistics of resampled means
# --------------------------------------------------------------------------------------------------


def weighted_cosines(K: Any, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """cos(sum_i a_i G_i, sum_j b_j G_j) for each row pair of weights ``left`` (R, n), ``right`` (R, n), exact
    from the Gram matrix K (n, n): a^T K b / sqrt(a^T K a b^T K b). Zero norm gives NaN. Shape (R,)."""
    Km = as_array(K, "K", ndim=2)
    a, b = np.atleast_2d(left), np.atleast_2d(right)
    Ka, Kb = a @ Km, b @ Km
    num = np.einsum("rn,rn->r", Ka, b)
    den = np.sqrt(np.clip(np.einsum("rn,rn->r", Ka, a), 0, None) * np.clip(np.einsum("rn,rn->r", Kb, b), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.clip(num / den, -1.0, 1.0), np.nan)


def captured_share(core_energy: np.ndarray, K: Any, weights: np.ndarray) -> np.ndarray:
    """Share of each resampled mean's energy inside the core: ||C(w)||_F^2 / ||G(w)||_F^2, with
    ||G(w)||^2 = w^T K w (w already divided by the set size). 1 = the core is exact for that replicate."""
    Km = as_array(K, "K", ndim=2)
    w = np.atleast_2d(weights)
    total = np.einsum("rn,rn->r", w @ Km, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, np.minimum(core_energy / total, 1.0), np.nan)


# --------------------------------------------------------------------------------------------------
# spectral core
# --------------------------------------------------------------------------------------------------


def _top_basis(F: np.ndarray, m: int, seed: int) -> np.ndarray:
    """Orthonormal (d, r) basis of the top-r left singular directions of F (d, R), r <= m, null dropped.
    Exact (thin SVD via the smaller Gram) when R <= 2m or d <= 2m; else a randomized range finder with two
    power iterations (Halko et al. 2011) on m + 16 columns, cut to the top m."""
    d, R = F.shape
    if min(d, R) <= 2 * m:
        C = F.T @ F if R <= d else F @ F.T
        lam, E = sla.eigh(C, check_finite=False)
        lam, E = lam[::-1], E[:, ::-1]
        keep = lam > 1e-12 * max(lam[0], 0.0) if lam.size and lam[0] > 0 else np.zeros(lam.size, bool)
        keep &= np.arange(lam.size) < m
        if R <= d:
            return (F @ E[:, keep]) / np.sqrt(lam[keep])
        return E[:, keep]
    rng = np.random.default_rng(seed)
    Y = F @ rng.standard_normal((R, m + 16))
    for _ in range(2):
        Y, _ = np.linalg.qr(Y)
        Y, _ = np.linalg.qr(F @ (F.T @ Y))
    U, s, _ = np.linalg.svd(Y.T @ F, full_matrices=False)
    keep = s > 1e-6 * s[0] if s.size and s[0] > 0 else np.zeros(s.size, bool)
    return (Y @ U)[:, keep][:, :m]


class SpectralCore:
    """Per-sample cores C_i = P^T G_i Q (n, m_out, m_in) of one module, from factors (no dense G_i).

    pairs: (D_i (T_i, d_out), A_i (T_i, d_in)) of all samples (safety first). P / Q: top-m eigenvectors of
    sum_i G_i G_i^T / sum_i G_i^T G_i, i.e. of F_L F_L^T with F_L = [D_i^T E_i L_i^{1/2}]_i where
    A_i A_i^T = E_i L_i E_i^T (and the mirror for Q): exact when rank <= m. ``sample_captured`` (n,) is
    ||C_i||^2 / ||G_i||^2 per sample."""

    def __init__(self, pairs: Sequence[tuple[Any, Any]], m: int = 128, seed: int = 0):
        m = check_k(m, "m")
        Ds = [np.asarray(D, dtype=np.float64) for D, _ in pairs]
        As = [np.asarray(A, dtype=np.float64) for _, A in pairs]
        if not Ds:
            raise GeometryError("SpectralCore: no samples")
        left, right, norms = [], [], []
        for D, A in zip(Ds, As):
            lam_a, E_a = np.linalg.eigh(A @ A.T)
            lam_d, E_d = np.linalg.eigh(D @ D.T)
            left.append(D.T @ (E_a * np.sqrt(np.clip(lam_a, 0, None))))
            right.append(A.T @ (E_d * np.sqrt(np.clip(lam_d, 0, None))))
            norms.append(float(np.sum((D @ D.T) * (A @ A.T))))  # ||G_i||_F^2, ghost form
        self.P = _top_basis(np.hstack(left), m, seed)
        self.Q = _top_basis(np.hstack(right), m, seed + 1)
        self.cores = np.stack([(D @ self.P).T @ (A @ self.Q) for D, A in zip(Ds, As)])  # (n, m_out, m_in)
        norms_arr = np.asarray(norms)
        energy = np.sum(self.cores ** 2, axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            self.sample_captured = np.where(norms_arr > 0, np.minimum(energy / norms_arr, 1.0), np.nan)

    @property
    def rank(self) -> int:
        return int(min(self.P.shape[1], self.Q.shape[1]))

    def means(self, weights: np.ndarray) -> np.ndarray:
        """(R, m_out, m_in) cores of the weighted sums sum_i w_i G_i for weight rows (R, n)."""
        w = np.atleast_2d(weights)
        n, a, b = self.cores.shape
        return (w @ self.cores.reshape(n, a * b)).reshape(-1, a, b)


def core_spectra(cores: np.ndarray, k: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Squared singular values (R, r) descending of each core (R, a, b), and (if k > 0) the top-k left
    singular vectors (R, a, k) in core coordinates, from eigh of the smaller Gram C C^T / C^T C."""
    C = np.asarray(cores, dtype=np.float64)
    left_small = C.shape[1] <= C.shape[2]
    M = C @ np.swapaxes(C, 1, 2) if left_small else np.swapaxes(C, 1, 2) @ C
    if k <= 0:
        lam = np.linalg.eigvalsh(M)[:, ::-1]
        return np.clip(lam, 0, None), None
    lam, E = np.linalg.eigh(M)
    lam, E = np.clip(lam[:, ::-1], 0, None), E[:, :, ::-1]
    if left_small:
        return lam, E[:, :, :k]
    with np.errstate(divide="ignore", invalid="ignore"):
        U = C @ E[:, :, :k] / np.sqrt(lam[:, None, :k])
    return lam, np.nan_to_num(U)


#: Energy outside the core below this share of the total is rounding (a float32 Gram is exact to ~1e-6
#: relative), not missed energy: :func:`spectrum_stats` certifies as if it were 0.
MISSING_FLOOR = 1e-5


def spectrum_stats(s2: np.ndarray, total: np.ndarray, etas: Sequence[float] = (0.9,),
                   cer_k: int = 8) -> dict[str, np.ndarray]:
    """Rank metrics of many spectra given their squared singular values s2 (R, r) descending and their exact
    total energies (R,) (||G||_F^2, >= sum s2 when the core misses energy).

    Returns {"k<eta*100>": smallest k with sum_{j<=k} s2 / total >= eta (r + 1 when the core never gets
    there: "more than r"), "k<eta*100>_certified": whether that k is exact, "cer": CER(cer_k), "stable_rank":
    total / s2_1, "effective_rank": exp(H(p)), p_j = s_j / sum s (the core's singular values only),
    "captured": sum s2 / total}, each (R,). Zero spectra give 0 ranks.

    Certificate (DESIGN.md notation; G = G_in + G_out, G_in the core part, eps = ||G_out||_F^2 = total -
    sum s2): the top-k energy E_k of G lies in [E_k(core), (sqrt(E_k(core)) + sqrt(eps))^2] (lower: the
    core's singular subspaces are candidates; upper: sqrt(E_k) is a unitarily invariant (Ky Fan k, 2) norm,
    so the triangle inequality holds, and E_k(G_out) <= eps). k@eta is exact when the smallest k reaching
    eta by the upper bound equals the one reaching it by the lower bound."""
    s2 = np.clip(np.atleast_2d(s2), 0, None)
    total = np.maximum(np.asarray(total, dtype=float), s2.sum(axis=1))
    out: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        energy = np.cumsum(s2, axis=1)
        missing = np.clip(total - energy[:, -1], 0, None)
        missing = np.where(missing <= MISSING_FLOOR * total, 0.0, missing)  # float32 Gram rounding, not a miss
        cer = energy / total[:, None]
        upper = (np.sqrt(energy) + np.sqrt(missing)[:, None]) ** 2 / total[:, None]
        for eta in etas:
            reached = cer >= eta - 1e-12
            k = np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, s2.shape[1] + 1).astype(float)
            maybe = upper >= eta - 1e-12
            k_low = np.where(maybe.any(axis=1), maybe.argmax(axis=1) + 1, s2.shape[1] + 1).astype(float)
            name = f"k{round(eta * 100)}"
            out[name] = np.where(total > 0, k, 0.0)
            out[f"{name}_certified"] = (k == k_low) | (total <= 0)
        out["cer"] = np.where(total > 0, cer[:, min(cer_k, s2.shape[1]) - 1], 1.0)
        out["stable_rank"] = np.where(s2[:, 0] > 0, total / s2[:, 0], 0.0)
        s = np.sqrt(s2)
        p = s / s.sum(axis=1, keepdims=True)
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        out["effective_rank"] = np.where(s2[:, 0] > 0, np.exp(entropy), 0.0)
        out["captured"] = np.where(total > 0, energy[:, -1] / total, 1.0)
    return out
