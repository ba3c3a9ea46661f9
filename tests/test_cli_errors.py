"""Bad input on the command line and in the cache: a message naming the fix and exit 2, never a traceback;
settings bounded; ids that would leave the cache refused; model identity memos under the cache."""

import json
import multiprocessing
import os

import pytest

from analysis.__main__ import main
from analysis.core import jobs
from analysis.core.config import InputError
from analysis.core.store import RunStore

TINY = ["--model", "tiny-llama", "--n-safety", "2", "--n-utility", "2", "--max-length", "32", "--top-k", "2", "--curve-boot", "2",
        "--layers", "0", "--modules", "q", "--threads", "1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse refusing a value
        code = stop.code
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    return code, text


@pytest.mark.parametrize("flag, value, says", [
    ("--threads", "-1", "at least 1"), ("--top-k", "1000000000", "from 1 to 4096"),
    ("--curve-boot", "100000000", "from 1 to 10000"), ("--n-safety", "0", "from 1"), ("--chunk-mb", "-5", "from 1"),
    ("--workers", "0", "from 1 to 256"), ("--max-length", "8", "from 16"), ("--top-k", "two", "invalid int value"),
])
def test_settings_out_of_range_are_refused_with_the_range(cache, capsys, flag, value, says):
    code, text = run_cli(["collect", *TINY, flag, value], capsys)
    assert code == 2 and says in text and flag.lstrip("-").split("-")[0] in text


def test_config_bounds_hold_outside_the_cli_too():
    from analysis.core.config import ConfigError
    from analysis.engine.collect_task import CollectionConfig

    with pytest.raises(ConfigError, match="top_k must be an integer from 1 to 4096"):
        CollectionConfig(model="tiny-llama", top_k=10**9)
    with pytest.raises(ConfigError, match="curve_boot"):
        CollectionConfig(model="tiny-llama", curve_boot=10**8)


@pytest.mark.parametrize("content", ["[]", "5", "null", '{"kind": "collect", "config": []}', '{"top_k": "x"}'])
def test_a_config_file_that_is_not_an_object_of_settings_is_a_message(cache, tmp_path, capsys, content):
    path = tmp_path / "task.json"
    path.write_text(content)
    code, text = run_cli(["collect", "--config", str(path)], capsys)
    assert code == 2 and "error:" in text and (str(path) in text or "top_k" in text)


def test_an_unknown_model_is_a_message_at_once(cache, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, text = run_cli(["collect", "--model", "nosuch/x", "--threads", "1"], capsys)
    assert code == 2 and "Could not" in text and "nosuch/x" in text


def test_a_folder_with_a_garbage_config_is_a_message(cache, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{garbage")
    code, text = run_cli(["collect", "--model", str(folder), "--threads", "1"], capsys)
    assert code == 2 and "config.json" in text


def test_a_truncated_checkpoint_is_a_message(cache, tmp_path, capsys, tiny_llama):
    folder = tmp_path / "model"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, text = run_cli(["evaluate", "--model", str(folder), "--n-harmful", "1", "--n-benign", "1",
                          "--threads", "1"], capsys)
    assert code == 2 and "Could not load model" in text


def test_a_dataset_path_to_an_endless_device_is_refused_with_the_limit(cache, capsys):
    from analysis.llm.data import DataError, load_any

    with pytest.raises(DataError, match="MiB"):
        load_any("/dev/zero")
    code, text = run_cli(["collect", *TINY, "--safety", "/dev/zero"], capsys)
    assert code == 2 and "/dev/zero" in text and "MiB" in text


@pytest.mark.parametrize("where", ["runs", "jobs", "run"])
def test_a_file_where_a_cache_folder_should_be_is_a_message(cache, capsys, where):
    from analysis.engine.collect_task import CollectionConfig

    cache.mkdir(parents=True)
    if where == "run":
        run_id = CollectionConfig(model="tiny-llama", n_safety=2, n_utility=2, max_length=32, top_k=2, curve_boot=2,
                                  layers="0", kinds="q").run_id()
        (cache / "runs").mkdir()
        (cache / "runs" / run_id).write_text("a file")
        code, text = run_cli(["collect", *TINY], capsys)
        assert code == 2 and "is a file" in text
    elif where == "runs":
        (cache / "runs").write_text("a file")
        code, text = run_cli(["collect", *TINY], capsys)
        assert code == 2 and "a file stands where a folder should be" in text
    else:
        (cache / "jobs").write_text("a file")
        jobs.cancel("20260101-000000-000000-collect-abc")  # (no such job: nothing to do, no crash)
        assert jobs.list_jobs() == []
        with pytest.raises(InputError, match="a file stands where a folder should be"):
            jobs._queue_lock()


def _hold(root, run_id, ready, release):
    with RunStore(root).open_run(run_id, {"config": {}}):
        ready.set()
        release.wait(120)


def test_a_second_collection_of_one_config_names_the_first_ones_pid(cache, capsys):
    from analysis.engine.collect_task import CollectionConfig

    run_id = CollectionConfig(model="tiny-llama", n_safety=2, n_utility=2, max_length=32, top_k=2, curve_boot=2,
                              layers="0", kinds="q").run_id()
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    first = context.Process(target=_hold, args=(str(cache / "runs"), run_id, ready, release))
    first.start()
    try:
        assert ready.wait(60)
        code, text = run_cli(["collect", *TINY], capsys)
    finally:
        release.set()
        first.join(60)
    assert code == 2 and f"already being collected by PID {first.pid}" in text


@pytest.mark.parametrize("job_id", ["../../victim", "..", ".hidden", "a/b", "", "x\0y"])
def test_job_ids_that_would_leave_the_jobs_folder_are_refused(cache, tmp_path, job_id):
    with pytest.raises(jobs.InvalidJobId):
        jobs.cancel(job_id)
    with pytest.raises(jobs.InvalidJobId):
        jobs.read(job_id)
    assert not (tmp_path / "victim").exists() and not (cache.parent / "victim").exists()


def test_why_refuses_a_run_id_outside_the_store(cache, tmp_path, capsys):
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "manifest.json").write_text(json.dumps({"status": "complete"}))
    code, text = run_cli(["why", "--run", "../../x", "--threads", "1"], capsys)
    assert code == 2 and "not a fine-tuning run id" in text


def test_model_identity_memos_live_under_the_cache_not_in_the_model_folder(cache, tmp_path):
    from analysis.llm.models import checkpoint_identity, identity_memo

    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    weights.write_bytes(b"weights " * 100)
    identity = checkpoint_identity(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]
    memo = identity_memo(folder)
    assert memo.is_relative_to(cache) and json.loads(memo.read_text())["identity"] == identity
    stat = weights.stat()
    weights.write_bytes(b"WEIGHTS " * 100)  # same size; same mtime restored: the memo answers
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert checkpoint_identity(folder) == identity
