"""The command-line side of tasks: one generated command per registered task, the options every task command
shares, and running a task in the foreground (progress bar, Ctrl-C cancels) or as a queued job worker
(``--job``, see :mod:`analysis.core.jobs`).

:func:`add_task_command` builds a task command's parser from the task class (its fields' metadata, see
:mod:`analysis.core.options`); :func:`run_task_command` builds the task from the options (or from
``--config FILE``, the JSON that ``jobs.submit`` writes) and hands it to :func:`run_task`; the web app starts the
very same command. Optional hooks of a task class: ``add_extra_options(parser)`` (options that are not
settings, e.g. how much to print), ``from_options(args)`` (when options and fields do not map one to one),
``announce(device) -> list[str]`` (printed before the run; may refuse with an InputError, e.g. a plan over
budget), ``run_command(args) -> int | None`` (a command-only action such as ``--list``; an int ends the
command) and ``print_result(result[, args])``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from analysis.core.config import ConfigError, InputError, from_jsonable
from analysis.core.distributed import leader_process
from analysis.core.tasks import DEVICES_HELP, Cancelled, Event, Task, TaskContext

__all__ = ["add_task_arguments", "add_task_command", "load_task", "run_task", "run_task_command", "task_from_options"]


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--job``, ``--device`` and ``--threads``, shared by every task command."""
    group = parser.add_argument_group("running")
    group.add_argument("--config", metavar="FILE",
                       help="read the whole task from this JSON file (as the web app writes it); other options ignored")
    group.add_argument("--job", metavar="DIR", help=argparse.SUPPRESS)  # run as the worker of a queued job
    group.add_argument("--device", default="cpu", help=f"where to compute: {DEVICES_HELP} (default cpu)")
    group.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads, >= 1 (default: torch's choice)")


def load_task(path: str | Path, task_class: type) -> Task:
    """The task in a JSON file: either the task's fields or ``{"kind", "config": fields}`` (a job's task.json)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the task file {path}: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"the task file {path} holds a JSON {type(data).__name__}, not an object of "
                          f"{task_class.__name__} settings (or {{\"kind\", \"config\"}} as a job writes it)")
    if "config" in data and "kind" in data:
        if data["kind"] != task_class.kind:
            raise ConfigError(f"{path} holds a {data['kind']!r} task, not {task_class.kind!r}")
        data = data["config"]
        if not isinstance(data, dict):
            raise ConfigError(f"the task file {path}: 'config' is a JSON {type(data).__name__}, not an object")
    try:
        return from_jsonable(task_class, data)
    except TypeError as error:  # a field of the wrong JSON type that the constructor trips over
        raise ConfigError(f"the task file {path} does not hold valid {task_class.__name__} settings: {error}") \
            from error


def add_task_command(parser: argparse.ArgumentParser, task_class: type) -> None:
    """The options of ``task_class`` (generated from its fields), its extra options, and the running group."""
    from analysis.core.options import add_options

    add_options(parser, task_class)
    extra = getattr(task_class, "add_extra_options", None)
    if extra is not None:
        extra(parser)
    add_task_arguments(parser)


def task_from_options(task_class: type, args: argparse.Namespace) -> Task:
    """The task the options describe: the class's ``from_options`` hook, else field by field."""
    from analysis.core.options import options_to_task

    build = getattr(task_class, "from_options", None)
    return build(args) if build is not None else options_to_task(task_class, args)


def run_task_command(args: argparse.Namespace, task_class: type) -> int:
    """``python -m analysis <kind> ...``: the task from ``--config FILE`` (with any how-to-run options given
    beside it, e.g. ``--store``) or the options, announced and run by :func:`run_task`. Bad input (an
    :class:`~analysis.core.config.InputError`) prints ``error: ...`` and returns 2, the same for every task."""
    try:
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        command = getattr(task_class, "run_command", None)
        code = command(args) if command is not None else None
        if code is not None:
            return code
        task = load_task(args.config, task_class) if args.config else task_from_options(task_class, args)
        if args.config:  # how-to-run options given beside the file (e.g. --store) still apply
            from analysis.core.options import run_options

            task = dataclasses.replace(task, **run_options(task_class, args))
        announce = getattr(task, "announce", None)
        if announce is not None:
            lines = announce(args.device)
            if leader_process():
                print("\n".join(lines), flush=True)
        printer = getattr(task_class, "print_result", None)
        takes_args = printer is not None and len(inspect.signature(printer).parameters) > 1
        print_result = (lambda result: printer(result, args)) if takes_args else (printer or (lambda result: None))
        return run_task(task, args, print_result)
    except InputError as error:
        print(f"error: {error}")
        return 2


class _Bar:
    """A tqdm bar driven by task events (percent of the whole task)."""

    def __init__(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total}% [{elapsed}] {postfix}")

    def __call__(self, event: Event) -> None:
        self.bar.n = round(100 * event.fraction, 1)
        self.bar.set_postfix_str(event.message[:80], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_task(task: Task, args: argparse.Namespace, print_result: Callable[[Mapping[str, Any]], None]) -> int:
    """Run ``task`` as the command asked: as a job worker (``--job``) or in the foreground with a progress bar.

    In the foreground the first Ctrl-C cancels cleanly (the task keeps its finished work; running the same
    command again resumes), a second one stops at once. Under torchrun the ranks other than 0 run the task
    quietly (no progress bar, no printed result). Bad input found while running (an
    :class:`~analysis.core.config.InputError`) prints ``error: ...`` and returns 2. Returns the exit code."""
    from analysis.core import jobs

    if getattr(args, "job", None):
        return jobs.Worker(args.job).run(task.execute)
    speaks = leader_process()  # under torchrun only rank 0 shows progress and the result
    bar = _Bar() if speaks else None
    context = TaskContext(device=args.device, threads=args.threads, progress=bar)

    def interrupt(signum, frame):  # noqa: ARG001
        if context.cancel.is_set():
            raise KeyboardInterrupt
        context.cancel.set()
        print("\nCancelling after the current step (Ctrl-C again to stop at once)…", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with context.applied():
            result = task.execute(context)
    except Cancelled as error:
        if bar is not None:
            bar.close()
        print(f"Cancelled: {error}. Run the same command again to resume.", file=sys.stderr)
        return 130
    except InputError as error:  # found while running (a model that does not load, a data file, a busy run)
        if bar is not None:
            bar.close()
        print(f"error: {error}")
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
    if bar is not None:
        bar.close()
        print_result(result)
    return 0
