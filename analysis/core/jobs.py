"""Jobs: a task run in its own worker process, queued per device, with its state in files.

``submit(task)`` writes ``<cache>/jobs/<job_id>/`` (``task.json``: kind and config; ``status.json``) and starts
``python -m analysis <kind> --config task.json --job <folder>`` — the same command a user types — as a
detached process that owns its own model. The worker waits for its turn (first come, first served, ``slots``
running jobs per device) before it imports the task's module (:func:`wait_for_turn`, called by
``analysis.__main__``): a queued job is a small Python process without torch, numpy or a model (measured in
``tests/test_jobs.py``). Then it runs the task and writes progress to ``status.json`` and live chart data to
``live.json``; its output goes to ``log.txt``. Submitting checks for an identical active job and creates the new
one under the queue lock, so concurrent submits of one config make one job. Nothing lives in the submitting process: a browser reload, a
second tab or a restarted web server reads the same files. A worker that dies (killed, out of memory) is seen
by its process being gone while its state is still queued/running; it is then marked failed with its last
log lines. ``cancel(job_id)`` creates the flag file ``cancel`` that the task checks between steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from analysis.core.config import PROJECT_ROOT, InputError, cache_dir, to_jsonable
from analysis.core.store import ID_RULE, atomic_write_json, json_default, process_alive, valid_id
from analysis.core.tasks import Cancelled, CancelToken, Event, Task, TaskContext, Throttle

__all__ = ["ACTIVE", "InvalidJobId", "JobStatus", "Worker", "cancel", "jobs_dir", "list_jobs", "live", "log_tail",
           "prune", "read", "submit", "wait", "wait_for_turn"]

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
TASK_FILE, STATUS_FILE, LIVE_FILE, LOG_FILE, CANCEL_FILE = "task.json", "status.json", "live.json", "log.txt", "cancel"
QUEUE_LOCK = "queue.lock"
POLL_SECONDS = 0.5
WRITE_EVERY_SECONDS = 0.5
LOG_TAIL_LINES = 12
KEEP_ENDED = 100  # ended jobs kept on disk (their outcome and log); older ones are removed on submit


def jobs_dir() -> Path:
    """Where job folders live: ``<cache>/jobs``."""
    return cache_dir() / "jobs"


_LOCKS: dict[str, FileLock] = {}


def _make_jobs_dir() -> Path:
    """``jobs_dir()``, made if needed; InputError when a file stands where it (or a folder above) should be."""
    try:
        jobs_dir().mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"cannot make the jobs folder {jobs_dir()}: a file stands where a folder should be (there "
                         "or above it); move that file away") from None
    return jobs_dir()


def _queue_lock() -> FileLock:
    """The one lock object per jobs folder in this process (re-entrant), guarding state changes."""
    path = str(jobs_dir() / QUEUE_LOCK)
    if path not in _LOCKS:
        _make_jobs_dir()
        _LOCKS[path] = FileLock(path)
    return _LOCKS[path]


@dataclasses.dataclass
class JobStatus:
    """A job as read from its files. ``position``: 1 = next to run on its device (queued jobs only)."""

    job_id: str
    kind: str
    label: str
    device: str
    run_id: str
    state: str
    fraction: float = 0.0
    message: str = ""
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    result: Any = None
    error: str | None = None
    pid: int | None = None
    position: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def seconds(self) -> float:
        """Seconds running (or queued, before it started)."""
        start = self.started or self.submitted
        return (self.finished or time.time()) - start


class InvalidJobId(InputError, ValueError):
    """A job id that cannot name a job folder (it would leave ``<cache>/jobs``)."""


def _folder(job_id: str) -> Path:
    if not valid_id(job_id):
        raise InvalidJobId(f"invalid job id {job_id!r}: {ID_RULE}")
    return jobs_dir() / job_id


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the worker's output."""
    try:
        text = (_folder(job_id) / LOG_FILE).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _status_from(folder: Path, raw: Mapping[str, Any], task: Mapping[str, Any]) -> JobStatus:
    fields = {f.name for f in dataclasses.fields(JobStatus)}
    values = {**{k: task.get(k) for k in ("kind", "label", "device", "run_id", "submitted")},
              **{k: v for k, v in raw.items() if k in fields}}
    return JobStatus(job_id=folder.name, **{k: v for k, v in values.items() if k != "job_id"})


def _write_status(folder: Path, status: JobStatus) -> None:
    raw = dataclasses.asdict(status)
    for key in ("job_id", "kind", "label", "device", "run_id", "submitted", "position"):
        raw.pop(key)
    atomic_write_json(folder / STATUS_FILE, raw)


def _mark_dead(folder: Path, status: JobStatus) -> JobStatus:
    """A queued/running job whose worker is gone: failed, with the last log lines."""
    tail = log_tail(folder.name)
    status.state, status.finished = FAILED, time.time()
    status.error = ("the worker process ended without a result (killed, or out of memory?)"
                    + (f"; its last output:\n{tail}" if tail else "; it wrote no output"))
    status.message = "failed"
    with _queue_lock():
        current = _read_json(folder / STATUS_FILE) or {}
        if current.get("state") in ACTIVE:  # not finished meanwhile
            _write_status(folder, status)
    return status


def read(job_id: str) -> JobStatus | None:
    """The job's status (None if there is no such job), with its queue position if queued; a dead worker's job
    is marked failed here."""
    status = _read(job_id)
    if status is not None and status.state == QUEUED:
        status.position = next((s.position for s in list_jobs() if s.job_id == job_id), None)
    return status


def _read(job_id: str) -> JobStatus | None:
    folder = _folder(job_id)
    task, raw = _read_json(folder / TASK_FILE), _read_json(folder / STATUS_FILE)
    if task is None or raw is None:
        return None
    status = _status_from(folder, raw, task)
    if status.active and not process_alive(status.pid, str(folder)):
        time.sleep(0.05)  # the worker may have just written its final state
        raw = _read_json(folder / STATUS_FILE) or raw
        status = _status_from(folder, raw, task)
        if status.active and not process_alive(status.pid, str(folder)):
            status = _mark_dead(folder, status)
    return status


def list_jobs(kind: str | None = None, active_only: bool = False) -> list[JobStatus]:
    """Jobs, oldest first, with queue positions per device; ``kind``/``active_only`` filter."""
    root = jobs_dir()
    statuses = ([_read(folder.name) for folder in sorted(root.iterdir()) if folder.is_dir() and valid_id(folder.name)]
                if root.is_dir() else [])
    statuses = sorted((s for s in statuses if s is not None), key=lambda s: (s.submitted, s.job_id))
    waiting: dict[str, int] = {}
    for status in statuses:
        if status.state == QUEUED:
            waiting[status.device] = waiting.get(status.device, 0) + 1
            status.position = waiting[status.device]
    return [s for s in statuses if (kind is None or s.kind == kind) and (not active_only or s.active)]


def live(job_id: str) -> dict | None:
    """The latest live chart data the task reported (None before the first)."""
    return _read_json(_folder(job_id) / LIVE_FILE)


def cancel(job_id: str) -> None:
    """Ask the job to stop (a queued job leaves the queue, a running one stops after its current step)."""
    folder = _folder(job_id)
    if folder.is_dir():
        (folder / CANCEL_FILE).touch()


def prune(keep: int = KEEP_ENDED) -> int:
    """Remove all but the newest ``keep`` ended jobs' folders (results live in the run store, not here);
    returns how many were removed. Queued and running jobs are never touched."""
    import shutil

    ended = [s for s in list_jobs() if not s.active]
    for status in ended[:max(len(ended) - keep, 0)]:
        shutil.rmtree(_folder(status.job_id), ignore_errors=True)
    return max(len(ended) - keep, 0)


def _reap(process: subprocess.Popen) -> None:
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()


def submit(task: Task, label: str = "", device: str = "cpu", threads: int | None = None,
           python: str | None = None) -> str:
    """Queue ``task`` and start its worker process; returns the job id.

    An active job of the same kind and run id is returned instead of starting a second one (checked and
    created under the queue lock, so concurrent submits of one config from several threads, processes or
    browser tabs make one job)."""
    run_id = task.run_id()
    prune()
    root = _make_jobs_dir()
    with _queue_lock():
        for status in list_jobs(kind=task.kind, active_only=True):
            if status.run_id == run_id:
                return status.job_id
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**6:06d}-{task.kind}-{run_id[:8]}"
        folder = root / job_id
        folder.mkdir()
        atomic_write_json(folder / TASK_FILE, {"kind": task.kind, "config": to_jsonable(task),
                                               "label": label or task.kind, "device": device, "threads": threads,
                                               "run_id": run_id, "submitted": time.time()})
        command = [python or sys.executable, "-m", "analysis", task.kind, "--config", str(folder / TASK_FILE),
                   "--job", str(folder)]
        with open(folder / LOG_FILE, "ab") as log:
            process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "SSE_CACHE_DIR": str(cache_dir()), "PYTHONUNBUFFERED": "1"})
        # the worker writes its own status once it holds the lock (after this block): queued, with its pid
        _write_status(folder, JobStatus(job_id, task.kind, label, device, run_id, QUEUED, message="queued",
                                        pid=process.pid))
    _reap(process)
    return job_id


def wait(job_id: str, timeout: float = 600.0, poll: float = 0.2) -> JobStatus:
    """Block until the job has ended (tests, scripts); raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        status = read(job_id)
        if status is not None and not status.active:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.state if status else 'missing'} after {timeout:.0f} s")
        time.sleep(poll)


# -------------------------------------------------------------------------------------------------
# the worker side (inside ``python -m analysis <kind> --job <folder>``)
# -------------------------------------------------------------------------------------------------


class Worker:
    """Runs one task of a job folder: waits for its turn, reports to the folder, records how it ended."""

    def __init__(self, folder: str | Path, slots: int = 1):
        self.folder = Path(folder).resolve()
        self.job_id = self.folder.name
        self.slots = slots
        spec = _read_json(self.folder / TASK_FILE)
        if spec is None:
            raise FileNotFoundError(f"{self.folder} holds no readable {TASK_FILE}")
        self.spec = spec
        self.status = _status_from(self.folder, _read_json(self.folder / STATUS_FILE) or {"state": QUEUED}, spec)
        self.status.pid = os.getpid()
        self.cancel_token = CancelToken(self.folder / CANCEL_FILE)
        self._throttle = Throttle(WRITE_EVERY_SECONDS)
        self._lock = _queue_lock()

    def _save(self) -> None:
        _write_status(self.folder, self.status)

    def _my_turn(self) -> bool:
        """Under the queue lock: no more than ``slots`` running on this device and no older queued job."""
        ahead = 0
        for other in list_jobs():
            if other.job_id == self.job_id:
                return ahead < self.slots
            if other.device == self.status.device and other.active:
                ahead += 1
        return False

    def wait_turn(self, poll: float = POLL_SECONDS) -> bool:
        """Wait until this job may run (True) or it was cancelled while queued (False). True at once for a job
        this process already started (``wait_for_turn`` waited before the task's module was imported)."""
        if self.status.state == RUNNING and self.status.pid == os.getpid():
            return True
        self._save()  # our own pid, so that the queue sees a live process
        while True:
            if self.cancel_token.is_set():
                return False
            with self._lock:
                if self._my_turn():
                    self.status.state, self.status.started, self.status.message = RUNNING, time.time(), "starting"
                    self._save()
                    return True
            time.sleep(poll)

    def on_event(self, event: Event) -> None:
        """Progress from the task: status (throttled), live data, and each new message as a line of the log."""
        if event.message != self.status.message:
            print(f"{time.strftime('%H:%M:%S')} {event.fraction:4.0%} {event.message}", flush=True)
        self.status.fraction, self.status.message = event.fraction, event.message
        if event.live is not None:
            atomic_write_json(self.folder / LIVE_FILE, dict(event.live))
        if self._throttle(force=event.live is not None or event.fraction >= 1.0):
            self._save()

    def context(self, **overrides: Any) -> TaskContext:
        return TaskContext(device=self.spec.get("device") or "cpu", threads=self.spec.get("threads"),
                           progress=self.on_event, cancel=self.cancel_token, **overrides)

    def _end(self, state: str, message: str, result: Any = None, error: str | None = None) -> None:
        with self._lock:
            self.status.state, self.status.message, self.status.finished = state, message, time.time()
            self.status.result, self.status.error = result, error
            if state == DONE:
                self.status.fraction = 1.0
            self._save()

    def cancelled_while_queued(self) -> int:
        self._end(CANCELLED, "cancelled while queued")
        return 0

    def run(self, work: Callable[[TaskContext], Any]) -> int:
        """Wait for the turn, run ``work(ctx)``, record the outcome; returns the process exit code."""
        if not self.wait_turn():
            return self.cancelled_while_queued()
        context = self.context()
        try:
            with context.applied():
                result = work(context)
        except Cancelled as error:
            self._end(CANCELLED, str(error) or "cancelled", result={"run_id": error.run_id} if error.run_id else None)
            return 0
        except BaseException as error:  # noqa: BLE001 - every failure is recorded, then re-raised for the log
            self._end(FAILED, "failed", error=str(error) or type(error).__name__)
            raise
        self._end(DONE, "done", result=json.loads(json.dumps(result, default=json_default)))
        return 0


def wait_for_turn(folder: str | Path) -> bool:
    """The first thing a job's worker does (``analysis.__main__``, before the task's module and torch are
    imported): wait for the job's turn. False when it was cancelled while queued (recorded here)."""
    worker = Worker(folder)
    if worker.wait_turn():
        return True
    worker.cancelled_while_queued()
    return False
