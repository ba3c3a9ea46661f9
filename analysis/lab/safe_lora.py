"""Safe LoRA-style post-hoc defence as a task: project a fine-tuned model's delta on the alignment subspace.

:class:`SafeLoraTask` (``kind = "safe-lora"``) takes a fine-tuned model (a folder, e.g. a fine-tuning run's
``model/``), the aligned model it started from and the base model before alignment; for every selected linear
module it applies :func:`analysis.lab.defences.safe_lora_project` (V = W_aligned - W_base, dW = W_finetuned -
W_aligned, projected where cos(dW, P dW) < ``threshold``) and writes the defended model to
``cache_dir()/"safe_lora"/<run_id>/model`` (a loadable folder: evaluate it with ``python -m analysis evaluate
--model <folder>``). Only the linear weights of the transformer blocks change; everything else is the
fine-tuned model's. ``run_id()`` hashes the three models' identities (weights not loaded) and the settings.
Command line: ``python -m analysis safe-lora --finetuned FOLDER [--threshold 0.5 --rank 8]``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from analysis.core.config import ConfigError, ModelConfig, cache_dir, config_hash
from analysis.core.options import option
from analysis.core.tasks import TaskContext, register_task
from analysis.lab.defences import SAFE_LORA_MODES, safe_lora_project

__all__ = ["SafeLoraTask", "load_outcome", "safe_lora_root"]

FORMAT_VERSION = 1


def safe_lora_root() -> Path:
    return cache_dir() / "safe_lora"


@register_task
@dataclasses.dataclass(frozen=True)
class SafeLoraTask:
    """Post-hoc Safe LoRA-style projection (module docstring). ``layers`` / ``kinds``: which linear modules
    (``capture.select_modules`` syntax); ``rank``: size of each module's alignment subspace (None: all of V)."""

    kind: ClassVar[str] = "safe-lora"

    finetuned: ModelConfig = option(ModelConfig(), flag="--finetuned", required=True,
                                    help="the fine-tuned model (a folder, e.g. a fine-tuning run's model/)")
    aligned: ModelConfig = option(ModelConfig(source="default-aligned"), flag="--aligned",
                                  help="the model the fine-tune started from")
    base: ModelConfig = option(ModelConfig(source="default"), flag="--base", help="the model before alignment")
    threshold: float = option(0.5, help="project a module when cos(dW, P dW) is below this")
    rank: int | None = option(8, help="alignment subspace size per module (off: all of V)", minimum=1)
    mode: str = option("subspace", flag="--projection", choices=SAFE_LORA_MODES,
                       help="subspace: exact projector onto V's top-rank left singular vectors; paper: V V^T / ||V||")
    layers: str = option("all", help="layers, e.g. 0-29, 0-3,7 or all")
    kinds: str = option("all", help="module kinds, e.g. q,k,v,o,gate,up,down or all")

    def __post_init__(self) -> None:
        for name in ("finetuned", "aligned", "base"):
            object.__setattr__(self, name, ModelConfig.coerce(getattr(self, name), name))
        if self.mode not in SAFE_LORA_MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(SAFE_LORA_MODES)}")
        if not -1.0 <= self.threshold <= 1.01:
            raise ConfigError(f"threshold {self.threshold} must be a cosine between -1 and 1 (1.01: project all)")
        if self.rank is not None and self.rank < 1:
            raise ConfigError("rank must be at least 1 (or None for the whole alignment delta)")

    def key(self) -> dict:
        from analysis.llm.models import model_identity

        values = dataclasses.asdict(self)
        for name in ("finetuned", "aligned", "base"):
            values[name] = model_identity(getattr(self, name))
        return {"format": FORMAT_VERSION, **values}

    def run_id(self) -> str:
        return config_hash(self.key())

    def execute(self, ctx: TaskContext) -> dict:
        return defend(self, ctx)

    @staticmethod
    def print_result(summary: Mapping[str, Any]) -> None:
        print(f"{'reused' if summary['cached'] else 'projected'} {summary['n_projected']}/{summary['n_modules']} "
              f"modules -> {summary['folder']}")


def _linear_weights(model, layers: str, kinds: str) -> dict[str, torch.nn.Parameter]:
    from analysis.llm.anatomy import find_linear_modules, select_modules

    chosen = select_modules(find_linear_modules(model), layers, kinds, None)
    named = dict(model.named_modules())
    return {m.name: named[m.name] for m in chosen}


def defend(task: SafeLoraTask, ctx: TaskContext | None = None) -> dict:
    """Project, save the defended model (reused when stored) and return a JSON-able summary."""
    from analysis.lab.loop import save_model
    from analysis.llm.anatomy import as_out_in
    from analysis.llm.models import load_model

    ctx = ctx if ctx is not None else TaskContext()
    run_id = task.run_id()
    folder = safe_lora_root() / run_id / "model"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        ctx.report(1.0, "reused a stored Safe LoRA projection")
        return dict(json.loads(manifest_path.read_text())["summary"], cached=True)
    loaded = {}
    for i, name in enumerate(("finetuned", "aligned", "base")):
        ctx.report(i / 4, f"loading the {name} model {getattr(task, name).source}")
        loaded[name] = load_model(getattr(task, name))
    modules = {name: _linear_weights(loaded[name].model, task.layers, task.kinds) for name in loaded}
    if not (set(modules["finetuned"]) == set(modules["aligned"]) == set(modules["base"])):
        raise ConfigError("the fine-tuned, aligned and base models do not have the same linear modules")
    views = {name: {m: as_out_in(module, module.weight.detach()) for m, module in modules[name].items()}
             for name in modules}
    ctx.report(0.75, "projecting")
    new, report = safe_lora_project(views["finetuned"], views["aligned"], views["base"], task.threshold, task.rank,
                                    task.mode)
    with torch.no_grad():
        for name, module in modules["finetuned"].items():
            as_out_in(module, module.weight).copy_(new[name])
    rows = [dataclasses.asdict(r) for r in report]
    summary = {"run_id": run_id, "folder": str(folder), "n_modules": len(rows),
               "n_projected": sum(r["projected"] for r in rows), "threshold": task.threshold, "rank": task.rank,
               "mode": task.mode, "cached": False}
    save_model(loaded["finetuned"].model, loaded["finetuned"].tokenizer, folder, {"safe_lora.json": rows},
               manifest={"kind": task.kind, "key": task.key(), "summary": summary})
    ctx.report(1.0, f"projected {summary['n_projected']} of {summary['n_modules']} modules")
    return summary


def load_outcome(run_id: str):
    """A stored projection: (summary dict as :func:`defend` returned it, per-module frame with columns module,
    cosine (cos(dW, P dW)), projected (bool), delta_norm (||dW||_F)), or None when ``run_id`` is not stored."""
    import pandas as pd

    folder = safe_lora_root() / run_id / "model"
    try:
        summary = json.loads((folder / "manifest.json").read_text())["summary"]
        rows = json.loads((folder / "safe_lora.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    frame = pd.DataFrame(rows, columns=["name", "cosine", "projected", "delta_norm"]).rename(columns={"name": "module"})
    return dict(summary, cached=True), frame
