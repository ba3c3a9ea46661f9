"""Safety-align the embedded default model (SmolLM2-135M-Instruct, which is not safety-aligned).

Recipe (``AlignSettings`` holds every number; its defaults are the recipe that was built and evaluated):

* **Safety data**: the refusals of the ``safety`` dataset's ``analysis`` split (never its ``eval`` split,
  which measures ASR; never ``benign_sensitive``, which measures over-refusal), restricted to refusals that
  the evaluation's keyword lists recognise (``refusal_keywords``; 90 of 154). The dataset's refusals are
  varied on purpose, and a model trained on all of them also learns phrasings that no keyword list
  catches ("I'm not comfortable helping with that"), which keyword ASR then counts as compliance: with
  all 154, 16 of the 21 "successful attacks" on the eval split were such refusals. Training on the
  recognisable styles keeps the tool's own ASR meaningful for this model and for attacks on it.
* **Utility data, self-distilled**: prompts of the ``utility`` dataset's ``analysis`` split answered by the
  *base model itself* (greedy). Training on the model's own answers anchors its behaviour on benign
  prompts, so helpfulness does not drift towards the dataset's reference style, and the refusal is the
  main thing that changes. Answers cut by the token budget are trained on as prefixes (no end-of-turn),
  so the model does not learn to stop early. The generated targets are cached under
  ``cache/align/`` keyed by the base model's identity and the generation settings.
* **Borderline contrast prompts, self-distilled**: :data:`BORDERLINE_PROMPTS`, harmless requests with
  alarming words ("kill a process", "shoot a time-lapse"), also answered by the base model, so refusal
  training does not teach "trigger word -> refuse". They are disjoint from ``benign_sensitive`` but of the
  same kind, so the over-refusal measured there is not a fully out-of-distribution number.
* **Mixed batches**: every batch holds ``safety_per_batch`` refusals, ``borderline_per_batch`` borderline
  answers and utility answers in the other slots (each group shuffled per epoch, seeded);
  loss = mean over samples of the per-sample response-token mean CE (DESIGN.md's convention).
* **What trains**: all weights of the top ``train_layer_fraction`` of the transformer blocks (full rank,
  no LoRA), embeddings / final norm / LM head frozen. Full-rank on purpose: LoRA would put the safety
  change into a low-rank subspace by construction, which is the very property this tool measures.
  Upper half only for speed: backpropagation stops at the first trained block (about half the cost of
  full fine-tuning on a CPU).
* AdamW, linear warm-up then linear decay, gradient clipping; seeded, deterministic algorithms, so the
  same settings on the same machine (and thread count) give the same weights, bit for bit.

The checkpoint (safetensors + tokenizer + config + ``manifest.json``) is written to a temporary folder and
renamed to ``cache/models/smollm2-135m-instruct-aligned``; ``load_model("default-aligned")`` then works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from analysis.core.config import (
    DEVICE_MAPS,
    DTYPES,
    ConfigError,
    InputError,
    ModelConfig,
    cache_dir,
    config_hash,
    to_jsonable,
)
from analysis.core.options import identity_values, option
from analysis.core.store import atomic_write_json, finite_or_none
from analysis.core.tasks import TaskContext, format_seconds, register_task, resolve_device
from analysis.lab.align_data import (  # noqa: F401 - BORDERLINE_PROMPTS, borderline_dataset: public here too
    BORDERLINE_PREFIX,
    BORDERLINE_PROMPTS,
    borderline_dataset,
    load_training_sets,
)
from analysis.lab.loop import Clock, TrainingCancelled, TrainingLoop, save_model
from analysis.llm.anatomy import layer_index
from analysis.llm.formatting import pad_rows, pad_token_id, response_losses, tokenize_conversation
from analysis.llm.models import input_device, place
from analysis.safety.evaluate import Cancel, EvalCancelled, Progress, generate_ids, prefix_rows
from analysis.safety.progress import report as report_progress

ALIGN_FORMAT_VERSION = 1


class AlignCancelled(TrainingCancelled):
    """The alignment was cancelled; a training checkpoint (if any) is kept under ``cache/align`` and the
    same settings resume from it. No model folder is written."""


class AlignError(InputError, RuntimeError):
    """The alignment cannot run (e.g. no trainable layers found)."""


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """Every number of the alignment recipe (its hash names the cached self-distilled targets)."""

    seed: int = option(0, help="seed of the batches and the self-distillation sampling")
    steps: int = option(120, help="optimizer steps", minimum=1, maximum=1_000_000)
    batch_size: int = option(8, help="conversations per step", minimum=1, maximum=4096)
    safety_per_batch: int = option(3, help="refusal conversations per batch", minimum=0)
    lr: float = option(1e-4, help="AdamW learning rate")
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_layer_fraction: float = option(0.5, flag="--layer-fraction",
                                         help="share of the top transformer blocks that train (1 = all)")
    max_length: int = 192
    safety: str = "safety"
    safety_split: str = "analysis"
    utility: str = "utility"
    utility_split: str = "analysis"
    n_safety: int | None = None  # None: the whole split
    # keep only refusals that these keyword lists recognise (empty: keep all); see load_training_sets
    refusal_keywords: tuple[str, ...] = ("qi", "arditi")
    n_utility: int | None = option(128, help="utility conversations (off: the whole split)", minimum=1)
    borderline: bool = True  # also self-distil BORDERLINE_PROMPTS (see below)
    borderline_per_batch: int = 2  # of the batch's non-safety slots (when borderline)
    distill_max_new_tokens: int = 64
    distill_batch_size: int = 32
    deterministic: bool = True
    # the base model's dtype; bfloat16 trains through float32 master weights (analysis.lab.loop.TrainingLoop)
    # and saves bfloat16 weights
    dtype: str = option("float32", choices=DTYPES, legacy=True,
                        help="model dtype (bfloat16 trains through float32 master weights and saves bfloat16)")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be at least 1")
        if not 0 <= self.safety_per_batch <= self.batch_size:
            raise ConfigError("safety_per_batch must be between 0 and batch_size")
        if self.borderline and not 0 <= self.borderline_per_batch <= self.batch_size - self.safety_per_batch:
            raise ConfigError("borderline_per_batch must be between 0 and batch_size - safety_per_batch")
        if not 0 < self.train_layer_fraction <= 1:
            raise ConfigError("train_layer_fraction must be in (0, 1]")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.safety_split == "eval":
            raise ConfigError("never train on the eval split: it measures the attack success rate")
        if self.utility == "benign_sensitive" or self.safety == "benign_sensitive":
            raise ConfigError("benign_sensitive is the over-refusal test set: do not train on it")
        from analysis.safety.evaluate import keyword_list

        for name in self.refusal_keywords:
            keyword_list(name)


@dataclasses.dataclass
class AlignReport:
    """What a run did: losses per step, timings, data ids, weights hash."""

    losses: list[float]
    safety_losses: list[float]
    utility_losses: list[float]
    seconds_distill: float
    seconds_train: float
    cpu_seconds: float
    n_trainable: int
    trained_layers: list[int]
    safety_ids: list[str]
    utility_ids: list[str]
    distill_finished: int
    weights_hash: str = ""


# --------------------------------------------------------------------------------------------------
# helpers


def _check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise AlignCancelled("alignment cancelled")


@contextlib.contextmanager
def deterministic(seed: int, enabled: bool = True):
    """Seed torch and (if enabled) force deterministic algorithms; restores the previous mode after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def select_trainable(model, fraction: float) -> tuple[list[torch.nn.Parameter], list[int]]:
    """Freeze everything except the parameters of the top ``fraction`` of the transformer blocks."""
    names = [(name, layer_index(name)) for name, _ in model.named_parameters()]
    layers = sorted({layer for _, layer in names if layer is not None})
    if not layers:
        raise AlignError("no transformer blocks found in the model's parameter names")
    n_train = max(1, math.ceil(len(layers) * fraction))
    chosen = set(layers[-n_train:])
    trainable = []
    for name, parameter in model.named_parameters():
        keep = layer_index(name) in chosen
        parameter.requires_grad_(keep)
        if keep:
            trainable.append(parameter)
    return trainable, sorted(chosen)


def weights_hash(model) -> str:
    """sha256 (16 hex) of the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        digest.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return digest.hexdigest()[:16]


def distill_dir() -> Path:
    return cache_dir() / "align"


def self_distill(loaded, utility, settings: AlignSettings, progress: Progress | None = None,
                 cancel: Cancel | None = None, use_cache: bool = True) -> list[dict]:
    """The base model's own greedy answers to the prompts: [{id, ids, text, finished}], cached on disk.

    Prompts are generated in fixed chunks of ``distill_batch_size`` (in dataset order), and each chunk's
    answers are cached under ``cache/align/`` keyed by the model's identity, the generation settings and
    the chunk's prompts. A batch's padding can change greedy tokens through float rounding, so keying
    by chunk keeps the answers a pure function of the settings, whatever was cached before; appending
    prompts (e.g. the borderline set) generates only the new chunks.
    """
    dtype = {} if settings.dtype == "float32" else {"dtype": settings.dtype}  # float32 keys as before
    key = config_hash({"model": loaded.identity, "max_new_tokens": settings.distill_max_new_tokens,
                       "seed": settings.seed, "format": ALIGN_FORMAT_VERSION, **dtype})
    path = distill_dir() / f"distill-{key}.json"
    cached: dict[str, list[dict]] = {}
    if use_cache and path.is_file():
        try:
            cached = json.loads(path.read_text())["chunks"]
        except (OSError, ValueError, KeyError, TypeError):
            cached = {}
    examples = list(utility)
    size = settings.distill_batch_size
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
    chunk_keys = [config_hash([ex.context for ex in chunk], 32) for chunk in chunks]
    todo = [(chunk, k) for chunk, k in zip(chunks, chunk_keys) if k not in cached]
    tokenizer = loaded.tokenizer
    done = 0
    for chunk, chunk_key in todo:
        _check_cancel(cancel)
        rows = generate_ids(loaded.model, tokenizer, [ex.context for ex in chunk],
                            settings.distill_max_new_tokens, size, settings.seed, cancel=cancel)
        cached[chunk_key] = [{"ids": ids, "text": tokenizer.decode(ids, skip_special_tokens=True), "finished": finished}
                             for ids, finished in rows]
        done += len(chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"model": loaded.identity, "chunks": cached})
        report_progress(progress, done / sum(len(c) for c, _ in todo), f"answered {done} prompts")
    if not todo:
        report_progress(progress, 1.0, "reused cached self-distilled answers")
    answers = [answer for k in chunk_keys for answer in cached[k]]
    return [{"id": ex.id, **answer} for ex, answer in zip(examples, answers)]




def training_rows(tokenizer, safety, utility, targets: Sequence[dict], max_length: int):
    """(safety rows, utility rows, borderline rows): (ids, labels) lists.

    Self-distilled targets are the model's own answers, followed by the chat template's end-of-turn only
    if the model had stopped by itself. Borderline rows are the utility set's ``borderline-*`` examples.
    """
    safety_rows = []
    for ex in safety:
        ids, labels, _ = tokenize_conversation(tokenizer, list(ex.messages), max_length)
        safety_rows.append((ids, labels))
    utility_rows, borderline_rows = [], []
    for ex, target in zip(utility, targets):
        if not target["text"].strip():
            continue
        if target["finished"]:
            messages = list(ex.context) + [{"role": "assistant", "content": target["text"]}]
            ids, labels, _ = tokenize_conversation(tokenizer, messages, max_length)
        else:
            ids, labels = prefix_rows(tokenizer, ex.context, target["text"], max_length)
            ids, labels = ids[:max_length], labels[:max_length]
        (borderline_rows if ex.id.startswith(BORDERLINE_PREFIX) else utility_rows).append((ids, labels))
    return safety_rows, utility_rows, borderline_rows


def _stream(n: int, generator: torch.Generator):
    """Endless shuffled epochs over range(n)."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def batches(n_safety: int, n_utility: int, settings: AlignSettings, n_borderline: int = 0):
    """Seeded (safety, utility, borderline) index lists per step.

    Each batch holds ``safety_per_batch`` safety rows, ``borderline_per_batch`` borderline rows (when there
    are any) and utility rows in the remaining slots; a missing group's slots go to the others.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    n_b = min(settings.borderline_per_batch, settings.batch_size) if (n_borderline and settings.borderline) else 0
    n_s = settings.safety_per_batch if (n_utility or n_b) else settings.batch_size
    n_u = settings.batch_size - n_s - n_b if n_utility else 0
    if not n_utility and n_b:
        n_b = settings.batch_size - n_s
    streams = [_stream(n, generator) if n else None for n in (n_safety, n_utility, n_borderline)]
    for _ in range(settings.steps):
        yield tuple([next(stream) for _ in range(count)] if stream else []
                    for stream, count in zip(streams, (n_s, n_u, n_b)))




# --------------------------------------------------------------------------------------------------
# training


def train(model, tokenizer, safety_rows, utility_rows, settings: AlignSettings,
          progress: Progress | None = None, cancel: Cancel | None = None, borderline_rows=(),
          checkpoint: Path | None = None) -> dict:
    """Fine-tune ``model`` in place (on its device) on mixed safety/utility batches with the lab's
    :class:`~analysis.lab.loop.TrainingLoop`. Returns losses and timings.

    ``checkpoint``: a file that a cancelled run saves to (and a later run with the same settings resumes
    from, bit for bit); deleted when training finishes. None: cancelling keeps nothing.
    """
    if not safety_rows:
        raise AlignError("no safety examples to train on")
    pad_id = pad_token_id(tokenizer)
    device = input_device(model)
    previous_flags = [p.requires_grad for p in model.parameters()]
    with deterministic(settings.seed, settings.deterministic):
        trainable, layers = select_trainable(model, settings.train_layer_fraction)
        names = {id(p): name for name, p in model.named_parameters()}
        loop = TrainingLoop([(names[id(p)], p) for p in trainable], settings.steps, optimizer="adamw",
                            lr=settings.lr, weight_decay=settings.weight_decay, grad_clip=settings.grad_clip,
                            schedule="warmup-linear", warmup_steps=settings.warmup_steps)
        model.train()
        history: dict[str, list[float]] = {"losses": [], "safety_losses": [], "utility_losses": []}
        plan = list(batches(len(safety_rows), len(utility_rows), settings, len(borderline_rows)))
        if checkpoint is not None and checkpoint.is_file():
            meta, _ = loop.load(checkpoint)
            loop.step, history = meta["step"], meta["history"]
        first, clock = loop.step, Clock()

        def train_step(step: int) -> dict:
            s_idx, u_idx, b_idx = plan[step - 1]
            rows = ([safety_rows[i] for i in s_idx] + [utility_rows[i] for i in u_idx]
                    + [borderline_rows[i] for i in b_idx])
            inputs = {key: value.to(device) for key, value in pad_rows(rows, pad_id).items()}
            labels = inputs.pop("labels")
            per_sample = response_losses(model, inputs, labels)
            loss = per_sample.mean()
            loop.backward(loss)
            loop.update()
            return {"step": step, "loss": loss.item(),
                    "safety_loss": per_sample[:len(s_idx)].mean().item() if s_idx else float("nan"),
                    "utility_loss": per_sample[len(s_idx):].mean().item() if (u_idx or b_idx) else float("nan")}

        def emit(row: dict) -> None:
            step = row["step"]
            history["losses"].append(row["loss"])
            history["safety_losses"].append(row["safety_loss"])
            history["utility_losses"].append(row["utility_loss"])
            elapsed = clock.read()[0]
            left = elapsed / (step - first) * (settings.steps - step)
            report_progress(progress, step / settings.steps,
                    f"step {step}/{settings.steps}, loss {row['loss']:.3f}, about {format_seconds(left)} left")

        def save(step: int, pending: dict | None) -> None:  # noqa: ARG001 - alignment has no pending row
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            loop.save(checkpoint, finite_or_none({"step": step, "history": history, "format": ALIGN_FORMAT_VERSION}))

        try:
            loop.run(train_step, emit, cancelled=lambda: cancel is not None and cancel(),
                     save=save if checkpoint is not None else None, what="alignment", error=AlignCancelled)
        finally:
            model.eval()
            for parameter, flag in zip(model.parameters(), previous_flags):
                parameter.requires_grad_(flag)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return {**history, "seconds": clock.read()[0], "n_trainable": sum(p.numel() for p in trainable),
            "layers": layers}


def align_model(loaded, settings: AlignSettings = AlignSettings(), progress: Progress | None = None,
                cancel: Cancel | None = None, checkpoint: Path | None = None, device: str | None = None) -> AlignReport:
    """Self-distil (where the model is), then fine-tune ``loaded.model`` in place on ``device`` (None: where it
    is). Progress: distillation 0-0.3, training 0.3-1.

    ``checkpoint``: see :func:`train`. Raises :class:`AlignCancelled` when ``cancel()`` returns True."""
    cpu_start = time.process_time()
    safety, utility = load_training_sets(settings)
    start = time.perf_counter()
    try:
        targets = self_distill(loaded, utility, settings, cancel=cancel,
                               progress=lambda f, m: report_progress(progress, 0.3 * f, f"self-distillation: {m}"))
    except EvalCancelled:
        raise AlignCancelled("alignment cancelled during self-distillation") from None
    seconds_distill = time.perf_counter() - start
    safety_rows, utility_rows, borderline_rows = training_rows(loaded.tokenizer, safety, utility, targets,
                                                               settings.max_length)
    if device is not None:
        place(loaded.model, torch.device(resolve_device(device)))  # a dispatched model stays where it is
    result = train(loaded.model, loaded.tokenizer, safety_rows, utility_rows, settings,
                   progress=lambda f, m: report_progress(progress, 0.3 + 0.7 * f, m), cancel=cancel,
                   borderline_rows=borderline_rows, checkpoint=checkpoint)
    return AlignReport(
        losses=result["losses"], safety_losses=result["safety_losses"], utility_losses=result["utility_losses"],
        seconds_distill=seconds_distill, seconds_train=result["seconds"],
        cpu_seconds=time.process_time() - cpu_start, n_trainable=result["n_trainable"],
        trained_layers=result["layers"], safety_ids=[ex.id for ex in safety], utility_ids=[ex.id for ex in utility],
        distill_finished=sum(bool(t["finished"]) for t in targets), weights_hash=weights_hash(loaded.model),
    )


def aligned_folder() -> Path:
    from analysis.llm.models import ALIGNED_NAME, models_dir

    return models_dir() / ALIGNED_NAME


def aligned_manifest() -> dict | None:
    """The aligned model's manifest (settings, losses, data hashes, timings), or None before it is built."""
    try:
        return json.loads((aligned_folder() / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def settings_hash(settings: AlignSettings) -> str:
    """Hash of the settings' identity values (the float32 default dtype, a legacy field, left out, so the ids of
    earlier builds stay)."""
    return config_hash(identity_values(settings))


def align_run_id(settings_hash: str, base_identity: str) -> str:
    """``align-<hash>`` of the settings' hash and the base model's weight identity."""
    return f"align-{config_hash({'settings': settings_hash, 'base': base_identity}, 12)}"


def align_default_model(progress: Progress | None = None, cancel: Cancel | None = None,
                        settings: AlignSettings = AlignSettings(), force: bool = False,
                        device: str = "cpu", device_map: str | None = None) -> Path:
    """Build ``cache/models/smollm2-135m-instruct-aligned`` from the embedded default model; return its folder.

    Reuses an existing checkpoint built with the same settings from the same base weights unless ``force``.
    ``progress(fraction, message)`` reports self-distillation and training (with a time estimate);
    ``cancel()`` returning True stops it (raises :class:`AlignCancelled`; a training checkpoint under
    ``cache/align`` is kept for the next run with the same settings; no model folder is written).
    The base model is loaded in ``settings.dtype``; ``device_map`` (``ModelConfig.device_map``) lets accelerate
    place it instead of ``device``.
    """
    from analysis.llm.models import load_model

    folder = aligned_folder()
    loaded = load_model(ModelConfig("default", dtype=settings.dtype, device_map=device_map),
                        progress=lambda f, m: report_progress(progress, 0.02 * f, m))
    hashed = settings_hash(settings)
    manifest_path = folder / "manifest.json"
    if not force and manifest_path.is_file() and (folder / "model.safetensors").is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("settings_hash") == hashed and old.get("base", {}).get("identity") == loaded.identity:
                report_progress(progress, 1.0, "the aligned model is already built")
                return folder
        except (OSError, ValueError):
            pass
    safety, utility = load_training_sets(settings)
    checkpoint = distill_dir() / f"train-{align_run_id(hashed, loaded.identity)}.safetensors"
    report = align_model(loaded, settings, progress=lambda f, m: report_progress(progress, 0.02 + 0.95 * f, m),
                         cancel=cancel, checkpoint=checkpoint, device=device)
    _check_cancel(cancel)
    report_progress(progress, 0.98, "saving the checkpoint")
    import transformers

    manifest = {
        "format": ALIGN_FORMAT_VERSION,
        "what": "SmolLM2-135M-Instruct fine-tuned to refuse harmful requests (analysis/lab/align.py)",
        "base": {"source": loaded.source, "name": loaded.name, "identity": loaded.identity},
        "settings": to_jsonable(settings), "settings_hash": hashed,
        "data": {"safety": {"source": safety.source, "content_hash": safety.content_hash,
                            "fingerprint": safety.fingerprint(), "n": len(safety)},
                 "utility": {"source": utility.source, "content_hash": utility.content_hash,
                             "fingerprint": utility.fingerprint(), "n": len(utility)}},
        "steps": settings.steps, "lr": settings.lr, "seed": settings.seed,
        "losses": report.losses, "safety_losses": report.safety_losses, "utility_losses": report.utility_losses,
        "seconds": {"self_distillation": report.seconds_distill, "training": report.seconds_train,
                    "cpu_process": report.cpu_seconds, "torch_threads": torch.get_num_threads()},
        "trained_layers": report.trained_layers, "n_trainable_parameters": report.n_trainable,
        "distill_finished": report.distill_finished, "weights_hash": report.weights_hash,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    save_model(loaded.model, loaded.tokenizer, folder, manifest=manifest)
    report_progress(progress, 1.0, f"saved {folder}")
    return folder


# --------------------------------------------------------------------------------------------------
# the task: python -m analysis align


@register_task
@dataclasses.dataclass(frozen=True)
class AlignTask:
    """Build the safety-aligned default model with ``settings`` (``force``: rebuild even if one with the same
    settings and base weights exists; ``device_map``: see ``ModelConfig.device_map``; neither is part of the
    run id)."""

    kind: ClassVar[str] = "align"

    settings: AlignSettings = option(help="the alignment recipe", default_factory=AlignSettings)
    force: bool = option(False, run_id=False, help="rebuild even if a checkpoint with these settings exists")
    device_map: str | None = option(None, choices=DEVICE_MAPS, run_id=False,
                                    help="spread the model over the GPUs (then CPU memory) with accelerate")

    def __post_init__(self) -> None:
        ModelConfig("default", device_map=self.device_map)  # validates device_map

    def run_id(self) -> str:
        """``align-<hash>`` of the settings and the default model's identity (no weights loaded)."""
        from analysis.llm.models import model_identity

        return align_run_id(settings_hash(self.settings), model_identity("default"))

    def execute(self, ctx: TaskContext) -> dict:
        """Build (or reuse) the aligned model on ``ctx.device``; returns its folder, run id and training summary."""
        folder = align_default_model(progress=ctx.report, cancel=lambda: ctx.cancelled, settings=self.settings,
                                     force=self.force, device=ctx.device, device_map=self.device_map)
        manifest = json.loads((folder / "manifest.json").read_text())
        return {"run_id": align_run_id(manifest["settings_hash"], manifest["base"]["identity"]),
                "folder": str(folder), "weights_sha256": manifest["files"]["model.safetensors"]["sha256"],
                "losses": manifest["losses"], "seconds": manifest["seconds"]}

    @staticmethod
    def print_result(result: Mapping[str, Any]) -> None:
        print_alignment(result)


def print_alignment(result: Mapping[str, Any]) -> None:
    """The printed summary of a finished alignment (what ``align`` prints)."""
    seconds = result["seconds"]
    print(f"aligned checkpoint: {result['folder']}")
    print(f"self-distillation {seconds['self_distillation']:.0f} s, training {seconds['training']:.0f} s, "
          f"CPU time {seconds['cpu_process']:.0f} s on {seconds['torch_threads']} threads")
    losses = result["losses"]
    print(f"loss {np.mean(losses[:10]):.3f} (first 10 steps) -> {np.mean(losses[-10:]):.3f} (last 10); "
          f"weights sha256 {result['weights_sha256'][:16]}")
    print("evaluate it with: python -m analysis evaluate --model default --model default-aligned")

