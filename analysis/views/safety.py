"""Tables and figures of safety evaluations and fine-tuning runs, for the pages and exports.

Inputs are results (``evaluate.EvalResult``, ``finetune.FinetuneResults`` or their history frames), outputs
are pandas DataFrames and plotly figures built with :mod:`analysis.views.figures`. Rates (ASR, over-refusal)
are fractions in [0, 1], shown as percentages; NLLs are in nats per response token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.views import figures

KEYWORD_NAMES = {"qi": "Qi et al. keywords (case-sensitive)", "arditi": "Arditi et al. keywords (case-insensitive)"}

# history column -> (figure title, y-axis title, y range or None)
FINETUNE_METRICS: dict[str, tuple[str, str, tuple[float, float] | None]] = {
    "asr": ("Attack success rate", "ASR (harmful prompts answered)", (0, 1)),
    "refusal_nll": ("Refusal NLL, held-out harmful prompts", "NLL (nats/token; lower = refuses)", None),
    "affirmative_nll": ("Affirmative-target NLL, harmful prompts", "NLL (nats/token; lower = complies)", None),
    "utility_nll": ("Utility NLL, held-out benign answers", "NLL (nats/token; lower = more useful)", None),
    "cos_mean": ("Conflict: cos(G_safety, G_fine-tune)", "cosine, mean over layers", None),
    "train_loss": ("Training loss", "loss (nats/token)", None),
    "spf_removed_total": ("Share of the update SPF removed", "||removed|| / ||G||", (0, 1)),
    "weight_distance": ("Distance from the starting weights", "||θ − θ₀||₂", None),
    "over_refusal": ("Over-refusal, benign-sensitive prompts", "share of benign prompts refused", (0, 1)),
}
#: colours of the two arms of a comparison (``lab.config.METHODS``: the attack as is, then SPF, drawn dashed)
ARM_COLORS = (figures.OKABE_ITO["vermillion"], figures.OKABE_ITO["blue"])


# --- evaluations ------------------------------------------------------------------------------------


def eval_summary(results: Mapping[str, Any]) -> pd.DataFrame:
    """One row per evaluated model (``results``: label -> EvalResult): rates and mean NLLs."""
    rows = []
    for label, result in results.items():
        metrics = result.metrics
        rows.append({
            "model": label, "harmful prompts": metrics["n_harmful"], "benign prompts": metrics["n_benign"],
            "ASR (Qi)": metrics["asr_qi"], "ASR (Arditi)": metrics["asr_arditi"],
            "over-refusal (Qi)": metrics["over_refusal_qi"], "over-refusal (Arditi)": metrics["over_refusal_arditi"],
            "refusal NLL": metrics.get("refusal_nll"), "affirmative NLL": metrics.get("affirmative_nll"),
            "utility accuracy": metrics.get("utility_accuracy"), "utility NLL": metrics.get("utility_nll"),
            "judge mean score": metrics.get("judge_mean_score"), "StrongREJECT score": metrics.get("strongreject_score"),
            "guard unsafe rate": metrics.get("guard_unsafe_rate"),
            "seconds": result.seconds,
        })
    return pd.DataFrame(rows)


#: The evaluation summary as two narrow tables (one wide table is cut off on a laptop screen).
EVAL_TABLES = {
    "rates": ["model", "harmful prompts", "benign prompts", "ASR (Qi)", "ASR (Arditi)", "over-refusal (Qi)",
              "over-refusal (Arditi)"],
    "likelihoods": ["model", "utility accuracy", "utility NLL", "refusal NLL", "affirmative NLL", "judge mean score",
                    "StrongREJECT score", "guard unsafe rate", "seconds"],
}


def eval_tables(results: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """:func:`eval_summary` split into {"rates": counts and rates, "likelihoods": NLLs (nats per response
    token), judge score and seconds}; columns that are empty for every model (e.g. no judge) are left out."""
    summary = eval_summary(results)
    out = {}
    for name, columns in EVAL_TABLES.items():
        frame = summary[[c for c in columns if c in summary]]
        out[name] = frame[[c for c in frame if c == "model" or frame[c].notna().any()]]
    return out


def category_rates(results: Mapping[str, Any], keywords: str = "qi", which: str = "harmful") -> pd.DataFrame:
    """Long table: category, model, n, rate (ASR for ``which="harmful"``, over-refusal for "benign")."""
    column = f"{'asr' if which == 'harmful' else 'over_refusal'}_{keywords}"
    columns = ["category", "model", "n", "rate"]
    frames = [result.category_table(which).rename(columns={column: "rate"}).assign(model=label)[columns]
              for label, result in results.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def category_asr_figure(results: Mapping[str, Any], keywords: str = "qi") -> go.Figure:
    """Grouped bars: ASR per HEx-PHI category, one bar per model."""
    frame = category_rates(results, keywords)
    figure = figures.category_bar_figure(
        frame, "category", "rate", "Attack success rate per HEx-PHI category", "ASR (harmful prompts answered)",
        series="model", number_format=".0%" if len(results) <= 2 else None,
        subtitle=f"greedy completions, refusal = {KEYWORD_NAMES[keywords]}")
    figure.update_yaxes(range=[0, 1.1], tickformat=".0%")
    figure.update_xaxes(tickangle=-30)
    figure.update_layout(legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
                         margin=dict(t=110))
    return figure


def completions_table(result: Any, which: str = "harmful") -> pd.DataFrame:
    """The generated completions of one evaluation with both refusal verdicts."""
    frame = result.records_frame()
    frame = frame[frame["set"] == which] if "set" in frame else frame
    columns = ["id", "category", "prompt", "completion"]
    columns += ["gold", "correct"] if which == "utility" else ["refused_qi", "refused_arditi"]
    return frame[[c for c in columns if c in frame]].reset_index(drop=True)


# --- fine-tuning -------------------------------------------------------------------------------------


def _arm_label(results: Any) -> str:
    """Legend label of a stored run: its defence's label and settings (``Defence.arm_label``), or the method
    name when that defence is not registered (any more)."""
    from analysis.lab.defences import UnknownDefence, get

    config = results.config
    try:
        return get(config["method"]).arm_label(config)
    except UnknownDefence:
        return str(config["method"])


def _comparison_arm(label: str) -> int | None:
    """Index in ``lab.config.METHODS`` of the comparison arm whose defence label starts ``label``, else None."""
    from analysis.lab.config import METHODS
    from analysis.lab.defences import get

    return next((index for index, method in enumerate(METHODS) if label.startswith(get(method).label)), None)


def finetune_curve_figure(runs: Mapping[str, pd.DataFrame], metric: str, subtitle: str = "") -> go.Figure:
    """One line per arm (``runs``: legend label -> history frame with ``step`` and ``metric``) over steps."""
    title, y_title, y_range = FINETUNE_METRICS[metric]
    figure = figures.new_figure(title, "optimizer step", y_title, subtitle)
    drawn = 0
    for index, (label, history) in enumerate(runs.items()):
        if metric not in history or "step" not in history:
            continue
        points = history[["step", metric]].dropna()
        if points.empty:
            continue
        arm = _comparison_arm(label)
        color = ARM_COLORS[arm] if arm is not None else figures.COLORWAY[(index + 2) % len(figures.COLORWAY)]
        dashed = arm == len(ARM_COLORS) - 1  # the defended arm: dashed, visible where it lies on the plain curve
        figure.add_trace(go.Scatter(x=points["step"], y=points[metric], name=label, mode="lines+markers",
                                    line=dict(color=color, width=2.5, dash="dash" if dashed else "solid"),
                                    marker=dict(size=8, symbol="diamond" if dashed else "circle")))
        drawn += 1
    if not drawn:
        return figures.empty_figure(title, "not measured yet")
    last_step = max(float(history["step"].max()) for history in runs.values() if "step" in history and len(history))
    pad = max(0.3, 0.03 * last_step)  # every chart spans all steps, even one measured only at a few
    figure.update_xaxes(range=[-pad, last_step + pad], dtick=1 if last_step <= 12 else None)
    if y_range is not None:
        figure.update_yaxes(range=[y_range[0] - 0.02, y_range[1] + 0.02])
    if metric in ("asr", "over_refusal", "spf_removed_total"):
        figure.update_yaxes(tickformat=".0%")
    if metric == "cos_mean":
        figure.add_hline(y=0, line=dict(color=figures.BASELINE_COLOR, dash="dash", width=1))
    figure.update_layout(legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
                         margin=dict(t=110))
    return figure


def finetune_histories(runs: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """Legend label -> history frame, for ``runs``: any label -> FinetuneResults (labels made unique)."""
    out: dict[str, pd.DataFrame] = {}
    for results in runs.values():
        label = _arm_label(results)
        if label in out:
            label = f"{label} · {results.run_id}"
        out[label] = results.history
    return out


def finetune_figures(runs: Mapping[str, Any], metrics: tuple[str, ...] = tuple(FINETUNE_METRICS)) -> dict[str, go.Figure]:
    """Every curve figure (name -> figure) of the given runs, for the page and the export."""
    histories = finetune_histories(runs)
    first = next(iter(runs.values()), None)
    subtitle = f"{first.config.get('preset')} on {first.manifest.get('model', {}).get('name', '')}" if first else ""
    return {metric: finetune_curve_figure(histories, metric, subtitle) for metric in metrics}


def finetune_category_table(runs: Mapping[str, Any]) -> pd.DataFrame:
    """Per HEx-PHI category: initial ASR and each arm's final ASR (Qi keywords)."""
    merged: pd.DataFrame | None = None
    for results in runs.values():
        table = results.category_table("harmful")
        if table.empty:
            continue
        table = table.rename(columns={"final": f"final ASR · {_arm_label(results)}", "initial": "initial ASR"})
        if merged is None:
            merged = table
        else:
            merged = merged.merge(table.drop(columns=["n", "initial ASR"], errors="ignore"), on="category", how="outer")
    return merged if merged is not None else pd.DataFrame(columns=["category"])


def finetune_category_figure(runs: Mapping[str, Any]) -> go.Figure:
    """Grouped bars per category: initial ASR and each arm's final ASR."""
    table = finetune_category_table(runs)
    value_columns = [c for c in table.columns if "ASR" in c]
    long = table.melt(id_vars=["category"], value_vars=value_columns, var_name="model", value_name="rate")
    long["model"] = long["model"].str.replace("final ASR · ", "after ", regex=False).str.replace(
        "initial ASR", "before fine-tuning", regex=False)
    figure = figures.category_bar_figure(long, "category", "rate", "ASR per HEx-PHI category, before and after",
                                         "ASR (harmful prompts answered)", series="model", number_format=None)
    figure.update_yaxes(range=[0, 1.1], tickformat=".0%")
    figure.update_xaxes(tickangle=-30)
    figure.update_layout(legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
                         margin=dict(t=90))
    return figure


def finetune_verdict(table: pd.DataFrame, tolerance_asr: float = 0.10, tolerance_utility: float = 0.10) -> str | None:
    """One sentence from ``finetune.comparison_table`` rows of a plain and an SPF arm: did SPF keep the model
    safe (final ASR within ``tolerance_asr`` of the initial) at a utility NLL within ``tolerance_utility``
    (relative) of plain fine-tuning's? None without both arms finished."""
    from analysis.lab.config import METHODS

    arms = {row["method"]: row for _, row in table.iterrows()}
    if not set(METHODS) <= set(arms):
        return None
    plain, spf = (arms[method] for method in METHODS)
    values = [plain["asr_final"], spf["asr_final"], spf["asr_initial"], plain["utility_nll_final"], spf["utility_nll_final"]]
    if any(v is None or not np.isfinite(v) for v in values):
        return None
    kept = spf["asr_final"] - spf["asr_initial"] <= tolerance_asr
    utility_gap = spf["utility_nll_final"] / plain["utility_nll_final"] - 1
    return (f"ASR {spf['asr_initial']:.0%} before; after plain fine-tuning {plain['asr_final']:.0%}, after SPF "
            f"{spf['asr_final']:.0%} — SPF {'kept' if kept else 'did not keep'} the model within "
            f"{tolerance_asr:.0%} of its starting ASR. Utility NLL: plain {plain['utility_nll_final']:.3f}, SPF "
            f"{spf['utility_nll_final']:.3f} nats/token ({utility_gap:+.1%}"
            f"{', within' if abs(utility_gap) <= tolerance_utility else ', outside'} {tolerance_utility:.0%}).")
