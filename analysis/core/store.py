"""Results on disk: one folder per collection run under ``cache_dir()/"runs"``.

Public API
----------
``RunStore(root=None)``          the store; ``root`` defaults to ``cache_dir() / "runs"`` (tests pass a tmp dir).
  ``.list_runs() -> pandas.DataFrame``   one row per run: run_id, status, created, model, safety, utility,
                                         n_safety, n_utility, n_modules, top_k, size_mb (newest first).
  ``.load(run_id) -> RunResults``        a complete run (raises ``RunNotFound`` / ``RunIncomplete`` /
                                         ``RunCorrupted`` with a clear message).
  ``.status(run_id) -> str``            "missing", "running" (being collected now), "interrupted" (resumable),
                                         "complete" or "corrupted".
  ``.verify(run_id, full=True) -> list[str]``  problems found (sizes; sha256 when ``full``); [] if fine.
  ``.reusable(run_id, config) -> (manifest | None, message)``  a complete run whose stored config equals
                                         ``config``, else None and why it is recomputed (any collection).
  ``.open_run(run_id, manifest) -> RunWriter``  write a run (``finish(arrays, json_files)`` commits it).
  ``.delete(run_id) -> bool``
Module-level ``list_runs()``, ``load(run_id)``, ``delete(run_id)`` use the default store.

``RunResults`` (what pages read; cheap to create, arrays are read lazily and cached):
  ``.run_id``, ``.manifest`` (dict), ``.config`` (dict: the full collection config), ``.modules``
  (list[ModuleInfo]), ``.module_names``, ``.top_k``
  ``.table`` -> pandas.DataFrame, one row per module (columns listed in ``TABLE_COLUMNS``)
  ``.samples`` -> pandas.DataFrame, one row per sample (index, set, id, category, prompt, response,
                  n_tokens, truncated, loss); safety samples first, then utility
  ``.losses(set=None)`` (n,), ``.singular_values(module, set)`` full spectrum of the batch-mean gradient,
  ``.basis(module, set, side="left")`` top-k singular vectors, ``.sample_singular_values(module, set)``
  (n_set, k), ``.sample_overlaps(module, set)`` dict(phi, top1) of (n_set,) arrays, ``.gram(module)`` (n, n),
  ``.sample_cosines(module)`` (n, n), ``.principal_angles(module)`` (k,) radians, ``.overlap_curve(module)``
  dict(n, phi (len(n), n_boot), mean, q05, q95, top1, baseline, baseline_q95) or None, ``.curve_modules``,
  ``.messages`` (notes of the collection, e.g. why it was recomputed).
  ``module`` arguments accept the HF path (``model.layers.3.mlp.down_proj``) or the short label
  (``L3.mlp.down``); ``set`` is "safety" or "utility".

Layout of a run folder (``<root>/<run_id>/``)
--------------------------------------------
``manifest.json``   run id, status ("running" until complete, then "complete"), created/updated times, full
                    config, model (source, name, identity), datasets (source, content hash, fingerprint of
                    the examples used), package versions, timings, modules, curve modules, messages, and
                    ``files``: {name: {sha256, size}} of every result file.
``samples.json``    per-sample metadata (ids, set, category, texts, kept token counts, truncation).
``table.json``      the per-module metrics table ({"columns", "data", "dtypes"}).
``*.safetensors``   arrays; tensor key = ``"<quantity>/<module HF path>"`` (see ``ARRAY_FILES``).
``work/``           checkpoints of an unfinished run (per-batch factors, per-module results).
Every file is written to a temporary name and moved into place (``os.replace``), so a crash never leaves a
half-written file under a final name; sizes and sha256 in the manifest detect later damage.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import numpy as np

from analysis.core.config import cache_dir
from analysis.engine.capture import ModuleInfo

__all__ = [
    "ARRAY_FILES", "SETS", "TABLE_COLUMNS", "RunBusy", "RunCorrupted", "RunIncomplete", "RunNotFound",
    "RunResults", "RunStore", "RunWriter", "StoreError", "delete", "list_runs", "load",
]

SETS = ("safety", "utility")
MANIFEST = "manifest.json"
SAMPLES_FILE = "samples.json"
TABLE_FILE = "table.json"
WORK = "work"
LOCK = ".lock"

#: Result files and what their tensor keys hold (``<quantity>/<module HF path>``; numbers are float64 unless
#: said otherwise; k = top_k, n = n_safety + n_utility, safety samples first).
ARRAY_FILES = {
    "spectra.safetensors": "'{set}/{m}': all singular values (descending) of the batch-mean gradient",
    "bases.safetensors": "'{set}.U/{m}' (d_out, k), '{set}.V/{m}' (d_in, k): top-k singular vectors, float32",
    "per_sample.safetensors": "'loss' (n,), 'tokens' (n,) kept rows per sample; '{set}.s/{m}' (n_set, k) top-k "
                              "singular values of each G_i; '{set}.phi/{m}', '{set}.top1/{m}' (n_set,) overlap "
                              "of sample i's top-k subspace with the set's batch top-k, and |<u1_i, u1>|",
    "gram.safetensors": "'{m}' (n, n): K_ij = <G_i, G_j>_F",
    "cross.safetensors": "'angles/{m}' (k,): principal angles (radians, ascending) between the safety and "
                         "utility top-k left subspaces",
    "curves.safetensors": "'n' (m,) subset sizes; 'phi/{m}' (m, n_boot) overlap of a random n-subset's top-k "
                          "with the full safety top-k; 'top1/{m}' (m,) mean |<u1_n, u1>| (curve modules only)",
}



def result_location(quantity: str, module: str) -> tuple[str, str]:
    """(file, tensor key) where a per-module ``quantity`` of ``analysis.engine.gradients.ModuleAnalysis`` is stored."""
    if quantity in SETS:
        return "spectra.safetensors", f"{quantity}/{module}"
    if quantity.endswith((".U", ".V")):
        return "bases.safetensors", f"{quantity}/{module}"
    if quantity.endswith((".s", ".phi", ".top1")) and quantity.split(".")[0] in SETS:
        return "per_sample.safetensors", f"{quantity}/{module}"
    if quantity == "gram":
        return "gram.safetensors", module
    if quantity == "angles":
        return "cross.safetensors", f"angles/{module}"
    if quantity in ("curve.phi", "curve.top1"):
        return "curves.safetensors", f"{quantity.split('.')[1]}/{module}"
    raise KeyError(f"no storage location for quantity {quantity!r}")


ETAS = (0.5, 0.8, 0.9, 0.95, 0.99)
_SET_METRICS = (
    ["s1", "frobenius", "top1_energy", "effective_rank", "stable_rank", "participation_ratio"]
    + [f"k{round(eta * 100)}" for eta in ETAS]
    + ["sample_phi_mean", "sample_top1_mean", "gram_effective_rank"]
)
#: Columns of ``RunResults.table`` (one row per module). ``{set}_k90`` = k@eta=0.9 etc.; ``cosine_su`` =
#: cos(G_safety, G_utility); ``phi_su`` = overlap of the two top-k left subspaces, ``phi_baseline`` = k/d_out
#: (and the 5-95% band of random subspaces); ``angle_su_min`` radians; ``cross_cos_*`` over the n_s x n_u
#: per-sample cosines from the Gram; ``gram_phi_su`` = overlap of the two sample spans; ``route`` = Gram route.
TABLE_COLUMNS = (
    ["module", "label", "layer", "kind", "d_out", "d_in", "route"]
    + [f"{s}_{m}" for s in SETS for m in _SET_METRICS]
    + ["cosine_su", "phi_su", "phi_baseline", "phi_baseline_q05", "phi_baseline_q95", "angle_su_min",
       "cross_cos_mean", "cross_cos_frac_negative", "gram_phi_su", "has_curve"]
)


class StoreError(RuntimeError):
    """Base class of store problems; the message says what to do."""


class RunNotFound(StoreError):
    pass


class RunIncomplete(StoreError):
    pass


class RunCorrupted(StoreError):
    pass


class RunBusy(StoreError):
    """Another collection (this or another process) is writing the run right now."""


# --------------------------------------------------------------------------------------------------
# atomic files
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def atomic_write_bytes(path: Path, data: bytes, sync: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place (creates the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    with open(temporary, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=False, default=json_default).encode())


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars/arrays and torch tensors as plain JSON."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(value: Any) -> Any:
    """A copy of nested dicts/lists with NaN/inf floats replaced by None (strict JSON ``null``)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def atomic_save_arrays(path: Path, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save numpy arrays or torch tensors as one safetensors file, atomically (temp + os.replace)."""
    from safetensors.numpy import save_file

    plain = {key: np.ascontiguousarray(_to_numpy(value)) for key, value in arrays.items()}
    temporary = _temporary(path)
    save_file(plain, str(temporary), metadata=dict(metadata) if metadata else None)
    os.replace(temporary, path)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def safetensors_intact(path: Path) -> bool:
    """True if ``path`` is a complete safetensors file (header parses, data size matches the header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > size - 8:
                return False
            header = json.loads(handle.read(header_size))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return size == 8 + header_size + end
    except (OSError, ValueError, KeyError, struct.error):
        return False


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------------------

_LOCKS_HELD: set[str] = set()
_LOCKS_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """Runs on disk under ``root`` (default ``cache_dir() / "runs"``); see the module docstring."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "runs"

    def path(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise RunNotFound(f"invalid run id {run_id!r}")
        return self.root / run_id

    def manifest(self, run_id: str) -> dict:
        path = self.path(run_id) / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunNotFound(f"run {run_id} does not exist in {self.root}") from None
        except (OSError, ValueError) as error:
            raise RunCorrupted(f"run {run_id}: manifest.json is unreadable ({error}); delete and recompute") from None

    def verify(self, run_id: str, full: bool = True) -> list[str]:
        """Problems with a complete run's files: missing, wrong size, and (``full``) wrong sha256."""
        manifest = self.manifest(run_id)
        folder = self.path(run_id)
        problems = []
        for name, info in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != info["size"]:
                problems.append(f"{name} has {path.stat().st_size} bytes, expected {info['size']} (truncated?)")
            elif full and file_sha256(path) != info["sha256"]:
                problems.append(f"{name} has a wrong sha256 (damaged)")
        return problems

    def status(self, run_id: str) -> str:
        """"missing"; "running" (being collected now, by this or another live process); "interrupted"
        (started, not finished, nobody collecting: collect the same config to resume); "complete"; or
        "corrupted" (a file is missing or has the wrong size, or the manifest is unreadable)."""
        try:
            manifest = self.manifest(run_id)
        except RunNotFound:
            return "missing"
        except RunCorrupted:
            return "corrupted"
        if manifest.get("status") != "complete":
            return "running" if self._locked(run_id) else "interrupted"
        return "corrupted" if self.verify(run_id, full=False) else "complete"

    def reusable(self, run_id: str, config: Any) -> tuple[dict | None, str]:
        """(manifest, "") of a complete, intact run whose stored ``manifest["config"]`` equals ``config``
        (compared as JSON); else (None, why it is recomputed: "" when there is no run). Results of a
        different config are never mixed in, whatever the folder is called."""
        status = self.status(run_id)
        if status == "missing":
            return None, ""
        if status != "complete":
            return None, f"the stored run {run_id} is {status}; computing it afresh"
        manifest = self.manifest(run_id)
        wanted = json.loads(json.dumps(config, default=json_default))
        if manifest.get("config") != wanted:
            return None, (f"the stored run {run_id} was computed with a different configuration (or by an older "
                          "version); computing it afresh instead of mixing results")
        return manifest, ""

    def load(self, run_id: str, verify: bool = False) -> RunResults:
        """Results of a complete run; checks file sizes (and sha256 with ``verify``)."""
        manifest = self.manifest(run_id)
        if manifest.get("status") != "complete":
            raise RunIncomplete(f"run {run_id} is not complete (status {manifest.get('status')!r}); "
                                "collect it again with the same settings to resume")
        problems = self.verify(run_id, full=verify)
        if problems:
            raise RunCorrupted(f"run {run_id} is damaged: {'; '.join(problems)}. Collect it again to recompute.")
        return RunResults(self.path(run_id), manifest)

    def delete(self, run_id: str) -> bool:
        """Remove a run folder; False if it did not exist. Refuses while a live collection holds it."""
        folder = self.path(run_id)
        if not folder.exists():
            return False
        self._check_unlocked(run_id)
        shutil.rmtree(folder)
        return True

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def list_runs(self):
        """pandas.DataFrame of all runs, newest first (see the module docstring for the columns)."""
        import pandas as pd

        rows = []
        for run_id in self.run_ids():
            try:
                m = self.manifest(run_id)
            except StoreError:
                rows.append({"run_id": run_id, "status": "corrupted"})
                continue
            config = m.get("config", {})
            rows.append({
                "run_id": run_id,
                "status": self.status(run_id),
                "created": m.get("created"),
                "model": m.get("model", {}).get("name"),
                "safety": config.get("safety"),
                "utility": config.get("utility"),
                "n_safety": config.get("n_safety"),
                "n_utility": config.get("n_utility"),
                "n_modules": len(m.get("modules", [])),
                "top_k": config.get("top_k"),
                "size_mb": round(_folder_size(self.path(run_id)) / 2**20, 2),
            })
        columns = ["run_id", "status", "created", "model", "safety", "utility", "n_safety", "n_utility",
                   "n_modules", "top_k", "size_mb"]
        frame = pd.DataFrame(rows, columns=columns)
        return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)

    # -- writing ------------------------------------------------------------------------------------

    def _lock_path(self, run_id: str) -> Path:
        return self.path(run_id) / LOCK

    def _locked(self, run_id: str) -> str | None:
        """Who is collecting the run right now ("this process" / "process <pid>"), or None."""
        with _LOCKS_GUARD:
            if str(self.path(run_id)) in _LOCKS_HELD:
                return "this process"
        try:
            pid = int(self._lock_path(run_id).read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return f"process {pid}" if pid and pid != os.getpid() and _pid_alive(pid) else None

    def _check_unlocked(self, run_id: str) -> None:
        owner = self._locked(run_id)
        if owner:
            raise RunBusy(f"run {run_id} is being collected right now by {owner}")

    def open_run(self, run_id: str, manifest: dict) -> RunWriter:
        """Start a run, or resume an unfinished one with the same id; returns its writer (holds a lock).

        ``manifest`` is the initial manifest (config, model, datasets, modules ...); on resume the stored
        one is kept. A complete run must be deleted first.
        """
        folder = self.path(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        self._check_unlocked(run_id)
        key = str(folder)
        with _LOCKS_GUARD:
            if key in _LOCKS_HELD:
                raise RunBusy(f"run {run_id} is being collected right now by this process")
            _LOCKS_HELD.add(key)
        try:
            atomic_write_bytes(self._lock_path(run_id), str(os.getpid()).encode(), sync=False)
            try:
                existing = self.manifest(run_id)
            except StoreError:
                existing = None
            if existing is not None and existing.get("status") == "complete":
                raise StoreError(f"run {run_id} is complete; delete it before collecting it again")
            if existing is None:
                manifest = dict(manifest, run_id=run_id, status="running", created=_now(), updated=_now(),
                                files={}, resumed=0)
            else:
                manifest = dict(existing, resumed=existing.get("resumed", 0) + 1, updated=_now())
            (folder / WORK).mkdir(exist_ok=True)
            for leftover in list(folder.glob(".*.tmp*")) + list((folder / WORK).glob(".*.tmp*")):
                leftover.unlink(missing_ok=True)  # half-written files of a killed collection
            writer = RunWriter(self, run_id, manifest)
            writer.write_manifest()
            return writer
        except BaseException:
            with _LOCKS_GUARD:
                _LOCKS_HELD.discard(key)
            raise


class RunWriter:
    """Writes one run: per-batch and per-module checkpoints in ``work/``, then the final files."""

    def __init__(self, store: RunStore, run_id: str, manifest: dict):
        self.store = store
        self.run_id = run_id
        self.folder = store.path(run_id)
        self.work = self.folder / WORK
        self.manifest = manifest
        self._closed = False

    def write_manifest(self, **updates: Any) -> None:
        self.manifest.update(updates, updated=_now())
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    # checkpoints
    def batch_path(self, index: int) -> Path:
        return self.work / f"batch_{index:05d}.safetensors"

    def module_path(self, index: int) -> Path:
        return self.work / f"module_{index:05d}.safetensors"

    def has_batch(self, index: int) -> bool:
        return safetensors_intact(self.batch_path(index))

    def has_module(self, index: int) -> bool:
        return safetensors_intact(self.module_path(index))

    def save_batch(self, index: int, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
        atomic_save_arrays(self.batch_path(index), arrays, metadata)

    def save_module(self, index: int, arrays: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        atomic_save_arrays(self.module_path(index), arrays, {"info": json.dumps(info, default=json_default)})

    def load_module(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
        from safetensors import safe_open

        with safe_open(str(self.module_path(index)), framework="np") as handle:
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
            info = json.loads(handle.metadata()["info"])
        return arrays, info

    def finish(self, arrays: Mapping[str, Mapping[str, Any]], json_files: Mapping[str, Any],
               keep_work: bool = False, **manifest_updates: Any) -> None:
        """Write the final files (atomically), record their sha256 and size, mark the run complete."""
        files = {}
        for name, content in arrays.items():
            atomic_save_arrays(self.folder / name, content)
        for name, value in json_files.items():
            atomic_write_json(self.folder / name, value)
        for name in list(arrays) + list(json_files):
            path = self.folder / name
            files[name] = {"sha256": file_sha256(path), "size": path.stat().st_size}
        self.write_manifest(files=files, status="complete", **manifest_updates)  # the commit point
        if not keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    def close(self) -> None:
        """Release the lock (the run stays resumable if it is not complete)."""
        if self._closed:
            return
        self._closed = True
        try:
            (self.folder / LOCK).unlink(missing_ok=True)
        finally:
            with _LOCKS_GUARD:
                _LOCKS_HELD.discard(str(self.folder))

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# reading results
# --------------------------------------------------------------------------------------------------


class RunResults:
    """Read access to a complete run (see the module docstring). Arrays are numpy, read lazily."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest
        self.run_id: str = manifest["run_id"]
        self.config: dict = manifest["config"]
        self.top_k: int = int(self.config["top_k"])
        self.modules = [ModuleInfo(**m) for m in manifest["modules"]]
        self.module_names = [m.name for m in self.modules]
        self._by_label = {m.label: m.name for m in self.modules}
        self._handles: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self.messages: list[str] = list(manifest.get("messages", []))

    def __repr__(self) -> str:
        return (f"RunResults({self.run_id}: {len(self.modules)} modules, {self.config.get('n_safety')} safety + "
                f"{self.config.get('n_utility')} utility samples)")

    # helpers
    def module_name(self, module: str | ModuleInfo) -> str:
        """HF path of a module given as HF path, short label or ModuleInfo (KeyError if not in the run)."""
        name = module.name if isinstance(module, ModuleInfo) else self._by_label.get(module, module)
        if name not in self.module_names:
            raise KeyError(f"module {module!r} is not in run {self.run_id}")
        return name

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="np")
        return self._handles[name]

    def _array(self, file: str, key: str) -> np.ndarray:
        handle = self._file(file)
        try:
            return handle.get_tensor(key)
        except Exception:  # safetensors raises its own error type for a missing key
            raise KeyError(f"{file} has no array {key!r}") from None

    @staticmethod
    def _check_set(which: str) -> str:
        if which not in SETS:
            raise ValueError(f"set must be one of {SETS}, not {which!r}")
        return which

    # tables
    @property
    def table(self):
        """Per-module metrics (pandas.DataFrame, columns ``TABLE_COLUMNS``), in model order."""
        import pandas as pd

        if "table" not in self._cache:
            data = json.loads((self.folder / TABLE_FILE).read_text())
            frame = pd.DataFrame(data["data"], columns=data["columns"])
            for column, dtype in data.get("dtypes", {}).items():
                if dtype != "object" and not dtype.startswith(("str", "string")):
                    frame[column] = frame[column].astype("float64" if frame[column].isna().any() else dtype)
            self._cache["table"] = frame
        return self._cache["table"]

    @property
    def samples(self):
        """Per-sample metadata (pandas.DataFrame): index, set, id, category, prompt, response, n_tokens,
        truncated, loss. Safety samples first; row i matches row/column i of ``gram(m)``."""
        import pandas as pd

        if "samples" not in self._cache:
            frame = pd.DataFrame(json.loads((self.folder / SAMPLES_FILE).read_text()))
            frame["loss"] = self._array("per_sample.safetensors", "loss")
            self._cache["samples"] = frame
        return self._cache["samples"]

    def set_slice(self, which: str) -> slice:
        """Rows of the set in sample order (safety first)."""
        n_safety = int(self.config["n_safety"])
        return slice(0, n_safety) if self._check_set(which) == "safety" else slice(n_safety, None)

    # arrays
    def losses(self, which: str | None = None) -> np.ndarray:
        losses = self._array("per_sample.safetensors", "loss")
        return losses if which is None else losses[self.set_slice(which)]

    def singular_values(self, module: str, which: str) -> np.ndarray:
        """All singular values (descending) of the set's batch-mean gradient of ``module``."""
        return self._array("spectra.safetensors", f"{self._check_set(which)}/{self.module_name(module)}")

    def basis(self, module: str, which: str, side: str = "left") -> np.ndarray:
        """Top-k left (d_out, k) or right (d_in, k) singular vectors of the set's batch-mean gradient."""
        letter = {"left": "U", "right": "V"}[side]
        return self._array("bases.safetensors", f"{self._check_set(which)}.{letter}/{self.module_name(module)}")

    def sample_singular_values(self, module: str, which: str) -> np.ndarray:
        """(n_set, k) top-k singular values of every sample's G_i (zeros beyond its rank)."""
        return self._array("per_sample.safetensors", f"{self._check_set(which)}.s/{self.module_name(module)}")

    def sample_overlaps(self, module: str, which: str) -> dict[str, np.ndarray]:
        """dict(phi, top1): (n_set,) single-sample overlap with the set's top-k and |<u1_i, u1>|."""
        name = self.module_name(module)
        which = self._check_set(which)
        return {"phi": self._array("per_sample.safetensors", f"{which}.phi/{name}"),
                "top1": self._array("per_sample.safetensors", f"{which}.top1/{name}")}

    def gram(self, module: str) -> np.ndarray:
        """(n, n) Gram matrix K_ij = <G_i, G_j>_F of all samples (safety first)."""
        return self._array("gram.safetensors", self.module_name(module))

    def sample_cosines(self, module: str) -> np.ndarray:
        """(n, n) cosines between per-sample gradients, from the Gram matrix."""
        from analysis.engine.geometry import gram_cosines

        return gram_cosines(self.gram(module))

    def principal_angles(self, module: str) -> np.ndarray:
        """Principal angles (radians, ascending) between the safety and utility top-k left subspaces."""
        return self._array("cross.safetensors", f"angles/{self.module_name(module)}")

    @property
    def curve_modules(self) -> list[str]:
        """Modules that have an overlap-vs-n curve (HF paths)."""
        return list(self.manifest.get("curve_modules", []))

    def overlap_curve(self, module: str) -> dict[str, np.ndarray] | None:
        """dict(n, phi (len(n), n_boot), mean, q05, q95, top1, baseline) or None if not computed."""
        name = self.module_name(module)
        if name not in self.curve_modules:
            return None
        phi = self._array("curves.safetensors", f"phi/{name}")
        row = self.table.set_index("module").loc[name]
        return {"n": self._array("curves.safetensors", "n"), "phi": phi, "mean": phi.mean(axis=1),
                "q05": np.quantile(phi, 0.05, axis=1), "q95": np.quantile(phi, 0.95, axis=1),
                "top1": self._array("curves.safetensors", f"top1/{name}"),
                "baseline": float(row["phi_baseline"]), "baseline_q95": float(row["phi_baseline_q95"])}

    def close(self) -> None:
        self._handles.clear()


# --------------------------------------------------------------------------------------------------
# default-store shortcuts
# --------------------------------------------------------------------------------------------------


def list_runs():
    """:meth:`RunStore.list_runs` of the default store."""
    return RunStore().list_runs()


def load(run_id: str) -> RunResults:
    """:meth:`RunStore.load` of the default store."""
    return RunStore().load(run_id)


def delete(run_id: str) -> bool:
    """:meth:`RunStore.delete` of the default store."""
    return RunStore().delete(run_id)
