"""Model anatomy: which modules of a model carry a weight matrix we analyse, their kinds and layers, how to
select them, and how to read a weight (or its gradient) as W (d_out, d_in).

A registry keyed by module type says how to read each layer type's weight as W (d_out x d_in):
``nn.Linear`` stores (d_out, d_in); HF ``Conv1D`` (GPT-2) stores (d_in, d_out). Supporting a new layer
type is one entry in ``LAYER_TYPES`` (both types compute y = W a + b on the last axis, so their inputs
and output gradients need no special handling). Used by the engine (capture, planner) and the lab
(fine-tuning, defences) alike; knows nothing of gradients' geometry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from analysis.core.config import InputError

__all__ = ["ALL_KINDS", "KIND_NAMES", "LAYER_TYPES", "LayerType", "ModuleInfo", "SelectionError", "as_out_in",
           "find_linear_modules", "layer_index", "module_kind", "parse_layers", "select_modules", "weight_grad_as_out_in"]


@dataclasses.dataclass(frozen=True)
class LayerType:
    """How a layer type stores its weight.

    ``weight_as_out_in(module)`` is W with shape (d_out, d_in); ``as_out_in(tensor)`` turns any tensor
    shaped like the stored weight (e.g. its ``.grad``) into (d_out, d_in) orientation.
    """

    as_out_in: Callable[[torch.Tensor], torch.Tensor]

    def weight_as_out_in(self, module: nn.Module) -> torch.Tensor:
        return self.as_out_in(module.weight)


LAYER_TYPES: dict[type, LayerType] = {
    nn.Linear: LayerType(as_out_in=lambda w: w),
    Conv1D: LayerType(as_out_in=lambda w: w.T),
}

# Last path component -> short kind name used in selections and labels.
KIND_NAMES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "c_attn": "qkv", "c_fc": "up", "out_proj": "o", "fc1": "up", "fc2": "down",
    "query": "q", "key": "k", "value": "v", "dense": "o",
}
ALL_KINDS = ("q", "k", "v", "o", "qkv", "gate", "up", "down")
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """One analysable weight matrix: HF path, short kind, transformer layer index, W shape (d_out, d_in)."""

    name: str
    kind: str
    layer: int | None
    d_out: int
    d_in: int

    @property
    def label(self) -> str:
        """Short display label, e.g. ``L3.mlp.down``."""
        if self.layer is None:
            return self.name
        block = "attn" if self.kind in ("q", "k", "v", "o", "qkv") else "mlp"
        return f"L{self.layer}.{block}.{self.kind}"


def module_kind(name: str) -> str:
    """Short kind of a module's HF path (``q``, ``down``, ...; :data:`KIND_NAMES`, GPT-2's ``c_proj`` by its block)."""
    parts = name.split(".")
    last = parts[-1]
    if last == "c_proj":  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "o" if "attn" in parts[-2] else "down"
    return KIND_NAMES.get(last, last)


def layer_index(name: str) -> int | None:
    """Transformer layer of a module or parameter HF path (the first ``.<int>.`` in it), None outside blocks."""
    match = _LAYER_INDEX.search(f".{name}.")
    return int(match.group(1)) if match else None


def find_linear_modules(model: nn.Module, include_output_head: bool = False) -> list[ModuleInfo]:
    """All modules of a registered layer type, in model order.

    The output head (``lm_head``, often tied to the embeddings) is excluded unless asked for.
    """
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    infos = []
    for name, module in model.named_modules():
        layer_type = LAYER_TYPES.get(type(module))
        if layer_type is None:
            continue
        if module is output_head and not include_output_head:
            continue
        d_out, d_in = layer_type.weight_as_out_in(module).shape
        infos.append(ModuleInfo(name, module_kind(name), layer_index(name), d_out, d_in))
    return infos


class SelectionError(InputError, ValueError):
    """A module selection matches nothing or is malformed; the message lists what exists."""


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"0-3,7"`` -> [0, 1, 2, 3, 7]; ``"all"`` or ``""`` -> every layer; negatives count from the end."""
    text = text.strip().lower()
    if text in ("", "all", "*"):
        return list(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1:])
                lo, hi = lo % n_layers if lo < 0 else lo, hi % n_layers if hi < 0 else hi
                layers.update(range(lo, hi + 1))
            else:
                index = int(part)
                layers.add(index % n_layers if index < 0 else index)
        except ValueError:
            raise SelectionError(f"layer range {part!r} is not understood: use e.g. '0-3,7' or 'all'") from None
    outside = sorted(i for i in layers if not 0 <= i < n_layers)
    if outside:
        raise SelectionError(f"layers {outside} do not exist: the model has layers 0-{n_layers - 1}")
    return sorted(layers)


def select_modules(
    modules: Iterable[ModuleInfo],
    layers: str = "all",
    kinds: Iterable[str] | str = "all",
    regex: str | None = None,
) -> list[ModuleInfo]:
    """Modules whose layer is in ``layers`` and kind in ``kinds`` (``"q,k,v"`` or a list), or whose HF path
    matches ``regex`` (which then replaces the layer/kind filter). Raises SelectionError if none match."""
    modules = list(modules)
    if regex:
        try:
            pattern = re.compile(regex)
        except re.error as error:
            raise SelectionError(f"module regex {regex!r} is invalid: {error}") from None
        chosen = [m for m in modules if pattern.search(m.name)]
        if not chosen:
            raise SelectionError(f"module regex {regex!r} matches none of {len(modules)} modules, "
                                 f"e.g. {modules[0].name if modules else '(none)'}")
        return chosen
    layer_ids = [m.layer for m in modules if m.layer is not None]
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    wanted_layers = set(parse_layers(layers, n_layers)) if n_layers else set()
    if isinstance(kinds, str):
        kinds = ALL_KINDS if kinds.strip().lower() in ("", "all", "*") else [k.strip() for k in kinds.split(",")]
    kinds = [k for k in kinds if k]
    present = sorted({m.kind for m in modules})
    unknown = [k for k in kinds if k not in present and k not in ALL_KINDS]
    if unknown:
        raise SelectionError(f"module kinds {unknown} are unknown: this model has {', '.join(present)}")
    chosen = [m for m in modules if m.kind in kinds and (m.layer is None or m.layer in wanted_layers)]
    if not chosen:
        raise SelectionError(f"no module matches layers={layers!r}, kinds={','.join(kinds)}: "
                             f"this model has kinds {', '.join(present)} in layers 0-{n_layers - 1}")
    return chosen


def as_out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` shaped like ``module.weight`` (the weight, its grad, a delta) in (d_out, d_in) orientation: a
    view through the module's :data:`LAYER_TYPES` entry (a module of another type is taken as (d_out, d_in))."""
    layer_type = LAYER_TYPES.get(type(module))
    return layer_type.as_out_in(tensor) if layer_type is not None else tensor


def weight_grad_as_out_in(module: nn.Module) -> torch.Tensor | None:
    """The module's ``weight.grad`` in (d_out, d_in) orientation (None if it has none)."""
    grad = module.weight.grad
    return None if grad is None else as_out_in(module, grad)
