"""Shared by the geometry modules: the error type and the numpy/torch boundary (float64 arrays, checks,
deterministic SVD signs)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import scipy.linalg as sla

__all__ = [
    "GeometryError", "ORTHONORMAL_TOL", "as_array", "check_k", "check_orthonormal", "exact_svd", "is_torch",
    "sign_fix"
]

#: Tolerance on max |Q^T Q - I| when a function requires orthonormal columns (loose enough for bases
#: computed in float32 and converted).
ORTHONORMAL_TOL = 1e-5


class GeometryError(ValueError):
    """Bad input to a geometry function (NaN/Inf, wrong shape, undefined direction, ...)."""


# --------------------------------------------------------------------------------------------------
# boundary helpers
# --------------------------------------------------------------------------------------------------


def is_torch(x: Any) -> bool:
    """True if x is a torch tensor (without importing torch if nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def as_array(x: Any, name: str = "array", ndim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Convert numpy / torch / array-like to a finite float64 numpy array.

    Torch tensors are detached and moved to CPU. Raises GeometryError on NaN/Inf, complex input, a wrong
    number of dimensions (if ``ndim`` is given) or an empty array (unless ``allow_empty``).
    """
    if is_torch(x):
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


def check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise GeometryError(f"{name} must be a positive integer, got {k!r}")
    if k < 1:
        raise GeometryError(f"{name} must be >= 1, got {k}")
    return int(k)


def sign_fix(U: np.ndarray, Vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def exact_svd(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (U, s, Vt) via LAPACK gesdd, falling back to gesvd if gesdd does not converge."""
    try:
        U, s, Vt = sla.svd(M, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:
        U, s, Vt = sla.svd(M, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return U, s, Vt


def check_orthonormal(Q: np.ndarray, name: str, tol: float = ORTHONORMAL_TOL) -> None:
    err = np.max(np.abs(Q.T @ Q - np.eye(Q.shape[1]))) if Q.shape[1] else 0.0
    if err > tol:
        raise GeometryError(
            f"{name}: columns are not orthonormal (max |Q^T Q - I| = {err:.2e} > {tol:g}); "
            "use orthonormal_basis() first"
        )
