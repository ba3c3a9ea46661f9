"""Streamlit helpers shared by the pages: choices that survive reloads, cached model and run loading,
the collection job, figure/data download buttons, errors as messages.

Pages import this module and ``analysis``; they hold no state that is not on disk. Choices live in
``st.session_state`` under non-widget keys (widgets in a page reset when the user leaves it) and are
mirrored to ``<cache>/ui_state.json``, so a reload or a second tab starts from the last choices.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from analysis.core.config import cache_dir
from analysis.views import collection as views
from analysis.views import export

STATE_FILE = "ui_state.json"
UPLOADS = "uploads"
DEFAULT_CHOICES: dict[str, Any] = {  # a callable is asked when the choice is first needed
    "model": lambda: "default-aligned" if aligned_model_available() else "default", "run_id": None, "device": "cpu"}
CHART_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": export.PNG_SCALE}}


APP_ENTERED = "app.entered"  # session key set by app.py before it runs a page


def run_inside_app() -> None:
    """Call first in every page. Until app.py has called ``st.navigation`` once in this server process,
    Streamlit treats ``pages/`` as a legacy multipage folder: a deep link (``/finetune``) as the first request
    runs the page file alone, without app.py's layout and navigation. Leave that mode and rerun through app.py."""
    from streamlit.runtime.pages_manager import PagesManager

    if not st.session_state.get(APP_ENTERED):
        PagesManager.uses_pages_directory = False
        st.rerun()


# -------------------------------------------------------------------------------------------------
# choices (session keys mirrored on disk)
# -------------------------------------------------------------------------------------------------


def _state_path() -> Path:
    return cache_dir() / STATE_FILE


def _saved_choices() -> dict[str, Any]:
    try:
        return json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return {}


def choice(key: str, default: Any = None) -> Any:
    """A user choice: this session's value, else the last saved one, else ``default``."""
    session_key = f"choice.{key}"
    if session_key not in st.session_state:
        saved = _saved_choices()
        if key in saved:
            st.session_state[session_key] = saved[key]
        else:
            fallback = DEFAULT_CHOICES.get(key, default)
            st.session_state[session_key] = fallback() if callable(fallback) else fallback
    return st.session_state[session_key]


def set_choice(key: str, value: Any) -> None:
    """Remember a choice in this session and on disk."""
    st.session_state[f"choice.{key}"] = value
    saved = _saved_choices()
    saved[key] = value
    path = _state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(saved, indent=1, default=str))
        temporary.replace(path)
    except OSError:  # a read-only cache only loses persistence across reloads
        pass


def remembered_widget(key: str, widget: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Draw ``widget`` with the remembered choice ``key`` as its value and remember what the user picks.

    The widget gets its own key (``widget.<key>``), seeded from the choice, because Streamlit drops the
    state of widgets on pages that are not shown.
    """
    widget_key = f"widget.{key}"
    if widget_key not in st.session_state:
        remembered = choice(key, kwargs.pop("value", None))
        if remembered is not None:
            st.session_state[widget_key] = remembered
    kwargs.pop("value", None)
    value = widget(*args, key=widget_key, **kwargs)
    if value != choice(key):
        set_choice(key, value)
    return value


# -------------------------------------------------------------------------------------------------
# models and runs
# -------------------------------------------------------------------------------------------------


MODEL_CHOICES = {  # source -> label; "other" asks for a hub id or folder
    "default": "SmolLM2-135M-Instruct (embedded default)",
    "default-aligned": "SmolLM2-135M-Instruct, safety-aligned variant",
    "tiny-llama": "Tiny random Llama (2 layers, demo)",
    "tiny-gpt2": "Tiny random GPT-2 (2 layers, demo)",
    "other": "Other: Hugging Face id or local folder",
}


def devices() -> list[str]:
    """The devices jobs can run on here: "cpu" and each GPU torch sees ("cuda:0", ...)."""
    import torch

    return ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]


def aligned_model_available() -> bool:
    """True once ``python -m analysis align`` (or the button on the safety page) has built the aligned model."""
    from analysis.llm.models import ModelLoadError, resolve_source

    try:
        resolve_source("default-aligned")
        return True
    except ModelLoadError:
        return False


def loading_message(source: str) -> str:
    """Spinner text that names the model being loaded and where it comes from."""
    from analysis.llm.models import DEFAULT_NAME, TINY_SOURCES, models_dir

    label = MODEL_CHOICES.get(source, source)
    if source in TINY_SOURCES:
        return f"Building {label}…"
    if source == "default" and not (models_dir() / DEFAULT_NAME / "model.safetensors").is_file():
        return f"Loading {label}: converting the embedded GGUF once (~20 s)…"
    if source in MODEL_CHOICES or Path(source).expanduser().is_dir():
        return f"Loading {label}…"
    return (f"Loading {source} from the local Hugging Face cache (the hub is asked only if it answers within "
            "a few seconds)…")


@st.cache_resource(show_spinner=False, max_entries=3)
def _load_model(source: str, dtype: str, allow_pickle: bool, trust_remote_code: bool):
    from analysis.core.config import ModelConfig
    from analysis.llm.models import load_model as load

    return load(ModelConfig(source=source, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))


def load_model(source: str, dtype: str = "float32", allow_pickle: bool = False, trust_remote_code: bool = False):
    """``analysis.llm.models.load_model`` once per process and model (raises ModelLoadError), under a spinner
    that names the model."""
    with st.spinner(loading_message(source), show_time=True):
        return _load_model(source, dtype, allow_pickle, trust_remote_code)


@st.cache_resource(show_spinner=False, max_entries=16)
def _load_run(run_id: str, stamp: str):
    from analysis.engine.results import load_run as load

    return load(run_id)


def _run_stamp(run_id: str) -> str:
    """Changes when the run is rewritten (manifest mtime), so a recomputed run is reloaded."""
    from analysis.engine.results import CollectionStore

    try:
        return str((CollectionStore().path(run_id) / "manifest.json").stat().st_mtime_ns)
    except OSError:
        return "missing"


def load_run(run_id: str):
    """The stored run (``RunResults``), cached per process; raises ``analysis.core.store.StoreError``."""
    return _load_run(run_id, _run_stamp(run_id))


@st.cache_data(show_spinner=False, max_entries=512)
def _view(run_id: str, stamp: str, name: str, args: tuple, _run) -> Any:
    return getattr(views, name)(_run, *args)


def view(run, name: str, *args: Any) -> Any:
    """``analysis.views.collection.<name>(run, *args)`` cached by run id (the run object itself is not hashed)."""
    return _view(run.run_id, _run_stamp(run.run_id), name, tuple(args), run)


def forget_run(run_id: str) -> None:
    """Drop cached results of a deleted or rewritten run."""
    _load_run.clear()
    _view.clear()
    if choice("run_id") == run_id:
        set_choice("run_id", None)


def active_run():
    """The run chosen in this session (or last time), or None if there is none or it is gone."""
    from analysis.core.store import StoreError

    run_id = choice("run_id")
    if not run_id:
        return None
    try:
        return load_run(run_id)
    except StoreError:
        return None


def require_run():
    """The active run, or a pointer to the Setup page and stop."""
    run = active_run()
    if run is None:
        st.info("No results yet. Collect gradients on the **Setup** page, or pick a stored run on **Runs**.")
        st.page_link("pages/setup.py", label="Go to Setup", icon=":material/tune:")
        st.page_link("pages/runs.py", label="Go to Runs", icon=":material/folder_open:")
        st.stop()
    note = views.projection_notice(run)
    if note:
        st.warning(note, icon=":material/compress:")
    return run


def module_picker(run, label: str = "Module", options: list[str] | None = None, key: str = "module") -> str:
    """A selectbox of module labels that remembers the choice across pages and runs."""
    options = options or views.module_labels(run)
    remembered = choice(key)
    if remembered not in options:
        remembered = views.default_module(run) if views.default_module(run) in options else options[0]
    picked = st.selectbox(label, options, index=options.index(remembered), key=f"widget.{key}.{run.run_id}")
    if picked != choice(key):
        set_choice(key, picked)
    return picked


# -------------------------------------------------------------------------------------------------
# uploads
# -------------------------------------------------------------------------------------------------


UPLOAD_NAMES = "upload.names"  # session key: {saved path: the file name the user uploaded}


def save_upload(data: bytes, filename: str) -> Path:
    """Keep an uploaded dataset under ``<cache>/uploads/<sha>_<name>`` (content-addressed, so the run id
    follows the content) and return its path for ``CollectionConfig``."""
    digest = hashlib.sha256(data).hexdigest()[:12]
    folder = cache_dir() / UPLOADS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}_{export.sanitize(Path(filename).stem)}{Path(filename).suffix.lower()}"
    if not path.is_file():
        path.write_bytes(data)
    return path


def read_upload(upload, require_response: bool = True):
    """Parse an uploaded dataset; on a problem show it with st.error and return None.
    ``require_response=False`` also accepts prompt sets (benchmark CSVs, ``.txt``) for evaluation.

    Returns (path of the saved copy for ``CollectionConfig`` / ``EvalConfig``, ``analysis.llm.data.Dataset``)."""
    from analysis.llm.data import DataError, load_bytes

    try:
        dataset = load_bytes(upload.getvalue(), upload.name, require_response=require_response)
    except DataError as error:
        st.error(str(error) if error.file else f"{upload.name}: {error}")  # the message names the file already
        return None
    path = save_upload(upload.getvalue(), upload.name)
    st.session_state.setdefault(UPLOAD_NAMES, {})[str(path)] = upload.name
    return str(path), dataset


NO_LABEL = "(none)"  # what Dataset.splits() / categories() call rows without one


def describe_dataset(dataset, shown: int = 6) -> str:
    """'12 examples · categories: a 5, b 4, … · 3 without a category'."""
    counts = dataset.categories()
    named = [f"{name} {count}" for name, count in sorted(counts.items()) if name != NO_LABEL]
    text = f"{len(dataset)} examples"
    if named:
        text += " · categories: " + ", ".join(named[:shown]) + (", …" if len(named) > shown else "")
    if NO_LABEL in counts:
        text += f" · {counts[NO_LABEL]} without a category"
    return text


def readable_error(error: Exception) -> str:
    """The error's text with saved uploads (``<cache>/uploads/<sha>_<name>``, and the dataset name derived
    from it) shown as the file name the user uploaded."""
    text = str(error)
    for path, name in st.session_state.get(UPLOAD_NAMES, {}).items():
        text = text.replace(path, name).replace(Path(path).stem, Path(name).stem)
    return text


# -------------------------------------------------------------------------------------------------
# live view of a running collection
# -------------------------------------------------------------------------------------------------


def show_live_collection(live: dict, eta: float = 0.9) -> None:
    """The first answer and live charts of a running collection, from its job's live data."""
    answer = views.live_answer(live, eta)
    if answer:
        st.markdown(answer)
    figures = views.live_figures(live, eta)
    columns = st.columns(max(len(figures), 1))
    for column, figure in zip(columns, figures):
        figure.update_layout(height=340, margin=dict(l=60, r=10, t=80, b=60), title_font_size=14)
        column.plotly_chart(figure, theme=None, config=CHART_CONFIG, key=f"live.{figure.layout.title.text}")


# -------------------------------------------------------------------------------------------------
# figures and downloads
# -------------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def image_server() -> bool:
    """Start kaleido's browser once per process (PNG/SVG/PDF then take ~0.3 s); False without Chromium."""
    return export.start_image_server()


def show_figure(figure: go.Figure, run_id: str, name: str, key: str | None = None) -> None:
    """A chart with the project's styling (not Streamlit's theme) and an export menu under it."""
    st.plotly_chart(figure, theme=None, config=CHART_CONFIG, key=key or f"chart.{run_id}.{name}")
    figure_downloads(figure, run_id, name)


def figure_downloads(figure: go.Figure, run_id: str, name: str) -> None:
    """An "Export" menu under a figure: PNG / SVG / PDF (rendered when clicked) and interactive HTML."""
    static = image_server()
    with st.popover("Export", icon=":material/download:", type="tertiary"):
        for fmt in export.FIGURE_FORMATS:
            disabled = fmt in export.IMAGE_FORMATS and not static
            st.download_button(
                fmt.upper(), data=(lambda f=fmt: export.figure_bytes(figure, f)) if not disabled else b"",
                file_name=export.export_filename(run_id, name, fmt), mime=export.MIME_TYPES[fmt],
                on_click="ignore", disabled=disabled, key=f"download.{run_id}.{name}.{fmt}", width="stretch",
                help="interactive, opens offline" if fmt == "html" else f"{fmt.upper()}, {export.WIDTH} px wide"
                + (f" at {export.PNG_SCALE}x" if fmt == "png" else ""),
            )
        if not static:
            st.caption(export.NO_BROWSER_MESSAGE)


def show_table(frame: pd.DataFrame, **kwargs: Any) -> None:
    """A dataframe with rates (ASR, over-refusal, accuracy, removed shares) as percentages and NLLs to 3 decimals."""
    def is_rate(column: str) -> bool:
        return any(word in column.lower() for word in ("asr", "over_refusal", "over-refusal", "accuracy", "removed"))

    numeric = [column for column in frame.columns if pd.api.types.is_numeric_dtype(frame[column])]  # text cells as they are
    formats = {column: st.column_config.NumberColumn(format="percent") for column in numeric if is_rate(column)}
    formats |= {column: st.column_config.NumberColumn(format="%.3f") for column in numeric if "nll" in column.lower()}
    st.dataframe(frame, hide_index=True, width="stretch", column_config=formats, **kwargs)


def data_downloads(frame: pd.DataFrame, run_id: str, name: str) -> None:
    """An export menu with CSV and JSON of a table."""
    with st.popover(f"Export {name.replace('_', ' ')}", icon=":material/table:", type="tertiary"):
        for fmt in export.DATA_FORMATS:
            st.download_button(fmt.upper(), data=export.data_bytes(frame, fmt),
                               file_name=export.export_filename(run_id, name, fmt), mime=export.MIME_TYPES[fmt],
                               on_click="ignore", key=f"download.{run_id}.{name}.{fmt}", width="stretch")


# -------------------------------------------------------------------------------------------------
# sidebar
# -------------------------------------------------------------------------------------------------


def sidebar() -> None:
    """The model chosen on Setup, the active run and every queued or running job, on every page."""
    with st.container():  # inside st.sidebar (app.py)
        st.caption("ACTIVE")
        st.markdown(f"**Model (Setup):** `{choice('model')}`")
        run = active_run()
        if run is None:
            st.markdown("**Run:** none yet")
        else:
            summary = views.run_summary(run)
            sketch = f" · {summary['projection']}" if summary["projection"] != "exact" else ""
            st.markdown(f"**Run:** `{run.run_id}`  \n{summary['model']} · {summary['modules']} modules{sketch}  \n"
                        f"safety set: {summary['safety']}  \nutility set: {summary['utility']}")
        sidebar_jobs()


@st.fragment(run_every=2.0)
def sidebar_jobs() -> None:
    """Queued and running jobs (polled: a job's state changes while the page stands still)."""
    from ui import jobs as ui_jobs

    lines = ui_jobs.active_summary()
    if lines:
        st.caption("JOBS")
        st.markdown("  \n".join(lines))


# -------------------------------------------------------------------------------------------------
# task settings as widgets (defaults and ranges from the task class, never written again here)
# -------------------------------------------------------------------------------------------------


def setting_input(task_class: type, name: str, label: str, remember: bool = False, **kwargs: Any) -> Any:
    """A number input for the task field ``name``: its dataclass default, its declared minimum/maximum (a page
    may narrow them with ``min_value``/``max_value``) and its help. Key ``setting.<kind>.<name>``; ``remember``:
    keep the user's value across sessions (``remembered_widget``)."""
    import dataclasses

    from analysis.core.options import default

    field = {f.name: f for f in dataclasses.fields(task_class)}[name]
    value = default(task_class, name)
    low, high = field.metadata.get("minimum"), field.metadata.get("maximum")
    numeric = float if isinstance(value, float) else int
    kwargs.setdefault("min_value", None if low is None else numeric(low))
    kwargs.setdefault("max_value", None if high is None else numeric(high))
    kwargs.setdefault("help", field.metadata.get("help"))
    key = f"setting.{task_class.kind}.{name}"
    if remember:
        return remembered_widget(key, st.number_input, label, value=value, **kwargs)
    return st.number_input(label, value=value, key=key, **kwargs)


def parse_seeds(text: str) -> tuple[int, ...]:
    """"0, 1, 2" -> (0, 1, 2); ConfigError naming the field for anything else (empty, negative, repeated)."""
    from analysis.core.config import ConfigError

    try:
        seeds = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {text!r}: give distinct whole numbers >= 0, e.g. 0,1,2")
    return seeds
