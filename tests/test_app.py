"""The dashboard in Streamlit's AppTest (no browser) on the tiny model, and one end-to-end run in Chromium."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from analysis.core import jobs
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionConfig
from tests.conftest import stop_all_jobs, wait_for_job

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
# Small enough to collect in seconds on the tiny model.
SMALL = {"n_safety": 4, "n_utility": 4, "max_length": 64, "top_k": 2, "batch_size": 4, "curve_boot": 2}


def seed_cache(folder: Path, **choices) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ui_state.json").write_text(json.dumps(choices))


def fresh_app() -> AppTest:
    st.cache_data.clear()
    st.cache_resource.clear()
    return AppTest.from_file(APP, default_timeout=120)


def no_exceptions(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def chart_specs(at: AppTest) -> list[dict]:
    """The Plotly specs of the page's charts, titles unwrapped (figures break long titles with <br> to fit)."""
    specs = [json.loads(element.proto.spec) for element in at.get("plotly_chart")]
    for spec in specs:
        title = spec.get("layout", {}).get("title", {})
        if isinstance(title.get("text"), str):
            title["text"] = title["text"].replace("<br>", " ")
    return specs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache (runs, uploads, ui state) with the tiny Llama chosen; no job left behind."""
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **SMALL)
    yield tmp_path
    stop_all_jobs()


@pytest.fixture(scope="module")
def collected(tmp_path_factory, tiny_llama):
    """A cache holding one complete tiny run, made active."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("SSE_CACHE_DIR")
    os.environ["SSE_CACHE_DIR"] = str(folder)
    config = CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", **SMALL)
    run = collect(config, model=tiny_llama)
    seed_cache(folder, model="tiny-llama", run_id=run.run_id, **SMALL)
    yield run
    if previous is None:
        os.environ.pop("SSE_CACHE_DIR", None)
    else:
        os.environ["SSE_CACHE_DIR"] = previous


def test_setup_shows_model_summary_and_widgets(cache):
    at = fresh_app().run()
    no_exceptions(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Family"] == "llama" and metrics["Layers"] == "2" and metrics["Linear modules"] == "14"
    assert at.radio(key="widget.model_kind").value == "tiny-llama"
    assert {s.label for s in at.selectbox} >= {"Safety set", "Utility set", "Split"}
    assert at.number_input(key="widget.n_safety").value == SMALL["n_safety"]
    assert [b.label for b in at.button] == ["Collect"]
    assert "No results yet" not in " ".join(i.value for i in at.info)


def test_setup_shows_the_plan_and_warns_when_it_does_not_fit(cache, monkeypatch):
    from analysis.engine import planner

    free = planner.available_memory
    at = fresh_app().run()
    no_exceptions(at)
    plan = next(c.value for c in at.caption if c.value.startswith("Predicted: memory peak"))
    assert "free on cpu" in plan and "1 pass(es)" in plan
    assert not any("Modules per pass to" in w.value for w in at.warning)
    monkeypatch.setattr(planner, "available_memory", lambda device="cpu": 1)  # nothing fits: says what to lower
    at.run()
    assert any("may not fit the free memory" in w.value and "lower" in w.value for w in at.warning)
    monkeypatch.setattr(planner, "available_memory", free)
    at.number_input(key="widget.modules_per_pass").set_value(1).run()
    no_exceptions(at)
    assert "14 pass(es)" in next(c.value for c in at.caption if c.value.startswith("Predicted"))


def test_switching_model_updates_summary(cache):
    at = fresh_app().run()
    at.radio(key="widget.model_kind").set_value("tiny-gpt2").run()
    no_exceptions(at)
    assert {m.label: m.value for m in at.metric}["Family"] == "gpt2"
    assert json.loads((cache / "ui_state.json").read_text())["model"] == "tiny-gpt2"


def test_unknown_model_shows_error_not_traceback(cache):
    at = fresh_app().run()
    at.radio(key="widget.model_kind").set_value("other").run()
    at.text_input(key="widget.model_other").set_value("no-such-org/no-such-model").run()
    no_exceptions(at)
    assert any("not in the local Hugging Face cache" in e.value for e in at.error)


def test_empty_module_selection_shows_error(cache):
    at = fresh_app().run()
    at.text_input(key="widget.layers.tiny-llama").set_value("7").run()
    no_exceptions(at)
    assert any("do not exist" in e.value for e in at.error)
    assert not at.button  # nothing to collect


def test_empty_layers_field_asks_for_all_instead_of_selecting_everything(cache):
    at = fresh_app().run()
    at.text_input(key="widget.layers.tiny-llama").set_value("").run()
    no_exceptions(at)
    assert any("Layers field is empty" in e.value and "'all'" in e.value and "14 modules" in e.value for e in at.error)
    assert not at.button  # nothing to collect until the user says 'all'
    at.text_input(key="widget.layers.tiny-llama").set_value("all").run()
    assert [b.label for b in at.button] == ["Collect"]


def test_setup_texts_match_what_happens(cache):
    from analysis.engine.collect_task import CURVE_AUTO_LAYERS

    at = fresh_app().run()
    no_exceptions(at)
    assert f"up to {CURVE_AUTO_LAYERS} layers" in at.text_input(key="widget.curve_layers").help
    assert at.multiselect(key="widget.kinds.tiny-llama").proto.wrap  # every kind chip visible in the column
    assert not any("(none)" in c.value for c in at.caption)
    at.number_input(key="widget.n_safety").set_value(500).run()
    no_exceptions(at)
    message = " ".join(e.value for e in at.error)
    assert "Safety samples n = 500" in message and "only 154 examples" in message and "field 'n'" not in message
    assert not at.button


def test_setup_offers_to_build_the_aligned_model_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))  # no models folder here: the aligned variant is missing
    seed_cache(tmp_path, model="default-aligned", **SMALL)
    at = fresh_app().run()
    no_exceptions(at)
    assert at.radio(key="widget.model_kind").value == "default-aligned"
    assert any("has not been built yet" in w.value for w in at.warning)
    assert [b.label for b in at.button] == ["Build the aligned model"]  # the job itself is tested in test_jobs


def test_findings_page(collected):
    at = fresh_app()
    at.switch_page("pages/findings.py").run()
    no_exceptions(at)
    text = " ".join(m.value for m in at.markdown)
    assert all(f"**{claim} — " in text for claim in ("I", "II", "III")) and collected.run_id in text
    frame = at.dataframe[0].value
    assert list(frame["claim"]) == ["I", "I", "I", "II", "II", "III", "III", "III"]
    assert frame["shown"].str.contains("95% CI").all() and frame["shown"].str.contains("p = ").all()
    assert set(frame["verdict"]) <= {"supported", "contradicted", "not shown at this n"}
    assert "significant in" in text  # per-module counts after Benjamini-Hochberg
    assert {"CSV", "JSON"} <= {b.label for b in at.get("download_button")}


def test_loading_spinner_names_the_model():
    from ui.common import loading_message

    text = loading_message("some-org/some-model")
    assert "some-org/some-model" in text and "embedded" not in text and "convert" not in text
    assert "Tiny random Llama" in loading_message("tiny-llama")


def test_collection_runs_to_the_end_and_reselecting_loads_instantly(cache):
    at = fresh_app().run()
    at.button[0].click().run()
    no_exceptions(at)
    status = wait_for_job("collect", 300)
    assert status.state == "done", status.error
    at.run()  # fragments do not tick in AppTest: rerun the page by hand
    no_exceptions(at)
    assert any("finished in" in s.value for s in at.success)
    assert any("Is safety low-rank?" in m.value for m in at.markdown)
    assert json.loads((cache / "ui_state.json").read_text())["run_id"] == status.result["run_id"]
    # the same settings in a new session (a restarted server): found in the store, no new job
    again = fresh_app().run()
    assert any("collected before" in s.value for s in again.success) or any("finished in" in s.value
                                                                             for s in again.success)
    assert not again.button
    assert len(jobs.list_jobs(kind="collect")) == 1
    # issue 14.7: the run's box and answers belong to its settings; invalid or other settings hide them
    assert any("First answers" in m.value for m in again.markdown)
    again.text_input(key="widget.layers.tiny-llama").set_value("7").run()  # no such layer
    no_exceptions(again)
    assert again.error and not again.success and not any("First answers" in m.value for m in again.markdown)
    again.text_input(key="widget.layers.tiny-llama").set_value("0").run()  # valid, not collected yet
    assert not again.success and not any("First answers" in m.value for m in again.markdown)
    assert any(b.label == "Collect" for b in again.button)


def test_a_job_queued_behind_another_says_so_and_the_sidebar_lists_both(cache):
    """Two collections on one device: the second waits, and both Setup and the sidebar say so (issue 14.4)."""
    long_one = CollectionConfig(model="tiny-llama", **{**SMALL, "n_safety": 24, "n_utility": 24, "batch_size": 2})
    first = jobs.submit(long_one, label="the long one")
    at = fresh_app().run()
    next(b for b in at.button if b.label == "Collect").click().run()  # the page's own settings: a second job
    no_exceptions(at)
    second = jobs.list_jobs(kind="collect")[-1]
    assert second.job_id != first and second.state == "queued"
    at = fresh_app().run()  # (AppTest keeps the sidebar of a first run only) a reload, another tab
    texts = [m.value for m in at.markdown] + [m.value for m in at.sidebar.markdown]
    assert any(t.startswith("**Queued:**") for t in texts)
    assert any("**Queued (" in t for t in texts) and any("the long one" in t for t in texts)
    assert any("in line on cpu" in i.value for i in at.info)
    stop_all_jobs()


def test_live_progress_charts_from_a_running_job(cache):
    """The live view is drawn from the job's live data (what the fragment shows while collecting)."""
    from analysis.views import collection as views

    job_id = jobs.submit(CollectionConfig(model="tiny-llama", **SMALL), "live")
    snapshots = []
    while jobs.read(job_id).active:
        live = jobs.live(job_id)
        if live and live.get("stage") == "capture":
            snapshots.append(live)
        time.sleep(0.02)
    assert jobs.read(job_id).state == "done" and snapshots
    assert "safety k =" in views.live_answer(snapshots[-1])
    figures = views.live_figures(snapshots[-1])
    assert figures and any("Cumulative energy" in f.layout.title.text for f in figures)


def upload_script():
    """Runs as a Streamlit script: hand a bad and a good upload to the page's upload reader."""
    import dataclasses

    import streamlit as st

    from ui.common import read_upload

    @dataclasses.dataclass
    class Upload:  # what st.file_uploader returns, as far as the reader cares
        name: str
        data: bytes

        def getvalue(self) -> bytes:
            return self.data

    from analysis.llm.data import DataError, load_any
    from ui.common import describe_dataset, readable_error

    bad = read_upload(Upload("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "only a prompt"}\n'))
    good = read_upload(Upload("good.csv", b"prompt,response,category\nhello,hi there,\nhey,ho,greeting\n"))
    st.write(f"bad={bad is None} good={good[1].name if good else None}")
    try:
        load_any(good[0]).take(10)
    except DataError as error:  # what the Setup page shows when n is too large for the upload
        st.write(f"later: {readable_error(error)}")
    st.write(f"caption: {describe_dataset(good[1])}")


def test_collection_can_be_cancelled(cache):
    config = CollectionConfig(model="tiny-llama", **{**SMALL, "n_safety": 40, "n_utility": 40, "batch_size": 2})
    job_id = jobs.submit(config, "to cancel")
    jobs.cancel(job_id)
    status = jobs.wait(job_id, 120)
    assert status.state == "cancelled"


def test_bad_upload_shows_error(cache):
    at = fresh_app().run()
    at.selectbox(key="widget.safety.set").set_value("upload").run()
    no_exceptions(at)
    assert at.get("file_uploader"), "no file uploader shown"
    assert not at.button  # nothing to collect without a file
    # AppTest cannot drive a file upload: run the page's upload reader on upload-like objects.
    script = AppTest.from_function(upload_script, default_timeout=60).run()
    no_exceptions(script)
    assert len(script.error) == 1 and "line 2" in script.error[0].value
    assert script.error[0].value.count("bad.jsonl") == 1  # the file is named once
    assert "bad=True good=good" in script.markdown[0].value
    later = script.markdown[1].value
    assert "good.csv" in later and "uploads" not in later and str(cache) not in later and "_good" not in later
    assert script.markdown[2].value == "caption: 2 examples · categories: greeting 1 · 1 without a category"
    assert len(list((cache / "uploads").iterdir())) == 1  # the good file is kept for the run's config


def test_pages_without_a_run_point_to_setup(cache):
    at = fresh_app().run()
    for page in ("pages/spectra.py", "pages/conflicts.py", "pages/single_sample.py"):
        at.switch_page(page).run()
        no_exceptions(at)
        assert any("No results yet" in i.value for i in at.info)
    at.switch_page("pages/runs.py").run()
    assert any("No stored runs" in i.value for i in at.info)


def test_spectra_page(collected):
    at = fresh_app()
    at.switch_page("pages/spectra.py").run()
    no_exceptions(at)
    specs = chart_specs(at)
    titles = [s["layout"]["title"]["text"] for s in specs]
    assert any(t.startswith("Singular value spectrum") for t in titles)
    assert any(t.startswith("Cumulative energy ratio") for t in titles)
    assert {"Safety gradient", "Utility gradient"} <= set(titles) and any("ratio" in t for t in titles)
    spectrum = next(s for s in specs if s["layout"]["title"]["text"].startswith("Singular"))
    assert spectrum["layout"]["yaxis"]["type"] == "log"
    assert any("energy lies in" in i.value for i in at.info)
    assert any("tied in" in i.value and "Described (point estimates, no test): counted per module" in i.value for i in at.info)
    at.radio(key="widget.rank_metric").set_value("top1_energy").run()
    no_exceptions(at)
    ratio = next(s for s in chart_specs(at) if s["layout"]["title"]["text"].startswith("Safety / utility ratio"))
    assert ratio["layout"]["title"]["subtitle"]["text"].startswith("above 1: safety puts more of its energy")
    assert any("strictly larger CER(1)" in m.value for m in at.markdown)
    assert not any("fewer directions" in c.value for c in at.caption)
    at.radio(key="widget.rank_metric").set_value("effective_rank").run()
    no_exceptions(at)
    labels = [b.label for b in at.get("download_button")]
    assert {"PNG", "SVG", "PDF", "HTML"} <= set(labels)


def test_conflicts_page(collected):
    at = fresh_app()
    at.switch_page("pages/conflicts.py").run()
    no_exceptions(at)
    specs = chart_specs(at)
    cosine = next(s for s in specs if s["layout"]["title"]["text"].startswith("Cosine of safety"))
    assert cosine["data"][0]["zmid"] == 0
    histogram = next(s for s in specs if s["data"] and s["data"][0]["type"] == "histogram")
    assert "negative" in histogram["layout"]["annotations"][0]["text"]
    assert any("Principal angles" in s["layout"]["title"]["text"] for s in specs)


def test_single_sample_page(collected):
    at = fresh_app()
    at.switch_page("pages/single_sample.py").run()
    no_exceptions(at)
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert any(t.startswith("Does one sample") for t in titles)
    assert any(t.startswith("How many samples") for t in titles)
    assert len(at.dataframe) >= 2  # best and worst samples
    best, worst = at.dataframe[-2].value, at.dataframe[-1].value
    assert len(best) == len(worst) == 2 and not set(best["id"]) & set(worst["id"])  # n = 4: no overlap
    at.selectbox(key=f"widget.sample.{collected.run_id}").set_value(1).run()
    no_exceptions(at)


def test_whole_run_export(collected):
    """What the Runs page's zip and report buttons produce, for a real run."""
    import io
    import zipfile

    from analysis.views import collection as views
    from analysis.views import export

    figures, tables = views.run_figures(collected), views.run_tables(collected)
    assert {"cosine_heatmap", "overlap_heatmap", "k90_ratio"} <= set(figures)
    archive = zipfile.ZipFile(io.BytesIO(export.run_zip(collected.run_id, figures, tables, collected.manifest,
                                                        image_formats=("png",))))
    names = archive.namelist()
    for name in figures:
        assert f"figures/{export.export_filename(collected.run_id, name, 'html')}" in names
    assert f"data/{export.export_filename(collected.run_id, 'modules', 'csv')}" in names
    report = export.report_html(collected.run_id, figures, tables, collected.manifest,
                                summary=views.run_summary(collected), notes=views.run_answers(collected))
    assert report.count("Plotly.newPlot") == len(figures) and collected.run_id in report
    assert "Is safety low-rank?" in report and "<details>" in report


def test_whole_run_export_uses_and_states_the_shown_choices(collected):
    import io
    import zipfile

    from analysis.views import collection as views
    from analysis.views import export

    module = views.module_labels(collected)[-1]
    assert module != views.default_module(collected)
    figures = views.run_figures(collected, 0.8, module)
    assert {f"spectra_{module}", f"cer_{module}", f"pair_cosines_{module}", "k80_ratio"} <= set(figures)
    assert not any(views.default_module(collected) in name for name in figures if name.startswith("spectra"))
    choices = views.export_choices(collected, 0.8, module)
    report = export.report_html(collected.run_id, figures, {}, collected.manifest, choices=choices,
                                notes=views.run_answers(collected, 0.8, module))
    assert "What this export contains" in report and module in report and "k@0.8" in report
    archive = zipfile.ZipFile(io.BytesIO(export.run_zip(collected.run_id, figures, {}, collected.manifest, (),
                                                        choices=choices)))
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["choices"]["η (k@η heatmaps and answers)"] == 0.8 and module in json.dumps(manifest["choices"])


def test_runs_page_export_follows_its_module_and_eta(collected):
    from analysis.views import collection as views

    module = views.module_labels(collected)[-1]
    at = fresh_app()
    at.switch_page("pages/runs.py").run()
    no_exceptions(at)
    at.selectbox(key=f"widget.module.{collected.run_id}").set_value(module).run()
    at.select_slider(key="widget.eta.runs").set_value(0.8).run()
    no_exceptions(at)
    options = at.selectbox(key="widget.runs.figure").options
    assert f"spectra_{module}" in options and "k80_ratio" in options
    assert any("per-module figures" in c.value for c in at.caption)


def test_runs_page_lists_compares_exports_and_deletes(collected, tiny_llama):  # deletes runs: keep it last
    second = collect(CollectionConfig(model="tiny-llama", **{**SMALL, "seed": 1}), model=tiny_llama)
    at = fresh_app()
    at.switch_page("pages/runs.py").run()
    no_exceptions(at)
    assert collected.run_id in at.dataframe[0].value["run_id"].tolist()
    labels = [b.label for b in at.get("download_button")]
    assert {"Whole run (.zip)", "HTML report", "CSV", "JSON", "PNG"} <= set(labels)
    assert chart_specs(at)
    titles = [spec["layout"]["title"]["text"] for spec in chart_specs(at)]
    assert any(t.endswith("by run") for t in titles)  # comparison of the two runs
    compare = next(spec for spec in chart_specs(at) if spec["layout"]["title"]["text"].endswith("by run"))
    assert all("tiny-llama" in trace["name"] and "n = 4+4" in trace["name"] for trace in compare["data"])
    subtitles = [spec["layout"]["title"].get("subtitle", {}).get("text", "") for spec in chart_specs(at)]
    assert f"run {collected.run_id}" in subtitles and f"run {second.run_id}" in subtitles  # side by side
    for _ in range(2):
        at.button(key="delete.confirm").click().run()
        no_exceptions(at)
    assert any("No stored runs" in i.value for i in at.info)


# ------------------------------------------------------------------------------------------------------
# end to end in a real browser
# ------------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]


@contextlib.contextmanager
def chromium():
    """Debian's Chromium driven by Playwright (never ``playwright install``), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """``streamlit run app.py`` on a free localhost port with an empty cache (tiny GPT-2 preselected, so
    nothing needs converting); yields the URL."""
    seed_cache(tmp_path, model="tiny-gpt2", **SMALL)
    port = free_port()
    env = dict(os.environ, SSE_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    pytest.fail(f"streamlit did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.browser
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or shutil.which("chromium") is None,
                    reason="Debian chromium not installed")
def test_end_to_end_in_chromium(server, tmp_path):
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        # a deep link as the server's first request still gets app.py's navigation (not the pages/ folder)
        page.goto(f"{server}/runs", timeout=60_000)
        page.get_by_text("Setup: what do I analyse?").wait_for(timeout=120_000)
        assert page.get_by_text("single sample", exact=True).count() == 0
        page.goto(server, timeout=60_000)
        page.get_by_text("Tiny random Llama").click(timeout=120_000)  # first render can be slow on a busy machine
        page.get_by_text("Linear modules").first.wait_for(timeout=120_000)
        page.get_by_role("button", name="Collect").wait_for(timeout=120_000)
        page.wait_for_function("() => document.body.innerText.includes('llama')", timeout=60_000)
        page.get_by_role("button", name="Collect").click()
        page.get_by_text("First answers").wait_for(timeout=300_000)
        page.get_by_role("link", name="Is safety low-rank?").first.click()
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2", timeout=60_000)
        page.get_by_role("button", name="Export").first.click()
        with page.expect_download(timeout=60_000) as download:
            page.get_by_role("button", name="PNG").first.click()
        path = download.value.path()
        assert download.value.suggested_filename.endswith(".png")
        assert Path(path).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.browser
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or shutil.which("chromium") is None,
                    reason="Debian chromium not installed")
def test_reload_during_a_collection_keeps_it_running(server, tmp_path):
    """The collection runs in its own worker process: reloading the page (a new session) finds it running and
    follows it to the end."""
    seed_cache(tmp_path, model="tiny-llama", **{**SMALL, "n_safety": 24, "n_utility": 24, "batch_size": 2})
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server, timeout=60_000)
        main = page.get_by_test_id("stMainBlockContainer")  # the sidebar lists running jobs too
        page.get_by_role("button", name="Collect").click(timeout=120_000)
        main.get_by_text("Running:").wait_for(timeout=120_000)
        page.reload(timeout=60_000)
        main.get_by_text("Running:").wait_for(timeout=120_000)  # still running after the reload
        page.get_by_role("button", name="Cancel").wait_for(timeout=60_000)
        page.get_by_text("First answers").wait_for(timeout=300_000)
        assert page.get_by_text("finished in").count() >= 1


def test_setup_defaults_are_the_collection_task_defaults(tmp_path, monkeypatch):
    """Declared once: a fresh Setup offers exactly CollectionConfig's defaults (what the CLI collects)."""
    from analysis.core.options import default

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama")
    at = fresh_app().run()
    no_exceptions(at)
    for name in ("n_safety", "n_utility", "max_length", "top_k", "seed", "batch_size", "curve_boot", "n_boot",
                 "n_perm"):
        assert at.number_input(key=f"widget.{name}").value == default(CollectionConfig, name), name
    assert at.text_input(key="widget.curve_layers").value == default(CollectionConfig, "curve_layers")
