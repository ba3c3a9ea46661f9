"""Plain fine-tuning: no defence. The attack as it is, and the grid's baseline (the aligned model, not
fine-tuned).

A plain run changes nothing in the update. When it tracks conflicts (``FinetuneConfig.track_conflict``) it
measures, at every safety-gradient step, the drift of the safety subspace (:meth:`SPFProjector.record_drift`)
with the *default* basis settings and its own seeded generator: a measurement only, training is unchanged.
Since the SPF projection settings cannot change a plain run, they are left out of its run id
(``run_id_ignores``), so a plain arm is reused when only they change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from analysis.lab.defences.base import Defence, Needs, Variant, register

if TYPE_CHECKING:
    import torch


@register
class Plain(Defence):
    name = "plain"
    label = "plain fine-tuning"
    description = "plain fine-tuning (the attack as is)"
    needs = Needs()
    run_id_ignores = ("k", "mode", "target", "svd", "oversample", "power_iters")
    order = 0
    variants = (
        Variant("none", "the aligned model, not fine-tuned (the baseline)", role="baseline", default=True, order=0),
        Variant("plain", description, role="attack", method="plain", default=True, order=1),
    )

    def refresh(self, step: int, safety: Mapping[str, torch.Tensor], *, zero: bool,
                generator: torch.Generator) -> dict[str, float]:
        """Drift of the default-settings safety basis (a measurement; see the module docstring)."""
        from analysis.lab.config import SPFConfig

        projector = self.projector
        return projector.record_drift(step, projector.top_k_bases(safety, generator, SPFConfig()), SPFConfig.k)
