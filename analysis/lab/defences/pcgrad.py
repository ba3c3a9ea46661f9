"""PCGrad-style whole-gradient projection (our SafeGrad reading).

g = the fine-tuning gradient of all selected weights taken as one vector, g_s = the safety gradient
(d L_safety / d W, same convention as :mod:`analysis.lab.spf`: a step -lr g changes L_safety by
-lr <g_s, g> to first order). When <g, g_s> < 0 the step raises the safety loss; PCGrad removes the
conflicting component: g' = g - (<g, g_s> / ||g_s||^2) g_s, so <g', g_s> = 0; otherwise g is kept.
Property: <g', g_s> >= 0 always (:func:`pcgrad_project`). Unlike SPF it uses one direction for the whole
model (not a k-dim basis per module) and leaves all of g orthogonal to g_s untouched.

In a run (method "pcgrad"): the reference g_s is the safety gradient of the last refresh (every
``spf.refresh`` steps, ``spf.safety_loss`` on ``spf.safety_batch`` refusals); a ~zero one (the KL signal at
step 1) keeps no reference, and nothing is projected until the next refresh. The reference is checkpointed
(``pcgrad/<module>``). Metrics: pcgrad_dot, pcgrad_cos, pcgrad_removed (:func:`pcgrad_project`).

Shapes: every matrix is a module's (d_out, d_in) view (``anatomy.as_out_in``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from analysis.lab.defences.base import Defence, Needs, Variant, register

if TYPE_CHECKING:
    import torch

__all__ = ["PCGrad", "pcgrad_project"]

PREFIX = "pcgrad/"  # checkpoint keys of the reference gradient


def pcgrad_project(grads: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Project the whole fine-tuning gradient ``grads`` {module: (d_out, d_in)} against the whole safety
    gradient ``safety`` (same keys) in place, PCGrad-style (module docstring).

    Returns {"pcgrad_dot": <g, g_s> before, "pcgrad_cos": its cosine, "pcgrad_removed": ||g - g'|| / ||g||}
    (0 removed when there was no conflict)."""
    import torch

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


@register
class PCGrad(Defence):
    name = "pcgrad"
    label = "PCGrad"
    description = "PCGrad: remove the whole gradient's conflicting component along the whole safety gradient"
    hint = "whole-gradient projection"
    needs = Needs(safety_gradient=True, weight_gradients=True)
    order = 2
    variants = (Variant("pcgrad", description, method="pcgrad", default=True, order=3),)

    def __init__(self, config, projector=None):
        super().__init__(config, projector)
        self.reference: dict[str, torch.Tensor] | None = None  # the last non-zero safety gradient

    @classmethod
    def project(cls, grads, safety, bases, mode=None):
        metrics = pcgrad_project(grads, safety)
        return {"removed": metrics["pcgrad_removed"], **metrics}

    @classmethod
    def settings_text(cls, config: Mapping[str, Any]) -> str:
        spf = config["spf"]
        return f"R={spf['refresh']}, {spf.get('safety_loss', 'refusal')}"

    def refresh(self, step, safety, *, zero, generator):
        self.reference = None if zero else {name: g.detach() for name, g in safety.items()}
        return {}

    def before_step(self, step, grads):
        return pcgrad_project(grads, self.reference) if self.reference is not None else {}

    def state(self):
        return {f"{PREFIX}{name}": G.contiguous() for name, G in (self.reference or {}).items()}

    def load_state(self, arrays):
        devices = {m.name: m.weight.device for m in self.projector.modules} if self.projector is not None else {}
        reference = {key[len(PREFIX):]: value for key, value in arrays.items() if key.startswith(PREFIX)}
        self.reference = {name: value.to(devices[name]) if name in devices else value
                          for name, value in reference.items()} or None
