"""Tables and figures of the defence x attack grid (:mod:`analysis.lab.grid`).

Input: the grid's rows (one dict per tier x defence with the metrics of :data:`analysis.lab.grid.METRICS`).
Rates (ASR, over-refusal, utility accuracy) are fractions in [0, 1], shown as percentages; NLLs are in nats
per response token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.lab.defences import ROLES, get, role_of, variant
from analysis.lab.grid import METRICS
from analysis.views import figures

RATES = ("asr", "over_refusal", "utility_accuracy")


def _cells(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(tier, defence, its rows: one per seed) in the grid's order."""
    return [(tier, defence, part) for (tier, defence), part in frame.groupby(["tier", "defence"], sort=False)]


def _seed_of(row: Mapping) -> Any:
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
    tier_seeds = {tier: sorted({_seed_of(row) for row in part.to_dict("records")})
                  for tier, part in frame.groupby("tier", sort=False)}
    for tier, defence, part in _cells(frame):
        cell_rows = part.to_dict("records")
        seeds = [_seed_of(row) for row in cell_rows]
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
    per-seed values. With the cells' ``evaluations`` ({eval run id: EvalResult}), rates read
    "k/n = x% [Wilson 95%]" (n = prompts x seeds) and an NLL of one seed "mean [bootstrap 95%] (n)"."""
    from analysis.core.stats import format_rate
    from analysis.safety.results import interval_of, mean_text

    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    out = []
    for tier, defence, part in _cells(frame):
        cell = part.to_dict("records")
        row: dict[str, Any] = {"tier": tier, "defence": defence,
                               "seeds": ", ".join(str(_seed_of(r)) for r in cell)}
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


def _seed_means(rows: Sequence[dict]) -> pd.DataFrame:
    """One row per tier x defence: the metrics' means over the cell's seeds (grid order)."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    metrics = [column for column in METRICS if column in frame]
    means = [{"tier": tier, "defence": defence, "n_seeds": len(part),
              **{column: pd.to_numeric(part[column], errors="coerce").mean() for column in metrics}}
             for tier, defence, part in _cells(frame)]
    return pd.DataFrame(means)


def grid_figure(rows: Sequence[dict], metric: str) -> go.Figure:
    """Bars of one metric per attack tier, one bar per defence (in the grid's order; several seeds: their mean)."""
    label = METRICS[metric][1]
    frame = _seed_means(rows)
    if frame.empty or metric not in frame:
        return figures.empty_figure(label, "no finished cells yet")
    seeds = int(frame["n_seeds"].max())
    title = f"{label[0].upper()}{label[1:]} by attack and defence" + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
    figure = figures.category_bar_figure(frame, "tier", metric, title, label, series="defence",
                                         number_format=".0%" if metric in RATES else ".2f")
    figure.update_xaxes(title_text="attack tier (Qi et al. 2023)")
    figure.update_layout(legend_title_text="defence")
    if metric in RATES:
        figure.update_yaxes(range=[0, 1.12], tickformat=".0%")
    return figure


def grid_verdict(rows: Sequence[dict]) -> list[str]:
    """One descriptive sentence per tier (several seeds: their means): the baseline's ASR (the aligned model;
    over-refusal too), the attack's (plain fine-tuning; roles from the defence registry) and each defence's
    ASR, over-refusal and utility accuracy. No claim is made here: whether a defence holds is decided by the
    paired tests (:func:`grid_paired_verdicts`)."""
    frame = _seed_means(rows)
    lines = []
    for tier, part in frame.groupby("tier", sort=False) if not frame.empty else []:
        by_defence = {row["defence"]: row for _, row in part.iterrows()}
        by_role = {role: [name for name in by_defence if role_of(name) == role] for role in ROLES}
        start = by_defence[by_role["baseline"][0]] if by_role["baseline"] else None
        if start is None or not np.isfinite(start["asr"]):
            continue
        text = f"**{tier}**: ASR {start['asr']:.0%} before fine-tuning{_over_refusal(start, ' (over-refusal {})')}"
        for name in by_role["attack"]:
            text += f", {by_defence[name]['asr']:.0%} after {get(variant(name).method).label}"
        defended = [f"{name} {row['asr']:.0%}{_over_refusal(row, ', over-refusal {}')}"
                    + (f", utility accuracy {row['utility_accuracy']:.0%}"
                       if row.get("utility_accuracy") is not None and np.isfinite(row["utility_accuracy"]) else "")
                    for name, row in ((name, by_defence[name]) for name in by_role["defence"])
                    if np.isfinite(row["asr"])]
        text += f"; with a defence: {'; '.join(defended)}" if defended else "; no defence evaluated yet"
        seeds = int(part["n_seeds"].max())
        lines.append(text + (f" (means of {seeds} seeds)." if seeds > 1 else "."))
    return lines


def _over_refusal(row, template: str) -> str:
    value = row.get("over_refusal")
    return template.format(f"{value:.0%}") if value is not None and np.isfinite(value) else ""
