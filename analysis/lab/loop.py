"""The one training loop of the lab, shared by alignment (:mod:`analysis.lab.align`) and fine-tuning
(:mod:`analysis.lab.finetune`).

:class:`TrainingLoop` owns the optimizer (AdamW or SGD), the optional warm-up / linear-decay schedule,
gradient clipping, checkpoints (one safetensors file: parameters, optimizer and schedule state, the global
torch RNG, the caller's arrays and a JSON state in the metadata, written atomically) and the step loop
itself (:meth:`TrainingLoop.run`): measure a step's metrics, emit them, save periodically, check for
cancelling, train the next step. What a step computes is the caller's ``train_step(step) -> row``; the
loop only calls :meth:`backward` / :meth:`update` order-preservingly, so a task's numerics are its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.core.store import atomic_save_arrays, json_default
from analysis.core.tasks import Cancelled
from analysis.lab.config import OPTIMIZERS

#: Parameter dtypes trained through float32 master weights.
LOW_PRECISION = (torch.bfloat16, torch.float16)
SCHEDULES = ("constant", "warmup-linear")

__all__ = ["Clock", "TrainingCancelled", "TrainingLoop", "save_model"]


class TrainingCancelled(Cancelled):
    """Cancelled between steps or inside an evaluation; ``step`` is the last finished optimizer step.

    A checkpoint was saved when the loop has somewhere to save it; running the same task again resumes."""

    def __init__(self, message: str = "cancelled", run_id: str = "", step: int | None = None):
        super().__init__(message, run_id)
        self.step = step


class Clock:
    """Wall-clock and process CPU seconds since the run started (``wall`` / ``cpu`` already spent before)."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = time.perf_counter() - wall, time.process_time() - cpu

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


class TrainingLoop:
    """Optimizer, schedule, clipping and checkpoints over ``named_params`` for ``total`` steps.

    optimizer: "adamw" | "sgd" (lr, weight_decay as torch's). grad_clip: max global L2 norm of the gradients
    (None or 0: no clipping). schedule: "constant", or "warmup-linear" (lr factor (s+1)/warmup for the first
    ``warmup_steps`` scheduler steps, then linear decay to 0 at ``total``). ``step`` is the number of
    finished optimizer steps.

    Low-precision parameters (bfloat16 / float16): the optimizer steps float32 *master* copies (``masters``;
    its state is float32 too) and each update is rounded into the model's parameters, so small updates are
    not lost to bfloat16 rounding; checkpoints hold the masters. float32 / float64 parameters are stepped
    directly (``masters`` is empty), exactly as before.
    """

    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]], total: int, *, optimizer: str = "adamw",
                 lr: float, weight_decay: float = 0.0, grad_clip: float | None = None,
                 schedule: str = "constant", warmup_steps: int = 0):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
        self.named_params = list(named_params)
        self.params = [p for _, p in self.named_params]
        self.total = total
        self.grad_clip = grad_clip
        self.warmup_steps = warmup_steps
        self.step = 0
        self.clock = Clock()
        #: {index in params: float32 master copy} of every bfloat16/float16 parameter
        self.masters = {i: p.detach().float().clone().requires_grad_(True) for i, p in enumerate(self.params)
                        if p.dtype in LOW_PRECISION}
        self.stepped = [self.masters.get(i, p) for i, p in enumerate(self.params)]  # what the optimizer updates
        optimizer_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
        self.optimizer = optimizer_class(self.stepped, lr=lr, weight_decay=weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup_linear)
                          if schedule == "warmup-linear" else None)

    def _warmup_linear(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = self.total - self.warmup_steps
        return max(0.0, 1 - (step - self.warmup_steps) / max(remaining, 1))

    # -- one step ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """Clear the gradients (set to None) and backpropagate ``loss``."""
        self.optimizer.zero_grad(set_to_none=True)
        for i in self.masters:
            self.params[i].grad = None
        loss.backward()

    def grad_norm(self) -> float:
        """Global L2 norm of the current (raw) gradients."""
        with torch.no_grad():
            return math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in self.params if p.grad is not None))

    def update(self, around_step: Callable[[Callable[[], None]], Any] | None = None) -> Any:
        """Clip, optimizer step (through ``around_step(step)`` when given: e.g. SPF's update projection,
        which sees the model's parameters before and after ``step``), schedule step. Returns what
        ``around_step`` returned (else None). With master weights the gradients are copied to the float32
        masters (clipped there) and the stepped masters rounded into the parameters; a parameter that
        ``around_step`` changed after the step is copied back into its master."""
        for i, master in self.masters.items():
            grad = self.params[i].grad
            master.grad = None if grad is None else grad.detach().float()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.stepped, self.grad_clip)
        out = None
        if around_step is not None:
            out = around_step(self.optimizer_step)
            self._resync_masters()
        else:
            self.optimizer_step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        return out

    def optimizer_step(self) -> None:
        """The optimizer's step, then the masters rounded into the model's parameters."""
        self.optimizer.step()
        with torch.no_grad():
            for i, master in self.masters.items():
                self.params[i].copy_(master)

    def _resync_masters(self) -> None:
        with torch.no_grad():
            for i, master in self.masters.items():
                if not torch.equal(self.params[i], master.to(self.params[i].dtype)):
                    master.copy_(self.params[i])

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self, path: Path, state: Mapping[str, Any], arrays: Mapping[str, torch.Tensor] | None = None) -> None:
        """One safetensors file: ``param/<name>``, ``opt/<index>/<key>``, ``rng/torch``, ``arrays`` and the
        JSON ``state`` (plus optimizer groups and schedule) in its metadata; written atomically."""
        tensors: dict[str, Any] = {f"param/{name}": p.detach() for (name, _), p in zip(self.named_params, self.stepped)}
        optimizer_state = self.optimizer.state_dict()
        scalars = []
        for index, entry in optimizer_state["state"].items():
            for key, value in entry.items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                if tensor.dim() == 0:
                    scalars.append(f"opt/{index}/{key}")
                    tensor = tensor.reshape(1)
                tensors[f"opt/{index}/{key}"] = tensor.detach()
        tensors.update(arrays or {})
        tensors["rng/torch"] = torch.get_rng_state()
        meta = dict(state, optimizer_groups=optimizer_state["param_groups"], scalars=scalars)
        if self.scheduler is not None:
            meta["scheduler"] = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        atomic_save_arrays(path, tensors, {"state": json.dumps(meta, default=json_default)})

    def load(self, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore parameters, optimizer, schedule and RNG from :meth:`save`'s file; returns (state, the
        other arrays)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        with torch.no_grad():
            for (name, parameter), stepped in zip(self.named_params, self.stepped):
                stepped.copy_(tensors[f"param/{name}"])
                if stepped is not parameter:
                    parameter.copy_(stepped)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("opt/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value.reshape(()) if key in meta["scalars"] else value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
        if self.scheduler is not None and "scheduler" in meta:
            self.scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None]))
        torch.set_rng_state(tensors["rng/torch"])
        arrays = {k: v for k, v in tensors.items() if not k.startswith(("param/", "opt/", "rng/"))}
        return meta, arrays

    # -- the loop ----------------------------------------------------------------------------------
    def run(self, train_step: Callable[[int], dict], emit: Callable[[dict], None], *,
            pending: dict | None = None, measure: Callable[[dict], dict] | None = None,
            cancelled: Callable[[], bool] = lambda: False, save: Callable[[int, dict | None], None] | None = None,
            save_every: int | None = None, what: str = "training", run_id: str = "",
            error: type[TrainingCancelled] = TrainingCancelled) -> None:
        """Train steps ``self.step + 1 .. total``.

        ``train_step(step)`` does one step (using :meth:`backward` / :meth:`update`) and returns its metrics
        row (a dict with "step"); ``measure(row) -> row`` adds the metrics measured after it (evaluations;
        ``pending`` is a row still to be measured, e.g. step 0's), ``emit(row)`` receives the finished row.
        ``save(step, pending)`` writes a checkpoint: every ``save_every`` steps (not after the last) and
        when cancelled. ``cancelled()`` is checked before every step; an evaluation cancelled from inside
        (``analysis.safety.evaluate.EvalCancelled``) saves its pending row. Both raise ``error``.
        """
        from analysis.safety.evaluate import EvalCancelled

        step = self.step
        try:
            while True:
                if pending is not None:
                    row = measure(dict(pending)) if measure is not None else dict(pending)
                    emit(row)
                    pending = None
                    done = row["step"]
                    if save is not None and save_every and 0 < done < self.total and done % save_every == 0:
                        save(step, None)
                if step >= self.total:
                    return
                if cancelled():
                    if save is not None:
                        save(step, None)
                    raise error(f"{what} cancelled after step {step}; run again to resume", run_id, step)
                step += 1
                pending = train_step(step)
        except (EvalCancelled, Cancelled) as cancel:
            if isinstance(cancel, TrainingCancelled):
                raise
            if save is not None:
                save(step, pending)
            raise error(f"{what} cancelled while evaluating step {step}; run again to resume", run_id, step) from None


def save_model(model: nn.Module, tokenizer, folder: Path, json_files: Mapping[str, Any] | None = None,
               manifest: Mapping[str, Any] | None = None) -> Path:
    """Write a loadable model folder: ``save_pretrained`` (safetensors), the tokenizer, ``json_files``
    {name: JSON-able} and ``manifest`` as manifest.json (with sha256 and size of the weight files added),
    into a temporary sibling folder that then replaces ``folder``. Returns ``folder``."""
    import os
    import shutil

    from analysis.core.store import atomic_write_json, file_sha256, finite_or_none

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    for name, value in (json_files or {}).items():
        atomic_write_json(temporary / name, finite_or_none(value))
    if manifest is not None:
        weights = sorted(temporary.glob("*.safetensors"))
        files = {p.name: {"sha256": file_sha256(p), "size": p.stat().st_size} for p in weights}
        atomic_write_json(temporary / "manifest.json", finite_or_none(dict(manifest, files=files)))
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    temporary.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder
