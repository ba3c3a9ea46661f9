"""What each dashboard page shows, as plain functions of a stored run: figures, tables, one-line answers.

Pages call these and only arrange widgets; the whole-run export (zip, HTML report) calls
:func:`run_figures` / :func:`run_tables`, so a page and its export always agree. ``run`` is an
``analysis.core.store.RunResults`` (or anything with the same attributes). No Streamlit here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.engine import geometry
from analysis.engine.results import ETAS, SETS  # ETAS: the eta values whose k@eta is stored per module
from analysis.engine.sketch import label as projection_label
from analysis.views import figures as fig

RANK_METRICS = {
    "effective_rank": "effective rank exp(H(p)) (directions)",
    "k_eta": "k@η: directions holding η of the energy",
    "stable_rank": "stable rank ‖G‖²_F / s₁² (directions)",
    "top1_energy": "energy in the top direction, CER(1) (fraction)",
}
#: Which way a rank metric points: +1 = a larger value means more directions (higher rank); -1 = a larger
#: value means more energy in the top direction (lower rank). Every caption and answer reads it from here.
RANK_DIRECTION = {"effective_rank": 1, "k_eta": 1, "stable_rank": 1, "top1_energy": -1}


def metric_name(metric: str, eta: float = 0.9) -> str:
    """Short name of a rank metric for titles and sentences, e.g. ``k@0.9``, ``CER(1)``."""
    return {"k_eta": f"k@{eta:g}", "top1_energy": "CER(1)"}.get(metric, metric.replace("_", " "))


def ratio_reading(metric: str, eta: float = 0.9) -> str:
    """How to read the safety/utility ratio of a rank metric (its direction decides which side is lower-rank)."""
    name = metric_name(metric, eta)
    if RANK_DIRECTION[metric] > 0:
        return f"below 1: safety needs fewer directions than utility (smaller {name}, lower-rank); above 1: more"
    return (f"above 1: safety puts more of its energy in its top direction than utility (larger {name}, "
            "lower-rank); below 1: less")


def directions(k: float) -> str:
    """``1 direction``, ``7.5 directions``."""
    return f"{k:g} direction{'' if k == 1 else 's'}"


def eta_column(eta: float) -> str:
    """Table column suffix of k@eta, e.g. 0.9 -> ``k90``."""
    if round(eta, 4) not in ETAS:
        raise ValueError(f"eta must be one of {ETAS} (the values stored per module), got {eta}")
    return f"k{round(eta * 100)}"


def _metric_column(metric: str, eta: float) -> str:
    return eta_column(eta) if metric == "k_eta" else metric


def module_labels(run) -> list[str]:
    """Short labels (``L3.mlp.down``) of the run's modules in model order."""
    return [m.label for m in run.modules]


def default_module(run) -> str:
    """A sensible module to show first: the first with an overlap-vs-n curve, else the middle one."""
    curves = run.curve_modules
    if curves:
        return next(m.label for m in run.modules if m.name == curves[0])
    return run.modules[len(run.modules) // 2].label


def _module(run, label: str):
    name = run.module_name(label)
    return next(m for m in run.modules if m.name == name)


# -------------------------------------------------------------------------------------------------
# Is safety low-rank?
# -------------------------------------------------------------------------------------------------


def spectra(run, module: str) -> dict[str, np.ndarray]:
    """{set: singular values of the set's batch-mean gradient} of one module."""
    return {which: run.singular_values(module, which) for which in SETS}


def module_intervals(run):
    """Per-module statistics with 95% intervals, p-values and Benjamini-Hochberg significance
    (``analysis.views.findings.module_table``), or None for a run without a folder of results (e.g. a table
    made by hand). Computed once per run object."""
    from analysis.views import findings as fv

    cache = getattr(run, "_cache", None)
    if isinstance(cache, dict) and "module_intervals" in cache:
        return cache["module_intervals"]
    try:
        frame = fv.module_table(run)
    except (AttributeError, OSError, KeyError, TypeError):
        return None
    if isinstance(cache, dict):
        cache["module_intervals"] = frame
    return frame


def spectra_figures(run, module: str, eta: float = 0.9, normalise: bool = True) -> tuple[go.Figure, go.Figure]:
    """(singular spectra on a log axis, CER(k) curves with the eta line) of one module, safety vs utility; the
    CER figure carries the 95% intervals of k@0.9 (stored for eta = 0.9) when the run has them."""
    from analysis.views import evidence_figures as efig

    values = spectra(run, module)
    cer = fig.cer_figure(values, eta, module)
    modules = module_intervals(run)
    if modules is not None:
        cer = efig.cer_with_interval(cer, modules, module, eta)
    return fig.spectra_figure(values, module, normalise=normalise), cer


def rank_heatmaps(run, metric: str = "k_eta", eta: float = 0.9) -> dict[str, go.Figure]:
    """Layer x module-kind heatmaps of a rank metric for safety, utility, and their ratio safety/utility
    (its subtitle says which side of 1 is lower-rank for this metric, see RANK_DIRECTION)."""
    column = _metric_column(metric, eta)
    title_metric = RANK_METRICS[metric].replace("η", f"η={eta:g}")
    name = metric_name(metric, eta)
    table = run.table
    out = {}
    for which in SETS:
        frame = table.assign(value=table[f"{which}_{column}"])
        out[which] = fig.layer_kind_heatmap(frame, "value", f"{which.capitalize()} gradient", name,
                                            number_format=".0f" if metric == "k_eta" else ".3g", subtitle=title_metric)
    ratio = table[f"safety_{column}"] / table[f"utility_{column}"].replace(0, np.nan)
    out["ratio"] = fig.layer_kind_heatmap(table.assign(value=ratio), "value", f"Safety / utility ratio of {name}",
                                          "ratio (log colour)", log_colors=True, number_format=".2f",
                                          subtitle=ratio_reading(metric, eta))
    tested = {"k_eta": "diff_k90", "effective_rank": "diff_effective_rank"}.get(metric)
    modules = module_intervals(run) if tested and (metric != "k_eta" or eta == 0.9) else None
    if modules is not None and f"{tested}_significant" in modules:
        from analysis.views import evidence_figures as efig

        out["ratio"] = efig.significance_heatmap(
            modules.assign(value=ratio.to_numpy()), "value", f"{tested}_significant",
            f"Safety / utility ratio of {name}", "ratio (log colour)", log_colors=True, number_format=".2f",
            subtitle=ratio_reading(metric, eta) + "; ○ safety and utility differ after Benjamini-Hochberg "
                     "(permutation test, α = 0.05)")
    return out


def rank_comparison(run, metric: str = "k_eta", eta: float = 0.9) -> dict[str, Any]:
    """Module-by-module comparison of a rank metric: counts of modules where safety is strictly lower-rank,
    strictly higher-rank, or tied (equal, or a value missing), the median per-module ratio safety/utility, and
    each set's own median / min / max. "Lower-rank" follows RANK_DIRECTION (smaller k, larger CER(1))."""
    column = _metric_column(metric, eta)
    safety, utility = run.table[f"safety_{column}"].astype(float), run.table[f"utility_{column}"].astype(float)
    smaller, larger = int((safety < utility).sum()), int((safety > utility).sum())
    lower, higher = (smaller, larger) if RANK_DIRECTION[metric] > 0 else (larger, smaller)
    ratio = safety / utility.replace(0, np.nan)
    return {"n": len(safety), "lower": lower, "higher": higher, "ties": len(safety) - lower - higher,
            "median_ratio": float(ratio.median()) if ratio.notna().any() else float("nan"),
            "safety": (float(safety.median()), float(safety.min()), float(safety.max())),
            "utility": (float(utility.median()), float(utility.min()), float(utility.max()))}


def _majority(counts: Mapping[str, Any]) -> str:
    """The per-module majority of the point estimates (a strict majority of all modules): a description, not a
    test (the tests are in :func:`_tested_sentence` and on the Findings page)."""
    n = counts["n"]
    if counts["lower"] * 2 > n:
        return f"counted per module, safety is lower-rank than utility in most modules ({counts['lower']} of {n})"
    if counts["higher"] * 2 > n:
        return f"counted per module, safety is higher-rank than utility in most modules ({counts['higher']} of {n})"
    return f"counted per module, neither set is lower-rank in a majority of the {n} modules"


def low_rank_answer(run, eta: float = 0.9, module: str | None = None, metric: str = "k_eta") -> str:
    """One line with numbers, safety vs utility. With ``module``: how many directions hold eta of the energy
    there. Without: the module-by-module comparison of ``metric`` (lower / higher / tied counts, median
    ratio), the verdict from that count, and each set's own median."""
    table = run.table
    column = eta_column(eta)
    if module:
        row = table[table["label"] == module].iloc[0]
        modules = module_intervals(run) if eta == 0.9 else None
        ci = {"safety": "", "utility": ""}
        if modules is not None and modules["safety_k90_lo"].notna().any():
            m = modules[modules["label"] == module].iloc[0]
            certified = {w: np.isfinite(m[f"{w}_k90_lo"]) and np.isfinite(m[f"{w}_k90_hi"]) for w in ci}
            ci = {w: f" (95% CI {m[f'{w}_k90_lo']:.0f}–{m[f'{w}_k90_hi']:.0f})" if certified[w] else "" for w in ci}
            if not all(certified.values()):
                missing = " and ".join(w for w in ci if not certified[w])
                ci["utility"] += (f"; no 95% CI for {missing}: the spectral core does not certify k@0.9 in this "
                                  "module at this n")
        return (f"{module}: {eta:.0%} of the safety gradient's energy lies in k = {int(row[f'safety_{column}'])}"
                f"{ci['safety']} of {min(int(row['d_out']), int(row['d_in']))} directions; utility needs k = "
                f"{int(row[f'utility_{column}'])}{ci['utility']} (effective rank {row['safety_effective_rank']:.1f} vs "
                f"{row['utility_effective_rank']:.1f}).")
    counts = rank_comparison(run, metric, eta)
    name, n = metric_name(metric, eta), counts["n"]
    number = (lambda v: f"{v:g}") if metric == "k_eta" else (lambda v: f"{v:.3g}")
    if RANK_DIRECTION[metric] > 0:
        held = f" to hold {eta:.0%} of the energy" if metric == "k_eta" else ""
        lower = f"safety needs fewer directions than utility{held} (strictly smaller {name})"
    else:
        lower = f"safety puts more of its energy in its top direction than utility (strictly larger {name})"
    (s_med, s_min, s_max), (u_med, u_min, u_max) = counts["safety"], counts["utility"]
    return (f"Module by module, {lower} in {counts['lower']} of {n} modules, the reverse in {counts['higher']}, "
            f"tied in {counts['ties']}; median ratio safety/utility = {counts['median_ratio']:.2f}. "
            f"Described (point estimates, no test): {_majority(counts)}. Each set on its own: safety median {name} = {number(s_med)} "
            f"(range {number(s_min)}–{number(s_max)}), utility median {name} = {number(u_med)} "
            f"(range {number(u_min)}–{number(u_max)}); the two medians are taken separately and need not agree "
            "with the module-by-module count." + _tested_sentence(run, {"k_eta": "diff_k90",
                                                                       "effective_rank": "diff_effective_rank"}
                                                                  .get(metric) if eta == 0.9 or metric != "k_eta"
                                                                  else None, "safety and utility differ",
                                                                  "permutation test"))


def _tested_sentence(run, stat: str | None, what: str, test: str) -> str:
    """' Tested: <what> in X of T tested modules after Benjamini-Hochberg (<test>, alpha = 0.05; A below 0, B
    above); U of M not tested ...' (counts from :func:`analysis.views.findings.significance_counts`), or ''
    when the run has no tests for ``stat``."""
    from analysis.views import findings as fv

    modules = module_intervals(run) if stat else None
    c = fv.significance_counts(modules).get(stat) if modules is not None else None
    if c is None:
        return ""
    if not c["tested"]:
        return (f" Tested: in none of the {c['modules']} modules (the spectral core certifies this statistic in none "
                "at this n); the Findings page tests the claim across modules.")
    untested = c["modules"] - c["tested"]
    return (f" Tested: {what} in {c['significant']} of {c['tested']} tested modules after Benjamini-Hochberg "
            f"({test}, α = 0.05; {c['below']} below 0, {c['above']} above)"
            + (f"; {untested} of {c['modules']} modules not tested (not certified by the spectral core)" if untested
               else "") + "; the Findings page tests the claim across modules.")


# -------------------------------------------------------------------------------------------------
# Do safety and utility fight?
# -------------------------------------------------------------------------------------------------


def cosine_heatmap(run) -> go.Figure:
    """cos(G_safety, G_utility) of the batch-mean gradients per layer x module kind, centred at 0."""
    from analysis.views import evidence_figures as efig

    modules = module_intervals(run)
    subtitle = "batch-mean gradients; red = conflict (cosine < 0)"
    if modules is None or "cosine_su_zero_significant" not in modules:
        return fig.layer_kind_heatmap(run.table, "cosine_su", "Cosine of safety and utility gradients",
                                      "cosine", diverging=True, number_format="+.2f", subtitle=subtitle)
    return efig.significance_heatmap(modules, "cosine_su", "cosine_su_zero_significant",
                                     "Cosine of safety and utility gradients", "cosine", diverging=True,
                                     number_format="+.2f", subtitle=subtitle + "; ○ cosine ≠ 0 after "
                                     "Benjamini-Hochberg (bootstrap test, α = 0.05)")


def fraction_negative_heatmap(run) -> go.Figure:
    """Fraction of negative per-sample-pair cosines per layer x module kind."""
    return fig.layer_kind_heatmap(run.table, "cross_cos_frac_negative",
                                  "Conflicting sample pairs (cosine < 0)",
                                  "fraction", zrange=(0.0, 1.0), number_format=".0%",
                                  subtitle="per-sample gradients, all safety × utility pairs")


def cross_cosines(run, module: str) -> np.ndarray:
    """(n_safety, n_utility) cosines between every safety and every utility per-sample gradient."""
    cosines = run.sample_cosines(module)
    return cosines[run.set_slice("safety"), run.set_slice("utility")]


def cross_cosine_histogram(run, module: str) -> go.Figure:
    return fig.cosine_histogram(cross_cosines(run, module), "Per-sample-pair cosines, safety × utility",
                                subtitle=module)


def conflict_answer(run, module: str | None = None) -> str:
    """One line: batch cosine and fraction of conflicting pairs (one module or across modules)."""
    table = run.table
    if module:
        row = table[table["label"] == module].iloc[0]
        modules = module_intervals(run)
        interval = ""
        if modules is not None and modules["cosine_su_lo"].notna().any():
            m = modules[modules["label"] == module].iloc[0]
            interval = (f" (95% CI {m['cosine_su_lo']:+.3f} to {m['cosine_su_hi']:+.3f}, p = "
                        f"{m['cosine_su_zero_p']:.3f} against 0, BH-adjusted {m['cosine_su_zero_q']:.3f})")
        return (f"{module}: cos(G_safety, G_utility) = {row['cosine_su']:+.3f}{interval}; "
                f"{row['cross_cos_frac_negative']:.0%} "
                f"of safety x utility sample pairs point against each other (mean pair cosine "
                f"{row['cross_cos_mean']:+.3f}); subspace overlap φ = {row['phi_su']:.3f} vs "
                f"{row['phi_baseline']:.3f} for random subspaces.")
    negative = int((table["cosine_su"] < 0).sum())
    return (f"The batch safety and utility gradients conflict (cosine < 0) in {negative} of {len(table)} modules "
            f"(median cosine {table['cosine_su'].median():+.3f}); across modules a median "
            f"{table['cross_cos_frac_negative'].median():.0%} of sample pairs conflict."
            + _tested_sentence(run, "cosine_su_zero", "the cosine differs from 0", "bootstrap test"))


def random_principal_angles(d: int, k: int, draws: int = 20, seed: int = 0) -> np.ndarray:
    """Mean sorted principal angles (radians) between a fixed and a Haar-random k-dim subspace of R^d."""
    rng = np.random.default_rng(seed)
    fixed = np.eye(d)[:, :k]
    angles = [geometry.principal_angles(fixed, rng.standard_normal((d, k))) for _ in range(draws)]
    return np.mean(angles, axis=0)


def principal_angles_figure(run, module: str) -> go.Figure:
    """Principal angles between the safety and utility top-k left subspaces vs random subspaces."""
    angles = run.principal_angles(module)
    info = _module(run, module)
    baseline = random_principal_angles(info.d_out, min(angles.size, info.d_out)) if angles.size else None
    return fig.principal_angles_figure({"safety vs utility": angles}, baseline, module)


def overlap_heatmap(run) -> go.Figure:
    """phi of the safety and utility top-k subspaces per layer x module kind; the random value k/d in the
    subtitle."""
    baseline = run.table["phi_baseline"]
    return fig.layer_kind_heatmap(run.table, "phi_su", "Overlap φ of safety and utility subspaces", "φ",
                                  zrange=(0.0, 1.0), number_format=".2f",
                                  subtitle=f"top-{run.top_k} left singular subspaces; random subspaces: φ = k/d = "
                                           f"{baseline.min():.3f}–{baseline.max():.3f}")


def category_conflicts(run, module: str) -> pd.DataFrame:
    """Mean cross cosine and fraction negative per safety-sample category (one module)."""
    cosines = cross_cosines(run, module)
    samples = run.samples.iloc[run.set_slice("safety")]
    frame = pd.DataFrame({"category": samples["category"].fillna("no category").to_numpy(),
                          "mean_cosine": cosines.mean(axis=1), "fraction_negative": (cosines < 0).mean(axis=1)})
    return frame.groupby("category", sort=True).mean().reset_index()


def category_conflict_figure(run, module: str) -> go.Figure:
    return fig.category_bar_figure(category_conflicts(run, module), "category", "fraction_negative",
                                   "Conflicting pairs by harm category", "fraction of pairs with cosine < 0",
                                   number_format=".0%", subtitle=module)


# -------------------------------------------------------------------------------------------------
# Is one sample enough?
# -------------------------------------------------------------------------------------------------


def sample_scores(run, which: str = "safety") -> pd.DataFrame:
    """One row per sample of a set: id, category, prompt, response, loss and its single-sample overlap
    with the batch subspace averaged over modules (``phi``) and ``top1`` (|<u1_i, u1>|)."""
    samples = run.samples.iloc[run.set_slice(which)].reset_index(drop=True)
    phis = np.stack([run.sample_overlaps(m, which)["phi"] for m in run.module_names])
    top1 = np.stack([run.sample_overlaps(m, which)["top1"] for m in run.module_names])
    columns = [c for c in ("id", "category", "prompt", "response", "n_tokens", "loss") if c in samples]
    out = samples[columns].copy()
    out.insert(0, "position", np.arange(len(samples)))
    out["phi"] = phis.mean(axis=0)
    out["top1"] = top1.mean(axis=0)
    return out


def single_sample_frame(run, position: int, which: str = "safety") -> pd.DataFrame:
    """Per module: layer, kind, label, phi and |<u1_i, u1>| of sample ``position`` of the set, and the
    random-subspace phi."""
    table = run.table.set_index("module")
    rows = []
    for info in run.modules:
        overlaps = run.sample_overlaps(info.name, which)
        rows.append({"module": info.name, "label": info.label, "layer": info.layer, "kind": info.kind,
                     "phi": float(overlaps["phi"][position]), "top1_abs_cos": float(overlaps["top1"][position]),
                     "baseline": float(table.loc[info.name, "phi_baseline"])})
    return pd.DataFrame(rows)


def single_sample_figure(run, position: int, which: str = "safety") -> go.Figure:
    sample = run.samples.iloc[run.set_slice(which)].iloc[position]
    return fig.single_sample_figure(single_sample_frame(run, position, which), f"{which} sample {sample['id']}, "
                                    f"top-{run.top_k} subspaces, averaged over module kinds per layer")


def overlap_curve_figure(run, module: str) -> go.Figure:
    curve = run.overlap_curve(module)
    return fig.overlap_vs_n_figure(curve or {}, module)


def curve_labels(run) -> list[str]:
    """Labels of the modules that have an overlap-vs-n curve."""
    names = set(run.curve_modules)
    return [m.label for m in run.modules if m.name in names]


def single_sample_summary(run, which: str = "safety") -> dict[str, float]:
    """The one definition of the single-sample summaries every page and export shows: phi (and |<u1_i, u1>|) =
    the median over modules of the per-module mean over the set's samples (``analysis.engine.evidence``
    SUMMARIES "median_sample_phi"), with its 95% bootstrap interval over prompts when the run has one."""
    from analysis.engine import evidence as ev
    from analysis.engine.resampling import load_evidence

    table = run.table
    out = {"phi": float(table[f"{which}_sample_phi_mean"].astype(float).median()),
           "top1": float(table[f"{which}_sample_top1_mean"].astype(float).median()),
           "phi_lo": float("nan"), "phi_hi": float("nan"), "top1_lo": float("nan"), "top1_hi": float("nan")}
    if which == "safety":
        try:
            evidence = load_evidence(run)
        except (OSError, KeyError, ValueError):
            return out
        for key, name in (("median_sample_phi", "phi"), ("median_sample_top1", "top1")):
            result = ev.summary(table, evidence, key)
            out[f"{name}_lo"], out[f"{name}_hi"] = result.lo, result.hi
    return out


def single_sample_answer(run, which: str = "safety") -> str:
    """One line: the single-sample phi and |<u1_i, u1>| as :func:`single_sample_summary` defines them (the
    Findings page shows the same numbers), the random baseline, and the spread over samples."""
    scores = sample_scores(run, which)
    summary = single_sample_summary(run, which)
    baseline = run.table["phi_baseline"].median()

    def interval(name: str) -> str:
        lo, hi = summary[f"{name}_lo"], summary[f"{name}_hi"]
        return f" (95% CI {lo:.2f}–{hi:.2f})" if np.isfinite(lo) else ""

    return (f"A single {which} sample's top-{run.top_k} subspace overlaps the {len(scores)}-sample one with "
            f"φ = {summary['phi']:.3f}{interval('phi')} (median over {len(run.table)} modules of the mean over "
            f"samples; random subspaces: {baseline:.3f}); its top direction matches with |⟨u₁ᵢ, u₁⟩| = "
            f"{summary['top1']:.3f}{interval('top1')} (same averaging). Per sample (mean over modules): best "
            f"φ = {scores['phi'].max():.2f}, worst {scores['phi'].min():.2f}.")


def best_and_worst(scores: pd.DataFrame, count: int = 5, column: str = "phi") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(best, worst) rows of ``scores`` by ``column``, at most ``count`` each and never the same sample in
    both: with n samples each gets min(count, n // 2) rows (one sample of an odd n stays in neither)."""
    ranked = scores.sort_values(column, ascending=False)
    each = min(count, len(ranked) // 2) if len(ranked) > 1 else len(ranked)
    worst = ranked.tail(each).iloc[::-1] if len(ranked) > 1 else ranked.iloc[0:0]
    return ranked.head(each), worst


# -------------------------------------------------------------------------------------------------
# Runs: summaries, comparison, export
# -------------------------------------------------------------------------------------------------


def run_summary(run) -> dict[str, Any]:
    """Flat description of a run for tables and the sidebar."""
    config, manifest = run.config, run.manifest
    model = manifest.get("model", {})
    return {"run_id": run.run_id, "model": model.get("name") or config.get("model", {}).get("source"),
            "safety": f"{config.get('safety')} (n={config.get('n_safety')})",
            "utility": f"{config.get('utility')} (n={config.get('n_utility')})",
            "modules": len(run.modules), "layers": config.get("layers"), "kinds": config.get("kinds"),
            "max_length": config.get("max_length"), "top_k": run.top_k, "seed": config.get("seed"),
            "created": manifest.get("created"), "projection": projection_label(manifest)}


def projection_notice(run) -> str | None:
    """What a projected run's numbers mean (None for an exact run): shown above every result page."""
    projection = run.manifest.get("projection")
    if not projection:
        return None
    return (f"**Projected run** (random sketch to p = {projection['dim']} dims, {len(projection['modules'])} of "
            f"{len(run.modules)} modules): singular values, CER, ranks and cosines of those modules are "
            "Johnson-Lindenstrauss estimates; principal angles, overlaps φ and singular vectors are those of the "
            "sketched gradients, not of weight space.")


def truncation_notice(run) -> str | None:
    """How many samples were cut to ``max_length`` tokens (None when none were): shown above every result page,
    since a cut response carries less of its loss."""
    count = int(run.manifest.get("n_truncated") or 0)
    if not count:
        return None
    total = int(run.config.get("n_safety", 0)) + int(run.config.get("n_utility", 0))
    return (f"{count} of {total} samples were longer than the sequence length ({run.config.get('max_length')} "
            "tokens) and were truncated: their gradients come from the kept tokens only. Collect with a larger "
            "sequence length to use them whole.")


COMPARE_METRICS = {
    "safety_effective_rank": "safety effective rank", "utility_effective_rank": "utility effective rank",
    "safety_k90": "safety k@0.9", "utility_k90": "utility k@0.9", "cosine_su": "cos(safety, utility)",
    "cross_cos_frac_negative": "fraction of conflicting pairs", "phi_su": "overlap φ safety/utility",
    "safety_sample_phi_mean": "single-sample φ (safety)",
}


def compare_runs(runs: Mapping[str, Any], metric: str) -> pd.DataFrame:
    """Long table (run, label, layer, kind, value) of one table column for several runs."""
    frames = []
    for name, run in runs.items():
        table = run.table
        frames.append(pd.DataFrame({"run": name, "label": table["label"], "layer": table["layer"],
                                    "kind": table["kind"], "value": table[metric]}))
    return pd.concat(frames, ignore_index=True)


def run_legend(run) -> str:
    """A run as a legend entry: ``<run id> · <model> · n = <safety>+<utility>``."""
    summary = run_summary(run)
    return (f"{run.run_id} · {summary['model']} · n = {run.config.get('n_safety')}+"
            f"{run.config.get('n_utility')}")


def compare_figure(runs: Mapping[str, Any], metric: str) -> go.Figure:
    """The metric per module, one line per run (legend: run id, model and sample counts)."""
    long = compare_runs(runs, metric)
    wide = long.pivot_table(index="label", columns="run", values="value", sort=False).reset_index()
    return fig.metric_by_module_figure(wide, {name: run_legend(run) for name, run in runs.items()},
                                       f"{COMPARE_METRICS.get(metric, metric)} by run",
                                       COMPARE_METRICS.get(metric, metric))


def metric_heatmap(run, metric: str, title: str | None = None) -> go.Figure:
    """Layer x module-kind heatmap of any per-module table column (diverging at 0 for cosines)."""
    name = COMPARE_METRICS.get(metric, metric)
    cosine = "cos" in metric
    return fig.layer_kind_heatmap(run.table, metric, title or name, name.split(" (")[0], diverging=cosine,
                                  number_format="+.2f" if cosine else ".3g", subtitle=f"run {run.run_id}")


#: Overlap-vs-n curves in a whole-run export (the first modules that have one).
EXPORT_CURVES = 4


def export_choices(run, eta: float = 0.9, module: str | None = None) -> dict[str, Any]:
    """What a whole-run export contains and which choices it uses (``module`` None: the stated default,
    :func:`default_module`). Written into the export's report and manifest."""
    module = module or default_module(run)
    return {"module (spectra, CER, pair cosines, principal angles)": module,
            "η (k@η heatmaps and answers)": eta,
            "rank heatmaps": f"k@{eta:g} and effective rank: safety, utility, ratio",
            "overlap-vs-n curves": ", ".join(curve_labels(run)[:EXPORT_CURVES]) or "none in this run",
            "layer × module-kind heatmaps": "cosine, conflicting pairs, overlap φ (all modules)"}


def run_figures(run, eta: float = 0.9, module: str | None = None) -> dict[str, go.Figure]:
    """Every figure of a run by file-name-safe name (for the zip and the HTML report): per-module figures of
    ``module`` (None: :func:`default_module`), k@eta heatmaps at ``eta``; see :func:`export_choices`."""
    module = module or default_module(run)
    spectrum, cer = spectra_figures(run, module, eta)
    out = {f"spectra_{module}": spectrum, f"cer_{module}": cer}
    for name, figure in rank_heatmaps(run, "k_eta", eta).items():
        out[f"k{round(eta * 100)}_{name}"] = figure
    for name, figure in rank_heatmaps(run, "effective_rank", eta).items():
        out[f"effective_rank_{name}"] = figure
    out["cosine_heatmap"] = cosine_heatmap(run)
    out["fraction_negative_heatmap"] = fraction_negative_heatmap(run)
    out[f"pair_cosines_{module}"] = cross_cosine_histogram(run, module)
    out[f"principal_angles_{module}"] = principal_angles_figure(run, module)
    out["overlap_heatmap"] = overlap_heatmap(run)
    for label in curve_labels(run)[:EXPORT_CURVES]:
        out[f"overlap_vs_n_{label}"] = overlap_curve_figure(run, label)
    modules = module_intervals(run)
    if modules is not None:
        from analysis.views import evidence_figures as efig

        for claim, figure in efig.claim_figures(run).items():
            out[f"null_claim_{claim}"] = figure
        out["module_diff_k90"] = efig.module_interval_figure(modules, "diff_k90", "k@0.9, safety − utility",
                                                             "directions", "diff_k90_significant")
        out["module_cosine"] = efig.module_interval_figure(modules, "cosine_su", "cos(G_s, G_u)", "cosine",
                                                           "cosine_su_zero_significant")
    return out


def run_answers(run, eta: float = 0.9, module: str | None = None) -> list[str]:
    """The one-line answers of every page, for the report (with ``module``: its own answers too)."""
    answers = [f"Is safety low-rank? {low_rank_answer(run, eta)}"]
    if module:
        answers.append(f"Is safety low-rank in {module}? {low_rank_answer(run, eta, module)}")
    answers.append(f"Do safety and utility fight? {conflict_answer(run)}")
    if module:
        answers.append(f"Do they fight in {module}? {conflict_answer(run, module)}")
    answers.append(f"Is one sample enough? {single_sample_answer(run)}")
    if module_intervals(run) is not None:
        from analysis.views import findings as fv

        answers.append("Findings (decided by tests). " + fv.findings(run)[1].replace("\n", " "))
    return answers


def run_tables(run) -> dict[str, pd.DataFrame]:
    """The run's tables: per-module metrics and per-sample metadata with single-sample scores."""
    tables = {"modules": run.table, "samples": run.samples,
              "single_sample_safety": sample_scores(run, "safety").drop(columns=["prompt", "response"],
                                                                        errors="ignore")}
    modules = module_intervals(run)
    if modules is not None:  # the intervals, p-values and verdicts travel with every export
        from analysis.views import findings as fv

        tables["findings"] = fv.findings(run)[0]
        tables["module_intervals"] = modules
    return tables


# -------------------------------------------------------------------------------------------------
# Live view of a running collection
# -------------------------------------------------------------------------------------------------


def live_table(table: Any) -> pd.DataFrame | None:
    """The finished-modules table of a live snapshot as a DataFrame: given as ``{"columns", "data"}`` (what the
    engine sends), a list of records, or a DataFrame; None when there is none."""
    if table is None:
        return None
    if isinstance(table, pd.DataFrame):
        return table
    if isinstance(table, Mapping):
        return pd.DataFrame(table.get("data") or [], columns=table.get("columns"))
    return pd.DataFrame(list(table))


def _values(values: Any) -> np.ndarray | None:
    """A spectrum of the live snapshot (list or array) as a float array, None when missing or empty."""
    if values is None or not np.size(values):
        return None
    return np.asarray(values, dtype=float)


def live_answer(snapshot: Mapping[str, Any], eta: float = 0.9) -> str | None:
    """One line from a running collection's preview: k@eta of safety (and utility) so far per module.

    ``snapshot``: the ``live`` data of the engine's progress events (``analysis.engine.collect.LIVE_KEYS``),
    as sent or read back from JSON."""
    labels = snapshot.get("labels") or {}
    parts = []
    for name, entry in (snapshot.get("preview") or {}).items():
        ks = {which: geometry.k_at_energy(_values(entry.get(which)), eta) for which in SETS
              if _values(entry.get(which)) is not None}
        if "safety" in ks:
            parts.append(f"{entry.get('label') or labels.get(name, name)}: safety k = {ks['safety']}"
                         + (f", utility k = {ks['utility']}" if "utility" in ks else ""))
    if not parts:
        return None
    return (f"So far ({snapshot.get('done_samples')} of {snapshot.get('total_samples')} samples), the number of "
            f"directions k holding {eta:.0%} of the gradient energy — " + "; ".join(parts) + ".")


def live_figures(snapshot: Mapping[str, Any], eta: float = 0.9) -> list[go.Figure]:
    """Charts of a running collection: CER so far of a preview module and effective rank / cosine so far
    per preview module (capture), or the finished modules' metrics (analysis). ``snapshot`` as in
    :func:`live_answer`."""
    table = live_table(snapshot.get("table"))
    if table is not None and len(table):
        return [fig.metric_by_module_figure(table, {"safety_effective_rank": "safety effective rank",
                                                    "utility_effective_rank": "utility effective rank"},
                                            "Effective rank of finished modules", "effective rank (directions)"),
                fig.metric_by_module_figure(table, {"cosine_su": "cosine safety/utility"},
                                            "Cosine of safety and utility gradients, finished modules",
                                            "cosine (dimensionless)")]
    preview = snapshot.get("preview") or {}
    labels = snapshot.get("labels") or {}
    rows, first = [], None
    for name, entry in preview.items():
        label = entry.get("label") or labels.get(name, name)
        safety, utility = _values(entry.get("safety")), _values(entry.get("utility"))
        cosine = entry.get("cosine")
        row = {"label": label, "cosine": float("nan") if cosine is None else float(cosine)}
        for which, values in (("safety", safety), ("utility", utility)):
            if values is not None:
                row[f"{which}_effective_rank"] = geometry.effective_rank(values)
        rows.append(row)
        if first is None and safety is not None:
            first = (label, {k: v for k, v in (("safety", safety), ("utility", utility)) if v is not None})
    if not rows:
        return []
    frame = pd.DataFrame(rows)
    out = []
    if first is not None:
        out.append(fig.cer_figure(first[1], eta, f"{first[0]} (so far)"))
    out.append(fig.metric_by_module_figure(frame, {"safety_effective_rank": "safety", "utility_effective_rank": "utility"},
                                           "Effective rank so far", "effective rank (directions)"))
    if frame["cosine"].notna().any():
        out.append(fig.metric_by_module_figure(frame, {"cosine": "cosine safety/utility"}, "Cosine so far",
                                               "cosine (dimensionless)"))
    return out
