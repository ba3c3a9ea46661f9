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


def grid_table(rows: Sequence[dict], evaluations: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Readable table: tier, defence, the metrics under their labels (with units), training seconds. With the
    cells' ``evaluations`` ({eval run id: EvalResult}), rates read "k/n = x% [Wilson 95%]" and NLLs
    "mean [bootstrap 95%] (n)"."""
    from analysis.safety.results import mean_text, rate_text

    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    if evaluations:
        frame = frame.astype(object)
        for index, row in frame.iterrows():
            evaluation = evaluations.get(row.get("eval_run"))
            if evaluation is None:
                continue
            for column, (key, _) in METRICS.items():
                if column in frame and evaluation.metrics.get(key) is not None:
                    text = rate_text if column in RATES else mean_text
                    frame.at[index, column] = text(evaluation.metrics, key)
    columns = {"tier": "attack tier", "defence": "defence", **{key: label for key, (_, label) in METRICS.items()},
               "train_seconds": "fine-tuning (s)"}
    return frame[[c for c in columns if c in frame]].rename(columns=columns)


def grid_export(rows: Sequence[dict], evaluations: Mapping[str, Any]) -> pd.DataFrame:
    """The grid's rows for download, each metric with its n and 95% interval from the cell's stored
    evaluation (``<metric>_n``, ``<metric>_low``, ``<metric>_high``; rates also ``<metric>_k``)."""
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
    accuracy): plain fine-tuning against the aligned model (``none``), and every other defence against plain.
    A defence is called better than plain only when its test says so (p < 0.05); the interval shows what the
    prompts cannot rule out."""
    from analysis.safety.compare import compare_records, paired_verdict

    frame = pd.DataFrame(list(rows))
    lines = []
    for tier, part in frame.groupby("tier", sort=False) if not frame.empty else []:
        found = {row["defence"]: evaluations.get(row.get("eval_run")) for _, row in part.iterrows()}
        found = {name: evaluation for name, evaluation in found.items() if evaluation is not None}
        pairs = [("none", "plain")] if {"none", "plain"} <= set(found) else []
        pairs += [("plain", name) for name in found if name not in ("none", "plain") and "plain" in found]
        for first, second in pairs:
            compared = compare_records(found[first].records, found[second].records, keywords)
            texts = [paired_verdict(result) for result in compared.values() if result.n]
            if texts:
                lines.append(f"**{tier}**, {second} vs {first}: " + "; ".join(texts) + ".")
    return lines


def grid_figure(rows: Sequence[dict], metric: str) -> go.Figure:
    """Bars of one metric per attack tier, one bar per defence (in the grid's order)."""
    label = METRICS[metric][1]
    frame = pd.DataFrame(list(rows))
    if frame.empty or metric not in frame:
        return figures.empty_figure(label, "no finished cells yet")
    figure = figures.category_bar_figure(frame, "tier", metric, f"{label[0].upper()}{label[1:]} by attack and defence",
                                         label, series="defence", number_format=".0%" if metric in RATES else ".2f")
    figure.update_xaxes(title_text="attack tier (Qi et al. 2023)")
    figure.update_layout(legend_title_text="defence")
    if metric in RATES:
        figure.update_yaxes(range=[0, 1.12], tickformat=".0%")
    return figure


def grid_verdict(rows: Sequence[dict], tolerance: float = 0.10) -> list[str]:
    """One sentence per tier: the baseline's ASR (the aligned model; over-refusal too), the attack's (plain
    fine-tuning; roles from the defence registry), and which defences kept ASR within ``tolerance`` of the aligned model's (with their over-refusal and utility accuracy:
    a defence that holds by refusing everything shows it)."""
    frame = pd.DataFrame(list(rows))
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
        defended = by_role["defence"]
        held = [f"{name} ({row['asr']:.0%}{_over_refusal(row, ', over-refusal {}')}, utility accuracy "
                f"{row['utility_accuracy']:.0%})"
                for name, row in ((name, by_defence[name]) for name in defended)
                if np.isfinite(row["asr"]) and row["asr"] - start["asr"] <= tolerance
                and row["utility_accuracy"] is not None and np.isfinite(row["utility_accuracy"])]
        if not defended:
            text += "; no defence evaluated yet."
        elif held:
            text += f"; within {tolerance:.0%} of the start: {', '.join(held)}."
        else:
            text += f"; none of {', '.join(defended)} kept ASR within {tolerance:.0%} of the start."
        lines.append(text)
    return lines


def _over_refusal(row, template: str) -> str:
    value = row.get("over_refusal")
    return template.format(f"{value:.0%}") if value is not None and np.isfinite(value) else ""
