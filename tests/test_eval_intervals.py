"""Evaluation metrics carry their n and 95% intervals (Wilson for rates, bootstrap for mean NLLs), in the
stored metrics, the category table, the text report; old stored metrics get them on load."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from analysis.core.stats import bootstrap_mean
from analysis.core.tasks import format_seconds
from analysis.safety import results as res
from analysis.safety.keywords import KEYWORD_LISTS


def record(set_name, category, completion, **extra):
    out = {"set": set_name, "id": f"{set_name}-{category}-{completion}", "category": category, "prompt": "p",
           "completion": completion, "judge_score": None, **extra}
    for name, matcher in KEYWORD_LISTS.items():
        out[f"refused_{name}"] = matcher.is_refusal(completion)
    out["refused"] = out["refused_qi"]
    return out


def records_3_of_8():
    harmful = [record("harmful", "malware", f"Sure {i}.") for i in range(3)]
    harmful += [record("harmful", "fraud", f"I'm sorry, no {i}.") for i in range(5)]
    utility = [record("utility", "math", f"{i}", answer_kind="math", gold=["1"], correct=i < 2) for i in range(4)]
    return harmful + [record("benign", "cooking", "Whisk.")] + utility


def wilson(k, n):
    ci = binomtest(k, n).proportion_ci(method="wilson")
    return pytest.approx((ci.low, ci.high), abs=1e-12)


def test_summarise_stores_wilson_and_bootstrap_intervals():
    nll = {"refusal": np.array([1.0, 2.0, 3.0, 4.0, 6.0]), "utility": np.array([2.0, 2.5])}
    metrics = res.summarise(records_3_of_8(), nll)
    asr = metrics["intervals"]["asr_qi"]
    assert (asr["k"], asr["n"]) == (3, 8) and (asr["low"], asr["high"]) == wilson(3, 8)
    assert metrics["intervals"]["asr"] == asr
    assert metrics["intervals"]["over_refusal_qi"]["n"] == 1
    utility = metrics["intervals"]["utility_accuracy"]
    assert (utility["k"], utility["n"]) == (2, 4) and (utility["low"], utility["high"]) == wilson(2, 4)
    assert metrics["intervals"]["utility_accuracy.math"]["k"] == 2
    boot = bootstrap_mean(nll["refusal"])
    assert metrics["intervals"]["refusal_nll"] == {"n": 5, "low": boot["low"], "high": boot["high"]}
    assert boot["low"] < metrics["refusal_nll"] < boot["high"]
    malware = metrics["harmful_by_category"]["malware"]["intervals"]["asr_qi"]
    assert (malware["k"], malware["n"], malware["low"]) == (3, 3, wilson(3, 3).expected[0])
    assert res.rate_text(metrics, "asr_qi") == "3/8 = 38% [14-69%]"
    assert res.rate_text(metrics["harmful_by_category"]["fraud"], "asr_qi") == "0/5 = 0% [0-43%]"
    assert res.mean_text(metrics, "refusal_nll").endswith("(n=5)")


def test_metrics_stored_without_intervals_get_them_from_rate_and_n():
    old = {"asr_qi": 0.375, "n_harmful": 8, "over_refusal_qi": float("nan"), "n_benign": 0}
    assert res.interval_of(old, "asr_qi")["k"] == 3
    assert (res.interval_of(old, "asr_qi")["low"], res.interval_of(old, "asr_qi")["high"]) == wilson(3, 8)
    assert res.rate_text(old, "asr_qi") == "3/8 = 38% [14-69%]"
    assert res.rate_text(old, "over_refusal_qi") == "0/0 (no prompts)"
    assert res.rate_text({"n": 2, "asr_qi": 0.5}, "asr_qi") == "1/2 = 50% [9-91%]"
    assert math.isnan(res.interval_of(old, "refusal_nll")["low"])


def test_category_table_has_counts_and_intervals():
    metrics = res.summarise(records_3_of_8(), {})
    result = res.EvalResult(model={"name": "m"}, config={}, run_id="r", records=records_3_of_8(), nll={},
                            nll_ids={}, metrics=metrics, seconds=1241.2444, created="now")
    table = result.category_table("harmful").set_index("category")
    assert table.loc["malware", "asr_qi_k"] == 3 and table.loc["fraud", "n"] == 5
    assert (table.loc["fraud", "asr_qi_low"], table.loc["fraud", "asr_qi_high"]) == wilson(0, 5)
    report = res.format_report([result], examples=0)
    assert "3/8 = 38% [14-69%]" in report and "20 min 41 s" in report


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59.4, "59 s"), (1241.2444, "20 min 41 s"),
                                           (3725, "1 h 02 min"), (None, "-"), (float("nan"), "-")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_an_evaluation_stored_without_intervals_gets_them_on_load(tmp_path):
    records = records_3_of_8()
    nll = {"refusal": np.array([1.0, 3.0])}
    metrics = res.summarise(records, nll)
    del metrics["intervals"]
    store = res.evals_store(tmp_path)
    result = res.EvalResult(model={"name": "m", "source": "m", "identity": "i"}, config={"a": 1}, run_id="old",
                            records=records, nll=nll, nll_ids={"harmful": []}, metrics=metrics, seconds=3.0,
                            created="now")
    res.save_evaluation(store, result, {})
    loaded = res.load_evaluation(store, "old")
    assert loaded.metrics["intervals"]["asr_qi"]["k"] == 3
    assert loaded.metrics["intervals"]["refusal_nll"]["n"] == 2


def test_the_report_of_two_models_has_paired_verdicts():
    def result(name, answered):
        records = [record("harmful", "c", "Sure." if i < answered else "I'm sorry, no.") for i in range(40)]
        for i, r in enumerate(records):
            r["id"] = f"h{i}"
        return res.EvalResult(model={"name": name}, config={}, run_id=name, records=records, nll={},
                              nll_ids={}, metrics=res.summarise(records, {}), seconds=1.0, created="")

    report = res.format_report([result("aligned", 2), result("tuned", 30)], examples=0)
    assert "aligned -> tuned: ASR rose by 70 points [+" in report and "p < 0.001 (McNemar exact), 40 prompts" in report
    assert "Paired tests" not in res.format_report([result("aligned", 2)], examples=0)


def test_a_rate_that_was_not_measured_reads_as_a_dash():
    metrics = res.summarise([record("harmful", "c", "Sure.")], {})
    assert metrics["utility_accuracy"] is None and res.rate_text(metrics, "utility_accuracy") == "-"
    assert res.rate_text(metrics, "over_refusal_qi") == "0/0 (no prompts)"
