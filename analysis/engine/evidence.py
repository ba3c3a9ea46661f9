"""Tests and intervals of a run's claims from its :class:`~analysis.engine.resampling.Evidence` (pure numbers).

Per module (:func:`module_evidence`): each statistic's point estimate (the run's table, exact), its 95%
percentile bootstrap interval, and p-values: permutation (null: safety and utility samples exchangeable) for
PERM_STATS, bootstrap against 0 for the cosine; adjusted across modules by Benjamini-Hochberg (false discovery
rate, MULTIPLE_COMPARISONS) and marked significant at ALPHA.

Across modules (:func:`summary`): a summary over modules (median, share) is recomputed in every bootstrap
replicate and every permutation. All modules share those rows (the same prompts drawn), so the interval and the
p-value resample prompts, not modules. Each summary names its statistic, test and null value in SUMMARIES.

One definition per quantity: SUMMARIES is where the pages, the findings table and the exports read what a
summary is (e.g. single-sample phi = the median over modules of the per-module mean over safety samples).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd

from analysis.core.stats import benjamini_hochberg
from analysis.engine.geometry import resampling as rs
from analysis.engine.resampling import Evidence

__all__ = ["ALPHA", "MODULE_STATS", "MULTIPLE_COMPARISONS", "SUMMARIES", "Summary", "SummaryResult",
           "module_evidence", "observed_column", "summary"]

ALPHA = 0.05
MULTIPLE_COMPARISONS = "Benjamini-Hochberg (false discovery rate 5% across the run's modules)"

#: Per-module statistics shown with intervals: stat -> (table column of the exact point estimate, or a pair
#: whose difference it is, and the name in words).
MODULE_STATS = {
    "safety_k90": ("safety_k90", "safety k@0.9"),
    "utility_k90": ("utility_k90", "utility k@0.9"),
    "diff_k90": (("safety_k90", "utility_k90"), "k@0.9 safety − utility"),
    "safety_effective_rank": ("safety_effective_rank", "safety effective rank"),
    "utility_effective_rank": ("utility_effective_rank", "utility effective rank"),
    "diff_effective_rank": (("safety_effective_rank", "utility_effective_rank"), "effective rank safety − utility"),
    "safety_stable_rank": ("safety_stable_rank", "safety stable rank"),
    "utility_stable_rank": ("utility_stable_rank", "utility stable rank"),
    "safety_cer": (None, "safety CER(k)"),
    "utility_cer": (None, "utility CER(k)"),
    "cosine_su": ("cosine_su", "cos(G_s, G_u)"),
    "phi_su": ("phi_su", "overlap φ safety/utility"),
    "cross_cos_frac_negative": ("cross_cos_frac_negative", "share of sample pairs with cosine < 0"),
    "safety_sample_phi_mean": ("safety_sample_phi_mean", "single-sample φ (mean over safety samples)"),
    "safety_sample_top1_mean": ("safety_sample_top1_mean", "single-sample |⟨u1_i, u1⟩| (mean over safety samples)"),
    "utility_sample_phi_to_safety_mean": (None, "utility sample's φ to the safety batch (mean)"),
    "diff_sample_phi": (None, "single-sample φ safety − utility sample"),
    "safety_gram_effective_rank": ("safety_gram_effective_rank", "safety sample-span effective rank"),
    "utility_gram_effective_rank": ("utility_gram_effective_rank", "utility sample-span effective rank"),
    "diff_gram_effective_rank": (("safety_gram_effective_rank", "utility_gram_effective_rank"),
                                 "sample-span effective rank safety − utility"),
}


def observed_column(table: pd.DataFrame, stat: str, evidence: Evidence | None = None) -> np.ndarray:
    """Exact point estimate of a per-module statistic (M,), from the table (or, for statistics the table lacks,
    the value the resampling computed at the observed sample); NaN for modules whose replicates of it were
    dropped (``Evidence.masked``: the spectral core was not exact enough), so summaries cover the tested ones."""
    values = _observed(table, stat, evidence)
    if evidence is not None and stat in evidence.masked:  # not tested where the core is not exact enough
        values = np.where(evidence.masked[stat], np.nan, values)
    return values


def _observed(table: pd.DataFrame, stat: str, evidence: Evidence | None) -> np.ndarray:
    source = MODULE_STATS.get(stat, (None, ""))[0]
    if isinstance(source, tuple):
        return table[source[0]].astype(float).to_numpy() - table[source[1]].astype(float).to_numpy()
    if source is not None and source in table:
        return table[source].astype(float).to_numpy()
    if evidence is not None and stat in evidence.core:
        return np.asarray(evidence.core[stat], dtype=float)
    if evidence is not None and stat in evidence.boot:  # no exact value stored: the bootstrap mean
        return np.nanmean(evidence.boot[stat], axis=1)
    return np.full(len(table), np.nan)


def module_evidence(table: pd.DataFrame, evidence: Evidence, stats: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per module: module, label, then per statistic ``<stat>`` (exact), ``<stat>_lo`` / ``_hi`` (95%
    percentile bootstrap interval), and for tested statistics ``<stat>_p`` (permutation p, two-sided; for
    cos also ``cosine_su_p_zero``: bootstrap p against 0), ``<stat>_q`` (Benjamini-Hochberg) and
    ``<stat>_significant`` (q <= ALPHA). Statistics the run has no replicates for have NaN intervals."""
    out = pd.DataFrame({"module": evidence.modules, "label": evidence.labels})
    for column in ("layer", "kind"):
        if column in table:
            out[column] = table[column].to_numpy()
    for stat in stats or tuple(MODULE_STATS):
        out[stat] = observed_column(table, stat, evidence)
        draws = evidence.boot.get(stat)
        intervals = [rs.percentile_interval(row) for row in draws] if draws is not None else None
        out[f"{stat}_lo"] = [i[0] for i in intervals] if intervals else np.nan
        out[f"{stat}_hi"] = [i[1] for i in intervals] if intervals else np.nan
        if stat in evidence.perm:
            core = evidence.core.get(stat, out[stat].to_numpy())
            p = np.array([rs.permutation_p_value(c, row) for c, row in zip(core, evidence.perm[stat])])
            _add_tests(out, stat, p)
    if "cosine_su" in evidence.boot and (stats is None or "cosine_su" in stats):
        p = np.array([rs.bootstrap_p_value(row, 0.0) for row in evidence.boot["cosine_su"]])
        _add_tests(out, "cosine_su_zero", p)
    return out


def _add_tests(frame: pd.DataFrame, name: str, p: np.ndarray) -> None:
    q = benjamini_hochberg(p)
    frame[f"{name}_p"], frame[f"{name}_q"], frame[f"{name}_significant"] = p, q, q <= ALPHA


# --------------------------------------------------------------------------------------------------
# across-module summaries
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Summary:
    """An across-module summary: ``stat`` (per-module statistic), ``reduce`` ("median" or "share_below" /
    "share_above" a threshold), ``null`` (its value under no effect), ``test``: "permutation" (the summary of
    the permuted per-module statistics; needs stat in PERM_STATS) or "bootstrap" (percentile test of the
    summary's bootstrap distribution against ``null``), and its name in words."""

    stat: str
    reduce: str
    null: float
    test: str
    name: str
    threshold: float = 0.0


SUMMARIES = {
    "median_diff_k90": Summary("diff_k90", "median", 0.0, "permutation",
                               "median over modules of k@0.9 (safety − utility)"),
    "share_lower_k90": Summary("diff_k90", "share_below", float("nan"), "permutation",
                               "share of modules where safety's k@0.9 is smaller"),
    "median_diff_effective_rank": Summary("diff_effective_rank", "median", 0.0, "permutation",
                                          "median over modules of effective rank (safety − utility)"),
    "median_diff_gram_effective_rank": Summary("diff_gram_effective_rank", "median", 0.0, "permutation",
                                               "median over modules of the sample-span effective rank (safety − "
                                               "utility; per-sample gradients, exact from the Gram)"),
    "median_cosine": Summary("cosine_su", "median", 0.0, "bootstrap",
                             "median over modules of cos(G_s, G_u)"),
    "median_pair_share": Summary("cross_cos_frac_negative", "median", 0.5, "bootstrap",
                                 "median over modules of the share of safety × utility sample pairs with cosine < 0"),
    "median_diff_sample_phi": Summary("diff_sample_phi", "median", 0.0, "permutation",
                                      "median over modules of single-sample φ (safety sample − utility sample, "
                                      "each against the safety batch top-k; mean over samples)"),
    "median_sample_phi": Summary("safety_sample_phi_mean", "median", float("nan"), "bootstrap",
                                 "median over modules of the per-module mean single-sample φ (safety)"),
    "median_sample_top1": Summary("safety_sample_top1_mean", "median", float("nan"), "bootstrap",
                                  "median over modules of the per-module mean |⟨u1_i, u1⟩| (safety)"),
}


def _nanmean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (no warning) where a column is all NaN."""
    count = np.isfinite(x).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(x, axis=0) / count, np.nan)


def _reducer(spec: Summary) -> Callable[[np.ndarray], np.ndarray]:
    """Columns (M, R) -> (R,): the summary over modules of each draw (NaN modules ignored)."""
    if spec.reduce == "median":
        def median(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=float)
            out = np.full(x.shape[1], np.nan)
            ok = np.isfinite(x).any(axis=0)
            out[ok] = np.nanmedian(x[:, ok], axis=0)
            return out

        return median
    if spec.reduce == "share_below":
        return lambda x: _nanmean(np.where(np.isnan(x), np.nan, x < spec.threshold))
    if spec.reduce == "share_above":
        return lambda x: _nanmean(np.where(np.isnan(x), np.nan, x > spec.threshold))
    raise ValueError(f"unknown summary reduction {spec.reduce!r}")


@dataclasses.dataclass
class SummaryResult:
    """value (exact per-module values summarised), lo / hi (95% percentile bootstrap over prompts), p (its
    test's two-sided p-value), null (value under no effect; for a permutation test the median of the
    permutation distribution when no fixed value applies), boot (B,) and null_draws (P,) (the distribution
    the p-value is read from: permutation draws, or the bootstrap draws for a bootstrap test), test (words)."""

    name: str
    value: float
    lo: float
    hi: float
    p: float
    null: float
    boot: np.ndarray
    null_draws: np.ndarray
    test: str
    n_modules: int


def summary(table: pd.DataFrame, evidence: Evidence, key: str, null: float | None = None) -> SummaryResult:
    """The across-module summary ``key`` of SUMMARIES with its interval and test. ``null`` overrides the
    summary's null value (e.g. the random-subspace phi). Missing replicates give NaN interval / p."""
    spec = SUMMARIES[key]
    reduce = _reducer(spec)
    values = observed_column(table, spec.stat, evidence)
    value = float(reduce(values[:, None])[0]) if np.isfinite(values).any() else float("nan")
    boot = evidence.boot.get(spec.stat)
    boot_draws = reduce(boot) if boot is not None else np.array([])
    lo, hi = rs.percentile_interval(boot_draws) if boot_draws.size else (float("nan"), float("nan"))
    null_value = spec.null if null is None else null
    n_modules = int(np.isfinite(values).sum())
    if spec.test == "permutation":
        perm = evidence.perm.get(spec.stat)
        if perm is None:
            return SummaryResult(spec.name, value, lo, hi, float("nan"), null_value, boot_draws, np.array([]),
                                 "permutation test (not available for this run)", n_modules)
        draws = reduce(perm)
        core = evidence.core.get(spec.stat)
        observed = float(reduce(np.asarray(core)[:, None])[0]) if core is not None else value
        p = rs.permutation_p_value(observed, draws)
        if not np.isfinite(null_value):
            null_value = float(np.nanmedian(draws))
        test = (f"permutation test, two-sided: safety and utility samples pooled and split at random "
                f"({draws.size} splits, the same split in every module)")
        return SummaryResult(spec.name, value, lo, hi, p, null_value, boot_draws, draws, test, n_modules)
    p = rs.bootstrap_p_value(boot_draws, null_value) if boot_draws.size and np.isfinite(null_value) else float("nan")
    test = (f"bootstrap test, two-sided, against {null_value:.4g}: prompts of each set resampled with "
            f"replacement ({boot_draws.size} replicates, the same prompts in every module)")
    return SummaryResult(spec.name, value, lo, hi, p, null_value, boot_draws, boot_draws, test, n_modules)
