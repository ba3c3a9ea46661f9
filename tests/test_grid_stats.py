"""The Defence lab's table and verdicts with intervals and paired tests on the cells' stored evaluations."""

import types

from analysis.safety.results import summarise
from analysis.views.defences import grid_paired_verdicts, grid_table


def evaluation(answered: int, n: int = 88, correct: int = 10):
    records = [{"set": "harmful", "id": f"h{i}", "category": "c", "refused_qi": i >= answered,
                "refused_arditi": i >= answered} for i in range(n)]
    records += [{"set": "utility", "id": f"u{i}", "category": "math", "answer_kind": "math", "correct": i < correct,
                 "refused_qi": False, "refused_arditi": False} for i in range(20)]
    return types.SimpleNamespace(records=records, metrics=summarise(records, {}))


def row(defence, eval_run, asr):
    return {"tier": "harmful-10", "defence": defence, "asr": asr, "over_refusal": None, "utility_accuracy": 0.5,
            "utility_nll": 2.5, "eval_run": eval_run}


def test_paired_verdicts_plain_against_none_and_each_defence_against_plain():
    evaluations = {"e0": evaluation(4), "e1": evaluation(80), "e2": evaluation(76), "e3": evaluation(10)}
    rows = [row("none", "e0", 4 / 88), row("plain", "e1", 80 / 88), row("spf", "e2", 76 / 88),
            row("pcgrad", "e3", 10 / 88), row("orth", "missing", 0.5)]
    lines = grid_paired_verdicts(rows, evaluations)
    assert len(lines) == 3  # orth has no stored evaluation: no claim
    assert lines[0].startswith("**harmful-10**, plain vs none: ASR rose by 86 points")
    assert "p < 0.001 (McNemar exact), 88 prompts" in lines[0]
    assert "spf vs plain: no detectable change in ASR: -5 points" in lines[1]  # 4 of 88: p = 0.125
    assert "p = 0.125" in lines[1]
    assert lines[2].startswith("**harmful-10**, pcgrad vs plain: ASR fell by 80 points")
    assert "no detectable change in utility accuracy: +0 points" in lines[2]


def test_grid_table_shows_counts_and_intervals_when_the_evaluations_are_there():
    evaluations = {"e0": evaluation(4)}
    table = grid_table([row("none", "e0", 4 / 88), row("plain", "missing", 0.9)], evaluations)
    assert table.loc[0, "ASR (keyword)"] == "4/88 = 5% [2-11%]"
    assert table.loc[0, "utility accuracy (exact match)"] == "10/20 = 50% [30-70%]"
    assert table.loc[1, "ASR (keyword)"] == 0.9  # not stored: the bare number, as before
    assert grid_table([row("none", "e0", 4 / 88)]).loc[0, "ASR (keyword)"] == 4 / 88


def test_grid_export_carries_n_and_intervals():
    from analysis.views.defences import grid_export

    frame = grid_export([row("none", "e0", 4 / 88), row("plain", "missing", 0.9)], {"e0": evaluation(4)})
    assert (frame.loc[0, "asr_k"], frame.loc[0, "asr_n"]) == (4, 88)
    assert 0.017 < frame.loc[0, "asr_low"] < 0.018 and 0.11 < frame.loc[0, "asr_high"] < 0.12
    assert frame.loc[0, "utility_accuracy_n"] == 20
    assert frame.loc[1, "asr"] == 0.9 and frame["asr_n"].isna().iloc[1]


def test_seeds_are_pooled_prompt_by_prompt_and_the_table_counts_prompts_times_seeds():
    evaluations = {"none": evaluation(4), "p0": evaluation(80), "p1": evaluation(84), "s0": evaluation(78),
                   "s1": evaluation(10)}

    def seeded(defence, eval_run, seed):
        return {**row(defence, eval_run, 0.5), "seed": seed}

    rows = [seeded("none", "none", 0), seeded("plain", "p0", 0), seeded("plain", "p1", 1),
            seeded("spf", "s0", 0), seeded("spf", "s1", 1)]
    lines = grid_paired_verdicts(rows, evaluations)
    assert lines[0].startswith("**harmful-10**, plain vs none (pairs: prompt x 2 seeds): ASR rose by")
    assert "176 prompts" in lines[0]  # 88 prompts x 2 seeds, the aligned model repeated for each seed
    # spf vs plain: seed 0 loses 2 (80 -> 78), seed 1 drops 74 (84 -> 10): pooled, a significant fall
    assert lines[1].startswith("**harmful-10**, spf vs plain (pairs: prompt x 2 seeds): ASR fell by 43 points")
    table = grid_table(rows, evaluations)
    assert table.loc[1, "ASR (keyword)"].startswith("164/176 = 93%") and "(seeds: 50%, 50%)" in table.loc[1, "ASR (keyword)"]
    assert list(table["seeds"]) == ["0", "0, 1", "0, 1"]


def test_a_mean_over_seeds_carries_a_student_t_interval():
    """utility NLL 2.5 and 2.7 over two seeds: mean 2.6, sd 0.1414, t(1, 0.975) = 12.706 -> 2.6 -/+ 1.271."""
    rows = [{**row("plain", None, 0.5), "seed": 0}, {**row("plain", None, 0.5), "utility_nll": 2.7, "seed": 1}]
    shown = grid_table(rows).loc[0, "utility NLL (nats/token)"]
    assert shown.startswith("2.600 [1.329, 3.871] (t over 2 seeds)") and shown.endswith("(seeds: 2.50, 2.70)")


def test_the_command_line_prints_what_the_page_shows(monkeypatch, capsys):
    """`python -m analysis defences` prints the rates as k/n with Wilson intervals, the paired verdicts and '-'
    for an unknown time (it printed bare fractions and 'nan' before)."""
    from analysis.lab import grid
    from analysis.safety import results

    evaluations = {"e0": evaluation(4), "e1": evaluation(80)}
    monkeypatch.setattr(results, "load_evaluations", lambda ids: {i: evaluations.get(i) for i in ids})
    grid.print_grid({"rows": [row("none", "e0", 4 / 88), {**row("plain", "e1", 80 / 88), "train_seconds": 12.0}],
                     "folder": "F"})
    out = capsys.readouterr().out
    assert "harmful-10 / none\n  ASR (keyword): 4/88 = 5% [" in out and "fine-tuning (s, mean): -" in out
    assert "fine-tuning (s, mean): 12.0" in out and "nan" not in out
    assert "harmful-10, plain vs none: ASR rose by 86 points" in out and "**" not in out
    assert out.rstrip().endswith("stored in F")
