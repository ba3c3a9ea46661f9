"""The run lock (an exclusive OS lock held for the writer's lifetime) and manifests of the wrong shape: no model
needed, so these run in a second each."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from analysis.core import store as store_module
from analysis.core.store import RunBusy, RunCorrupted, RunStore, StoreError

RUN = "0123456789abcdef"


def _race(root: str, barrier, results, hold: float) -> None:
    """Child: wait for the partner, try to open the run, hold it a moment; report "won", "busy" or the crash."""
    store = RunStore(root)
    barrier.wait()
    try:
        with store.open_run(RUN, {"config": {}}) as writer:
            (writer.folder / "work" / "mine.txt").write_text(str(os.getpid()))
            time.sleep(hold)
            mine = (writer.folder / "work" / "mine.txt").read_text() == str(os.getpid())
        results.put("won" if mine else "won, but another writer wrote meanwhile")
    except RunBusy:
        results.put("busy")
    except BaseException as error:  # noqa: BLE001 - the test reports it
        results.put(f"crashed: {type(error).__name__}: {error}")


def test_two_writers_racing_for_one_run_never_both_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "LOCK_WAIT_SECONDS", 0.1, raising=False)  # (inherited by the forked writers)
    context = multiprocessing.get_context("fork")
    outcomes = []
    for round_ in range(12):
        root = tmp_path / str(round_)
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_race, args=(str(root), barrier, results, 0.6)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        outcomes.append(sorted(results.get(timeout=5) for _ in workers))
    assert all(outcome == ["busy", "won"] for outcome in outcomes), outcomes


def _hold(root: str, ready, release) -> None:
    with RunStore(root).open_run(RUN, {"config": {}}):
        ready.set()
        release.wait(60)


@pytest.fixture
def holder(tmp_path):
    """A child process holding the run's lock until the test ends (or kills it)."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(str(tmp_path), ready, release))
    process.start()
    assert ready.wait(30)
    yield process
    if process.is_alive():  # (a killed child may have died holding the Event's own lock: do not touch it then)
        release.set()
        process.join(30)


def test_a_held_run_names_its_writer_and_is_free_the_moment_the_writer_dies(tmp_path, holder):
    store = RunStore(tmp_path)
    assert store.status(RUN) == "running"
    with pytest.raises(RunBusy, match=f"already being collected by PID {holder.pid}"):
        store.open_run(RUN, {})
    with pytest.raises(RunBusy, match=str(holder.pid)):
        store.delete(RUN)
    os.kill(holder.pid, signal.SIGKILL)  # no cleanup runs: the OS drops the lock with the process
    holder.join(30)
    assert store.status(RUN) == "interrupted"
    with store.open_run(RUN, {}) as writer:
        assert writer.manifest["resumed"] == 1
    assert store.delete(RUN)


@pytest.fixture
def live_pid():
    """The PID of a live process that has nothing to do with the store (as after PID reuse)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.mark.parametrize("content", ["{pid}", '{{"pid": {pid}, "since": "2026-01-01T00:00:00+00:00"}}'])
def test_a_stale_lock_file_naming_a_live_unrelated_process_blocks_nothing(tmp_path, live_pid, content):
    store = RunStore(tmp_path)
    with store.open_run(RUN, {"config": {}}):
        pass
    (store.path(RUN) / ".lock").write_text(content.format(pid=live_pid))  # left by a writer killed long ago
    assert store.status(RUN) == "interrupted"
    with store.open_run(RUN, {}):
        pass
    assert store.delete(RUN)


def test_opening_a_run_removes_only_dead_writers_temporary_files(tmp_path, live_pid):
    store = RunStore(tmp_path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    work = store.path(RUN) / "work"
    work.mkdir(parents=True)
    live = work / f".batch_00001.safetensors.tmp{live_pid}.140000"
    dead = work / f".batch_00002.safetensors.tmp{dead_pid}.140000"
    live.write_bytes(b"being written")
    dead.write_bytes(b"half")
    with store.open_run(RUN, {"config": {}}):
        assert live.exists() and not dead.exists()


@pytest.mark.parametrize("manifest", [
    [], 5, "text", None,
    {"status": "complete", "files": None},
    {"status": "complete", "files": []},
    {"status": "complete", "files": {"table.json": {"sha256": "0" * 64}}},
    {"status": "complete", "files": {"table.json": None}},
    {"status": "complete", "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}},
    {"status": ["complete"]},
    {"status": "complete", "files": {}, "config": [], "model": "x", "modules": {}},
])
def test_a_manifest_of_the_wrong_shape_is_a_corrupted_run_never_a_crash(tmp_path, manifest):
    store = RunStore(tmp_path)
    folder = store.path(RUN)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert store.status(RUN) == "corrupted"
    runs = store.list_runs()
    assert list(runs["status"]) == ["corrupted"]
    for call in (store.load, store.verify, store.manifest):
        with pytest.raises(RunCorrupted, match="manifest.json"):
            call(RUN)
    assert store.reusable(RUN, {})[0] is None
    with store.open_run(RUN, {"config": {"a": 1}}) as writer:  # recomputed from scratch
        assert writer.manifest["config"] == {"a": 1} and writer.manifest["resumed"] == 0
    assert store.status(RUN) == "interrupted"


def test_a_file_where_a_folder_should_be_is_a_message(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    store = RunStore(tmp_path / "runs")
    assert store.list_runs().empty and store.status(RUN) == "corrupted"
    with pytest.raises(StoreError, match="a file stands where a folder should be"):
        store.open_run(RUN, {})
    other = RunStore(tmp_path / "store")
    other.root.mkdir()
    (other.root / RUN).write_text("not a folder")
    assert other.status(RUN) == "corrupted"
    with pytest.raises(StoreError, match="a file stands where a folder should be"):
        other.open_run(RUN, {})
    with pytest.raises(RunCorrupted, match="is a file"):
        other.delete(RUN)
