"""Defence x attack grid: every defence against every Qi et al. (2023) tier on one aligned model, one table.

:class:`DefenceGridTask` (``kind = "defences"``) runs, for each tier (a fine-tuning preset: ``harmful-10``,
``aoa``, ``benign``) and each defence (a grid variant of the defence registry, :mod:`analysis.lab.defences`:
:data:`DEFENCES`, read from it), the variant's fine-tuning run (reusing a stored one: the Fine-tune page and
``python -m analysis finetune`` store the same runs; cells with the same run share it), applies its post-hoc
defence if it has one, and evaluates the resulting model with one
:class:`~analysis.safety.evaluate.EvalConfig` for all cells (reused when stored). The runs are the presets with
:data:`RUN_OVERRIDES` (their own evaluations cut to a minimum), then the variant's settings. The variants
(each declared in its defence's file; :data:`DEFAULT_DEFENCES` are the default grid):

- ``none``: the aligned model itself, before any fine-tuning (the baseline of each tier; AOA's is evaluated
  with the AOA persona as system prompt, like every AOA cell);
- ``plain``: plain supervised fine-tuning (the preset as is);
- ``spf``: SPF, lab defaults (conflict mode, refusal-CE safety signal, k = 8, R = 10);
- ``pcgrad``: PCGrad-style whole-gradient projection against the refusal-CE gradient;
- ``orth``: SPF "orthogonal" (CERT-Lab's orth: remove all of U_k U_k^T G, not only its conflicting part);
- ``same``: SPF "same" (CERT-Lab's same: keep only U_k U_k^T G, the control arm that moves only along the
  safety directions);
- ``safe-lora``: post-hoc Safe LoRA-style projection of the ``plain`` run's delta onto the alignment-delta
  subspace (V = W_aligned - W_base; :class:`~analysis.lab.safe_lora.SafeLoraTask`);
- ``spf-compliance`` / ``spf-kl`` (not in the default grid): SPF with another safety signal, the gradient of
  the affirmative target's CE (ascent on compliance) or of the KL to the aligned model on harmful prompts,
  instead of the refusal CE.

Columns of :attr:`GridResult.table`: ASR (keyword, Qi's list, on ``n_harmful`` held-out harmful prompts),
over-refusal (on ``n_benign`` benign-but-sensitive prompts), utility accuracy (exact-match on the utility
eval answers that have a gold answer), and the NLLs (nats/token) of refusals, the affirmative target and
the utility answers; plus the fine-tuning wall time. The table is stored under ``cache_dir()/"defences"/<run
id>/`` (``table.json``, ``table.csv``). Command line: ``python -m analysis defences [--tiers ...]``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from analysis.core.config import ConfigError, ModelConfig, cache_dir, config_hash, to_jsonable
from analysis.core.options import check_bounds, option, without_legacy_defaults
from analysis.core.store import RunStore
from analysis.core.tasks import TaskContext, register_task
from analysis.lab.defences import UnknownDefence, get, variant, variants

# DEFENCES and DEFAULT_DEFENCES come from __getattr__ (read from the registry)
__all__ = ["DEFAULT_DEFENCES", "DEFENCES", "METRICS", "RUN_OVERRIDES", "TIERS",  # noqa: F822
           "DefenceGridTask", "GridResult", "defences_root", "load_grid", "stored_grids",
           "stored_rows"]

FORMAT_VERSION = 1
TIERS = ("harmful-10", "aoa", "benign")


def __getattr__(name: str) -> Any:
    """``DEFENCES``: the grid's defences (variant names of the registry, in grid order); ``DEFAULT_DEFENCES``:
    those of the default grid. Read from the registry when asked for."""
    from analysis.lab import defences

    if name == "DEFENCES":
        return tuple(defences.variants())
    if name == "DEFAULT_DEFENCES":
        return _default_defences()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_defences() -> tuple[str, ...]:
    from analysis.lab import defences

    return tuple(name for name, item in defences.variants().items() if item.default)


#: FinetuneConfig settings of every grid run: the grid evaluates each final model itself, so the runs' own
#: live NLLs (only at the start and end) and generation evaluations (1 harmful prompt per category, 4 benign)
#: are cut to a minimum. ``DefenceGridTask.overrides`` go on top.
RUN_OVERRIDES = {"eval_every": 1000, "gen_harmful_per_category": 1, "n_gen_benign": 4}
#: table column -> (evaluation metric key, label with unit)
METRICS = {
    "asr": ("asr", "ASR (keyword)"),
    "over_refusal": ("over_refusal", "over-refusal"),
    "utility_accuracy": ("utility_accuracy", "utility accuracy (exact match)"),
    "utility_nll": ("utility_nll", "utility NLL (nats/token)"),
    "refusal_nll": ("refusal_nll", "refusal NLL (nats/token)"),
    "affirmative_nll": ("affirmative_nll", "affirmative NLL (nats/token)"),
}


def defences_root() -> Path:
    return cache_dir() / "defences"


def _tier_names() -> tuple[str, ...]:
    from analysis.lab.config import PRESETS

    return tuple(PRESETS)


@register_task
@dataclasses.dataclass(frozen=True)
class DefenceGridTask:
    """The grid (module docstring). ``model``: the aligned model every run starts from; ``base``: the model
    before alignment (Safe LoRA's V). Evaluation settings: ``n_harmful`` / ``n_benign`` seeded subsamples
    (None: whole split), ``max_new_tokens`` of the safety answers, ``utility_max_new_tokens`` of the scored
    utility answers. ``safe_lora_threshold`` / ``safe_lora_rank``: see SafeLoraTask. ``overrides``:
    FinetuneConfig fields applied to every tier's preset on top of :data:`RUN_OVERRIDES` (e.g.
    ``{"n_train": 6}``)."""

    kind: ClassVar[str] = "defences"

    tiers: tuple[str, ...] = option(TIERS, help="fine-tuning presets (Qi et al.'s tiers)", choices=_tier_names)
    defences: tuple[str, ...] = option(default_factory=_default_defences, choices=lambda: tuple(variants()),
                                       help="grid rows: the registered defences and their variants")
    model: ModelConfig = option(ModelConfig(source="default-aligned"), flag="--model",
                                help="the aligned model every run starts from")
    base: ModelConfig = option(ModelConfig(source="default"), flag="--base",
                               help="the model before alignment (Safe LoRA's V)")
    seed: int = option(0, help="seed of every fine-tuning run and evaluation subsample")
    seeds: tuple[int, ...] | None = option(None, legacy=True, metavar="SEED",
                                           help="several training seeds: each tier x defence x seed is a run of its "
                                                "own (stored and reused); the evaluation prompts stay those of "
                                                "--seed, so seeds are paired on them (off: --seed alone)")
    n_harmful: int | None = option(None, minimum=1,
                                   help="harmful prompts evaluated per cell, a seeded subsample (off: the whole "
                                        "held-out split, 88 prompts)")
    n_benign: int | None = option(None, minimum=1,
                                  help="benign-sensitive prompts per cell, a seeded subsample (off: the whole split)")
    max_new_tokens: int = option(32, help="new tokens per safety answer", minimum=1, maximum=1024)
    utility_max_new_tokens: int = option(64, help="new tokens per scored utility answer", minimum=1, maximum=1024)
    safe_lora_threshold: float = option(0.5, help="Safe LoRA: project a module when cos(dW, P dW) is below this")
    safe_lora_rank: int | None = option(8, help="Safe LoRA: alignment subspace size per module (off: all of V)",
                                        minimum=1)
    overrides: Mapping[str, Any] | None = None  # FinetuneConfig fields for every run (the web app, tests)

    @staticmethod
    def print_result(result: Mapping[str, Any]) -> None:
        print_grid(result)

    def __post_init__(self) -> None:
        from analysis.lab.config import PRESETS

        object.__setattr__(self, "model", ModelConfig.coerce(self.model, "model"))
        object.__setattr__(self, "base", ModelConfig.coerce(self.base, "base"))
        object.__setattr__(self, "tiers", tuple(self.tiers))
        object.__setattr__(self, "defences", tuple(self.defences))
        if not self.tiers or not self.defences:
            raise ConfigError("choose at least one tier and one defence")
        unknown = [t for t in self.tiers if t not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown tier(s) {', '.join(unknown)}: choose from {', '.join(PRESETS)}")
        known = variants()
        unknown = [d for d in self.defences if d not in known]
        if unknown:
            raise UnknownDefence(f"unknown defence(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        if self.overrides is not None:
            object.__setattr__(self, "overrides", dict(self.overrides))
            for tier in self.tiers:
                self.finetune_config(tier)  # a bad override fails here, with the field's message
        for name in ("n_harmful", "n_benign"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be an integer >= 1 or None")
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
                    or len(set(seeds)) != len(seeds):
                raise ConfigError(f"seeds must be distinct integers >= 0, got {self.seeds!r}")
            object.__setattr__(self, "seeds", seeds)
        check_bounds(self)

    @property
    def training_seeds(self) -> tuple[int, ...]:
        """The seeds of the fine-tuning runs: ``seeds``, or ``seed`` alone."""
        return self.seeds if self.seeds is not None else (self.seed,)

    # -- the cells ---------------------------------------------------------------------------------
    def finetune_config(self, tier: str, defence: str | None = None, seed: int | None = None):
        """The FinetuneConfig of a cell's fine-tuning run: the tier's preset with :data:`RUN_OVERRIDES`, the
        task's ``overrides`` and the variant's method and settings (None: the undefended attack, the variant
        whose role is "attack"), trained with ``seed`` (None: the task's ``seed``). ConfigError for a variant
        without a fine-tuning run."""
        from analysis.lab.config import preset

        known = variants()
        item = variant(defence) if defence is not None else next(v for v in known.values() if v.role == "attack")
        if not item.trains:
            raise ConfigError(f"defence {item.name!r} has no fine-tuning run")
        values = {"model": self.model, "seed": self.seed if seed is None else seed, **RUN_OVERRIDES,
                  **(self.overrides or {})}
        for name, value in {"method": item.method, **item.settings}.items():  # the variant's settings win;
            nested = isinstance(value, Mapping) and isinstance(values.get(name), Mapping)  # e.g. spf: merged
            values[name] = {**values[name], **value} if nested else value
        return preset(tier, **values)

    def eval_config(self, model: ModelConfig, tier: str):
        """The one evaluation every cell of ``tier`` gets (the tier's evaluation system prompt)."""
        from analysis.lab.config import preset
        from analysis.safety.evaluate import EvalConfig

        return EvalConfig(model=model, seed=self.seed, n_harmful=self.n_harmful, n_benign=self.n_benign,
                          max_new_tokens=self.max_new_tokens, utility_max_new_tokens=self.utility_max_new_tokens,
                          system_prompt=preset(tier).eval_system_prompt)

    def cells(self) -> list[tuple[str, str, int]]:
        """(tier, defence, seed) of every row; a defence without training has one row per tier (seed: ``seed``)."""
        return [(tier, defence, seed) for tier in self.tiers for defence in self.defences
                for seed in (self.training_seeds if variant(defence).trains else (self.seed,))]

    def n_runs(self) -> int:
        """How many distinct fine-tuning runs the cells need (cells with the same run share it)."""
        return len({(tier, run_key(self.finetune_config(tier, defence, seed))) for tier, defence, seed
                    in self.cells() if variant(defence).trains})

    def run_id(self) -> str:
        """Hash of the settings, the two models' identities and the shipped data (no model loaded)."""
        from analysis.lab.finetune_data import load_data
        from analysis.llm.models import model_identity

        data = {tier: load_data(self.finetune_config(tier)).fingerprints for tier in self.tiers}
        return config_hash({"format": FORMAT_VERSION, "task": without_legacy_defaults(self, to_jsonable(self)),
                            "data": data,
                            "model": model_identity(self.model), "base": model_identity(self.base)})

    def execute(self, ctx: TaskContext) -> dict:
        result = run_grid(self, ctx)
        return {"run_id": result.run_id, "folder": str(result.folder), "rows": result.rows}


@dataclasses.dataclass
class GridResult:
    run_id: str
    folder: Path
    rows: list[dict]

    @property
    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def run_key(config) -> str:
    """Identity of a fine-tuning run's config within one grid (cells with equal keys share the run)."""
    return config_hash(to_jsonable(config, placement=False))


def _cell(task: DefenceGridTask, tier: str, defence: str, seed: int, runs: dict[str, Any], *, compute: bool,
          ctx: TaskContext, low: float = 0.0, high: float = 1.0,
          finetune_root: str | Path | None = None) -> dict | None:
    """One row of the table: the cell's run (trained, or only looked up when not ``compute``; ``runs``: the
    grid's runs so far by :func:`_run_key`), its post-hoc defence if any, and the evaluation of the resulting
    model. None when ``compute`` is False and something is not stored yet."""
    from analysis.lab.finetune import FinetuneResults, finetune_store, run_finetune, run_id_for
    from analysis.lab.finetune_data import load_data
    from analysis.llm.models import model_identity
    from analysis.safety.evaluate import evaluate, stored_evaluation

    middle = (low + high) / 2
    row: dict[str, Any] = {"tier": tier, "defence": defence, "seed": seed, "finetune_run": None,
                           "train_seconds": None}
    model = task.model
    item = variant(defence)
    if item.trains:
        config = task.finetune_config(tier, defence, seed)
        key = run_key(config)
        run = runs.get(key)
        if run is None and compute:
            run = run_finetune(config, ctx.sub(low, middle, f"{tier} / {config.method}"), root=finetune_root)
        elif run is None:
            store = finetune_store(finetune_root)
            run_id = run_id_for(config, model_identity(config.model), load_data(config).fingerprints)
            if store.status(run_id) != "complete":
                return None
            run = FinetuneResults(store.path(run_id), store.manifest(run_id))
        runs[key] = run
        row["finetune_run"] = run.run_id
        row["train_seconds"] = (run.manifest.get("timings") or {}).get("wall_seconds")
        model = ModelConfig(source=str(run.folder / "model"))
        if item.post_hoc is not None:
            options = {field.name: getattr(task, field.name) for field in dataclasses.fields(task)}
            defended = get(item.post_hoc).post_hoc(model, task.model, task.base, options,
                                                   ctx.sub(middle, middle, f"{tier} / {defence}"), compute)
            if defended is None:
                return None
            row.update(defended.row)
            model = defended.model
    eval_config = task.eval_config(model, tier)
    if compute:
        evaluation = evaluate(eval_config, ctx.sub(middle, high, f"{tier} / {defence} / eval"))
    else:
        evaluation = stored_evaluation(eval_config)
        if evaluation is None:
            return None
    row.update({column: evaluation.metrics.get(key) for column, (key, _) in METRICS.items()})
    row["eval_run"] = evaluation.run_id
    return row


def run_grid(task: DefenceGridTask, ctx: TaskContext | None = None, *, finetune_root: str | Path | None = None,
             root: str | Path | None = None) -> GridResult:
    """Train, defend and evaluate every cell (reusing stored runs and evaluations); store and return the table.
    ``finetune_root`` / ``root``: other run stores (tests)."""
    ctx = ctx if ctx is not None else TaskContext()
    run_id = task.run_id()
    store = RunStore(root if root is not None else defences_root())
    cells = task.cells()
    rows: list[dict] = []
    runs: dict[str, Any] = {}
    for index, (tier, defence, seed) in enumerate(cells):
        ctx.check_cancel(f"cancelled before {tier} / {defence} / seed {seed}", run_id)
        low, high = index / len(cells), (index + 1) / len(cells)
        row = _cell(task, tier, defence, seed, runs, compute=True, ctx=ctx, low=low, high=high,
                    finetune_root=finetune_root)
        rows.append(row)
        ctx.report(high, f"{tier} / {defence} / seed {seed}: ASR {row['asr']:.0%}", live={"rows": rows})
    key = {"format": FORMAT_VERSION, "task": without_legacy_defaults(task, to_jsonable(task))}
    store.delete(run_id)
    with store.open_run(run_id, {"kind": task.kind, "config": key,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) as writer:
        pd.DataFrame(rows).to_csv(writer.folder / "table.csv", index=False)
        writer.finish({}, {"table.json": rows})
    return GridResult(run_id, store.path(run_id), rows)


def stored_rows(task: DefenceGridTask, *, finetune_root: str | Path | None = None) -> list[dict]:
    """The rows of the cells whose run, defended model and evaluation are all stored already (nothing is
    trained or evaluated; cheap: no model is loaded), in the grid's order."""
    runs: dict[str, Any] = {}
    rows = [_cell(task, tier, defence, seed, runs, compute=False, ctx=TaskContext(), finetune_root=finetune_root)
            for tier, defence, seed in task.cells()]
    return [row for row in rows if row is not None]


def load_grid(folder: str | Path) -> GridResult:
    """A stored grid (its folder)."""
    import json

    folder = Path(folder)
    return GridResult(folder.name, folder, json.loads((folder / "table.json").read_text()))


def stored_grids(root: str | Path | None = None) -> list[GridResult]:
    """Finished grids, newest first."""
    store = RunStore(root if root is not None else defences_root())
    if not store.root.is_dir():
        return []
    folders = [p for p in store.root.iterdir() if p.is_dir() and store.status(p.name) == "complete"]
    return [load_grid(p) for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]


# --------------------------------------------------------------------------------------------------
# python -m analysis defences
# --------------------------------------------------------------------------------------------------


def print_grid(result: Mapping[str, Any]) -> None:
    """What ``defences`` prints: what the Defence lab page shows (one row per tier x defence, rates as
    "k/n = x% [Wilson 95%]" pooled over prompts x seeds with the per-seed values; the paired verdicts), and where
    it is stored."""
    from analysis.lab.grid_report import grid_paired_verdicts, grid_table
    from analysis.safety.results import load_evaluations

    rows = result["rows"]
    evaluations = load_evaluations(row.get("eval_run") for row in rows)
    table = grid_table(rows, evaluations)
    for _, row in table.iterrows():  # one block per cell: the texts are too wide for one table line
        print(f"{row.iloc[0]} / {row.iloc[1]}")
        for label, value in row.iloc[2:].items():
            shown = value if isinstance(value, str) else "-" if pd.isna(value) else f"{value:.1f}"
            print(f"  {label}: {shown}")
    for line in grid_paired_verdicts(rows, evaluations):
        print(line.replace("**", ""))
    print(f"stored in {result['folder']}")
