"""Answers, captions and legends of analysis.views.collection on hand-made per-module tables (no model)."""

import types

import numpy as np
import pandas as pd
import pytest

from analysis.views import collection as views


def fake_run(safety_k, utility_k, safety_top1=None, utility_top1=None, run_id="r1", model="tiny-llama", n=(4, 4)):
    """A run-like object with a per-module table: k@0.9, effective rank and CER(1) of both sets."""
    count = len(safety_k)
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    safety_k, utility_k = np.asarray(safety_k, float), np.asarray(utility_k, float)
    table = pd.DataFrame({
        "module": [f"m{i}" for i in range(count)], "label": [f"L{i // 7}.{kinds[i % 7]}" for i in range(count)],
        "layer": [i // 7 for i in range(count)], "kind": [kinds[i % 7] for i in range(count)],
        "d_out": 64, "d_in": 64,
        "safety_k90": safety_k, "utility_k90": utility_k,
        "safety_effective_rank": safety_k + 0.5, "utility_effective_rank": utility_k + 0.5,
        "safety_top1_energy": safety_top1 if safety_top1 is not None else 1 / safety_k,
        "utility_top1_energy": utility_top1 if utility_top1 is not None else 1 / utility_k,
    })
    return types.SimpleNamespace(table=table, run_id=run_id, modules=list(range(count)), top_k=2,
                                 config={"n_safety": n[0], "n_utility": n[1], "model": {"source": model}},
                                 manifest={"model": {"name": model}})


def test_ratio_caption_follows_the_metric_direction():
    run = fake_run([2, 3, 4], [4, 5, 6])
    k_ratio = views.rank_heatmaps(run, "k_eta", 0.9)["ratio"].layout.title.subtitle.text
    assert k_ratio.startswith("below 1: safety needs fewer directions")
    cer_ratio = views.rank_heatmaps(run, "top1_energy", 0.9)["ratio"].layout.title.subtitle.text
    assert cer_ratio.startswith("above 1: safety puts more of its energy in its top direction")
    assert "fewer directions" not in cer_ratio
    for metric in views.RANK_METRICS:  # every metric has a stated direction
        assert views.RANK_DIRECTION[metric] in (1, -1) and views.ratio_reading(metric)


def test_cer1_answer_reads_a_larger_value_as_lower_rank():
    # safety puts more energy in its top direction in every module: lower-rank by CER(1)
    run = fake_run([2, 3, 4], [4, 5, 6], safety_top1=[0.6, 0.5, 0.4], utility_top1=[0.3, 0.2, 0.1])
    answer = views.low_rank_answer(run, 0.9, metric="top1_energy")
    assert "strictly larger CER(1)) in 3 of 3 modules, the reverse in 0, tied in 0" in answer
    assert "safety is lower-rank than utility in most modules (3 of 3)" in answer
    reverse = fake_run([2, 3, 4], [4, 5, 6], safety_top1=[0.1, 0.1, 0.1], utility_top1=[0.3, 0.2, 0.2])
    assert "safety is higher-rank than utility in most modules (3 of 3)" in views.low_rank_answer(
        reverse, 0.9, metric="top1_energy")


def test_headline_counts_ties_and_bases_the_verdict_on_the_per_module_count():
    # medians taken per set disagree with the per-module comparison (safety 7.5 vs utility 7 in the browser)
    utility = [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 1, 1, 1, 1, 1, 1, 5, 5, 5]
    safety = [u - 1 for u in utility[:19]] + [20] * 6 + [5, 5, 5]
    run = fake_run(safety, utility)
    answer = views.low_rank_answer(run, 0.9)
    assert "strictly smaller k@0.9) in 19 of 28 modules, the reverse in 6, tied in 3" in answer
    assert "safety is lower-rank than utility in most modules (19 of 28)" in answer
    ratio = np.median(np.array(safety) / np.array(utility))
    assert f"median ratio safety/utility = {ratio:.2f}" in answer and ratio < 1  # agrees with the count
    assert f"safety median k@0.9 = {np.median(safety):g}" in answer
    assert f"utility median k@0.9 = {np.median(utility):g}" in answer
    even = fake_run([1, 2, 3, 3], [2, 1, 3, 3])
    assert "neither set is lower-rank in a majority of the 4 modules" in views.low_rank_answer(even, 0.9)


def test_one_direction_is_singular():
    run = fake_run([1, 1, 1], [1, 2, 2])
    assert "1 directions" not in views.low_rank_answer(run, 0.9)
    assert views.directions(1) == "1 direction" and views.directions(7.5) == "7.5 directions"
    snapshot = {"labels": {"m": "L0.q"}, "done_samples": 2, "total_samples": 8,
                "preview": {"m": {"safety": np.array([1.0, 0.0]), "utility": np.array([1.0, 0.0])}}}
    answer = views.live_answer(snapshot, 0.9)
    assert "L0.q: safety k = 1, utility k = 1" in answer and "1 directions" not in answer


@pytest.mark.parametrize("n, each", [(1, 1), (2, 1), (5, 2), (8, 4), (12, 5)])
def test_best_and_worst_never_share_a_sample(n, each):
    scores = pd.DataFrame({"id": [f"s{i}" for i in range(n)], "phi": np.linspace(0, 1, n)})
    best, worst = views.best_and_worst(scores)
    assert len(best) == each and len(worst) == (each if n > 1 else 0)
    assert not set(best["id"]) & set(worst["id"])
    assert list(best["phi"]) == sorted(best["phi"], reverse=True) and list(worst["phi"]) == sorted(worst["phi"])
    if n > 1:
        assert best["phi"].iloc[0] == scores["phi"].max() and worst["phi"].iloc[0] == scores["phi"].min()


def test_comparison_legend_names_model_and_sample_counts():
    runs = {"aaa": fake_run([2, 3], [4, 5], run_id="aaa", model="tiny-llama", n=(4, 4)),
            "bbb": fake_run([2, 3], [4, 5], run_id="bbb", model="smollm2-135m-instruct", n=(32, 16))}
    figure = views.compare_figure(runs, "safety_k90")
    names = [trace.name for trace in figure.data]
    assert names == ["aaa · tiny-llama · n = 4+4", "bbb · smollm2-135m-instruct · n = 32+16"]
