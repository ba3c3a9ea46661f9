"""Figures with intervals and tests: a claim's null distribution beside its observed value, per-module values with
95% error bars and significance markers, layer x kind heatmaps marking the modules significant after correction,
and the k@eta interval on a CER figure. Inputs come from ``analysis.views.findings`` (no maths here)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.engine import evidence as ev
from analysis.views import figures as fig
from analysis.views import findings as fv

__all__ = ["cer_with_interval", "claim_figures", "module_interval_figure", "null_distribution_figure",
           "significance_heatmap"]


def null_distribution_figure(result: ev.SummaryResult, title: str, unit: str = "", columns: int = 2) -> go.Figure:
    """Histogram of the distribution the p-value is read from (permutation draws, or the bootstrap draws for a
    bootstrap test) with the observed value (solid) and the null value (dashed) as vertical lines, their values
    in the subtitle; ``title`` names the statistic (the x axis says only "value": long names do not fit it)."""
    draws = np.asarray(result.null_draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return fig.empty_figure(title, "no replicates stored for this run (collect it with n_boot, n_perm > 0)")
    permutation = result.test.startswith("permutation")
    lines = f"solid line: observed {fv.format_value(result.value, unit)}"
    if np.isfinite(result.null):
        lines += f"; dashed: no effect {fv.format_value(result.null, unit)}"
    figure = fig.new_figure(title, f"value{f' ({unit})' if unit else ''}", "draws",
                            f"{'permutation null' if permutation else 'bootstrap distribution'} "
                            f"({draws.size} draws); {lines}; p = {fv._p(result.p)}", columns=columns)
    figure.add_trace(go.Histogram(x=draws, nbinsx=40, marker_color=fig.BASELINE_COLOR if permutation else
                                  fig.series_color("safety"), opacity=0.75,
                                  name="permutation null" if permutation else "bootstrap replicates"))
    figure.add_vline(x=result.value, line=dict(color=fig.series_color("safety"), width=3))
    if np.isfinite(result.null):
        figure.add_vline(x=result.null, line=dict(color="black", dash="dash", width=1.5))
    marks = [x for x in (result.value, result.null) if np.isfinite(x)]
    low, high = min(draws.min(), *marks), max(draws.max(), *marks)
    pad = 0.1 * ((high - low) or 1.0)  # neither line on the plot's edge
    figure.update_xaxes(range=[low - pad, high + pad])
    figure.update_layout(showlegend=False, bargap=0.02)
    return figure


def claim_figures(run, results: dict[str, ev.SummaryResult] | None = None, columns: int = 2) -> dict[str, go.Figure]:
    """{claim: null-distribution figure of its deciding statistic} (see ``findings.ROWS``), for ``columns``
    charts side by side."""
    results = results if results is not None else fv.claim_results(run)
    out = {}
    for claim, specs in fv.ROWS.items():
        key, _, unit = specs[0]
        out[claim] = null_distribution_figure(results[key], f"Claim {claim}: {results[key].name}", unit, columns)
    return out


def module_interval_figure(modules: pd.DataFrame, stat: str, title: str, y_title: str,
                           significant: str | None = None, zero_line: float | None = 0.0) -> go.Figure:
    """Per-module value of ``stat`` with its 95% interval as error bars (model order); modules significant after
    correction (column ``significant``) drawn as filled diamonds, the others as open circles."""
    if stat not in modules or modules[stat].isna().all():
        return fig.empty_figure(title, "no values")
    value = modules[stat].astype(float)
    lo, hi = modules.get(f"{stat}_lo"), modules.get(f"{stat}_hi")
    shown = int(value.notna().sum())
    figure = fig.new_figure(title, "module", y_title, "error bars: 95% bootstrap interval over prompts"
                            + ("; ◆ significant after Benjamini-Hochberg" if significant else "")
                            + (f"; {shown} of {len(value)} modules have a value (the others are not certified by "
                               "the spectral core)" if shown < len(value) else ""))
    error = None
    if lo is not None and lo.notna().any():
        error = dict(type="data", symmetric=False, array=(hi - value).clip(lower=0), arrayminus=(value - lo).clip(lower=0),
                     color=fig.BASELINE_COLOR, thickness=1)
    marks = modules[significant].fillna(False).astype(bool) if significant and significant in modules else None
    figure.add_trace(go.Scatter(
        x=modules["label"], y=value, mode="markers", error_y=error,
        marker=dict(color=fig.series_color("safety"), size=8,
                    symbol=["diamond" if m else "circle-open" for m in marks] if marks is not None else "circle"),
        hovertemplate="%{x}: %{y:.3g}<extra></extra>"))
    if zero_line is not None:
        figure.add_hline(y=zero_line, line=dict(color="black", dash="dot", width=1))
    figure.update_xaxes(type="category", tickangle=-60)
    figure.update_layout(showlegend=False)
    return figure


def significance_heatmap(modules: pd.DataFrame, value: str, significant: str, title: str, colorbar_title: str,
                         **heatmap) -> go.Figure:
    """``figures.layer_kind_heatmap`` of ``value`` with a ring on every cell whose module is significant after
    correction (column ``significant``)."""
    figure = fig.layer_kind_heatmap(modules, value, title, colorbar_title, **heatmap)
    if significant in modules and "layer" in modules:
        marked = modules[modules[significant].fillna(False).astype(bool)].dropna(subset=["layer"])
        if len(marked):
            figure.add_trace(go.Scatter(x=marked["kind"], y=marked["layer"].astype(int).astype(str), mode="markers",
                                        marker=dict(symbol="circle-open", size=30, color="black", line=dict(width=2)),
                                        name="significant (BH)", hoverinfo="skip", showlegend=False))
    return figure


def cer_with_interval(figure: go.Figure, modules: pd.DataFrame, label: str, eta: float = 0.9) -> go.Figure:
    """Adds the 95% intervals of safety's and utility's k@0.9 of module ``label`` as horizontal bars at eta to
    a CER figure (``figures.cer_figure``); the stored intervals are for eta = 0.9 only."""
    if eta != 0.9:
        return figure
    row = modules[modules["label"] == label]
    if row.empty:
        return figure
    row = row.iloc[0]
    for offset, which in ((0.01, "safety"), (-0.01, "utility")):
        lo, hi = row.get(f"{which}_k90_lo"), row.get(f"{which}_k90_hi")
        if lo is None or not np.isfinite(lo):
            continue
        figure.add_trace(go.Scatter(x=[lo, hi], y=[eta + offset] * 2, mode="lines+markers",
                                    line=dict(color=fig.series_color(which), width=5),
                                    marker=dict(symbol="line-ns", size=12, line=dict(width=2, color=fig.series_color(which))),
                                    name=f"{which} k@0.9, 95% interval {lo:.0f}–{hi:.0f}"))
    return figure
