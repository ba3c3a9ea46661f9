"""Tasks declared once: the registry, the generated command line, run ids that survive the refactor."""

import argparse
import contextlib
import dataclasses
import io
import re
import subprocess
import sys
import typing

import pytest

from analysis.__main__ import TASK_MODULES, main, task_class
from analysis.core.config import ConfigError, ModelConfig
from analysis.core.options import cli_fields, default, identity_values, legacy_fields, option, options_to_task
from analysis.core.tasks import TASKS, register_task


def help_text(kind: str) -> str:
    """``python -m analysis <kind> --help`` as one line (argparse wraps at the terminal width)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([kind, "--help"])
    return " ".join(out.getvalue().split())


def flattened_fields(cls, prefix="", note=None, optional=False, exclude=()):
    """(dest, flag, help, default) of every CLI option a task class declares, nested settings included (their
    default shown as the task's ``cli_default_note`` when it has one, e.g. "the preset's")."""
    note = note or getattr(cls, "cli_default_note", None)
    hints = typing.get_type_hints(cls)
    for field, _ in cli_fields(cls):
        if field.name in exclude:
            continue
        hint = hints[field.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) else hint
        if base is ModelConfig and not field.metadata.get("flag"):
            yield "model.source", "--model", None, default(cls, field.name).source
        elif dataclasses.is_dataclass(base) and base is not ModelConfig:
            yield from flattened_fields(base, f"{prefix}{field.name}.", note, default(cls, field.name) is None,
                                        field.metadata.get("exclude", ()))
        else:
            flag = field.metadata.get("flag") or "--" + field.name.replace("_", "-")
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            value = default(cls, field.name) if has_default else None
            if prefix and note and value is not False:
                value = note
            if optional and isinstance(value, ModelConfig):  # a model of settings that are off by default
                value = None
            yield prefix + field.name, flag, field.metadata["help"], getattr(value, "source", value)


@pytest.mark.parametrize("kind", list(TASK_MODULES))
def test_every_task_kind_is_registered_once_under_its_command(kind):
    cls = task_class(kind)
    assert cls.kind == kind and TASKS[kind] is cls


def test_a_second_class_of_a_registered_kind_is_refused():
    task_class("collect")

    @dataclasses.dataclass(frozen=True)
    class Impostor:
        kind: typing.ClassVar[str] = "collect"

    with pytest.raises(ValueError, match="registered twice"):
        register_task(Impostor)
    assert TASKS["collect"].__name__ == "CollectionConfig"


@pytest.mark.parametrize("kind", list(TASK_MODULES))
def test_help_shows_every_declared_option_with_its_default_and_help(kind):
    body = help_text(kind).split(" options: ", 1)[1]  # the option list, after the usage line
    for dest, flag, help_line, value in flattened_fields(task_class(kind)):
        found = re.search(rf" {re.escape(flag)}[ ,]", body)
        assert found, f"{kind}: {flag} ({dest}) is not in --help"
        entry = body[found.end():][:600]
        if help_line is not None:
            assert " ".join(help_line.split()) in entry, f"{kind}: the help of {flag} is not in its entry"
        if value is not False and "(required)" not in entry[:400]:
            shown = "off" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else value
            assert re.search(rf"\(default: {re.escape(str(shown))}[;)]", entry), \
                f"{kind}: {flag} does not show (default: {shown})"


def test_the_command_line_builds_the_task_field_by_field():
    cls = task_class("collect")
    parser = argparse.ArgumentParser()
    from analysis.core.cli import add_task_command

    add_task_command(parser, cls)
    task = options_to_task(cls, parser.parse_args(["--model", "tiny-llama", "--dtype", "float64", "--modules", "q,v",
                                                   "--top-k", "3", "--force", "--workers", "1"]))
    assert task == cls(model=ModelConfig("tiny-llama", dtype="float64"), kinds="q,v", top_k=3, force=True, workers=1)
    assert options_to_task(cls, parser.parse_args([])) == cls()
    align = task_class("align")
    parser = argparse.ArgumentParser()
    add_task_command(parser, align)
    task = options_to_task(align, parser.parse_args(["--steps", "7", "--dtype", "bfloat16", "--device-map", "auto"]))
    assert (task.settings.steps, task.settings.dtype, task.device_map) == (7, "bfloat16", "auto")


@pytest.mark.parametrize("options, message", [
    (["--top-k", "1000000000"], "top_k must be an integer from 1 to 4096"),
    (["--chunk-mb", "-5"], "chunk_mb must be an integer from 1"),
    (["--workers", "0"], "workers must be an integer from 1 to 256"),
    (["--n-safety", "0"], "n_safety must be an integer from 1"),
    (["--threads", "-1"], "--threads must be at least 1"),
])
def test_out_of_range_settings_are_refused_with_the_range(options, message, capsys):
    assert main(["collect", "--model", "tiny-llama", *options]) == 2
    assert message in capsys.readouterr().out


def test_a_required_option_is_asked_for(capsys):
    assert main(["safe-lora"]) == 2 and "give --finetuned SOURCE (or --config FILE)" in capsys.readouterr().out
    assert main(["why"]) == 2 and "give --run RUN (or --config FILE)" in capsys.readouterr().out


def test_run_ids_of_stored_runs_are_unchanged_by_the_layout():
    """Ids computed with the code before the registry (tiny models, shipped data): stored runs keep them."""
    from analysis.lab.align import AlignSettings, settings_hash
    from analysis.lab.config import preset
    from analysis.lab.trainer import run_id_for

    collect = task_class("collect")  # without resampling (issue 19's n_boot / n_perm, which enter new ids)
    assert collect(model="tiny-llama", n_boot=0, n_perm=0).run_id() == "27299d561b2d6980"
    assert collect(model="tiny-llama", n_safety=4, n_utility=4, projection_dim=16, n_boot=0, n_perm=0,
                   modules_per_pass=3, workers=2, force=True).run_id() == "722e368bb513cb3a"
    assert task_class("evaluate")(model="tiny-llama").run_id() == "07c2b2bb5bf37e3c"
    assert settings_hash(AlignSettings()) == "b5fd23f7499e8f74"
    assert settings_hash(AlignSettings(dtype="bfloat16")) == "a79f25f7c2b94752"
    fingerprints = {"train": "f1", "safety": "f2"}
    for method, expected in (("plain", "b4c054cfa72c"), ("spf", "b14dbca3a565"), ("pcgrad", "e493b666821c")):
        config = preset("harmful-10", model=ModelConfig("tiny-llama"), method=method)
        assert run_id_for(config, "ident", fingerprints) == f"harmful-10-{method}-{expected}"
    tiny = ModelConfig("tiny-llama")
    assert task_class("safe-lora")(finetuned=tiny, aligned=tiny, base=tiny).run_id() == "8ed317023383a09a"
    # a grid with the evaluation sizes of the default before issue 20 (the default is now the whole split)
    assert task_class("defences")(model=tiny, base=tiny, n_harmful=22, n_benign=16).run_id() == "68b5e9aa99076b03"


def test_settings_that_only_say_how_are_left_out_of_the_identity():
    collect = task_class("collect")
    plain = identity_values(collect(model="tiny-llama"))
    tuned = identity_values(collect(model=ModelConfig("tiny-llama", device_map="auto"), workers=2, chunk_mb=64,
                                    force=True, keep_work=True, store="/tmp/x", modules_per_pass=3))
    assert plain == tuned and "projection_dim" not in plain
    assert identity_values(collect(model="tiny-llama", projection_dim=8))["projection_dim"] == 8


def test_the_legacy_table_lists_the_fields_added_after_runs_were_stored():
    """The one table of run-id exceptions: fields added after runs were stored, left out while at their default."""
    from analysis.lab.align import AlignSettings
    from analysis.lab.config import FinetuneConfig, SPFConfig

    classes = [task_class(kind) for kind in TASK_MODULES] + [AlignSettings, FinetuneConfig, SPFConfig]
    assert legacy_fields(classes) == {
        "CollectionConfig.projection_dim": None, "EvalConfig.system_prompt": None, "DefenceGridTask.seeds": None,
        "AlignSettings.dtype": "float32", "SPFConfig.safety_loss": "refusal"}


def test_a_task_declared_in_a_test_gets_a_command_line(tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Count:
        kind: typing.ClassVar[str] = "count-test"
        upto: int = option(3, help="count up to", minimum=1, maximum=10)
        model: ModelConfig = option(help="a model", default_factory=lambda: ModelConfig("tiny-llama"))
        quiet: bool = option(False, help="print nothing", run_id=False)

    parser = argparse.ArgumentParser()
    from analysis.core.cli import add_task_command

    add_task_command(parser, Count)
    assert options_to_task(Count, parser.parse_args(["--upto", "5", "--quiet"])) == \
        Count(upto=5, quiet=True)
    assert identity_values(Count(quiet=True)) == identity_values(Count())
    with pytest.raises(SystemExit):
        parser.parse_args(["--upto", "x"])


def test_a_bad_config_file_is_a_message(tmp_path, capsys):
    for content in ("[]", "5", "{bad"):
        path = tmp_path / "task.json"
        path.write_text(content)
        assert main(["collect", "--config", str(path)]) == 2
        assert "error:" in capsys.readouterr().out


def test_help_imports_only_the_chosen_task():
    code = ("import sys; from analysis.__main__ import main\n"
            "try:\n    main(['why', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('analysis.') and m.split('.')[1] in "
            "('engine', 'safety')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "analysis.engine.collect_task" not in out


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="top_k"):
        task_class("collect")(top_k=0)


def test_a_model_is_coerced_in_one_place():
    assert ModelConfig.coerce("tiny-llama") == ModelConfig("tiny-llama")
    assert ModelConfig.coerce({"source": "tiny-llama", "dtype": "float64"}) == ModelConfig("tiny-llama", "float64")
    with pytest.raises(ConfigError, match="base must be a model source"):
        ModelConfig.coerce(5, "base")
    with pytest.raises(ConfigError, match="has no field"):
        ModelConfig.coerce({"sauce": "x"})


def test_every_command_line_in_the_readme_parses():
    """The README's command lines use options that exist (parsed, not run)."""
    import shlex
    from pathlib import Path

    from analysis.core.cli import add_task_command

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    lines = [line.split("#")[0] for line in text.splitlines() if "-m analysis " in line]
    assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line.split("-m analysis ", 1)[1])
        if argv[0] not in TASK_MODULES:
            continue
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_task_command(parser, task_class(argv[0]))
        parser.parse_args(argv[1:])
