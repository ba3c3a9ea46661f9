"""The defence grid's numbers as tables and verdicts in words, without figures: one row per tier x defence
with rates pooled over prompts x seeds ("k/n = x% [Wilson 95%]"), the export with every metric's n and interval,
and the paired tests (exact McNemar over (prompt, seed) pairs). Used by the Defence lab page (through
:mod:`analysis.views.defences`) and by ``python -m analysis defences``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.lab.defences import ROLES, role_of, variant
from analysis.lab.grid import METRICS

__all__ = ["RATES", "cells", "grid_export", "grid_paired_verdicts", "grid_table", "pooled_records", "seed_of"]

RATES = ("asr", "over_refusal", "utility_accuracy")


def cells(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(tier, defence, its rows: one per seed) in the grid's order."""
    return [(tier, defence, part) for (tier, defence), part in frame.groupby(["tier", "defence"], sort=False)]


def seed_of(row: Mapping) -> Any:
    seed = row.get("seed")
    return 0 if seed is None or (isinstance(seed, float) and not np.isfinite(seed)) else int(seed)


def pooled_records(rows: Sequence[dict], evaluations: Mapping[str, Any]) -> dict[tuple[str, str], list[dict]]:
    """{(tier, defence): evaluation records of all its seeds}, each record's id prefixed with its seed
    (``"1:h17"``), so that a defence and plain fine-tuning pair up prompt by prompt *and* seed by seed. A cell
    without training (the aligned model) has one evaluation; it is repeated for every seed of its tier, since
    each seed's fine-tuned model is compared with the same starting model. Cells without a stored evaluation
    are left out."""
    frame = pd.DataFrame(list(rows))
    out: dict[tuple[str, str], list[dict]] = {}
    if frame.empty:
        return out
    tier_seeds = {tier: sorted({seed_of(row) for row in part.to_dict("records")})
                  for tier, part in frame.groupby("tier", sort=False)}
    for tier, defence, part in cells(frame):
        cell_rows = part.to_dict("records")
        seeds = [seed_of(row) for row in cell_rows]
        if len(cell_rows) == 1 and not variant(defence).trains:
            seeds = tier_seeds[tier]
            cell_rows = cell_rows * len(seeds)
        records = []
        for row, seed in zip(cell_rows, seeds):
            evaluation = evaluations.get(row.get("eval_run"))
            if evaluation is None:
                records = []
                break
            records += [{**record, "id": f"{seed}:{record.get('id')}"} for record in evaluation.records]
        if records:
            out[(tier, defence)] = records
    return out


def grid_table(rows: Sequence[dict], evaluations: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Readable table, one row per tier x defence: the metrics under their labels (with units), the seeds and
    the fine-tuning time. Several seeds: the mean of the seeds (rates: pooled over prompts x seeds) and the
    per-seed values; a mean (NLL) over several seeds carries a Student-t interval over the seeds
    (:func:`analysis.core.stats.across_seeds`: the seed-to-seed spread, not the prompts). With the cells'
    ``evaluations`` ({eval run id: EvalResult}), rates read "k/n = x% [Wilson 95%]" (n = prompts x seeds) and an
    NLL of one seed "mean [bootstrap 95%] (n)"."""
    from analysis.core.stats import across_seeds, format_rate
    from analysis.safety.results import interval_of, mean_text

    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    out = []
    for tier, defence, part in cells(frame):
        cell = part.to_dict("records")
        row: dict[str, Any] = {"tier": tier, "defence": defence,
                               "seeds": ", ".join(str(seed_of(r)) for r in cell)}
        found = [evaluations.get(r.get("eval_run")) for r in cell] if evaluations else []
        for column, (key, _) in METRICS.items():
            values = [r.get(column) for r in cell if r.get(column) is not None and np.isfinite(r.get(column))]
            mean = float(np.mean(values)) if values else None
            row[column] = mean
            if found and all(e is not None and e.metrics.get(key) is not None for e in found):
                if column in RATES:
                    intervals = [interval_of(e.metrics, key) for e in found]
                    if all(i.get("k") is not None for i in intervals):
                        row[column] = format_rate(sum(i["k"] for i in intervals), sum(i["n"] for i in intervals))
                elif len(found) == 1:
                    row[column] = mean_text(found[0].metrics, key)
            if len(values) > 1 and column not in RATES:  # a mean over seeds: Student t over the seeds
                spread = across_seeds(values)
                row[column] = (f"{spread['mean']:.3f} [{spread['low']:.3f}, {spread['high']:.3f}] "
                               f"(t over {spread['n']} seeds)")
            if len(values) > 1:
                shown = [f"{v:.0%}" if column in RATES else f"{v:.2f}" for v in values]
                row[column] = f"{row[column] if isinstance(row[column], str) else format(mean, '.3f')} " \
                              f"(seeds: {', '.join(shown)})"
        seconds = [r.get("train_seconds") for r in cell if r.get("train_seconds") is not None]
        row["train_seconds"] = float(np.mean(seconds)) if seconds else None
        out.append(row)
    table = pd.DataFrame(out)
    columns = {"tier": "attack tier", "defence": "defence", **{key: label for key, (_, label) in METRICS.items()},
               "seeds": "seeds", "train_seconds": "fine-tuning (s, mean)"}
    return table[[c for c in columns if c in table]].rename(columns=columns)


def grid_export(rows: Sequence[dict], evaluations: Mapping[str, Any]) -> pd.DataFrame:
    """The grid's rows (one per tier x defence x seed) for download, each metric with its n and 95% interval
    from the cell's stored evaluation (``<metric>_n``, ``<metric>_low``, ``<metric>_high``; rates also
    ``<metric>_k``)."""
    from analysis.safety.results import interval_of

    out = []
    for row in rows:
        row = dict(row)
        evaluation = evaluations.get(row.get("eval_run"))
        if evaluation is not None:
            for column, (key, _) in METRICS.items():
                if evaluation.metrics.get(key) is None:
                    continue
                interval = interval_of(evaluation.metrics, key) if column in RATES else \
                    (evaluation.metrics.get("intervals") or {}).get(key, {})
                for part in ("k", "n", "low", "high"):
                    if part in interval:
                        row[f"{column}_{part}"] = interval[part]
        out.append(row)
    return pd.DataFrame(out)


def grid_paired_verdicts(rows: Sequence[dict], evaluations: Mapping[str, Any], keywords: str = "qi") -> list[str]:
    """Per tier, paired verdicts on the same held-out prompts (exact McNemar on ASR, over-refusal and utility
    accuracy; Newcombe 95% intervals): the attack (roles from the defence registry) against the aligned model,
    and every defence against the attack. With several seeds the pairs are (prompt, seed): each seed's
    defended model against the same seed's attacked model (the aligned model repeated per seed); the test
    treats the pairs as independent. A defence is called better than the attack only when its test says so
    (p < 0.05); the interval shows what the prompts cannot rule out."""
    from analysis.safety.compare import compare_records, paired_verdict

    pooled = pooled_records(rows, evaluations)
    lines = []
    for tier in dict.fromkeys(tier for tier, _ in pooled):
        by_role = {role: [d for (t, d) in pooled if t == tier and role_of(d) == role] for role in ROLES}
        pairs = [(base, attack) for base in by_role["baseline"] for attack in by_role["attack"]]
        pairs += [(attack, defence) for attack in by_role["attack"] for defence in by_role["defence"]]
        for first, second in pairs:
            compared = compare_records(pooled[(tier, first)], pooled[(tier, second)], keywords)
            texts = [paired_verdict(result) for result in compared.values() if result.n]
            if texts:
                seeds = len({record["id"].split(":", 1)[0] for record in pooled[(tier, second)]})
                pairs_text = f" (pairs: prompt x {seeds} seeds)" if seeds > 1 else ""
                lines.append(f"**{tier}**, {second} vs {first}{pairs_text}: " + "; ".join(texts) + ".")
    return lines
