"""Defences against harmful fine-tuning, one file each, registered by name (:mod:`.base`: the
:class:`Defence` base class, :func:`register`, lookups with "unknown defence 'x', available: ..." errors).

Files: :mod:`.plain` (no defence; the grid's baseline), :mod:`.spf` (the SPF step: conflict / orthogonal / same,
of the gradient or the update), :mod:`.pcgrad` (whole-gradient projection), :mod:`.safe_lora` (post hoc).
Adding a defence: a new file here that defines a :class:`Defence` subclass decorated with :func:`register`
(found on the first lookup), plus its test. The projections are importable from here as before.
"""

from analysis.lab.defences.base import (
    ROLES,
    Defence,
    Needs,
    PostHoc,
    UnknownDefence,
    Variant,
    available,
    get,
    register,
    role_of,
    training_defence,
    training_names,
    unregister,
    variant,
    variants,
)
from analysis.lab.defences.pcgrad import pcgrad_project
from analysis.lab.defences.safe_lora import SAFE_LORA_MODES, SafeLoraModule, alignment_projector, safe_lora_project

__all__ = ["ROLES", "SAFE_LORA_MODES", "Defence", "Needs", "PostHoc", "SafeLoraModule", "UnknownDefence", "Variant",
           "alignment_projector", "available", "get", "pcgrad_project", "register", "role_of", "safe_lora_project",
           "training_defence", "training_names", "unregister", "variant", "variants"]
