"""Typed, validated configuration objects and their content hash.

Every config is a frozen dataclass validated in ``__post_init__``; a bad value raises
:class:`ConfigError` with a message that says what is wrong and what is allowed.
``config_hash`` gives the stable identity used to key results on disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Root of everything computed: ``$SSE_CACHE_DIR`` or ``<project>/cache``."""
    return Path(os.environ.get("SSE_CACHE_DIR", PROJECT_ROOT / "cache")).resolve()


class InputError(Exception):
    """Bad input the user can fix (a setting, a data file, a model that cannot be loaded); the message says
    what is wrong and how to fix it. Commands print it and exit with 2; pages show it and keep running."""


class ConfigError(InputError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


#: ``dataclasses.field`` metadata of a setting that says where or how a result is computed but never changes
#: it (e.g. :attr:`ModelConfig.device_map`): kept by :func:`to_jsonable`, left out of run ids. Task fields say
#: the same with ``analysis.core.options.option(..., run_id=False)``.
PLACEMENT = {"run_id": False}


def to_jsonable(value: Any, placement: bool = True) -> Any:
    """Dataclasses, tuples, paths -> plain JSON types (dict/list/str/number). ``placement=False`` leaves out
    the dataclass fields whose metadata says ``run_id: False`` (what run ids hash)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name), placement) for f in dataclasses.fields(value)
                if placement or f.metadata.get("run_id", True)}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, placement) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, placement) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def config_hash(value: Any, length: int = 16) -> str:
    """Stable hex hash of a config (sorted-key JSON of its fields, :data:`PLACEMENT` fields left out);
    ``length`` hex chars."""
    text = json.dumps(to_jsonable(value, placement=False), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def package_versions(packages: tuple[str, ...] = ("torch", "transformers", "numpy", "scipy", "safetensors",
                                                 "scikit-learn")) -> dict[str, str]:
    """{"python": version, package: installed version} for the packages that are installed (manifests record
    it, so a result can be traced to the software that computed it)."""
    import importlib.metadata
    import platform

    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


DTYPES = ("float32", "float64", "bfloat16")
#: Values of :attr:`ModelConfig.device_map` (accelerate's strategies; "auto" = "balanced").
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to load.

    source: ``"default"`` (embedded SmolLM2-135M-Instruct), ``"default-aligned"`` (its safety-aligned
    variant, once built), ``"tiny-llama"`` / ``"tiny-gpt2"`` (random tiny models), a local folder, or a
    Hugging Face hub id (must already be in the local HF cache when offline).
    device_map: None (the task moves the model to its device) or one of :data:`DEVICE_MAPS`: accelerate
    spreads the layers over the visible GPUs (then CPU memory) for a model larger than one GPU, and the
    task leaves it there. Where the weights sit does not change the numbers, so it is not in run ids.
    """

    source: str = "default"
    dtype: str = "float32"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    seed: int = 0  # only used by the tiny random models
    device_map: str | None = dataclasses.field(default=None, metadata=PLACEMENT)

    @classmethod
    def coerce(cls, value: Any, field: str = "model") -> ModelConfig:
        """A ModelConfig from a ModelConfig, a source string or path, or a dict of its fields (a task's JSON);
        ConfigError naming ``field`` otherwise. The one place a task field turns "a model" into a ModelConfig."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, Path)):
            return cls(source=str(value))
        if isinstance(value, dict):
            return from_jsonable(cls, value)
        raise ConfigError(f"{field} must be a model source (e.g. 'default', a folder, a hub id) or a ModelConfig, "
                          f"not {type(value).__name__}")

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("model source is empty: give 'default', 'tiny-llama', a hub id or a local folder")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"model device_map {self.device_map!r} is not one of {', '.join(DEVICE_MAPS)} "
                              "(or None: the task's device)")


def from_jsonable(cls: type, data: Any) -> Any:
    """Inverse of :func:`to_jsonable` for a dataclass type: nested dataclasses and tuples are rebuilt from the
    field annotations, and the constructor validates as usual. Unknown keys raise ConfigError."""
    if not (dataclasses.is_dataclass(cls) and isinstance(data, dict)):
        return data
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return cls(**{key: _rebuild(hints[key], value) for key, value in data.items()})


def _rebuild(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    for option in typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,):
        if dataclasses.is_dataclass(option) and isinstance(value, dict):
            return from_jsonable(option, value)
        if typing.get_origin(option) is tuple and isinstance(value, list):
            args = typing.get_args(option)
            inner = args[0] if args else Any
            return tuple(_rebuild(inner, item) for item in value)
    return value
