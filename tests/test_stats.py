"""Known answers of analysis.core.stats: Wilson against scipy, exact McNemar on constructed tables, bootstrap
intervals that cover a known difference, Newcombe's paired interval by its coverage and symmetry."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from analysis.core import stats


def pairs(both: int, first_only: int, second_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    first = [True] * both + [True] * first_only + [False] * second_only + [False] * neither
    second = [True] * both + [False] * first_only + [True] * second_only + [False] * neither
    return first, second


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (3, 88), (1, 1), (87, 88)])
def test_wilson_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = stats.wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)


def test_wilson_other_confidence_and_edges():
    expected = binomtest(7, 20).proportion_ci(confidence_level=0.9, method="wilson")
    assert stats.wilson_interval(7, 20, 0.9) == pytest.approx((expected.low, expected.high), abs=1e-12)
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in stats.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        stats.wilson_interval(11, 10)
    with pytest.raises(ValueError):
        stats.wilson_interval(1, 10, confidence=1.0)


def test_rate_interval_and_format():
    entry = stats.rate_interval([True, False, False, True, False, False, True, False])
    assert (entry["k"], entry["n"], entry["rate"]) == (3, 8, 0.375)
    assert (entry["low"], entry["high"]) == stats.wilson_interval(3, 8)
    assert stats.format_rate(3, 8) == "3/8 = 38% [14-69%]"
    assert stats.format_rate(0, 10) == "0/10 = 0% [0-28%]"
    assert stats.format_rate(0, 0) == "0/0 (no prompts)"
    assert stats.format_interval(1.23456, 1.1, 1.4, n=88) == "1.235 [1.100, 1.400] (n=88)"
    assert stats.format_interval(float("nan"), 0, 1) == "-"


@pytest.mark.parametrize("table", [(36, 12, 2, 0), (5, 0, 7, 3), (10, 3, 3, 10), (0, 9, 1, 0)])
def test_mcnemar_exact_is_the_binomial_test_on_discordant_pairs(table):
    both, b, c, neither = table
    result = stats.mcnemar_exact(*pairs(both, b, c, neither))
    assert (result["b"], result["c"], result["both"], result["neither"], result["n"]) == (b, c, both, neither, sum(table))
    # two-sided exact: 2 * P(X <= min(b, c)), X ~ Bin(b + c, 1/2), capped at 1
    from scipy.stats import binom

    assert result["p"] == pytest.approx(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)), rel=1e-12)


def test_mcnemar_constructed_values_and_all_concordant():
    # 12 vs 2 discordant: 2 * sum_{i<=2} C(14, i) / 2^14 = 2 * 106 / 16384
    assert stats.mcnemar_exact(*pairs(36, 12, 2, 0))["p"] == pytest.approx(212 / 16384)
    assert stats.mcnemar_exact(*pairs(20, 0, 0, 30))["p"] == 1.0
    assert stats.mcnemar_exact(*pairs(0, 3, 3, 0))["p"] == 1.0
    with pytest.raises(ValueError):
        stats.mcnemar_exact([True], [True, False])
    # beyond 1000 discordant pairs (scipy's binomial) and below, both equal scipy's exact binomial test
    for b, c in ((600, 500), (520, 480), (7, 30)):
        expected = binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar_exact(*pairs(0, b, c, 0))["p"] == pytest.approx(expected, rel=1e-9)


def test_bootstrap_mean_covers_the_mean_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=200)
    result = stats.bootstrap_mean(values, seed=3)
    assert result["n"] == 200 and result["mean"] == pytest.approx(values.mean())
    assert result["low"] < values.mean() < result["high"]
    # the percentile interval of a mean is close to mean -/+ 1.96 s / sqrt(n)
    half = 1.96 * values.std(ddof=1) / math.sqrt(200)
    assert result["high"] - result["low"] == pytest.approx(2 * half, rel=0.15)
    assert stats.bootstrap_mean(values, seed=3) == result
    assert stats.bootstrap_mean(values, seed=4) != result
    assert math.isnan(stats.bootstrap_mean([])["mean"])
    one = stats.bootstrap_mean([1.5])
    assert (one["low"], one["high"]) == (1.5, 1.5)


def test_paired_bootstrap_covers_a_known_difference():
    rng = np.random.default_rng(0)
    n, shift = 88, 0.3
    base = rng.normal(3.0, 1.0, size=n)  # prompt difficulty: large between prompts, shared by both models
    first = base + rng.normal(0, 0.2, size=n)
    second = base + shift + rng.normal(0, 0.2, size=n)
    result = stats.paired_bootstrap(first, second, seed=0)
    assert result["n"] == n and result["low"] < shift < result["high"]
    assert result["p"] < 0.001
    # pairing matters: the interval is far narrower than the unpaired spread of the means would allow
    assert result["high"] - result["low"] < 0.2
    same = stats.paired_bootstrap(first, first)
    assert (same["difference"], same["low"], same["high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    with_nan = stats.paired_bootstrap([1.0, np.nan, 2.0], [2.0, 5.0, 3.0])
    assert with_nan["n"] == 2 and with_nan["difference"] == 1.0


def test_paired_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(5)
    hits = 0
    trials = 200
    for trial in range(trials):
        base = rng.normal(0, 1, size=60)
        diffs = rng.normal(0.5, 1.0, size=60)
        result = stats.paired_bootstrap(base, base + diffs, n_boot=500, seed=trial)
        hits += result["low"] <= 0.5 <= result["high"]
    assert 0.88 <= hits / trials <= 0.99


def test_paired_rates_difference_symmetry_and_coverage():
    result = stats.paired_rates(*pairs(36, 12, 2, 0))
    assert (result.n, result.k_first, result.k_second, result.b, result.c) == (50, 48, 38, 12, 2)
    assert result.difference == pytest.approx(-0.2)
    assert result.low < -0.2 < result.high < 0
    swapped = stats.paired_rates(*reversed(pairs(36, 12, 2, 0)))
    assert (swapped.low, swapped.high) == pytest.approx((-result.high, -result.low))
    same = stats.paired_rates(*pairs(5, 0, 0, 5))
    assert same.difference == 0 and same.low < 0 < same.high and same.p == 1.0
    # coverage of the true difference of paired Bernoulli outcomes (p1 = 0.2, p2 = 0.5, correlated)
    rng = np.random.default_rng(11)
    hits, trials, n = 0, 400, 40
    for _ in range(trials):
        latent = rng.uniform(size=n)
        first = latent < 0.2
        second = (latent < 0.45) | (rng.uniform(size=n) < 0.05 / 0.55) & (latent >= 0.45)
        r = stats.paired_rates(first, second)
        hits += r.low <= 0.3 <= r.high
    assert 0.91 <= hits / trials <= 0.995


def test_across_seeds_is_the_student_t_interval():
    # three seeds' ASR: mean 0.5, sd 0.1, t_{0.975, 2} = 4.302653 -> half-width 4.302653 * 0.1 / sqrt(3)
    result = stats.across_seeds([0.4, 0.5, 0.6])
    assert result["mean"] == pytest.approx(0.5) and result["sd"] == pytest.approx(0.1)
    assert result["high"] - 0.5 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-6)
    assert result["n"] == 3 and result["values"] == [0.4, 0.5, 0.6]
    one = stats.across_seeds([0.3, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.3 and math.isnan(one["low"])
    assert stats.across_seeds([])["n"] == 0
    same = stats.across_seeds([0.2, 0.2])
    assert (same["low"], same["high"]) == (0.2, 0.2)


def test_mcnemar_p_from_discordant_counts():
    from analysis.core.stats import mcnemar_p

    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(8, 0) == pytest.approx(2 * 0.5 ** 8)
    assert mcnemar_p(3, 5) == pytest.approx(0.7266, abs=1e-4)
