"""Views of a screening (:mod:`analysis.lab.screen`): the ranked table, score histograms with the anchors marked,
agreement between the scores, the per-module drill-down of one example, subset exports in the input's format,
and a one-paragraph answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.lab.screen import SCORES, select_subset
from analysis.llm.formats import jsonl_bytes, row_format
from analysis.views.figures import (
    BASELINE_COLOR,
    DIVERGING_SCALE,
    OKABE_ITO,
    TEMPLATE,
    empty_figure,
    layer_kind_heatmap,
    new_figure,
)

__all__ = ["ANCHOR_LABELS", "SCORE_LABELS", "agreement_figure", "export_subset", "histograms_figure",
           "input_format", "module_frame", "module_figure", "ranked_table", "screen_answer", "top_agreement",
           "validation_figure", "validation_frame"]

SCORE_LABELS = {name: label for name, (label, _) in SCORES.items()}
ANCHOR_LABELS = {"anchor_compliance": "harmful prompt + compliance (anchor)",
                 "anchor_refusal": "harmful prompt + refusal (anchor)"}
ANCHOR_COLORS = {"anchor_compliance": OKABE_ITO["vermillion"], "anchor_refusal": OKABE_ITO["blue"]}
SHOWN_CHARS = 160


def _short(text: Any, chars: int = SHOWN_CHARS) -> str:
    text = "" if text is None else str(text).replace("\n", " ")
    return text if len(text) <= chars else text[:chars - 1] + "…"


def ranked_table(rows: pd.DataFrame, score: str = "gradient_matching", categories: Sequence[str] | None = None,
                 search: str = "") -> pd.DataFrame:
    """One row per example, riskiest first by ``score`` (its risky end, :data:`SCORES`): rank, id, category,
    prompt and answer (shortened), the four scores, loss and tokens. ``categories`` / ``search`` (case-insensitive,
    in prompt or answer) filter the rows; ranks are those of the whole pool."""
    risky_high = SCORES[score][1] == "high"
    ordered = rows.assign(_key=pd.to_numeric(rows[score], errors="coerce")).sort_values(
        "_key", ascending=not risky_high, na_position="last", kind="stable")
    ordered = ordered.assign(rank=np.arange(1, len(ordered) + 1))
    if categories:
        ordered = ordered[ordered["category"].fillna("(none)").isin(list(categories))]
    if search.strip():
        needle = search.strip().lower()
        ordered = ordered[ordered["prompt"].str.lower().str.contains(needle, regex=False)
                          | ordered["response"].str.lower().str.contains(needle, regex=False)]
    table = pd.DataFrame({"rank": ordered["rank"], "id": ordered["id"], "category": ordered["category"],
                          "prompt": ordered["prompt"].map(_short), "answer": ordered["response"].map(_short)})
    for name in SCORES:
        table[name] = ordered[name].astype(float)
    table["loss (nats/token)"] = ordered["loss"].astype(float)
    table["tokens"] = ordered["tokens"]
    table["index"] = ordered["index"]
    return table.reset_index(drop=True)


def histograms_figure(rows: pd.DataFrame, anchors: pd.DataFrame, subtitle: str = "", bins: int = 30) -> go.Figure:
    """One panel per score: histogram of the pool's scores (grey), the anchors' own scores as ticks under it and
    their medians as dashed lines (compliance anchors vermillion, refusal anchors blue)."""
    title = "Score distributions of the pool, with the anchors' own scores"
    if rows.empty:
        return empty_figure(title, "no scored examples")
    names = list(SCORES)
    figure = make_subplots(rows=2, cols=2, subplot_titles=[SCORE_LABELS[n] for n in names], vertical_spacing=0.16,
                           horizontal_spacing=0.1)
    for index, name in enumerate(names):
        row, col = index // 2 + 1, index % 2 + 1
        values = pd.to_numeric(rows[name], errors="coerce").dropna()
        figure.add_trace(go.Histogram(x=values, nbinsx=bins, marker=dict(color="#9A9A9A"), name="pool examples",
                                      legendgroup="pool", showlegend=index == 0,
                                      hovertemplate=f"{name} %{{x}}<br>%{{y}} examples<extra></extra>"), row=row, col=col)
        for which, label in ANCHOR_LABELS.items():
            own = pd.to_numeric(anchors.loc[anchors["set"] == which, name], errors="coerce").dropna() \
                if not anchors.empty else pd.Series(dtype=float)
            if own.empty:
                continue
            figure.add_trace(go.Scatter(x=own, y=np.zeros(len(own)), mode="markers", name=label, legendgroup=which,
                                        showlegend=index == 0,
                                        marker=dict(symbol="line-ns-open", size=14, color=ANCHOR_COLORS[which]),
                                        hovertemplate=f"{label}<br>{name} %{{x:.4f}}<extra></extra>"),
                             row=row, col=col)
            figure.add_vline(x=float(own.median()), line=dict(color=ANCHOR_COLORS[which], dash="dash", width=2),
                             row=row, col=col)
        figure.update_xaxes(title_text="score (dimensionless)", row=row, col=col)
        figure.update_yaxes(title_text="examples", row=row, col=col)
    heading = dict(text=title, subtitle=dict(text=subtitle, font=dict(size=13, color="#555555")))
    figure.update_layout(template=TEMPLATE, title=heading, height=720, bargap=0.03, margin=dict(t=110),
                         legend=dict(orientation="h", y=-0.12))
    return figure


def agreement_figure(spearman: Mapping[str, Mapping[str, float]], subtitle: str = "") -> go.Figure:
    """Heatmap of the Spearman rank correlation between the scores (-1..1, red = opposite rankings)."""
    names = [n for n in SCORES if n in spearman]
    title = "Do the scores agree? Spearman ρ"
    if not names:
        return empty_figure(title, "no scores")
    z = np.array([[spearman[a].get(b, np.nan) if spearman[a].get(b) is not None else np.nan for b in names]
                  for a in names], dtype=float)
    figure = new_figure(title, "", "", subtitle)
    figure.add_trace(go.Heatmap(z=z, x=names, y=names, text=z, texttemplate="%{text:.2f}", colorscale=DIVERGING_SCALE,
                                zmid=0, zmin=-1, zmax=1, xgap=2, ygap=2,
                                colorbar=dict(title=dict(text="Spearman ρ", side="right")),
                                hovertemplate="%{y} vs %{x}: ρ = %{z:.3f}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", type="category", showgrid=False)
    figure.update_xaxes(type="category", showgrid=False)
    figure.update_layout(height=460)
    return figure


def top_agreement(rows: pd.DataFrame, k: int) -> pd.DataFrame:
    """For each pair of scores, how many of the k riskiest examples by one are also among the k riskiest by
    the other (and the share; random sets share k/n on average)."""
    k = max(1, min(int(k), len(rows)))
    tops = {name: set(rows["index"].iloc[select_subset(rows[name], "top", k, risky=SCORES[name][1])])
            for name in SCORES}
    names = list(SCORES)
    out = [{"score A": a, "score B": b, f"shared of top {k}": len(tops[a] & tops[b]),
            "share": len(tops[a] & tops[b]) / k, "random expectation": k / len(rows)}
           for i, a in enumerate(names) for b in names[i + 1:]]
    return pd.DataFrame(out)


def module_frame(arrays: Mapping[str, np.ndarray], modules: Sequence[Mapping[str, Any]], index: int) -> pd.DataFrame:
    """Per-module drill-down of example ``index``: its gradient's norm share, cos with each anchor gradient in
    that module, the module's contribution to the whole-vector gradient matching (the contributions add up to
    it exactly) and its energy share inside that module's safety subspace."""
    norm2 = arrays["module/norm2"][index]
    total = float(norm2.sum())
    frame = pd.DataFrame({"module": [m["name"] for m in modules], "label": [_label(m) for m in modules],
                          "layer": [m["layer"] for m in modules], "kind": [m["kind"] for m in modules]})
    frame["grad norm share"] = norm2 / total if total > 0 else np.nan
    contribution = np.zeros(len(modules))
    with np.errstate(invalid="ignore", divide="ignore"):
        for ref, sign in (("compliance", 1.0), ("refusal", -1.0)):
            dot = arrays[f"module/dot/{ref}"][index]
            reference = arrays[f"reference_norm2/{ref}"]
            frame[f"cos {ref} (module)"] = dot / np.sqrt(norm2 * reference)
            contribution += sign * dot / np.sqrt(total * float(reference.sum()))
        frame["contribution to gradient matching"] = contribution
        frame["safety share (module)"] = arrays["module/energy"][index] / norm2
    return frame


def _label(module: Mapping[str, Any]) -> str:
    if module.get("layer") is None:
        return module["name"]
    block = "attn" if module["kind"] in ("q", "k", "v", "o", "qkv") else "mlp"
    return f"L{module['layer']}.{block}.{module['kind']}"


def module_figure(frame: pd.DataFrame, value: str = "contribution to gradient matching", subtitle: str = "") -> go.Figure:
    """Layer x module-kind heatmap of one drill-down column (diverging for cosines and contributions)."""
    if frame.empty:
        return empty_figure(value, "no modules")
    bound = float(np.nanmax(np.abs(frame[value].to_numpy(dtype=float)))) if frame[value].notna().any() else 1.0
    diverging = not value.startswith(("grad norm", "safety share"))
    return layer_kind_heatmap(frame, value, f"Per module: {value}", value, diverging=diverging,
                              zrange=(-bound, bound) if diverging else None, subtitle=subtitle)


def input_format(rows: pd.DataFrame) -> str:
    """The row format of the screened data (``alpaca``, ``dolly``, ``chat``, ``ours``; the first row's)."""
    return row_format(rows["source_row"].iloc[0]) if len(rows) else "ours"


def export_subset(rows: pd.DataFrame, positions: Sequence[int]) -> bytes:
    """JSON Lines of the input's own rows at ``positions`` (file order): re-loads in the input's format."""
    chosen = rows.set_index("index").loc[sorted(int(p) for p in positions), "source_row"]
    return jsonl_bytes(list(chosen))


def screen_answer(summary: Mapping[str, Any], rows: pd.DataFrame, anchors: pd.DataFrame) -> str:
    """One paragraph: the riskiest example, how far above the pool and below the compliance anchors it sits, and
    whether the gradient scores agree with each other and with the representation baseline."""
    if rows.empty:
        return ""
    gm = pd.to_numeric(rows["gradient_matching"], errors="coerce")
    top = rows.loc[gm.idxmax()]
    parts = [f"Riskiest by gradient matching: **{top['id']}** ({top['category'] or 'no category'}), "
             f"score {gm.max():+.3f} vs pool median {gm.median():+.3f}"]
    if not anchors.empty:
        median = pd.to_numeric(anchors.loc[anchors["set"] == "anchor_compliance", "gradient_matching"],
                               errors="coerce").median()
        above = int((gm > median).sum())
        parts.append(f"; {above} of {len(rows)} examples score above the compliance anchors' median ({median:+.3f})")
    rho = summary.get("spearman", {})

    def r(a: str, b: str) -> str:
        value = rho.get(a, {}).get(b)
        return "n/a" if value is None else f"{value:+.2f}"

    parts.append(f". Rank agreement (Spearman): gradient matching vs cos(g, G_refusal) {r('gradient_matching', 'cos_refusal')}, "
                 f"vs safety share {r('gradient_matching', 'safety_share')}, vs the representation baseline "
                 f"{r('gradient_matching', 'representation')}.")
    return "".join(parts)



# --------------------------------------------------------------------------------------------------
# validation (analysis.lab.screen_validate)


ARM_COLORS = {"aligned": BASELINE_COLOR, "top": OKABE_ITO["vermillion"], "bottom": OKABE_ITO["blue"],
              "random": OKABE_ITO["green"]}


def validation_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The validation table: arm, seed, ASR with its 95% Wilson interval and n, over-refusal, utility."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return frame
    frame["seed"] = frame["seed"].map(lambda s: "-" if s is None or (isinstance(s, float) and np.isnan(s)) else str(s))
    columns = ["arm", "seed", "asr", "asr_low", "asr_high", "n_harmful", "over_refusal", "utility_accuracy",
               "utility_nll", "refusal_nll", "finetune_run"]
    return frame[[c for c in columns if c in frame]]


def validation_figure(rows: Sequence[Mapping[str, Any]], subtitle: str = "") -> go.Figure:
    """ASR per arm and seed with 95% Wilson intervals (pooled over seeds: the large markers)."""
    title = "Does the ranking predict harm? ASR after fine-tuning on each subset"
    frame = validation_frame(rows)
    if frame.empty:
        return empty_figure(title, "no arms evaluated yet")
    figure = new_figure(title, "arm (k examples each)", "ASR (keyword), 95% Wilson interval", subtitle)
    for arm in dict.fromkeys(frame["arm"]):
        part = frame[frame["arm"] == arm]
        pooled = part["seed"] == "pooled"
        for mask, size, label in ((~pooled, 9, "per seed"), (pooled, 15, "pooled over seeds")):
            chosen = part[mask]
            if chosen.empty:
                continue
            figure.add_trace(go.Scatter(
                x=[arm] * len(chosen), y=chosen["asr"], mode="markers", name=f"{arm}, {label}",
                marker=dict(size=size, color=ARM_COLORS.get(arm), symbol="diamond" if size > 9 else "circle"),
                error_y=dict(type="data", symmetric=False, array=chosen["asr_high"] - chosen["asr"],
                             arrayminus=chosen["asr"] - chosen["asr_low"]),
                text=chosen["seed"], hovertemplate=f"{arm}, seed %{{text}}: ASR %{{y:.0%}}<extra></extra>"))
    figure.update_yaxes(range=[0, 1], tickformat=".0%")
    return figure
