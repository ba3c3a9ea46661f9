"""Run folders of :class:`analysis.lab.watch.SafetyGeometryCallback`: written row by row, readable at any time.

A watch run is a run folder of our store (:class:`analysis.core.store.RunStore` rooted at the folder's
parent; default root ``<cache>/watch``): ``manifest.json`` (kind "watch", the callback's config, model,
what is measured, the measured modules, the safety batch, the training arguments; status "running" until
training ends, a lock file while the process lives), one atomic JSON file per recorded step in ``rows/``
(``row_<step>.json``: totals, per-module lists in manifest order, evaluations), the step-0 safety basis in
``work/reference.safetensors`` (for the drift after a resume), and when training ends ``series.json`` (the
totals, one entry per row) and ``modules.safetensors`` (``<metric>`` (n_steps, n_modules) and ``step``),
whose sha256 and size the manifest records. Every file is written to a temporary name and renamed into
place, so a reader never sees half a row: :func:`read_watch_run` reads a run that is still being written.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.core.config import InputError
from analysis.core.store import (
    RunStore,
    StoreError,
    atomic_save_arrays,
    atomic_write_json,
    finite_or_none,
)

ROWS = "rows"
REFERENCE = "reference.safetensors"
#: Per-module series recorded in every row (lists in the order of the manifest's ``modules``).
MODULE_METRICS = ("cos", "share", "dloss", "dloss_sgd", "drift", "grad_norm", "safety_norm")

__all__ = ["WatchRun", "WatchRunError", "WatchWriter", "list_watch_runs", "open_watch_run", "read_watch_run",
           "watch_root"]


class WatchRunError(InputError):
    """A folder is not a readable watch run; the message says why."""


def watch_root() -> Path:
    """Default folder of watch runs: ``<cache>/watch``."""
    from analysis.core.config import cache_dir

    return cache_dir() / "watch"


class WatchWriter:
    """Writes one watch run through the store's :class:`RunWriter` (lock, manifest, checksummed final files)."""

    def __init__(self, writer):
        self.writer = writer
        self.folder: Path = writer.folder
        (self.folder / ROWS).mkdir(exist_ok=True)

    def write_row(self, row: Mapping[str, Any]) -> None:
        suffix = "_final" if row.get("final") else ""
        atomic_write_json(self.folder / ROWS / f"row_{int(row['step']):07d}{suffix}.json", finite_or_none(dict(row)))
        self.writer.write_manifest(last_step=int(row["step"]))

    def save_reference(self, basis: Mapping[str, np.ndarray]) -> None:
        atomic_save_arrays(self.writer.work / REFERENCE, {name: np.ascontiguousarray(U) for name, U in basis.items()})

    def load_reference(self) -> dict[str, np.ndarray] | None:
        path = self.writer.work / REFERENCE
        if not path.is_file():
            return None
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))

    def finish(self, rows: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write ``series.json`` and ``modules.safetensors`` from the rows on disk, mark the run complete."""
        del rows  # the rows on disk (a resumed run wrote some of them before)
        run = _rows_frame(_read_rows(self.folder), self.writer.manifest)
        arrays = {metric: values for metric, values in run[1].items()}
        arrays["step"] = np.asarray(run[2], dtype=np.int64)
        self.writer.finish({"modules.safetensors": arrays},
                           {"series.json": finite_or_none(run[0].to_dict(orient="records"))})

    def close(self) -> None:
        self.writer.close()


def open_watch_run(folder: str | Path, manifest: Mapping[str, Any]) -> WatchWriter:
    """Start (or resume an interrupted) watch run in ``folder``. A complete run there raises WatchRunError."""
    folder = Path(folder)
    store = RunStore(folder.parent)
    try:
        return WatchWriter(store.open_run(folder.name, dict(manifest)))
    except StoreError as error:
        raise WatchRunError(f"cannot write the watch run {folder}: {error} (choose another run_dir)") from None


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class WatchRun:
    """A watch run as read now: ``status`` ("running", "interrupted", "complete", "corrupted"), ``manifest``,
    ``totals`` (one row per recorded step: step, cos, share, dloss, drift, safety_loss, refusal_nll, ...),
    ``per_module`` {metric: (n_steps, n_modules) array, rows = ``steps``} and ``modules`` (manifest entries)."""

    folder: Path
    status: str
    manifest: dict
    totals: pd.DataFrame
    per_module: dict[str, np.ndarray]
    steps: list[int]

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def modules(self) -> list[dict]:
        return self.manifest.get("modules", [])

    def module_frame(self, metric: str) -> pd.DataFrame:
        """(steps x module labels) table of one per-module metric."""
        labels = [m["label"] for m in self.modules]
        values = self.per_module.get(metric, np.full((len(self.steps), len(labels)), np.nan))
        return pd.DataFrame(values, index=pd.Index(self.steps, name="step"), columns=labels)


def _read_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted((folder / ROWS).glob("row_*.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # renamed away or replaced between listing and reading: the next read has it
    return sorted(rows, key=lambda r: (r["step"], bool(r.get("final"))))


def _rows_frame(rows: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]
                ) -> tuple[pd.DataFrame, dict[str, np.ndarray], list[int]]:
    n_modules = len(manifest.get("modules", []))
    totals = pd.DataFrame([{k: v for k, v in row.items() if k != "modules"} for row in rows])
    if not totals.empty:
        totals = totals.astype({c: float for c in totals.columns if c not in ("step", "final", "refreshed")},
                               errors="ignore")
    measured = [row for row in rows if "modules" in row]
    per_module = {}
    for metric in MODULE_METRICS:
        values = np.full((len(measured), n_modules), np.nan)
        for i, row in enumerate(measured):
            series = row["modules"].get(metric)
            if series is not None and len(series) == n_modules:
                values[i] = [np.nan if v is None else v for v in series]
        per_module[metric] = values
    return totals, per_module, [int(row["step"]) for row in measured]


def read_watch_run(folder: str | Path) -> WatchRun:
    """The run in ``folder`` as it is now (complete or still being written). Raises WatchRunError for a folder
    that is not a watch run."""
    folder = Path(folder).expanduser()
    store = RunStore(folder.parent)
    try:
        manifest = store.manifest(folder.name)
    except StoreError as error:
        raise WatchRunError(f"{folder} is not a watch run: {error}") from None
    if manifest.get("kind") != "watch":
        raise WatchRunError(f"{folder} is a run of another kind ({manifest.get('kind', 'collection')!r}), "
                            "not one written by SafetyGeometryCallback")
    totals, per_module, steps = _rows_frame(_read_rows(folder), manifest)
    return WatchRun(folder, store.status(folder.name), manifest, totals, per_module, steps)


def list_watch_runs(root: str | Path | None = None) -> pd.DataFrame:
    """Watch runs under ``root`` (default :func:`watch_root`), newest first: run_id, status, created, model,
    mode, measured modules, last recorded step, folder."""
    root = Path(root) if root is not None else watch_root()
    store = RunStore(root)
    rows = []
    for run_id in store.run_ids():
        try:
            manifest = store.manifest(run_id)
        except StoreError:
            continue
        if manifest.get("kind") != "watch":
            continue
        rows.append({"run_id": run_id, "status": store.status(run_id), "created": manifest.get("created"),
                     "model": manifest.get("model", {}).get("name"), "mode": manifest.get("config", {}).get("mode"),
                     "modules": len(manifest.get("modules", [])), "last_step": manifest.get("last_step"),
                     "folder": str(root / run_id)})
    columns = ["run_id", "status", "created", "model", "mode", "modules", "last_step", "folder"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)
