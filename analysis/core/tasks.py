"""Tasks: every long job (collect, evaluate, align, fine-tune) is a frozen config with ``run_id()`` and
``execute(ctx)``; the :class:`TaskContext` carries everything a task may not decide for itself.

A task never sets process-global state on its own (torch threads, deterministic algorithms, RNG): the
context applies them once, in the process that owns the task (a CLI run or a job worker, see
:mod:`analysis.core.jobs`). Progress goes through one event type (:class:`Event`), cancelling through one
mechanism (:class:`CancelToken`, raising :class:`Cancelled`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["TASKS", "Cancel", "Cancelled", "CancelToken", "Event", "Progress", "Task", "TaskContext", "register_task", "resolve_device"]

DEVICES_HELP = "'auto' (a GPU if there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N'"


class Cancelled(RuntimeError):
    """The task was cancelled; finished work is kept and running the same config again resumes it.

    ``run_id`` names the partial run when the task knows it (else "")."""

    def __init__(self, message: str = "cancelled", run_id: str = ""):
        super().__init__(message)
        self.run_id = run_id


#: The plain callbacks of building blocks that also run inside other tasks (generation, NLLs, conversion):
#: ``progress(fraction in [0, 1], message)`` (``TaskContext.report`` fits) and ``cancel() -> True: stop``
#: (``lambda: ctx.cancelled``).
Progress = Callable[[float, str], None]
Cancel = Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class Event:
    """One progress report: ``fraction`` of the whole task in [0, 1], a one-line ``message``, and optional
    ``live`` data for charts (a JSON-able mapping; replaces the previous one, ``None`` keeps it)."""

    fraction: float
    message: str
    live: Mapping[str, Any] | None = None


class CancelToken:
    """Set from another thread (``set()``) or another process (the flag file exists); ``is_set()`` is cheap."""

    def __init__(self, flag_file: str | Path | None = None):
        self._event = threading.Event()
        self.flag_file = Path(flag_file) if flag_file is not None else None

    def set(self) -> None:
        self._event.set()
        if self.flag_file is not None:
            self.flag_file.touch()

    def is_set(self) -> bool:
        if not self._event.is_set() and self.flag_file is not None and self.flag_file.exists():
            self._event.set()
        return self._event.is_set()


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> "cuda" when torch sees a GPU, else "cpu"; other names are checked and returned.

    Raises ValueError naming the choices for an unknown name or a GPU that is not there."""
    import torch

    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: torch sees no GPU here; use 'cpu' or 'auto'")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} GPUs")
        return name
    raise ValueError(f"device {device!r} is not one of {DEVICES_HELP}")


@dataclasses.dataclass
class TaskContext:
    """What a running task gets from whoever runs it.

    device: where the model and its tensors live ("cpu", "cuda", "cuda:N"; see :func:`resolve_device`).
    threads: torch CPU threads for this process (None: leave torch's default). progress: receives
    :class:`Event` s (None: dropped). cancel: checked by the task between steps. Seeds are not here: every
    task's randomness is seeded from its own config, so the same config gives the same numbers wherever it runs.
    """

    device: str = "cpu"
    threads: int | None = None
    progress: Callable[[Event], None] | None = None
    cancel: CancelToken = dataclasses.field(default_factory=CancelToken)

    def report(self, fraction: float, message: str, live: Mapping[str, Any] | None = None) -> None:
        """Send one progress event (fraction clipped to [0, 1])."""
        if self.progress is not None:
            self.progress(Event(min(max(float(fraction), 0.0), 1.0), message, live))

    def sub(self, low: float, high: float, prefix: str = "", keep_live: bool = False) -> TaskContext:
        """A context for one part of the task: its fractions map onto [``low``, ``high``] of this one's, its
        messages get ``"<prefix>: "``, its ``live`` data is dropped unless ``keep_live``; same device, threads
        and cancel token (cancelling either cancels both)."""

        def forward(event: Event) -> None:
            self.report(low + (high - low) * event.fraction,
                        f"{prefix}: {event.message}" if prefix else event.message, event.live if keep_live else None)

        return dataclasses.replace(self, progress=forward if self.progress is not None else None)

    @property
    def cancelled(self) -> bool:
        return self.cancel.is_set()

    def check_cancel(self, message: str = "cancelled", run_id: str = "") -> None:
        """Raise :class:`Cancelled` if cancelling was asked for."""
        if self.cancel.is_set():
            raise Cancelled(message, run_id)

    @contextlib.contextmanager
    def applied(self) -> Iterator[TaskContext]:
        """Apply the process-wide settings (torch threads) for the block, restored afterwards."""
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        try:
            yield self
        finally:
            torch.set_num_threads(before)


@runtime_checkable
class Task(Protocol):
    """A long job. ``kind`` is its command name (``python -m analysis <kind>``); the task is a frozen dataclass
    (its fields are the config, hashed into ``run_id()``); ``execute`` returns a JSON-able summary."""

    kind: ClassVar[str]

    def run_id(self) -> str: ...

    def execute(self, ctx: TaskContext) -> Mapping[str, Any]: ...


#: Every registered task class by its ``kind`` (filled by :func:`register_task` when a task's module is
#: imported; ``analysis.__main__.TASK_MODULES`` says which module registers which kind, so ``--help`` imports
#: only the chosen command's module).
TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    """Class decorator: register a task class under its ``kind`` (once; a second class of the same kind is an
    error naming both)."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{cls.__qualname__} has no task kind (a ClassVar[str] 'kind')")
    registered = TASKS.get(kind)
    if registered is not None and (registered.__module__, registered.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"task kind {kind!r} is registered twice: {registered.__module__}.{registered.__qualname__} "
                         f"and {cls.__module__}.{cls.__qualname__}")
    TASKS[kind] = cls
    return cls


class Throttle:
    """True at most every ``seconds`` (and always for ``force``): limits how often progress is written."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._last = 0.0

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.seconds:
            self._last = now
            return True
        return False


def format_seconds(seconds: float | None) -> str:
    """``"41 s"``, ``"20 min 41 s"``, ``"1 h 02 min"``; "-" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
