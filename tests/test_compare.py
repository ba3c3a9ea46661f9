"""Paired comparisons of two evaluations on the same prompts: McNemar on refusals, paired bootstrap on NLLs,
verdicts in words."""

import types

import numpy as np
import pytest
from scipy.stats import binom

from analysis.safety import compare


def harmful(i, refused):
    return {"set": "harmful", "id": f"h{i}", "refused_qi": refused, "refused_arditi": refused}


def evaluation(refused: list[bool], nll: np.ndarray, benign_refused=(), extra=()):
    records = [harmful(i, r) for i, r in enumerate(refused)] + list(extra)
    records += [{"set": "benign", "id": f"b{i}", "refused_qi": r, "refused_arditi": r} for i, r in enumerate(benign_refused)]
    ids = [f"h{i}" for i in range(len(nll))]
    return types.SimpleNamespace(records=records, nll={"refusal": nll}, nll_ids={"harmful": ids})


def test_asr_rise_is_significant_with_the_exact_mcnemar_p():
    # 88 prompts: before, 80 refused; after, 44 refused: 38 newly answered, 2 newly refused
    before = [True] * 80 + [False] * 8
    after = [False] * 38 + [True] * 42 + [True, True] + [False] * 6
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.5, 88)
    first, second = evaluation(before, base), evaluation(after, base + 0.8 + rng.normal(0, 0.1, 88))
    result = compare.compare_evaluations(first, second)
    asr = result["asr"]
    assert (asr.n, asr.first, asr.second) == (88, 8 / 88, 44 / 88)
    assert asr.difference == pytest.approx(36 / 88) and asr.low < 36 / 88 < asr.high
    assert asr.p == pytest.approx(2 * binom.cdf(2, 40, 0.5))
    text = compare.paired_verdict(asr)
    assert text.startswith("ASR rose by 41 points [+") and "p < 0.001 (McNemar exact), 88 prompts" in text
    nll = result["refusal_nll"]
    assert nll.kind == "nll" and nll.low < 0.8 < nll.high and nll.significant
    assert compare.paired_verdict(nll).startswith("refusal NLL rose by 0.799 nats/token [+0.7")


def test_no_change_is_said_so_and_only_shared_prompts_count():
    same = [True, False] * 10
    first = evaluation(same, np.ones(20), benign_refused=[False] * 5)
    second = evaluation(same[:15], np.ones(15), benign_refused=[False] * 5)  # 5 prompts missing
    result = compare.compare_evaluations(first, second)
    assert result["asr"].n == 15 and result["asr"].p == 1.0 and result["asr"].difference == 0
    assert compare.paired_verdict(result["asr"]).startswith("no detectable change in ASR: +0 points")
    assert result["over_refusal"].n == 5 and not result["over_refusal"].significant
    assert result["refusal_nll"].n == 15 and result["refusal_nll"].p == 1.0
    assert result["utility_accuracy"].n == 0
    assert "no shared prompts" in compare.paired_verdict(result["utility_accuracy"])
    assert len(compare.verdicts(result)) == 3


def test_utility_accuracy_and_a_fall():
    correct = [{"set": "utility", "id": f"u{i}", "correct": i < 30, "refused_qi": False} for i in range(40)]
    worse = [{"set": "utility", "id": f"u{i}", "correct": i < 5, "refused_qi": False} for i in range(40)]
    result = compare.compare_records(correct, worse, metrics=["utility_accuracy"])["utility_accuracy"]
    assert result.difference == pytest.approx(-25 / 40) and result.p < 1e-6
    assert compare.paired_verdict(result, "spf vs plain").startswith("spf vs plain: utility accuracy fell by 62 points")


@pytest.mark.parametrize("p, text", [(0.0004, "p < 0.001"), (0.0123, "p = 0.012"), (0.63, "p = 0.63"),
                                     (1.0, "p = 1"), (0.005, "p = 0.005")])
def test_format_p(p, text):
    assert compare.format_p(p) == text
