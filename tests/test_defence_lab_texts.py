"""The Defence lab says what is wrong with its two models and what the whole grid costs, from measured numbers."""

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis.lab import grid
from analysis.views import defences as views
from tests.test_app import APP, no_exceptions, seed_cache


def test_the_default_grid_costs_what_was_measured_here():
    task = grid.DefenceGridTask()
    cost = views.grid_cost(task.cells())
    assert (len(task.cells()), cost["runs"], cost["evaluations"]) == (21, 15, 21)
    assert cost["low_seconds"] == 15 * 242 + 21 * 300 and cost["high_seconds"] == 15 * 1377 + 21 * 300
    text = views.grid_cost_text(task.cells())
    assert "about 2.8 hours to 7.5 hours in total" in text
    stored = [cell for cell in task.cells() if cell[0] == "harmful-10"]
    assert views.grid_cost(task.cells(), stored)["evaluations"] == 14  # stored cells are free
    assert "nothing to compute" in views.grid_cost_text(task.cells(), task.cells())
    assert views.grid_cost([("aoa", "safe-lora")])["runs"] == 1  # its plain run has to be trained


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
    assert any("in total on this machine" in c.value and "21 cells" in c.value for c in at.caption)
