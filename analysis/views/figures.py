"""Plotly figure builders: plain arrays / DataFrames in, ``go.Figure`` out.

Every builder takes results, never the store, so each can be tested alone. All figures share one
template (:data:`TEMPLATE`: readable fonts, white background, light grid) and the Okabe-Ito palette,
which stays distinguishable for the common colour-vision deficiencies. Safety is always vermillion,
utility always blue, random baselines grey and dashed. Axis titles carry units; gradients are in
nats per unit weight (the loss is a mean cross-entropy in nats), angles in degrees, and cosines,
overlaps and energy fractions are dimensionless.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.engine import geometry

# Okabe & Ito (2008), "Color Universal Design".
OKABE_ITO = {
    "orange": "#E69F00", "sky_blue": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
    "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000",
}
COLORWAY = [OKABE_ITO[c] for c in ("vermillion", "blue", "green", "orange", "purple", "sky_blue", "yellow", "black")]
SERIES_COLORS = {"safety": OKABE_ITO["vermillion"], "utility": OKABE_ITO["blue"], "attack": OKABE_ITO["purple"]}
BASELINE_COLOR = "#7F7F7F"
SEQUENTIAL_SCALE = "Viridis"  # perceptually uniform, colour-blind safe
DIVERGING_SCALE = "RdBu"  # ColorBrewer, colour-blind safe; red = negative (conflict), blue = positive

FONT_FAMILY = "Arial, Helvetica, sans-serif"
WIDTH, HEIGHT = 800, 500  # default export size in CSS pixels (PNG is rendered at scale 2)

GRADIENT_UNITS = "nats per unit weight"
# Singular values below this fraction of s_1 are rounding noise of float32 factors (beyond the true rank
# of a sum of n rank-T matrices) and are not drawn.
NUMERICAL_ZERO = 1e-7
KIND_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "down")

TEMPLATE = go.layout.Template(
    layout=go.Layout(
        font=dict(family=FONT_FAMILY, size=14, color="#222222"),
        title=dict(font=dict(size=17), x=0.015, xref="container", xanchor="left", y=0.97, yanchor="top"),
        colorway=COLORWAY,
        paper_bgcolor="white",
        plot_bgcolor="white",
        margin=dict(l=80, r=30, t=70, b=70),
        xaxis=dict(showline=True, linecolor="#444444", ticks="outside", gridcolor="#E5E5E5",
                   zeroline=False, title=dict(standoff=8), automargin=True),
        yaxis=dict(showline=True, linecolor="#444444", ticks="outside", gridcolor="#E5E5E5",
                   zeroline=False, title=dict(standoff=8), automargin=True),
        legend=dict(bgcolor="rgba(255,255,255,0.85)", bordercolor="#CCCCCC", borderwidth=1),
        hoverlabel=dict(font=dict(family=FONT_FAMILY)),
    )
)


def series_color(name: str, index: int = 0) -> str:
    """Fixed colour for safety / utility / attack, else the palette in order."""
    return SERIES_COLORS.get(str(name).lower(), COLORWAY[index % len(COLORWAY)])


#: Longest title / subtitle line (characters): a chart in half of a 1400 px wide page is ~600 px wide, which
#: holds ~50 characters of the 17 px title font and ~65 of the 13 px subtitle font beside a colour bar (Plotly
#: clips titles, it never wraps them; tests/test_browser_layout.py checks it in Chromium).
TITLE_CHARS, SUBTITLE_CHARS = 46, 64


def wrap_text(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters with Plotly's ``<br>`` (existing breaks kept)."""
    import textwrap

    return "<br>".join(line for part in str(text).split("<br>") for line in (textwrap.wrap(part, width, break_on_hyphens=False) or [""]))


def new_figure(title: str, x_title: str, y_title: str, subtitle: str = "", columns: int = 2,
               **layout: Any) -> go.Figure:
    """An empty figure with the project template, a title (and a subtitle, e.g. the module) and axis titles:
    the one place for styling. Titles are wrapped (TITLE_CHARS, SUBTITLE_CHARS for a half-width chart, scaled
    for one of ``columns`` charts side by side at 1400 px) and the top margin grows with their lines, so
    nothing is clipped."""
    figure = go.Figure()
    scale = 2 / max(2, columns)
    title = wrap_text(title, int(TITLE_CHARS * scale))
    subtitle = wrap_text(subtitle, int(SUBTITLE_CHARS * scale)) if subtitle else ""
    heading = dict(text=title, subtitle=dict(text=subtitle, font=dict(size=13, color="#555555")))
    figure.update_layout(template=TEMPLATE, title=heading, width=None, height=HEIGHT, **layout)
    lines = title.count("<br>") + 1
    sub_lines = subtitle.count("<br>") + 1 if subtitle else 0
    if lines > 1 or subtitle:
        figure.update_layout(margin=dict(t=50 + 22 * lines + 18 * sub_lines))
    figure.update_xaxes(title_text=x_title)
    figure.update_yaxes(title_text=y_title)
    return figure


def empty_figure(title: str, message: str) -> go.Figure:
    """A placeholder figure that says why there is nothing to show."""
    figure = new_figure(title, "", "")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                          font=dict(size=15, color=BASELINE_COLOR))
    return figure


def _spectrum(values: Any) -> np.ndarray:
    """A 1-D float array sorted descending (singular values)."""
    return np.sort(np.asarray(values, dtype=float).ravel())[::-1]


def spectra_figure(spectra: Mapping[str, Any], module: str = "", normalise: bool = True,
                   max_k: int | None = None) -> go.Figure:
    """Singular values s_j (log y) of several gradients of one module, e.g. {"safety": s, "utility": s}.

    ``normalise`` divides each spectrum by its s_1 so that shapes compare whatever the gradient scale.
    Values below ``NUMERICAL_ZERO * s_1`` (rounding noise past the gradient's rank) are not drawn.
    ``max_k`` limits the x range to the first directions.
    """
    y_title = "s<sub>j</sub> / s<sub>1</sub> (relative)" if normalise else f"singular value s<sub>j</sub> ({GRADIENT_UNITS})"
    figure = new_figure("Singular value spectrum", "index j of singular direction", y_title, module)
    for index, (name, values) in enumerate(spectra.items()):
        s = _spectrum(values)
        s = s[s > NUMERICAL_ZERO * s[0]] if s.size else s
        if max_k:
            s = s[:max_k]
        if s.size == 0:
            continue
        y = s / s[0] if normalise else s
        figure.add_trace(go.Scatter(
            x=np.arange(1, s.size + 1), y=y, mode="lines+markers" if s.size <= 64 else "lines", name=str(name),
            line=dict(color=series_color(name, index), width=2.5), marker=dict(size=5),
            hovertemplate="j=%{x}<br>s=%{y:.3g}<extra>" + str(name) + "</extra>",
        ))
    figure.update_yaxes(type="log", exponentformat="power", dtick=1)  # decades only: no cluttered minor labels
    return figure


def cer_figure(spectra: Mapping[str, Any], eta: float = 0.9, module: str = "", max_k: int | None = None) -> go.Figure:
    """Cumulative energy ratio CER(k) per gradient with the eta line and k@eta marked for each series."""
    figure = new_figure(f"Cumulative energy ratio (η = {eta:g})", "number of directions k", "CER(k), fraction of energy",
                        module)
    for index, (name, values) in enumerate(spectra.items()):
        s = _spectrum(values)
        if s.size == 0:
            continue
        cer = geometry.cumulative_energy(s)
        k = np.arange(1, s.size + 1)
        if max_k:
            cer, k = cer[:max_k], k[:max_k]
        color = series_color(name, index)
        k_eta = geometry.k_at_energy(s, eta)
        figure.add_trace(go.Scatter(x=k, y=cer, mode="lines", name=f"{name} (k@η = {k_eta})",
                                    line=dict(color=color, width=2.5),
                                    hovertemplate="k=%{x}<br>CER=%{y:.3f}<extra>" + str(name) + "</extra>"))
        if k_eta and (not max_k or k_eta <= max_k):
            figure.add_trace(go.Scatter(x=[k_eta], y=[cer[k_eta - 1]], mode="markers", showlegend=False,
                                        marker=dict(color=color, size=11, symbol="diamond",
                                                    line=dict(color="white", width=1)),
                                        hovertemplate=f"{name}: k@η = {k_eta}<extra></extra>"))
    figure.add_hline(y=eta, line=dict(color=BASELINE_COLOR, dash="dash", width=1.5),
                     annotation_text=f"η = {eta:g}", annotation_position="bottom right")
    largest = max((len(_spectrum(v)) for v in spectra.values()), default=1)
    _log_axis_ticks(figure, min(largest, max_k or largest))
    figure.update_yaxes(range=[0, 1.03])
    figure.update_layout(legend=dict(x=0.98, xanchor="right", y=0.05, yanchor="bottom"))
    return figure


def _log_axis_ticks(figure: go.Figure, largest: int) -> None:
    """Log x axis from 1 to ``largest`` with 1-2-5 ticks (no cluttered minor labels)."""
    ticks = [m * 10**e for e in range(0, 7) for m in (1, 2, 5) if m * 10**e <= largest]
    figure.update_xaxes(type="log", tickvals=ticks, ticktext=[str(t) for t in ticks],
                        range=[-0.03, np.log10(max(largest, 2)) + 0.03])


def _kind_order(kinds: Sequence[str]) -> list[str]:
    present = list(dict.fromkeys(kinds))
    return [k for k in KIND_ORDER if k in present] + [k for k in present if k not in KIND_ORDER]


def layer_kind_heatmap(frame: pd.DataFrame, value: str, title: str, colorbar_title: str, *,
                       diverging: bool = False, zrange: tuple[float, float] | None = None,
                       number_format: str = ".3g", log_colors: bool = False, subtitle: str = "") -> go.Figure:
    """Heatmap layer (y, top = layer 0) x module kind (x) of ``frame[value]``.

    ``frame`` needs columns ``layer``, ``kind`` and ``value``. ``diverging`` centres a red-white-blue
    scale at 0 (for cosines); otherwise Viridis. ``log_colors`` colours by log2 of the value (for
    ratios) while the cells still print the value itself.
    """
    if frame.empty or value not in frame:
        return empty_figure(title, "no data for this metric")
    data = frame.dropna(subset=["layer"]).astype({"layer": int})
    table = data.pivot_table(index="layer", columns="kind", values=value, aggfunc="mean")
    table = table.reindex(columns=_kind_order(list(table.columns))).sort_index()
    z = table.to_numpy(dtype=float)
    colors = np.log2(np.where(z > 0, z, np.nan)) if log_colors else z
    figure = new_figure(title, "module kind", "layer", subtitle)
    heatmap = dict(
        z=colors, x=list(table.columns), y=[str(i) for i in table.index], text=z,
        texttemplate="%{text:" + number_format + "}", textfont=dict(size=12),
        hovertemplate="layer %{y}, %{x}<br>" + value + " = %{text:" + number_format + "}<extra></extra>",
        colorbar=dict(title=dict(text=colorbar_title, side="right")), xgap=2, ygap=2,
    )
    if diverging:
        lo, hi = zrange or (-1.0, 1.0)
        heatmap.update(colorscale=DIVERGING_SCALE, zmid=0, zmin=lo, zmax=hi)
    else:
        heatmap.update(colorscale=SEQUENTIAL_SCALE)
        if log_colors:
            bound = float(np.nanmax(np.abs(colors))) if np.isfinite(colors).any() else 1.0
            ticks = np.arange(-np.ceil(bound), np.ceil(bound) + 1)
            heatmap.update(colorscale="PuOr", zmid=0, zmin=-max(bound, 1), zmax=max(bound, 1),
                           colorbar=dict(title=dict(text=colorbar_title, side="right"), tickvals=ticks,
                                         ticktext=[f"{2 ** t:g}" for t in ticks]))
        elif zrange:
            heatmap.update(zmin=zrange[0], zmax=zrange[1])
    figure.add_trace(go.Heatmap(**heatmap))
    figure.update_yaxes(autorange="reversed", type="category", showgrid=False)
    figure.update_xaxes(type="category", showgrid=False, side="bottom")
    figure.update_layout(height=max(340, (110 if subtitle else 90) + 34 * len(table.index)))
    return figure


def cosine_histogram(cosines: Any, title: str = "Per-pair cosines of safety and utility gradients",
                     bins: int = 40, subtitle: str = "") -> go.Figure:
    """Histogram of cosines in [-1, 1] with a line at 0 and the fraction below 0 written on the plot."""
    values = np.asarray(cosines, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return empty_figure(title, "no cosines to show")
    negative = float(np.mean(values < 0))
    figure = new_figure(title, "cosine cos(G<sub>s</sub>, G<sub>u</sub>) (dimensionless)", "number of pairs", subtitle)
    span = max(float(np.max(np.abs(values))), 1e-3)
    edge = min(1.0, span * 1.05)
    figure.add_trace(go.Histogram(x=values, xbins=dict(start=-edge, end=edge, size=2 * edge / bins),
                                  marker=dict(color=OKABE_ITO["blue"], line=dict(color="white", width=0.5)),
                                  name="pairs", hovertemplate="cos %{x}<br>%{y} pairs<extra></extra>"))
    figure.add_vline(x=0, line=dict(color=OKABE_ITO["vermillion"], dash="dash", width=2))
    figure.add_annotation(text=f"<b>{negative:.0%} negative</b> (n = {values.size}, mean {values.mean():+.3f})",
                          x=0.02, y=0.97, xref="paper", yref="paper", xanchor="left", yanchor="top",
                          showarrow=False, bgcolor="rgba(255,255,255,0.85)", font=dict(size=14))
    figure.update_xaxes(range=[-edge, edge])
    figure.update_layout(bargap=0.02, showlegend=False)
    return figure


def principal_angles_figure(angles: Mapping[str, Any], baseline: Any = None, module: str = "") -> go.Figure:
    """Principal angles (radians in, degrees shown) between subspaces, ascending, vs a random baseline.

    ``angles``: {series name: angles in radians}; ``baseline``: angles of random subspaces of the same
    dimensions (radians), drawn grey and dashed.
    """
    figure = new_figure("Principal angles between safety and utility subspaces", "index i of principal angle",
                        "principal angle θ<sub>i</sub> (degrees)", module)
    for index, (name, values) in enumerate(angles.items()):
        theta = np.degrees(np.sort(np.asarray(values, dtype=float).ravel()))
        figure.add_trace(go.Scatter(x=np.arange(1, theta.size + 1), y=theta, mode="lines+markers", name=str(name),
                                    line=dict(color=COLORWAY[(index + 2) % len(COLORWAY)], width=2.5),
                                    hovertemplate="θ%{x} = %{y:.1f}°<extra>" + str(name) + "</extra>"))
    if baseline is not None:
        theta = np.degrees(np.sort(np.asarray(baseline, dtype=float).ravel()))
        figure.add_trace(go.Scatter(x=np.arange(1, theta.size + 1), y=theta, mode="lines", name="random subspaces",
                                    line=dict(color=BASELINE_COLOR, dash="dash", width=2)))
    figure.update_yaxes(range=[0, 92], dtick=15)
    figure.update_layout(legend=dict(x=0.98, xanchor="right", y=0.05, yanchor="bottom"))
    return figure


def single_sample_figure(frame: pd.DataFrame, sample: str = "", baseline: str | None = "baseline") -> go.Figure:
    """One sample's subspace vs the batch subspace, per layer: overlap phi and |<u1_i, u1>|.

    ``frame`` needs columns ``layer`` and ``phi`` and optionally ``top1_abs_cos`` and ``baseline``
    (random-subspace phi); several modules per layer are averaged.
    """
    title = "Does one sample find the safety subspace?"
    if frame.empty or "phi" not in frame:
        return empty_figure(title, "no single-sample estimates in this run")
    columns = [c for c in ("phi", "top1_abs_cos", baseline) if c and c in frame]
    by_layer = frame.groupby("layer")[columns].mean().reset_index().sort_values("layer")
    figure = new_figure(title, "layer", "agreement with the batch (0 = none, 1 = exact)", sample)
    figure.add_trace(go.Scatter(x=by_layer["layer"], y=by_layer["phi"], mode="lines+markers",
                                name="overlap φ of top-k subspaces", line=dict(color=OKABE_ITO["vermillion"], width=2.5),
                                marker=dict(size=8)))
    if "top1_abs_cos" in by_layer:
        figure.add_trace(go.Scatter(x=by_layer["layer"], y=by_layer["top1_abs_cos"], mode="lines+markers",
                                    name="|⟨u<sub>1,i</sub>, u<sub>1</sub>⟩| top direction",
                                    line=dict(color=OKABE_ITO["orange"], width=2.5, dash="dot"),
                                    marker=dict(size=8, symbol="square")))
    if baseline and baseline in by_layer:
        figure.add_trace(go.Scatter(x=by_layer["layer"], y=by_layer[baseline], mode="lines", name="random subspace",
                                    line=dict(color=BASELINE_COLOR, dash="dash", width=2)))
    figure.update_xaxes(tickvals=list(by_layer["layer"]))
    figure.update_yaxes(range=[0, 1.02])
    figure.update_layout(legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
    return figure


def overlap_vs_n_figure(curve: Mapping[str, Any], module: str = "") -> go.Figure:
    """Overlap phi of an n-sample subspace with the all-sample one vs n, mean with a 5-95 % bootstrap band.

    ``curve`` has keys ``n``, ``mean``, ``q05``, ``q95`` (arrays) and optionally ``baseline`` (random phi)
    and ``top1_mean`` or ``top1`` (mean |<u1_subset, u1>|), as returned by ``geometry.overlap_vs_n`` or
    ``RunResults.overlap_curve``.
    """
    title = "How many samples find the safety subspace?"
    n = np.asarray(curve.get("n", []), dtype=float)
    if n.size == 0:
        return empty_figure(title, "no overlap-vs-n curve in this run")
    figure = new_figure(title, "number of samples n", "overlap φ with the all-sample subspace", module)
    band_color = "rgba(213, 94, 0, 0.18)"
    figure.add_trace(go.Scatter(x=np.concatenate([n, n[::-1]]),
                                y=np.concatenate([np.asarray(curve["q95"]), np.asarray(curve["q05"])[::-1]]),
                                fill="toself", fillcolor=band_color, line=dict(width=0), mode="lines", hoverinfo="skip",
                                name="5–95 % bootstrap band"))
    figure.add_trace(go.Scatter(x=n, y=curve["mean"], mode="lines+markers", name="mean φ",
                                line=dict(color=OKABE_ITO["vermillion"], width=2.5), marker=dict(size=7)))
    top1 = curve.get("top1_mean", curve.get("top1"))
    if top1 is not None:
        figure.add_trace(go.Scatter(x=n, y=top1, mode="lines+markers", name="mean |⟨u<sub>1</sub>, u<sub>1</sub><sup>all</sup>⟩|",
                                    line=dict(color=OKABE_ITO["orange"], width=2, dash="dot"), marker=dict(size=6, symbol="square")))
    if curve.get("baseline") is not None:
        figure.add_hline(y=float(curve["baseline"]), line=dict(color=BASELINE_COLOR, dash="dash", width=2),
                         annotation_text="random subspace", annotation_position="top left")
    if n.max() / max(n.min(), 1) >= 8:
        figure.update_xaxes(type="log", tickvals=n, ticktext=[f"{v:g}" for v in n])
    figure.update_yaxes(range=[0, 1.02])
    figure.update_layout(legend=dict(orientation="h", x=0, y=-0.22, yanchor="top"))
    return figure


def category_bar_figure(frame: pd.DataFrame, category: str, value: str, title: str, y_title: str,
                        series: str | None = None, number_format: str | None = ".2f", subtitle: str = "") -> go.Figure:
    """Bars of ``frame[value]`` per ``frame[category]``, grouped by ``frame[series]`` if given; values printed
    on the bars in ``number_format`` (None: no labels, for crowded charts)."""
    if frame.empty:
        return empty_figure(title, "no data")
    figure = new_figure(title, category.replace("_", " "), y_title, subtitle)
    groups = frame.groupby(series, sort=False) if series else [("", frame)]
    for index, (name, part) in enumerate(groups):
        name = name[0] if isinstance(name, tuple) else name
        figure.add_trace(go.Bar(x=part[category].astype(str), y=part[value], name=str(name) or value,
                                marker_color=series_color(name, index), cliponaxis=False,
                                texttemplate=None if number_format is None else "%{y:" + number_format + "}",
                                textposition="outside"))
    figure.update_layout(barmode="group", showlegend=bool(series))
    figure.update_xaxes(type="category")
    return figure


def metric_by_module_figure(frame: pd.DataFrame, columns: Mapping[str, str], title: str, y_title: str,
                            log_y: bool = False) -> go.Figure:
    """One line per metric column along the module labels (``frame['label']``), e.g. effective rank
    of safety and utility; ``columns`` maps column -> legend name. Used for live views and small runs."""
    if frame.empty:
        return empty_figure(title, "waiting for the first batch")
    figure = new_figure(title, "module", y_title)
    for index, (column, name) in enumerate(columns.items()):
        if column not in frame:
            continue
        figure.add_trace(go.Scatter(x=frame["label"], y=frame[column], mode="lines+markers", name=name,
                                    line=dict(color=series_color(name.split()[0], index), width=2), marker=dict(size=7)))
    figure.update_xaxes(type="category", tickangle=-45)
    if log_y:
        figure.update_yaxes(type="log")
    figure.update_layout(legend=dict(orientation="h", x=1.0, xanchor="right", y=1.02, yanchor="bottom"),
                         margin=dict(t=100))
    return figure
