"""Command line: ``python -m analysis <command> ...``.

Task commands are generated from the task registry (:data:`analysis.core.tasks.TASKS`): the command is the task's
``kind``, its options come from the task class's fields (:mod:`analysis.core.options`) and every task runs through
the one runner (:func:`analysis.core.cli.run_task_command`: same exit codes, same error text). ``TASK_MODULES``
names the module that registers each kind, so ``--help`` and a job worker import only the chosen one. Add a task:
one class with ``@register_task`` and one line here. Other commands (no task: convert, summary, runs, delete) are a
module with ``add_arguments(parser, command)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# task kind -> (module that registers it, one-line help)
TASK_MODULES = {
    "collect": ("analysis.engine.collect_task", "collect per-sample safety/utility gradients and their geometry"),
    "evaluate": ("analysis.safety.evaluate", "safety evaluation: ASR, over-refusal, refusal/utility NLL of models"),
    "align": ("analysis.lab.align", "build the safety-aligned default model (cache/models/...-aligned)"),
    "finetune": ("analysis.lab.finetune", "fine-tune (attack presets) with plain SFT and/or SPF; live safety metrics"),
    "safe-lora": ("analysis.lab.safe_lora", "Safe LoRA-style post-hoc projection of a fine-tuned model's delta"),
    "defences": ("analysis.lab.grid", "every defence against every attack tier: the ASR / utility table"),
    "why": ("analysis.lab.why", "why a defence fails: a fine-tuning run's update vs the safety subspaces"),
    "screen": ("analysis.lab.screen", "which fine-tuning examples are risky: per-example gradient screening scores"),
    "screen-validate": ("analysis.lab.screen_validate", "does the screening predict harm: fine-tune on top/bottom/random-k"),
}
# command -> (module providing add_arguments/run, one-line help)
COMMANDS = {
    "convert": ("analysis.llm.cli", "convert the embedded default model to a safetensors checkpoint"),
    "summary": ("analysis.llm.cli", "print a model summary (family, parameters, linear modules)"),
    "runs": ("analysis.engine.cli", "list the stored collection runs"),
    "delete": ("analysis.engine.cli", "delete a stored run"),
    "findings": ("analysis.views.cli", "the findings table of a stored run: verdicts by tests, intervals, p-values"),
    "watch": ("analysis.views.watch", "list the watched training runs (SafetyGeometryCallback) or print one's verdict"),
}


def task_class(kind: str) -> type:
    """The registered task class of ``kind`` (its module imported on first use)."""
    from analysis.core.tasks import TASKS

    if kind not in TASK_MODULES:
        raise KeyError(f"unknown task {kind!r}; available: {', '.join(TASK_MODULES)}")
    importlib.import_module(TASK_MODULES[kind][0])
    return TASKS[kind]


def parse_task(kind: str, argv: list[str]):
    """The task that ``python -m analysis <kind> <argv>`` describes, built but not run (``--config`` read too)."""
    from analysis.core import cli

    cls = task_class(kind)
    parser = argparse.ArgumentParser(prog=f"python -m analysis {kind}")
    cli.add_task_command(parser, cls)
    args = parser.parse_args(argv)
    return cli.load_task(args.config, cls) if args.config else cli.task_from_options(cls, args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--job" in argv[:-1] and argv[:1] and argv[0] in TASK_MODULES:  # a queued job's worker: wait, light
        from analysis.core import jobs

        if not jobs.wait_for_turn(argv[argv.index("--job") + 1]):
            return 0
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Safety Subspace Explorer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command, (module_name, help_text) in {**TASK_MODULES, **COMMANDS}.items():
        sub = subparsers.add_parser(command, help=help_text, description=help_text)
        if command not in argv[:1]:  # only the chosen command's module is imported (a job worker starts faster)
            continue
        if command in TASK_MODULES:
            from analysis.core import cli

            cls = task_class(command)
            cli.add_task_command(sub, cls)
            sub.set_defaults(_run=lambda args, cls=cls: cli.run_task_command(args, cls))
        else:
            module = importlib.import_module(module_name)
            module.add_arguments(sub, command)
            sub.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
