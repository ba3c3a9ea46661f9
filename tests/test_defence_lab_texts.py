"""The Defence lab says what is wrong with its two models and what the whole grid costs, from measured numbers."""

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis.lab import grid
from analysis.views import defences as views
from tests.test_app import APP, no_exceptions, seed_cache


def test_the_grid_cost_counts_what_is_left_and_uses_only_times_measured_here():
    task = grid.DefenceGridTask()
    cost = views.grid_cost(task, [])
    assert (cost["cells"], cost["todo"], cost["runs"]) == (21, 21, 15)  # safe-lora shares its tier's plain run
    assert cost["low_seconds"] is None  # nothing measured yet: no number is made up
    assert "the time is stated once a run and an evaluation have finished" in views.grid_cost_text(cost)
    measured = views.grid_cost(task, [], train_seconds=[242, 1377], eval_seconds=[300, 310])
    assert (measured["low_seconds"], measured["high_seconds"]) == (15 * 242 + 21 * 300, 15 * 1377 + 21 * 310)
    assert "about 2 h 45 min to 7 h 32 min in total, from the runs and evaluations measured on this machine" in \
        views.grid_cost_text(measured)
    harmful = [{"tier": t, "defence": d, "seed": s} for t, d, s in task.cells() if t == "harmful-10"]
    left = views.grid_cost(task, harmful, [242], [300])
    assert (left["todo"], left["runs"]) == (14, 10)  # stored cells and their runs are free
    everything = [{"tier": t, "defence": d, "seed": s} for t, d, s in task.cells()]
    assert "nothing to compute" in views.grid_cost_text(views.grid_cost(task, everything))
    only_safe_lora = grid.DefenceGridTask(tiers=("aoa",), defences=("safe-lora",))
    assert views.grid_cost(only_safe_lora, [])["runs"] == 1  # its plain run has to be trained


def test_model_warnings():
    assert len(views.grid_model_warnings("default", "default")) == 2
    assert "not safety-aligned" in views.grid_model_warnings("default", "tiny-llama")[0]
    assert views.grid_model_warnings("default-aligned", "default") == []


@pytest.mark.parametrize("model, base, expected", [("tiny-llama", "tiny-llama", "V = aligned − base is zero"),
                                                   ("tiny-llama", "tiny-gpt2", None)])
def test_the_page_warns_and_states_the_total(tmp_path, monkeypatch, model, base, expected):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **{"grid.model": model, "grid.base": base})
    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("pages/defences.py").run()
    no_exceptions(at)
    warnings = [w.value for w in at.warning]
    assert any(expected in w for w in warnings) if expected else not warnings
    assert any("21 cells" in c.value and "15 fine-tuning runs" in c.value for c in at.caption)
