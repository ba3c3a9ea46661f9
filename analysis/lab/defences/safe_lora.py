"""Safe LoRA-style post-hoc projection (Hsu et al., 2024).

V = W_aligned - W_base per module (the alignment delta; we have both models), dW = W_finetuned - W_aligned
the fine-tuning delta. Safe LoRA projects dW with C = V V^T / ||V||_F; that C is not idempotent, so it is a
weighting rather than a projection. ``mode="subspace"`` (default) uses the exact orthogonal projector
P = U_r U_r^T onto the top-r left singular vectors of V (r = ``rank``; all of a full-rank V would make P the
identity). Per module, dW' = P dW and the module is replaced by W_aligned + dW' only when the cosine
cos(dW, dW') < ``threshold`` (the update strays from the alignment subspace); otherwise it is kept.
Property: a projected module's delta lies in the subspace, P dW' = dW' (:func:`safe_lora_project`).
``mode="paper"`` uses Safe LoRA's C = V V^T / ||V||_F as published.

As a defence (name "safe-lora", post hoc): the grid's ``safe-lora`` row projects the ``plain`` run's model
with :class:`analysis.lab.safe_lora.SafeLoraTask` (the grid's ``safe_lora_threshold`` / ``safe_lora_rank``).

Shapes: every matrix is a module's (d_out, d_in) view (``anatomy.as_out_in``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from analysis.lab.defences.base import Defence, Needs, PostHoc, Variant, register

if TYPE_CHECKING:
    import torch

__all__ = ["SAFE_LORA_MODES", "SafeLora", "SafeLoraModule", "alignment_projector", "safe_lora_project"]

SAFE_LORA_MODES = ("subspace", "paper")


def alignment_projector(V: torch.Tensor, rank: int | None = None, mode: str = "subspace") -> torch.Tensor:
    """(d_out, d_out) matrix a delta is multiplied by from the left: ``subspace``: U_r U_r^T of V's top-``rank``
    left singular vectors (None: V's numerical rank); ``paper``: V V^T / ||V||_F (Safe LoRA's C)."""
    import torch

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


@register
class SafeLora(Defence):
    name = "safe-lora"
    label = "Safe LoRA"
    description = "Safe LoRA: project the plain run's weight change onto the alignment delta's subspace, post hoc"
    needs = Needs(reference_weights=True, post_hoc=True)
    modes = SAFE_LORA_MODES
    order = 3
    variants = (Variant("safe-lora", description, method="plain", post_hoc="safe-lora", default=True, order=6),)

    @classmethod
    def post_hoc(cls, finetuned, aligned, base, options: Mapping[str, Any], ctx, compute=True):
        """:class:`~analysis.lab.safe_lora.SafeLoraTask` of ``finetuned`` with ``options["safe_lora_threshold"]``
        / ``options["safe_lora_rank"]`` (its defaults where absent); row column ``safe_lora_projected``."""
        from analysis.core.config import ModelConfig
        from analysis.lab.safe_lora import SafeLoraTask, defend, safe_lora_root

        task = SafeLoraTask(finetuned=finetuned, aligned=aligned, base=base,
                            threshold=options.get("safe_lora_threshold", SafeLoraTask.threshold),
                            rank=options.get("safe_lora_rank", SafeLoraTask.rank))
        if not compute and not (safe_lora_root() / task.run_id() / "model" / "manifest.json").is_file():
            return None
        defended = defend(task, ctx)
        return PostHoc(ModelConfig(source=defended["folder"]),
                       {"safe_lora_projected": f"{defended['n_projected']}/{defended['n_modules']}"})
