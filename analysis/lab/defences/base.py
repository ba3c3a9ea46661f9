"""The defence registry: a :class:`Defence` per file of this package, registered by name.

A defence is a class with what the trainer, the grid, the CLI and the pages need to know about it (name,
label, one-line description, its settings check, what it :class:`Needs`) and the hooks the trainer calls.
Each defence file registers its class with :func:`register` (a decorator); the package's modules are imported
on the first lookup (lm-evaluation-harness style: ``unknown defence 'x', available: ...``), and a test or a
plug-in may register one from anywhere. No code outside a defence's own file branches on its name.

Training-time hooks, called by :class:`analysis.lab.trainer.FinetuneTrainer` once per optimizer step, in this
order (gradients are each module's (d_out, d_in) view, ``anatomy.as_out_in``; all under ``torch.no_grad``):

1. every ``spf.refresh`` steps, when the run computes a safety gradient: :meth:`Defence.refresh` with
   ``safety`` = {module: G_safety (d_out, d_in)} of the selected modules (``zero``: its norm is ~0, e.g. the KL
   signal at step 1: nothing to project against);
2. :meth:`Defence.before_step` with ``grads`` = {module: the fine-tuning gradient (d_out, d_in)}, a view of
   ``.grad`` that the hook may change in place (empty unless ``needs.weight_gradients``);
3. the optimizer step, through :meth:`Defence.wrap_step` when it returns a wrapper (e.g. SPF projecting the
   optimizer's weight change).
Each hook returns metrics {name: float} that join the step's history row. :meth:`Defence.state` /
:meth:`Defence.load_state` carry what a checkpoint must keep. A post-hoc defence (``needs.post_hoc``)
implements :meth:`Defence.post_hoc` instead: it turns a finished run's model into the defended model.

Outside :class:`~analysis.lab.trainer.FinetuneTrainer` (e.g. a training-loop callback), per run::

    projector = SPFProjector(spf_modules(model, config.spf), config.spf)          # analysis.lab.spf
    defence = training_defence(config.method)(config, projector)                 # validated config
    # every spf.refresh steps, before the step (safety_loss: L_safety of a safety batch, as the trainer's):
    safety = projector.safety_gradients(safety_loss)                             # {module: (d_out, d_in)}
    metrics = defence.refresh(step, safety, zero=norm <= ZERO_SAFETY_RTOL * grad_norm, generator=gen)
    # every step, after backward, under torch.no_grad():
    metrics |= defence.before_step(step, {m.name: as_out_in(m.module, m.weight.grad) for m in projector.modules})
    wrap = defence.wrap_step(step)
    metrics |= wrap(optimizer.step) if wrap is not None else (optimizer.step() or {})

The hooks read only ``config.spf`` (and ``config.method``); ``validate`` also reads ``config.trainable``.

The defence grid runs :class:`Variant` s (named settings of a defence: ``orth`` is SPF with
``spf.mode="orthogonal"``); each defence declares its own in ``variants``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from analysis.core.config import ConfigError

if TYPE_CHECKING:
    import torch

    from analysis.core.config import ModelConfig
    from analysis.core.tasks import TaskContext
    from analysis.lab.config import FinetuneConfig
    from analysis.lab.spf import SPFProjector

__all__ = ["ROLES", "Defence", "Needs", "PostHoc", "UnknownDefence", "Variant", "available", "get", "register",
           "role_of", "training_defence", "training_names", "unregister", "variant", "variants"]

#: what a grid variant is: the aligned model itself, the attack as is, or a defence against it
ROLES = ("baseline", "attack", "defence")


class UnknownDefence(ConfigError):
    """A defence or grid variant name that is not registered (the message lists the available ones)."""


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a defence needs from the run.

    safety_gradient: the selected modules' safety gradient every ``spf.refresh`` steps (``spf.safety_loss``,
    ``spf.safety_batch``); safety_basis: its per-module top-k basis (``spf.k``, ``spf.svd``); weight_gradients:
    changes the (d_out, d_in) weight gradients or updates (so LoRA adapters are refused); reference_weights: the
    aligned and pre-alignment models' weights; post_hoc: acts on a finished run's model, not while training."""

    safety_gradient: bool = False
    safety_basis: bool = False
    weight_gradients: bool = False
    reference_weights: bool = False
    post_hoc: bool = False


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the defence grid: ``name`` (unique over all defences), a one-line ``description``, its
    ``role`` (:data:`ROLES`), ``method``: the training defence of its fine-tuning run (None: no run, the model
    as it is), ``settings``: FinetuneConfig overrides of that run (``spf`` as a dict, merged), ``post_hoc``:
    the post-hoc defence applied to the run's model (None: none), ``default``: in the default grid, ``order``:
    place in the grid's lists (ties: registration order)."""

    name: str
    description: str
    role: str = "defence"
    method: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    post_hoc: str | None = None
    default: bool = False
    order: float = 100.0

    @property
    def trains(self) -> bool:
        return self.method is not None


@dataclasses.dataclass(frozen=True)
class PostHoc:
    """What a post-hoc defence made: the defended model, and extra columns for the grid's row."""

    model: ModelConfig
    row: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Defence:
    """Base class of a defence (module docstring). Class attributes describe it; an instance is one run's
    state, made by the trainer with ``(config, projector)``: the run's ``FinetuneConfig`` and its
    :class:`~analysis.lab.spf.SPFProjector` (the selected modules, shared safety-basis state and measurements).

    name: the value of ``FinetuneConfig.method`` (or of a variant's ``post_hoc``); label: short, for legends
    ("SPF"); description: one line; hint: a few words shown after "<label> only" on the Fine-tune page;
    modes: the names of its settings' choices (only its own file branches on them); run_id_ignores:
    ``SPFConfig`` fields that cannot change this defence's run (left out of its run id); order: place in lists
    (ties: by name).
    """

    name: ClassVar[str]
    label: ClassVar[str]
    description: ClassVar[str]
    hint: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs()
    modes: ClassVar[tuple[str, ...]] = ()
    variants: ClassVar[tuple[Variant, ...]] = ()
    run_id_ignores: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[float] = 100.0

    def __init__(self, config: FinetuneConfig, projector: SPFProjector | None = None):
        self.config = config
        self.projector = projector

    # -- description -------------------------------------------------------------------------------
    @classmethod
    def validate(cls, config: FinetuneConfig) -> None:
        """Raise ``ConfigError`` (naming the field and the allowed values) when ``config`` cannot run this
        defence. Default: a defence that changes weight gradients refuses LoRA."""
        if cls.needs.weight_gradients and config.trainable == "lora":
            raise ConfigError(f"{cls.name} ({cls.label}) changes the weight gradient of each linear module; with LoRA "
                              "the weight change is a product of adapters and the projection has no guarantee: use "
                              "trainable='blocks', 'linear' or 'last', or method='plain' with LoRA")

    @classmethod
    def settings_text(cls, config: Mapping[str, Any]) -> str:
        """Short text of the settings that shape this defence, from a (stored) config dict; "" for none."""
        return ""

    @classmethod
    def arm_label(cls, config: Mapping[str, Any]) -> str:
        """Legend label of a run, e.g. ``SPF (conflict, k=8, R=10)``."""
        text = cls.settings_text(config)
        return f"{cls.label} ({text})" if text else cls.label

    # -- training-time hooks (module docstring) ------------------------------------------------------
    def refresh(self, step: int, safety: Mapping[str, torch.Tensor], *, zero: bool,
                generator: torch.Generator) -> dict[str, float]:
        """A fresh safety gradient {module: (d_out, d_in)} at ``step`` (``zero``: ~0, no direction);
        ``generator``: the step's seeded generator. Returns metrics."""
        return {}

    def before_step(self, step: int, grads: dict[str, torch.Tensor]) -> dict[str, float]:
        """Change the fine-tuning gradients {module: (d_out, d_in)} in place before the optimizer step."""
        return {}

    def wrap_step(self, step: int) -> Callable[[Callable[[], None]], dict[str, float]] | None:
        """None, or a function that takes the optimizer step (a callable), runs it and returns metrics."""
        return None

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must keep (keys unique to this defence, e.g. ``pcgrad/<module>``)."""
        return {}

    def load_state(self, arrays: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state` from a checkpoint's arrays (which hold other keys too)."""

    # -- post hoc ------------------------------------------------------------------------------------
    @classmethod
    def project(cls, grads: Mapping[str, torch.Tensor], safety: Mapping[str, torch.Tensor],
                bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]], mode: str | None = None) -> dict[str, float]:
        """One projection outside a run of the trainer (e.g. a training-loop callback that measured its own
        safety gradients): change ``grads`` {module: (d_out, d_in)} in place against ``safety`` {module: G_safety}
        or ``bases`` {module: (U_k, V_k)} with the same code the trainer's hooks use; ``mode``: one of
        ``modes``. Returns {"removed": ||G - G'|| / ||G|| over all modules, ...the defence's own metrics}. A
        defence that does not project gradients raises ConfigError."""
        raise ConfigError(f"defence {cls.name!r} does not project gradients")

    @classmethod
    def post_hoc(cls, finetuned: ModelConfig, aligned: ModelConfig, base: ModelConfig, options: Mapping[str, Any],
                 ctx: TaskContext, compute: bool = True) -> PostHoc | None:
        """The defended model of a finished run's model ``finetuned`` (``aligned``: where the run started,
        ``base``: before alignment; ``options``: the grid's settings). ``compute`` False: only a stored result,
        None when there is none."""
        raise ConfigError(f"{cls.name} is not a post-hoc defence")


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------

_DEFENCES: dict[str, type[Defence]] = {}
_VARIANTS: dict[str, tuple[Variant, str]] = {}  # variant name -> (variant, its defence)
_discovered = False
_discovering = threading.RLock()  # re-entrant: a defence module may look another one up while it is imported


def register(cls: type[Defence]) -> type[Defence]:
    """Register a defence class (a decorator); its variants join the grid. Raises ``ValueError`` when its
    name or a variant's name is taken by another defence, or a variant's role is unknown."""
    for attribute in ("name", "label", "description"):
        if not isinstance(getattr(cls, attribute, None), str) or not getattr(cls, attribute):
            raise ValueError(f"defence {cls.__name__} needs a non-empty {attribute}")
    owner = _DEFENCES.get(cls.name)
    if owner is not None and owner.__qualname__ != cls.__qualname__:
        raise ValueError(f"defence name {cls.name!r} is taken by {owner.__module__}.{owner.__qualname__}")
    for item in cls.variants:
        if item.role not in ROLES:
            raise ValueError(f"variant {item.name!r}: role {item.role!r} is not one of {', '.join(ROLES)}")
        taken = _VARIANTS.get(item.name)
        if taken is not None and taken[1] != cls.name:
            raise ValueError(f"grid variant {item.name!r} is taken by defence {taken[1]!r}")
    unregister(cls.name)  # a re-registration (module reloaded) replaces the old class and its variants
    _DEFENCES[cls.name] = cls
    for item in cls.variants:
        _VARIANTS[item.name] = (item, cls.name)
    return cls


def unregister(name: str) -> None:
    """Remove a defence and its variants (tests); no error when it is not registered."""
    _DEFENCES.pop(name, None)
    for key in [key for key, (_, owner) in _VARIANTS.items() if owner == name]:
        del _VARIANTS[key]


def _discover() -> None:
    """Import every module of this package once (each registers its defences). Thread-safe: the pages run in
    threads, and a lookup must not see a half-filled registry."""
    global _discovered
    if _discovered:
        return
    with _discovering:
        if _discovered:
            return
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_") and module.name != "base":
                importlib.import_module(f"{__package__}.{module.name}")
        _discovered = True


def available() -> dict[str, type[Defence]]:
    """{name: defence class} of every registered defence, by ``order`` (then name)."""
    _discover()
    return dict(sorted(_DEFENCES.items(), key=lambda item: (item[1].order, item[0])))


def get(name: str) -> type[Defence]:
    """The defence registered as ``name``; :class:`UnknownDefence` lists the available ones."""
    _discover()
    if name not in _DEFENCES:
        raise UnknownDefence(f"unknown defence {name!r}, available: {', '.join(available())}")
    return _DEFENCES[name]


def training_names() -> tuple[str, ...]:
    """Names of the defences a fine-tuning run can use (``FinetuneConfig.method``): all but post-hoc ones."""
    return tuple(name for name, cls in available().items() if not cls.needs.post_hoc)


def training_defence(method: str) -> type[Defence]:
    """The defence of ``FinetuneConfig.method``; ``ConfigError`` naming the allowed values otherwise."""
    names = training_names()
    if method not in names:
        raise UnknownDefence(f"method {method!r} is not one of {', '.join(names)}"
                             + (" (it is a post-hoc defence: apply it to a finished run)" if method in _DEFENCES else ""))
    return _DEFENCES[method]


def variants() -> dict[str, Variant]:
    """{name: variant} of the defence grid, in grid order."""
    _discover()
    items = sorted(enumerate(_VARIANTS.values()), key=lambda item: (item[1][0].order, item[0]))
    return {variant.name: variant for _, (variant, _) in items}


def variant(name: str) -> Variant:
    """The grid variant ``name``; :class:`UnknownDefence` lists the available ones."""
    known = variants()
    if name not in known:
        raise UnknownDefence(f"unknown defence {name!r}, available: {', '.join(known)}")
    return known[name]


def role_of(name: str) -> str:
    """The role (:data:`ROLES`) of grid variant ``name``; "defence" for a name no longer registered (a
    stored row)."""
    return variants().get(name, Variant(name, "")).role
