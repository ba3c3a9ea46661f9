"""SPF projections (torch-native): remove from a utility gradient its component in a safety subspace
(``conflict``, ``orthogonal``), or keep only that component (``same``, the control). Which one a run uses is the
SPF defence's choice (:mod:`analysis.lab.defences.spf`); these are the pure maths."""

from __future__ import annotations

from typing import Any

from analysis.engine.geometry.base import ORTHONORMAL_TOL, GeometryError, as_array, is_torch

__all__ = ["project_conflict", "project_orthogonal", "project_same"]

# --------------------------------------------------------------------------------------------------
# SPF projections (torch-native)
# --------------------------------------------------------------------------------------------------


def _torch_operands(G_u: Any, *bases: Any, check: bool) -> tuple[Any, list[Any], Any, bool]:
    """Return (G as torch in compute dtype, bases as torch, original dtype, given_as_torch)."""
    import torch

    given_torch = is_torch(G_u)
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
        if is_torch(Bm):
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


def project_same(G_u: Any, U_k: Any, *, check: bool = True) -> tuple[Any, float]:
    """SPF "same" projection (the control arm): G' = U_k U_k^T G_u (keep only the left safety-subspace part).

    G_u (m, p), U_k (m, k) orthonormal. Afterwards (I - U_k U_k^T) G' = 0; "orthogonal" + "same" = G_u.
    Returns (G', removed_fraction = ||(I - U_k U_k^T) G_u||_F / ||G_u||_F, 0 for zero G_u). Torch in ->
    torch out; numpy in -> numpy out (see :func:`project_conflict`).
    """
    G, (U,), orig_dtype, given_torch = _torch_operands(G_u, U_k, check=check)
    kept = U @ (U.T @ G)
    return _finish(G, kept, G - kept, orig_dtype, given_torch)
