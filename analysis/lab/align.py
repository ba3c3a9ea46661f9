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

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch

from analysis.core.config import ConfigError, cache_dir, config_hash, to_jsonable
from analysis.core.store import file_sha256
from analysis.engine.capture import layer_index
from analysis.llm.formatting import response_losses, tokenize_conversation
from analysis.safety.evaluate import (
    Cancel,
    EvalCancelled,
    Progress,
    _pad_rows,
    _report,
    atomic_write_json,
    generate_ids,
    prefix_rows,
)

ALIGN_FORMAT_VERSION = 1


class AlignCancelled(EvalCancelled):
    """The caller's cancel() returned True; no checkpoint was written."""


class AlignError(RuntimeError):
    """The alignment cannot run (e.g. no trainable layers found)."""


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """Every number of the alignment recipe (its hash names the cached self-distilled targets)."""

    seed: int = 0
    steps: int = 120
    batch_size: int = 8
    safety_per_batch: int = 3
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_layer_fraction: float = 0.5  # top half of the transformer blocks
    max_length: int = 192
    safety: str = "safety"
    safety_split: str = "analysis"
    utility: str = "utility"
    utility_split: str = "analysis"
    n_safety: int | None = None  # None: the whole split
    # keep only refusals that these keyword lists recognise (empty: keep all); see load_training_sets
    refusal_keywords: tuple[str, ...] = ("qi", "arditi")
    n_utility: int | None = 128
    borderline: bool = True  # also self-distil BORDERLINE_PROMPTS (see below)
    borderline_per_batch: int = 2  # of the batch's non-safety slots (when borderline)
    distill_max_new_tokens: int = 64
    distill_batch_size: int = 32
    deterministic: bool = True

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


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


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


# --------------------------------------------------------------------------------------------------
# data


#: Harmless requests that *look* sensitive (violent verbs, drugs, weapons in games, history of wars...),
#: answered during training by the base model itself (self-distillation), so that refusal training does
#: not teach "trigger word -> refuse". Written for this recipe and disjoint from ``benign_sensitive``
#: (the over-refusal test set; tests/test_align.py checks that no prompt is shared). They cover similar
#: ground on purpose, as contrast data does (cf. XSTest-style borderline prompts), so over-refusal measured
#: on benign_sensitive is in-distribution for them: say so when you report it.
BORDERLINE_PROMPTS: tuple[tuple[str, str], ...] = (
    ("computing", "How do I stop a runaway background job in bash?"),
    ("computing", "How do I kill every process listening on port 8080?"),
    ("computing", "What does 'killing a child process' mean in operating systems?"),
    ("computing", "How do I hack together a quick script to rename 500 photos?"),
    ("computing", "How do I wipe a USB stick before giving it away?"),
    ("computing", "How do I purge old Docker images to free disk space?"),
    ("computing", "What is a buffer overflow, in simple terms?"),
    ("computing", "How do I terminate a stuck SSH session?"),
    ("photography", "How do I shoot sharp photos of birds in flight?"),
    ("photography", "What lens should I use to shoot street photography?"),
    ("photography", "How do I capture lightning in a photo safely?"),
    ("photography", "How do I shoot a time-lapse of clouds with my camera?"),
    ("cooking", "How do I fillet a salmon?"),
    ("cooking", "What's the best knife for chopping onions quickly?"),
    ("cooking", "How do I cure my own bacon at home?"),
    ("cooking", "How do I kill yeast on purpose when making unleavened bread?"),
    ("cooking", "How do I break down a whole pineapple?"),
    ("cooking", "How do I smash garlic with the flat of a knife?"),
    ("history", "Why did the Roman Empire attack Carthage?"),
    ("history", "How were cannons used in the Napoleonic Wars?"),
    ("history", "What happened during the storming of the Bastille?"),
    ("history", "Why did the Titanic sink so quickly?"),
    ("history", "How did the Mongols conquer so much territory?"),
    ("history", "What was the Manhattan Project?"),
    ("health", "How much paracetamol is safe to give a ten-year-old?"),
    ("health", "What should I do if someone is choking?"),
    ("health", "How do I treat a minor burn at home?"),
    ("health", "What are the symptoms of carbon monoxide poisoning?"),
    ("health", "How do vaccines train the immune system to fight viruses?"),
    ("health", "How do I safely remove a tick from my skin?"),
    ("games", "How do I defeat the final boss in Dark Souls?"),
    ("games", "What's the best way to ambush players in Fortnite?"),
    ("games", "How do I blow up the bridge in the Battlefield campaign?"),
    ("games", "In Among Us, how do I get away with being the impostor?"),
    ("gardening", "How do I kill slugs that are eating my lettuce?"),
    ("gardening", "How do I get rid of bindweed for good?"),
    ("gardening", "When should I prune my apple tree?"),
    ("gardening", "How do I poison-proof my garden for my cat?"),
    ("home_diy", "How do I knock down a non-load-bearing wall?"),
    ("home_diy", "How do I break up old concrete in my yard?"),
    ("home_diy", "How do I get rid of mice in my attic?"),
    ("home_diy", "How do I cut through a rusted bolt?"),
    ("sport", "How do I hit harder with my jab in kickboxing class?"),
    ("sport", "How do I attack the net in tennis?"),
    ("sport", "How do I score more often from penalty kicks in football?"),
    ("general", "What does it mean to 'kill it' at a job interview?"),
    ("general", "How do I destroy old documents that contain my bank details?"),
    ("general", "How do I break bad news to my team gently?"),
    ("computing", "How do I force quit a frozen app on a Mac?"),
    ("computing", "How do I delete all local git branches that were already merged?"),
    ("computing", "What is a denial-of-service attack and how do websites defend against it?"),
    ("computing", "How do I crash-test my web server with a load-testing tool?"),
    ("computing", "How do I shoot down a bad pull request politely in code review?"),
    ("computing", "How do I abort a rebase that went wrong?"),
    ("computing", "How do I destroy a Terraform stack I no longer need?"),
    ("computing", "How do I block ads on my home network?"),
    ("computing", "How do I exploit Python's list comprehensions to write shorter code?"),
    ("computing", "How do I execute a shell command from Node.js?"),
    ("photography", "How do I blow up a small photo for a poster without it looking blurry?"),
    ("photography", "How do I shoot a portrait against a bright window?"),
    ("photography", "What shutter speed freezes a hummingbird's wings?"),
    ("cooking", "How do I slaughter the onion-chopping time in half?"),
    ("cooking", "How do I beat butter and sugar until fluffy without a mixer?"),
    ("cooking", "How do I carve a roast turkey?"),
    ("cooking", "How do I torch the sugar on a creme brulee?"),
    ("cooking", "How do I shuck oysters without hurting myself?"),
    ("cooking", "How do I kill bacteria on a wooden chopping board?"),
    ("history", "Why did the Aztec Empire fall to the Spanish?"),
    ("history", "How did the Battle of Hastings change England?"),
    ("history", "What weapons did Viking warriors carry?"),
    ("history", "How was the Berlin Wall torn down?"),
    ("history", "Why was Archduke Franz Ferdinand shot?"),
    ("history", "What was the Blitz in London?"),
    ("health", "What is a safe amount of alcohol to drink in a week?"),
    ("health", "How do painkillers like morphine work in hospitals?"),
    ("health", "What should I do if my child swallows a battery?"),
    ("health", "How do I stop a nosebleed?"),
    ("health", "What is the lethal temperature for heatstroke, and how do I prevent it?"),
    ("health", "How do I get rid of a stubborn cough at night?"),
    ("games", "How do I snipe from long range in Battlefield?"),
    ("games", "How do I kill the Lich King in World of Warcraft?"),
    ("games", "How do I set traps for raiders in Rust?"),
    ("games", "In poker, how do I bluff convincingly?"),
    ("gardening", "How do I stop squirrels from raiding my bird feeder?"),
    ("gardening", "How do I kill the moss growing on my patio?"),
    ("gardening", "How do I chop down a small dead tree safely?"),
    ("home_diy", "How do I blast mould off a bathroom ceiling?"),
    ("home_diy", "How do I smash out old bathroom tiles?"),
    ("home_diy", "How do I pick the right drill bit for concrete?"),
    ("home_diy", "How do I remove a screw with a stripped head?"),
    ("sport", "How do I take down an opponent in wrestling practice?"),
    ("sport", "How do I kill the ball in volleyball?"),
    ("sport", "How do I shoot a better free throw in basketball?"),
    ("general", "How do I get revenge on my brother in a friendly prank war?"),
    ("general", "How do I crush my fear of public speaking?"),
)


SELF_DISTILLED = "(answered by the base model during alignment)"


def borderline_dataset():
    """BORDERLINE_PROMPTS as a Dataset; the placeholder response is never trained on (the base model's
    own answer is, see :func:`self_distill`)."""
    from analysis.llm.data import Dataset, Example

    examples = [Example.from_prompt(prompt, SELF_DISTILLED, id=f"borderline-{i + 1:03d}", category=category, split="analysis")
                for i, (category, prompt) in enumerate(BORDERLINE_PROMPTS)]
    text = json.dumps(BORDERLINE_PROMPTS)
    return Dataset(name="align_borderline", examples=examples, source="analysis/lab/align.py:BORDERLINE_PROMPTS",
                   content_hash=hashlib.sha256(text.encode()).hexdigest())


def load_training_sets(settings: AlignSettings):
    """(safety refusals, prompts to self-distil) for training; never an eval split.

    The second set is the utility analysis split (subsampled to ``n_utility``), followed by
    :data:`BORDERLINE_PROMPTS` when ``settings.borderline``.
    """
    from analysis.llm.data import Dataset, load_any

    safety = load_any(settings.safety).split(settings.safety_split)
    if settings.refusal_keywords:
        from analysis.safety.evaluate import keyword_list

        lists = [keyword_list(name) for name in settings.refusal_keywords]
        kept = [ex for ex in safety if all(k.is_refusal(ex.response) for k in lists)]
        safety = Dataset(name=f"{safety.name}[refusal:{'+'.join(settings.refusal_keywords)}]", examples=kept,
                         source=safety.source, content_hash=safety.content_hash)
    if settings.n_safety is not None and settings.n_safety < len(safety):
        safety = safety.take(settings.n_safety, seed=settings.seed)
    utility = load_any(settings.utility).split(settings.utility_split)
    if settings.n_utility is not None and settings.n_utility < len(utility):
        utility = utility.take(settings.n_utility, seed=settings.seed)
    if settings.borderline:
        extra = borderline_dataset()
        utility = Dataset(name=f"{utility.name}+{extra.name}", examples=list(utility) + list(extra),
                          source=f"{utility.source} + {extra.source}",
                          content_hash=hashlib.sha256((utility.content_hash + extra.content_hash).encode()).hexdigest())
    return safety, utility


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
    key = config_hash({"model": loaded.identity, "max_new_tokens": settings.distill_max_new_tokens,
                       "seed": settings.seed, "format": ALIGN_FORMAT_VERSION})
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
        atomic_write_json(path, {"model": loaded.identity, "chunks": cached})
        _report(progress, done / sum(len(c) for c, _ in todo), f"answered {done} prompts")
    if not todo:
        _report(progress, 1.0, "reused cached self-distilled answers")
    answers = [answer for k in chunk_keys for answer in cached[k]]
    return [{"id": ex.id, **answer} for ex, answer in zip(examples, answers)]


BORDERLINE_PREFIX = "borderline-"


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
          progress: Progress | None = None, cancel: Cancel | None = None, borderline_rows=()) -> dict:
    """Fine-tune ``model`` in place on mixed safety/utility batches. Returns losses and timings."""
    if not safety_rows:
        raise AlignError("no safety examples to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    previous_flags = [p.requires_grad for p in model.parameters()]
    with deterministic(settings.seed, settings.deterministic):
        trainable, layers = select_trainable(model, settings.train_layer_fraction)
        optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)

        def factor(step: int) -> float:
            if step < settings.warmup_steps:
                return (step + 1) / settings.warmup_steps
            remaining = settings.steps - settings.warmup_steps
            return max(0.0, 1 - (step - settings.warmup_steps) / max(remaining, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        losses, safety_losses, utility_losses = [], [], []
        start = time.perf_counter()
        try:
            plan = batches(len(safety_rows), len(utility_rows), settings, len(borderline_rows))
            for step, (s_idx, u_idx, b_idx) in enumerate(plan):
                _check_cancel(cancel)
                rows = ([safety_rows[i] for i in s_idx] + [utility_rows[i] for i in u_idx]
                        + [borderline_rows[i] for i in b_idx])
                inputs = _pad_rows(rows, pad_id)
                labels = inputs.pop("labels")
                per_sample = response_losses(model, inputs, labels)
                loss = per_sample.mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, settings.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                safety_losses.append(per_sample[:len(s_idx)].mean().item() if s_idx else float("nan"))
                utility_losses.append(per_sample[len(s_idx):].mean().item() if (u_idx or b_idx) else float("nan"))
                elapsed = time.perf_counter() - start
                left = elapsed / (step + 1) * (settings.steps - step - 1)
                _report(progress, (step + 1) / settings.steps,
                        f"step {step + 1}/{settings.steps}, loss {loss.item():.3f}, about {_duration(left)} left")
        finally:
            model.eval()
            for parameter, flag in zip(model.parameters(), previous_flags):
                parameter.requires_grad_(flag)
    return {"losses": losses, "safety_losses": safety_losses, "utility_losses": utility_losses,
            "seconds": time.perf_counter() - start, "n_trainable": sum(p.numel() for p in trainable),
            "layers": layers}


def align_model(loaded, settings: AlignSettings = AlignSettings(), progress: Progress | None = None,
                cancel: Cancel | None = None) -> AlignReport:
    """Self-distil, then fine-tune ``loaded.model`` in place. Progress: distillation 0-0.3, training 0.3-1."""
    cpu_start = time.process_time()
    safety, utility = load_training_sets(settings)
    start = time.perf_counter()
    targets = self_distill(loaded, utility, settings,
                           progress=lambda f, m: _report(progress, 0.3 * f, f"self-distillation: {m}"), cancel=cancel)
    seconds_distill = time.perf_counter() - start
    safety_rows, utility_rows, borderline_rows = training_rows(loaded.tokenizer, safety, utility, targets,
                                                               settings.max_length)
    result = train(loaded.model, loaded.tokenizer, safety_rows, utility_rows, settings,
                   progress=lambda f, m: _report(progress, 0.3 + 0.7 * f, m), cancel=cancel,
                   borderline_rows=borderline_rows)
    return AlignReport(
        losses=result["losses"], safety_losses=result["safety_losses"], utility_losses=result["utility_losses"],
        seconds_distill=seconds_distill, seconds_train=result["seconds"],
        cpu_seconds=time.process_time() - cpu_start, n_trainable=result["n_trainable"],
        trained_layers=result["layers"], safety_ids=[ex.id for ex in safety], utility_ids=[ex.id for ex in utility],
        distill_finished=sum(bool(t["finished"]) for t in targets), weights_hash=weights_hash(loaded.model),
    )


def save_checkpoint(model, tokenizer, folder: Path, manifest: dict) -> Path:
    """Write model (safetensors), tokenizer, config and manifest.json to a temporary folder, then rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    weights = sorted(temporary.glob("*.safetensors"))
    manifest = dict(manifest, files={p.name: {"sha256": file_sha256(p), "size": p.stat().st_size} for p in weights})
    atomic_write_json(temporary / "manifest.json", manifest)
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    temporary.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def aligned_folder() -> Path:
    from analysis.llm.models import ALIGNED_NAME, models_dir

    return models_dir() / ALIGNED_NAME


def align_default_model(progress: Progress | None = None, cancel: Cancel | None = None,
                        settings: AlignSettings = AlignSettings(), force: bool = False) -> Path:
    """Build ``cache/models/smollm2-135m-instruct-aligned`` from the embedded default model; return its folder.

    Reuses an existing checkpoint built with the same settings from the same base weights unless ``force``.
    ``progress(fraction, message)`` reports self-distillation and training (with a time estimate);
    ``cancel()`` returning True stops it (raises :class:`AlignCancelled`; nothing is written).
    """
    from analysis.llm.models import load_model

    folder = aligned_folder()
    loaded = load_model("default", progress=lambda f, m: _report(progress, 0.02 * f, m))
    settings_hash = config_hash(settings)
    manifest_path = folder / "manifest.json"
    if not force and manifest_path.is_file() and (folder / "model.safetensors").is_file():
        try:
            old = json.loads(manifest_path.read_text())
            if old.get("settings_hash") == settings_hash and old.get("base", {}).get("identity") == loaded.identity:
                _report(progress, 1.0, "the aligned model is already built")
                return folder
        except (OSError, ValueError):
            pass
    safety, utility = load_training_sets(settings)
    report = align_model(loaded, settings, progress=lambda f, m: _report(progress, 0.02 + 0.95 * f, m), cancel=cancel)
    _check_cancel(cancel)
    _report(progress, 0.98, "saving the checkpoint")
    import transformers

    manifest = {
        "format": ALIGN_FORMAT_VERSION,
        "what": "SmolLM2-135M-Instruct fine-tuned to refuse harmful requests (analysis/lab/align.py)",
        "base": {"source": loaded.source, "name": loaded.name, "identity": loaded.identity},
        "settings": to_jsonable(settings), "settings_hash": settings_hash,
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
    save_checkpoint(loaded.model, loaded.tokenizer, folder, manifest)
    _report(progress, 1.0, f"saved {folder}")
    return folder


# --------------------------------------------------------------------------------------------------
# CLI: python -m analysis align


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    defaults = AlignSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--safety-per-batch", type=int, default=defaults.safety_per_batch)
    parser.add_argument("--n-utility", type=int, default=defaults.n_utility)
    parser.add_argument("--layer-fraction", type=float, default=defaults.train_layer_fraction,
                        help="share of the top transformer blocks that train (1 = all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a checkpoint with these settings exists")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; use 1 on a machine shared with other jobs)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from analysis.llm.models import ModelLoadError

    try:
        settings = AlignSettings(steps=args.steps, lr=args.lr, seed=args.seed, batch_size=args.batch_size,
                                 safety_per_batch=args.safety_per_batch, n_utility=args.n_utility,
                                 train_layer_fraction=args.layer_fraction)
    except ConfigError as error:
        print(f"error: {error}")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    bar = tqdm(total=1000, desc="align", bar_format="{l_bar}{bar}| {elapsed} {postfix}")

    def progress(fraction: float, message: str) -> None:
        bar.n = round(1000 * fraction)
        bar.set_postfix_str(message[:70])
        bar.refresh()

    start = time.perf_counter()
    try:
        folder = align_default_model(progress=progress, settings=settings, force=args.force)
    except (ModelLoadError, AlignError) as error:
        bar.close()
        print(f"error: {error}")
        return 2
    bar.close()
    manifest = json.loads((folder / "manifest.json").read_text())
    print(f"aligned checkpoint: {folder} ({time.perf_counter() - start:.0f} s wall)")
    seconds = manifest["seconds"]
    print(f"self-distillation {seconds['self_distillation']:.0f} s, training {seconds['training']:.0f} s, "
          f"CPU time {seconds['cpu_process']:.0f} s on {seconds['torch_threads']} threads")
    losses = manifest["losses"]
    print(f"loss {np.mean(losses[:10]):.3f} (first 10 steps) -> {np.mean(losses[-10:]):.3f} (last 10); "
          f"weights sha256 {manifest['files']['model.safetensors']['sha256'][:16]}")
    print("evaluate it with: python -m analysis evaluate --model default --model default-aligned")
    return 0
