"""The fine-tuning trainer: which parameters train, the run id, and :class:`FinetuneTrainer` (one
optimizer step with the run's defence hooks, and the measurements between steps).
:mod:`analysis.lab.finetune` adds the run store, the task and the CLI."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.core.config import ConfigError, config_hash, to_jsonable
from analysis.core.options import identity_values
from analysis.core.store import atomic_write_json, finite_or_none
from analysis.core.tasks import resolve_device
from analysis.lab.config import FinetuneConfig, SPFConfig
from analysis.lab.defences import Defence, training_defence
from analysis.lab.finetune_data import (
    FORMAT_VERSION,
    FinetuneData,
    batch_indices,
    eval_key,
    generation_eval,
    load_data,
    nll_arrays,
    nll_metrics,
    safety_indices,
    seeded,
    total_steps,
)
from analysis.lab.loop import TrainingLoop
from analysis.lab.spf import ZERO_SAFETY_RTOL, SPFProjector, spf_modules
from analysis.llm.anatomy import as_out_in, layer_index
from analysis.llm.models import input_device, place

# --------------------------------------------------------------------------------------------------
# run id
# --------------------------------------------------------------------------------------------------




def _hashed_config(config: FinetuneConfig) -> dict:
    """The config as hashed into the run id: SPF settings that cannot change the run's defence
    (``Defence.run_id_ignores``; plain: the projection-only ones) at their defaults, so such a run is reused
    when only they change."""
    values = identity_values(config)  # without how/where it runs (device_map, gradient checkpointing) and the
    spf = values["spf"]  # legacy fields at their defaults (spf.safety_loss): see analysis.core.options
    ignored = training_defence(config.method).run_id_ignores
    if ignored:
        defaults = to_jsonable(SPFConfig())
        spf.update({key: defaults[key] for key in ignored})
    return values


def run_id_for(config: FinetuneConfig, identity: str | None = None,
               fingerprints: Mapping[str, str] | None = None) -> str:
    """``<preset>-<method>-<hash>``; the hash covers the config (for a plain run without the projection-only
    SPF settings), the model's weight identity (default: ``models.model_identity``, no weights loaded) and
    the data fingerprints (default: loaded from ``config``)."""
    if identity is None:
        from analysis.llm.models import model_identity

        identity = model_identity(config.model)
    if fingerprints is None:
        fingerprints = load_data(config).fingerprints
    digest = config_hash({"format": FORMAT_VERSION, "config": _hashed_config(config), "model": identity,
                          "data": dict(fingerprints)}, 12)
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', config.preset)}-{config.method}-{digest}"


# --------------------------------------------------------------------------------------------------
# trainable parameters
# --------------------------------------------------------------------------------------------------


def _n_layers(model: nn.Module) -> int:
    layers = [layer_index(name) for name, _ in model.named_parameters()]
    layers = [i for i in layers if i is not None]
    return max(layers) + 1 if layers else 0


def set_trainable(model: nn.Module, config: FinetuneConfig) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """Freeze everything, then unfreeze what ``config.trainable`` says; returns (model, trainable params).

    For "lora" the model is wrapped by peft (adapters on every linear module of the blocks).
    """
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    n_layers = _n_layers(model)
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        from analysis.llm.anatomy import find_linear_modules

        targets = [m.name for m in find_linear_modules(model) if m.layer is not None]
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=targets, bias="none", init_lora_weights=True)
        torch.manual_seed(config.seed)
        model = get_peft_model(model, lora)
    else:
        first = max(n_layers - config.n_last_layers, 0) if config.trainable == "last" else 0
        if config.trainable == "linear":
            from analysis.llm.anatomy import find_linear_modules

            named = dict(model.named_modules())
            for info in find_linear_modules(model):
                if info.layer is not None:
                    named[info.name].weight.requires_grad_(True)
        for name, parameter in model.named_parameters():
            layer = layer_index(name)
            if config.trainable == "all" or (config.trainable in ("blocks", "last") and layer is not None
                                             and layer >= first):
                parameter.requires_grad_(True)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"trainable={config.trainable!r} selects no parameter of this model")
    return model, trainable


# --------------------------------------------------------------------------------------------------
# the trainer: one fine-tuning step and the measurements between steps
# --------------------------------------------------------------------------------------------------


class _ResponseLogits(nn.Module):
    """``formatting.response_logits`` of ``model`` as a module, so that ``functional_call`` can swap weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        from analysis.llm.formatting import response_logits

        return response_logits(self.model, inputs, labels)


class FinetuneTrainer:
    """Model, optimizer loop and SPF projector of one fine-tuning run, set up on construction (the model is
    moved to ``device``, unless accelerate dispatched it, and trained in place). ``cancelled()`` is checked inside evaluations.

    ``train_step(step)`` trains optimizer step ``step`` (1-based) and returns its metrics row;
    ``measure(row)`` adds the live NLLs / generation evaluation due after it. Tests and the benchmark use the
    trainer alone (``FinetuneTrainer.create(config)``); :func:`run_finetune` adds the run store.
    """

    def __init__(self, config: FinetuneConfig, loaded, data: FinetuneData, device: str = "cpu",
                 cancelled: Callable[[], bool] | None = None, eval_cache: Path | None = None):
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.data = data
        self.device = torch.device(resolve_device(device))
        self.cancelled = cancelled
        self.total = total_steps(config, len(data.train))
        torch.manual_seed(config.seed)
        self.model, self.trainable = set_trainable(place(loaded.model, self.device), config)
        self.input_device = input_device(self.model)  # self.device, or the first device of a dispatched model
        self.model.train()
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.theta0 = {name: p.detach().clone() for name, p in self.trainable}
        self.loop = TrainingLoop(self.trainable, self.total, optimizer=config.optimizer, lr=config.lr,
                                 weight_decay=config.weight_decay, grad_clip=config.max_grad_norm)
        needs = training_defence(config.method).needs
        modules = (spf_modules(self.model, config.spf)
                   if (needs.safety_gradient or needs.weight_gradients or config.track_conflict)
                   and config.trainable != "lora" else [])
        self.projector = SPFProjector(modules, config.spf)
        self.defence: Defence = training_defence(config.method)(config, self.projector)  # this run's defence state
        self.evals: list[dict] = []
        self.eval_cache = eval_cache  # folder of the initial evaluations shared between runs (None: no cache)

    @classmethod
    def create(cls, config: FinetuneConfig, loaded=None, device: str = "cpu") -> FinetuneTrainer:
        """A trainer without a store (loads the model and data): call ``train_step(1)``, ``train_step(2)``, ..."""
        from analysis.llm.models import load_model

        loaded = loaded if loaded is not None else load_model(config.model)
        return cls(config, loaded, load_data(config), device)

    # -- losses ------------------------------------------------------------------------------------
    def tokenize(self, conversations):
        from analysis.llm.formatting import tokenize_batch

        return tokenize_batch(self.tokenizer, conversations, self.config.max_length)

    def losses(self, conversations) -> torch.Tensor:
        """(n,) per-sample response losses of ``conversations`` at the current weights."""
        from analysis.llm.formatting import response_losses

        batch = self.tokenize(conversations)
        inputs = {key: value.to(self.input_device) for key, value in batch.model_inputs().items()}
        return response_losses(self.model, inputs, batch.labels.to(self.input_device))

    def kl_losses(self, conversations) -> torch.Tensor:
        """(n,) per-sample KL(p_ref || p_theta) (nats/token, mean over each sample's response tokens), p_ref the
        initial weights ``theta0`` (same modules, ``torch.func.functional_call``, no grad). Formed so that its
        gradient w.r.t. the logits, p_theta - p_ref, is exactly zero where the logits equal the reference's."""
        from analysis.llm.formatting import response_logits

        batch = self.tokenize(conversations)
        inputs = {key: value.to(self.input_device) for key, value in batch.model_inputs().items()}
        labels = batch.labels.to(self.input_device)
        logits, rows = response_logits(self.model, inputs, labels)  # (N, V)
        with torch.no_grad():
            reference = {f"model.{name}": tensor for name, tensor in self.theta0.items()}
            ref, _ = torch.func.functional_call(_ResponseLogits(self.model), reference, (inputs, labels))
            log_ref = ref - torch.logsumexp(ref, dim=-1, keepdim=True)
            p_ref = log_ref.exp()
            neg_entropy = (p_ref * log_ref).sum(dim=-1)
        # sum_v p_ref (log p_ref - z + lse(z)): the gradient exp(z - lse) - p_ref vanishes bitwise at z = ref
        token_kl = neg_entropy + torch.logsumexp(logits, dim=-1) - (p_ref * logits).sum(dim=-1)
        n = labels.shape[0]
        sums = torch.zeros(n, dtype=token_kl.dtype, device=token_kl.device).index_add(0, rows, token_kl)
        return sums / torch.bincount(rows, minlength=n).clamp(min=1).to(sums.dtype)

    def safety_gradients(self, step: int) -> dict[str, torch.Tensor]:
        """G_safety (d_out, d_in) of every SPF module at the current weights, from the step's safety batch."""
        indices = safety_indices(self.config, len(self.data.safety), step)
        refusals = [self.data.safety[i] for i in indices]
        safety_loss = self.config.spf.safety_loss
        if safety_loss == "kl":
            return self.projector.safety_gradients(self.kl_losses(refusals).mean())
        loss = self.losses(refusals).mean() if safety_loss != "compliance" else 0.0
        if safety_loss in ("contrast", "compliance"):
            from analysis.safety.evaluate import affirmative_target

            affirmative = [c[:-1] + [{"role": "assistant", "content": affirmative_target(c[-2]["content"])}]
                           for c in refusals]
            loss = loss - self.losses(affirmative).mean()
        return self.projector.safety_gradients(loss)

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """Forward/backward on the step's batch, then the defence's hooks (:mod:`analysis.lab.defences.base`):
        ``refresh`` with the safety gradient every ``spf.refresh`` steps, ``before_step`` with the gradients,
        the optimizer step (through ``wrap_step`` when the defence wraps it)."""
        config, projector, defence = self.config, self.projector, self.defence
        indices, epoch = batch_indices(config, len(self.data.train), step)
        loss = self.losses([self.data.train[i] for i in indices]).mean()
        self.loop.backward(loss)
        per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        row: dict[str, Any] = {"step": step, "epoch": epoch + ((step - 1) % per_epoch + 1) / per_epoch,
                               "train_loss": float(loss.detach()), "grad_norm": self.loop.grad_norm()}
        if projector.refresh_due(step):
            safety = self.safety_gradients(step)
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in safety.values()))
            zero = norm <= ZERO_SAFETY_RTOL * row["grad_norm"]  # e.g. "kl" at theta = theta_0: no direction
            row["safety_grad_norm"] = norm
            if config.track_conflict:
                row.update(projector.conflict_cosines(safety))
            with torch.no_grad():
                row.update(defence.refresh(step, safety, zero=zero, generator=seeded(config.seed, "basis", step)))
            if defence.needs.safety_gradient:
                row["basis_skipped"] = float(zero)  # 1: zero safety gradient, no projection until the next refresh
            del safety
        with torch.no_grad():
            grads = ({m.name: as_out_in(m.module, m.weight.grad) for m in projector.modules}
                     if defence.needs.weight_gradients else {})
            row.update(defence.before_step(step, grads))
        del grads
        wrapper = defence.wrap_step(step)  # None: the plain optimizer step
        row.update((self.loop.update(wrapper) if wrapper is not None else self.loop.update()) or {})
        return row

    # -- measurements ------------------------------------------------------------------------------
    def weight_distance(self) -> float:
        total = 0.0
        with torch.no_grad():
            for name, parameter in self.trainable:
                total += float((parameter - self.theta0[name]).pow(2).sum())
        return math.sqrt(total)

    def measure(self, row: dict) -> dict:
        """Add the metrics due after ``row["step"]``: live NLLs every ``eval_every`` steps, a generation
        evaluation (appended to ``evals``) at step 0, every ``gen_every`` steps and at the end."""
        config, step = self.config, row["step"]
        gen_due = step == 0 or step == self.total or (config.gen_every and step % config.gen_every == 0)
        nll = None
        if gen_due or step % config.eval_every == 0:
            with torch.random.fork_rng(devices=[]):
                nll = nll_arrays(self.model, self.tokenizer, self.data, config, self.cancelled)
            row.update(nll_metrics(nll))
            row["weight_distance"] = self.weight_distance()
        if gen_due:
            entry = self.full_eval(step, step == self.total, nll)
            self.evals.append(entry)
            metrics = entry["metrics"]
            row.update({key: metrics.get(key) for key in ("asr", "over_refusal", "asr_arditi", "over_refusal_arditi")})
        return row

    def full_eval(self, step: int, final: bool, nll: Mapping[str, np.ndarray]) -> dict:
        """Generation evaluation; the initial model's is shared between runs through ``eval_cache``."""
        cache_path = None
        if step == 0 and self.eval_cache is not None:
            cache_path = self.eval_cache / f"{eval_key(self.loaded.identity, self.config, self.data)}.json"
            if cache_path.is_file():
                try:
                    return dict(json.loads(cache_path.read_text()), step=0, final=final)
                except (OSError, ValueError):
                    pass
        with torch.random.fork_rng(devices=[]):
            result = generation_eval(self.model, self.tokenizer, self.data, self.config, nll, self.cancelled)
        entry = finite_or_none({"step": step, "final": final, **result})
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, entry)
        return entry


