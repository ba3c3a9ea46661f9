"""SPF, safety-preserving fine-tuning, as a defence: the SPF step (which projection, of what, when).

The safety basis of every selected module (top-k singular vectors of its safety gradient, refreshed every
``spf.refresh`` steps) is :class:`analysis.lab.spf.SPFProjector`'s; the pure projections are
:mod:`analysis.engine.geometry.projections`; the sign convention and the refinements are documented in
:mod:`analysis.lab.spf`. This file decides, per run (method "spf"):

* ``spf.mode`` -> the projection (:data:`PROJECTIONS`): "conflict" removes the basis components with c_j < 0
  (``project_conflict``), "orthogonal" removes U_k U_k^T G (``project_orthogonal``; CERT-Lab's "orth"), "same"
  keeps only U_k U_k^T G (``project_same``; CERT-Lab's "same", the control arm);
* ``spf.target`` -> what is projected: "gradient" (the fine-tuning gradient before the optimizer, in
  :meth:`SPF.before_step`) or "update" (the optimizer's weight change, in :meth:`SPF.wrap_step`);
* a ~zero safety gradient (the KL signal at step 1) keeps no basis: nothing is projected until the next refresh.
Metrics: spf_removed_mean / spf_removed_total (``SPFProjector.removed_metrics``), drift_overlap(_right) at
every refresh (``SPFProjector.record_drift``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from analysis.lab.config import SPF_MODES, SPFConfig
from analysis.lab.defences.base import Defence, Needs, Variant, register

if TYPE_CHECKING:
    import torch

__all__ = ["PROJECTIONS", "SPF", "project_gradients"]


def _conflict(G, U, V):
    from analysis.engine.geometry import project_conflict

    return project_conflict(G, U, V, check=False)


def _orthogonal(G, U, V):
    from analysis.engine.geometry import project_orthogonal

    return project_orthogonal(G, U, check=False)


def _same(G, U, V):
    from analysis.engine.geometry import project_same

    return project_same(G, U, check=False)


#: spf.mode -> (G (m, p), U_k (m, k), V_k (p, k)) -> (G', removed fraction ||G - G'|| / ||G||)
PROJECTIONS: dict[str, Callable[[Any, Any, Any], tuple[Any, float]]] = {
    "conflict": _conflict, "orthogonal": _orthogonal, "same": _same}
assert tuple(PROJECTIONS) == SPF_MODES, "every SPFConfig mode needs a projection here"


def project_gradients(grads: Mapping[str, torch.Tensor], basis: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                      mode: str) -> dict[str, tuple[float, float]]:
    """Project each (d_out, d_in) gradient view in place against its module's safety basis (U_k, V_k) with
    the ``mode`` projection (:data:`PROJECTIONS`). A module with an empty basis (or none) is left as it is.
    Returns {module: (removed fraction ||G - G'|| / ||G||, ||G||)}."""
    project = PROJECTIONS[mode]
    out = {}
    for name, G in grads.items():
        U, V = basis.get(name, (G.new_zeros(G.shape[0], 0), None))
        norm = float(G.norm())
        if U.shape[1] == 0:
            out[name] = (0.0, norm)
            continue
        new, fraction = project(G, U, V)
        G.copy_(new)
        out[name] = (fraction, norm)
    return out


@register
class SPF(Defence):
    name = "spf"
    label = "SPF"
    description = "SPF: remove the update's components that conflict with the top-k refusal-gradient subspace"
    needs = Needs(safety_gradient=True, safety_basis=True, weight_gradients=True)
    modes = SPF_MODES
    order = 1
    variants = (
        Variant("spf", description, method="spf", default=True, order=2),
        Variant("orth", "SPF orthogonal (CERT-Lab orth): remove the whole safety-subspace component", method="spf",
                settings={"spf": {"mode": "orthogonal"}}, default=True, order=4),
        Variant("same", "SPF same (CERT-Lab same): keep only the safety-subspace component (a control)", method="spf",
                settings={"spf": {"mode": "same"}}, default=True, order=5),
        Variant("spf-compliance", "SPF with the compliance signal (ascent on the affirmative “Sure, here is…” "
                "target's CE)", method="spf", settings={"spf": {"safety_loss": "compliance"}}, order=7),
        Variant("spf-kl", "SPF with the KL-to-aligned signal on harmful prompts", method="spf",
                settings={"spf": {"safety_loss": "kl"}}, order=8),
    )

    @classmethod
    def project(cls, grads, safety, bases, mode=None):
        removed = project_gradients(grads, bases, mode or SPFConfig.mode)
        total = sum(norm * norm for _, norm in removed.values())
        lost = sum((fraction * norm) ** 2 for fraction, norm in removed.values())
        return {"removed": math.sqrt(lost / total) if total > 0 else 0.0}

    @classmethod
    def settings_text(cls, config: Mapping[str, Any]) -> str:
        from analysis.lab.config import spf_settings

        return spf_settings(config["spf"])

    def refresh(self, step, safety, *, zero, generator):
        projector = self.projector
        if zero:
            projector.basis = {}
            return {}
        projector.refresh_basis(safety, step, generator)
        return projector.record_drift(step, projector.basis)

    def _project(self, step: int, grads: Mapping[str, torch.Tensor]) -> dict[str, float]:
        removed = project_gradients(grads, self.projector.basis, self.config.spf.mode)
        return self.projector.removed_metrics(step, removed) if removed else {}

    def before_step(self, step, grads):
        if self.config.spf.target != "gradient" or not self.projector.basis:
            return {}
        return self._project(step, grads)

    def wrap_step(self, step):
        if self.config.spf.target != "update" or not self.projector.basis:
            return None

        def projected_step(optimizer_step: Callable[[], None]) -> dict[str, float]:
            """Take the optimizer step, then project the pseudo-gradient P = -(W_new - W_old) of every module
            and set W = W_old - P' (exact under AdamW; :mod:`analysis.lab.spf`, refinement 1)."""
            import torch

            from analysis.llm.anatomy import as_out_in

            modules = self.projector.modules
            before = {m.name: m.weight.detach().clone() for m in modules}
            optimizer_step()
            with torch.no_grad():
                pseudo = {m.name: before[m.name] - m.weight for m in modules}  # -(W_new - W_old), stored layout
                metrics = self._project(step, {m.name: as_out_in(m.module, pseudo[m.name]) for m in modules})
                for m in modules:
                    m.weight.copy_(before[m.name] - pseudo[m.name])
            return metrics

        return projected_step
