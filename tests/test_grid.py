"""The defence x attack grid on tiny models: every cell trained, defended and evaluated once, then reused."""

from __future__ import annotations

import json
import re

import pytest
import torch

from analysis.core.config import ConfigError, to_jsonable
from analysis.lab.grid import DEFAULT_DEFENCES, DEFENCES, METRICS, DefenceGridTask, run_grid, stored_grids, stored_rows

FAST = dict(max_length=96, eval_harmful_per_category=1, n_eval_utility=2, gen_harmful_per_category=1, n_gen_benign=2,
            gen_max_new_tokens=4, gen_batch_size=16, lr=1e-3, n_train=4, batch_size=2, epochs=1, eval_every=1,
            spf={"k": 2, "safety_batch": 2})


@pytest.fixture
def tiny_aligned(tmp_path, monkeypatch):
    """A tiny "aligned" model folder: tiny-llama with a small rank-2 change in every linear weight."""
    from analysis.llm.models import load_model

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model("tiny-llama")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != loaded.model.config.vocab_size:
                W = module.weight
                W.add_(0.05 * torch.randn(W.shape[0], 2, generator=generator) @ torch.randn(2, W.shape[1],
                                                                                             generator=generator))
    folder = tmp_path / "aligned"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return str(folder)


def grid(model: str, **values) -> DefenceGridTask:
    return DefenceGridTask(**{"model": model, "base": "tiny-llama", "tiers": ("harmful-10", "aoa"),
                              "defences": ("none", "plain", "spf", "safe-lora"), "n_harmful": 4, "n_benign": 2,
                              "max_new_tokens": 4, "utility_max_new_tokens": 4, "overrides": FAST, **values})


def test_each_seed_is_a_run_of_its_own_and_the_evaluation_prompts_are_shared(tiny_aligned):
    task = grid(tiny_aligned, tiers=("harmful-10",), defences=("none", "plain"), seed=0, seeds=(0, 1))
    assert task.cells() == [("harmful-10", "none", 0), ("harmful-10", "plain", 0), ("harmful-10", "plain", 1)]
    assert task.run_id() != grid(tiny_aligned, tiers=("harmful-10",), defences=("none", "plain")).run_id()
    assert grid(tiny_aligned, seeds=None).run_id() == grid(tiny_aligned).run_id()  # a legacy field: ids kept
    rows = run_grid(task).rows
    plain = [row for row in rows if row["defence"] == "plain"]
    assert [row["seed"] for row in plain] == [0, 1]
    assert plain[0]["finetune_run"] != plain[1]["finetune_run"]  # two seeds, two fine-tuning runs
    assert plain[0]["eval_run"] != plain[1]["eval_run"]
    from analysis.lab.finetune import load_finetune_run

    assert [load_finetune_run(row["finetune_run"]).config["seed"] for row in plain] == [0, 1]
    with pytest.raises(ConfigError, match="seeds must be distinct"):
        grid(tiny_aligned, seeds=(1, 1))


def test_the_grid_trains_defends_and_evaluates_every_cell_then_reuses_them(tiny_aligned, tmp_path):
    from analysis.__main__ import main
    from analysis.lab.finetune import finetune_root
    from analysis.safety.evaluate import evals_store

    task = grid(tiny_aligned)
    assert stored_rows(task) == []  # nothing trained yet: nothing to show, nothing computed
    result = run_grid(task)
    assert stored_rows(task) == result.rows  # every cell is found without training or evaluating
    table = result.table
    assert list(zip(table.tier, table.defence, table.seed)) == task.cells()
    assert set(METRICS) <= set(table.columns)
    assert table.asr.between(0, 1).all() and table.utility_nll.gt(0).all()
    rows = {(r["tier"], r["defence"]): r for r in result.rows}
    for tier in task.tiers:
        assert rows[tier, "none"]["finetune_run"] is None
        assert rows[tier, "safe-lora"]["finetune_run"] == rows[tier, "plain"]["finetune_run"]  # projects that run
        assert rows[tier, "spf"]["finetune_run"] != rows[tier, "plain"]["finetune_run"]
        assert len({rows[tier, d]["eval_run"] for d in task.defences}) == len(task.defences)  # four models
    # AOA is evaluated with its persona, harmful-10 without a system prompt
    aoa = json.loads((evals_store().path(rows["aoa", "none"]["eval_run"]) / "manifest.json").read_text())
    assert "AOA" in aoa["config"]["config"]["system_prompt"]
    assert rows["aoa", "none"]["eval_run"] != rows["harmful-10", "none"]["eval_run"]
    # stored, listed, and a second run (here through the CLI) reuses every cell
    assert [g.run_id for g in stored_grids()] == [task.run_id()]
    runs_before = sorted(p.name for p in finetune_root().iterdir())
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"kind": task.kind, "config": to_jsonable(task)}))
    assert main(["defences", "--config", str(config)]) == 0
    assert sorted(p.name for p in finetune_root().iterdir()) == runs_before
    assert stored_grids()[0].rows == json.loads(json.dumps(result.rows))
    assert (result.folder / "table.csv").read_text().startswith("tier,defence,")


def test_bad_grid_settings_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="unknown tier.*harmful-10"):
        DefenceGridTask(tiers=("harmful-5",))
    with pytest.raises(ConfigError, match="unknown defence.*pcgrad"):
        DefenceGridTask(defences=("plain", "vaccine"))
    with pytest.raises(ConfigError, match="lr"):
        DefenceGridTask(model="tiny-llama", overrides={"lr": -1.0})
    with pytest.raises(ConfigError, match="at least one"):
        DefenceGridTask(defences=())
    assert DefenceGridTask().defences == DEFAULT_DEFENCES and set(DEFAULT_DEFENCES) < set(DEFENCES)


def test_each_defence_trains_with_its_method_mode_and_safety_signal():
    task = DefenceGridTask(model="tiny-llama", base="tiny-llama", defences=tuple(DEFENCES))
    settings = {defence: task.finetune_config("harmful-10", defence) for defence in DEFENCES if defence != "none"}
    assert {d: (c.method, c.spf.mode, c.spf.safety_loss) for d, c in settings.items()} == {
        "plain": ("plain", "conflict", "refusal"), "spf": ("spf", "conflict", "refusal"),
        "pcgrad": ("pcgrad", "conflict", "refusal"), "orth": ("spf", "orthogonal", "refusal"),
        "same": ("spf", "same", "refusal"), "safe-lora": ("plain", "conflict", "refusal"),
        "spf-compliance": ("spf", "conflict", "compliance"), "spf-kl": ("spf", "conflict", "kl")}


def test_the_defence_lab_page_runs_a_grid_as_a_job_and_shows_its_table(tmp_path, monkeypatch, one_torch_thread):
    from analysis.core import jobs
    from tests.conftest import stop_all_jobs, wait_for_job
    from tests.test_app import chart_specs, fresh_app, no_exceptions, seed_cache

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, **{"grid.model": "tiny-llama", "grid.base": "tiny-llama"})
    try:
        at = fresh_app()
        at.switch_page("pages/defences.py").run()
        no_exceptions(at)
        assert any("No cell of this grid is stored yet" in i.value for i in at.info)
        for name in ("n_harmful", "n_benign", "max_new_tokens"):  # the page's defaults are the task's
            assert at.number_input(key=f"setting.defences.{name}").value == getattr(DefenceGridTask, name)
        at.multiselect(key="widget.grid.tiers").set_value(["harmful-10"])
        at.multiselect(key="widget.grid.defences").set_value(["none", "plain"])
        at.number_input(key="setting.defences.n_harmful").set_value(4)
        at.number_input(key="setting.defences.n_benign").set_value(2)
        at.number_input(key="setting.defences.max_new_tokens").set_value(8).run()
        no_exceptions(at)
        next(b for b in at.button if b.label == "Run the grid").click().run()
        status = wait_for_job("defences", 600)
        assert status.state == "done", f"{status.error}\n{jobs.log_tail(status.job_id, 40)}"
        at.run()
        no_exceptions(at)
        table = at.dataframe[0].value
        assert list(table["defence"]) == ["none", "plain"]
        assert all(re.fullmatch(r"\d/4 = \d+% \[\d+-\d+%\]", cell) for cell in table["ASR (keyword)"])  # k/n [Wilson]
        assert any("**harmful-10**: ASR" in m.value for m in at.markdown)
        assert any("**harmful-10**, plain vs none:" in m.value and "4 prompts" in m.value for m in at.markdown)
        titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
        assert "ASR (keyword) by attack and defence" in titles
        assert not any(b.label == "Run the grid" for b in at.button)  # stored
    finally:
        stop_all_jobs()


def test_grid_views_read_the_rows_right():
    from analysis.views.defences import grid_figure, grid_table, grid_verdict

    def row(tier, defence, asr, accuracy=0.25):
        return {"tier": tier, "defence": defence, "asr": asr, "over_refusal": 0.1, "utility_accuracy": accuracy,
                "utility_nll": 2.5, "refusal_nll": 1.8, "affirmative_nll": 4.8, "train_seconds": None}

    rows = [row("harmful-10", "none", 0.09), row("harmful-10", "plain", 1.0), row("harmful-10", "spf", 0.15, 0.5),
            row("harmful-10", "pcgrad", 0.9), row("aoa", "none", 0.1), row("aoa", "plain", 0.95),
            row("aoa", "orth", 0.5), row("benign", "none", 0.09)]
    verdict = grid_verdict(rows)  # a description: which defence holds is for the paired tests to say
    assert verdict[0] == ("**harmful-10**: ASR 9% before fine-tuning (over-refusal 10%), 100% after plain "
                          "fine-tuning; with a defence: spf 15%, over-refusal 10%, utility accuracy 50%; pcgrad 90%, "
                          "over-refusal 10%, utility accuracy 25%.")
    assert verdict[1].endswith("with a defence: orth 50%, over-refusal 10%, utility accuracy 25%.")
    assert verdict[2] == "**benign**: ASR 9% before fine-tuning (over-refusal 10%); no defence evaluated yet."
    seeded = [{**r, "seed": 0} for r in rows] + [{**row("harmful-10", "plain", 0.8), "seed": 1}]
    assert "100% after" not in grid_verdict(seeded)[0] and "90% after plain" in grid_verdict(seeded)[0]
    assert grid_verdict(seeded)[0].endswith("(means of 2 seeds).")
    assert grid_table(seeded).iloc[1]["ASR (keyword)"] == "0.900 (seeds: 100%, 80%)"
    table = grid_table(rows)
    assert list(table.columns[:4]) == ["attack tier", "defence", "ASR (keyword)", "over-refusal"]
    figure = grid_figure(rows, "asr")
    assert [trace.name for trace in figure.data] == ["none", "plain", "spf", "pcgrad", "orth"]
    assert figure.layout.yaxis.tickformat == ".0%" and figure.layout.xaxis.title.text.startswith("attack tier")
    assert list(figure.data[2].x) == ["harmful-10"] and list(figure.data[2].y) == [0.15]
