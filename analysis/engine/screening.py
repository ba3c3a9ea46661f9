"""Per-example screening scores from per-sample gradient factors, streamed: no G_i, no batch of factors kept.

For a selected linear module m and example i (DESIGN.md notation) G_i^m = D_i^T A_i (d_out x d_in). Against
dense reference gradients R^m (d_out x d_in) and an orthonormal safety basis U^m (d_out x k), V^m (d_in x k)
each example gets, per module (all exact, from the factors, accumulated in float64):

* ``dot/<ref>``  <G_i, R>_F = sum_t d_t^T R a_t = sum of the rows of D_i * (A_i R^T)   (T d_in d_out)
* ``norm2``      ||G_i||_F^2, by the cheaper exact route: ghost sum_ts (D D^T)_ts (A A^T)_ts (T^2 (d_in + d_out))
                 or dense ||D_i^T A_i||^2 (T d_in d_out)
* ``energy``     ||U^T G_i V||_F^2 = ||(D_i U)^T (A_i V)||_F^2: G_i's energy inside the two-sided top-k safety
                 subspace span{u_j v_l^T} (T k (d_in + d_out))

Summed over modules these are the inner products / squared norms of the full selected parameter vector, so
cos(g_i, R) = sum_m dot / sqrt(sum_m norm2 * sum_m ||R^m||^2) (:func:`combine`).

:func:`stream_batch` runs one batched forward + backward (the same as ``capture.capture_batch``) and hands
each module's factors to a callback while the backward reaches it, then drops them: memory is the model,
one batch's autograd graph, the references and the scores. :class:`ReferenceSums` accumulates batch-mean
gradients of anchor sets through the same callback; :class:`Scorer` computes the scores above.
The mean final hidden state of each example (real tokens) comes from the same forward (the
representation-matching baseline). Everything runs on the factors' device; results come back as CPU float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from analysis.engine.capture import FactorCapture, kept_positions
from analysis.llm.anatomy import ModuleInfo
from analysis.llm.formatting import TokenizedBatch, per_sample_loss

__all__ = ["MODULE_SCORES", "BatchScores", "ReferenceSums", "Scorer", "StreamedBatch", "combine", "representation_cosine",
           "safety_basis", "stream_batch"]

#: per-module, per-example quantities a :class:`Scorer` keeps (``dot/<reference>`` for each reference)
MODULE_SCORES = ("norm2", "energy")

Consume = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


class _StreamingCapture(FactorCapture):
    """FactorCapture that hands each module's rows to ``consume(name, D, A)`` as they arrive, keeping none."""

    def __init__(self, model, modules, consume: Callable[[str, torch.Tensor, torch.Tensor], None]):
        super().__init__(model, modules)
        self.consume = consume

    def _store(self, name: str, output_grads: torch.Tensor, inputs: torch.Tensor) -> None:
        self.consume(name, output_grads, inputs)
        self.output_grads[name] = self.inputs[name] = None  # marks the module done (FactorCapture's checks)


@dataclasses.dataclass
class StreamedBatch:
    """``losses`` (n,) nats, ``hidden`` (n, d_model) mean final hidden state over real tokens (float64),
    ``row_offsets`` (n + 1,) of the kept factor rows, ``tokens`` (n,) kept rows T_i."""

    losses: np.ndarray
    hidden: np.ndarray
    row_offsets: torch.Tensor

    @property
    def tokens(self) -> np.ndarray:
        return (self.row_offsets[1:] - self.row_offsets[:-1]).numpy()


def stream_batch(model, batch: TokenizedBatch, modules: Sequence[ModuleInfo | str], consume: Consume) -> StreamedBatch:
    """One forward (``use_cache=False``, hidden states on) and one backward of sum_i L_i; for every module
    ``consume(name, D (R, d_out), A (R, d_in), row_offsets (n + 1,))`` with the kept rows of all samples
    (sample i owns rows ``row_offsets[i]:row_offsets[i+1]``). Parameters and ``.grad`` are untouched."""
    kept = kept_positions(batch.attention_mask, batch.labels)
    width = batch.input_ids.shape[1]
    device = batch.input_ids.device
    flat_rows = torch.cat([i * width + positions for i, positions in enumerate(kept)]).to(device)
    row_offsets = torch.zeros(len(kept) + 1, dtype=torch.long)
    row_offsets[1:] = torch.cumsum(torch.tensor([len(p) for p in kept]), 0)
    with _StreamingCapture(model, modules, lambda name, D, A: consume(name, D, A, row_offsets)) as capture:
        capture.set_rows(flat_rows)
        output = model(**batch.model_inputs(), use_cache=False, output_hidden_states=True)
        losses = per_sample_loss(output.logits, batch.labels)
        last = output.hidden_states[-1].detach().double()
        mask = batch.attention_mask.to(last.dtype).unsqueeze(-1)
        hidden = (last * mask).sum(1) / mask.sum(1).clamp(min=1)
        del output
        capture.backward(losses.sum())
    return StreamedBatch(losses.detach().double().cpu().numpy(), hidden.cpu().numpy(), row_offsets)


def _widened(X: torch.Tensor) -> torch.Tensor:
    """float32 for a half-precision model's factors (every product after the capture accumulates in float32
    or float64, as in the collection)."""
    return X if X.dtype in (torch.float32, torch.float64) else X.float()


def _padded(X: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """(n, T_max, d) zero-padded per-sample blocks of the rows X (R, d)."""
    return torch.nn.utils.rnn.pad_sequence([X[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)],
                                           batch_first=True)


def _segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(n,) sums of consecutive row segments of ``values`` (R,) (float64)."""
    owner = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=values.device),
                                    (offsets[1:] - offsets[:-1]).to(values.device))
    out = torch.zeros(len(offsets) - 1, dtype=torch.float64, device=values.device)
    return out.index_add_(0, owner, values.double())


class ReferenceSums:
    """Batch-mean gradients G = (1/n) sum_i G_i of one anchor set, per module, accumulated from streamed
    factors (``consume`` is a :data:`Consume`); ``gradients`` {module: (d_out, d_in)} in the factors' dtype."""

    def __init__(self, n_total: int):
        self.n_total = n_total
        self.gradients: dict[str, torch.Tensor] = {}

    def consume(self, name: str, D: torch.Tensor, A: torch.Tensor, offsets: torch.Tensor) -> None:
        D, A = _widened(D), _widened(A)
        part = (D.T @ A) / self.n_total
        self.gradients[name] = self.gradients[name] + part if name in self.gradients else part


def safety_basis(gradient: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_k (d_out, k'), V_k (d_in, k')) top-k singular vectors of a reference gradient (exact, float64,
    ``geometry.top_singular_eig``), in the gradient's dtype and device; k' = min(k, rank), 0 for a zero matrix."""
    from analysis.engine.geometry import top_singular_eig

    matrix = gradient.detach().to("cpu", torch.float64).numpy()
    if not np.any(matrix):
        U, V = np.zeros((matrix.shape[0], 0)), np.zeros((matrix.shape[1], 0))
    else:
        U, s, V = top_singular_eig(matrix, min(k, *matrix.shape))
        keep = s > s[0] * 1e-12
        U, V = U[:, keep], V[:, keep]
    return (torch.as_tensor(U, dtype=gradient.dtype, device=gradient.device),
            torch.as_tensor(V, dtype=gradient.dtype, device=gradient.device))


@dataclasses.dataclass
class BatchScores:
    """Per-module scores of one batch: ``values[key]`` (n, n_modules) float64 for key in ``dot/<ref>``,
    ``norm2``, ``energy``; module order = the Scorer's ``modules``."""

    values: dict[str, np.ndarray]


class Scorer:
    """Scores streamed factors against ``references`` {name: {module: R (d_out, d_in)}} and the safety basis
    ``basis`` {module: (U, V)}. Call :meth:`start` (n samples) before a batch, pass :meth:`consume` to
    :func:`stream_batch`, then :meth:`finish` -> :class:`BatchScores`."""

    def __init__(self, modules: Sequence[ModuleInfo], references: Mapping[str, Mapping[str, torch.Tensor]],
                 basis: Mapping[str, tuple[torch.Tensor, torch.Tensor]]):
        self.modules = list(modules)
        self.index = {m.name: j for j, m in enumerate(self.modules)}
        self.reference_names = list(references)
        # one stacked (n_refs * d_out, d_in) matrix per module: a single product per batch and module
        self.stacked = {m.name: torch.cat([references[r][m.name] for r in self.reference_names]) for m in self.modules}
        self.basis = dict(basis)
        self.keys = [f"dot/{r}" for r in self.reference_names] + list(MODULE_SCORES)
        self._values: dict[str, torch.Tensor] = {}

    def start(self, n: int) -> None:
        self._values = {key: torch.zeros(n, len(self.modules), dtype=torch.float64) for key in self.keys}

    def consume(self, name: str, D: torch.Tensor, A: torch.Tensor, offsets: torch.Tensor) -> None:
        D, A = _widened(D), _widened(A)
        j = self.index[name]
        d_out, d_in = D.shape[1], A.shape[1]
        offsets_device = offsets.to(D.device)
        projected = A @ self.stacked[name].T  # (R, n_refs * d_out): a_t^T R^T per row, every reference
        for r, ref in enumerate(self.reference_names):
            rows = (D * projected[:, r * d_out:(r + 1) * d_out]).sum(1)
            self._values[f"dot/{ref}"][:, j] = _segment_sum(rows, offsets_device).cpu()
        bounds = offsets.tolist()
        Dp, Ap = _padded(D, bounds), _padded(A, bounds)
        if Dp.shape[1] * (d_in + d_out) <= d_in * d_out:  # ghost: (D D^T) * (A A^T), never G_i
            norm2 = (torch.bmm(Dp, Dp.transpose(1, 2)).double() * torch.bmm(Ap, Ap.transpose(1, 2)).double()).sum((1, 2))
        else:
            norm2 = torch.bmm(Dp.transpose(1, 2), Ap).double().pow(2).sum((1, 2))
        self._values["norm2"][:, j] = norm2.cpu()
        U, V = self.basis[name]
        if U.shape[1]:
            inner = torch.bmm(_padded(D @ U, bounds).transpose(1, 2), _padded(A @ V, bounds))  # (n, k, k)
            self._values["energy"][:, j] = inner.double().pow(2).sum((1, 2)).cpu()

    def finish(self) -> BatchScores:
        values, self._values = self._values, {}
        return BatchScores({key: value.numpy() for key, value in values.items()})


def combine(module_values: Mapping[str, np.ndarray], reference_norm2: Mapping[str, float],
            modules: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Whole-vector scores from per-module values (n, n_modules), summed over ``modules`` (a boolean mask or
    index array; None: all). ``reference_norm2`` {ref: ||R||^2 summed over the same modules}. Returns (n,)
    arrays: ``dot/<ref>``, ``cos/<ref>`` (NaN where a norm is 0), ``norm`` (||g_i||) and ``safety_share``
    (energy / norm2 in [0, 1], NaN for a zero gradient)."""
    pick = slice(None) if modules is None else modules
    norm2 = np.asarray(module_values["norm2"])[:, pick].sum(1)
    out: dict[str, np.ndarray] = {"norm": np.sqrt(norm2)}
    with np.errstate(invalid="ignore", divide="ignore"):
        for key in module_values:
            if key.startswith("dot/"):
                ref = key[4:]
                dot = np.asarray(module_values[key])[:, pick].sum(1)
                out[key] = dot
                out[f"cos/{ref}"] = np.where((norm2 > 0) & (reference_norm2[ref] > 0),
                                             dot / np.sqrt(norm2 * reference_norm2[ref]), np.nan)
        energy = np.asarray(module_values["energy"])[:, pick].sum(1)
        out["safety_share"] = np.where(norm2 > 0, energy / norm2, np.nan)
    return out


def representation_cosine(hidden: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """(n,) cos(h_i, h_anchor) of mean final hidden states (n, d) against one anchor vector (d,)."""
    norms = np.linalg.norm(hidden, axis=1) * np.linalg.norm(anchor)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, hidden @ anchor / norms, np.nan)

