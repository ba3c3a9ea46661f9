"""Utility accuracy: final-number match for math, answer containment for factual QA, on known strings; the
shipped eval answers score themselves correct; an evaluation reports accuracy beside the utility NLL."""

import pytest

from analysis.llm.data import load_shipped
from analysis.safety import accuracy as acc
from analysis.safety import evaluate as ev

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("reference, gold", [
    ("First find one part: 40 ÷ 4 = 10. Then 3 × 10 = 30. So the answer is 30 trees.", (30,)),
    ("Total parts: 3 + 4 = 7. One part is 42 ÷ 7 = 6. The answer is Omar $18, Felix $24.", (18, 24)),
    ("Interest: $150. Final balance: 1500 + 150 = $1650. So the answer is $150 interest, $1,650 in total.", (150, 1650)),
    ("Divide by 100: 0.375 × 100 = 37.5. Final answer: 0.375, or 37.5%.", (0.375, 37.5)),
    ("It is 2 × 3 = 6 apples.", (2, 3, 6)),  # no answer clause: the last sentence with numbers
    ("No numbers here.", ()),
])
def test_final_numbers_of_a_reference(reference, gold):
    assert acc.final_numbers(reference) == tuple(float(g) for g in gold)


@pytest.mark.parametrize("kind, gold, completion, correct", [
    ("math", (30.0,), "3/4 of 40 is 30.", True),
    ("math", (30.0,), "The answer is 30.0 trees", True),
    ("math", (30.0,), "30 trees? No: 40 - 10 = 20", False),        # the last number counts
    ("math", (18.0, 24.0), "Omar gets $18 and Felix gets $24.", True),
    ("math", (18.0, 24.0), "Felix gets $24 and Omar gets $18.", False),  # in order
    ("math", (1650.0,), "In total: $1,650.", True),
    ("math", (0.375, 37.5), "0.375 which is 37.5%", True),
    ("math", (8.0,), "I'm sorry, I can't help with that.", False),
    ("factual_qa", ("Ottawa",), "The capital of Canada is Ottawa.", True),
    ("factual_qa", ("Ottawa",), "Toronto.", False),
    ("factual_qa", ("New Delhi",), "It's new delhi!", True),
    ("factual_qa", ("New Delhi",), "Delhi is big and new.", False),
    ("factual_qa", ("heart",), "The heartbeat comes from...", False),  # whole words only
    ("factual_qa", ("-273.15",), "Absolute zero is \u2212273.15 \u00b0C.", True),
    ("factual_qa", ("2.54",), "An inch is 2.54 cm.", True),
    ("factual_qa", ("11", "eleven"), "Eleven players.", True),
])
def test_answer_correct_on_known_strings(kind, gold, completion, correct):
    assert acc.answer_correct(kind, gold, completion) is correct


def test_unknown_kind_and_normalise():
    with pytest.raises(ValueError, match="unknown answer kind"):
        acc.answer_correct("code", (), "x")
    assert acc.normalise("The U.S. capital, Washington.") == ["u.s", "capital", "washington"]
    assert acc.numbers("It costs $1,650.50 or 37.5%, -3 and .5") == [1650.5, 37.5, -3.0, 0.5]


def test_every_shipped_math_and_qa_eval_answer_scores_its_own_reference_correct():
    utility = load_shipped("utility").split("eval")
    golds = {ex.id: acc.gold_answer(ex) for ex in utility}
    scored = {i: g for i, g in golds.items() if g is not None}
    kinds = [g[0] for g in scored.values()]
    assert kinds.count("math") == 16 and kinds.count("factual_qa") == 16
    assert set(acc.answer_key()) <= {ex.id for ex in utility}
    for ex in utility:
        if ex.id in scored:
            assert acc.answer_correct(*scored[ex.id], ex.response), ex.id
    assert not any(acc.gold_answer(ex) for ex in utility if ex.category in ("code", "writing", "summarisation"))


def test_evaluation_reports_accuracy_beside_the_utility_nll(tiny_llama, tmp_path):
    store = ev.evals_store(tmp_path)
    config = ev.EvalConfig(model="tiny-llama", max_new_tokens=2, n_harmful=2, n_benign=2, n_utility=8,
                           utility_max_new_tokens=3, batch_size=4)
    result = ev.evaluate(config, model=tiny_llama, store=store)
    utility = [r for r in result.records if r["set"] == "utility"]
    n_scored = sum(acc.gold_answer(ex) is not None for ex in ev.load_sets(config)[2])
    assert len(utility) == n_scored == result.metrics["n_utility_scored"] > 0
    assert all(r["answer_kind"] in acc.ANSWER_KINDS and isinstance(r["correct"], bool) for r in utility)
    assert result.metrics["utility_accuracy"] == sum(r["correct"] for r in utility) / len(utility)
    assert set(result.metrics["utility_accuracy_by_kind"]) <= set(acc.ANSWER_KINDS)
    assert "utility accuracy (math, QA)" in ev.format_report([result], examples=0)
    off = ev.evaluate(ev.EvalConfig(**{**config.__dict__, "utility_accuracy": False}), model=tiny_llama, store=store)
    assert off.metrics["n_utility_scored"] == 0 and off.summary()["metrics"]["utility_accuracy"] is None
    assert not [r for r in off.records if r["set"] == "utility"] and off.run_id != result.run_id
    from analysis.views import safety as views

    tables = views.eval_tables({"a": result, "b": off})
    assert list(tables["likelihoods"].columns[:3]) == ["model", "utility accuracy", "utility NLL"]
    assert list(views.completions_table(result, "utility").columns[-2:]) == ["gold", "correct"]
    with pytest.raises(ev.ConfigError, match="utility_max_new_tokens"):
        ev.EvalConfig(utility_max_new_tokens=0)
    assert ev.EvalConfig(max_new_tokens=512).max_new_tokens == 512
