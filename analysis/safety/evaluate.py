"""Safety evaluation of one model, as a task: greedy generation, keyword refusals, NLLs, optional LLM judge.

What it measures (on held-out data: the ``eval`` split of ``safety`` and ``utility``, and
``benign_sensitive``, which is never trained on):

* **ASR** (attack success rate) = share of harmful prompts whose greedy completion is *not* a refusal;
  **over-refusal** = share of benign-but-sensitive-looking prompts whose completion *is* a refusal.
  Both overall and per category (HEx-PHI's 11 categories for the harmful set), under both keyword lists
  of :mod:`analysis.safety.keywords` (read its caveats).
* **Refusal / affirmative / utility NLL** (nats per response token), see :mod:`analysis.safety.nll`.
* optional **LLM judge** score 1-5 (:mod:`analysis.safety.judge`), off by default.

The pieces: ``keywords`` (refusal lists) -> ``generation`` (batched greedy completions) and ``nll``
(per-sample NLLs) -> ``judge`` (optional) -> ``results`` (metrics, :class:`EvalResult`, storage, report);
``progress`` holds the callbacks they share. This module ties them into the task.

The task is :class:`EvalConfig` (``kind = "evaluate"``): the model and the evaluation settings. ``run_id()``
hashes the model's identity (without loading it), the settings that change numbers and the fingerprints of
the selected examples; ``execute(ctx)`` evaluates on ``ctx.device`` and returns :meth:`EvalResult.summary`.
Results live in the run folder ``cache_dir()/"evals"/<run_id>/`` of a :class:`~analysis.core.store.RunStore`
and are reused only when the stored config equals the task's (else recomputed, never mixed).
Command line: ``python -m analysis evaluate --model default --model default-aligned`` runs one task per model
in turn and prints them side by side; ``--config FILE`` runs the one task in the file.
``torchrun --nproc-per-node N -m analysis evaluate ...`` deals the generation batches over N processes (gloo on
the CPU, nccl on GPUs) with the same records as one process (:func:`evaluate`); ``--device-map auto`` instead
spreads one model over the GPUs (``ModelConfig.device_map``).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import ClassVar

import numpy as np
import torch

from analysis.core.config import ConfigError, InputError, ModelConfig, config_hash
from analysis.core.options import identity_values, option
from analysis.core.store import RunStore, atomic_write_json
from analysis.core.tasks import Cancelled, TaskContext, register_task, resolve_device
from analysis.llm.formatting import pad_rows, with_system
from analysis.safety.accuracy import answer_correct, gold_answer
from analysis.safety.generation import generate, generate_ids
from analysis.safety.guard import GuardConfig, guard_labels
from analysis.safety.judge import (
    JudgeConfig,
    build_judge_messages,
    check_judge_reachable,
    judge_results,
    judge_scores,
    parse_judge_score,
)
from analysis.safety.keywords import (
    ARDITI_KEYWORDS,
    KEYWORD_LISTS,
    QI_KEYWORDS,
    is_refusal,
    keyword_list,
    matched_keywords,
    refusal_flags,
)
from analysis.safety.nll import affirmative_nll, affirmative_target, nll_of_rows, prefix_rows, response_nll
from analysis.safety.progress import Cancel, EvalCancelled, Progress, report
from analysis.safety.results import (
    EVAL_FORMAT_VERSION,
    EvalResult,
    evals_store,
    format_report,
    load_evaluation,
    save_evaluation,
    summarise,
)

__all__ = [
    "EvalCancelled", "EvalConfig", "EvalResult", "HARMFUL_RESPONSES", "evaluate", "evals_store", "format_report",
    "harmful_response_kind", "load_sets",
    "result_key", "stage_plan", "stored_evaluation", "summarise",
    # re-exported building blocks (their home modules are analysis.safety.keywords/generation/nll/judge)
    "ARDITI_KEYWORDS", "Cancel", "GuardConfig", "JudgeConfig", "KEYWORD_LISTS", "Progress", "QI_KEYWORDS", "affirmative_nll",
    "affirmative_target", "atomic_write_json", "build_judge_messages", "generate", "generate_ids", "is_refusal",
    "judge_scores", "keyword_list", "matched_keywords", "nll_of_rows", "pad_rows", "parse_judge_score",
    "prefix_rows", "report", "response_nll",
]

#: Old private names still imported by analysis/lab/align.py (until it imports from the home modules).
_pad_rows = pad_rows
_report = report


# --------------------------------------------------------------------------------------------------
# the task


#: Values of :attr:`EvalConfig.harmful_response`.
HARMFUL_RESPONSES = ("auto", "refusal", "affirmative", "none")


@register_task
@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate one model: what it generates and scores. A task (``kind = "evaluate"``, see the module
    docstring). ``model`` may be given as a source string ("default", "tiny-llama", a folder, a hub id).

    ``harmful`` / ``benign`` / ``utility``: a shipped dataset name or a file (any format of
    :func:`analysis.llm.data.load_any`: JSONL/JSON/CSV, HarmBench, AdvBench, JailbreakBench, StrongREJECT,
    XSTest CSV, ``.txt`` one prompt per line); an existing path is stored absolute. The content of the selected
    examples enters the run id (their fingerprint), so an edited file is evaluated again. ``*_split`` applies to
    sets that carry splits (a file without a ``split`` column is used whole).
    ``harmful_response``: what the harmful set's responses are - ``refusal`` (refusal NLL on them),
    ``affirmative`` (they are the affirmative-NLL targets, as AdvBench/JailbreakBench targets), ``none``; ``auto``:
    none for prompt-only sets, affirmative for AdvBench/JailbreakBench files and ``harmful_prefix``, else refusal.
    ``utility_accuracy``: also generate answers to the utility prompts that have a gold answer (math, factual
    QA; :mod:`analysis.safety.accuracy`) with ``utility_max_new_tokens`` new tokens and score them.
    ``judge``: an OpenAI-compatible LLM judge (rubric ``qi`` or ``strongreject``); ``guard``: a local
    Llama-Guard-style classifier (:mod:`analysis.safety.guard`); both score the harmful completions, both off
    by default.
    ``system_prompt``: a system message put before every prompt that has none (e.g. Qi et al.'s AOA persona,
    to evaluate a model the way it was attacked); None: the prompts as they are.
    ``n_*``: subsample sizes of each set (None: the whole split). ``batch_size`` / ``nll_batch_size`` do not
    enter the run id (batching changes greedy completions only by float noise).
    """

    kind: ClassVar[str] = "evaluate"

    model: ModelConfig = option(ModelConfig(), repeatable=True, help="the model(s) to evaluate")
    max_new_tokens: int = option(48, help="new tokens per harmful / benign answer", minimum=1, maximum=1024)
    batch_size: int = option(16, help="prompts per generation batch", minimum=1, maximum=4096, run_id=False)
    nll_batch_size: int = option(8, help="conversations per NLL batch", minimum=1, maximum=4096, run_id=False)
    max_length: int = 256
    seed: int = option(0, help="seed of the subsamples")
    harmful: str = option("safety", metavar="FILE",
                          help="harmful prompts: a shipped name or a file (JSONL/CSV, HarmBench, AdvBench, "
                               "JailbreakBench, StrongREJECT CSV, .txt one prompt per line)")
    harmful_split: str = "eval"
    benign: str = option("benign_sensitive", metavar="FILE",
                         help="benign prompts for over-refusal: a shipped name or a file (e.g. XSTest CSV, .txt)")
    utility: str = option("utility", metavar="FILE", help="utility set (prompt + answer)")
    utility_split: str = "eval"
    n_harmful: int | None = option(None, minimum=1, help="seeded subsample of the harmful eval split (off: all)")
    n_benign: int | None = option(None, minimum=1, help="seeded subsample of the benign prompts (off: all)")
    n_utility: int | None = option(None, minimum=1, help="seeded subsample of the utility prompts (off: all)")
    affirmative_template: str = "Sure, here is how to do that"
    primary_keywords: str = option("qi", flag="--keywords", choices=lambda: tuple(sorted(KEYWORD_LISTS)),
                                   help="the primary refusal-keyword list")
    judge: JudgeConfig | None = option(None, help="an LLM judge (off without --judge-url)")
    harmful_response: str = option("auto", choices=HARMFUL_RESPONSES,
                                   help="what the harmful file's responses are (auto: by format)")
    utility_accuracy: bool = option(True, help="also generate and score the utility answers (math, factual QA)")
    utility_max_new_tokens: int = option(128, minimum=1, maximum=1024,
                                         help="new tokens of the answers scored for utility accuracy")
    guard: GuardConfig | None = option(None, help="a local guard classifier (off without --guard)")
    system_prompt: str | None = option(None, legacy=True,
                                       help="system message before every prompt (e.g. a persona; off: none)")

    @staticmethod
    def add_extra_options(parser: argparse.ArgumentParser) -> None:
        """What the command prints or skips: not settings of an evaluation."""
        group = parser.add_argument_group("command")
        group.add_argument("--no-cache", action="store_true", help="recompute even when a stored result matches")
        group.add_argument("--examples", type=int, default=3, help="completions to print per set (default: 3)")
        group.add_argument("--estimate", action="store_true",
                           help="print how long each evaluation would take here (a short measured warm-up) and stop")

    @staticmethod
    def run_command(args: argparse.Namespace) -> int:
        """Several ``--model`` s: one evaluation each, then one report comparing them (paired tests)."""
        return run(args)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", ModelConfig(source=self.model))
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"model must be a ModelConfig or a source string, not {type(self.model).__name__}")
        for name in ("max_new_tokens", "utility_max_new_tokens"):
            if not 1 <= getattr(self, name) <= 1024:
                raise ConfigError(f"{name} {getattr(self, name)} must be between 1 and 1024")
        for name in ("batch_size", "nll_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_length < 16:
            raise ConfigError("max_length must be at least 16 tokens")
        for name in ("n_harmful", "n_benign", "n_utility"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or None for the whole split)")
        keyword_list(self.primary_keywords)
        if self.harmful_response not in HARMFUL_RESPONSES:
            raise ConfigError(f"harmful_response {self.harmful_response!r} must be one of {', '.join(HARMFUL_RESPONSES)}")
        for name in ("harmful", "benign", "utility"):
            object.__setattr__(self, name, _dataset_reference(getattr(self, name), name))
        if not self.affirmative_template.strip():
            raise ConfigError("affirmative_template is empty")
        if self.system_prompt is not None and (not isinstance(self.system_prompt, str) or not self.system_prompt.strip()):
            raise ConfigError("system_prompt must be a non-empty string or None")

    def run_id(self) -> str:
        """Hash of :func:`result_key`: model identity (weights not loaded), settings, example fingerprints."""
        from analysis.llm.models import model_identity

        return config_hash(result_key(self, model_identity(self.model), load_sets(self)))

    def execute(self, ctx: TaskContext) -> dict:
        """Evaluate (or reuse the stored evaluation); the JSON-able :meth:`EvalResult.summary`."""
        return evaluate(self, ctx).summary()




def _dataset_reference(value, name: str) -> str:
    """A shipped name as given; a path made absolute when it exists (so a job in another folder finds it)."""
    from pathlib import Path

    from analysis.llm.data import SHIPPED

    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a shipped dataset name or a file path, not {value!r}")
    if value in SHIPPED and not Path(value).exists():
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def harmful_response_kind(config: EvalConfig, harmful) -> str:
    """What the harmful set's responses are (``refusal``, ``affirmative`` or ``none``), ``auto`` resolved."""
    from analysis.llm.data import detect_format

    if config.harmful_response != "auto":
        if config.harmful_response != "none" and harmful.prompts_only:
            raise ConfigError(f"harmful_response is {config.harmful_response!r} but the harmful set "
                              f"{config.harmful!r} has no responses; use 'auto' or 'none'")
        return config.harmful_response
    if harmful.prompts_only:
        return "none"
    if config.harmful == "harmful_prefix" or detect_format(config.harmful) in ("advbench", "jailbreakbench"):
        return "affirmative"
    return "refusal"


def _select(dataset, split: str | None, n: int | None, seed: int):
    if split and any(ex.split is not None for ex in dataset):
        dataset = dataset.split(split)
    if n is not None and n < len(dataset):
        dataset = dataset.take(n, seed=seed)
    return dataset


def load_sets(config: EvalConfig):
    """(harmful, benign, utility) datasets of the evaluation (selected splits, seeded subsamples)."""
    from analysis.llm.data import load_any

    harmful = _select(load_any(config.harmful, require_response=False), config.harmful_split, config.n_harmful,
                      config.seed)
    benign = _select(load_any(config.benign, require_response=False), None, config.n_benign, config.seed)
    utility = _select(load_any(config.utility), config.utility_split, config.n_utility, config.seed)
    return harmful, benign, utility


def _fingerprint(dataset) -> str:
    fingerprint = getattr(dataset, "fingerprint", None)
    if callable(fingerprint):
        return fingerprint()
    return config_hash([(ex.id, ex.messages) for ex in dataset], length=32)


def result_key(config: EvalConfig, identity: str, sets) -> dict:
    """Everything an evaluation's numbers depend on (stored as the run's config; its hash is the run id):
    format version, model identity, the settings (batch sizes left out, the judge by endpoint and rubric,
    never its key, the model's device_map left out) and the fingerprints of the selected examples."""
    values = identity_values(config)  # batch sizes left out (run_id=False), system_prompt while None (legacy)
    values["judge"] = config.judge.identity() if config.judge else None
    values["guard"] = config.guard.identity() if config.guard else None
    harmful, benign, utility = sets
    return {"format": EVAL_FORMAT_VERSION, "model_identity": identity, "config": values,
            "data": {"harmful": _fingerprint(harmful), "benign": _fingerprint(benign),
                     "utility": _fingerprint(utility)}}


def stored_evaluation(config: EvalConfig, store: RunStore | None = None) -> EvalResult | None:
    """The stored evaluation for this task, or None (cheap: the model is not loaded)."""
    store = store if store is not None else evals_store()
    from analysis.llm.models import model_identity

    key = result_key(config, model_identity(config.model), load_sets(config))
    run_id = config_hash(key)
    manifest, _ = store.reusable(run_id, key)
    return load_evaluation(store, run_id, manifest) if manifest is not None else None


def _legacy_folders(store: RunStore) -> bool:
    """Whether the store holds evaluations in the layout before run folders (<model>-<identity>/<hash>/)."""
    if not store.root.is_dir():
        return False
    return any(p.is_dir() and not (p / "manifest.json").exists() and any(p.glob("*/manifest.json"))
               for p in store.root.iterdir())


# --------------------------------------------------------------------------------------------------
# the evaluation


def evaluate(config: EvalConfig, ctx: TaskContext | None = None, model=None, store: RunStore | None = None,
             use_cache: bool = True) -> EvalResult:
    """Evaluate ``config.model``: completions + keyword refusals, NLLs, judge; stored under the run id.

    ``ctx``: device, progress (per stage with counts, shares by work: :func:`stage_plan`) and cancelling (raises
    :class:`EvalCancelled`, a :class:`~analysis.core.tasks.Cancelled`; nothing is stored). ``model``: an
    already loaded :class:`~analysis.llm.models.LoadedModel` of ``config.model`` (tests, in-process reuse);
    by default the task loads its own. ``use_cache=False`` recomputes and replaces a stored result.

    Under torchrun (several processes, :mod:`analysis.core.distributed`) the generation batches are dealt
    over the ranks and the completions gathered in order, so the records equal one process's; rank 0 alone
    computes the rest and stores the run, the other ranks then read it. Rank 0 sends ``("reuse",)`` or
    ``("compute",)`` first and ``("done",)`` / ``("stop", message)`` once the generation is over.
    """
    from analysis.core import distributed as group
    from analysis.llm.models import load_model, model_identity

    ctx = ctx if ctx is not None else TaskContext()
    store = store if store is not None else evals_store()
    ranks, device = group.start(torch.device(resolve_device(ctx.device)), config.model.device_map)
    sets = load_sets(config)
    identity = model_identity(config.model)
    if model is not None and model.identity != identity:
        raise ConfigError(f"the model passed in (identity {model.identity}) is not the task's model "
                          f"{config.model.source!r} (identity {identity})")
    key = result_key(config, identity, sets)
    run_id = config_hash(key)
    if ranks is not None and not ranks.leader:
        try:
            return _follow(config, ranks, model, sets, device, store, run_id)
        finally:
            ranks.close()
    messages: list[str] = []
    manifest, why = store.reusable(run_id, key) if use_cache else (None, "")
    generated = False  # the others wait for done/stop only once the shared generation is over
    try:
        if ranks is not None:
            ranks.send(("reuse",) if manifest is not None else ("compute",))
        if manifest is not None:
            stored = load_evaluation(store, run_id, manifest)
            if config.judge is None or not stored.metrics.get("judge_n_failed") or ranks is not None:
                ctx.report(1.0, "reused a stored evaluation")
                return stored
            return _retry_judge(config, ctx, store, stored)
        if why:
            messages.append(why)
        elif use_cache and _legacy_folders(store):
            messages.append(f"evaluations stored by an older version (folders <model>-<identity>/ in {store.root}) "
                            "are not read; evaluating again (delete those folders to free the space)")
        for message in messages:
            ctx.report(0.0, message)
        if config.judge is not None:  # a judge that is down costs seconds here, not an evaluation
            ctx.report(0.0, f"checking that the judge at {config.judge.base_url} answers")
            check_judge_reachable(config.judge)
        partial = _read_partial(store, run_id, key) if ranks is None and use_cache else None
        start = time.perf_counter()
        try:
            if partial is not None:  # generated, scored by keywords and NLLs already: only the judge is left
                ctx.report(0.95, "resuming at the judge: generations and NLLs read from the stored partial run")
                result = _judged(config, ctx, partial["model"], sets, key, run_id, partial["records"],
                                 {k: np.asarray(v, dtype=np.float64) for k, v in partial["nll"].items()},
                                 time.perf_counter() - partial["seconds"])
            else:
                if model is None:
                    ctx.report(0.0, f"loading the model {config.model.source}")
                    model = load_model(config.model)
                records = _generate_records(config, ctx, model, sets, device, ranks)
                generated = True
                result = _compute(config, ctx, model, sets, key, run_id, records, device, start,
                                  checkpoint=lambda recs, nll, seconds: _write_partial(
                                      store, run_id, key, _model_info(model), recs, nll, seconds))
        except Cancelled as error:
            raise EvalCancelled(str(error), run_id) from None
        result.messages = messages
        stored, _ = store.reusable(run_id, key)  # another process may have finished the same run meanwhile
        if stored is None or not use_cache:
            ctx.report(1.0, "storing: records, NLLs, metrics")
            store.delete(run_id)
            save_evaluation(store, result, _versions())
        _partial_path(store, run_id).unlink(missing_ok=True)
        result.folder = store.path(run_id)
        ctx.report(1.0, "evaluation done")
        if ranks is not None:
            ranks.send(("done",))
        return result
    except BaseException:
        if ranks is not None and generated:
            ranks.send(("stop", "rank 0 was cancelled or failed; see its output"))
        raise
    finally:
        if ranks is not None:
            ranks.close()


def _generation_prompts(config: EvalConfig, sets) -> tuple[list, list]:
    """(harmful + benign examples, [(utility example, gold answer)] scored for accuracy)."""
    harmful, benign, utility = sets
    scored = [(ex, gold) for ex in utility for gold in [gold_answer(ex)] if gold is not None] \
        if config.utility_accuracy else []
    return list(harmful) + list(benign), scored


def _span(ctx: TaskContext | None, low: float, high: float, prefix: str = ""):
    """A ``progress(fraction, message)`` callback mapping [0, 1] onto [low, high] of ``ctx`` (None: no-op)."""
    if ctx is None:
        return None
    return lambda fraction, message: ctx.report(low + (high - low) * fraction, prefix + message)


#: work of one NLL sample relative to one generated token of a batched answer (a forward over the whole text vs
#: one decode step): ~15-20 on SmolLM2-135M on a CPU (bench eval, 24-prompt runs). Only shapes the progress
#: bar, never a number of the evaluation (the time estimate measures NLLs itself)
NLL_TOKEN_EQUIVALENT = 15.0


def stage_plan(config: EvalConfig, sets) -> dict[str, dict]:
    """The evaluation's stages in order, each {"label", "count" (answers or NLL samples), "tokens" (new tokens
    per answer, 0 for NLLs), "work" (tokens or token-equivalents), "low", "high" (its share of the progress
    bar, by work)}; the guard and judge, when on, get the last 5%."""
    harmful, benign, utility = sets
    _, scored = _generation_prompts(config, sets)
    refusal_nll = len(harmful) if harmful_response_kind(config, harmful) == "refusal" else 0
    stages = {
        "harmful": ("harmful answers", len(harmful), config.max_new_tokens),
        "benign": ("benign answers", len(benign), config.max_new_tokens),
        "utility": ("utility answers", len(scored), config.utility_max_new_tokens),
        "refusal_nll": ("refusal NLL", refusal_nll, 0),
        "affirmative_nll": ("affirmative NLL", len(harmful), 0),
        "utility_nll": ("utility NLL", len(utility), 0),
    }
    work = {name: count * (tokens or NLL_TOKEN_EQUIVALENT) for name, (_, count, tokens) in stages.items()}
    end = 0.95 if config.judge is not None or config.guard is not None else 1.0
    total, done, plan = max(sum(work.values()), 1e-9), 0.0, {}
    for name, (label, count, tokens) in stages.items():
        low = end * done / total
        done += work[name]
        plan[name] = {"label": label, "count": count, "tokens": tokens, "work": work[name], "low": low,
                      "high": end * done / total}
    return plan


def _stage_progress(ctx: TaskContext | None, stage: dict):
    """A ``progress(fraction, message)`` callback reporting "<stage>: k/n (t new tokens each)" on its share."""
    if ctx is None:
        return None
    each = f" ({stage['tokens']} new tokens each)" if stage["tokens"] else ""

    def progress(fraction: float, message: str) -> None:  # noqa: ARG001 - the stage names its own counts
        done = round(fraction * stage["count"])
        ctx.report(stage["low"] + (stage["high"] - stage["low"]) * fraction,
                   f"{stage['label']}: {done}/{stage['count']}{each}")

    return progress


def _by_length(tokenizer, contexts: list) -> list[int]:
    """Indices of ``contexts`` from the shortest rendered prompt to the longest (less padding per batch)."""
    from analysis.llm.formatting import render_prompt

    lengths = [len(tokenizer(render_prompt(tokenizer, list(c)), add_special_tokens=False)["input_ids"])
               for c in contexts]
    return sorted(range(len(contexts)), key=lambda i: (lengths[i], i))


def _generate_all(config: EvalConfig, model, sets, ranks, ctx: TaskContext | None = None) -> tuple[list, list]:
    """(completions of the harmful + benign prompts, answers to the scored utility prompts), each stage's
    prompts batched by length (shortest first; outputs back in the prompts' order), the batches dealt over
    ``ranks`` (None: one process); progress per stage and cancelling through ``ctx`` (None: neither)."""
    from analysis.core.distributed import map_batches

    harmful, benign, _ = sets
    _, scored = _generation_prompts(config, sets)
    plan = stage_plan(config, sets)
    cancel = (lambda: ctx.cancelled) if ctx is not None else None
    system = config.system_prompt

    def run(examples, max_new_tokens, stage):
        contexts = [with_system(ex.context, system) for ex in examples]
        if not contexts:
            return []
        order = _by_length(model.tokenizer, contexts)
        outputs = map_batches(ranks, [contexts[i] for i in order], config.batch_size, lambda part: generate(
            model.model, model.tokenizer, part, max_new_tokens, config.batch_size, config.seed,
            progress=_stage_progress(ctx, plan[stage]), cancel=cancel))
        result: list = [None] * len(contexts)
        for position, index in enumerate(order):
            result[index] = outputs[position]
        return result

    completions = run(list(harmful), config.max_new_tokens, "harmful") + run(list(benign), config.max_new_tokens,
                                                                              "benign")
    answers = run([ex for ex, _ in scored], config.utility_max_new_tokens, "utility")
    return completions, answers


def _follow(config: EvalConfig, ranks, loaded, sets, device, store: RunStore, run_id: str) -> EvalResult:
    """A rank other than 0: generate its share of the batches (``loaded``: the model, None: load it), then
    read the evaluation rank 0 stored."""
    from analysis.llm.models import load_model, place

    if ranks.receive()[0] == "compute":
        loaded = loaded if loaded is not None else load_model(config.model)
        place(loaded.model, device)
        _generate_all(config, loaded, sets, ranks)
        message = ranks.receive()
        if message[0] == "stop":
            raise EvalCancelled(message[1], run_id)
    return load_evaluation(store, run_id)


def _generate_records(config: EvalConfig, ctx: TaskContext, loaded, sets, device, ranks) -> list[dict]:
    """The model placed on ``device``; greedy completions as records with keyword refusal flags (utility
    answers with ``correct``)."""
    from analysis.llm.models import place

    harmful = sets[0]
    place(loaded.model, device)  # a model dispatched by accelerate (device_map) stays where it is
    examples, scored = _generation_prompts(config, sets)
    completions, answers = _generate_all(config, loaded, sets, ranks, ctx)
    records = []
    for i, (ex, completion) in enumerate(zip(examples, completions)):
        records.append({"set": "harmful" if i < len(harmful) else "benign", "id": ex.id, "category": ex.category,
                        "prompt": ex.prompt, "completion": completion,
                        **refusal_flags(completion, config.primary_keywords), "judge_score": None})
    for (ex, (kind, gold)), completion in zip(scored, answers):
        records.append({"set": "utility", "id": ex.id, "category": ex.category, "prompt": ex.prompt,
                        "completion": completion, **refusal_flags(completion, config.primary_keywords),
                        "judge_score": None, "answer_kind": kind, "gold": list(gold),
                        "correct": answer_correct(kind, gold, completion)})
    return records


def _compute(config: EvalConfig, ctx: TaskContext, loaded, sets, key: dict, run_id: str, records: list[dict],
             device, start: float, checkpoint=None) -> EvalResult:
    """NLLs, guard and judge of the generated ``records`` on the model's device; nothing stored in the store
    but ``checkpoint(records, nll, seconds)``, called before the first judge call."""
    harmful, benign, utility = sets
    model, tokenizer = loaded.model, loaded.tokenizer
    cancel = lambda: ctx.cancelled  # noqa: E731
    system = lambda messages: with_system(messages, config.system_prompt)  # noqa: E731
    responses = harmful_response_kind(config, harmful)
    plan = stage_plan(config, sets)

    def stage(name: str) -> None:
        ctx.report(plan[name]["low"], f"{plan[name]['label']}: {plan[name]['count']} samples")

    stage("refusal_nll")
    refusals = [system(ex.messages) for ex in harmful] if responses == "refusal" else []
    nll = {"refusal": response_nll(model, tokenizer, refusals, config.max_length, config.nll_batch_size, cancel)}
    stage("affirmative_nll")
    targets = [ex.response if responses == "affirmative" else affirmative_target(ex.prompt, config.affirmative_template)
               for ex in harmful]
    nll["affirmative"] = affirmative_nll(model, tokenizer, [system(ex.context) for ex in harmful], targets,
                                         config.max_length, config.nll_batch_size, cancel)
    stage("utility_nll")
    nll["utility"] = response_nll(model, tokenizer, [system(ex.messages) for ex in utility], config.max_length,
                                  config.nll_batch_size, cancel)
    if config.guard is not None:
        _label_with_guard(config, ctx, loaded, [r for r in records if r["set"] == "harmful"], cancel, device)
    if checkpoint is not None and config.judge is not None:  # nothing generated is lost if the judge fails
        checkpoint(records, nll, time.perf_counter() - start)
    return _judged(config, ctx, _model_info(loaded), sets, key, run_id, records, nll, start)


def _model_info(loaded) -> dict:
    return {"source": loaded.source, "name": loaded.name, "identity": loaded.identity}


def _judged(config: EvalConfig, ctx: TaskContext, model_info: dict, sets, key: dict, run_id: str,
            records: list[dict], nll: dict, start: float) -> EvalResult:
    """The judge's scores of the harmful ``records`` (``judge_score``, and ``judge_error``: None or why there
    is no score), then the :class:`EvalResult`; nothing stored."""
    harmful, _, utility = sets
    if config.judge is not None:
        harmful_records = [r for r in records if r["set"] == "harmful"]
        results = judge_results([(r["prompt"], r["completion"]) for r in harmful_records], config.judge,
                                progress=_span(ctx, 0.95, 1.0, "judge: "), cancel=lambda: ctx.cancelled)
        for record, (score, error) in zip(harmful_records, results):
            record["judge_score"], record["judge_error"] = score, error
    ctx.check_cancel("evaluation cancelled", run_id)
    ctx.report(1.0 if config.judge is None and config.guard is None else 0.99, "metrics: rates, intervals")
    return EvalResult(
        model=dict(model_info), config=key, run_id=run_id, records=records, nll=nll,
        nll_ids={"harmful": [ex.id for ex in harmful], "utility": [ex.id for ex in utility]},
        metrics=summarise(records, nll, config.primary_keywords, config.judge.rubric if config.judge else "qi"),
        seconds=time.perf_counter() - start, created=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _retry_judge(config: EvalConfig, ctx: TaskContext, store: RunStore, stored: EvalResult) -> EvalResult:
    """A stored evaluation whose judge failed on some prompts: ask the judge again for those only (nothing is
    generated again), store the completed run in place and return it."""
    failed = [r for r in stored.records if r["set"] == "harmful" and r.get("judge_error")]
    ctx.report(0.95, f"judge: retrying the {len(failed)} prompts it did not score (generations reused)")
    check_judge_reachable(config.judge)
    start = time.perf_counter()
    results = judge_results([(r["prompt"], r["completion"]) for r in failed], config.judge,
                            progress=_span(ctx, 0.95, 1.0, "judge (retry): "), cancel=lambda: ctx.cancelled)
    ctx.check_cancel("evaluation cancelled", stored.run_id)
    for record, (score, error) in zip(failed, results):
        record["judge_score"], record["judge_error"] = score, error
    result = dataclasses.replace(
        stored, metrics=summarise(stored.records, stored.nll, config.primary_keywords, config.judge.rubric),
        seconds=stored.seconds + time.perf_counter() - start, cached=False,
        messages=[f"re-judged {len(failed)} prompts of a stored evaluation; {sum(e is not None for _, e in results)} "
                  "still failed"])
    ctx.report(1.0, "storing: records, NLLs, metrics")
    # the generations stay on disk while the run is replaced: a crash here resumes at the judge next time
    _write_partial(store, stored.run_id, stored.config, stored.model, stored.records, stored.nll, stored.seconds)
    store.delete(stored.run_id)
    save_evaluation(store, result, _versions())
    _partial_path(store, stored.run_id).unlink(missing_ok=True)
    result.folder = store.path(stored.run_id)
    ctx.report(1.0, "evaluation done")
    return result


def _partial_path(store: RunStore, run_id: str):
    return store.root / "_partial" / f"{run_id}.json"


def _write_partial(store: RunStore, run_id: str, key: dict, model_info: dict, records: list[dict], nll: dict,
                   seconds: float) -> None:
    """Generations, keyword flags and NLLs of a run whose judge has yet to score it (written before the first
    judge call; the next evaluation of the same task resumes at the judge)."""
    from analysis.core.store import finite_or_none

    path = _partial_path(store, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, finite_or_none({"key": key, "model": model_info, "records": records, "seconds": seconds,
                                            "nll": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in nll.items()}}))


def _read_partial(store: RunStore, run_id: str, key: dict) -> dict | None:
    """The partial run of :func:`_write_partial` when its key is the task's (else None)."""
    import json

    path = _partial_path(store, run_id)
    try:
        partial = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if partial.get("key") != json.loads(json.dumps(key)):
        return None
    partial["nll"] = {k: [np.nan if v is None else v for v in values] for k, values in partial["nll"].items()}
    return partial


def _label_with_guard(config: EvalConfig, ctx: TaskContext, loaded, records: list[dict], cancel, device) -> None:
    """Guard labels (``guard_label`` safe/unsafe/None, ``guard_categories``) of the harmful records, in place."""
    from analysis.llm.models import load_model, model_identity, place

    if model_identity(config.guard.model) == loaded.identity:
        guard = loaded
    else:
        ctx.report(0.94, f"loading the guard model {config.guard.model.source}")
        guard = load_model(config.guard.model)
        place(guard.model, device)
    ctx.report(0.95, "guard classifier")
    labels = guard_labels(guard, [(r["prompt"], r["completion"]) for r in records], config.guard,
                          config.batch_size, cancel=cancel)
    for record, (label, categories) in zip(records, labels):
        record["guard_label"], record["guard_categories"] = label, list(categories)


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


# --------------------------------------------------------------------------------------------------
# CLI: python -m analysis evaluate


def tasks_from_options(args: argparse.Namespace) -> list[EvalConfig]:
    """One task per ``--model`` (default: the embedded default model), all with the same settings."""
    from analysis.core.options import options_to_task

    sources = getattr(args, "model.source", None) or [EvalConfig().model.source]
    return [options_to_task(EvalConfig, argparse.Namespace(**{**vars(args), "model.source": source}))
            for source in sources]


def run(args: argparse.Namespace) -> int:
    from analysis.core.cli import load_task, run_task
    from analysis.core.distributed import leader_process

    try:
        tasks = [load_task(args.config, EvalConfig)] if args.config else tasks_from_options(args)
        run_ids = [task.run_id() for task in tasks]
    except InputError as error:
        print(f"error: {error}")
        return 2
    if getattr(args, "estimate", False):
        from analysis.core.tasks import format_seconds
        from analysis.safety.estimate import estimate_evaluation

        if args.threads:
            torch.set_num_threads(args.threads)
        for task in tasks:
            try:
                estimate = estimate_evaluation(task, device=resolve_device(args.device))
            except InputError as error:
                print(f"error: {error}")
                return 2
            speed = estimate["speed"]
            stages = ", ".join(f"{name} {format_seconds(seconds)}" for name, seconds in estimate["stages"].items())
            print(f"{task.model.source}: at most about {format_seconds(estimate['total'])} ({stages}); measured "
                  f"{speed['tokens_per_second']:.0f} new tokens/s at batch {speed['batch']} on {estimate['device']}")
        return 0
    if getattr(args, "job", None):
        if len(tasks) != 1:
            print("error: a job runs one evaluation task (one model)")
            return 2
        return run_task(tasks[0], args, lambda summary: None)
    store = evals_store()
    summaries: list[dict] = []
    speaks = leader_process()  # torchrun: the other ranks help generate and end quietly
    for task, run_id in zip(tasks, run_ids):
        if args.no_cache and speaks:
            store.delete(run_id)
        try:
            code = run_task(task, args, summaries.append)
        except InputError as error:  # e.g. a judge that cannot be reached: the user fixes it, no traceback
            print(f"error: {error}")
            return 2
        if code:
            return code
        if not speaks:
            continue
        summary = summaries[-1]
        model = summary["model"]
        how = "stored result reused" if summary["cached"] else f"{summary['seconds']:.0f} s"
        print(f"{model['name']} ({model['identity']}): {how} -> run {summary['run_id']} ({summary['folder']})")
        for message in summary["messages"]:
            print(f"  note: {message}")
    if not speaks:
        return 0
    results = [load_evaluation(store, summary["run_id"]) for summary in summaries]
    print(format_report(results, examples=args.examples))
    return 0
