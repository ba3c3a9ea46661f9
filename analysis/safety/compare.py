"""Paired comparison of two evaluations on the same prompts (aligned vs fine-tuned, a defence vs plain).

Prompts are matched by id; only prompts present in both evaluations count (their number is the n of every
statement). Binary outcomes per prompt (harmful prompt answered, benign prompt refused, utility answer
correct) get the difference of the rates with Newcombe's paired 95% interval and the exact McNemar test;
per-prompt NLLs get a paired bootstrap of the mean difference. Differences are ``second - first``.

Decision rule, stated in every verdict: a change is reported as a rise or a fall when its two-sided test
gives p < 0.05 (McNemar for rates, paired bootstrap for NLLs); otherwise "no detectable change", with the
interval showing what the data cannot rule out. No correction for the handful of metrics compared at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis.core.stats import paired_bootstrap, paired_rates

__all__ = ["ALPHA", "PairedMetric", "compare_evaluations", "compare_records", "format_p", "paired_verdict", "verdicts"]

ALPHA = 0.05
#: metric -> (record set, outcome of a record given the keyword list, label in sentences)
RATE_METRICS = {
    "asr": ("harmful", lambda r, kw: not r[f"refused_{kw}"], "ASR"),
    "over_refusal": ("benign", lambda r, kw: bool(r[f"refused_{kw}"]), "over-refusal"),
    "utility_accuracy": ("utility", lambda r, kw: bool(r["correct"]) if r.get("correct") is not None else None,
                         "utility accuracy"),
}
#: NLL array -> (its id list in ``nll_ids``, label)
NLL_METRICS = {"refusal": ("harmful", "refusal NLL"), "affirmative": ("harmful", "affirmative NLL"),
               "utility": ("utility", "utility NLL")}


@dataclasses.dataclass(frozen=True)
class PairedMetric:
    """One metric compared on ``n`` shared prompts: ``first`` / ``second`` values (rates or mean NLLs),
    ``difference = second - first`` with its 95% interval [low, high], the two-sided ``p`` of ``test``
    ("McNemar exact" or "paired bootstrap") and the metric's ``kind`` ("rate" or "nll")."""

    metric: str
    label: str
    kind: str
    n: int
    first: float
    second: float
    difference: float
    low: float
    high: float
    p: float
    test: str

    @property
    def significant(self) -> bool:
        return self.n > 0 and math.isfinite(self.p) and self.p < ALPHA

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": paired_verdict(self)}


def _by_id(records: Sequence[dict], set_name: str) -> dict[str, dict]:
    return {r["id"]: r for r in records if r["set"] == set_name}


def compare_records(first: Sequence[dict], second: Sequence[dict], keywords: str = "qi",
                    metrics: Sequence[str] = tuple(RATE_METRICS)) -> dict[str, PairedMetric]:
    """Paired rate comparisons (``asr``, ``over_refusal``, ``utility_accuracy``) of two lists of evaluation
    records (dicts with set, id, refused_<list>, correct), on the prompts they share."""
    out = {}
    for metric in metrics:
        set_name, outcome, label = RATE_METRICS[metric]
        a, b = _by_id(first, set_name), _by_id(second, set_name)
        pairs = [(outcome(a[i], keywords), outcome(b[i], keywords)) for i in a if i in b]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        x = np.array([p[0] for p in pairs], dtype=bool)
        y = np.array([p[1] for p in pairs], dtype=bool)
        paired = paired_rates(x, y)
        out[metric] = PairedMetric(metric, label, "rate", paired.n,
                                   paired.k_first / paired.n if paired.n else math.nan,
                                   paired.k_second / paired.n if paired.n else math.nan,
                                   paired.difference, paired.low, paired.high, paired.p, "McNemar exact")
    return out


def compare_evaluations(first: Any, second: Any, keywords: str = "qi", seed: int = 0) -> dict[str, PairedMetric]:
    """Paired comparisons of two evaluations (objects with ``records``, ``nll`` and ``nll_ids``, as
    :class:`~analysis.safety.results.EvalResult`): the rates of :func:`compare_records` and the mean NLLs
    (``refusal_nll``, ``affirmative_nll``, ``utility_nll``; paired bootstrap, ``seed``) on shared prompts."""
    out = compare_records(first.records, second.records, keywords)
    for name, (ids_key, label) in NLL_METRICS.items():
        if name not in first.nll or name not in second.nll:
            continue
        a = dict(zip(first.nll_ids.get(ids_key, []), np.asarray(first.nll[name], dtype=np.float64)))
        b = dict(zip(second.nll_ids.get(ids_key, []), np.asarray(second.nll[name], dtype=np.float64)))
        shared = [i for i in a if i in b]
        x, y = np.array([a[i] for i in shared]), np.array([b[i] for i in shared])
        boot = paired_bootstrap(x, y, seed=seed)
        keep = np.isfinite(x) & np.isfinite(y)
        out[f"{name}_nll"] = PairedMetric(
            f"{name}_nll", label, "nll", boot["n"], float(x[keep].mean()) if boot["n"] else math.nan,
            float(y[keep].mean()) if boot["n"] else math.nan, boot["difference"], boot["low"], boot["high"],
            boot["p"], "paired bootstrap")
    return out


def format_p(p: float) -> str:
    """``"p < 0.001"``, ``"p = 0.013"``, ``"p = 1"``."""
    if not math.isfinite(p):
        return "p undefined"
    if p < 0.001:
        return "p < 0.001"
    return "p = 1" if p >= 0.9995 else f"p = {p:.2g}" if p < 0.01 else f"p = {p:.3f}".rstrip("0").rstrip(".")


def paired_verdict(result: PairedMetric, subject: str = "") -> str:
    """One sentence: ``"ASR rose by 41 points [28, 54], p < 0.001 (McNemar exact), 88 prompts"``, or
    ``"no detectable change in ASR: +2 points [-3, 8], p = 0.63 (McNemar exact), 88 prompts"``."""
    prefix = f"{subject}: " if subject else ""
    if result.n == 0:
        return f"{prefix}{result.label}: no shared prompts to compare"
    if result.kind == "rate":
        size = f"{abs(result.difference) * 100:.0f} points [{result.low * 100:+.0f}, {result.high * 100:+.0f}]"
        signed = f"{result.difference * 100:+.0f} points [{result.low * 100:+.0f}, {result.high * 100:+.0f}]"
        values = f"{result.first:.0%} -> {result.second:.0%}"
    else:
        size = f"{abs(result.difference):.3f} nats/token [{result.low:+.3f}, {result.high:+.3f}]"
        signed = f"{result.difference:+.3f} nats/token [{result.low:+.3f}, {result.high:+.3f}]"
        values = f"{result.first:.3f} -> {result.second:.3f}"
    tail = f"{format_p(result.p)} ({result.test}), {result.n} prompts"
    if result.significant:
        direction = "rose" if result.difference > 0 else "fell"
        return f"{prefix}{result.label} {direction} by {size} ({values}), {tail}"
    return f"{prefix}no detectable change in {result.label}: {signed} ({values}), {tail}"


def verdicts(results: Mapping[str, PairedMetric], subject: str = "") -> list[str]:
    """:func:`paired_verdict` of each compared metric that has shared prompts."""
    return [paired_verdict(r, subject) for r in results.values() if r.n > 0]
