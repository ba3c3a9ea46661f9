"""The measurements and the defence call of :mod:`analysis.lab.watch` (``SafetyGeometryCallback``), as plain
functions: which modules are measured, the safety gradient and its basis from one capture pass, the metrics of
one update, and the one call site of the lab's SPF / PCGrad projection. Definitions and conventions: the
docstring of :mod:`analysis.lab.watch`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.core.config import ConfigError

__all__ = ["SafetyGradient", "WatchedModule", "apply_defence", "capture_factors", "measure", "measured_statement",
           "safety_gradients", "watched_modules", "weight_dot"]


# --------------------------------------------------------------------------------------------------
# which modules
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WatchedModule:
    """One measured matrix: HF path, display label, transformer layer, kind (``q``, ``down``, ...), LoRA
    factor ("A", "B" or None), the module and its weight (shape (d_out, d_in) after ``as_out_in``)."""

    name: str
    label: str
    layer: int | None
    kind: str
    factor: str | None
    module: nn.Module
    weight: nn.Parameter

    def describe(self) -> dict[str, Any]:
        d_out, d_in = self.grad_view(self.weight).shape
        return {"name": self.name, "label": self.label, "layer": self.layer, "kind": self.kind,
                "factor": self.factor, "d_out": int(d_out), "d_in": int(d_in)}

    def grad_view(self, tensor: torch.Tensor) -> torch.Tensor:
        from analysis.llm.anatomy import as_out_in

        return as_out_in(self.module, tensor)


def _lora_factor(name: str) -> tuple[str, str | None]:
    """(path of the adapted module, "A" / "B") for a PEFT LoRA factor's path, else (name, None)."""
    for factor in ("A", "B"):
        marker = f".lora_{factor}."
        if marker in name:
            return name.split(marker)[0], factor
    return name, None


def watched_modules(model: nn.Module, regex: str | None = None) -> list[WatchedModule]:
    """The measured modules (module docstring), in model order; ``regex`` restricts them by HF path.

    Raises ConfigError when none is trainable (e.g. a frozen model) or the regex matches none."""
    import re

    from analysis.llm.anatomy import LAYER_TYPES, ModuleInfo, layer_index, module_kind

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for name, module in model.named_modules():
        if type(module) not in LAYER_TYPES or module is head or not module.weight.requires_grad:
            continue
        if regex and not re.search(regex, name):
            continue
        parent, factor = _lora_factor(name)
        layer, kind = layer_index(parent), module_kind(parent)
        label = ModuleInfo(parent, kind, layer, 0, 0).label + (f".{factor}" if factor else "")
        out.append(WatchedModule(name, label, layer, kind, factor, module, module.weight))
    if not out:
        where = f" matching {regex!r}" if regex else ""
        raise ConfigError(f"no trainable linear weight or LoRA factor{where} in the model: nothing to measure")
    return out


def measured_statement(model: nn.Module, modules: Sequence[WatchedModule]) -> dict[str, Any]:
    """What the callback measures and what it leaves out, for the manifest."""
    lora = any(m.factor for m in modules)
    measured_ids = {id(m.weight) for m in modules}
    others = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in measured_ids]
    return {
        "what": "LoRA adapter factors (lora_A, lora_B), each as its own matrix" if lora
        else "trainable linear weights of the blocks (output head excluded)",
        "n_modules": len(modules),
        "n_parameters": int(sum(m.weight.numel() for m in modules)),
        "not_measured_parameters": int(sum(p.numel() for _, p in others)),
        "not_measured_examples": [n for n, _ in others[:5]],
    }


# --------------------------------------------------------------------------------------------------
# the safety gradient and its basis
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SafetyGradient:
    """G_safety of one module at the current weights: ``G`` (d_out, d_in) on the module's device (float32, or
    float64 for a float64 model), its top-k basis ``U`` (d_out, k'), ``V`` (d_in, k') (same device and dtype;
    k' <= k, empty for a zero gradient) and ``U_host`` (U as float64 numpy, for the drift)."""

    G: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    U_host: np.ndarray


def _batch_to(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    return dataclasses.replace(batch, **{name: getattr(batch, name).to(device)
                                         for name in ("input_ids", "attention_mask", "labels", "position_ids")})


def capture_factors(model: nn.Module, batch, names: Sequence[str]
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(losses (n,), {module: D (rows, d_out)}, {module: A (rows, d_in)}) of a tokenised batch, all samples'
    kept rows stacked: ``engine.capture.capture_batch``'s pass (same kept rows, FactorCapture, no ``.grad``)
    with the output head applied only where a response token is predicted (``formatting.response_losses``):
    the same per-sample losses and factors, ~15% less work on SmolLM2 (its 49k x 576 head)."""
    from analysis.engine.capture import FactorCapture, kept_positions
    from analysis.llm.formatting import response_losses

    kept = kept_positions(batch.attention_mask, batch.labels)
    width = batch.input_ids.shape[1]
    with FactorCapture(model, names) as capture:
        capture.set_rows(torch.cat([i * width + positions for i, positions in enumerate(kept)]))
        losses = response_losses(model, batch.model_inputs(), batch.labels)
        capture.backward(losses.sum())
    return losses.detach(), capture.output_grads, capture.inputs


def safety_gradients(model: nn.Module, batch, modules: Sequence[WatchedModule], k: int, svd: str = "auto",
                     generator: torch.Generator | None = None) -> tuple[float, dict[str, SafetyGradient]]:
    """(mean safety loss, {module: SafetyGradient}) of a tokenised safety batch at the current weights.

    One capture pass (:func:`capture_factors`: no ``.grad`` written), in eval mode, under a forked RNG (CPU and
    CUDA), so the training run it is called from is bitwise unchanged. G = D^T A / n in the factors' dtype
    (float32 at least); the basis is the lab's ``spf.top_k_basis(G, k, svd)`` (SPF's own basis: "auto" is
    exact up to 128 rows or columns, else the seeded randomized range finder, ``generator``)."""
    from analysis.lab.spf import top_k_basis
    from analysis.llm.models import input_device

    was_training = model.training
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            losses, output_grads, inputs = capture_factors(model, _batch_to(batch, input_device(model)),
                                                           [m.name for m in modules])
    finally:
        model.train(was_training)
    n = len(losses)
    out = {}
    with torch.no_grad():
        for m in modules:
            D, A = output_grads.pop(m.name), inputs.pop(m.name)
            work = torch.promote_types(D.dtype, torch.float32)
            G = (D.to(work).T @ A.to(work)) / n
            del D, A
            U, _, V = top_k_basis(G, k, svd, generator=generator)
            out[m.name] = SafetyGradient(G, U, V, U.detach().cpu().double().numpy())
    return float(losses.mean()), out


# --------------------------------------------------------------------------------------------------
# measuring one update
# --------------------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def measure(modules: Sequence[WatchedModule], safety: Mapping[str, SafetyGradient], lr: float,
            reference: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(totals, per-module lists) of cos, share, dloss_sgd, drift, grad_norm, safety_norm for the current
    ``.grad`` of ``modules`` against ``safety`` (module docstring); ``reference`` {module: U_0 (d_out, k0)}
    for the drift (None or a missing/empty entry: NaN). A module without ``.grad`` counts as a zero gradient.
    Totals take all modules as one vector; ``drift`` is the mean over modules with a defined value."""
    from analysis.engine.geometry import GeometryError, subspace_overlap

    per: dict[str, list[float]] = {key: [] for key in ("cos", "share", "dloss_sgd", "drift", "grad_norm",
                                                       "safety_norm")}
    dot_sum = gg_sum = ss_sum = inside_sum = 0.0
    with torch.no_grad():
        for m in modules:
            s = safety[m.name]
            grad = m.weight.grad
            G = m.grad_view(grad).to(s.G.dtype) if grad is not None else torch.zeros_like(s.G)
            dot = float((s.G * G).sum(dtype=torch.float64))
            gg, ss = float(G.pow(2).sum(dtype=torch.float64)), float(s.G.pow(2).sum(dtype=torch.float64))
            inside = float((s.U.T @ G).pow(2).sum(dtype=torch.float64)) if s.U.shape[1] else float("nan")
            dot_sum, gg_sum, ss_sum = dot_sum + dot, gg_sum + gg, ss_sum + ss
            inside_sum += 0.0 if math.isnan(inside) else inside
            per["cos"].append(_ratio(dot, math.sqrt(gg * ss)))
            per["share"].append(_ratio(inside, gg))
            per["dloss_sgd"].append(-lr * dot)
            first = None if reference is None else reference.get(m.name)
            drift = float("nan")
            if first is not None and first.shape[1] and s.U_host.shape[1]:
                try:
                    drift = subspace_overlap(first, s.U_host)
                except GeometryError:  # a basis not orthonormal to 1e-5 (never expected): no number, no crash
                    pass
            per["drift"].append(drift)
            per["grad_norm"].append(math.sqrt(gg))
            per["safety_norm"].append(math.sqrt(ss))
    drifts = [d for d in per["drift"] if not math.isnan(d)]
    totals = {"cos": _ratio(dot_sum, math.sqrt(gg_sum * ss_sum)), "share": _ratio(inside_sum, gg_sum),
              "dloss_sgd": -lr * dot_sum, "drift": float(np.mean(drifts)) if drifts else float("nan"),
              "grad_norm": math.sqrt(gg_sum), "safety_norm": math.sqrt(ss_sum)}
    return totals, per


def weight_dot(modules: Sequence[WatchedModule], safety: Mapping[str, SafetyGradient],
               before: Mapping[str, torch.Tensor]) -> list[float]:
    """Per module <G_safety, W_now - W_before> (the first-order safety-loss change of the update taken)."""
    with torch.no_grad():
        return [float((safety[m.name].G * m.grad_view(m.weight.detach() - before[m.name]).to(safety[m.name].G.dtype)
                       ).sum(dtype=torch.float64)) for m in modules]


# --------------------------------------------------------------------------------------------------
# acting: the one call site of the lab's defence code
# --------------------------------------------------------------------------------------------------


def apply_defence(mode: str, spf_mode: str, grads: Mapping[str, torch.Tensor],
                  safety: Mapping[str, SafetyGradient]) -> dict[str, float]:
    """Project the gradient views ``grads`` {module: (d_out, d_in) view of ``.grad``} in place with the
    registered training defence ``mode`` (:meth:`analysis.lab.defences.Defence.project`: SPF against each
    module's (U_k, V_k) in ``spf_mode``, PCGrad against the whole G_safety): the very code the lab's trainer
    runs. Returns ``removed`` (||G - G'|| / ||G|| over all modules) and the defence's own metrics."""
    from analysis.lab.defences import training_defence

    with torch.no_grad():
        return training_defence(mode).project(grads, {name: s.G for name, s in safety.items()},
                                              {name: (s.U, s.V) for name, s in safety.items()}, spf_mode)
