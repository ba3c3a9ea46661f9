"""Why does the defence fail? The geometry of a fine-tuning attack's weight update against the safety subspaces.

:class:`WhyTask` (``kind = "why"``, ``python -m analysis why --run RUN_ID``) takes a finished fine-tuning run
(:mod:`analysis.lab.finetune`; its ``model/`` is the fine-tuned model, its config names the aligned model it
started from) and a base model (before alignment), and measures, for every selected linear module W (d_out x d_in):

* the attack's update dW = W_finetuned - W_aligned and its top-k left / right singular subspaces;
* three safety subspaces of the aligned model, top-k left / right singular vectors of
  - ``refusal``: the batch-mean gradient G_r = (1/n) sum_i G_i of the refusal CE on n harmful prompts (the
    lab's safety gradient, :meth:`analysis.lab.trainer.FinetuneTrainer.safety_gradients`, from n per-sample
    gradients so that it has rank >= k),
  - ``compliance``: the same for the CE of the affirmative target "Sure, here is ..."
    (:func:`analysis.safety.evaluate.affirmative_target`) on the same prompts,
  - ``alignment``: the alignment delta V = W_aligned - W_base (Safe LoRA's subspace);
* principal angles (degrees) and the overlap phi = mean cos^2 (``geometry.principal_angles`` /
  ``subspace_overlap``) between the update's subspace and each safety subspace, with the random baseline
  E[phi] = k / d and its 95% quantile (``geometry.random_overlap_baseline``, Haar-random k-dim subspaces of R^d);
* ``drift``: the refusal subspace of the fine-tuned model vs that of the aligned model (start vs end; the
  run's ``drift.safetensors`` has the per-refresh drift during training);
* Frobenius cosines cos(dW, G_r) and cos(dW, G_c): a descent step on the compliance CE moves along -G_c, so an
  attack that "learns to comply" has cos(dW, G_c) < 0;
* the energy of the safety gradient by response-token position (shallow alignment, Qi et al. 2024): token t of
  sample i adds d_t a_t^T to G_i, with ||d_t a_t^T||_F^2 = ||d_t||^2 ||a_t||^2 (:func:`token_energy`).
  Position j of a factor row = index of the response token its logit predicts (:func:`response_positions`:
  j = 0 is the last prompt token, whose output predicts the first response token); rows with j < 0 are prompt
  tokens (they get gradient through attention). Stored per sample, layer and position; and per module the
  share of the batch gradient carried by the first ``first_tokens`` positions: G_first = (1/n) sum_i sum_{0<=j<N}
  d a^T, reported as ||G_first|| / ||G|| and <G_first, G> / ||G||^2.

Results live in ``cache_dir()/"why"/<run_id>`` (:class:`analysis.core.store.RunStore`): ``table.json`` (one row
per module), ``summary.json`` and ``why.safetensors`` (angles and energies, keys in :class:`WhyResults`).
``run_id()`` hashes the three models' identities (no weights loaded), the prompts' fingerprint and the settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from analysis.core.config import ConfigError, ModelConfig, cache_dir, config_hash, from_jsonable
from analysis.core.options import check_bounds, identity_values, option
from analysis.core.store import ID_RULE, RunStore, finite_or_none, valid_id
from analysis.core.tasks import TaskContext, register_task

__all__ = ["PAIRS", "REFERENCES", "GradientSums", "WhyResults", "WhyTask", "compare_subspaces",
           "explain", "gradient_pass", "load_why", "response_positions", "token_energy", "top_k",
           "why_store"]

FORMAT_VERSION = 1
#: the subspaces an update is compared with, and the pairs compared: (name, subspace a, subspace b)
REFERENCES = ("refusal", "compliance", "alignment")
PAIRS = (("refusal", "update", "refusal"), ("compliance", "update", "compliance"),
         ("alignment", "update", "alignment"), ("drift", "refusal", "refusal_end"))
SIDES = ("left", "right")
BASELINE_DRAWS = 200


def why_store(root: str | Path | None = None) -> RunStore:
    return RunStore(Path(root) if root is not None else cache_dir() / "why")


# --------------------------------------------------------------------------------------------------
# pure pieces (known-answer tests in tests/test_why.py)
# --------------------------------------------------------------------------------------------------


def token_energy(D: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """(T,) ||d_t a_t^T||_F^2 = ||d_t||^2 ||a_t||^2 of factor rows D (T, d_out), A (T, d_in), float64
    (units: squared gradient, (nats per unit weight)^2)."""
    return D.double().pow(2).sum(1) * A.double().pow(2).sum(1)


def response_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, the response position j of each kept factor row (``capture.kept_positions`` order):
    j = p + 1 - r0 for row p, r0 the first labelled (response) position: the index of the response token that
    row p's logit predicts. j < 0: prompt rows. attention_mask, labels: (n, T)."""
    from analysis.engine.capture import kept_positions
    from analysis.llm.formatting import IGNORE_INDEX

    out = []
    for i, positions in enumerate(kept_positions(attention_mask, labels)):
        labelled = torch.nonzero(labels[i] != IGNORE_INDEX).flatten()
        first = int(labelled[0]) if labelled.numel() else int(positions[-1]) + 1 if positions.numel() else 0
        out.append(positions + 1 - first)
    return out


def top_k(matrix: torch.Tensor | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_k (m, k'), V_k (n, k')) of a matrix (m, n) by ``geometry.top_singular_eig`` (exact, float64);
    k' < k when the rank is lower, 0 for a zero matrix."""
    from analysis.engine.geometry import top_singular_eig

    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().to("cpu", torch.float64).numpy()
    if not np.any(matrix):
        return np.zeros((matrix.shape[0], 0)), np.zeros((matrix.shape[1], 0))
    U, _, V = top_singular_eig(matrix, k)
    return U, V


def compare_subspaces(Q_a: np.ndarray, Q_b: np.ndarray, k: int) -> dict[str, Any]:
    """Principal angles (degrees, ascending, NaN-padded to k: ``angles``), overlap phi (``overlap``) and the
    random expectation k'/d (``expected``) of two orthonormal bases (d, k_a), (d, k_b); NaNs when one is empty."""
    from analysis.engine.geometry import principal_angles, subspace_overlap

    angles = np.full(k, np.nan)
    k_min = min(Q_a.shape[1], Q_b.shape[1])
    if k_min == 0:
        return {"angles": angles, "overlap": float("nan"), "expected": float("nan"), "k": 0}
    theta = np.degrees(principal_angles(Q_a, Q_b))
    angles[:len(theta)] = theta
    return {"angles": angles, "overlap": subspace_overlap(Q_a, Q_b),
            "expected": max(Q_a.shape[1], Q_b.shape[1]) / Q_a.shape[0], "k": k_min}


# --------------------------------------------------------------------------------------------------
# one gradient pass: batch gradient, its first-token part, token energies
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class GradientSums:
    """One loss over n conversations: ``gradient`` {module: G (d_out, d_in)} = batch mean of the per-sample
    gradients; ``first`` {module: the part of G from response positions 0 <= j < first_tokens}; ``energy``
    (n, n_layers, P) per-sample token energies summed over a layer's modules by response position,
    ``prompt_energy`` (n, n_layers) of the prompt rows; ``response_tokens`` (n,); ``losses`` (n,) nats."""

    gradient: dict[str, torch.Tensor]
    first: dict[str, torch.Tensor]
    energy: np.ndarray
    prompt_energy: np.ndarray
    response_tokens: np.ndarray
    losses: np.ndarray


def gradient_pass(model, tokenizer, modules: Sequence, conversations: Sequence[Sequence[dict]], layers: Sequence[int],
                  *, first_tokens: int = 5, max_length: int = 256, batch_size: int = 4, device: str = "cpu",
                  keep_first: bool = True, check_cancel: Callable[[], None] | None = None) -> GradientSums:
    """:class:`GradientSums` of the response CE of ``conversations`` at the model's weights, from per-sample,
    per-token factors (``capture.capture_batch``, ``batch_size`` conversations at a time). ``modules``:
    ``capture.ModuleInfo`` list; ``layers``: the layer index of each energy row."""
    from analysis.engine.capture import capture_batch
    from analysis.llm.formatting import tokenize_batch

    n = len(conversations)
    if n == 0:
        raise ConfigError("no conversations for the gradient")
    row_of_layer = {layer: i for i, layer in enumerate(layers)}
    energy = np.zeros((n, len(layers), max_length))
    prompt = np.zeros((n, len(layers)))
    tokens = np.zeros(n, dtype=np.int64)
    losses = np.zeros(n)
    gradient: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    for start in range(0, n, batch_size):
        if check_cancel is not None:
            check_cancel()
        batch = tokenize_batch(tokenizer, conversations[start:start + batch_size], max_length)
        positions = response_positions(batch.attention_mask, batch.labels)
        batch = dataclasses.replace(batch, input_ids=batch.input_ids.to(device),
                                    attention_mask=batch.attention_mask.to(device), labels=batch.labels.to(device),
                                    position_ids=batch.position_ids.to(device))
        factors = capture_batch(model, batch, modules)
        j = torch.cat(positions).to(device)
        offsets = factors.row_offsets.tolist()
        losses[start:start + len(positions)] = factors.losses.double().cpu().numpy()
        tokens[start:start + len(positions)] = (batch.labels != -100).sum(1).cpu().numpy()
        early = (j >= 0) & (j < first_tokens)
        for module in modules:
            D, A = factors.output_grads.pop(module.name), factors.inputs.pop(module.name)
            e = token_energy(D, A).cpu().numpy()
            row = row_of_layer[module.layer]
            for i in range(len(positions)):
                rows = slice(offsets[i], offsets[i + 1])
                ji = positions[i].numpy()
                response = ji >= 0
                np.add.at(energy[start + i, row], np.minimum(ji[response], max_length - 1), e[rows][response])
                prompt[start + i, row] += e[rows][~response].sum()
            G = (D.T @ A) / n
            gradient[module.name] = gradient[module.name] + G if module.name in gradient else G
            if keep_first:
                F = (D[early].T @ A[early]) / n
                first[module.name] = first[module.name] + F if module.name in first else F
            del D, A
        del factors
    width = max(int(tokens.max()), 1)
    return GradientSums(gradient, first, energy[:, :, :width], prompt, tokens, losses)


# --------------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------------


@register_task
@dataclasses.dataclass(frozen=True)
class WhyTask:
    """Geometry of one fine-tuning run's update (module docstring). ``run``: the fine-tuning run id;
    ``base``: the model before alignment; ``k``: subspace size per module; ``n_prompts``: harmful prompts (with
    refusals, from the run's safety data) for the gradients; ``first_tokens``: N of the first-token share;
    ``layers`` / ``kinds``: which linear modules (``capture.select_modules`` syntax); ``batch_size``:
    conversations per forward (memory only, not hashed); ``runs_root``: the fine-tuning run store (None:
    ``cache_dir()/"finetune"``; a locator, not hashed)."""

    kind: ClassVar[str] = "why"

    run: str = option("", required=True, help="the fine-tuning run id (python -m analysis finetune --list)")
    base: ModelConfig = option(ModelConfig(source="default"), flag="--base", help="the model before alignment")
    k: int = option(8, help="subspace size per module", minimum=1, maximum=4096)
    n_prompts: int = option(16, help="harmful prompts for the gradients", minimum=1, maximum=10_000)
    first_tokens: int = option(5, minimum=1, maximum=4096,
                               help="N of the share of the gradient carried by the first N response tokens")
    layers: str = option("all", help="layers, e.g. 0-29, 0-3,7 or all")
    kinds: str = option("all", help="module kinds, e.g. q,k,v,o,gate,up,down or all")
    seed: int = option(0, help="seed of the prompt selection")
    batch_size: int = option(4, help="conversations per forward (memory only)", minimum=1, maximum=4096,
                             run_id=False)
    runs_root: str | None = option(None, cli=False, run_id=False, help="the fine-tuning run store (off: cache/finetune)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", ModelConfig.coerce(self.base, "base"))
        if not self.run:
            raise ConfigError("give the fine-tuning run to explain (run id)")
        if not valid_id(self.run):
            raise ConfigError(f"run {self.run!r} is not a fine-tuning run id: {ID_RULE}")
        for name in ("k", "n_prompts", "first_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        check_bounds(self)

    def finetune_run(self):
        """The fine-tuning run (``FinetuneResults``); ConfigError unless it is complete with a saved model."""
        from analysis.lab.results import FinetuneResults, finetune_root

        folder = finetune_root(self.runs_root) / self.run
        if not (folder / "manifest.json").is_file():
            raise ConfigError(f"no fine-tuning run {self.run!r} in {folder.parent}")
        result = FinetuneResults(folder)
        if result.status != "complete" or result.model_path is None:
            raise ConfigError(f"fine-tuning run {self.run} is {result.status} and has no saved model yet")
        return result

    def key(self) -> dict:
        from analysis.llm.models import model_identity

        result = self.finetune_run()
        values = identity_values(self)
        values["base"] = model_identity(self.base)
        return {"format": FORMAT_VERSION, **values, "finetuned": model_identity(str(result.model_path)),
                "aligned": result.manifest["model"]["identity"], "data": result.manifest.get("data")}

    def run_id(self) -> str:
        return f"{self.run}-why-{config_hash(self.key(), 10)}"

    def execute(self, ctx: TaskContext) -> dict:
        return explain(self, ctx)

    @staticmethod
    def print_result(summary: Mapping[str, Any]) -> None:
        print_explanation(summary)


class WhyResults:
    """A stored explanation: ``table`` (pandas, one row per module), ``summary`` (dict), ``arrays`` (dict of
    numpy: ``angles/<pair>/<side>`` (n_modules, k) degrees, ``energy/<set>`` (n, n_layers, P),
    ``prompt_energy/<set>`` (n, n_layers), ``response_tokens/<set>`` (n,); sets: refusal, compliance,
    refusal_end), ``layers`` (energy rows)."""

    def __init__(self, folder: str | Path, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else json.loads((self.folder / "manifest.json").read_text())
        self.run_id = self.manifest["run_id"]

    @property
    def table(self):
        import pandas as pd

        return pd.DataFrame(json.loads((self.folder / "table.json").read_text()))

    @property
    def summary(self) -> dict:
        return json.loads((self.folder / "summary.json").read_text())

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.folder / "why.safetensors"))


def load_why(task: WhyTask, root: str | Path | None = None) -> WhyResults | None:
    """The stored explanation of ``task`` (None if not computed yet or damaged)."""
    store = why_store(root)
    run_id = task.run_id()
    if store.status(run_id) != "complete":
        return None
    return WhyResults(store.path(run_id), store.manifest(run_id))


def _weights(model, modules: Sequence) -> dict[str, torch.Tensor]:
    from analysis.llm.anatomy import as_out_in

    named = dict(model.named_modules())
    return {m.name: as_out_in(named[m.name], named[m.name].weight.detach()) for m in modules}


def _bases(matrices: Mapping[str, torch.Tensor], k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: top_k(matrix, k) for name, matrix in matrices.items()}


def _share(first: torch.Tensor, whole: torch.Tensor) -> np.ndarray:
    """(||F||^2, <F, G>, ||G||^2) of the first-token part F of a gradient G, in float64."""
    f, g = first.double(), whole.double()
    return np.array([float(f.pow(2).sum()), float((f * g).sum()), float(g.pow(2).sum())])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    from analysis.engine.geometry import GeometryError, cosine

    try:
        return cosine(a.detach().cpu(), b.detach().cpu())
    except GeometryError:
        return float("nan")


def explain(task: WhyTask, ctx: TaskContext | None = None, *, root: str | Path | None = None) -> dict:
    """Compute and store the explanation (reused when stored); returns a JSON-able summary with "run_id".
    ``root``: another store for the results (tests)."""
    from analysis.engine.geometry import random_overlap_baseline
    from analysis.lab.config import FinetuneConfig
    from analysis.lab.finetune_data import load_data, seeded
    from analysis.llm.anatomy import SelectionError, find_linear_modules, select_modules
    from analysis.llm.models import load_model
    from analysis.safety.evaluate import affirmative_target

    ctx = ctx if ctx is not None else TaskContext()
    store = why_store(root)
    run_id = task.run_id()
    status = store.status(run_id)
    if status == "complete":
        ctx.report(1.0, "reused a stored explanation")
        return dict(WhyResults(store.path(run_id), store.manifest(run_id)).summary, cached=True)
    if status in ("interrupted", "corrupted"):
        store.delete(run_id)
    device = torch.device(ctx.device)
    result = task.finetune_run()
    config = from_jsonable(FinetuneConfig, result.config)
    data = load_data(config)
    order = torch.randperm(len(data.safety), generator=seeded(task.seed, "why")).tolist()[:task.n_prompts]
    refusals = [data.safety[i] for i in order]
    affirmatives = [c[:-1] + [{"role": "assistant", "content": affirmative_target(c[-2]["content"])}]
                    for c in refusals]

    def cancel_check() -> None:
        ctx.check_cancel("explanation cancelled (nothing kept; it restarts from the beginning)", run_id)

    ctx.report(0.02, f"loading the aligned model {config.model.source}")
    aligned = load_model(config.model)
    aligned.model.to(device).eval().requires_grad_(False)
    try:
        modules = select_modules(find_linear_modules(aligned.model), task.layers, task.kinds, None)
    except SelectionError as error:
        raise ConfigError(f"module selection: {error}") from None
    layers = sorted({m.layer if m.layer is not None else -1 for m in modules})
    modules = [m if m.layer is not None else dataclasses.replace(m, layer=-1) for m in modules]
    passing = dict(first_tokens=task.first_tokens, max_length=config.max_length, batch_size=task.batch_size,
                   device=device, check_cancel=cancel_check)
    ctx.report(0.05, f"refusal gradient on {len(refusals)} harmful prompts (aligned model)")
    sums = {"refusal": gradient_pass(aligned.model, aligned.tokenizer, modules, refusals, layers, **passing)}
    ctx.report(0.3, "compliance gradient (affirmative target)")
    sums["compliance"] = gradient_pass(aligned.model, aligned.tokenizer, modules, affirmatives, layers, **passing)
    cancel_check()
    ctx.report(0.5, "safety subspaces")
    bases = {name: _bases(sums[name].gradient, task.k) for name in ("refusal", "compliance")}
    rows = {m.name: {"module": m.name, "label": m.label, "layer": m.layer, "kind": m.kind, "d_out": m.d_out,
                     "d_in": m.d_in} for m in modules}
    totals: dict[str, list[float]] = {}
    for name in ("refusal", "compliance"):
        parts = np.zeros(3)
        for m in modules:
            ff, fg, gg = _share(sums[name].first[m.name], sums[name].gradient[m.name])
            parts += (ff, fg, gg)
            rows[m.name][f"first_norm_share_{name}"] = math.sqrt(ff / gg) if gg > 0 else float("nan")
            rows[m.name][f"first_share_{name}"] = fg / gg if gg > 0 else float("nan")
            rows[m.name][f"gradient_norm_{name}"] = math.sqrt(gg)
        totals[name] = [math.sqrt(parts[0] / parts[2]) if parts[2] > 0 else float("nan"),
                        parts[1] / parts[2] if parts[2] > 0 else float("nan")]
        sums[name].first.clear()

    ctx.report(0.55, "loading the fine-tuned model")
    finetuned = load_model(ModelConfig(source=str(result.model_path), dtype=config.model.dtype))
    finetuned.model.to(device).eval().requires_grad_(False)
    W_aligned, W_finetuned = _weights(aligned.model, modules), _weights(finetuned.model, modules)
    update = {}
    for m in modules:
        dW = (W_finetuned[m.name] - W_aligned[m.name]).float()
        update[m.name] = top_k(dW, task.k)
        norm, reference = float(dW.norm()), float(W_aligned[m.name].float().norm())
        rows[m.name].update(update_norm=norm, update_relative=norm / reference if reference > 0 else float("nan"),
                            cos_update_refusal=_cosine(dW, sums["refusal"].gradient[m.name]),
                            cos_update_compliance=_cosine(dW, sums["compliance"].gradient[m.name]))
    bases["update"] = update
    for name in ("refusal", "compliance"):
        sums[name].gradient.clear()
    cancel_check()
    ctx.report(0.65, f"loading the base model {task.base.source} (alignment delta)")
    base = load_model(task.base)
    W_base = _weights(base.model, modules)
    if any(W_base[m.name].shape != W_aligned[m.name].shape for m in modules):
        raise ConfigError(f"the base model {task.base.source} does not have the aligned model's module shapes")
    bases["alignment"] = {m.name: top_k((W_aligned[m.name] - W_base[m.name].to(device)).float(), task.k)
                          for m in modules}
    del base, W_base, W_aligned, aligned
    ctx.report(0.7, "refusal gradient of the fine-tuned model")
    sums["refusal_end"] = gradient_pass(finetuned.model, finetuned.tokenizer, modules, refusals, layers,
                                        keep_first=False, **passing)
    bases["refusal_end"] = _bases(sums["refusal_end"].gradient, task.k)
    sums["refusal_end"].gradient.clear()
    del finetuned, W_finetuned

    ctx.report(0.9, "principal angles")
    baselines: dict[tuple[int, int], dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for pair, a, b in PAIRS:
        for side_index, side in enumerate(SIDES):
            angles = []
            for m in modules:
                compared = compare_subspaces(bases[a][m.name][side_index], bases[b][m.name][side_index], task.k)
                d = m.d_out if side == "left" else m.d_in
                if compared["k"] and (d, compared["k"]) not in baselines:
                    baselines[(d, compared["k"])] = random_overlap_baseline(d, compared["k"], BASELINE_DRAWS, task.seed)
                band = baselines.get((d, compared["k"]), {})
                rows[m.name].update({f"overlap_{pair}_{side}": compared["overlap"],
                                     f"expected_{pair}_{side}": compared["expected"],
                                     f"q95_{pair}_{side}": band.get("q95", float("nan")),
                                     f"min_angle_{pair}_{side}": float(compared["angles"][0]),
                                     f"mean_angle_{pair}_{side}": float(np.nanmean(compared["angles"]))
                                     if compared["k"] else float("nan")})
                angles.append(compared["angles"])
            arrays[f"angles/{pair}/{side}"] = np.array(angles, dtype=np.float32)
    for name, s in sums.items():
        arrays[f"energy/{name}"] = s.energy.astype(np.float64)
        arrays[f"prompt_energy/{name}"] = s.prompt_energy
        arrays[f"response_tokens/{name}"] = s.response_tokens
        arrays[f"losses/{name}"] = s.losses
    arrays["layers"] = np.array(layers, dtype=np.int64)
    table = [finite_or_none(rows[m.name]) for m in modules]
    summary = {"run_id": run_id, "finetune_run": task.run, "preset": config.preset, "method": config.method,
               "k": task.k, "n_prompts": len(refusals), "first_tokens": task.first_tokens, "n_modules": len(modules),
               "first_norm_share": {name: totals[name][0] for name in totals},
               "first_share": {name: totals[name][1] for name in totals},
               "energy_first_share": {name: energy_first_share(s.energy, s.prompt_energy, task.first_tokens)
                                      for name, s in sums.items()},
               "mean_overlap": {f"{pair}_{side}": _nanmean([r[f"overlap_{pair}_{side}"] for r in rows.values()])
                                for pair, _, _ in PAIRS for side in SIDES},
               "mean_expected": {side: _nanmean([r[f"expected_refusal_{side}"] for r in rows.values()])
                                 for side in SIDES},
               "cached": False}
    summary = finite_or_none(summary)
    manifest = {"kind": task.kind, "config": task.key(), "finetune_run": task.run}
    with store.open_run(run_id, manifest) as writer:
        writer.finish({"why.safetensors": arrays}, {"table.json": table, "summary.json": summary})
    ctx.report(1.0, "done")
    return summary


def _nanmean(values: Sequence[float | None]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def energy_first_share(energy: np.ndarray, prompt_energy: np.ndarray, first_tokens: int) -> float:
    """Mean over samples of the share of a sample's token energy (prompt rows included) at response positions
    j < ``first_tokens``; energy (n, n_layers, P), prompt_energy (n, n_layers)."""
    per_sample = energy.sum(1)
    total = per_sample.sum(1) + prompt_energy.sum(1)
    shares = per_sample[:, :first_tokens].sum(1) / np.where(total > 0, total, np.nan)
    return float(np.nanmean(shares)) if np.isfinite(shares).any() else float("nan")


# --------------------------------------------------------------------------------------------------
# command line: python -m analysis why --run RUN_ID
# --------------------------------------------------------------------------------------------------


def print_explanation(summary: Mapping[str, Any]) -> None:
    """What ``why`` prints: overlaps against the random baseline and the token-energy shares."""

    def number(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    print(f"{'reused' if summary.get('cached') else 'computed'}: {why_store().path(summary['run_id'])}")
    print(f"run {summary['finetune_run']} ({summary['preset']} / {summary['method']}), k={summary['k']}, "
          f"{summary['n_modules']} modules, {summary['n_prompts']} prompts")
    expected = summary["mean_expected"]
    print(f"random baseline k/d: left {number(expected['left'])}, right {number(expected['right'])}")
    for pair, _, _ in PAIRS:
        overlap = summary["mean_overlap"]
        print(f"  overlap {pair:10s} left {number(overlap[f'{pair}_left'])}  right {number(overlap[f'{pair}_right'])}")
    n = summary["first_tokens"]
    for name, share in summary["energy_first_share"].items():
        print(f"  token energy in the first {n} response positions ({name}): {number(share, '.1%')}")
    for name, share in summary["first_norm_share"].items():
        print(f"  ||G_first{n}|| / ||G|| ({name}): {number(share)}; <G_first{n}, G>/||G||^2: "
              f"{number(summary['first_share'][name])}")
