"""Jobs in the app: submit a task to its own worker process and show its state, read from the job's files.

The web server holds no job: ``analysis.core.jobs`` keeps each job's state on disk, so a reload, a second tab or
a restarted server shows the same queue, progress and outcome. A task page calls :func:`job_panel` once: it
finds the task's job, follows it while queued or running (queue place, progress, live view, cancel), shows how
it ended, says whether the result is stored, and otherwise offers to start it with the cost measured on this
machine (:func:`measured_cost`). The pieces (:func:`submit`, :func:`current`, :func:`follow`,
:func:`show_outcome`) are there for the sidebar and for pages with several jobs at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import streamlit as st

from analysis.core import jobs
from analysis.core.jobs import JobStatus
from analysis.core.store import valid_id
from analysis.core.tasks import Task
from ui.common import choice, plain, set_choice

POLL_SECONDS = 1.0
ORDINALS = {1: "next", 2: "2nd", 3: "3rd"}


def submit(task: Task, label: str) -> str:
    """Queue ``task`` (its worker process starts at once and waits for its turn); returns the job id."""
    job_id = jobs.submit(task, label=label, device=choice("device", "cpu"))
    set_choice(f"job.{task.kind}", job_id)
    return job_id


def current(kind: str, run_id: str | None = None) -> JobStatus | None:
    """The job of ``kind`` to show: an active one (for ``run_id``, if given), else the last one submitted from
    this app (any run id unless ``run_id`` is given), else None."""
    active = [s for s in jobs.list_jobs(kind=kind, active_only=True) if run_id is None or s.run_id == run_id]
    if active:
        return active[-1]
    remembered = choice(f"job.{kind}")
    status = jobs.read(remembered) if remembered and valid_id(remembered) else None  # (a hand-edited state file)
    if status is None or (run_id is not None and status.run_id != run_id):
        return None
    return status


def queue_text(status: JobStatus) -> str:
    """"Queued: next in line on cpu, after …" for a queued job; "" otherwise."""
    if status.state != jobs.QUEUED:
        return ""
    ahead = [s for s in jobs.list_jobs(active_only=True)
             if s.device == status.device and s.submitted <= status.submitted and s.job_id != status.job_id]
    if not ahead:
        return f"Starting its worker process on {status.device} (loading libraries, a few seconds)…"
    after = ", ".join(f"{plain(s.label)} ({s.state})" for s in ahead)
    place = ORDINALS.get(status.position or 1, f"{status.position}th")
    return f"Queued: {place} in line on {status.device}, after: {after}."


def progress_text(status: JobStatus) -> str:
    return f"{status.fraction:.0%} · {status.label}: {status.message} · {status.seconds:.0f} s"


def follow(status: JobStatus, live_view: Callable[[dict[str, Any]], None] | None = None,
           cancel_label: str = "Cancel") -> None:
    """While the job is queued or running: its state and label, queue place or progress, a cancel button and
    ``live_view(live)``
    (the job's latest live data), polled every POLL_SECONDS; reruns the page once the job has ended."""
    job_id = status.job_id

    @st.fragment(run_every=POLL_SECONDS)
    def poll() -> None:
        now = jobs.read(job_id)
        if now is None or not now.active:
            st.rerun(scope="app")
            return
        st.markdown(f"**{'Running' if now.running else 'Queued'}:** {plain(now.label)}")
        if now.state == jobs.QUEUED:
            st.info(queue_text(now), icon=":material/hourglass_top:")
        else:
            st.progress(now.fraction, text=progress_text(now))
        if st.button(cancel_label, icon=":material/stop:", key=f"cancel.{job_id}"):
            jobs.cancel(job_id)
            st.toast("Cancelling after the current step; finished work is kept.")
        if live_view is not None and now.state == jobs.RUNNING:
            live = jobs.live(job_id)
            if live:
                live_view(live)

    poll()


def show_outcome(status: JobStatus, what: str) -> None:
    """How an ended job ended: success, cancelled, or the error with the worker's last output."""
    if status.state == jobs.DONE:
        st.success(f"{what} finished in {status.seconds:.0f} s.")
    elif status.state == jobs.CANCELLED:
        st.warning(f"{what} cancelled after {status.seconds:.0f} s. Finished work is kept: starting the same "
                   "settings again resumes.")
    elif status.state == jobs.FAILED:
        st.error(f"{what} failed: {status.error}")
        tail = jobs.log_tail(status.job_id, 30)
        if tail:
            with st.expander("Worker output (last lines)"):
                st.code(tail, language=None)


def active_summary() -> list[str]:
    """One markdown line per queued or running job (for the sidebar)."""
    lines = []
    for status in jobs.list_jobs(active_only=True):
        if status.state == jobs.RUNNING:
            lines.append(f"**Running:** {plain(status.label)} · {status.fraction:.0%}")
        else:
            lines.append(f"**Queued ({ORDINALS.get(status.position or 1, status.position)}):** {plain(status.label)}")
    return lines


def measured_cost(kind: str) -> str:
    """"Measured on this machine: ..." from the finished jobs of ``kind`` in the job history (their wall time),
    or "" when none has finished yet. Never a hard-coded number: the machine, the model and the settings vary."""
    finished = [s for s in jobs.list_jobs(kind=kind) if s.state == jobs.DONE and s.started and s.finished]
    if not finished:
        return ""
    from analysis.core.tasks import format_seconds

    seconds = sorted(s.finished - s.started for s in finished[-5:])
    span = format_seconds(seconds[0]) if len(seconds) == 1 else \
        f"{format_seconds(seconds[0])} to {format_seconds(seconds[-1])}"
    return f"Measured on this machine: {span} for the last {len(seconds)} {kind} job(s)."


def job_panel(task: Task, *, what: str, label: str, stored: bool, stored_text: str | None = "",
              todo_text: str = "", button: str = "Start", live_view: Callable[[dict[str, Any]], None] | None = None,
              cancel_label: str = "Cancel", run_id: str | None = None) -> JobStatus | None:
    """The one job lifecycle of a task page: current job -> follow it -> its outcome -> stored? -> start.

    ``what`` names the work in outcomes ("Fine-tuning"); ``label`` is the job's label in queues; ``stored``:
    the result is on disk (``stored_text`` says so, else a default line; None: the page says it itself);
    ``todo_text``: what starting it does (the measured cost of this kind of job is appended). Returns the job
    shown (None if there is none); the page decides what to show below (e.g. ``st.stop()`` while active)."""
    run_id = run_id if run_id is not None else task.run_id()
    status = current(task.kind, run_id)
    if status is not None and status.active:
        follow(status, live_view=live_view, cancel_label=cancel_label)
        return status
    if status is not None:
        show_outcome(status, what)
    if stored:
        if stored_text is not None and (status is None or status.state != jobs.DONE):
            st.success(stored_text or f"{what}: the stored result of these settings is shown below.")
        return status
    cost = measured_cost(task.kind)
    st.caption(" ".join(text for text in (todo_text, cost) if text) or f"{what} has not run with these settings.")
    if st.button(button, type="primary", icon=":material/play_arrow:", key=f"start.{task.kind}.{run_id}"):
        submit(task, label)
        st.rerun()
    return status


def aligned_model_panel(todo_text: str) -> bool:
    """The one "build the safety-aligned default model" panel (Setup, "Is the model safe?"): its job followed,
    its outcome, or a start button with ``todo_text`` and the measured cost. True when the model is built."""
    from analysis.lab.align import AlignTask
    from ui.common import aligned_model_available

    built = aligned_model_available()
    job_panel(AlignTask(), what="Alignment", label="Building the safety-aligned default model", stored=built,
              stored_text=None, todo_text=todo_text, button="Build the aligned model")
    return built
