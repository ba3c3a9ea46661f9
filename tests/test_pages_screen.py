"""The page "Which of my data is risky?" in AppTest: screening the shipped utility set on the tiny Llama as a job,
then the ranked table, histograms, agreement, drill-down and exports; a bad upload names line and field."""

import pytest
from streamlit.testing.v1 import AppTest

from analysis.core import jobs
from analysis.core.options import default
from analysis.lab.screen import ScreenTask
from analysis.lab.screen_validate import ValidateScreenTask
from tests.conftest import stop_all_jobs, wait_for_job
from tests.test_app import chart_specs, fresh_app, no_exceptions, seed_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama")
    yield tmp_path
    stop_all_jobs()


def test_screen_page_runs_the_job_and_shows_ranking_figures_drilldown_and_exports(cache):
    at = fresh_app()
    at.switch_page("pages/screen.py").run()
    no_exceptions(at)
    assert at.selectbox(key="widget.screen.model").value == "tiny-llama"
    for name in ("n_anchors", "k", "max_length"):  # the page's defaults are the task's
        assert at.number_input(key=f"setting.screen.{name}").value == default(ScreenTask, name), name
    at.number_input(key="widget.screen.n").set_value(10).run()
    at.number_input(key="setting.screen.n_anchors").set_value(4).run()
    next(b for b in at.button if b.label == "Screen").click().run()
    status = wait_for_job("screen", 600)
    assert status.state == "done", f"{status.error}\n{jobs.log_tail(status.job_id, 40)}"
    at.run()
    no_exceptions(at)
    assert any(i.value.startswith("**Answer.** Riskiest by gradient matching") for i in at.info)
    table = at.dataframe[0].value
    assert len(table) == 10 and table["rank"].tolist() == list(range(1, 11))
    assert table["gradient_matching"].is_monotonic_decreasing
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert "Score distributions of the pool, with the anchors' own scores" in titles
    assert "Do the scores agree? Spearman ρ" in titles
    assert "Per module: contribution to gradient matching" in titles
    histograms = next(s for s in chart_specs(at) if s["layout"]["title"]["text"].startswith("Score distributions"))
    names = {t.get("name") for t in histograms["data"]}
    assert {"pool examples", "harmful prompt + compliance (anchor)", "harmful prompt + refusal (anchor)"} <= names
    assert not any(b.label == "Screen" for b in at.button)  # stored: nothing left to run

    at.radio(key="widget.screen.score").set_value("cos_refusal").run()
    no_exceptions(at)
    assert at.dataframe[0].value["cos_refusal"].is_monotonic_increasing  # risky end of cos_refusal: low
    at.radio(key="widget.screen.module_value").set_value("safety share (module)").run()
    no_exceptions(at)
    assert "Per module: safety share (module)" in [s["layout"]["title"]["text"] for s in chart_specs(at)]
    downloads = [d for d in at.get("download_button") if d.proto.label.startswith(("top-", "bottom-", "random-"))]
    assert [d.proto.label for d in downloads] == ["top-10 (.jsonl)", "bottom-10 (.jsonl)", "random-10 (.jsonl)"]

    # 5 · validation: the task's defaults (k capped by the 10 rows), then top / bottom / random 3, one seed, one step
    assert at.number_input(key="widget.screen.validate_k").value == min(default(ValidateScreenTask, "k"), 10)
    assert at.multiselect(key="widget.screen.validate_seeds").value == list(default(ValidateScreenTask, "seeds"))
    for name in ("n_harmful", "n_benign"):
        assert at.number_input(key=f"setting.screen-validate.{name}").value == default(ValidateScreenTask, name), name
    assert at.toggle(key="widget.screen.validate_utility").value == default(ValidateScreenTask, "utility_accuracy")
    at.number_input(key="widget.screen.validate_k").set_value(3).run()
    at.multiselect(key="widget.screen.validate_seeds").set_value([0]).run()
    at.number_input(key="widget.screen.validate_steps").set_value(1).run()
    at.number_input(key="setting.screen-validate.n_harmful").set_value(11).run()
    at.number_input(key="setting.screen-validate.n_benign").set_value(4).run()
    at.toggle(key="widget.screen.validate_utility").set_value(False).run()
    next(b for b in at.button if b.label == "Validate the ranking").click().run()
    status = wait_for_job("screen-validate", 900)
    assert status.state == "done", f"{status.error}\n{jobs.log_tail(status.job_id, 40)}"
    at.run()
    no_exceptions(at)
    words = [m.value for m in list(at.info) + list(at.success) if "McNemar" in m.value]
    assert len(words) == 2 and words[0].startswith("top ASR") and "vs random" in words[0]
    validation = next(s for s in chart_specs(at) if s["layout"]["title"]["text"].startswith("Does the ranking"))
    assert {t["name"] for t in validation["data"]} >= {"aligned, per seed", "top, per seed", "top, pooled over seeds"}


def alpaca_upload_script():
    """Runs as a Streamlit script: the page's upload reader on a bad and a good Alpaca upload."""
    import dataclasses

    import streamlit as st

    from ui.common import read_upload

    @dataclasses.dataclass
    class Upload:  # what st.file_uploader returns, as far as the reader cares
        name: str
        data: bytes

        def getvalue(self) -> bytes:
            return self.data

    bad = read_upload(Upload("mine.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": 3, "output": "d"}\n'))
    good = read_upload(Upload("alpaca.json", b'[{"instruction": "a", "input": "x", "output": "b"}]'))
    st.write(f"bad={bad is None} good={good[1][0].prompt!r}")


def test_screen_page_asks_for_a_file_and_a_bad_upload_names_line_and_field(cache):
    at = fresh_app()
    at.switch_page("pages/screen.py").run()
    at.selectbox(key="widget.screen.data").set_value("upload").run()
    no_exceptions(at)
    assert at.get("file_uploader") and any("Alpaca" in i.value for i in at.info)
    assert not any(b.label == "Screen" for b in at.button)  # nothing to screen without a file
    at.selectbox(key="widget.screen.data").set_value("benign_sensitive").run()
    at.selectbox(key="widget.screen.anchors").set_value("harmful_prefix").run()  # compliance anchors, refusal made
    no_exceptions(at)
    assert not at.error and any(b.label == "Screen" for b in at.button)
    script = AppTest.from_function(alpaca_upload_script, default_timeout=60).run()
    no_exceptions(script)
    assert len(script.error) == 1 and "line 2, field 'input': must be a string" in script.error[0].value
    assert script.markdown[0].value == "bad=True good='a\\n\\nx'"
