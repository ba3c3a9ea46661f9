"""The page "Why does the defence fail?" in AppTest, on a tiny Llama fine-tuning run."""

import pytest

from analysis.core import jobs
from analysis.lab.finetune import run_finetune
from tests.conftest import stop_all_jobs, wait_for_job
from tests.test_app import chart_specs, fresh_app, no_exceptions, seed_cache
from tests.test_finetune import tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache with one finished tiny run (basis refreshed every step); the tiny Llama as the base model."""
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **{"why.base": "tiny-llama"})
    yield tmp_path
    stop_all_jobs()


def test_why_page_without_runs_points_to_the_fine_tune_page(cache):
    at = fresh_app()
    at.switch_page("pages/why.py").run()
    no_exceptions(at)
    assert any("No finished fine-tuning run" in i.value for i in at.info)


def test_why_page_shows_drift_runs_the_analysis_and_its_figures(cache):
    result = run_finetune(tiny(spf=dict(refresh=1)), root=cache / "finetune")
    at = fresh_app()
    at.switch_page("pages/why.py").run()
    no_exceptions(at)
    assert at.selectbox(key="widget.why.run").value == result.run_id
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert titles == ["Drift of the safety subspace during fine-tuning"]
    drift = chart_specs(at)[0]
    assert {t["name"] for t in drift["data"]} == {"left, mean of modules", "left, lowest layer",
                                                  "right, mean of modules", "right, lowest layer"}
    assert drift["data"][0]["x"] == [1, 2, 3, 4]
    from analysis.lab.why import WhyTask

    for name in ("k", "n_prompts", "first_tokens"):  # the page's defaults are the task's, declared once
        assert at.number_input(key=f"setting.why.{name}").value == getattr(WhyTask, name)
    assert "Measured on this machine" not in " ".join(c.value for c in at.caption)  # no why job has finished yet
    at.number_input(key="setting.why.n_prompts").set_value(4).run()
    next(b for b in at.button if b.label == "Analyse").click().run()
    status = wait_for_job("why", 600)
    assert status.state == "done", f"{status.error}\n{jobs.log_tail(status.job_id, 40)}"
    at.run()
    no_exceptions(at)
    assert any(i.value.startswith("**Answer.**") for i in at.info)
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert "Overlap with the safety subspaces per layer, left singular vectors" in titles
    assert "Where does the safety gradient live? Token energy by response position" in titles
    assert any(t.startswith("Smallest principal angle") for t in titles)
    assert "Token energy by layer and response position: refusal CE, aligned model" in titles
    overlap = next(s for s in chart_specs(at) if s["layout"]["title"]["text"].startswith("Overlap"))
    assert overlap["layout"]["yaxis"]["title"]["text"].startswith("overlap φ")
    assert "random subspaces, k/d" in {t["name"] for t in overlap["data"]}
    assert not any(b.label == "Analyse" for b in at.button)  # stored: nothing left to run
    at.number_input(key="setting.why.k").set_value(3).run()  # other settings: not stored, the cost is measured
    assert any(c.value.startswith("Not analysed yet") and "Measured on this machine:" in c.value for c in at.caption)
    at.number_input(key="setting.why.k").set_value(8).run()
    at.radio(key="widget.why.side").set_value("right").run()
    no_exceptions(at)
    assert "Overlap with the safety subspaces per layer, right singular vectors" in [
        s["layout"]["title"]["text"] for s in chart_specs(at)]
