"""Intervals and paired tests for the numbers a user sees: rates (Wilson), means (bootstrap), two models on
the same prompts (exact McNemar, Newcombe's paired interval, paired bootstrap).

Pure numpy (scipy for McNemar beyond 1000 discordant pairs and for the Benjamini-Hochberg step-up), seeded,
vectorised; no model, gradient or page knows about it. Conventions:

* a rate is ``k`` successes out of ``n`` trials; ``n = 0`` gives NaN everywhere (no data, no claim);
* intervals are two-sided at ``confidence`` (default 0.95) and returned as ``(low, high)`` floats;
* paired inputs are equal-length arrays, element i of both measured on the same prompt i; differences are
  ``second - first`` (e.g. after fine-tuning minus before).

References: Wilson (1927); McNemar (1947), exact form = two-sided binomial test on the discordant pairs;
Newcombe (1998, Stat. Med. 17:2635, method 10) for a paired difference of proportions; Efron & Tibshirani
(1993) for the percentile bootstrap; Benjamini & Hochberg (1995) for the false discovery rate over modules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["PairedRates", "across_seeds", "benjamini_hochberg", "bootstrap_mean", "format_interval", "format_rate", "mcnemar_exact", "mcnemar_p",
           "paired_bootstrap", "paired_rates", "rate_interval", "wilson_interval"]

DEFAULT_BOOTSTRAP = 2000
_CHUNK = 4_000_000  # resampled values drawn at once (memory: 8 bytes each for the indices' gather)


def _z(confidence: float) -> float:
    """The standard normal quantile at 0.5 + confidence / 2 (1.95996... for 95%); stdlib, no scipy import."""
    from statistics import NormalDist

    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must lie strictly between 0 and 1")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def _binomial_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials at probability 1/2: 2 P(X <= min(k, n - k)), at most 1."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    if n <= 1000:
        tail = sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n
    else:
        from scipy.stats import binom

        tail = float(binom.cdf(low, n, 0.5))
    return min(1.0, 2 * tail)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``, clipped to [0, 1]; (nan, nan) when
    ``n == 0``. Unlike the Wald interval it is never empty at 0/n or n/n."""
    successes, n = int(successes), int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return (math.nan, math.nan)
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    # at 0/n and n/n the bound is exactly 0 (1) in exact arithmetic; keep it so rather than 1e-17
    return (0.0 if successes == 0 else low, 1.0 if successes == n else high)


def rate_interval(flags: Sequence[bool], confidence: float = 0.95) -> dict:
    """{"k", "n", "rate", "low", "high"} of boolean outcomes (rate NaN when empty), JSON-able."""
    flags = np.asarray(flags, dtype=bool)
    k, n = int(flags.sum()), int(flags.size)
    low, high = wilson_interval(k, n, confidence)
    return {"k": k, "n": n, "rate": k / n if n else math.nan, "low": low, "high": high}


def _pct(value: float) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.0f}"


def format_rate(successes: int, n: int, confidence: float = 0.95) -> str:
    """``"3/8 = 38% [14-69%]"``: count, rate and Wilson interval in whole percent; ``"0/0 (no prompts)"``."""
    if n == 0:
        return "0/0 (no prompts)"
    low, high = wilson_interval(successes, n, confidence)
    return f"{successes}/{n} = {_pct(successes / n)}% [{_pct(low)}-{_pct(high)}%]"


def format_interval(value: float, low: float, high: float, digits: int = 3, n: int | None = None) -> str:
    """``"1.234 [1.100, 1.390] (n=88)"``; "-" when ``value`` is missing or not finite."""
    if value is None or not math.isfinite(value):
        return "-"
    text = f"{value:.{digits}f}"
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" (n={n})" if n is not None else "")


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) means of resamples (with replacement) of ``values`` (n,), drawn in chunks."""
    n = values.shape[0]
    rows = max(1, _CHUNK // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        out[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, n_boot: int = DEFAULT_BOOTSTRAP,
                   seed: int = 0) -> dict:
    """{"mean", "low", "high", "n"}: the mean of ``values`` (NaNs dropped) and its percentile-bootstrap
    interval (``n_boot`` resamples, seeded). n = 0: all NaN; n = 1: the interval is the value itself."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    _z(confidence)
    means = _bootstrap_means(values, n_boot, np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": n}


def paired_bootstrap(first: Sequence[float], second: Sequence[float], confidence: float = 0.95,
                     n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Paired bootstrap of the mean difference ``second - first`` over items measured twice (pairs with a
    NaN on either side dropped): {"difference", "low", "high", "n", "p"}; ``p``: two-sided bootstrap p-value
    of "no difference" (twice the smaller share of resampled mean differences on either side of 0, at
    least 1/n_boot when no resample crosses it)."""
    first, second = (np.asarray(x, dtype=np.float64).ravel() for x in (first, second))
    if first.shape != second.shape:
        raise ValueError(f"paired values need equal lengths, got {first.size} and {second.size}")
    keep = np.isfinite(first) & np.isfinite(second)
    differences = second[keep] - first[keep]
    n = int(differences.size)
    if n == 0:
        return {"difference": math.nan, "low": math.nan, "high": math.nan, "n": 0, "p": math.nan}
    _z(confidence)
    means = _bootstrap_means(differences, n_boot, np.random.default_rng(seed))
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    if np.all(differences == 0):
        p = 1.0
    else:
        p = min(1.0, max(2 * min(np.mean(means <= 0), np.mean(means >= 0)), 1 / n_boot))
    return {"difference": float(differences.mean()), "low": float(low), "high": float(high), "n": n,
            "p": float(p)}


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: b pairs changed one way, c the other (1 when
    b + c = 0)."""
    return min(1.0, _binomial_two_sided_half(int(b), int(b) + int(c)))


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """Exact McNemar test of paired binary outcomes: {"b": first only, "c": second only, "both", "neither",
    "n", "p"}; ``p`` is the two-sided binomial test of b against Binomial(b + c, 1/2) (1 when b + c = 0:
    all pairs concordant, no evidence of a change)."""
    first, second = np.asarray(first, dtype=bool).ravel(), np.asarray(second, dtype=bool).ravel()
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {first.size} and {second.size}")
    b, c = int(np.sum(first & ~second)), int(np.sum(~first & second))
    p = _binomial_two_sided_half(b, b + c)
    return {"b": b, "c": c, "both": int(np.sum(first & second)), "neither": int(np.sum(~first & ~second)),
            "n": int(first.size), "p": min(1.0, p)}


@dataclasses.dataclass(frozen=True)
class PairedRates:
    """Two rates on the same n items: first = k1/n, second = k2/n; ``difference = second - first`` with
    Newcombe's paired 95% interval [low, high]; ``p``: exact McNemar; ``b`` / ``c``: items that are a success
    only in the first / only in the second."""

    n: int
    k_first: int
    k_second: int
    b: int
    c: int
    difference: float
    low: float
    high: float
    p: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_rates(first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95) -> PairedRates:
    """Paired comparison of two binary outcomes per item (e.g. "answered a harmful prompt" before and after
    fine-tuning): the difference of the rates with Newcombe's method-10 interval (Wilson intervals of both
    margins combined with the continuity-corrected phi correlation of the pairs), and the exact McNemar p-value."""
    test = mcnemar_exact(first, second)
    n, b, c, both, neither = test["n"], test["b"], test["c"], test["both"], test["neither"]
    if n == 0:
        return PairedRates(0, 0, 0, 0, 0, math.nan, math.nan, math.nan, math.nan)
    k1, k2 = both + b, both + c
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n, confidence)
    l2, u2 = wilson_interval(k2, n, confidence)
    denominator = (k1 * (n - k1) * k2 * (n - k2))
    # Newcombe's phi: ad - bc shrunk by n/2 towards 0 when positive (0 when within n/2), kept when negative
    association = both * neither - b * c
    association = association - n / 2 if association > n / 2 else min(association, 0)
    phi = association / math.sqrt(denominator) if denominator > 0 else 0.0
    difference = p2 - p1
    # Newcombe's method 10 for p2 - p1 (his formula is for p1 - p2; the roles of the margins swap)
    delta = math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    epsilon = math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1) + (p1 - l1) ** 2))
    return PairedRates(n=n, k_first=k1, k_second=k2, b=b, c=c, difference=difference,
                       low=max(-1.0, difference - delta), high=min(1.0, difference + epsilon), p=test["p"])


def across_seeds(values: Sequence[float], confidence: float = 0.95) -> dict:
    """A metric measured once per seed (e.g. a grid cell's ASR for seeds 0, 1, 2): {"mean", "low", "high",
    "n", "sd", "values"}, the interval ``mean -/+ t_{n-1} sd / sqrt(n)`` (Student t; the seeds are the
    samples, so it speaks to seed-to-seed variation only, not to the prompts). NaNs dropped; n = 1: the value
    with a NaN interval; n = 0: all NaN."""
    from scipy.stats import t

    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0, "sd": math.nan, "values": []}
    mean = float(np.mean(values))
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1, "sd": math.nan, "values": values}
    _z(confidence)
    sd = float(np.std(values, ddof=1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "sd": sd, "values": values}


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape (scipy's ``false_discovery_control``); reject
    at false discovery rate alpha where q <= alpha. NaN stays NaN and does not count as a test."""
    from scipy.stats import false_discovery_control

    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        out[tested] = false_discovery_control(p[tested], method="bh")
    return out
