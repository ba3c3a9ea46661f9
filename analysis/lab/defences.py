"""Defences beside SPF, as projections with one defining property each (tested on tiny models).

PCGrad-style whole-gradient projection (our SafeGrad reading)
-------------------------------------------------------------
g = the fine-tuning gradient of all selected weights taken as one vector, g_s = the safety gradient
(d L_safety / d W, same convention as :mod:`analysis.lab.spf`: a step -lr g changes L_safety by
-lr <g_s, g> to first order). When <g, g_s> < 0 the step raises the safety loss; PCGrad removes the
conflicting component: g' = g - (<g, g_s> / ||g_s||^2) g_s, so <g', g_s> = 0; otherwise g is kept.
Property: <g', g_s> >= 0 always (:func:`pcgrad_project`). Unlike SPF it uses one direction for the whole
model (not a k-dim basis per module) and leaves all of g orthogonal to g_s untouched.

Safe LoRA-style post-hoc projection (Hsu et al., 2024)
------------------------------------------------------
V = W_aligned - W_base per module (the alignment delta; we have both models), dW = W_finetuned - W_aligned
the fine-tuning delta. Safe LoRA projects dW with C = V V^T / ||V||_F; that C is not idempotent, so it is a
weighting rather than a projection. ``mode="subspace"`` (default) uses the exact orthogonal projector
P = U_r U_r^T onto the top-r left singular vectors of V (r = ``rank``; all of a full-rank V would make P the
identity). Per module, dW' = P dW and the module is replaced by W_aligned + dW' only when the cosine
cos(dW, dW') < ``threshold`` (the update strays from the alignment subspace); otherwise it is kept.
Property: a projected module's delta lies in the subspace, P dW' = dW' (:func:`safe_lora_project`).
``mode="paper"`` uses Safe LoRA's C = V V^T / ||V||_F as published.

Shapes: every matrix is a module's (d_out, d_in) view (``spf.as_out_in``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

__all__ = ["SAFE_LORA_MODES", "SafeLoraModule", "alignment_projector", "pcgrad_project", "safe_lora_project"]

SAFE_LORA_MODES = ("subspace", "paper")


def pcgrad_project(grads: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Project the whole fine-tuning gradient ``grads`` {module: (d_out, d_in)} against the whole safety
    gradient ``safety`` (same keys) in place, PCGrad-style (module docstring).

    Returns {"pcgrad_dot": <g, g_s> before, "pcgrad_cos": its cosine, "pcgrad_removed": ||g - g'|| / ||g||}
    (0 removed when there was no conflict)."""
    with torch.no_grad():
        dot = sum(float((grads[name].double() * safety[name].double()).sum()) for name in grads)
        gg = sum(float(grads[name].double().pow(2).sum()) for name in grads)
        ss = sum(float(safety[name].double().pow(2).sum()) for name in grads)
        cos = dot / (gg * ss) ** 0.5 if gg > 0 and ss > 0 else float("nan")
        removed = 0.0
        if dot < 0 and ss > 0:
            factor = dot / ss
            for name, G in grads.items():
                G.sub_((factor * safety[name].double()).to(G.dtype))
            removed = abs(factor) * ss ** 0.5 / gg ** 0.5
    return {"pcgrad_dot": dot, "pcgrad_cos": cos, "pcgrad_removed": removed}


def alignment_projector(V: torch.Tensor, rank: int | None = None, mode: str = "subspace") -> torch.Tensor:
    """(d_out, d_out) matrix a delta is multiplied by from the left: ``subspace``: U_r U_r^T of V's top-``rank``
    left singular vectors (None: V's numerical rank); ``paper``: V V^T / ||V||_F (Safe LoRA's C)."""
    if mode not in SAFE_LORA_MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(SAFE_LORA_MODES)}")
    V = V.detach().double()
    if mode == "paper":
        norm = float(V.norm())
        return V @ V.T / norm if norm > 0 else torch.zeros(V.shape[0], V.shape[0], dtype=V.dtype)
    U, s, _ = torch.linalg.svd(V, full_matrices=False)
    keep = int((s > 1e-10 * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    U = U[:, :keep]
    return U @ U.T


@dataclasses.dataclass
class SafeLoraModule:
    """Outcome for one module: cosine between the fine-tuning delta and its projection, whether it was
    projected (cosine < threshold), and ||dW||."""

    name: str
    cosine: float
    projected: bool
    delta_norm: float


def safe_lora_project(finetuned: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor],
                      base: Mapping[str, torch.Tensor], threshold: float = 0.5, rank: int | None = 8,
                      mode: str = "subspace") -> tuple[dict[str, torch.Tensor], list[SafeLoraModule]]:
    """Safe LoRA-style post-hoc projection (module docstring) of (d_out, d_in) weights {module: tensor}.

    Returns (new weights {module: W_aligned + P dW if projected else W_finetuned}, per-module outcomes)."""
    out: dict[str, torch.Tensor] = {}
    report: list[SafeLoraModule] = []
    for name, W in finetuned.items():
        delta = (W.detach().double() - aligned[name].detach().double())
        P = alignment_projector(aligned[name].detach().double() - base[name].detach().double(), rank, mode)
        projected = P @ delta
        dn, pn = float(delta.norm()), float(projected.norm())
        cosine = float((delta * projected).sum()) / (dn * pn) if dn > 0 and pn > 0 else (1.0 if dn == 0 else 0.0)
        use = cosine < threshold
        new = aligned[name].detach().double() + projected if use else W.detach().double()
        out[name] = new.to(W.dtype)
        report.append(SafeLoraModule(name, cosine, use, dn))
    return out, report
