"""Task settings declared once: a field's help, CLI flag, choices and run-id membership live in its metadata.

A task is a frozen dataclass whose fields are declared with :func:`option` (kronfluence's ``Arguments`` style)::

    top_k: int = option(8, help="subspace dimension k", flag="--top-k", minimum=1)
    workers: int | None = option(None, help="modules analysed in parallel", run_id=False)

From that one declaration come the command-line options (:func:`add_options`; one shared "model" group for a
:class:`~analysis.core.config.ModelConfig` field), the task built from parsed options (:func:`options_to_task`),
the values a run id hashes (:func:`identity_values`) and the pages' defaults (:func:`default`).

Metadata keys (all optional): ``help`` (one line), ``flag`` (default ``--field-name``), ``short`` (e.g. ``-n``),
``choices`` (a tuple, or a zero-argument callable read when the parser is built: a registry's names),
``metavar``, ``cli`` (False: not an option, e.g. a field only the web app sets), ``run_id`` (False: says how or
where a result is computed, never what it is - left out of run ids), ``legacy`` (True: added after runs were
stored; left out of run ids while it holds its default, so those runs keep their ids - the table of such
fields is :func:`legacy_fields`), ``minimum`` / ``maximum`` (checked by :func:`check_bounds`), ``required``
(the command line must give it, unless the task comes from ``--config FILE``), ``repeatable`` (the shared
model group's ``--model`` may be given several times: one task per model), ``exclude`` (of nested settings:
their fields that are not options of this command, e.g. where the task has an option of the same name).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from analysis.core.config import ConfigError, ModelConfig, to_jsonable

__all__ = ["add_options", "check_bounds", "cli_fields", "default", "identity_values", "legacy_fields", "option",
           "option_values", "options_to_task", "run_options", "without_legacy_defaults"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, short: str | None = None,  # noqa: A002
           choices: tuple | Callable[[], Iterable[str]] | None = None, metavar: str | None = None,
           cli: bool = True, run_id: bool = True, legacy: bool = False, minimum: float | None = None,
           maximum: float | None = None, required: bool = False, repeatable: bool = False,
           default_factory: Callable[[], Any] | Any = _MISSING) -> Any:
    """A dataclass field carrying its help text, CLI flag, choices and run-id membership (module docstring)."""
    metadata = {"help": help, "flag": flag, "short": short, "choices": choices, "metavar": metavar, "cli": cli,
                "run_id": run_id, "legacy": legacy, "minimum": minimum, "maximum": maximum, "required": required,
                "repeatable": repeatable}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default(cls: type, name: str) -> Any:
    """The dataclass default of field ``name`` of ``cls`` (pages take their defaults from here)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    raise ConfigError(f"{cls.__name__}.{name} has no default")


def _has_default(field: dataclasses.Field) -> bool:
    return field.default is not _MISSING or field.default_factory is not _MISSING


def _is_model_field(hint: Any) -> bool:
    return _strip_optional(hint) is ModelConfig


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def cli_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type hint) of every field of ``cls`` that is a command-line option, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.init and f.metadata.get("help") is not None and f.metadata.get("cli", True)]


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _choices(field: dataclasses.Field) -> list | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def _help(text: str, value: Any, required: bool = False) -> str:
    if required:
        return f"{text} (required)"
    shown = "off" if value is None else ",".join(map(str, value)) if isinstance(value, tuple) else value
    return f"{text} (default: {shown})"


def _is_nested(field: dataclasses.Field, hint: Any) -> bool:
    """A dataclass-typed field (other than a model given by the shared group or by its own flag): its own CLI
    fields become options of the command."""
    base = _strip_optional(hint)
    return dataclasses.is_dataclass(base) and base is not ModelConfig


def _is_model_group(field: dataclasses.Field, hint: Any) -> bool:
    """The task's one model, given by the shared model group (a model field with its own flag is one option)."""
    return _is_model_field(hint) and not field.metadata.get("flag")


def add_options(parser: argparse.ArgumentParser, cls: type, exclude: Iterable[str] = (), prefix: str = "",
                group: Any = None, default_note: str | None = None, optional: bool = False) -> None:
    """Add an option for every CLI field of ``cls`` (not in ``exclude``); a ModelConfig field adds the shared
    model group (``--model``, ``--dtype``, ``--device-map``, ...), or one option (its source) when it names its
    own flag; a nested settings dataclass adds its own CLI fields. Defaults and help come from the fields; a
    task whose nested settings default to something else (a preset) says so in ``cli_default_note``."""
    exclude = set(exclude)
    default_note = default_note if prefix else getattr(cls, "cli_default_note", None)
    group = group if group is not None else parser.add_argument_group("task settings")
    for field, hint in cli_fields(cls):
        if field.name in exclude:
            continue
        if _is_model_group(field, hint):
            _add_model_group(parser, field)
            continue
        if _is_nested(field, hint):
            add_options(parser, _strip_optional(hint), exclude=field.metadata.get("exclude", ()),
                        prefix=f"{prefix}{field.name}.", group=group, default_note=default_note,
                        optional=default(cls, field.name) is None)
            continue
        value = default(cls, field.name) if _has_default(field) else None
        if _is_model_field(hint):  # a second model (e.g. the base model): its source, as a string option
            shown = None if optional else getattr(value, "source", value)  # settings off by default: "off"
            group.add_argument(_flag(field), dest=prefix + field.name, default=argparse.SUPPRESS, metavar="SOURCE",
                               help=_help(field.metadata["help"], shown, field.metadata.get("required", False)))
            continue
        names = [_flag(field)] + ([field.metadata["short"]] if field.metadata.get("short") else [])
        shown = _help(field.metadata["help"], value, field.metadata.get("required", False))
        if prefix and default_note and value is not False:
            shown = f"{field.metadata['help']} (default: {default_note})"
        kwargs: dict[str, Any] = {"dest": prefix + field.name, "help": shown,
                                  "default": argparse.SUPPRESS}
        base = _strip_optional(hint)
        if base is bool:
            kwargs["action"] = "store_true" if value is False else argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:  # "--seeds 0 1 2" or "--seeds 0,1,2"
            kwargs["nargs"] = "+"
            kwargs["type"] = _list_of((typing.get_args(base) or (str,))[0])
        else:
            kwargs["type"] = base if base in (int, float) else str
        choices = _choices(field)
        if choices is not None:  # shown, and checked by the task class (one error text for the CLI and the app)
            kwargs["help"] = f"{kwargs['help'][:-1]}; {'any' if 'nargs' in kwargs else 'one'} of: {', '.join(choices)})"
        if base is not bool:
            kwargs["metavar"] = field.metadata.get("metavar") or (
                "{" + ",".join(choices) + "}" if choices is not None and "nargs" not in kwargs else field.name.upper())
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        group.add_argument(*names, **kwargs)


def _list_of(inner: Any) -> Callable[[str], list]:
    """argparse type of one item of a tuple option: "0,1,2" -> [0, 1, 2] (ints/floats converted)."""
    convert = inner if inner in (int, float) else str

    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of {convert.__name__}s") from None

    return parse


def _add_model_group(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    from analysis.core.config import DEVICE_MAPS, DTYPES

    model = _default_model(field)
    group = parser.add_argument_group("model", field.metadata["help"])
    repeatable = field.metadata.get("repeatable", False)
    group.add_argument("--model", dest="model.source", default=argparse.SUPPRESS, metavar="SOURCE",
                       action="append" if repeatable else "store",
                       help=_help("default, default-aligned, tiny-llama, tiny-gpt2, a local folder or a hub id "
                                  "already in the local cache" + ("; repeat it for several models" if repeatable
                                                                  else ""), model.source))
    group.add_argument("--dtype", dest="model.dtype", choices=DTYPES, default=argparse.SUPPRESS,
                       help=_help("model dtype (bfloat16 trains through float32 master weights)", model.dtype))
    group.add_argument("--device-map", dest="model.device_map", choices=DEVICE_MAPS, default=argparse.SUPPRESS,
                       help=_help("spread the model over the GPUs (then CPU memory) with accelerate, for a model "
                                  "larger than one GPU; --device is then ignored for the model", model.device_map))
    group.add_argument("--trust-remote-code", dest="model.trust_remote_code", action="store_true",
                       default=argparse.SUPPRESS, help="run the model repository's own Python code (default: off)")
    group.add_argument("--allow-pickle", dest="model.allow_pickle", action="store_true", default=argparse.SUPPRESS,
                       help="load pickle (.bin) checkpoints, which can run code (default: off, safetensors only)")


def _default_model(field: dataclasses.Field) -> ModelConfig:
    if field.default is not _MISSING:
        return field.default
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return ModelConfig()


def options_to_task(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The task ``cls`` from parsed options: each CLI field given on the command line, the others their
    defaults; ``fixed`` values override both. The class validates as usual (ConfigError)."""
    values = option_values(cls, vars(args))
    values.update(fixed)
    missing = [f"{_flag(f)} {f.metadata.get('metavar') or ('SOURCE' if _is_model_field(hint) else f.name.upper())}"
               for f, hint in cli_fields(cls) if f.metadata.get("required") and f.name not in values]
    if missing:
        raise ConfigError(f"give {' and '.join(missing)} (or --config FILE)")
    return cls(**values)


def option_values(cls: type, given: Mapping[str, Any], prefix: str = "", partial: bool = False,
                  exclude: Iterable[str] = ()) -> dict[str, Any]:
    """{field: value} of the CLI fields of ``cls`` that were given (``given``: parsed options by dest), nested
    settings and the shared model group rebuilt from their own options (``partial``: nested settings as a dict
    of what was given, for a task that fills the rest from elsewhere, e.g. a preset)."""
    values: dict[str, Any] = {}
    for field, hint in cli_fields(cls):
        if field.name in exclude:
            continue
        name = prefix + field.name
        if _is_model_group(field, hint):
            changes = {key.split(".", 1)[1]: value for key, value in given.items() if key.startswith("model.")}
            if changes:
                values[field.name] = dataclasses.replace(_default_model(field), **changes)
        elif _is_nested(field, hint):
            inner = option_values(_strip_optional(hint), given, prefix=f"{name}.", partial=partial,
                                  exclude=field.metadata.get("exclude", ()))
            if inner:
                values[field.name] = inner if partial else _nested(cls, field, _strip_optional(hint), inner)
        elif name in given:
            value = given[name]
            if isinstance(value, list):  # nargs="+": each item may itself be a comma-separated list
                value = tuple(item for part in value for item in (part if isinstance(part, list) else [part]))
            values[field.name] = value
    return values


def _nested(cls: type, field: dataclasses.Field, settings: type, inner: dict[str, Any]) -> Any:
    """Nested settings from the options given: the default with them applied, or, for settings that are off
    by default (None, e.g. a judge), the settings class built from them (ConfigError naming what is missing)."""
    current = default(cls, field.name)
    if current is not None:
        return dataclasses.replace(current, **inner)
    missing = [_flag(f) for f, _ in cli_fields(settings) if f.name not in inner and not _has_default(f)]
    if missing:
        raise ConfigError(f"{field.name}: give {' and '.join(missing)} too (or leave out its other options)")
    return settings(**inner)


def run_options(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of the ``run_id=False`` top-level options given on the command line."""
    given = vars(args)
    return {f.name: given[f.name] for f, hint in cli_fields(cls)
            if not f.metadata.get("run_id", True) and f.name in given and not _is_nested(f, hint)}


def check_bounds(task: Any) -> None:
    """ConfigError naming the field and its range when a number is outside its declared minimum/maximum."""
    for field in dataclasses.fields(task):
        value = getattr(task, field.name)
        low, high = field.metadata.get("minimum"), field.metadata.get("maximum")
        if (low is None and high is None) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{field.name} must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            kind = "an integer" if isinstance(value, int) else "a number"
            span = f"from {low:g} to {high:g}" if low is not None and high is not None else \
                f">= {low:g}" if low is not None else f"<= {high:g}"
            raise ConfigError(f"{field.name} must be {kind} {span}, got {value!r}")


def identity_values(task: Any) -> dict:
    """The task's settings as a run id hashes them: JSON-able, without ``run_id=False`` fields (recursively,
    so a model's device_map is left out), and without ``legacy`` fields that hold their default."""
    return without_legacy_defaults(task, to_jsonable(task, placement=False))


def without_legacy_defaults(obj: Any, values: dict) -> dict:
    """``values`` (the JSON of dataclass ``obj``) without its ``legacy`` fields that hold their default (in
    nested settings too); returns ``values``, changed in place."""
    _drop_legacy(obj, values)
    return values


def _drop_legacy(obj: Any, values: dict) -> None:
    for field in dataclasses.fields(obj):
        if field.name not in values:
            continue
        value = getattr(obj, field.name)
        if field.metadata.get("legacy") and value == default(type(obj), field.name):
            del values[field.name]
        elif dataclasses.is_dataclass(value) and isinstance(values[field.name], dict):
            _drop_legacy(value, values[field.name])


def legacy_fields(classes: Iterable[type]) -> Mapping[str, Any]:
    """{"Class.field": default} of every field left out of run ids while at its default (added later)."""
    return {f"{cls.__name__}.{f.name}": default(cls, f.name) for cls in classes for f in dataclasses.fields(cls)
            if f.metadata.get("legacy")}
