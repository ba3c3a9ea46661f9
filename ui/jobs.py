"""Background jobs for the app: work runs in a thread that never calls Streamlit.

A :class:`Job` keeps its progress in a lock-guarded status; pages poll :meth:`Job.snapshot` (from an
``st.fragment(run_every=...)``). :data:`REGISTRY` is process-wide (module state survives Streamlit's
script reruns), so a browser reload or a second tab finds a running job. Results land on disk (the run
store); the job only holds what is needed to show progress.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
import traceback
from typing import Any
from collections.abc import Callable

logger = logging.getLogger(__name__)

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


@dataclasses.dataclass
class JobStatus:
    """A consistent copy of a job's state (safe to read without the lock)."""

    key: str
    label: str
    state: str
    fraction: float
    message: str
    started: float
    finished: float | None
    result: Any
    error: str | None
    live: dict

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started


class Job:
    """One piece of background work: ``work(job)`` runs in a daemon thread and returns the result.

    The work reports with :meth:`report` and checks :attr:`cancel_event`; an exception becomes state
    "failed" with its message (the traceback goes to the server log, never to the page).
    """

    def __init__(self, key: str, label: str, work: Callable[[Job], Any],
                 cancelled_errors: tuple[type[BaseException], ...] = ()):
        self.key = key
        self.label = label
        self.cancel_event = threading.Event()
        self._work = work
        self._cancelled_errors = cancelled_errors
        self._lock = threading.Lock()
        self._status = JobStatus(key, label, RUNNING, 0.0, "starting", time.time(), None, None, None, {})
        self._thread = threading.Thread(target=self._run, name=f"job-{key}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            result = self._work(self)
        except self._cancelled_errors as error:
            self._finish(CANCELLED, None, None, str(error) or "cancelled")
        except Exception as error:  # the page shows the message; the log keeps the traceback
            logger.error("job %s failed:\n%s", self.key, traceback.format_exc())
            self._finish(FAILED, None, f"{type(error).__name__}: {error}" if not str(error) else str(error),
                         "failed")
        else:
            self._finish(DONE, result, None, "done")

    def _finish(self, state: str, result: Any, error: str | None, message: str) -> None:
        with self._lock:
            self._status.state = state
            self._status.result = result
            self._status.error = error
            self._status.finished = time.time()
            if state == DONE:
                self._status.fraction = 1.0
            if state != DONE or not self._status.message:
                self._status.message = message

    def report(self, fraction: float, message: str, live: dict | None = None) -> None:
        """Called by the work: progress in [0, 1], a one-line message, optional live data (copied by the
        caller; replaced, not merged)."""
        with self._lock:
            self._status.fraction = min(max(float(fraction), 0.0), 1.0)
            self._status.message = message
            if live is not None:
                self._status.live = live

    def snapshot(self) -> JobStatus:
        with self._lock:
            return copy.copy(self._status)

    def cancel(self) -> None:
        self.cancel_event.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def task_context(job: Job):
    """A ``TaskContext`` for running a task inside ``job``: events go to ``job.report``, ``job.cancel()``
    cancels it."""
    from analysis.core.tasks import CancelToken, TaskContext

    class JobCancel(CancelToken):
        def set(self) -> None:
            job.cancel()

        def is_set(self) -> bool:
            return job.cancel_event.is_set()

    return TaskContext(progress=lambda event: job.report(event.fraction, event.message, event.live),
                       cancel=JobCancel())


class JobRegistry:
    """Process-wide jobs by key. Starting a key that is still running returns the running job."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, key: str, label: str, work: Callable[[Job], Any],
              cancelled_errors: tuple[type[BaseException], ...] = ()) -> Job:
        with self._lock:
            existing = self._jobs.get(key)
            if existing is not None and existing.snapshot().running:
                return existing
            job = Job(key, label, work, cancelled_errors)
            self._jobs[key] = job
        return job.start()

    def get(self, key: str) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def running(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [job for job in jobs if job.snapshot().running]

    def latest(self) -> Job | None:
        """The most recently started job, running or not."""
        with self._lock:
            jobs = list(self._jobs.values())
        return max(jobs, key=lambda job: job.snapshot().started, default=None)

    def forget(self, key: str) -> None:
        """Drop a finished job (a running one is kept)."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not job.snapshot().running:
                del self._jobs[key]

    def clear(self) -> None:
        """Cancel and drop every job (tests)."""
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for job in jobs:
            job.cancel()
            job.join(30)


REGISTRY = JobRegistry()
