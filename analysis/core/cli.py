"""The command-line side of tasks: the options every task command shares, and running a task in the
foreground (progress bar, Ctrl-C cancels) or as a queued job worker (``--job``, see :mod:`analysis.core.jobs`).

A task command's ``run(args)`` builds its task from its own options (or from ``--config FILE``, the JSON that
``jobs.submit`` writes) and hands it to :func:`run_task`; the web app starts the very same command.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from analysis.core.config import DEVICE_MAPS, ConfigError, InputError, from_jsonable
from analysis.core.distributed import leader_process
from analysis.core.tasks import DEVICES_HELP, Cancelled, Event, Task, TaskContext

__all__ = ["add_device_map_argument", "add_task_arguments", "bounded_int", "load_task", "positive_int", "run_command",
           "run_task"]


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--job``, ``--device`` and ``--threads``, shared by every task command."""
    group = parser.add_argument_group("running")
    group.add_argument("--config", metavar="FILE",
                       help="read the whole task from this JSON file (as the web app writes it); other options ignored")
    group.add_argument("--job", metavar="DIR", help=argparse.SUPPRESS)  # run as the worker of a queued job
    group.add_argument("--device", default="cpu", help=f"where to compute: {DEVICES_HELP} (default cpu)")
    group.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="torch CPU threads, >= 1 (default: torch's choice)")


def positive_int(text: str) -> int:
    """argparse ``type`` of a count that must be >= 1 (argparse prints the message and exits 2)."""
    return bounded_int(1)(text)


def bounded_int(low: int, high: int | None = None):
    """An argparse ``type``: an integer in [low, high] (``high`` None: no upper bound), else a message naming
    the range (argparse prints it and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give an integer "
                                             + (f"from {low} to {high}" if high is not None else f">= {low}"))
        return value

    parse.__name__ = "integer"
    return parse


def add_device_map_argument(parser: argparse.ArgumentParser) -> None:
    """``--device-map`` (``ModelConfig.device_map``) of the commands that load a model; goes next to ``--dtype``."""
    parser.add_argument("--device-map", choices=DEVICE_MAPS, default=None,
                        help="spread the model over the GPUs (then CPU memory) with accelerate, for a model larger "
                             "than one GPU; --device is then ignored for the model (default: off)")


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


def run_command(args: argparse.Namespace, task_class: type, build: Callable[[argparse.Namespace], Task],
                print_result: Callable[[Mapping[str, Any]], None]) -> int:
    """The ``run(args)`` of a task command: the task from ``--config FILE`` or ``build(args)``, run by
    :func:`run_task`. Bad input (an :class:`~analysis.core.config.InputError`) prints ``error: ...`` and
    returns 2."""
    try:
        task = load_task(args.config, task_class) if args.config else build(args)
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
