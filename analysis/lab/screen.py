"""Which of my fine-tuning examples will break safety? Per-example screening scores, as a task.

:class:`ScreenTask` (``kind = "screen"``, ``python -m analysis screen --data FILE --model default-aligned``)
scores every example of a fine-tuning dataset against the aligned model. g_i is the example's gradient of the
response-token mean CE over the selected linear modules (one parameter vector); every score is exact, from the
per-sample factors (:mod:`analysis.engine.screening`), summed over the modules; the per-module values are kept.

Anchors: ``n_anchors`` harmful prompts (default: the ``analysis`` split of the shipped ``safety`` set), each
answered twice: with a refusal (G_refusal = mean gradient of these conversations) and with a compliant answer
(G_compliance; He et al.'s "harmful examples"). ``anchor_responses`` says which of the two the anchor file's own
responses are; the other one is made: a compliant answer is the affirmative target "Sure, here is how to do that"
(:func:`analysis.safety.nll.affirmative_target`, non-actionable), a refusal is :data:`REFUSAL`. So both
gradients come from the *same* prompts (He et al. 2024: ``harmful_prefix`` gives compliance anchors).

Scores (columns of the ranked table; "risky" says which end is the risky one):

* ``gradient_matching`` = cos(g_i, G_compliance) - cos(g_i, G_refusal) (He et al. 2024, "What's in your safe
  data?"): high = the example's gradient looks like harmful compliance and unlike refusal. Risky: high.
* ``cos_refusal`` / ``dot_refusal`` = cos / <g_i, G_refusal>: a descent step on example i changes the refusal
  loss by about -lr <g_i, G_refusal>, so a negative value raises it (conflict with safety). Risky: low.
* ``safety_share`` = sum_m ||U_k^T G_i V_k||^2 / ||g_i||^2: the share of the example's gradient energy inside the
  two-sided top-k safety subspace (U_k, V_k of G_refusal per module); random directions give ~k^2/(d_out d_in).
* ``representation`` = cos(h_i, h_harmful): the example's mean final hidden state (real tokens) against the mean
  of the compliance anchors' (the cheap baseline He et al. compare with). Risky: high.
* ``loss`` (nats/token) and ``tokens`` of each example.

Stored in ``cache_dir()/"screen"/<run_id>`` (:class:`~analysis.core.store.RunStore`): ``scores.safetensors``
(per-module arrays ``module/<dot/refusal|dot/compliance|norm2|energy>`` (n, n_modules), the same for the anchors
under ``anchor_compliance/...`` and ``anchor_refusal/...``, reference norms ``reference_norm2/<ref>`` (n_modules,),
``basis_k`` (n_modules,) the safety-basis size actually kept), ``rows.json`` (one row per
example with its text, the input's own JSON row and the scores), ``anchors.json``, ``summary.json``. Batches are
checkpointed: a cancelled run resumes where it stopped. Examples are scored in batches of similar length
(less padding; the scores do not depend on the batching).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from analysis.core.config import ConfigError, ModelConfig, cache_dir, config_hash, to_jsonable
from analysis.core.store import RunStore, finite_or_none
from analysis.core.tasks import Cancelled, TaskContext, register_task

__all__ = ["ANCHOR_RESPONSES", "REFUSAL", "SCORES", "SUBSETS", "ScreenCancelled", "ScreenResults", "ScreenTask",
           "batches_by_length", "load_screen", "print_screening", "screen", "screen_store", "select_subset",
           "stored_screens"]

FORMAT_VERSION = 1
ANCHOR_RESPONSES = ("refusal", "compliance")
REFERENCES = ("refusal", "compliance")
#: the refusal given to compliance anchors (``anchor_responses="compliance"``)
REFUSAL = "I'm sorry, but I can't help with that."
#: score column -> (label, which end is risky: "high" or "low")
SCORES = {
    "gradient_matching": ("gradient matching: cos(g, G_compliance) − cos(g, G_refusal)", "high"),
    "cos_refusal": ("cos(g, G_refusal)", "low"),
    "safety_share": ("energy share in the top-k safety subspace", "high"),
    "representation": ("representation: cos(h, h_harmful)", "high"),
}
ANCHOR_SETS = ("anchor_compliance", "anchor_refusal")
TEXT_CHARS = 2000


def screen_store(root: str | Path | None = None) -> RunStore:
    return RunStore(Path(root) if root is not None else cache_dir() / "screen")


def _dataset_reference(value: str) -> str:
    """A path that exists is stored absolute (the run does not depend on the working directory)."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


@register_task
@dataclasses.dataclass(frozen=True)
class ScreenTask:
    """Score every example of ``data`` against ``model`` (module docstring)."""

    kind: ClassVar[str] = "screen"

    data: str = dataclasses.field(default="utility", metadata={
        "help": "the fine-tuning data: a shipped name (utility, benign_sensitive, ...) or a file (Alpaca, Dolly, "
                "chat messages JSONL, our prompt/response JSONL, JSON, CSV)"})
    data_split: str | None = dataclasses.field(default=None, metadata={"help": "only this split of the data",
                                                                       "flag": "--split"})
    n_examples: int | None = dataclasses.field(default=None, metadata={
        "help": "score a seeded subsample of this many examples (None: all)", "flag": "--n", "minimum": 1})
    model: ModelConfig = dataclasses.field(default=ModelConfig(source="default-aligned"), metadata={
        "help": "the aligned model the data would fine-tune"})
    anchors: str = dataclasses.field(default="safety", metadata={
        "help": "harmful prompts of the anchors: a shipped name or a file"})
    anchors_split: str | None = dataclasses.field(default="analysis", metadata={
        "help": "split of the anchors (a file without this split is used whole)"})
    anchor_responses: str = dataclasses.field(default="refusal", metadata={
        "help": "what the anchor file's responses are; the other answer is made", "choices": ANCHOR_RESPONSES})
    n_anchors: int = dataclasses.field(default=32, metadata={"help": "harmful prompts for the anchor gradients"})
    layers: str = dataclasses.field(default="all", metadata={"help": "layers of the scored modules, e.g. '0-3,7'"})
    kinds: str = dataclasses.field(default="all", metadata={"help": "module kinds, e.g. 'q,v,down'"})
    k: int = dataclasses.field(default=8, metadata={"help": "size of the safety subspace per module"})
    max_length: int = dataclasses.field(default=256, metadata={"help": "tokens per example (longer: truncated)"})
    batch_size: int = dataclasses.field(default=8, metadata={
        "help": "examples per forward + backward (memory only; not in the run id)", "run_id": False})
    seed: int = dataclasses.field(default=0, metadata={"help": "subsamples of the data and the anchors"})

    @staticmethod
    def add_extra_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--top", type=int, default=10, help="print the K riskiest examples (default: 10)")

    @staticmethod
    def print_result(summary: Mapping[str, Any], args: argparse.Namespace | None = None) -> None:
        print_screening(summary, getattr(args, "top", 10))

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", ModelConfig.coerce(self.model))
        for name in ("data", "anchors"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} is empty: give a shipped dataset name or a file")
            object.__setattr__(self, name, _dataset_reference(value))
        if self.anchor_responses not in ANCHOR_RESPONSES:
            raise ConfigError(f"anchor_responses {self.anchor_responses!r} is not one of {', '.join(ANCHOR_RESPONSES)}")
        for name, low in (("n_anchors", 1), ("k", 1), ("max_length", 16), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.n_examples is not None and (isinstance(self.n_examples, bool) or not isinstance(self.n_examples, int)
                                            or self.n_examples < 1):
            raise ConfigError(f"n_examples must be an integer >= 1 or None (all), got {self.n_examples!r}")

    # -- data ------------------------------------------------------------------------------------
    def dataset(self):
        """The examples to score (``analysis.llm.data.Dataset``); DataError / ConfigError name the problem."""
        from analysis.llm.data import load_any

        dataset = load_any(self.data)
        if self.data_split:
            dataset = dataset.split(self.data_split)
        if dataset.prompts_only:
            raise ConfigError(f"data {self.data!r} has no responses: a gradient needs the answer the model would "
                              "be fine-tuned on")
        if self.n_examples is not None and self.n_examples < len(dataset):
            dataset = dataset.take(self.n_examples, seed=self.seed)
        return dataset

    def anchor_conversations(self) -> tuple[list[list[dict]], list[list[dict]], Any]:
        """(compliance conversations, refusal conversations, the anchor Dataset): the same prompts twice."""
        from analysis.llm.data import load_any
        from analysis.safety.nll import affirmative_target

        anchors = load_any(self.anchors, require_response=False)
        if self.anchors_split and self.anchors_split in anchors.splits():  # a file without that split: all of it
            anchors = anchors.split(self.anchors_split)
        anchors = anchors.take(min(self.n_anchors, len(anchors)), seed=self.seed)
        compliance, refusal = [], []
        for ex in anchors:
            context = list(ex.context)
            own = [*context, {"role": "assistant", "content": ex.response}] if ex.has_response else None
            made_compliance = [*context, {"role": "assistant", "content": affirmative_target(ex.prompt)}]
            made_refusal = [*context, {"role": "assistant", "content": REFUSAL}]
            if self.anchor_responses == "refusal":
                refusal.append(own or made_refusal)
                compliance.append(made_compliance)
            else:
                compliance.append(own or made_compliance)
                refusal.append(made_refusal)
        return compliance, refusal, anchors

    def key(self) -> dict:
        """What the run id hashes: settings (not ``batch_size``), the model's identity, the examples' and
        anchors' fingerprints, the format version."""
        from analysis.llm.models import model_identity

        settings = {f.name: to_jsonable(getattr(self, f.name), placement=False) for f in dataclasses.fields(self)
                    if f.metadata.get("run_id", True)}
        _, _, anchors = self.anchor_conversations()
        return {"format": FORMAT_VERSION, "settings": settings, "model": model_identity(self.model),
                "data": self.dataset().fingerprint(), "anchors": anchors.fingerprint()}

    def run_id(self) -> str:
        """``screen-<hash>``; cheap: reads the data files, never the model weights."""
        return f"screen-{config_hash(self.key(), 14)}"

    def execute(self, ctx: TaskContext) -> dict:
        return screen(self, ctx)


class ScreenCancelled(Cancelled):
    """Screening was cancelled; the scored batches are kept and the same task resumes."""


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


class ScreenResults:
    """A stored screening: ``rows`` (pandas, one row per example, file order), ``anchors`` (pandas),
    ``summary`` (dict), ``arrays`` (numpy, keys in the module docstring), ``modules`` (list of dicts)."""

    def __init__(self, folder: str | Path, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else json.loads((self.folder / "manifest.json").read_text())
        self.run_id = self.manifest["run_id"]

    @property
    def rows(self):
        import pandas as pd

        return pd.DataFrame(json.loads((self.folder / "rows.json").read_text()))

    @property
    def anchors(self):
        import pandas as pd

        return pd.DataFrame(json.loads((self.folder / "anchors.json").read_text()))

    @property
    def summary(self) -> dict:
        return json.loads((self.folder / "summary.json").read_text())

    @property
    def modules(self) -> list[dict]:
        return self.manifest["modules"]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.folder / "scores.safetensors"))


def load_screen(task_or_run: ScreenTask | str, root: str | Path | None = None) -> ScreenResults | None:
    """The stored screening of a task (or run id); None if not computed yet or damaged."""
    store = screen_store(root)
    run_id = task_or_run.run_id() if isinstance(task_or_run, ScreenTask) else task_or_run
    if store.status(run_id) != "complete":
        return None
    return ScreenResults(store.path(run_id), store.manifest(run_id))


def stored_screens(root: str | Path | None = None) -> list[ScreenResults]:
    """Finished screenings, newest first."""
    store = screen_store(root)
    if not store.root.is_dir():
        return []
    done = [run_id for run_id in store.run_ids() if store.status(run_id) == "complete"]
    results = [ScreenResults(store.path(r), store.manifest(r)) for r in done]
    return sorted(results, key=lambda r: r.manifest.get("created", ""), reverse=True)


# --------------------------------------------------------------------------------------------------
# the computation
# --------------------------------------------------------------------------------------------------


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (stable sort by length, then consecutive)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _tokenized(tokenizer, conversations, indices, max_length, device):
    from analysis.llm.formatting import tokenize_batch

    batch = tokenize_batch(tokenizer, [conversations[i] for i in indices], max_length)
    return dataclasses.replace(batch, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                               labels=batch.labels.to(device), position_ids=batch.position_ids.to(device))


def screen(task: ScreenTask, ctx: TaskContext | None = None, *, root: str | Path | None = None, model=None,
           force: bool = False) -> dict:
    """Score (or resume, or reuse) the screening of ``task``; returns the JSON-able summary with "run_id".
    ``model``: an already loaded ``LoadedModel`` of ``task.model`` (tests); ``root``: another store."""
    import torch

    from analysis.engine.collect import numpy_single_threaded
    from analysis.engine.screening import ReferenceSums, Scorer, representation_cosine, safety_basis, stream_batch
    from analysis.llm.anatomy import SelectionError, find_linear_modules, select_modules
    from analysis.llm.data import DataError
    from analysis.llm.formats import source_rows
    from analysis.llm.formatting import tokenize_conversation
    from analysis.llm.models import load_model

    ctx = ctx if ctx is not None else TaskContext()
    try:
        dataset = task.dataset()
        compliance, refusal, anchors = task.anchor_conversations()
    except DataError as error:
        raise ConfigError(f"data: {error}") from None
    store = screen_store(root)
    run_id = task.run_id()
    status = store.status(run_id)
    if status == "complete" and not force:
        ctx.report(1.0, "reused a stored screening")
        return dict(ScreenResults(store.path(run_id), store.manifest(run_id)).summary, cached=True)
    if status in ("corrupted",) or (force and status == "complete"):
        store.delete(run_id)
    start = time.perf_counter()
    ctx.report(0.0, f"loading the model {task.model.source}")
    loaded = model if model is not None else load_model(task.model)
    device = torch.device(ctx.device)
    net = loaded.model
    was_training = net.training
    net.eval()
    requires = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    home = next(net.parameters()).device
    net.to(device)
    try:
        try:
            modules = select_modules(find_linear_modules(net), task.layers, task.kinds, None)
        except SelectionError as error:
            raise ConfigError(f"module selection: {error}") from None
        examples = [list(ex.messages) for ex in dataset]
        raw = source_rows(dataset) or dataset.to_records()
        lengths = [len(tokenize_conversation(loaded.tokenizer, c, task.max_length)[0]) for c in examples]
        plan = batches_by_length(lengths, task.batch_size)
        manifest = {"kind": task.kind, "config": task.key(), "model": {"source": loaded.source, "name": loaded.name,
                                                                        "identity": loaded.identity},
                    "modules": [dataclasses.asdict(m) for m in modules], "data_source": dataset.source,
                    "n_examples": len(dataset), "n_batches": len(plan)}
        with store.open_run(run_id, manifest) as writer, numpy_single_threaded():
            def cancel_check(done: str) -> None:
                if ctx.cancelled:
                    raise ScreenCancelled(f"screening cancelled ({done}); the same task resumes", run_id)

            # 1. anchors: the two mean gradients, the safety basis, the harmful representation
            t0 = time.perf_counter()
            sums, hidden = {}, {}
            for step, (name, conversations) in enumerate((("compliance", compliance), ("refusal", refusal))):
                sums[name] = ReferenceSums(len(conversations))
                states = []
                for indices in batches_by_length([0] * len(conversations), task.batch_size):
                    cancel_check("anchors")
                    ctx.report(0.01 + 0.02 * step + 0.02 * len(states) * task.batch_size / len(conversations),
                               f"{name} gradient of {len(conversations)} harmful prompts "
                               f"({len(states) * task.batch_size}/{len(conversations)})")
                    batch = _tokenized(loaded.tokenizer, conversations, indices, task.max_length, device)
                    states.append(stream_batch(net, batch, modules, sums[name].consume).hidden)
                hidden[name] = np.concatenate(states)
            ctx.report(0.05, f"top-{task.k} safety subspaces of {len(modules)} modules")
            references = {name: sums[name].gradients for name in REFERENCES}
            basis = {m.name: safety_basis(references["refusal"][m.name], task.k) for m in modules}
            reference_norm2 = {name: np.array([float(references[name][m.name].double().pow(2).sum()) for m in modules])
                               for name in REFERENCES}
            harmful = hidden["compliance"].mean(0)
            scorer = Scorer(modules, references, basis)
            anchor_seconds = time.perf_counter() - t0

            # 2. every example, then the anchors themselves (their scores mark the histograms)
            jobs = [("pool", b, indices) for b, indices in enumerate(plan)]
            anchor_sets = {"anchor_compliance": compliance, "anchor_refusal": refusal}
            for name, conversations in anchor_sets.items():
                jobs += [(name, b, indices) for b, indices in enumerate(batches_by_length([0] * len(conversations),
                                                                               task.batch_size))]
            t1 = time.perf_counter()
            scored_tokens = 0
            pool_seconds = 0.0
            for index, (which, _, indices) in enumerate(jobs):
                cancel_check(f"{index} of {len(jobs)} batches scored")
                if writer.has_batch(index):
                    continue
                conversations = examples if which == "pool" else anchor_sets[which]
                tb = time.perf_counter()
                batch = _tokenized(loaded.tokenizer, conversations, indices, task.max_length, device)
                scorer.start(len(indices))
                streamed = stream_batch(net, batch, modules, scorer.consume)
                values = scorer.finish().values
                if which == "pool":
                    pool_seconds += time.perf_counter() - tb
                    scored_tokens += int(batch.attention_mask.sum())
                arrays = {f"module/{key}": value for key, value in values.items()}
                arrays.update(index=np.array(indices, dtype=np.int64), loss=streamed.losses,
                              representation=representation_cosine(streamed.hidden, harmful),
                              tokens=streamed.tokens.astype(np.int64),
                              response_tokens=batch.response_token_counts().cpu().numpy().astype(np.int64))
                writer.save_batch(index, arrays)
                done = sum(1 for w, _, _ in jobs[:index + 1] if w == "pool")
                ctx.report(0.05 + 0.9 * (index + 1) / len(jobs),
                           f"scored {min(done * task.batch_size, len(examples))}/{len(examples)} examples"
                           if which == "pool" else f"scoring the anchors ({which})",
                           {"done": min(done * task.batch_size, len(examples)), "total": len(examples)})
            score_seconds = time.perf_counter() - t1

            # 3. assemble in file order, combine over the modules, write
            ctx.report(0.97, "writing the scores")
            from safetensors.numpy import load_file

            gathered: dict[str, dict[str, np.ndarray]] = {}
            sizes = {"pool": len(examples), **{name: len(c) for name, c in anchor_sets.items()}}
            for index, (which, _, _) in enumerate(jobs):
                part = load_file(str(writer.batch_path(index)))
                target = gathered.setdefault(which, {})
                for key, value in part.items():
                    if key == "index":
                        continue
                    if key not in target:
                        target[key] = np.zeros((sizes[which], *value.shape[1:]), dtype=value.dtype)
                    target[key][part["index"]] = value
            tables = {which: score_table(values, reference_norm2) for which, values in gathered.items()}
            rows = []
            for i, ex in enumerate(dataset):
                row = {"index": i, "id": ex.id, "category": ex.category, "prompt": ex.prompt[:TEXT_CHARS],
                       "response": ex.response[:TEXT_CHARS], **{k: v[i] for k, v in tables["pool"].items()},
                       "source_row": raw[i]}
                rows.append(row)
            anchor_rows = []
            for which in ANCHOR_SETS:
                for i, ex in enumerate(anchors):
                    anchor_rows.append({"set": which, "id": ex.id, "prompt": ex.prompt[:TEXT_CHARS],
                                        **{k: v[i] for k, v in tables[which].items()}})
            arrays = {f"{'module' if which == 'pool' else which}/{key[len('module/'):]}": value
                      for which, values in gathered.items() for key, value in values.items()
                      if key.startswith("module/")}
            arrays.update({f"reference_norm2/{name}": value for name, value in reference_norm2.items()})
            arrays["basis_k"] = np.array([basis[m.name][0].shape[1] for m in modules], dtype=np.int64)
            summary = summarise(run_id, task, tables["pool"], rows, len(modules), {
                "anchors_seconds": anchor_seconds, "score_seconds": score_seconds, "pool_seconds": pool_seconds,
                "scored_tokens": scored_tokens, "total_seconds": time.perf_counter() - start})
            writer.finish({"scores.safetensors": arrays},
                          {"rows.json": finite_or_none(rows), "anchors.json": finite_or_none(anchor_rows),
                           "summary.json": finite_or_none(summary)})
    finally:
        for p, flag in zip(net.parameters(), requires):
            p.requires_grad_(flag)
        net.to(home)
        net.train(was_training)
    ctx.report(1.0, "done")
    return dict(finite_or_none(summary), cached=False)


def score_table(values: Mapping[str, np.ndarray], reference_norm2: Mapping[str, np.ndarray],
                modules: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The score columns (n,) from a set's stored arrays (``module/<key>`` (n, n_modules), ``loss``,
    ``representation``, ``tokens``): :data:`SCORES` plus ``dot_refusal``, ``cos_compliance``, ``grad_norm``,
    ``loss``, ``tokens``, summed over ``modules`` (mask or indices; None: all)."""
    from analysis.engine.screening import combine

    pick = slice(None) if modules is None else modules
    per_module = {key[len("module/"):]: value for key, value in values.items() if key.startswith("module/")}
    norms = {name: float(np.asarray(value)[pick].sum()) for name, value in reference_norm2.items()}
    whole = combine(per_module, norms, modules)
    return {"gradient_matching": whole["cos/compliance"] - whole["cos/refusal"],
            "cos_refusal": whole["cos/refusal"], "cos_compliance": whole["cos/compliance"],
            "dot_refusal": whole["dot/refusal"], "safety_share": whole["safety_share"],
            "representation": np.asarray(values["representation"], dtype=np.float64),
            "grad_norm": whole["norm"], "loss": np.asarray(values["loss"], dtype=np.float64),
            "tokens": np.asarray(values["tokens"])}


SUBSETS = ("top", "bottom", "random")


def select_subset(scores: Sequence[float], which: str, k: int, seed: int = 0, risky: str = "high") -> list[int]:
    """Positions of a k-example subset of a screened pool: ``top`` = the k riskiest by ``scores`` (``risky``:
    which end is risky; NaN counts as least risky; ties by position), ``bottom`` = the k least risky,
    ``random`` = k drawn with ``seed`` (the same for every score). Sorted by position (file order)."""
    values = np.asarray(scores, dtype=float)
    if which not in SUBSETS:
        raise ConfigError(f"subset {which!r} is not one of {', '.join(SUBSETS)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(values):
        raise ConfigError(f"subset size k must be an integer in 1..{len(values)}, got {k!r}")
    if which == "random":
        return sorted(np.random.default_rng(seed).permutation(len(values))[:k].tolist())
    riskiness = np.nan_to_num(values if risky == "high" else -values, nan=-np.inf)
    order = np.argsort(-riskiness, kind="stable")
    return sorted((order[:k] if which == "top" else order[::-1][:k]).tolist())


def spearman_matrix(table: Mapping[str, np.ndarray], columns: Sequence[str] = tuple(SCORES)) -> dict[str, dict]:
    """Spearman rank correlation between score columns (NaN rows dropped pairwise): {a: {b: rho}}."""
    from scipy.stats import spearmanr

    out: dict[str, dict] = {}
    for a in columns:
        out[a] = {}
        for b in columns:
            x, y = np.asarray(table[a], dtype=float), np.asarray(table[b], dtype=float)
            keep = np.isfinite(x) & np.isfinite(y)
            out[a][b] = float(spearmanr(x[keep], y[keep]).statistic) if keep.sum() > 2 else float("nan")
    return out


def summarise(run_id: str, task: ScreenTask, table: Mapping[str, np.ndarray], rows: Sequence[Mapping], n_modules: int,
              timings: Mapping[str, float]) -> dict:
    order = np.argsort(-np.nan_to_num(table["gradient_matching"], nan=-np.inf), kind="stable")
    top = [{"id": rows[i]["id"], "category": rows[i]["category"], "prompt": rows[i]["prompt"][:120],
            **{c: float(table[c][i]) for c in SCORES}} for i in order[:10]]
    tokens = float(timings.get("scored_tokens", 0))
    return {"run_id": run_id, "data": task.data, "model": task.model.source, "n_examples": len(rows),
            "n_modules": n_modules, "k": task.k, "n_anchors": task.n_anchors, "top": top,
            "spearman": spearman_matrix(table), "timings": dict(timings),
            "examples_per_second": len(rows) / timings["pool_seconds"] if timings.get("pool_seconds") else None,
            "tokens_per_second": tokens / timings["pool_seconds"] if timings.get("pool_seconds") else None}


# --------------------------------------------------------------------------------------------------
# command line: python -m analysis screen --data FILE --model default-aligned [--top K]
# --------------------------------------------------------------------------------------------------


def print_screening(summary: Mapping[str, Any], top: int = 10) -> None:
    """What ``screen`` prints: where the run is, the ``top`` riskiest examples and how the scores agree."""
    results = load_screen(summary["run_id"])
    print(f"{'reused' if summary.get('cached') else 'computed'}: {screen_store().path(summary['run_id'])}")
    print(f"{summary['n_examples']} examples of {summary['data']} against {summary['model']}, "
          f"{summary['n_modules']} modules, k = {summary['k']}, {summary['n_anchors']} anchor prompts")
    if results is not None:
        rows = results.rows.sort_values("gradient_matching", ascending=False).head(top)
        columns = ["id", "category", *SCORES]
        print(rows[[c for c in columns if c in rows]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    rho = summary["spearman"]
    names = list(SCORES)
    print("Spearman rank correlation: " + "; ".join(f"{a} ~ {b}: {rho[a][b]:.2f}" for i, a in enumerate(names)
                                                      for b in names[i + 1:]))
    if summary.get("examples_per_second"):
        print(f"{summary['examples_per_second']:.2f} examples/s, {summary['tokens_per_second']:.0f} tokens/s "
              "(scoring the pool)")
