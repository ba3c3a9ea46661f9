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


#: summary column -> (metric key, kind): rates get count/n and a Wilson interval, means a bootstrap interval
SUMMARY_METRICS = {
    "ASR (Qi)": ("asr_qi", "rate"), "ASR (Arditi)": ("asr_arditi", "rate"),
    "over-refusal (Qi)": ("over_refusal_qi", "rate"), "over-refusal (Arditi)": ("over_refusal_arditi", "rate"),
    "refusal NLL": ("refusal_nll", "mean"), "affirmative NLL": ("affirmative_nll", "mean"),
    "utility accuracy": ("utility_accuracy", "rate"), "utility NLL": ("utility_nll", "mean"),
    "judge mean score": ("judge_mean_score", "mean"), "StrongREJECT score": ("strongreject_score", "mean"),
    "guard unsafe rate": ("guard_unsafe_rate", "rate"),
}


def eval_summary(results: Mapping[str, Any]) -> pd.DataFrame:
    """One row per evaluated model (``results``: label -> EvalResult), for exports: prompt counts, each
    metric with its n and 95% interval (``<metric> n``, ``<metric> low``, ``<metric> high``; Wilson for
    rates, bootstrap over prompts for means), judge calls that failed, and the evaluation's seconds."""
    from analysis.safety.results import interval_of

    rows = []
    for label, result in results.items():
        metrics = result.metrics
        row = {"model": label, "harmful prompts": metrics["n_harmful"], "benign prompts": metrics["n_benign"]}
        for column, (key, kind) in SUMMARY_METRICS.items():
            value = metrics.get(key)
            interval = interval_of(metrics, key) if kind == "rate" else (metrics.get("intervals") or {}).get(key, {})
            row[column] = value
            if value is not None:
                row.update({f"{column} n": interval.get("n"), f"{column} low": interval.get("low"),
                            f"{column} high": interval.get("high")})
        if metrics.get("judge_n_failed"):
            row["judge calls failed"] = metrics["judge_n_failed"]
        row["seconds"] = result.seconds
        rows.append(row)
    return pd.DataFrame(rows)


#: The evaluation summary as two narrow tables (one wide table is cut off on a laptop screen).
EVAL_TABLES = {
    "rates": ["model", "ASR (Qi)", "ASR (Arditi)", "over-refusal (Qi)", "over-refusal (Arditi)"],
    "likelihoods": ["model", "utility accuracy", "utility NLL", "refusal NLL", "affirmative NLL", "judge mean score",
                    "StrongREJECT score", "guard unsafe rate", "judge calls failed", "time"],
}


def eval_tables(results: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The evaluation summary for reading, as text cells with n and 95% interval: {"rates": ASR and
    over-refusal as "3/8 = 38% [14-69%]", "likelihoods": utility accuracy likewise, NLLs (nats per response
    token) and judge scores as "1.234 [1.100, 1.390] (n=88)", judge failures, time}; columns empty for every
    model (e.g. no judge) are left out."""
    from analysis.core.tasks import format_seconds
    from analysis.safety.results import mean_text, rate_text

    rows = []
    for label, result in results.items():
        metrics = result.metrics
        row: dict = {"model": label}
        for column, (key, kind) in SUMMARY_METRICS.items():
            if metrics.get(key) is not None:
                row[column] = rate_text(metrics, key) if kind == "rate" else mean_text(metrics, key)
        if metrics.get("judge_n_failed"):
            row["judge calls failed"] = f"{metrics['judge_n_failed']} of {metrics.get('judge_n_called', '?')}"
        row["time"] = format_seconds(result.seconds)
        rows.append(row)
    summary = pd.DataFrame(rows)
    out = {}
    for name, columns in EVAL_TABLES.items():
        frame = summary[[c for c in columns if c in summary]]
        out[name] = frame[[c for c in frame if c == "model" or frame[c].notna().any()]]
    return out


def estimate_text(estimate: Mapping[str, Any]) -> str:
    """The measured time estimate in words: total, the stages' shares, and what it rests on."""
    from analysis.core.tasks import format_seconds

    speed, total = estimate["speed"], estimate["total"]
    shares = ", ".join(f"{name.replace('_', ' ')} {seconds / total:.0%}" for name, seconds in estimate["stages"].items()
                       if total > 0 and seconds / total >= 0.01)
    return (f"at most about {format_seconds(total)} ({shares}); measured here: "
            f"{speed['tokens_per_second']:.0f} new tokens/s at batch {speed['batch']}, prompt pass "
            f"{speed['prefill_seconds']:.2f} s per batch (warm-up took {speed['warmup_seconds']:.1f} s; judge and "
            "guard not included).")


def judge_failure_notes(results: Mapping[str, Any]) -> list[str]:
    """One line per evaluation whose judge failed on some prompts: how many of how many, and the main reasons
    (those prompts score None; their generations and keyword verdicts are kept)."""
    lines = []
    for label, result in results.items():
        metrics = result.metrics
        if metrics.get("judge_n_failed"):
            reasons = "; ".join(f"{count}x {reason}" for reason, count in (metrics.get("judge_failure_reasons") or {}).items())
            lines.append(f"{label}: the judge gave no score for {metrics['judge_n_failed']} of "
                         f"{metrics.get('judge_n_called', '?')} harmful prompts ({reasons})")
    return lines


def safety_answer(label: str, result: Any) -> str:
    """One sentence answering "Is the model safe?" for one evaluation, with n and 95% intervals: how many
    held-out harmful prompts it answered (ASR, Wilson interval; the upper bound is what the data cannot rule
    out) and how many benign prompts it refused."""
    from analysis.safety.results import interval_of, rate_text

    metrics = result.metrics
    keywords = metrics.get("primary_keywords", "qi")
    asr = interval_of(metrics, f"asr_{keywords}")
    if not asr.get("n"):
        return f"{label}: no harmful prompts were evaluated."
    text = (f"{label} answered {asr['k']} of {asr['n']} held-out harmful prompts (ASR {rate_text(metrics, f'asr_{keywords}')}, "
            f"refusals by {keywords} keywords): with 95% confidence its ASR on prompts like these is at most "
            f"{asr['high']:.0%}")
    over = interval_of(metrics, f"over_refusal_{keywords}")
    if over.get("n"):
        text += f"; it refused {over['k']} of {over['n']} benign prompts (over-refusal {rate_text(metrics, f'over_refusal_{keywords}')})"
    return text + "."


def paired_model_verdicts(results: Mapping[str, Any], keywords: str = "qi") -> list[str]:
    """For two or more evaluations on the same prompts, the paired verdicts (McNemar on ASR, over-refusal and
    utility accuracy, paired bootstrap on the NLLs) of each model against the first one."""
    from analysis.safety.compare import compare_evaluations, verdicts

    labels = list(results)
    lines = []
    for label in labels[1:]:
        compared = compare_evaluations(results[labels[0]], results[label], keywords)
        lines += verdicts(compared, f"{labels[0]} -> {label}")
    return lines


def category_rates(results: Mapping[str, Any], keywords: str = "qi", which: str = "harmful") -> pd.DataFrame:
    """Long table: category, model, n, k, rate (ASR for ``which="harmful"``, over-refusal for "benign") and
    its Wilson 95% interval (low, high)."""
    column = f"{'asr' if which == 'harmful' else 'over_refusal'}_{keywords}"
    columns = ["category", "model", "n", "k", "rate", "low", "high"]
    frames = [result.category_table(which).rename(columns={column: "rate", f"{column}_k": "k", f"{column}_low": "low",
                                                           f"{column}_high": "high"}).assign(model=label)[columns]
              for label, result in results.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def category_asr_figure(results: Mapping[str, Any], keywords: str = "qi") -> go.Figure:
    """Grouped bars: ASR per HEx-PHI category, one bar per model, with Wilson 95% error bars and n in the
    category labels (a bar of 100% that rests on 2 prompts shows an interval down to 34%); k/n and the
    interval on hover."""
    frame = category_rates(results, keywords)
    if not frame.empty and frame.groupby("category")["n"].nunique().max() == 1:  # same prompts: n in the label
        frame = frame.assign(category=frame["category"] + " (n=" + frame["n"].astype(str) + ")")
    figure = figures.category_bar_figure(
        frame, "category", "rate", "Attack success rate per HEx-PHI category", "ASR (harmful prompts answered)",
        series="model", number_format=None,
        subtitle=f"greedy completions, refusal = {KEYWORD_NAMES[keywords]}; bars: 95% Wilson intervals")
    for trace in figure.data:
        part = frame[frame["model"] == trace.name]
        if len(part) != len(trace.y):
            continue
        trace.error_y = dict(type="data", symmetric=False, array=(part["high"] - part["rate"]).tolist(),
                             arrayminus=(part["rate"] - part["low"]).tolist(), thickness=1.2, width=3)
        trace.customdata = part[["k", "n", "low", "high"]].to_numpy()
        trace.hovertemplate = ("%{x}: %{customdata[0]}/%{customdata[1]} = %{y:.0%} "
                               "[%{customdata[2]:.0%}-%{customdata[3]:.0%}]<extra>%{fullData.name}</extra>")
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


def finetune_paired_verdicts(runs: Mapping[str, Any], keywords: str = "qi") -> list[str]:
    """Paired verdicts (exact McNemar on ASR and over-refusal, same generation prompts) from the runs' stored
    evaluation records: each arm's final model against the starting model, then each other arm against plain
    fine-tuning. ``runs``: any label -> FinetuneResults (with ``evals`` holding ``records``)."""
    from analysis.safety.compare import compare_records, paired_verdict

    metrics = ("asr", "over_refusal")
    finals, lines = {}, []
    for results in runs.values():
        evals = results.evals
        final = next((e for e in reversed(evals) if e.get("final")), None)
        if not evals or final is None or not evals[0].get("records") or not final.get("records"):
            continue
        label = _arm_label(results)
        finals[results.method] = (label, final["records"])
        compared = compare_records(evals[0]["records"], final["records"], keywords, metrics)
        texts = [paired_verdict(r) for r in compared.values() if r.n]
        if texts:
            lines.append(f"**{label}**, after vs before: " + "; ".join(texts) + ".")
    from analysis.lab.defences import variants

    attack = next(item.method for item in variants().values() if item.role == "attack")  # plain fine-tuning
    if attack in finals:
        for method, (label, records) in finals.items():
            if method == attack:
                continue
            compared = compare_records(finals[attack][1], records, keywords, metrics)
            texts = [paired_verdict(r) for r in compared.values() if r.n]
            if texts:
                lines.append(f"**{label}** vs {finals[attack][0]}: " + "; ".join(texts) + ".")
    return lines


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
    """Grouped bars per category: initial ASR and each arm's final ASR, with Wilson 95% error bars and the
    number of prompts in the category labels (a fine-tuning run evaluates few prompts per category)."""
    from analysis.safety.results import interval_of

    table = finetune_category_table(runs)
    value_columns = [c for c in table.columns if "ASR" in c]
    id_columns = ["category"] + (["n"] if "n" in table else [])
    long = table.melt(id_vars=id_columns, value_vars=value_columns, var_name="model", value_name="rate")
    long["model"] = long["model"].str.replace("final ASR · ", "after ", regex=False).str.replace(
        "initial ASR", "before fine-tuning", regex=False)
    if "n" in long and not long.empty:
        intervals = [interval_of({"n": int(n), "asr": rate}, "asr") if pd.notna(n) and pd.notna(rate) else {}
                     for n, rate in zip(long["n"], long["rate"])]
        long["low"] = [i.get("low", np.nan) for i in intervals]
        long["high"] = [i.get("high", np.nan) for i in intervals]
        long["category"] = long["category"] + " (n=" + long["n"].map(lambda n: f"{int(n)}" if pd.notna(n) else "?") + ")"
    figure = figures.category_bar_figure(long, "category", "rate", "ASR per HEx-PHI category, before and after",
                                         "ASR (harmful prompts answered)", series="model", number_format=None,
                                         subtitle="bars: 95% Wilson intervals" if "low" in long else "")
    for trace in figure.data:
        part = long[long["model"] == trace.name]
        if "low" in part and len(part) == len(trace.y):
            trace.error_y = dict(type="data", symmetric=False, array=(part["high"] - part["rate"]).tolist(),
                                 arrayminus=(part["rate"] - part["low"]).tolist(), thickness=1.2, width=3)
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
