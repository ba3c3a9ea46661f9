"""Findings: each seed claim with our number for one stored run, a verdict and a caveat (no Streamlit).

The claims (about *aligned* chat models) and what we measure for them, per module and then across modules:

* I   "safety is low-rank": safety needs fewer directions than utility to hold 90 % of the batch gradient's
  energy (k@0.9), and has a lower effective rank exp(H(p)).
* II  "safety and utility fight": the batch gradients' cosine cos(G_s, G_u) is negative in many modules, and
  many safety x utility sample pairs have a negative per-sample cosine.
* III "one sample finds the safety subspace": a single safety sample's top-k subspace overlaps the batch's
  (phi in [0, 1]) far above the random-subspace baseline k / d.

:func:`findings` returns the table (one row per measure) and a short text; :func:`findings_text` the text
alone. Thresholds are module constants, so a verdict can always be traced to a number.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["CLAIMS", "FINDINGS_COLUMNS", "MAJORITY", "PAIR_SHARE", "SMALL_N", "STRONG_PHI", "findings", "findings_text"]

#: The claims, as stated by the seeds, keyed by their roman number.
CLAIMS = {
    "I": "Safety gradients are low-rank: fewer directions than utility hold 90% of the energy.",
    "II": "Safety and utility gradients conflict: their cosine is negative in many modules and sample pairs.",
    "III": "One sample finds the safety subspace: its top-k subspace overlaps the batch's far above random.",
}
#: Columns of the findings table. value: our number (float, NaN if undefined); reference: what it is compared
#: with (float or NaN); reading: both in words; verdict: "supported", "partly supported", "not supported";
#: caveat: why to trust the number less (empty if none).
FINDINGS_COLUMNS = ["claim", "statement", "measure", "value", "reference", "reading", "verdict", "caveat"]
#: A share of modules above this is "most modules".
MAJORITY = 0.5
#: Per set, fewer samples than this make a caveat.
SMALL_N = 32
#: Claim II is "partly supported" when some modules have a negative batch cosine, or at least this share of
#: sample pairs has a negative cosine (random directions in high dimension give 50 %).
PAIR_SHARE = 0.25
#: Median single-sample phi at or above this is "finds the subspace" (half of the k directions shared).
STRONG_PHI = 0.5


def _median(series: pd.Series) -> float:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.median()) if len(values) else float("nan")


def _model_caveat(run) -> str:
    model = run.manifest.get("model", {}) if hasattr(run, "manifest") else {}
    source = str(model.get("source", "")) + " " + str(model.get("name", ""))
    if "aligned" in source.lower():
        return ""
    return (f"the run's model ({model.get('source', '?')}) is not marked as aligned; the claims are about aligned "
            "models (build default-aligned on Setup)")


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _claim_one(table: pd.DataFrame, n_s: int, n_u: int, caveat: str) -> list[dict[str, Any]]:
    k_s, k_u = table["safety_k90"].astype(float), table["utility_k90"].astype(float)
    e_s, e_u = table["safety_effective_rank"].astype(float), table["utility_effective_rank"].astype(float)
    m = len(table)
    lower_k, higher_k = int((k_s < k_u).sum()), int((k_s > k_u).sum())
    lower_e = int((e_s < e_u).sum())
    if lower_k > MAJORITY * m and lower_e > MAJORITY * m:
        verdict = "supported"
    elif higher_k > MAJORITY * m and (m - lower_e) > MAJORITY * m:
        verdict = "not supported"
    else:
        verdict = "partly supported"
    small = (f"n = {n_s} + {n_u} is small: the batch gradient's rank is bounded by the tokens of its samples and "
             "k@0.9 grows with n; compare runs at equal n") if min(n_s, n_u) < SMALL_N else ""
    unequal = "the sets have different n, so their ranks are not directly comparable" if n_s != n_u else ""
    note = _join(small, unequal, caveat)
    return [
        {"measure": "k@0.9, median over modules (safety vs utility)", "value": _median(k_s), "reference": _median(k_u),
         "reading": (f"safety k@0.9 = {_median(k_s):g} vs utility {_median(k_u):g} (median); safety needs fewer "
                     f"directions in {lower_k} of {m} modules, more in {higher_k}"),
         "verdict": verdict, "caveat": note},
        {"measure": "effective rank, median over modules (safety vs utility)", "value": _median(e_s),
         "reference": _median(e_u),
         "reading": (f"safety {_median(e_s):.1f} vs utility {_median(e_u):.1f} (median); safety lower in {lower_e} "
                     f"of {m} modules"),
         "verdict": verdict, "caveat": note},
    ]


def _claim_two(table: pd.DataFrame, n_s: int, n_u: int, caveat: str) -> list[dict[str, Any]]:
    cos = table["cosine_su"].astype(float).dropna()
    pairs = table["cross_cos_frac_negative"].astype(float).dropna()
    m = len(cos)
    share_modules = float((cos < 0).mean()) if m else float("nan")
    share_pairs = float(pairs.mean()) if len(pairs) else float("nan")
    if share_modules > MAJORITY:
        verdict = "supported"
    elif share_modules > 0 or share_pairs >= PAIR_SHARE:
        verdict = "partly supported"
    else:
        verdict = "not supported"
    small = (f"only {n_s} x {n_u} = {n_s * n_u} sample pairs per module and batch means of {n_s} and {n_u} samples: "
             "the signs of small cosines are noisy") if min(n_s, n_u) < SMALL_N else ""
    note = _join(small, caveat)
    return [
        {"measure": "share of modules with cos(G_s, G_u) < 0", "value": share_modules, "reference": 0.5,
         "reading": (f"{int((cos < 0).sum())} of {m} modules ({share_modules:.0%}); median cosine "
                     f"{cos.median():+.3f}"),
         "verdict": verdict, "caveat": note},
        {"measure": "share of safety x utility sample pairs with cosine < 0 (mean over modules)", "value": share_pairs,
         "reference": 0.5,
         "reading": f"{share_pairs:.0%} of sample pairs (median module {pairs.median():.0%}); 50% = no preference",
         "verdict": verdict, "caveat": note},
    ]


def _claim_three(table: pd.DataFrame, n_s: int, caveat: str) -> list[dict[str, Any]]:
    phi = _median(table["safety_sample_phi_mean"])
    top1 = _median(table["safety_sample_top1_mean"])
    baseline = _median(table["phi_baseline"])
    q95 = _median(table["phi_baseline_q95"])
    if np.isfinite(phi) and phi >= STRONG_PHI and phi > q95:
        verdict = "supported"
    elif np.isfinite(phi) and phi > q95:
        verdict = "partly supported"
    else:
        verdict = "not supported"
    small = (f"with n = {n_s} each sample is 1/{n_s} of the batch mean it is compared with, which raises phi; "
             "the batch subspace itself is noisy at small n") if n_s < SMALL_N else ""
    note = _join(small, caveat)
    return [
        {"measure": "single-sample phi vs batch (safety; median over modules of the per-module mean)", "value": phi,
         "reference": baseline,
         "reading": (f"phi = {phi:.3f} vs random {baseline:.4f} (95% of random below {q95:.4f}); "
                     f"{phi / baseline:.0f}x random" if baseline > 0 else f"phi = {phi:.3f}"),
         "verdict": verdict, "caveat": note},
        {"measure": "single-sample |<u1_i, u1>| (safety; median over modules)", "value": top1, "reference": np.nan,
         "reading": f"top direction matches with |cos| = {top1:.3f}", "verdict": verdict, "caveat": note},
    ]


def findings(run) -> tuple[pd.DataFrame, str]:
    """(table, text) for one run (``analysis.engine.results.RunResults`` or alike: ``.table``, ``.config``,
    ``.manifest``). table: columns FINDINGS_COLUMNS, two rows per claim (I, II, III); values are medians or
    shares across the run's modules. text: one line per claim with its verdict (markdown)."""
    table = run.table
    n_s, n_u = int(run.config["n_safety"]), int(run.config["n_utility"])
    caveat = _model_caveat(run)
    rows = []
    for claim, claim_rows in (("I", _claim_one(table, n_s, n_u, caveat)), ("II", _claim_two(table, n_s, n_u, caveat)),
                              ("III", _claim_three(table, n_s, caveat))):
        rows += [{"claim": claim, "statement": CLAIMS[claim], **row} for row in claim_rows]
    frame = pd.DataFrame(rows, columns=FINDINGS_COLUMNS)
    return frame, findings_text(run, frame)


def findings_text(run, frame: pd.DataFrame | None = None) -> str:
    """Markdown: the run (model, n, modules) and, per claim, its verdict with the numbers behind it."""
    frame = findings(run)[0] if frame is None else frame
    model = run.manifest.get("model", {}).get("source", "?") if hasattr(run, "manifest") else "?"
    lines = [f"Run `{run.run_id}`: model **{model}**, n = {run.config['n_safety']} safety + "
             f"{run.config['n_utility']} utility samples, {len(run.table)} modules, k = {run.config['top_k']}."]
    for claim, group in frame.groupby("claim", sort=False):
        readings = "; ".join(group["reading"])
        caveat = group["caveat"].iloc[0]
        lines.append(f"- **{claim}** ({group['verdict'].iloc[0]}): {CLAIMS[claim]} Ours: {readings}."
                     + (f" *Caveat: {caveat}.*" if caveat else ""))
    return "\n".join(lines)
