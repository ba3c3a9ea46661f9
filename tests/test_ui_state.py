"""Choices that survive reloads, and only the right ones: ui_state.json under concurrent writers, bad content,
models that fail to load, widgets not drawn while another model was picked; runs loaded with checksums."""

import json
import multiprocessing
import threading

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from tests.test_app import APP, SMALL, no_exceptions, seed_cache


def fresh_app() -> AppTest:
    st.cache_data.clear()
    st.cache_resource.clear()
    return AppTest.from_file(APP, default_timeout=120)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **SMALL)
    return tmp_path


def saved(cache) -> dict:
    return json.loads((cache / "ui_state.json").read_text())


def test_switching_to_a_model_that_stops_the_page_and_back_keeps_the_settings(cache):
    at = fresh_app().run()
    no_exceptions(at)
    at.text_input(key="widget.layers.tiny-llama").set_value("1").run()
    at.radio(key="widget.model_kind").set_value("other").run()  # empty id: the page stops above the settings
    assert at.info and not at.number_input
    # what the browser may send back for widgets that were not drawn in the last run: cleared, min-clamped values
    for key, value in (("n_safety", 1), ("n_utility", 1), ("max_length", 16), ("top_k", 1)):
        at.session_state[f"widget.{key}"] = value
    at.session_state["widget.layers.tiny-llama"] = ""
    at.radio(key="widget.model_kind").set_value("tiny-llama").run()
    no_exceptions(at)
    shown = {key: at.number_input(key=f"widget.{key}").value for key in ("n_safety", "n_utility", "max_length", "top_k")}
    assert shown == {key: SMALL[key] for key in shown}
    assert at.text_input(key="widget.layers.tiny-llama").value == "1"
    assert {key: saved(cache)[key] for key in shown} == shown  # nothing clamped was written for new sessions
    assert saved(cache)["layers.tiny-llama"] == "1"  # what the user typed was


def test_a_model_that_failed_to_load_is_not_what_new_sessions_open_on(cache):
    at = fresh_app().run()
    at.radio(key="widget.model_kind").set_value("other").run()
    at.text_input(key="widget.model_other").set_value("nonexistent/model-xyz").run()
    no_exceptions(at)
    assert any("nonexistent/model-xyz" in error.value for error in at.error)
    assert saved(cache)["model"] == "tiny-llama"
    again = fresh_app().run()  # a new session
    no_exceptions(again)
    assert not again.error and again.radio(key="widget.model_kind").value == "tiny-llama"
    assert "tiny-llama" in " ".join(m.value for m in again.sidebar.markdown)


@pytest.mark.parametrize("content", ["[]", "5", '"text"', "null", "{not json"])
def test_a_state_file_that_is_not_an_object_is_ignored(cache, content, monkeypatch):
    from ui import common

    monkeypatch.setitem(common.DEFAULT_CHOICES, "model", "tiny-llama")  # (not the real default model: faster)
    (cache / "ui_state.json").write_text(content)
    at = fresh_app().run()
    no_exceptions(at)
    at.radio(key="widget.model_kind").set_value("tiny-llama").run()
    no_exceptions(at)
    assert saved(cache)["model"] == "tiny-llama"


def _write_choices(prefix: str, count: int) -> None:
    from ui import common

    for index in range(count):
        common.set_choice(f"{prefix}.{index}", index)


def test_concurrent_sessions_and_servers_never_lose_a_key_or_show_half_a_file(cache):
    from ui import common

    count, bad_reads, stop = 25, [], threading.Event()

    def read_all() -> None:
        while not stop.is_set():
            try:
                text = (cache / "ui_state.json").read_text()
                if not isinstance(json.loads(text), dict):
                    bad_reads.append(text)
            except ValueError as error:
                bad_reads.append(str(error))

    reader = threading.Thread(target=read_all)
    reader.start()
    context = multiprocessing.get_context("fork")
    servers = [context.Process(target=_write_choices, args=(f"server{i}", count)) for i in range(2)]
    sessions = [threading.Thread(target=_write_choices, args=(f"session{i}", count)) for i in range(3)]
    for worker in servers + sessions:
        worker.start()
    for worker in servers + sessions:
        worker.join(120)
    stop.set()
    reader.join()
    assert not bad_reads, bad_reads[:3]
    final = common._saved_choices()
    missing = [f"{prefix}.{i}" for prefix in ["server0", "server1", "session0", "session1", "session2"]
               for i in range(count) if f"{prefix}.{i}" not in final]
    assert not missing, missing[:10]
    assert final["model"] == "tiny-llama"
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".ui_state.json.") and not p.name.endswith(".lock")]


def test_the_app_loads_runs_with_their_checksums_verified_once_per_manifest_stamp(cache, tiny_llama, monkeypatch):
    from analysis.core import store as store_module
    from analysis.core.store import RunCorrupted
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig
    from ui import common

    st.cache_resource.clear()
    run = collect(CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", **SMALL),
                  model=tiny_llama)
    hashed = []
    real_sha256 = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    assert common.load_run(run.run_id).run_id == run.run_id
    assert len(hashed) == len(run.manifest["files"])
    common.load_run(run.run_id)
    assert len(hashed) == len(run.manifest["files"])  # once per stamp, not on every rerun
    path = run.folder / "gram.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum sees it
    path.write_bytes(bytes(data))
    manifest = run.folder / "manifest.json"
    manifest.write_text(manifest.read_text())  # a new stamp (as after a rewrite of the run)
    for _ in range(2):
        with pytest.raises(RunCorrupted, match="gram.safetensors"):
            common.load_run(run.run_id)


IMAGE = "![p](http://host/x.png)"


def test_user_text_is_never_rendered_as_markdown(cache, tiny_llama, monkeypatch):
    from analysis.core import jobs
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig
    from ui import jobs as ui_jobs

    rows = [{"id": f"s{i}", "prompt": f"{IMAGE} [click](http://host/{i}) # title {i}", "response": "I won't. :red[no]"}
            for i in range(4)]
    path = cache / "hostile.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = collect(CollectionConfig(model="tiny-llama", safety=str(path), utility_split="analysis", **SMALL),
                  model=tiny_llama)
    seed_cache(cache, model="tiny-llama", run_id=run.run_id, **SMALL)
    at = fresh_app()
    at.switch_page("pages/single_sample.py").run()
    no_exceptions(at)
    texts = [element.value for element in at.markdown]
    shown = [text for text in texts if "Prompt" in text]
    assert shown and "http://host/x.png" in shown[0].replace("\\", "")
    assert not any(IMAGE in text or "](http" in text or ":red[" in text for text in texts), texts
    job = jobs.JobStatus("j", "evaluate", f"Evaluating {IMAGE}", "cpu", "r", jobs.RUNNING, fraction=0.5)
    monkeypatch.setattr(jobs, "list_jobs", lambda **kwargs: [job])
    assert not any("](http" in line for line in ui_jobs.active_summary())


def test_an_upload_without_answers_says_what_to_do_in_the_users_terms(cache):
    from analysis.llm.data import DataError, load_bytes

    with pytest.raises(DataError) as caught:
        load_bytes(b'{"prompt": "How do I bake bread?"}\n', "prompts.jsonl")
    assert "require_response" not in str(caught.value) and "safety evaluation" in str(caught.value)


def test_an_upload_is_written_atomically_and_a_damaged_copy_is_rewritten(cache):
    from ui import common

    data = b'{"prompt": "p", "response": "r"}\n' * 50
    path = common.save_upload(data, "mine.jsonl")
    assert path.read_bytes() == data
    path.write_bytes(data[:17])  # an interrupted write left a short file under the final name
    assert common.save_upload(data, "mine.jsonl") == path and path.read_bytes() == data
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_collection_progress_names_the_model_load_and_the_first_batch_before_it_is_done(cache, tiny_llama):
    from analysis.core.tasks import TaskContext
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig

    messages = []
    collect(CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", **SMALL),
            ctx=TaskContext(progress=lambda event: messages.append(event.message)))
    assert messages[0] == "loading model tiny-llama"
    first_capture = next(i for i, m in enumerate(messages) if m.startswith("captured batch 1/"))
    assert any(m.startswith("capturing batch 1/") and "forward + backward" in m for m in messages[:first_capture])


def test_pages_say_when_samples_were_truncated(cache, tiny_llama):
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig

    run = collect(CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis",
                                   **dict(SMALL, max_length=16)), model=tiny_llama)
    assert run.manifest["n_truncated"] > 0
    seed_cache(cache, model="tiny-llama", run_id=run.run_id, **SMALL)
    at = fresh_app()
    at.switch_page("pages/spectra.py").run()
    no_exceptions(at)
    assert any(f"{run.manifest['n_truncated']} of 8 samples were longer than the sequence length (16 tokens)"
               in caption.value for caption in at.caption)


def test_app_replaces_the_raw_page_list_before_its_heavy_imports():
    """Until a session calls st.navigation, Streamlit shows pages/' file names ("app, conflicts, ...") in the
    sidebar; app.py must call it before importing ui/analysis (seconds on a cold start)."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(APP)).read_text())
    navigation = min(node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                     and getattr(node.func, "attr", "") == "navigation")
    heavy = min(node.lineno for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                and any((alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
                        in ("ui", "analysis", "pandas", "plotly", "torch") for alias in node.names))
    assert navigation < heavy


def test_a_hand_edited_job_id_in_the_state_file_is_ignored_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **SMALL, **{"job.collect": "../../victim"})
    at = fresh_app().run()
    no_exceptions(at)
    assert [b.label for b in at.button] == ["Collect"]


@pytest.mark.parametrize("manifest", ["[]", '{"status": "complete", "files": null}'])
def test_the_runs_page_shows_a_run_with_a_manifest_of_the_wrong_shape_as_corrupted(cache, manifest):
    folder = cache / "runs" / "0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(manifest)
    at = fresh_app()
    at.switch_page("pages/runs.py").run()
    no_exceptions(at)
    assert any("is corrupted" in warning.value for warning in at.warning)
