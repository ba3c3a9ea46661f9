"""The task runtime: jobs in their own worker processes, queued per device, state in files (tiny model)."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.core import jobs
from analysis.core.config import from_jsonable, to_jsonable
from analysis.engine.collect_task import CollectionConfig
from analysis.engine.results import CollectionStore
from tests.conftest import stop_all_jobs

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"n_safety": 4, "n_utility": 4, "max_length": 64, "top_k": 2, "batch_size": 4, "curve_boot": 2}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    yield tmp_path
    stop_all_jobs()


def arrays(run) -> dict[str, np.ndarray]:
    """Every stored array of a collection run, by file and key."""
    from safetensors.numpy import load_file

    folder = CollectionStore().path(run)
    return {f"{path.name}/{key}": value for path in sorted(folder.glob("*.safetensors"))
            for key, value in load_file(path).items()}


def assert_same_arrays(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_analysis_never_imports_streamlit():
    offenders = []
    for path in (ROOT / "analysis").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "streamlit"]
    assert not offenders
    # and importing every module of the package pulls in no streamlit either
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "analysis").rglob("*.py")
               if p.name != "__main__.py"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_task_round_trips_through_its_json():
    config = CollectionConfig(model="tiny-llama", layers="0", **SMALL)
    again = from_jsonable(CollectionConfig, json.loads(json.dumps(to_jsonable(config))))
    assert again == config and again.run_id() == config.run_id()


def test_prune_keeps_the_newest_ended_jobs_and_every_active_one(cache):
    from analysis.core.store import atomic_write_json

    waiting = None
    for index, state in enumerate(["done", "failed", "queued", "cancelled", "done"]):
        folder = jobs.jobs_dir() / f"job-{index}"
        folder.mkdir(parents=True)
        atomic_write_json(folder / jobs.TASK_FILE, {"kind": "collect", "config": {}, "label": str(index),
                                                    "device": "cpu", "run_id": str(index), "submitted": index})
        if state == "queued":  # a live process that names its folder, as a worker's command line does
            waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(folder)])
        atomic_write_json(folder / jobs.STATUS_FILE, {"state": state, "pid": waiting.pid if state == "queued" else None})
    try:
        assert jobs.prune(keep=2) == 2
        assert [s.job_id for s in jobs.list_jobs()] == ["job-2", "job-3", "job-4"]
    finally:
        waiting.kill()
        waiting.wait()


def test_queued_job_shows_its_place_and_can_leave_the_queue(cache):
    first = jobs.submit(CollectionConfig(model="tiny-llama", **{**SMALL, "n_safety": 24, "n_utility": 24,
                                                                 "batch_size": 2}), label="first")
    second = jobs.submit(CollectionConfig(model="tiny-llama", **SMALL), label="second")
    assert jobs.submit(CollectionConfig(model="tiny-llama", **SMALL), label="again") == second  # no duplicate
    deadline = time.monotonic() + 120
    while jobs.read(first).state != "running":
        assert time.monotonic() < deadline, jobs.log_tail(first)
        time.sleep(0.2)
    waiting = jobs.read(second)
    assert waiting.state == "queued" and waiting.position == 1
    jobs.cancel(second)
    assert jobs.wait(second, 60).state == "cancelled"
    jobs.cancel(first)
    ended = jobs.wait(first, 120)
    assert ended.state == "cancelled" and ended.result["run_id"] == CollectionConfig(
        model="tiny-llama", **{**SMALL, "n_safety": 24, "n_utility": 24, "batch_size": 2}).run_id()


def test_collection_and_evaluation_at_once_give_what_each_gives_alone(cache, tmp_path_factory):
    from analysis.safety.evaluate import EvalConfig

    collection = CollectionConfig(model="tiny-llama", **SMALL)
    evaluation = EvalConfig(model="tiny-llama", n_harmful=4, n_benign=4, n_utility=4, max_new_tokens=8)
    both = [jobs.submit(collection, "collect"), jobs.submit(evaluation, "evaluate")]
    ended = [jobs.wait(job_id, 300) for job_id in both]
    assert [s.state for s in ended] == ["done", "done"], [jobs.log_tail(j) for j in both]
    together_arrays = arrays(collection.run_id())
    together_summary = ended[1].result
    # each alone, in this process, in another cache
    os.environ["SSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("alone"))
    from analysis.core.tasks import TaskContext

    collection.execute(TaskContext())
    alone_summary = evaluation.execute(TaskContext())
    assert_same_arrays(together_arrays, arrays(collection.run_id()))
    def numbers(summary):  # where it ran and how long it took are not results
        return {k: v for k, v in summary.items() if k not in ("folder", "seconds", "created")}

    assert numbers(alone_summary) == numbers(together_summary)


def test_killed_worker_shows_failed_and_resubmission_resumes_identically(cache, tmp_path_factory):
    config = CollectionConfig(model="tiny-llama", **{**SMALL, "n_safety": 16, "n_utility": 16, "batch_size": 2})
    job_id = jobs.submit(config, "to be killed")
    deadline = time.monotonic() + 180
    while (jobs.read(job_id).fraction or 0) < 0.15:
        assert jobs.read(job_id).active and time.monotonic() < deadline, jobs.log_tail(job_id)
        time.sleep(0.1)
    os.kill(jobs.read(job_id).pid, signal.SIGKILL)
    time.sleep(0.5)
    dead = jobs.read(job_id)
    assert dead.state == "failed" and "ended without a result" in dead.error
    assert CollectionStore().status(config.run_id()) == "interrupted"
    again = jobs.wait(jobs.submit(config, "resubmitted"), 300)
    assert again.state == "done", jobs.log_tail(again.job_id)
    assert "read from checkpoint" in jobs.log_tail(again.job_id, 200)  # resumed, not recomputed
    resumed = arrays(config.run_id())
    os.environ["SSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("uninterrupted"))
    from analysis.core.tasks import TaskContext

    config.execute(TaskContext())
    assert_same_arrays(resumed, arrays(config.run_id()))


def test_cli_and_app_give_the_same_run(cache, tmp_path_factory):
    config = CollectionConfig(model="tiny-llama", layers="0", **SMALL)
    submitted = jobs.wait(jobs.submit(config, "app"), 300)
    assert submitted.state == "done", jobs.log_tail(submitted.job_id)
    from_app = arrays(config.run_id())
    other = tmp_path_factory.mktemp("cli")
    command = [sys.executable, "-m", "analysis", "collect", "--model", "tiny-llama", "--layers", "0",
               "--n-safety", "4", "--n-utility", "4", "--max-length", "64", "--top-k", "2", "--batch-size", "4",
               "--curve-boot", "2"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SSE_CACHE_DIR": str(other)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert submitted.result["run_id"] == config.run_id() and config.run_id() in out.stdout
    os.environ["SSE_CACHE_DIR"] = str(other)
    assert_same_arrays(from_app, arrays(config.run_id()))


@pytest.mark.parametrize(("argv", "message"), [
    (["why"], "give --run RUN"),
    (["safe-lora"], "give --finetuned SOURCE"),
    (["defences", "--tiers", "harmful-11"], "unknown tier(s) harmful-11"),
    (["finetune", "--config", "missing.json"], "cannot read the task file missing.json"),
    (["align", "--config", "task.json"], "holds a 'defences' task, not 'align'"),
    (["evaluate", "--model", "no/such-model"], "no/such-model"),
])
def test_task_commands_print_bad_input_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    """Every task command turns an InputError (config, data, model loading) into ``error: ...`` and exit 2."""
    from analysis.__main__ import main

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"kind": "defences", "config": {}}))
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and message in out, out


def _occupy_the_cpu_slot() -> subprocess.Popen:
    """A fake running job on the CPU (a live process naming its folder), so that submitted jobs stay queued."""
    from analysis.core.store import atomic_write_json

    folder = jobs.jobs_dir() / "00000000-occupied"
    folder.mkdir(parents=True)
    atomic_write_json(folder / jobs.TASK_FILE, {"kind": "collect", "config": {}, "label": "occupied", "device": "cpu",
                                                "run_id": "occupied", "submitted": 0})
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", str(folder)])
    atomic_write_json(folder / jobs.STATUS_FILE, {"state": "running", "pid": holder.pid, "started": 1})
    return holder


def test_twenty_queued_jobs_hold_no_model_and_little_memory(cache):
    """A queued job's worker waits before importing torch or its task: 20 of them hold < 1 GiB together."""
    import psutil

    holder = _occupy_the_cpu_slot()
    try:
        submitted = [jobs.submit(CollectionConfig(model="tiny-llama", seed=seed, **SMALL), label=str(seed))
                     for seed in range(20)]
        assert len(set(submitted)) == 20
        deadline = time.monotonic() + 120
        while True:  # every worker has started and written its own queued status
            statuses = [jobs.read(job_id) for job_id in submitted]
            processes = [psutil.Process(s.pid) for s in statuses]
            if all(s.state == "queued" for s in statuses) and all(
                    p.memory_info().rss > 8 * 2**20 for p in processes):
                time.sleep(2)  # let the last ones finish their imports
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        rss = [p.memory_info().rss for p in processes]
        assert all(s.state == "queued" for s in (jobs.read(j) for j in submitted))
        assert sum(rss) < 2**30, f"20 queued jobs hold {sum(rss) / 2**20:.0f} MiB"
        modules = set()
        for process in processes:  # no torch mapped into any of them
            modules |= {m.path for m in process.memory_maps() if "torch" in m.path}
        assert not modules
        print(f"20 queued jobs: {sum(rss) / 2**20:.0f} MiB in total, {max(rss) / 2**20:.0f} MiB at most")
    finally:
        for job_id in jobs.list_jobs(active_only=True):
            jobs.cancel(job_id.job_id)
        holder.kill()
        holder.wait()


def _submit_in_a_process(cache_folder: str, results) -> None:
    os.environ["SSE_CACHE_DIR"] = cache_folder
    results.put(jobs.submit(CollectionConfig(model="tiny-llama", **SMALL), label="same"))


def test_concurrent_submits_of_one_config_make_one_job(cache):
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    holder = _occupy_the_cpu_slot()
    try:
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        processes = [context.Process(target=_submit_in_a_process, args=(str(cache), results)) for _ in range(4)]
        for process in processes:
            process.start()
        with ThreadPoolExecutor(4) as pool:  # and four threads of this process at the same time
            from_threads = list(pool.map(lambda _: jobs.submit(CollectionConfig(model="tiny-llama", **SMALL)),
                                         range(4)))
        for process in processes:
            process.join(120)
        from_processes = [results.get(timeout=10) for _ in processes]
        assert len(set(from_threads + from_processes)) == 1
        assert len([s for s in jobs.list_jobs(kind="collect") if s.label != "occupied"]) == 1
    finally:
        for status in jobs.list_jobs(active_only=True):
            jobs.cancel(status.job_id)
        holder.kill()
        holder.wait()
