"""Results on disk, for every kind of run: one folder per run under a root, a manifest, atomic checksummed files.

A generic store: it knows manifests, files, locks and statuses, never what a run computes. Each domain owns
its results class and its listing columns (the collection's: :class:`analysis.engine.results.CollectionStore`;
evaluations, fine-tuning runs, defence grids and "why" runs use a ``RunStore`` on their own root).

Public API
----------
``RunStore(root=None)``          the store; ``root`` defaults to ``cache_dir() / RunStore.folder`` (tests pass a tmp dir).
  ``.list_runs(columns=None) -> pandas.DataFrame``  one row per run: run_id, status, created, the caller's
                                         ``columns`` ({name: function of the manifest}), size_mb (newest first).
  ``.load(run_id) -> results``           a complete run, read by ``.read(folder, manifest)`` (a domain's store
                                         returns its results class; the generic one a :class:`StoredRun`);
                                         raises ``RunNotFound`` / ``RunIncomplete`` / ``RunCorrupted`` clearly.
  ``.status(run_id) -> str``            "missing", "running" (being written now), "interrupted" (resumable),
                                         "complete" or "corrupted".
  ``.verify(run_id, full=True) -> list[str]``  problems found (sizes; sha256 when ``full``); [] if fine.
  ``.reusable(run_id, config) -> (manifest | None, message)``  a complete run whose stored config equals
                                         ``config``, else None and why it is recomputed.
  ``.open_run(run_id, manifest) -> RunWriter``  write a run (``finish(arrays, json_files)`` commits it).
  ``.delete(run_id) -> bool``

Layout of a run folder (``<root>/<run_id>/``)
--------------------------------------------
``manifest.json``   run id, status ("running" until complete, then "complete"), created/updated times, full
                    config, what the domain records (model, datasets, versions, timings ...), and
                    ``files``: {name: {sha256, size}} of every result file.
result files        written by ``RunWriter.finish`` (JSON and safetensors; the domain documents its own).
``work/``           checkpoints of an unfinished run (e.g. the collection's per-batch factors).
Every file is written to a temporary name and moved into place (``os.replace``), so a crash never leaves a
half-written file under a final name; sizes and sha256 in the manifest detect later damage.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from analysis.core.config import InputError, cache_dir

__all__ = [
    "RunBusy", "RunCorrupted", "RunIncomplete", "RunNotFound", "RunStore", "RunWriter", "StoreError", "StoredRun",
    "atomic_save_arrays", "atomic_write_bytes", "atomic_write_json", "file_sha256", "finite_or_none",
    "json_default", "manifest_problem", "safetensors_intact", "valid_id",
]

MANIFEST = "manifest.json"
WORK = "work"
LOCK = ".lock"
#: How long a writer retries a lock that is taken (a reader's status probe holds it for microseconds).
LOCK_WAIT_SECONDS = 1.0
_TEMPORARY_PID = re.compile(r"\.tmp(\d+)\.\d+$")


class StoreError(RuntimeError, InputError):
    """Base class of store problems; the message says what to do. An
    :class:`~analysis.core.config.InputError`: commands print it and exit 2, pages show it."""


class RunNotFound(StoreError):
    pass


class RunIncomplete(StoreError):
    pass


class RunCorrupted(StoreError):
    pass


class RunBusy(StoreError):
    """Another writer (this or another process) holds the run right now; the message names its PID."""


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
    """``json.dumps(..., default=json_default)``: numpy scalars/arrays and torch tensors as plain JSON.

    (numpy is imported inside the functions of this module: a queued job's worker waits without it.)"""
    import numpy as np

    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray) or type(value).__name__ == "Tensor":
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def finite_or_none(value: Any) -> Any:
    """A copy of nested dicts/lists with NaN/inf floats replaced by None (strict JSON ``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def atomic_save_arrays(path: Path, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """Save numpy arrays or torch tensors as one safetensors file, atomically (temp + os.replace).

    Every dtype is kept as it is, bfloat16 included (numpy has none: a file with a bfloat16 tensor is
    written through ``safetensors.torch``; read it back with ``safe_open(..., framework="pt")``)."""
    temporary = _temporary(path)
    meta = dict(metadata) if metadata else None
    if any(_numpy_cannot_hold(value) for value in arrays.values()):
        from safetensors.torch import save_file as save_torch

        save_torch(_as_torch(arrays), str(temporary), metadata=meta)
    else:
        import numpy as np
        from safetensors.numpy import save_file

        save_file({key: np.ascontiguousarray(_to_numpy(value)) for key, value in arrays.items()},
                  str(temporary), metadata=meta)
    os.replace(temporary, path)


def _to_numpy(value: Any) -> Any:
    """A numpy array of a numpy array, list or torch tensor."""
    import numpy as np

    if hasattr(value, "detach"):  # torch tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _numpy_cannot_hold(value: Any) -> bool:
    """True for a torch tensor of a dtype numpy lacks (bfloat16, float8)."""
    return hasattr(value, "detach") and str(value.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn",
                                                              "torch.float8_e5m2")


def _as_torch(arrays: Mapping[str, Any]) -> dict:
    """CPU, contiguous, storage-disjoint torch tensors (safetensors.torch refuses shared storage)."""
    import torch

    out, seen = {}, set()
    for key, value in arrays.items():
        tensor = value.detach().cpu() if hasattr(value, "detach") else torch.from_numpy(_to_numpy(value).copy())
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if pointer is not None and pointer in seen:
            tensor = tensor.clone()
        elif pointer is not None:
            seen.add(pointer)
        out[key] = tensor
    return out


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


def process_alive(pid: int | None, marker: str = "") -> bool:
    """True if process ``pid`` exists, is not a zombie and (on Linux) has ``marker`` in its command line."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X") and marker in command
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()


@dataclasses.dataclass
class StoredRun:
    """A complete run as the generic store reads it: its ``folder`` and ``manifest`` (a domain's results class
    adds its own accessors)."""

    folder: Path
    manifest: dict

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]


_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}")
#: What a run or job id may be, in words (ids name folders: nothing that leaves the store).
ID_RULE = "ids are letters, digits, '_', '.', '+', '=' and '-', at most 200, not starting with '.' or '-'"


def valid_id(value: Any) -> bool:
    """True if ``value`` may name a run or job folder (one plain folder name inside its store: see ID_RULE)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def manifest_problem(manifest: Any) -> str | None:
    """What is wrong with the shape of a parsed manifest (valid JSON need not be a manifest), or None.

    Checked: a JSON object; ``status`` a string; ``config``, ``model``, ``datasets`` objects and ``modules`` a
    list where present; ``files`` an object of {name: {"size": int >= 0, "sha256": 64 hex chars}}, names
    relative paths inside the run folder (e.g. ``model/config.json``; nothing hidden, no "..")."""
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    if not isinstance(manifest.get("status", ""), str):
        return "status is not a string"
    for key, kind in (("config", dict), ("model", dict), ("datasets", dict), ("modules", list)):
        if key in manifest and not isinstance(manifest[key], kind):
            return f"{key} is not a JSON {'object' if kind is dict else 'list'}"
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        return "files is not a JSON object"
    for name, info in files.items():
        if not name or "\\" in name or any(not part or part.startswith(".") for part in name.split("/")):
            return f"file name {name!r} is not a file inside the run folder"
        if not isinstance(info, dict):
            return f"the entry of {name} is not a JSON object"
        size, sha = info.get("size"), info.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"{name} has no valid size"
        if not isinstance(sha, str) or len(sha) != 64:
            return f"{name} has no valid sha256"
    return None


def _writer_alive(pid: int) -> bool:
    """True if ``pid`` is a live user process (kernel threads, with an empty command line, write no files)."""
    try:
        if not Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
    except OSError:
        if Path("/proc").is_dir():
            return False
    return process_alive(pid)


class RunStore:
    """Runs on disk under ``root`` (default ``cache_dir() / folder``); see the module docstring."""

    #: Sub-folder of ``cache_dir()`` that a store of this class uses by default.
    folder = "runs"

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / self.folder

    def read(self, folder: Path, manifest: dict) -> Any:
        """The results object of a complete, verified run (a domain's store overrides this)."""
        return StoredRun(folder, manifest)

    def path(self, run_id: str) -> Path:
        if not valid_id(run_id):
            raise RunNotFound(f"invalid run id {run_id!r}: {ID_RULE}")
        return self.root / run_id

    def manifest(self, run_id: str) -> dict:
        path = self.path(run_id) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunNotFound(f"run {run_id} does not exist in {self.root}") from None
        except (OSError, ValueError) as error:
            raise RunCorrupted(f"run {run_id}: manifest.json is unreadable ({error}); delete and recompute") from None
        problem = manifest_problem(manifest)
        if problem:
            raise RunCorrupted(f"run {run_id}: manifest.json is damaged ({problem}); delete it, or collect the same "
                               "settings again to recompute it")
        return manifest

    def verify(self, run_id: str, full: bool = True) -> list[str]:
        """Problems with a complete run's files: missing, wrong size, and (``full``) wrong sha256."""
        manifest = self.manifest(run_id)
        folder = self.path(run_id)
        problems = []
        for name, info in manifest.get("files", {}).items():  # (shape checked by manifest())
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

    def load(self, run_id: str, verify: bool = False) -> Any:
        """Results of a complete run; checks file sizes (and sha256 with ``verify``)."""
        manifest = self.manifest(run_id)
        if manifest.get("status") != "complete":
            raise RunIncomplete(f"run {run_id} is not complete (status {manifest.get('status')!r}); "
                                "collect it again with the same settings to resume")
        problems = self.verify(run_id, full=verify)
        if problems:
            raise RunCorrupted(f"run {run_id} is damaged: {'; '.join(problems)}. Collect it again to recompute.")
        return self.read(self.path(run_id), manifest)

    def delete(self, run_id: str) -> bool:
        """Remove a run folder; False if it did not exist. Refuses while a live collection holds it."""
        folder = self.path(run_id)
        if not folder.exists():
            return False
        if not folder.is_dir():
            raise RunCorrupted(f"{folder} is a file, not a run folder: remove it by hand")
        fd = self._acquire(run_id)
        try:
            shutil.rmtree(folder)
        finally:
            self._release(run_id, fd)
        return True

    def run_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def list_runs(self, columns: Mapping[str, Callable[[dict], Any]] | None = None):
        """pandas.DataFrame of all runs, newest first: run_id, status, created, one column per entry of
        ``columns`` ({name: function of the run's manifest}), size_mb. A run whose manifest cannot be read is
        listed as "corrupted" (its other columns empty)."""
        import pandas as pd

        columns = dict(columns or {})
        rows = []
        for run_id in self.run_ids():
            try:
                manifest = self.manifest(run_id)
            except StoreError:
                rows.append({"run_id": run_id, "status": "corrupted"})
                continue
            row = {"run_id": run_id, "status": self.status(run_id), "created": manifest.get("created")}
            row.update({name: column(manifest) for name, column in columns.items()})
            row["size_mb"] = round(_folder_size(self.path(run_id)) / 2**20, 2)
            rows.append(row)
        frame = pd.DataFrame(rows, columns=["run_id", "status", "created", *columns, "size_mb"])
        return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)

    # -- writing ------------------------------------------------------------------------------------

    def _lock_path(self, run_id: str) -> Path:
        return self.path(run_id) / LOCK

    def _holder(self, run_id: str) -> str:
        """Who the lock file says holds the run ("PID 123 since 16:50:01"), for messages."""
        try:
            info = json.loads(self._lock_path(run_id).read_text() or "{}")
            pid, since = int(info["pid"]), str(info.get("since", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"
        return f"PID {pid}" + (f" (since {since[11:19] or since})" if since else "")

    def _busy(self, run_id: str, owner: str) -> RunBusy:
        return RunBusy(f"run {run_id} is already being {self._verb(run_id)} by {owner}: wait for it to finish, "
                       "or cancel that job (Ctrl-C in its terminal, or Cancel on its page) and run this again")

    def _verb(self, run_id: str) -> str:
        try:
            kind = json.loads((self.path(run_id) / MANIFEST).read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        return "collected" if kind in (None, "collect") else "computed"

    def _locked(self, run_id: str) -> str | None:
        """Who is writing the run right now ("this process" / "PID <pid> ..."), or None.

        The writer holds an exclusive ``flock`` on ``<run>/.lock`` for its whole lifetime; the OS drops it when
        the writer's process ends, however it ends, so a stale PID in the file (even one reused by another
        live process) never blocks the run. Probing takes a shared lock for a moment (no file is created)."""
        with _LOCKS_GUARD:
            if str(self.path(run_id)) in _LOCKS_HELD:
                return "this process"
        try:
            fd = os.open(self._lock_path(run_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._holder(run_id)
        except OSError:
            return None
        finally:
            os.close(fd)  # (closing releases the probe's shared lock)
        return None

    def _check_unlocked(self, run_id: str) -> None:
        owner = self._locked(run_id)
        if owner:
            raise self._busy(run_id, owner)

    def _acquire(self, run_id: str) -> int:
        """Take the run's exclusive OS lock (creating the folder); returns the lock file's descriptor, held
        until :meth:`_release`. Raises RunBusy naming the holder's PID. A reader's probe holds the lock for
        microseconds, so a taken lock is retried for up to LOCK_WAIT_SECONDS before the run counts as busy."""
        folder, path = self.path(run_id), self._lock_path(run_id)
        with _LOCKS_GUARD:
            if str(folder) in _LOCKS_HELD:
                raise self._busy(run_id, "this process")
            _LOCKS_HELD.add(str(folder))
        try:
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while True:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError):
                    raise StoreError(f"cannot make the run folder {folder}: a file stands where a folder should "
                                     "be (there or above it); move that file away") from None
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    if time.monotonic() > deadline:
                        raise self._busy(run_id, self._holder(run_id)) from None
                    time.sleep(0.02)
                    continue
                except BaseException:
                    os.close(fd)
                    raise
                try:  # the folder may have been deleted (and made again) between open and flock
                    current = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": _now()}).encode(), 0)
                return fd
        except BaseException:
            with _LOCKS_GUARD:
                _LOCKS_HELD.discard(str(folder))
            raise

    def _release(self, run_id: str, fd: int) -> None:
        """Give the lock back (the file stays: removing it would let two writers lock two different files)."""
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)
        finally:
            with _LOCKS_GUARD:
                _LOCKS_HELD.discard(str(self.path(run_id)))

    def _remove_dead_temporaries(self, folder: Path) -> None:
        """Half-written files (``.<name>.tmp<pid>.<thread>``) of writers that are gone; a live process's are kept."""
        for leftover in list(folder.glob(".*.tmp*")) + list((folder / WORK).glob(".*.tmp*")):
            match = _TEMPORARY_PID.search(leftover.name)
            pid = int(match.group(1)) if match else None
            if pid is not None and pid != os.getpid() and _writer_alive(pid):
                continue
            leftover.unlink(missing_ok=True)

    def open_run(self, run_id: str, manifest: dict) -> RunWriter:
        """Start a run, or resume an unfinished one with the same id; returns its writer, which holds the
        run's exclusive OS lock until ``close()`` (RunBusy, naming the holder's PID, if another writer has it).

        ``manifest`` is the initial manifest (config, model, datasets, modules ...); on resume the stored
        one is kept. A complete run must be deleted first.
        """
        folder = self.path(run_id)
        fd = self._acquire(run_id)
        try:
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
            self._remove_dead_temporaries(folder)
            writer = RunWriter(self, run_id, manifest, lock_fd=fd)
            writer.write_manifest()
            return writer
        except BaseException:
            self._release(run_id, fd)
            raise


class RunWriter:
    """Writes one run: per-batch and per-module checkpoints in ``work/``, then the final files."""

    def __init__(self, store: RunStore, run_id: str, manifest: dict, lock_fd: int | None = None):
        self.store = store
        self._lock_fd = lock_fd
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

    def load_module(self, index: int) -> tuple[dict[str, Any], dict]:
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
        if self._lock_fd is not None:
            self.store._release(self.run_id, self._lock_fd)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
