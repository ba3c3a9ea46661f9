"""Spectrum metrics of singular values s (descending): cumulative energy, k at an energy fraction, effective /
stable rank, participation ratio."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.engine.geometry.base import GeometryError, as_array

__all__ = [
    "cumulative_energy", "effective_rank", "k_at_energy", "participation_ratio", "spectrum_summary", "stable_rank"
]

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
