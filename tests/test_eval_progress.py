"""Evaluation progress names each stage with counts; prompts batched by length come back in order."""

import pytest

from analysis.core.tasks import TaskContext
from analysis.safety import evaluate as ev

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_stage_plan_shares_follow_the_work():
    config = ev.EvalConfig(model="tiny-llama", n_harmful=8, n_benign=4, n_utility=4, max_new_tokens=10,
                           utility_max_new_tokens=40)
    sets = ev.load_sets(config)
    plan = ev.stage_plan(config, sets)
    assert list(plan) == ["harmful", "benign", "utility", "refusal_nll", "affirmative_nll", "utility_nll"]
    assert plan["harmful"]["count"] == 8 and plan["benign"]["count"] == 4 and plan["utility_nll"]["count"] == 4
    assert plan["harmful"]["low"] == 0 and plan["utility_nll"]["high"] == pytest.approx(1.0)
    for a, b in zip(list(plan.values()), list(plan.values())[1:]):
        assert a["high"] == pytest.approx(b["low"])
    total = sum(stage["work"] for stage in plan.values())
    n_scored = plan["utility"]["count"]
    assert plan["utility"]["work"] == n_scored * 40 and plan["harmful"]["work"] == 80
    assert plan["utility"]["high"] - plan["utility"]["low"] == pytest.approx(n_scored * 40 / total)
    judged = ev.stage_plan(ev.EvalConfig(**{**config.__dict__, "judge": ev.JudgeConfig("http://x/v1", "m")}), sets)
    assert judged["utility_nll"]["high"] == pytest.approx(0.95)


def test_progress_names_the_stages_and_length_batching_keeps_the_order(tiny_gpt2, tmp_path):
    config = ev.EvalConfig(model="tiny-gpt2", n_harmful=5, n_benign=3, n_utility=3, max_new_tokens=4,
                           utility_max_new_tokens=5, batch_size=2)
    events = []
    result = ev.evaluate(config, TaskContext(progress=events.append), model=tiny_gpt2, store=ev.evals_store(tmp_path))
    messages = [e.message for e in events]
    assert "harmful answers: 5/5 (4 new tokens each)" in messages and "benign answers: 3/3 (4 new tokens each)" in messages
    n_scored = sum(r["set"] == "utility" for r in result.records)
    if n_scored:
        assert f"utility answers: {n_scored}/{n_scored} (5 new tokens each)" in messages
    assert any(m.startswith("refusal NLL: 5 samples") for m in messages)
    assert any(m.startswith("utility NLL: 3 samples") for m in messages)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # each completion is the one its own prompt gives alone (the length order is undone)
    harmful, benign, _ = ev.load_sets(config)
    alone = [ev.generate(tiny_gpt2.model, tiny_gpt2.tokenizer, [ex.context], 4, 1)[0] for ex in list(harmful) + list(benign)]
    assert [r["completion"] for r in result.records if r["set"] in ("harmful", "benign")] == alone
