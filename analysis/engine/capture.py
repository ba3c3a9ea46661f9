"""Per-sample gradient factors of the selected linear modules (which modules exist and how they are selected:
:mod:`analysis.llm.anatomy`).

Per-sample gradient factors (DESIGN.md notation): for a selected module and sample i with kept token
positions t = 1..T_i, A_i (T_i, d_in) holds the module inputs a_it and D_i (T_i, d_out) the output gradients
d_it = dL_i/dy_it, so that G_i = D_i^T A_i is the sample's weight gradient in (d_out, d_in) orientation.

* :class:`FactorCapture` - context manager: a forward hook on each selected module keeps its input, a
  tensor hook on its output (``output.register_hook``) keeps the output gradient; every hook is removed on
  exit, also after an exception. Works on frozen models: a forward hook on the input embeddings makes
  their output require grad, so the graph exists without touching any parameter's ``requires_grad``;
  the backward is ``torch.autograd.grad`` w.r.t. that tensor, so no parameter ``.grad`` is written.
* :func:`capture_batch` - one batched forward + one backward of sum_i L_i (L_i = response-token mean loss
  of sample i, :func:`analysis.llm.formatting.per_sample_loss`). Because the samples do not interact, the
  output-gradient rows of sample i are exactly dL_i/dy_it. Returns :class:`BatchFactors`.

Kept rows (the same for every module): real tokens (attention mask 1) up to and including the last
position whose logit carries loss. Padding rows are dropped, and so are the positions after the last
loss-carrying logit (normally just the final token): nothing downstream of them carries loss in a causal
model, so their D rows are exactly zero and they add nothing to G_i.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from analysis.llm.anatomy import LAYER_TYPES, ModuleInfo
from analysis.llm.formatting import IGNORE_INDEX, TokenizedBatch, per_sample_loss

if TYPE_CHECKING:
    from analysis.engine.sketch import Sketch


# --------------------------------------------------------------------------------------------------
# per-sample gradient factors
# --------------------------------------------------------------------------------------------------


class CaptureError(RuntimeError):
    """Per-sample capture is impossible as asked (no grad mode, a module called twice, ...)."""


def kept_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Token positions whose factor rows are kept, one LongTensor per sample (see the module docstring).

    attention_mask, labels: (n, T). Position p is kept if it is a real token and p <= the last position
    whose logit is scored (labels[p + 1] != -100). A sample without any scored token keeps no row.
    """
    scored = torch.zeros_like(attention_mask, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    kept = []
    for i in range(attention_mask.shape[0]):
        scored_at = positions[scored[i]]
        last = int(scored_at.max()) if scored_at.numel() else -1
        kept.append(positions[(attention_mask[i] != 0) & (positions <= last)])
    return kept


@dataclasses.dataclass
class BatchFactors:
    """Per-sample gradient factors of one batch for several modules.

    ``losses`` (n,) per-sample losses L_i (response-token mean CE, nats). ``row_offsets`` (n + 1,): sample i
    owns rows ``row_offsets[i]:row_offsets[i + 1]`` of every factor matrix (T_i = its kept positions).
    ``inputs[name]`` (sum T_i, d_in) stacks the A_i, ``output_grads[name]`` (sum T_i, d_out) the D_i.
    """

    losses: torch.Tensor
    row_offsets: torch.Tensor
    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]

    @property
    def n_samples(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def tokens(self) -> torch.Tensor:
        """(n,) kept rows T_i per sample."""
        return self.row_offsets[1:] - self.row_offsets[:-1]

    def sample_factors(self, name: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(D_i (T_i, d_out), A_i (T_i, d_in)) of sample i for module ``name``."""
        rows = slice(int(self.row_offsets[i]), int(self.row_offsets[i + 1]))
        return self.output_grads[name][rows], self.inputs[name][rows]

    def sample_gradient(self, name: str, i: int) -> torch.Tensor:
        """Dense G_i = D_i^T A_i (d_out, d_in). For tests and small modules: never build all of them."""
        D, A = self.sample_factors(name, i)
        return D.T @ A


class FactorCapture:
    """Context manager that records module inputs and output gradients of the selected modules.

    ``set_rows(flat_rows)`` (before the backward) keeps only those rows of the flattened (n * T) token
    axis; each module's rows are copied out as soon as its output gradient arrives, so the full-size
    gradients are not all alive at once. After :meth:`backward`, ``inputs`` / ``output_grads`` map module
    names to detached (rows, d_in) / (rows, d_out) tensors. A module whose output does not reach the loss
    gets zero output gradients. ``graph_input`` is the embedding output the backward differentiates against.
    """

    def __init__(self, model: nn.Module, modules: Sequence[ModuleInfo | str], sketch: Sketch | None = None):
        self.model = model
        self.sketch = sketch
        names = [m.name if isinstance(m, ModuleInfo) else m for m in modules]
        lookup = dict(model.named_modules())
        missing = [n for n in names if n not in lookup]
        if missing:
            raise CaptureError(f"modules not in the model: {missing[:5]}")
        unsupported = [n for n in names if type(lookup[n]) not in LAYER_TYPES]
        if unsupported:
            raise CaptureError(f"modules of an unregistered layer type: {unsupported[:5]}")
        self.modules = {n: lookup[n] for n in names}
        self.inputs: dict[str, torch.Tensor] = {}
        self.output_grads: dict[str, torch.Tensor] = {}
        self.graph_input: torch.Tensor | None = None
        self._raw_inputs: dict[str, torch.Tensor] = {}
        self._rows: torch.Tensor | None = None
        self._handles: list = []
        self._active = False

    def set_rows(self, flat_rows: torch.Tensor | None) -> None:
        """Keep only these rows (LongTensor of indices into the flattened n * T axis); None keeps all."""
        self._rows = flat_rows

    def _select(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1, x.shape[-1])
        return flat if self._rows is None else flat.index_select(0, self._rows)

    def __enter__(self) -> FactorCapture:
        if not torch.is_grad_enabled():
            raise CaptureError("gradient capture needs grad mode: do not run it under torch.no_grad()")
        try:
            embeddings = self.model.get_input_embeddings()
            self._handles.append(embeddings.register_forward_hook(self._embedding_hook))
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._raw_inputs.clear()

    def _embedding_hook(self, module, args, output):
        if not self._active:
            return
        if not output.requires_grad:  # frozen model: start the graph here, parameters untouched
            output.requires_grad_(True)
        self.graph_input = output

    def _make_forward_hook(self, name: str):
        def forward_hook(module, args, output):
            if not self._active:
                return
            if name in self._raw_inputs or name in self.inputs:
                raise CaptureError(f"module {name} ran twice in one forward; per-sample capture of a "
                                   "reused module is not supported")
            if not output.requires_grad:
                raise CaptureError(f"the output of {name} does not require grad (is the model run under no_grad?)")
            self._raw_inputs[name] = args[0].detach()  # shares storage with what autograd saves anyway

            def tensor_hook(grad):
                if self._active and name not in self.output_grads:
                    self._store(name, self._select(grad), self._select(self._raw_inputs.pop(name)))
            output.register_hook(tensor_hook)
        return forward_hook

    def _store(self, name: str, output_grads: torch.Tensor, inputs: torch.Tensor) -> None:
        """Keep one module's selected rows (sketched first when ``sketch`` projects the module)."""
        if self.sketch is not None:
            output_grads, inputs = self.sketch.project(name, output_grads, inputs)
        self.output_grads[name], self.inputs[name] = output_grads, inputs

    def backward(self, total_loss: torch.Tensor) -> None:
        """Backpropagate ``total_loss`` to the embedding output only (no parameter ``.grad`` is written)."""
        if self.graph_input is None:
            raise CaptureError("no forward pass ran inside the capture context")
        torch.autograd.grad(total_loss, [self.graph_input])
        for name, module in self.modules.items():
            if name in self._raw_inputs:  # its output does not reach the loss: zero output gradient
                inputs = self._select(self._raw_inputs.pop(name))
                self._store(name, inputs.new_zeros(inputs.shape[0], _out_features(module)), inputs)
            elif name not in self.inputs:
                raise CaptureError(f"module {name} did not run in the forward pass")


def _out_features(module: nn.Module) -> int:
    return LAYER_TYPES[type(module)].weight_as_out_in(module).shape[0]


def capture_batch(model: nn.Module, batch: TokenizedBatch, modules: Sequence[ModuleInfo | str],
                  sketch: Sketch | None = None) -> BatchFactors:
    """Per-sample factors and losses of one tokenised batch (:class:`analysis.llm.formatting.TokenizedBatch`).

    One forward (``use_cache=False``) and one backward of sum_i L_i. Factors are in the model's dtype
    (load the model in float64 for reference-precision tests). Parameters and their ``.grad`` are left
    untouched; the model should be in eval mode (dropout off) for exact per-sample gradients.
    ``sketch`` (:class:`analysis.engine.sketch.Sketch`): project the factors of its modules as they arrive.
    """
    kept = kept_positions(batch.attention_mask, batch.labels)
    width = batch.input_ids.shape[1]
    flat_rows = torch.cat([i * width + positions for i, positions in enumerate(kept)])
    row_offsets = torch.zeros(len(kept) + 1, dtype=torch.long)
    row_offsets[1:] = torch.cumsum(torch.tensor([len(p) for p in kept]), 0)
    with FactorCapture(model, modules, sketch) as capture:
        capture.set_rows(flat_rows)
        logits = model(**batch.model_inputs(), use_cache=False).logits
        losses = per_sample_loss(logits, batch.labels)
        capture.backward(losses.sum())
        del logits
    return BatchFactors(losses.detach(), row_offsets, capture.inputs, capture.output_grads)
