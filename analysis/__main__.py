"""Command line: ``python -m analysis <command> ...``.

Each command lives in the module that does the work, as two functions: ``add_arguments(parser)`` and
``run(args) -> int``. Register a new command with one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module providing add_arguments/run, one-line help)
COMMANDS = {
    "convert": ("analysis.llm.cli", "convert the embedded default model to a safetensors checkpoint"),
    "summary": ("analysis.llm.cli", "print a model summary (family, parameters, linear modules)"),
    "collect": ("analysis.engine.cli", "collect per-sample safety/utility gradients and their geometry"),
    "runs": ("analysis.engine.cli", "list the stored collection runs"),
    "delete": ("analysis.engine.cli", "delete a stored run"),
    "evaluate": ("analysis.safety.evaluate", "safety evaluation: ASR, over-refusal, refusal/utility NLL of models"),
    "align": ("analysis.lab.align", "build the safety-aligned default model (cache/models/...-aligned)"),
    "finetune": ("analysis.lab.finetune", "fine-tune (attack presets) with plain SFT and/or SPF; live safety metrics"),
    "safe-lora": ("analysis.lab.safe_lora", "Safe LoRA-style post-hoc projection of a fine-tuned model's delta"),
    "defences": ("analysis.lab.grid", "every defence against every attack tier: the ASR / utility table"),
    "why": ("analysis.lab.why", "why a defence fails: a fine-tuning run's update vs the safety subspaces"),
    "screen": ("analysis.lab.screen", "which fine-tuning examples are risky: per-example gradient screening scores"),
    "screen-validate": ("analysis.lab.screen_validate", "does the screening predict harm: fine-tune on top/bottom/random-k"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Safety Subspace Explorer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(command, help=help_text)
        if command in argv[:1]:  # only the chosen command's module is imported (a job worker starts faster)
            module = importlib.import_module(module_name)
            module.add_arguments(sub, command)
            sub.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
