"""A collection run's results: the result files' layout, :class:`RunResults` and :class:`CollectionStore`.

``CollectionStore(root=None)``: the generic :class:`~analysis.core.store.RunStore` on ``cache_dir()/"runs"`` whose
``load`` returns :class:`RunResults` and whose ``list_runs()`` has the collection's columns (model, datasets, n,
modules, top_k, projection_dim). ``load_run(run_id)`` reads one from the default store.

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

Result files of a run folder (besides ``manifest.json``, see :mod:`analysis.core.store`):
``samples.json``    per-sample metadata (ids, set, category, texts, kept token counts, truncation).
``table.json``      the per-module metrics table ({"columns", "data", "dtypes"}).
``*.safetensors``   arrays; tensor key = ``"<quantity>/<module HF path>"`` (see ``ARRAY_FILES``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from analysis.core.store import RunStore
from analysis.llm.anatomy import ModuleInfo

__all__ = ["ARRAY_FILES", "COLLECTION_COLUMNS", "ETAS", "SAMPLES_FILE", "SETS", "TABLE_COLUMNS", "TABLE_FILE",
           "CollectionStore", "RunResults", "load_run", "result_location"]

SETS = ("safety", "utility")
SAMPLES_FILE = "samples.json"
TABLE_FILE = "table.json"

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
    "resampling.safetensors": "'boot.<stat>/{m}' (B,) bootstrap replicates, 'perm.<stat>/{m}' (P,) permutation "
                              "null, 'core.<stat>/{m}' (1,) observed, 'captured/{m}', 'utility_phi_to_safety/{m}' "
                              "(analysis.engine.resampling; runs collected with n_boot / n_perm > 0)",
    "curves.safetensors": "'n' (m,) subset sizes; 'phi/{m}' (m, n_boot) overlap of a random n-subset's top-k "
                          "with the full safety top-k; 'top1/{m}' (m,) mean |<u1_n, u1>| (curve modules only)",
}



def result_location(quantity: str, module: str) -> tuple[str, str]:
    """(file, tensor key) where a per-module ``quantity`` of ``analysis.engine.analyse.ModuleAnalysis`` is stored."""
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
    if quantity.startswith("resampling."):
        return "resampling.safetensors", f"{quantity[len('resampling.'):]}/{module}"
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


#: The columns of :meth:`CollectionStore.list_runs` beside run_id / status / created / size_mb.
COLLECTION_COLUMNS = {
    "model": lambda m: (m.get("model") or {}).get("name"),
    "safety": lambda m: (m.get("config") or {}).get("safety"),
    "utility": lambda m: (m.get("config") or {}).get("utility"),
    "n_safety": lambda m: (m.get("config") or {}).get("n_safety"),
    "n_utility": lambda m: (m.get("config") or {}).get("n_utility"),
    "n_modules": lambda m: len(m.get("modules") or []),
    "top_k": lambda m: (m.get("config") or {}).get("top_k"),
    "projection_dim": lambda m: (m.get("config") or {}).get("projection_dim"),
}


class CollectionStore(RunStore):
    """The collection runs (``cache_dir()/"runs"``): ``load`` gives :class:`RunResults`."""

    folder = "runs"

    def read(self, folder: Path, manifest: dict) -> RunResults:
        return RunResults(folder, manifest)

    def list_runs(self, columns=None):
        """The stored collections, newest first, with :data:`COLLECTION_COLUMNS` (or ``columns``)."""
        return super().list_runs(COLLECTION_COLUMNS if columns is None else columns)


def load_run(run_id: str) -> RunResults:
    """A complete collection run of the default store."""
    return CollectionStore().load(run_id)
