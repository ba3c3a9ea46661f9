"""A watched training run (:mod:`analysis.lab.watch_store`) -> figures, a verdict in words and export tables.

Every builder takes a :class:`~analysis.lab.watch_store.WatchRun` (read from disk, complete or still being
written) and computes no geometry itself: the numbers are those the callback recorded. Shares and overlaps
are dimensionless; the refusal NLL is in nats per token.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.lab.watch_store import WatchRun, WatchRunError, list_watch_runs, read_watch_run, watch_root
from analysis.views.figures import (
    BASELINE_COLOR,
    DIVERGING_SCALE,
    HEIGHT,
    OKABE_ITO,
    SEQUENTIAL_SCALE,
    empty_figure,
    new_figure,
)

#: Per-module metrics the heatmap can show: label, colour-bar title, whether it is signed (diverging scale).
HEATMAP_METRICS = {
    "share": ("Share of the update in the safety subspace", "share", False),
    "cos": ("cos(G_train, G_safety)", "cosine", True),
    "dloss": ("First-order refusal-loss change of the update", "nats", True),
    "drift": ("Safety subspace overlap with step 0 (phi)", "phi", False),
}

__all__ = ["HEATMAP_METRICS", "WatchRunError", "drift_figure", "export_tables", "kinds", "layer_frame", "list_runs",
           "load", "module_heatmap", "random_share", "refusal_figure", "totals_figure", "verdict"]


def list_runs(root: str | Path | None = None) -> pd.DataFrame:
    """The watch runs under ``root`` (default ``<cache>/watch``), newest first."""
    return list_watch_runs(root)


def load(folder: str | Path) -> WatchRun:
    """The run in ``folder`` as it is now (raises ``WatchRunError`` for a folder that is not a watch run)."""
    return read_watch_run(folder)


def default_root() -> Path:
    return watch_root()


def _measured(run: WatchRun) -> pd.DataFrame:
    frame = run.totals
    return frame[frame["cos"].notna()] if "cos" in frame else frame.iloc[0:0]


def random_share(run: WatchRun) -> float:
    """Share of a random direction's energy in a k-dim left subspace, averaged over modules: mean k / d_out."""
    k = run.manifest.get("config", {}).get("k", 8)
    outs = [m["d_out"] for m in run.modules if m.get("d_out")]
    return float(np.mean([min(k, d) / d for d in outs])) if outs else float("nan")


def kinds(run: WatchRun) -> list[str]:
    """Module kinds present, in model order (``q``, ``k``, ..., with ``.A`` / ``.B`` for LoRA factors)."""
    out: list[str] = []
    for module in run.modules:
        kind = _kind_label(module)
        if kind not in out:
            out.append(kind)
    return out


def _kind_label(module: dict) -> str:
    return module["kind"] + (f".{module['factor']}" if module.get("factor") else "")


def layer_frame(run: WatchRun, metric: str, kind: str = "all") -> pd.DataFrame:
    """(layers x recorded steps) of one metric over the layer's modules of ``kind`` ("all": every module),
    aggregated exactly from the per-module values: share = sum share_m g_m^2 / sum g_m^2 (g = ||G_train||),
    cos = sum cos_m g_m s_m / sqrt(sum g_m^2 sum s_m^2) (s = ||G_safety||), dloss = sum, drift = mean."""
    chosen = [j for j, m in enumerate(run.modules) if kind == "all" or _kind_label(m) == kind]
    layers = sorted({run.modules[j]["layer"] for j in chosen if run.modules[j]["layer"] is not None})
    values = run.per_module[metric]
    g, s = run.per_module["grad_norm"], run.per_module["safety_norm"]
    out = np.full((len(layers), len(run.steps)), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        for row, layer in enumerate(layers):
            cols = [j for j in chosen if run.modules[j]["layer"] == layer]
            v, gg, ss = values[:, cols], g[:, cols] ** 2, s[:, cols] ** 2
            ok = np.isfinite(v)
            if metric == "share":
                out[row] = np.where(ok, v * gg, 0).sum(1) / np.where(ok, gg, 0).sum(1)
            elif metric == "cos":
                out[row] = np.where(ok, v * np.sqrt(gg * ss), 0).sum(1) / np.sqrt(gg.sum(1) * ss.sum(1))
            elif metric == "dloss":
                out[row] = np.where(ok, v, 0).sum(1)
            else:
                out[row] = [np.mean(r[np.isfinite(r)]) if np.isfinite(r).any() else np.nan for r in v]
            out[row, ~ok.any(1)] = np.nan
    return pd.DataFrame(out, index=pd.Index([f"L{layer}" for layer in layers], name="layer"),
                        columns=pd.Index(run.steps, name="step"))


def module_heatmap(run: WatchRun, metric: str = "share", kind: str = "all") -> go.Figure:
    """Layers (rows) x recorded steps (columns) of one metric, over the modules of ``kind`` (:func:`layer_frame`)."""
    title, colorbar, signed = HEATMAP_METRICS[metric]
    frame = layer_frame(run, metric, kind)
    if frame.empty or frame.shape[1] == 0:
        return empty_figure(title, "No step recorded yet.")
    values = frame.to_numpy()
    which = "all modules" if kind == "all" else f"{kind} modules"
    figure = new_figure(title, "optimizer step", "layer", subtitle=f"{run.run_id} · per layer, {which}")
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    scale = dict(colorscale=DIVERGING_SCALE, zmid=0.0, zmin=-limit, zmax=limit) if signed else dict(
        colorscale=SEQUENTIAL_SCALE, zmin=0.0, zmax=1.0 if metric in ("share", "drift") else None)
    figure.add_trace(go.Heatmap(z=values, x=[str(s) for s in frame.columns], y=list(frame.index),
                                colorbar=dict(title=colorbar), hoverongaps=False,
                                hovertemplate="step %{x}<br>%{y}<br>%{z:.4g}<extra></extra>", **scale))
    figure.update_yaxes(autorange="reversed", type="category")
    figure.update_xaxes(type="category")
    figure.update_layout(height=max(HEIGHT, 18 * len(frame.index) + 200))
    return figure


def totals_figure(run: WatchRun) -> go.Figure:
    """cos(G_train, G_safety) and the update's share in the safety subspace (all measured modules as one
    vector) over the steps; after a projection too, and the random-direction share (grey, dashed)."""
    frame = _measured(run)
    title = "The update against the safety gradient (all modules)"
    if frame.empty:
        return empty_figure(title, "No step recorded yet.")
    figure = new_figure(title, "optimizer step", "cosine / share", subtitle=run.run_id)
    series = [("cos", "cos(G_train, G_safety)", OKABE_ITO["blue"], "solid"),
              ("share", "share in safety subspace", OKABE_ITO["vermillion"], "solid"),
              ("cos_applied", "cos after the projection", OKABE_ITO["blue"], "dot"),
              ("share_applied", "share after the projection", OKABE_ITO["vermillion"], "dot")]
    for column, name, color, dash in series:
        if column in frame and frame[column].notna().any():
            figure.add_trace(go.Scatter(x=frame["step"], y=frame[column], name=name, mode="lines+markers",
                                        line=dict(color=color, dash=dash)))
    figure.add_hline(y=random_share(run), line=dict(color=BASELINE_COLOR, dash="dash"),
                     annotation_text="random direction (k/d)", annotation_position="bottom right")
    figure.add_hline(y=0.0, line=dict(color="#444444", width=1))
    return _step_axis(figure, frame["step"])


def drift_figure(run: WatchRun) -> go.Figure:
    """Mean overlap phi of each module's safety subspace with its step-0 subspace, and the first-order
    refusal-loss change of each update (second axis)."""
    frame = _measured(run)
    title = "Does the safety subspace move?"
    if frame.empty:
        return empty_figure(title, "No step recorded yet.")
    figure = new_figure(title, "optimizer step", "overlap with step 0 (phi)", subtitle=run.run_id)
    figure.add_trace(go.Scatter(x=frame["step"], y=frame["drift"], name="overlap with step 0",
                                mode="lines+markers", line=dict(color=OKABE_ITO["green"])))
    if "dloss" in frame:
        figure.add_trace(go.Scatter(x=frame["step"], y=frame["dloss"], name="refusal-loss change (1st order)",
                                    mode="lines+markers", line=dict(color=OKABE_ITO["purple"]), yaxis="y2"))
        figure.update_layout(yaxis2=dict(title="nats per update", overlaying="y", side="right", showgrid=False,
                                         tickmode="auto", nticks=6, tickformat=".2g"))  # own ticks, not the left axis
    figure.update_layout(yaxis=dict(range=[0, 1.05]))
    return _step_axis(figure, frame["step"])


def refusal_figure(run: WatchRun) -> go.Figure:
    """Refusal NLL on the held-out harmful prompts and the keyword refusal rate (second axis), and the
    safety batch's refusal loss at every recorded step."""
    frame = run.totals
    title = "Refusals on held-out harmful prompts"
    evals = frame[frame["refusal_nll"].notna()] if "refusal_nll" in frame else frame.iloc[0:0]
    measured = _measured(run)
    if evals.empty and measured.empty:
        return empty_figure(title, "No evaluation recorded yet.")
    figure = new_figure(title, "optimizer step", "refusal NLL (nats/token)", subtitle=run.run_id)
    if not measured.empty:
        figure.add_trace(go.Scatter(x=measured["step"], y=measured["safety_loss"], name="safety batch loss",
                                    mode="lines", line=dict(color=OKABE_ITO["vermillion"], dash="dot")))
    if not evals.empty:
        figure.add_trace(go.Scatter(x=evals["step"], y=evals["refusal_nll"], name="held-out refusal NLL",
                                    mode="lines+markers", line=dict(color=OKABE_ITO["vermillion"])))
        figure.add_trace(go.Scatter(x=evals["step"], y=evals["refusal_rate"], name="keyword refusal rate",
                                    mode="lines+markers", line=dict(color=OKABE_ITO["blue"]), yaxis="y2"))
        figure.update_layout(yaxis2=dict(title="refusal rate", overlaying="y", side="right", range=[0, 1.05],
                                         tickformat=".0%", tickvals=[0, 0.25, 0.5, 0.75, 1], showgrid=False))
    return _step_axis(figure, list(measured["step"]) + list(evals["step"]))


def _step_axis(figure: go.Figure, steps) -> go.Figure:
    """Integer step ticks (every step while there are few) and the legend under the plot."""
    steps = sorted({int(s) for s in steps})
    if 0 < len(steps) <= 20:
        figure.update_xaxes(tickvals=steps)
    figure.update_layout(legend=dict(orientation="h", x=0.0, y=-0.22, xanchor="left", yanchor="top"),
                         margin=dict(b=110))
    return figure


def _fmt(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}"


def _rate(rate: float, n: int) -> str:
    from analysis.core.stats import wilson_interval

    low, high = wilson_interval(round(rate * n), n)
    return f"{rate:.0%} [{low:.0%}, {high:.0%}]"


def verdict(run: WatchRun) -> str:
    """One or two sentences on how the run moved, from its first to its last recorded step."""
    frame = _measured(run)
    status = {"running": "still training", "complete": "finished", "interrupted": "stopped before the end"}.get(
        run.status, run.status)
    if frame.empty:
        return f"No step recorded yet (run {status})."
    first, last = frame.iloc[0], frame.iloc[-1]
    span = f"from step {int(first['step'])} to step {int(last['step'])}"
    a, b = _fmt(first["share"]), _fmt(last["share"])
    moved = f"stayed at {b}" if a == b else f"{'rose' if last['share'] > first['share'] else 'fell'} from {a} to {b}"
    parts = [f"The update's overlap with the safety subspace (share of its energy in the top-k safety directions) "
             f"{moved} by step {int(last['step'])} "
             f"(a random direction: {_fmt(random_share(run))}); cos(G_train, G_safety) went from "
             f"{_fmt(first['cos'])} to {_fmt(last['cos'])}"]
    if "share_applied" in frame and frame["share_applied"].notna().any():
        parts.append(f"after the {run.manifest.get('config', {}).get('mode')} projection the share was "
                     f"{_fmt(last['share_applied'])}")
    parts.append(f"the safety subspace kept an overlap of {_fmt(last['drift'])} with step 0")
    text = "; ".join(parts) + f" ({span}, run {status})."
    evals = run.totals[run.totals["refusal_nll"].notna()] if "refusal_nll" in run.totals else run.totals.iloc[0:0]
    if len(evals) >= 1:
        a, b = evals.iloc[0], evals.iloc[-1]
        n = int(b.get("n_eval", 0) or 0)
        text += (f" Refusal NLL on {n} held-out harmful prompts: {_fmt(a['refusal_nll'])} -> {_fmt(b['refusal_nll'])} "
                 f"nats/token; keyword refusal rate {_rate(a['refusal_rate'], n)} -> {_rate(b['refusal_rate'], n)} "
                 f"(step {int(a['step'])} -> {int(b['step'])}; 95% Wilson intervals, n = {n}).")
    return text


def export_tables(run: WatchRun) -> dict[str, pd.DataFrame]:
    """``totals`` (one row per recorded step) and ``modules`` (long: step, module, layer, kind, metric values)."""
    long = []
    for metric in run.per_module:
        frame = run.module_frame(metric)
        if frame.empty:
            continue
        melted = frame.reset_index().melt(id_vars="step", var_name="module", value_name=metric)
        long.append(melted.set_index(["step", "module"]))
    modules = pd.concat(long, axis=1).reset_index() if long else pd.DataFrame(columns=["step", "module"])
    return {"totals": run.totals.copy(), "modules": modules}


# --------------------------------------------------------------------------------------------------
# command line: ``python -m analysis watch [FOLDER]``
# --------------------------------------------------------------------------------------------------


def add_arguments(parser, command: str) -> None:
    parser.add_argument("folder", nargs="?", help="a watch run folder (default: list the runs under --root)")
    parser.add_argument("--root", default=None, help="folder of watch runs (default: <cache>/watch)")


def run(args) -> int:
    """List the watch runs, or print one run's status, verdict and recorded totals."""
    if not args.folder:
        runs = list_runs(args.root)
        print(runs.to_string(index=False) if not runs.empty else f"no watch run under {args.root or default_root()}")
        return 0
    try:
        watched = load(args.folder)
    except WatchRunError as error:
        print(f"error: {error}")
        return 2
    print(f"{watched.run_id}: {watched.status}, {len(watched.steps)} recorded steps")
    print(verdict(watched))
    columns = [c for c in ("step", "cos", "share", "share_applied", "dloss", "drift", "safety_loss", "refusal_nll",
                           "refusal_rate") if c in watched.totals]
    print(watched.totals[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
