"""Views of "why does the defence fail?" (:mod:`analysis.lab.why` results and a fine-tuning run's drift record):
tables per layer / kind, plotly figures (project template, units on axes), and a one-paragraph answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.views.figures import (
    BASELINE_COLOR,
    COLORWAY,
    OKABE_ITO,
    empty_figure,
    layer_kind_heatmap,
    new_figure,
)

__all__ = ["ENERGY_SETS", "PAIR_LABELS", "drift_figure", "drift_frame", "energy_by_layer_figure", "group_summary", "min_angle_heatmap",
           "overlap_by_layer_figure", "token_energy_figure", "token_energy_frame", "why_verdict"]

PAIR_LABELS = {
    "refusal": "update vs refusal-gradient subspace",
    "compliance": "update vs compliance-gradient subspace",
    "alignment": "update vs alignment delta W_aligned − W_base",
    "drift": "refusal subspace: fine-tuned vs aligned model",
}
PAIR_COLORS = {"refusal": OKABE_ITO["vermillion"], "compliance": OKABE_ITO["purple"], "alignment": OKABE_ITO["green"],
               "drift": OKABE_ITO["blue"]}
ENERGY_SETS = {"refusal": "refusal CE, aligned model", "compliance": "compliance CE (“Sure, here is”), aligned model",
               "refusal_end": "refusal CE, fine-tuned model"}
SIDE_LABELS = {"left": "left (output side, d_out)", "right": "right (input side, d_in)"}


def group_summary(table: pd.DataFrame, by: str, side: str = "left") -> pd.DataFrame:
    """Mean over the modules of each ``by`` group ("layer" or "kind") of the overlap phi per pair, the random
    expectation k/d and the 95% random quantile, and the mean smallest angle (degrees), for one ``side``."""
    if table.empty:
        return pd.DataFrame()
    columns = {}
    for pair in PAIR_LABELS:
        columns[f"overlap {pair}"] = f"overlap_{pair}_{side}"
        columns[f"min angle {pair} (deg)"] = f"min_angle_{pair}_{side}"
    columns["random k/d"] = f"expected_refusal_{side}"
    columns["random q95"] = f"q95_refusal_{side}"
    present = {label: column for label, column in columns.items() if column in table}
    values = table[list(present.values())].apply(pd.to_numeric, errors="coerce")  # all-NaN columns load as None
    frame = values.groupby(table[by]).mean()
    frame.columns = list(present)
    frame["modules"] = table.groupby(by).size()
    return frame.reset_index()


def overlap_by_layer_figure(table: pd.DataFrame, side: str = "left", pairs: Sequence[str] = tuple(PAIR_LABELS),
                            subtitle: str = "") -> go.Figure:
    """Mean overlap phi (mean cos^2 of the principal angles) per layer for each compared pair, with the random
    baseline k/d (grey dashed) and its 95% quantile (grey dotted)."""
    title = f"Overlap with the safety subspaces per layer, {side} singular vectors"
    summary = group_summary(table, "layer", side)
    if summary.empty:
        return empty_figure(title, "no modules")
    figure = new_figure(title, "layer", "overlap φ = mean cos² of principal angles (0–1)", subtitle)
    for pair in pairs:
        column = f"overlap {pair}"
        if column not in summary or not summary[column].notna().any():
            continue
        figure.add_trace(go.Scatter(x=summary["layer"], y=summary[column], mode="lines+markers", name=PAIR_LABELS[pair],
                                    line=dict(color=PAIR_COLORS[pair], width=2.5),
                                    hovertemplate="layer %{x}: φ = %{y:.3f}<extra>" + pair + "</extra>"))
    figure.add_trace(go.Scatter(x=summary["layer"], y=summary["random k/d"], mode="lines", name="random subspaces, k/d",
                                line=dict(color=BASELINE_COLOR, dash="dash", width=2)))
    if "random q95" in summary:
        figure.add_trace(go.Scatter(x=summary["layer"], y=summary["random q95"], mode="lines",
                                    name="random, 95% quantile", line=dict(color=BASELINE_COLOR, dash="dot", width=1.5)))
    figure.update_yaxes(range=[0, 1.02])
    return figure


def min_angle_heatmap(table: pd.DataFrame, pair: str, side: str = "left", subtitle: str = "") -> go.Figure:
    """Smallest principal angle (degrees) per layer x module kind for one pair: 0° = a shared direction."""
    return layer_kind_heatmap(table, f"min_angle_{pair}_{side}", f"Smallest principal angle: {PAIR_LABELS[pair]}",
                              "degrees", zrange=(0.0, 90.0), number_format=".0f",
                              subtitle=subtitle or f"{SIDE_LABELS[side]} singular vectors")


def token_energy_frame(arrays: Mapping[str, np.ndarray], sets: Sequence[str] = tuple(ENERGY_SETS)) -> pd.DataFrame:
    """Long table (set, position, share, cumulative, samples): the mean over samples of the share of a sample's
    safety-gradient token energy sum_t ||d_t||^2 ||a_t||^2 (all selected modules; prompt rows included in the
    total, so the shares of a set sum to 1 minus its prompt share) at each response position; ``samples``:
    how many samples reach that position. Position -1 stands for all prompt rows."""
    rows = []
    for name in sets:
        if f"energy/{name}" not in arrays:
            continue
        energy = arrays[f"energy/{name}"].sum(1)  # (n, P)
        prompt = arrays[f"prompt_energy/{name}"].sum(1)  # (n,)
        total = energy.sum(1) + prompt
        total = np.where(total > 0, total, np.nan)
        share = energy / total[:, None]
        tokens = arrays[f"response_tokens/{name}"]
        mean = np.nanmean(share, axis=0)
        rows.append(pd.DataFrame({"set": name, "position": -1, "share": float(np.nanmean(prompt / total)),
                                  "cumulative": np.nan, "samples": len(tokens)}, index=[0]))
        rows.append(pd.DataFrame({"set": name, "position": np.arange(mean.size), "share": mean,
                                  "cumulative": np.cumsum(mean),
                                  "samples": [(tokens > j).sum() for j in range(mean.size)]}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def token_energy_figure(frame: pd.DataFrame, first_tokens: int = 5, max_position: int = 64, subtitle: str = "") -> go.Figure:
    """Share of the safety gradient's token energy per response position (0 = the token whose logit predicts the
    first response token), one line per gradient, the first-N boundary marked."""
    title = "Where does the safety gradient live? Token energy by response position"
    if frame.empty:
        return empty_figure(title, "no token energies")
    figure = new_figure(title, "response position j (0 = predicts the first response token)",
                        "share of the sample's gradient energy (fraction)", subtitle)
    for index, (name, group) in enumerate(frame[frame["position"] >= 0].groupby("set", sort=False)):
        group = group[group["position"] < max_position]
        prompt = frame[(frame["set"] == name) & (frame["position"] == -1)]["share"]
        label = ENERGY_SETS.get(name, name) + (f" (prompt rows: {float(prompt.iloc[0]):.0%})" if len(prompt) else "")
        figure.add_trace(go.Scatter(x=group["position"], y=group["share"], mode="lines+markers", name=label,
                                    line=dict(color=COLORWAY[index % len(COLORWAY)], width=2.5), marker=dict(size=5),
                                    customdata=group[["cumulative", "samples"]].to_numpy(),
                                    hovertemplate="j=%{x}: %{y:.1%} (cumulative %{customdata[0]:.1%}, "
                                                  "%{customdata[1]} samples)<extra></extra>"))
    figure.add_vline(x=first_tokens - 0.5, line=dict(color=BASELINE_COLOR, dash="dash", width=1.5),
                     annotation_text=f"first {first_tokens}", annotation_position="top right")
    figure.update_yaxes(rangemode="tozero", tickformat=".0%")
    figure.update_layout(legend=dict(x=0.98, xanchor="right", y=0.98, yanchor="top"))
    return figure


def energy_by_layer_figure(arrays: Mapping[str, np.ndarray], name: str = "refusal", max_position: int = 32,
                           subtitle: str = "") -> go.Figure:
    """Heatmap layer (y) x response position (x): each layer's share of its own token energy (prompt rows
    included in the total) per position, mean over samples: where in the response each layer's safety gradient is."""
    title = f"Token energy by layer and response position: {ENERGY_SETS.get(name, name)}"
    if f"energy/{name}" not in arrays:
        return empty_figure(title, "no token energies")
    energy, prompt = arrays[f"energy/{name}"], arrays[f"prompt_energy/{name}"]  # (n, L, P), (n, L)
    total = energy.sum(2) + prompt
    with np.errstate(all="ignore"):
        share = np.nanmean(energy / np.where(total > 0, total, np.nan)[:, :, None], axis=0)[:, :max_position]
    layers = [str(int(i)) for i in arrays["layers"]]
    figure = new_figure(title, "response position j (0 = predicts the first response token)", "layer", subtitle)
    figure.add_trace(go.Heatmap(z=share, x=list(range(share.shape[1])), y=layers, colorscale="Viridis", xgap=1, ygap=1,
                                colorbar=dict(title=dict(text="share of the layer's energy", side="right")),
                                hovertemplate="layer %{y}, j=%{x}: %{z:.1%}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", type="category", showgrid=False)
    figure.update_xaxes(showgrid=False)
    figure.update_layout(height=max(340, 90 + 18 * len(layers)))
    return figure


def drift_frame(drift: Mapping[str, Any] | None) -> pd.DataFrame:
    """Long table (step, module, layer, overlap_left, overlap_right) of a run's drift record
    (``FinetuneResults.drift()``): per module the overlap phi = mean cos^2 of the principal angles between the
    safety basis at that refresh and the first one."""
    from analysis.llm.anatomy import layer_index

    if not drift or len(drift["steps"]) == 0:
        return pd.DataFrame(columns=["step", "module", "layer", "overlap_left", "overlap_right"])
    rows = []
    modules = drift["modules"] or [f"module {i}" for i in range(drift["cos_left"].shape[1])]
    with np.errstate(all="ignore"):
        left = np.nanmean(drift["cos_left"].astype(np.float64) ** 2, axis=2)
        right = np.nanmean(drift["cos_right"].astype(np.float64) ** 2, axis=2)
    for r, step in enumerate(drift["steps"]):
        for m, module in enumerate(modules):
            rows.append({"step": int(step), "module": module, "layer": layer_index(module),
                         "overlap_left": left[r, m], "overlap_right": right[r, m]})
    return pd.DataFrame(rows)


def drift_figure(frame: pd.DataFrame, subtitle: str = "") -> go.Figure:
    """Overlap of the safety subspace at each refresh with the one at step 1 (mean over modules, and the
    least-overlapping layer), left and right singular vectors."""
    title = "Drift of the safety subspace during fine-tuning"
    if frame.empty:
        return empty_figure(title, "this run recorded no drift (trained before drift was recorded, or no safety "
                                   "gradient was computed)")
    figure = new_figure(title, "optimizer step", "overlap φ with the step-1 subspace (0–1)", subtitle)
    for index, side in enumerate(("left", "right")):
        column = f"overlap_{side}"
        mean = frame.groupby("step")[column].mean()
        worst = frame.groupby(["step", "layer"])[column].mean().groupby("step").min()
        color = COLORWAY[index + 1]
        figure.add_trace(go.Scatter(x=mean.index.tolist(), y=mean.tolist(), mode="lines+markers", name=f"{side}, mean of modules",
                                    line=dict(color=color, width=2.5)))
        figure.add_trace(go.Scatter(x=worst.index.tolist(), y=worst.tolist(), mode="lines", name=f"{side}, lowest layer",
                                    line=dict(color=color, width=1.5, dash="dot")))
    figure.update_yaxes(range=[0, 1.02])
    return figure


def why_verdict(summary: Mapping[str, Any]) -> str:
    """A short answer from an explanation's summary (overlaps vs the random baseline, first-token energy)."""
    overlap = summary.get("mean_overlap") or {}
    expected = (summary.get("mean_expected") or {}).get("left")
    if expected is None:
        return ""

    def ratio(pair: str) -> str:
        value = overlap.get(f"{pair}_left")
        return "n/a" if value is None else f"φ = {value:.3f} ({value / expected:.1f}× random)"

    k, n = summary.get("k"), summary.get("first_tokens")
    energy = (summary.get("energy_first_share") or {}).get("refusal")
    drift = overlap.get("drift_left")
    parts = [f"The update's top-{k} output-side subspace overlaps the refusal subspace {ratio('refusal')}, the "
             f"compliance subspace {ratio('compliance')} and the alignment delta {ratio('alignment')} "
             f"(random k/d = {expected:.3f})."]
    if drift is not None:
        parts.append(f"After fine-tuning, the refusal subspace overlaps its aligned-model self φ = {drift:.2f}.")
    if energy is not None:
        parts.append(f"{energy:.0%} of the refusal gradient's token energy sits in the first {n} response positions.")
    return " ".join(parts)
