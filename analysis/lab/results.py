"""Reading fine-tuning runs: one run folder (:class:`FinetuneResults`: manifest, live history, evaluations,
SPF's removed shares, the fine-tuned model), the stored runs, and comparison tables (Qi et al. style)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from analysis.core.config import cache_dir
from analysis.core.store import RunStore


def _settings_text(config: Mapping[str, Any]) -> str:
    """The settings text of a stored run's defence (``Defence.settings_text``: SPF's mode, k, R ...; PCGrad's R
    and safety signal), "" for none or an unregistered defence. Shown in the column named ``spf``."""
    from analysis.lab.defences import UnknownDefence, get

    try:
        return get(config.get("method", "")).settings_text(config)
    except (UnknownDefence, KeyError):
        return ""


def finetune_root(root: str | Path | None = None) -> Path:
    """The fine-tuning run store's folder: ``root`` or ``cache_dir()/"finetune"``."""
    return Path(root) if root is not None else cache_dir() / "finetune"


def finetune_store(root: str | Path | None = None) -> RunStore:
    return RunStore(finetune_root(root))


class FinetuneResults:
    """Read access to a fine-tuning run folder (complete, or in progress: ``history`` is live)."""

    def __init__(self, folder: str | Path, manifest: dict | None = None):
        self.folder = Path(folder)
        self.manifest = manifest if manifest is not None else json.loads((self.folder / "manifest.json").read_text())
        self.run_id: str = self.manifest["run_id"]
        self.config: dict = self.manifest["config"]
        self.cached = False

    def __repr__(self) -> str:
        return f"FinetuneResults({self.run_id}, {self.status})"

    @property
    def status(self) -> str:
        return self.manifest.get("status", "running")

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def history(self):
        import pandas as pd

        path = self.folder / "history.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        frame = pd.DataFrame(rows)
        return frame.astype({c: float for c in frame.columns if c not in ("step",)}, errors="ignore")

    @property
    def evals(self) -> list[dict]:
        path = self.folder / "evals.json"
        return json.loads(path.read_text()) if path.is_file() else []

    @property
    def initial_eval(self) -> dict | None:
        evals = self.evals
        return evals[0]["metrics"] if evals else None

    @property
    def final_eval(self) -> dict | None:
        evals = [e for e in self.evals if e.get("final")]
        return evals[-1]["metrics"] if evals else None

    def category_table(self, which: str = "harmful"):
        """pandas DataFrame: per category, n and the initial and final rate (ASR for harmful, over-refusal
        for benign) under the Qi keyword list."""
        import pandas as pd

        key = "asr_qi" if which == "harmful" else "over_refusal_qi"
        rows: dict[str, dict] = {}
        for label, metrics in (("initial", self.initial_eval), ("final", self.final_eval)):
            for category, entry in ((metrics or {}).get(f"{which}_by_category") or {}).items():
                rows.setdefault(category, {"category": category, "n": entry["n"]})[label] = entry[key]
        return pd.DataFrame(list(rows.values()))

    def spf_removed(self):
        """pandas DataFrame (index: step, columns: module HF path) of ||removed||/||G|| per SPF step."""
        import pandas as pd
        from safetensors.numpy import load_file

        path = self.folder / "spf.safetensors"
        if not path.is_file():
            return pd.DataFrame()
        arrays = load_file(str(path))
        return pd.DataFrame(arrays["removed"], index=arrays["steps"].astype(int), columns=self.manifest["spf_modules"])

    def drift(self) -> dict | None:
        """Drift of the safety subspace during the run (see ``SPFProjector.record_drift``), or None if the run
        recorded none: {"steps" (r,), "modules" [n_modules HF paths], "cos_left" / "cos_right" (r, n_modules, k)
        principal-angle cosines of each refresh's basis vs the first one (NaN-padded)}."""
        from safetensors.numpy import load_file

        path = self.folder / "drift.safetensors"
        if not path.is_file():
            return None
        arrays = load_file(str(path))
        return {"steps": arrays["steps"].astype(int), "modules": list(self.manifest.get("drift_modules") or []),
                "cos_left": arrays["cos_left"], "cos_right": arrays["cos_right"]}

    @property
    def model_path(self) -> Path | None:
        path = self.folder / "model"
        return path if (path / "config.json").is_file() else None


def load_finetune_run(run_id: str, root: str | Path | None = None) -> FinetuneResults:
    """The stored run ``run_id`` (complete or in progress)."""
    store = finetune_store(root)
    return FinetuneResults(store.path(run_id), store.manifest(run_id))


def stored_runs(run_ids: Mapping[str, str], root: str | Path | None = None) -> dict[str, FinetuneResults]:
    """{key: its stored run} for the run ids that have a run folder (complete or not; see ``.status``)."""
    folder = finetune_root(root)
    return {key: FinetuneResults(folder / run_id) for key, run_id in run_ids.items()
            if (folder / run_id / "manifest.json").is_file()}


def list_finetune_runs(root: str | Path | None = None):
    """pandas.DataFrame, newest first: run_id, status, created, preset, method, model, spf settings, final
    ASR, utility NLL."""
    import pandas as pd

    store = finetune_store(root)
    rows = []
    for run_id in store.run_ids():
        try:
            manifest = store.manifest(run_id)
        except Exception:  # noqa: BLE001 - a damaged run is listed, not fatal
            rows.append({"run_id": run_id, "status": "corrupted"})
            continue
        config = manifest.get("config", {})
        final = manifest.get("final_metrics") or {}
        rows.append({
            "run_id": run_id, "status": store.status(run_id), "created": manifest.get("created"),
            "preset": config.get("preset"), "method": config.get("method"),
            "model": manifest.get("model", {}).get("name"),
            "spf": _settings_text(config),
            "steps": manifest.get("total_steps"), "asr": final.get("asr"), "utility_nll": final.get("utility_nll"),
        })
    columns = ["run_id", "status", "created", "preset", "method", "model", "spf", "steps", "asr", "utility_nll"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values("created", ascending=False, na_position="last").reset_index(drop=True)


def comparison_table(results: Sequence[FinetuneResults]):
    """One row per run (Qi et al. Tables 1-3 style): initial and final keyword ASR, over-refusal, NLLs."""
    import pandas as pd

    rows = []
    for result in results:
        initial, final = result.initial_eval or {}, result.final_eval or {}
        history = result.history
        rows.append({
            "run": result.config.get("preset"), "method": result.method,
            "spf": _settings_text(result.config),
            "asr_initial": initial.get("asr"), "asr_final": final.get("asr"),
            "asr_arditi_initial": initial.get("asr_arditi"), "asr_arditi_final": final.get("asr_arditi"),
            "over_refusal_initial": initial.get("over_refusal"), "over_refusal_final": final.get("over_refusal"),
            "refusal_nll_initial": initial.get("refusal_nll"), "refusal_nll_final": final.get("refusal_nll"),
            "affirmative_nll_initial": initial.get("affirmative_nll"),
            "affirmative_nll_final": final.get("affirmative_nll"),
            "utility_nll_initial": initial.get("utility_nll"), "utility_nll_final": final.get("utility_nll"),
            "spf_removed_mean": (float(history["spf_removed_mean"].mean())
                                 if "spf_removed_mean" in history and history["spf_removed_mean"].notna().any()
                                 else None),
            "train_seconds": result.manifest.get("timings", {}).get("wall_seconds"),
            "train_cpu_seconds": result.manifest.get("timings", {}).get("cpu_seconds"),
            "run_id": result.run_id,
        })
    return pd.DataFrame(rows)


def format_run(result: FinetuneResults) -> str:
    """What ``finetune`` prints for one run: keyword ASR and over-refusal before -> after fine-tuning as
    "k/n = x% [Wilson 95%]", the NLL means with their bootstrap intervals, the SPF share removed and the time."""
    from analysis.core.tasks import format_seconds
    from analysis.safety.results import mean_text, rate_text

    initial, final = result.initial_eval or {}, result.final_eval or {}
    settings = _settings_text(result.config)
    lines = [f"{result.config.get('preset')} / {result.method}{f' ({settings})' if settings else ''}, before -> after:"]
    for key, label in (("asr", "ASR (keyword)"), ("over_refusal", "over-refusal")):
        lines.append(f"  {label}: {rate_text(initial, key)} -> {rate_text(final, key)}")
    for key, label in (("refusal_nll", "refusal NLL"), ("affirmative_nll", "affirmative NLL"),
                       ("utility_nll", "utility NLL")):
        lines.append(f"  {label} (nats/token): {mean_text(initial, key)} -> {mean_text(final, key)}")
    history = result.history
    if "spf_removed_mean" in history and history["spf_removed_mean"].notna().any():
        lines.append(f"  SPF removed on average {float(history['spf_removed_mean'].mean()):.1%} of the update")
    timings = result.manifest.get("timings", {})
    lines.append(f"  fine-tuning: {format_seconds(timings.get('wall_seconds'))} wall, "
                 f"{format_seconds(timings.get('cpu_seconds'))} CPU")
    return "\n".join(lines)

