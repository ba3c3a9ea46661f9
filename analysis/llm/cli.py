"""CLI commands ``convert`` and ``summary`` (see ``analysis/__main__.py``)."""

from __future__ import annotations

import argparse
import time

from analysis.core.config import ModelConfig
from analysis.llm.models import ModelLoadError, convert_default_model, load_model, summarize


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "summary":
        parser.add_argument("--model", default="default", help="default, tiny-llama, tiny-gpt2, hub id or folder")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "convert":
            start = time.perf_counter()
            folder = convert_default_model(progress=lambda fraction, message: print(f"[{fraction:4.0%}] {message}"))
            print(f"checkpoint: {folder} ({time.perf_counter() - start:.1f} s)")
            return 0
        loaded = load_model(ModelConfig(source=args.model))
    except ModelLoadError as error:
        print(f"error: {error}")
        return 2
    summary = summarize(loaded.model, loaded.tokenizer)
    print(f"{loaded.name}: {summary.family}, {summary.n_parameters / 1e6:.1f} M parameters, "
          f"{summary.n_layers} layers, {len(summary.modules)} linear modules, "
          f"chat template: {'yes' if summary.has_chat_template else 'no (fallback used)'}, "
          f"loaded in {loaded.load_seconds:.2f} s")
    for module in summary.modules:
        print(f"  {module.name:50s} {module.label:14s} {module.d_out:6d} x {module.d_in:<6d}")
    return 0
