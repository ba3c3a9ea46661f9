"""Progress and cancel callbacks of the evaluation building blocks (generation, NLL, judge).

The building blocks are also called inside other tasks (alignment, fine-tuning), so they take plain
callables rather than a :class:`~analysis.core.tasks.TaskContext`; a task passes
``cancel=lambda: ctx.cancelled`` and maps ``progress`` onto ``ctx.report``.
"""

from __future__ import annotations

from analysis.core.tasks import Cancel, Cancelled, Progress

__all__ = ["Cancel", "EvalCancelled", "Progress", "check_cancel", "report"]


class EvalCancelled(Cancelled):
    """The caller's cancel() returned True; nothing was stored."""


def report(progress: Progress | None, fraction: float, message: str) -> None:
    """Call ``progress`` (if any) with ``fraction`` clipped to [0, 1]."""
    if progress is not None:
        progress(min(max(fraction, 0.0), 1.0), message)


def check_cancel(cancel: Cancel | None, message: str = "evaluation cancelled") -> None:
    """Raise :class:`EvalCancelled` when ``cancel()`` says so."""
    if cancel is not None and cancel():
        raise EvalCancelled(message)
