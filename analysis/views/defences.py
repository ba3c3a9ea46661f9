"""Tables and figures of the defence x attack grid (:mod:`analysis.lab.grid`).

Input: the grid's rows (one dict per tier x defence with the metrics of :data:`analysis.lab.grid.METRICS`).
Rates (ASR, over-refusal, utility accuracy) are fractions in [0, 1], shown as percentages; NLLs are in nats
per response token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.lab.grid import METRICS
from analysis.views import figures

RATES = ("asr", "over_refusal", "utility_accuracy")


#: Measured on this machine (2-core CPU, one torch thread): one fine-tuning run of a shipped preset took 242 to
#: 1377 s (the fastest and slowest preset), one cell's evaluation about 300 s.
FINETUNE_SECONDS = (242, 1377)
EVAL_SECONDS = 300
#: Defences whose cell trains no model of its own (the aligned model as is; Safe LoRA projects the plain run).
NO_TRAINING = ("none", "safe-lora")


def grid_cost(cells: Sequence[tuple[str, str]], stored: Sequence[tuple[str, str]] = ()) -> dict:
    """What a grid still has to compute and how long that takes here: {"runs", "evaluations", "low_seconds",
    "high_seconds"}. ``cells``: (tier, defence) pairs; ``stored``: cells already stored (reused, free). A Safe
    LoRA cell needs its tier's plain run, trained once if "plain" is not a cell of its own."""
    todo = [cell for cell in cells if cell not in set(stored)]
    runs = {cell for cell in todo if cell[1] not in NO_TRAINING}
    runs |= {(tier, "plain") for tier, defence in todo if defence == "safe-lora" and (tier, "plain") not in stored}
    low, high = FINETUNE_SECONDS
    return {"runs": len(runs), "evaluations": len(todo), "low_seconds": len(runs) * low + len(todo) * EVAL_SECONDS,
            "high_seconds": len(runs) * high + len(todo) * EVAL_SECONDS}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} hours" if seconds >= 5400 else f"{seconds / 60:.0f} minutes"


def grid_cost_text(cells: Sequence[tuple[str, str]], stored: Sequence[tuple[str, str]] = ()) -> str:
    """One sentence: the cells, what is left to compute and the total time it takes here, from measured numbers."""
    cost = grid_cost(cells, stored)
    if not cost["evaluations"]:
        return f"{len(cells)} cells, all stored: nothing to compute."
    low, high = FINETUNE_SECONDS
    return (f"{len(cells)} cells, {cost['evaluations']} still to compute: {cost['runs']} fine-tuning runs and "
            f"{cost['evaluations']} evaluations, about {_duration(cost['low_seconds'])} to "
            f"{_duration(cost['high_seconds'])} in total on this machine (measured: {low / 60:.0f} to "
            f"{high / 60:.0f} minutes per fine-tuning run, about {EVAL_SECONDS / 60:.0f} minutes per evaluation, on "
            "one core of a 2-core CPU). Stored runs and evaluations are reused.")


def grid_model_warnings(model: str, base: str) -> list[str]:
    """What is wrong with the grid's two models, in words: an aligned model that is not aligned, and a
    "before alignment" model equal to it (Safe LoRA's V = aligned - base is then zero)."""
    warnings = []
    if model == "default":
        warnings.append("The “aligned model” is the embedded default, which is not safety-aligned: it already "
                        "answers harmful requests, so the defences have no refusals to keep and every ASR is high "
                        "before any attack. Build the aligned variant on “Is the model safe?” and pick it here.")
    if model == base:
        warnings.append("The model before alignment is the aligned model itself: the alignment delta V = aligned − "
                        "base is zero, so Safe LoRA has no subspace to project onto and falls back to the aligned "
                        "weights in every module.")
    return warnings


def grid_table(rows: Sequence[dict]) -> pd.DataFrame:
    """Readable table: tier, defence, the metrics under their labels (with units), training seconds."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    columns = {"tier": "attack tier", "defence": "defence", **{key: label for key, (_, label) in METRICS.items()},
               "train_seconds": "fine-tuning (s)"}
    return frame[[c for c in columns if c in frame]].rename(columns=columns)


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
    """One sentence per tier: the aligned model's ASR (and over-refusal), plain fine-tuning's ASR, and which
    defences kept ASR within ``tolerance`` of the aligned model's (with their over-refusal and utility accuracy:
    a defence that holds by refusing everything shows it)."""
    frame = pd.DataFrame(list(rows))
    lines = []
    for tier, part in frame.groupby("tier", sort=False) if not frame.empty else []:
        by_defence = {row["defence"]: row for _, row in part.iterrows()}
        start = by_defence.get("none")
        if start is None or not np.isfinite(start["asr"]):
            continue
        text = f"**{tier}**: ASR {start['asr']:.0%} before fine-tuning{_over_refusal(start, ' (over-refusal {})')}"
        if "plain" in by_defence:
            text += f", {by_defence['plain']['asr']:.0%} after plain fine-tuning"
        held = [f"{name} ({row['asr']:.0%}{_over_refusal(row, ', over-refusal {}')}, utility accuracy "
                f"{row['utility_accuracy']:.0%})"
                for name, row in by_defence.items()
                if name not in ("none", "plain") and np.isfinite(row["asr"]) and row["asr"] - start["asr"] <= tolerance
                and row["utility_accuracy"] is not None and np.isfinite(row["utility_accuracy"])]
        defended = [name for name in by_defence if name not in ("none", "plain")]
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
