"""Findings: each seed claim decided by a stated test on one stored run (no Streamlit, no maths of its own).

The claims (about *aligned* chat models), each decided by the first of its rows:

* I   "safety is low-rank": the median over modules of k@0.9 (safety − utility) is below 0. Test: permutation
  (safety and utility samples pooled and split at random, the same split in every module). Also the effective
  rank difference and the sample-span effective rank difference (per-sample gradients, exact from the Gram
  matrix, so testable at any n), same test.
* II  "safety and utility fight": the median over modules of cos(G_s, G_u) is below 0. Test: bootstrap over
  prompts against 0. Also the median share of safety × utility sample pairs with a negative cosine, against 50%.
* III "one sample finds the safety subspace": a safety sample's top-k subspace overlaps the safety batch's more
  than an unrelated (utility) sample's does: median over modules of the difference of mean single-sample φ.
  Test: permutation. Also the single-sample φ against random subspaces (k/d) and |⟨u1_i, u1⟩| against random
  directions (sqrt(2 / (π d))), bootstrap tests.

Rule (every row): "supported" when its test rejects at ALPHA = 0.05 in the claimed direction, "contradicted"
when it rejects in the opposite direction, "not shown at this n" otherwise; "not tested" when the run has no
replicates for it (stored before resampling existed). Every row carries the 95% interval (bootstrap over
prompts), the p-value, the rule in words and the n per set at which the interval would exclude the null value
(an extrapolation from the bootstrap spread, labelled an estimate). Definitions: ``analysis.engine.evidence``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from analysis.engine import evidence as ev
from analysis.engine.geometry import resampling as rs
from analysis.engine.resampling import Evidence, load_evidence

__all__ = ["ALPHA", "CLAIMS", "ROWS", "claim_results", "FINDINGS_COLUMNS", "MODULE_TESTS", "SMALL_N", "VERDICTS",
           "claim_verdicts", "findings", "findings_text", "format_value", "module_table", "significance_counts",
           "significance_lines", "verdict"]

ALPHA = ev.ALPHA
#: The claims, as stated by the seeds, keyed by their roman number.
CLAIMS = {
    "I": "Safety gradients are low-rank: fewer directions than utility hold 90% of the energy.",
    "II": "Safety and utility gradients conflict: their cosine is negative.",
    "III": "One sample finds the safety subspace: its top-k subspace overlaps the batch's far above chance.",
}
VERDICTS = ("supported", "contradicted", "not shown at this n", "not tested")
#: Columns of the findings table. value: the deciding statistic (exact point estimate); lo / hi: its 95%
#: bootstrap interval; null: its value under no effect; n: samples per set ("32 + 32"); test: how p_value is
#: computed; rule: the verdict rule in words; n_needed: estimated n per set for the interval to exclude the
#: null (inf: no effect seen; NaN: no interval); shown: value and interval in words with units.
FINDINGS_COLUMNS = ["claim", "statement", "measure", "value", "lo", "hi", "null", "n", "test", "p_value", "rule",
                    "verdict", "n_needed", "shown", "caveat"]
#: Per set, fewer samples than this make a caveat.
SMALL_N = 32
#: Rows per claim: (summary key of analysis.engine.evidence.SUMMARIES, claimed direction: -1 below the null,
#: +1 above it, unit for words).
ROWS = {
    "I": [("median_diff_k90", -1, "directions"), ("median_diff_effective_rank", -1, "directions"),
          ("median_diff_gram_effective_rank", -1, "directions")],
    "II": [("median_cosine", -1, "cosine"), ("median_pair_share", +1, "share")],
    "III": [("median_diff_sample_phi", +1, "phi"), ("median_sample_phi", +1, "phi"), ("median_sample_top1", +1, "cosine")],
}


def verdict(value: float, p: float, null: float, direction: int, alpha: float = ALPHA) -> str:
    """The rule: rejects (p < alpha) on the claimed side of ``null`` -> supported; on the other -> contradicted;
    no rejection -> not shown at this n; no p-value -> not tested."""
    if not np.isfinite(p) or not np.isfinite(value):
        return "not tested"
    if p >= alpha or value == null:
        return "not shown at this n"
    return "supported" if (value - null) * direction > 0 else "contradicted"


def format_value(value: float, unit: str) -> str:
    """A number in its unit's words: shares in percent, cosines signed, phi with 3 decimals."""
    if value is None or not np.isfinite(value):
        return "n/a"
    if unit == "share":
        return f"{value:.0%}"
    if unit == "cosine":
        return f"{value:+.3f}"
    if unit == "phi":
        return f"{value:.3f}"
    return f"{value:+.3g}"


def _rule(direction: int, null_text: str, test: str) -> str:
    side, other = ("below", "above") if direction < 0 else ("above", "below")
    return (f"supported if the {test} rejects at α = {ALPHA} with the value {side} {null_text}; contradicted if it "
            f"rejects with the value {other}; otherwise not shown at this n")


def _model_caveat(run) -> str:
    model = run.manifest.get("model", {}) if hasattr(run, "manifest") else {}
    source = str(model.get("source", "")) + " " + str(model.get("name", ""))
    if "aligned" in source.lower():
        return ""
    return (f"the run's model ({model.get('source', '?')}) is not marked as aligned; the claims are about aligned "
            "models (build default-aligned on Setup)")


def _core_caveat(evidence: Evidence, stat: str) -> str:
    """Says which modules a spectral test covers when the core could not certify some (``Evidence.masked``)."""
    masked = evidence.masked.get(stat)
    if masked is None or not masked.any():
        return ""
    kept = int((~masked).sum())
    what = ("whose k@0.9 the 128-direction spectral core certifies exact in >= 99% of replicates"
            if "k90" in stat else "whose spectral core holds >= 99.9% of every replicate's energy")
    return (f"tested on the {kept} of {len(masked)} modules {what}; the others' means are too high-rank for the "
            "core at this n (their exact values are in the module table, without intervals)")


def _nulls(table: pd.DataFrame) -> dict[str, float]:
    """Fixed nulls that depend on the run: random-subspace phi k/d and random-direction |cos| sqrt(2/(pi d))."""
    d_out = table["d_out"].astype(float) if "d_out" in table else pd.Series([np.nan])
    return {"median_sample_phi": float(table["phi_baseline"].astype(float).median()) if "phi_baseline" in table
            else float("nan"),
            "median_sample_top1": float(np.nanmedian(np.sqrt(2.0 / (math.pi * d_out))))}


def claim_results(run, evidence: Evidence | None = None) -> dict[str, ev.SummaryResult]:
    """{summary key: its :class:`analysis.engine.evidence.SummaryResult`} for every row of ROWS (value,
    interval, p-value, the null distribution to draw)."""
    evidence = evidence if evidence is not None else load_evidence(run)
    nulls = _nulls(run.table)
    return {key: ev.summary(run.table, evidence, key, nulls.get(key)) for specs in ROWS.values() for key, _, _ in specs}


def findings(run, evidence: Evidence | None = None) -> tuple[pd.DataFrame, str]:
    """(table, text) for one run (``RunResults`` or alike: ``.table``, ``.config``, ``.manifest``, ``.run_id``;
    ``evidence`` default: :func:`analysis.engine.resampling.load_evidence`). table: FINDINGS_COLUMNS, the
    deciding row of each claim first. text: one markdown line per claim."""
    evidence = evidence if evidence is not None else load_evidence(run)
    n_s, n_u = int(run.config["n_safety"]), int(run.config["n_utility"])
    caveats = [_model_caveat(run)]
    if min(n_s, n_u) < SMALL_N:
        caveats.append(f"n = {n_s} + {n_u} is small: intervals are wide and a rank grows with n")
    if n_s != n_u:
        caveats.append("the sets have different n, so their ranks are not directly comparable")
    base_caveat = "; ".join(c for c in caveats if c)
    results = claim_results(run, evidence)
    rows = []
    for claim, specs in ROWS.items():
        for key, direction, unit in specs:
            result = results[key]
            spec = ev.SUMMARIES[key]
            null = result.null
            null_text = (f"{format_value(null, unit)} (the median of the permutation distribution)"
                         if spec.test == "permutation" and not np.isfinite(spec.null) else format_value(null, unit))
            if key == "median_sample_phi":
                null_text = f"random subspaces (k/d = {null:.4f}, median over modules)"
            elif key == "median_sample_top1":
                null_text = f"random directions (sqrt(2/(π d)) = {null:.3f}, median over modules)"
            caveat = base_caveat
            if key in ("median_diff_k90", "median_diff_effective_rank"):
                caveat = "; ".join(c for c in (caveat, "rank intervals are bootstrap spreads re-centred on the estimate "
                                               "(resampling repeats prompts, which lowers a mean's rank); the "
                                               "permutation test is exact",
                                               _core_caveat(evidence, ev.SUMMARIES[key].stat)) if c)
            if key == "median_cosine":
                caveat = "; ".join(c for c in (caveat, "a cosine of two batch means moves away from 0 as n grows "
                                               "(each mean's per-sample noise shrinks), so its size depends on n; "
                                               "the test decides its sign") if c)
            if key == "median_diff_sample_phi" or key == "median_sample_phi":
                caveat = "; ".join(c for c in (caveat, "each safety sample is part of the batch it is compared with "
                                               f"(1/{n_s} of it), which raises its φ") if c)
            p = result.p
            interval = (f" (95% CI {format_value(result.lo, unit)} to {format_value(result.hi, unit)})"
                        if np.isfinite(result.lo) else
                        (" (not tested: the spectral core certifies this statistic in none of the modules at this "
                         "n; see the caveat)" if spec.stat in evidence.masked and evidence.masked[spec.stat].all()
                         and evidence.spectral else " (no interval: the run has no replicates for it)"))
            rows.append({
                "claim": claim, "statement": CLAIMS[claim], "measure": result.name, "value": result.value,
                "lo": result.lo, "hi": result.hi, "null": null, "n": f"{n_s} + {n_u}",
                "test": result.test, "p_value": p, "rule": _rule(direction, null_text, result.test.split(",")[0]),
                "verdict": verdict(result.value, p, null, direction),
                "n_needed": rs.n_needed(result.value, result.lo, result.hi, min(n_s, n_u), null)
                if np.isfinite(null) else float("nan"),
                "shown": f"{format_value(result.value, unit)}{interval}, p = {_p(p)}{_coverage(evidence, spec.stat)}",
                "caveat": caveat})
    frame = pd.DataFrame(rows, columns=FINDINGS_COLUMNS)
    return frame, findings_text(run, frame, evidence)


def _coverage(evidence, stat: str) -> str:
    """", over 1 of 210 modules" when the spectral core certified the statistic in only some modules ("" if all)."""
    masked = evidence.masked.get(stat) if evidence is not None else None
    if masked is None or not masked.any() or masked.all():
        return ""
    return f", over {int((~masked).sum())} of {masked.size} modules (the others not certified by the spectral core)"


def _p(p: float) -> str:
    return "n/a" if not np.isfinite(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def claim_verdicts(frame: pd.DataFrame) -> dict[str, str]:
    """{claim: verdict of its deciding (first) row}."""
    return {claim: group["verdict"].iloc[0] for claim, group in frame.groupby("claim", sort=False)}


def findings_text(run, frame: pd.DataFrame, evidence: Evidence | None = None) -> str:
    """Markdown: the run (model, n, modules, replicates) and per claim its verdict, deciding number and test."""
    model = run.manifest.get("model", {}).get("source", "?") if hasattr(run, "manifest") else "?"
    lines = [f"Run `{run.run_id}`: model **{model}**, n = {run.config['n_safety']} safety + "
             f"{run.config['n_utility']} utility samples, {len(run.table)} modules, k = {run.config['top_k']}"
             + (f"; {evidence.n_boot} bootstrap replicates and {evidence.n_perm} permutations ({evidence.source})"
                if evidence is not None else "") + "."]
    if evidence is not None and not evidence.spectral:
        lines.append("*This run was stored before intervals existed: only the Gram-based numbers (cosines, pair "
                     "shares) have intervals, recomputed now. Collect it again (n_boot, n_perm > 0) for claims I "
                     "and III.*")
    for claim, group in frame.groupby("claim", sort=False):
        first = group.iloc[0]
        needed = first["n_needed"]
        need = (f" Estimated n per set for the interval to exclude the null: {needed:.0f}." if np.isfinite(needed)
                else "")
        lines.append(f"- **{claim} — {first['verdict']}.** {CLAIMS[claim]} Deciding: {first['measure']} = "
                     f"{first['shown']} ({first['test']}).{need}")
    return "\n".join(lines)


def module_table(run, evidence: Evidence | None = None) -> pd.DataFrame:
    """Per-module statistics with intervals, p-values and Benjamini-Hochberg significance
    (``analysis.engine.evidence.module_evidence``): what the pages' error bars and markers and the exports use."""
    evidence = evidence if evidence is not None else load_evidence(run)
    return ev.module_evidence(run.table, evidence)


#: The per-module tests of :func:`module_table` in words: statistic -> label (the test named).
MODULE_TESTS = {
    "diff_k90": "k@0.9, safety − utility (permutation test)",
    "diff_effective_rank": "effective rank, safety − utility (permutation test)",
    "diff_gram_effective_rank": "sample-span effective rank, safety − utility (permutation test)",
    "cosine_su_zero": "cos(G_s, G_u) against 0 (bootstrap test)",
    "diff_sample_phi": "single-sample φ, safety − utility sample (permutation test)",
}


def significance_counts(modules: pd.DataFrame) -> dict[str, Any]:
    """For each tested statistic: its label, how many modules were tested (a finite p; spectral statistics
    only where the core certifies them), how many are significant after correction, in which direction."""
    out = {}
    for stat, label in MODULE_TESTS.items():
        column = f"{stat}_significant"
        if column in modules:
            value = modules[stat.replace("_zero", "")]
            sig = modules[column].fillna(False).astype(bool)
            tested = int(np.isfinite(modules[f"{stat}_p"].to_numpy(dtype=float)).sum())
            out[stat] = {"label": label, "significant": int(sig.sum()), "below": int((sig & (value < 0)).sum()),
                         "above": int((sig & (value > 0)).sum()), "tested": tested, "modules": len(modules)}
    return out


def significance_lines(modules: pd.DataFrame) -> list[str]:
    """One Markdown line per tested statistic: "**label**: significant in 3 of 28 tested modules after
    correction (0 below 0, 3 above)", saying how many modules could not be tested."""
    lines = []
    for c in significance_counts(modules).values():
        if not c["tested"]:
            lines.append(f"**{c['label']}**: tested in none of the {c['modules']} modules (not certified by the "
                         "spectral core)")
            continue
        line = (f"**{c['label']}**: significant in {c['significant']} of {c['tested']} tested modules after "
                f"correction ({c['below']} below 0, {c['above']} above)")
        if c["tested"] < c["modules"]:
            line += f"; {c['modules'] - c['tested']} of {c['modules']} not tested (not certified by the spectral core)"
        lines.append(line)
    return lines
