"""Figures, cost and model warnings of the defence x attack grid (:mod:`analysis.lab.grid`); its tables and
paired verdicts come from :mod:`analysis.lab.grid_report` (re-exported here for the page), which the command
line prints too.

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

from analysis.core.tasks import format_seconds
from analysis.lab.defences import ROLES, get, role_of, variant
from analysis.lab.grid import METRICS
from analysis.lab.grid_report import RATES, grid_export, grid_paired_verdicts, grid_table, pooled_records  # noqa: F401
from analysis.lab.grid_report import cells as _cells
from analysis.views import figures


def grid_cost(task: Any, stored_rows: Sequence[dict], train_seconds: Sequence[float] = (),
              eval_seconds: Sequence[float] = ()) -> dict:
    """What a grid (:class:`analysis.lab.grid.DefenceGridTask`) still has to compute and how long that takes on
    this machine: {"cells", "todo", "runs", "low_seconds", "high_seconds"}. A cell is stored when its row is in
    ``stored_rows``; a fine-tuning run is counted once however many cells share it (a post-hoc defence shares its
    attack's run) and not at all when a stored cell already has it. ``train_seconds`` / ``eval_seconds``: measured
    durations here (stored runs and evaluations); the total spans their fastest to slowest (None when nothing
    has been measured yet: no number is made up)."""
    from analysis.lab.grid import run_key

    stored = {(row["tier"], row["defence"], row.get("seed", task.seed)) for row in stored_rows}
    cells = task.cells()
    todo = [cell for cell in cells if cell not in stored]
    keys = {cell: run_key(task.finetune_config(*cell)) for cell in cells if variant(cell[1]).trains}
    runs = {keys[cell] for cell in todo if cell in keys} - {keys[cell] for cell in cells if cell in keys
                                                             and cell not in todo}
    out = {"cells": len(cells), "todo": len(todo), "runs": len(runs), "low_seconds": None, "high_seconds": None}
    if todo and (train_seconds or not runs) and eval_seconds:
        low_train, high_train = (min(train_seconds), max(train_seconds)) if train_seconds else (0.0, 0.0)
        out["low_seconds"] = len(runs) * low_train + len(todo) * min(eval_seconds)
        out["high_seconds"] = len(runs) * high_train + len(todo) * max(eval_seconds)
    return out


def grid_cost_text(cost: Mapping[str, Any]) -> str:
    """One sentence from :func:`grid_cost`: the cells, what is left and the total time measured here."""
    if not cost["todo"]:
        return f"{cost['cells']} cells, all stored: nothing to compute."
    text = (f"{cost['cells']} cells, {cost['todo']} still to compute: {cost['runs']} fine-tuning runs and "
            f"{cost['todo']} evaluations (stored runs and evaluations are reused)")
    if cost["low_seconds"] is None:
        return text + "; the time is stated once a run and an evaluation have finished on this machine."
    return (text + f"; about {format_seconds(cost['low_seconds'])} to {format_seconds(cost['high_seconds'])} in total, from "
            "the runs and evaluations measured on this machine.")


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
