"""Tables and figures of evaluations and fine-tuning runs (analysis.views.safety) on hand-made results."""

import pandas as pd

from analysis.safety.evaluate import EvalResult
from analysis.views import safety as safety_views


def fake_eval(asr_by_category: dict[str, float], seconds: float = 1.0):
    by_category = {c: {"n": 8, "asr_qi": a, "asr_arditi": a / 2} for c, a in asr_by_category.items()}
    metrics = {"n_harmful": 8 * len(by_category), "n_benign": 64, "asr_qi": 0.5, "asr_arditi": 0.25,
               "over_refusal_qi": 0.1, "over_refusal_arditi": 0.05, "refusal_nll": 2.0, "affirmative_nll": 4.0,
               "utility_nll": 1.5, "harmful_by_category": by_category, "benign_by_category": {}}
    return EvalResult(model={}, config={}, run_id="", records=[], nll={}, nll_ids={}, metrics=metrics,
                      seconds=seconds, created="")


def test_eval_summary_and_category_rates_follow_the_keyword_list():
    results = {"base": fake_eval({"malware": 1.0, "fraud": 0.5}), "aligned": fake_eval({"malware": 0.0, "fraud": 0.25})}
    summary = safety_views.eval_summary(results)
    assert list(summary["model"]) == ["base", "aligned"] and summary["harmful prompts"].tolist() == [16, 16]
    qi = safety_views.category_rates(results, "qi")
    arditi = safety_views.category_rates(results, "arditi")
    assert qi.set_index(["model", "category"]).loc[("aligned", "fraud"), "rate"] == 0.25
    assert arditi.set_index(["model", "category"]).loc[("aligned", "fraud"), "rate"] == 0.125
    figure = safety_views.category_asr_figure(results, "arditi")
    assert [trace.name for trace in figure.data] == ["base", "aligned"]
    assert list(figure.data[0].y) == [0.5, 0.25] and figure.layout.yaxis.tickformat == ".0%"
    # n in the labels, Wilson intervals as error bars: 4/8 -> [22%, 78%], 2/8 -> [7%, 59%]
    assert list(figure.data[0].x) == ["malware (n=8)", "fraud (n=8)"]
    low = [0.5 - m for m in figure.data[0].error_y.arrayminus]
    high = [0.5 + p if i == 0 else 0.25 + p for i, p in enumerate(figure.data[0].error_y.array)]
    assert [round(v, 2) for v in high] == [0.78, 0.59] and round(low[0], 2) == 0.22
    assert qi.set_index(["model", "category"]).loc[("base", "malware"), "k"] == 8


def test_eval_tables_are_narrow_enough_to_read_without_scrolling():
    results = {"base": fake_eval({"malware": 1.0}), "aligned": fake_eval({"malware": 0.0})}
    tables = safety_views.eval_tables(results)
    assert list(tables) == ["rates", "likelihoods"] and all(len(t.columns) <= 7 for t in tables.values())
    assert "ASR (Qi)" in tables["rates"] and "refusal NLL" in tables["likelihoods"]
    assert "judge mean score" not in tables["likelihoods"]  # no judge: no empty column
    # every cell carries its n and interval; every number shown is also in the export with n, low, high
    assert tables["rates"]["ASR (Qi)"].tolist() == ["4/8 = 50% [22-78%]"] * 2
    assert tables["likelihoods"]["time"].tolist() == ["1 s"] * 2
    summary = safety_views.eval_summary(results)
    shown = set().union(*(t.columns for t in tables.values())) - {"model", "time"}
    assert shown <= set(summary.columns)
    assert summary.loc[0, "ASR (Qi) n"] == 8 and 0.21 < summary.loc[0, "ASR (Qi) low"] < 0.22


def test_finetune_curves_one_line_per_arm_spanning_all_steps():
    plain = pd.DataFrame({"step": [0, 1, 2, 3], "refusal_nll": [2.0, 2.5, 3.0, 3.5], "cos_mean": [None, -0.2, None, None]})
    spf = pd.DataFrame({"step": [0, 1, 2, 3], "refusal_nll": [2.0, 2.1, 2.1, 2.2], "cos_mean": [None, -0.1, None, None]})
    histories = {"plain fine-tuning": plain, "SPF (conflict, k=8, R=10)": spf}
    figure = safety_views.finetune_curve_figure(histories, "refusal_nll")
    assert [t.name for t in figure.data] == list(histories)
    assert figure.data[0].line.dash == "solid" and figure.data[1].line.dash == "dash"
    assert figure.layout.xaxis.title.text == "optimizer step" and "nats/token" in figure.layout.yaxis.title.text
    cosine = safety_views.finetune_curve_figure(histories, "cos_mean")
    assert list(cosine.data[0].x) == [1] and cosine.layout.xaxis.range[1] > 3  # measured once, drawn on all steps
    empty = safety_views.finetune_curve_figure(histories, "asr")
    assert not empty.data and "not measured" in empty.layout.annotations[0].text


def comparison_rows(spf_final_asr: float, spf_utility: float):
    return pd.DataFrame([
        {"method": "plain", "asr_initial": 0.1, "asr_final": 0.9, "utility_nll_final": 2.0},
        {"method": "spf", "asr_initial": 0.1, "asr_final": spf_final_asr, "utility_nll_final": spf_utility},
    ])


def test_finetune_verdict_applies_both_tolerances():
    kept = safety_views.finetune_verdict(comparison_rows(0.15, 2.1))
    assert "SPF kept the model within 10%" in kept and "+5.0%, within 10%" in kept
    lost = safety_views.finetune_verdict(comparison_rows(0.5, 2.5))
    assert "did not keep" in lost and "+25.0%, outside 10%" in lost
    assert safety_views.finetune_verdict(comparison_rows(0.15, 2.1).iloc[:1]) is None
    assert safety_views.finetune_verdict(comparison_rows(0.15, 2.1).iloc[:1].assign(method="pcgrad")) is None


def test_safety_answer_and_paired_model_verdicts():
    from analysis.safety import results as res

    def records(answered: int, n: int = 88):
        return [{"set": "harmful", "id": f"h{i}", "category": "c", "refused_qi": i >= answered,
                 "refused_arditi": i >= answered} for i in range(n)] + [
            {"set": "benign", "id": f"b{i}", "category": "c", "refused_qi": i < 2, "refused_arditi": i < 2}
            for i in range(64)]

    def result(answered):
        recs = records(answered)
        return EvalResult(model={}, config={}, run_id="", records=recs, nll={}, nll_ids={},
                          metrics=res.summarise(recs, {}), seconds=1241.2444, created="")

    aligned, tuned = result(3), result(39)
    answer = safety_views.safety_answer("aligned", aligned)
    assert answer.startswith("aligned answered 3 of 88 held-out harmful prompts (ASR 3/88 = 3% [1-10%]")
    assert "at most 10%" in answer and "refused 2 of 64 benign prompts" in answer
    lines = safety_views.paired_model_verdicts({"aligned": aligned, "tuned": tuned})
    assert lines[0].startswith("aligned -> tuned: ASR rose by 41 points [+") and "p < 0.001" in lines[0]
    assert lines[1].startswith("aligned -> tuned: no detectable change in over-refusal")
    assert safety_views.eval_tables({"a": aligned})["likelihoods"]["time"].tolist() == ["20 min 41 s"]


def test_finetune_paired_verdicts_read_the_runs_stored_records():
    import types

    def records(answered, n=40):
        return [{"set": "harmful", "id": f"h{i}", "refused_qi": i >= answered, "refused_arditi": i >= answered}
                for i in range(n)] + [{"set": "benign", "id": "b0", "refused_qi": False, "refused_arditi": False}]

    def run(method, final_answered):
        return types.SimpleNamespace(method=method, config={"method": method, "spf": {"refresh": 10}},
                                     evals=[{"step": 0, "final": False, "records": records(2)},
                                            {"step": 5, "final": True, "records": records(final_answered)}])

    lines = safety_views.finetune_paired_verdicts({"plain": run("plain", 38), "pcgrad": run("pcgrad", 3)})
    assert lines[0].startswith("**plain fine-tuning**, after vs before: ASR rose by 90 points [+")
    assert "p < 0.001 (McNemar exact), 40 prompts" in lines[0]
    assert lines[1].startswith("**PCGrad") and "after vs before: no detectable change in ASR: +2 points" in lines[1]
    assert "vs plain fine-tuning: ASR fell by 88 points" in lines[2]
    assert safety_views.finetune_paired_verdicts({"x": types.SimpleNamespace(evals=[])}) == []


def test_judge_failures_are_counted_and_shown_with_their_reasons():
    from analysis.safety import results as res

    records = [{"set": "harmful", "id": f"h{i}", "category": "c", "prompt": "p", "completion": "Sure",
                "refused_qi": False, "refused_arditi": False, "judge_score": 4 if i < 2 else None,
                "judge_error": None if i < 2 else "the judge at x answered a redirect (302)"} for i in range(5)]
    metrics = res.summarise(records, {})
    assert (metrics["judge_n_called"], metrics["judge_n_failed"], metrics["judge_mean_score"]) == (5, 3, 4.0)
    result = EvalResult(model={}, config={}, run_id="", records=records, nll={}, nll_ids={}, metrics=metrics,
                        seconds=1.0, created="")
    [note] = safety_views.judge_failure_notes({"m": result})
    assert note == "m: the judge gave no score for 3 of 5 harmful prompts (3x the judge at x answered a redirect (302))"
    assert safety_views.eval_tables({"m": result})["likelihoods"]["judge calls failed"].tolist() == ["3 of 5"]


def test_finetune_category_figure_has_wilson_error_bars_and_n_in_the_labels():
    import types

    def run(method, final):
        table = pd.DataFrame([{"category": "malware", "n": 2, "initial": 0.0, "final": final},
                              {"category": "fraud", "n": 4, "initial": 0.25, "final": 0.5}])
        return types.SimpleNamespace(method=method, config={"method": method, "spf": {"refresh": 10}},
                                     category_table=lambda which="harmful", t=table: t)

    figure = safety_views.finetune_category_figure({"plain": run("plain", 1.0)})
    before, after = figure.data
    assert list(after.x) == ["malware (n=2)", "fraud (n=4)"] and list(after.y) == [1.0, 0.5]
    # 2/2 answered: Wilson [34%, 100%]; 0/2: [0%, 66%]
    assert round(1.0 - after.error_y.arrayminus[0], 2) == 0.34 and after.error_y.array[0] == 0
    assert round(before.error_y.array[0], 2) == 0.66
