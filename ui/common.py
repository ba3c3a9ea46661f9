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
import re
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
    count_run()


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def plain(text: Any) -> str:
    """User text (prompts, responses, file names, model ids, job labels) made safe to put inside Markdown:
    every Markdown/Streamlit special character backslash-escaped, so ``![p](http://host/x.png)`` shows as
    those characters, never as an image the browser fetches (nor a link, heading, colour or emoji directive)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text)).replace("\n", "  \n")


# -------------------------------------------------------------------------------------------------
# choices (session keys mirrored on disk)
# -------------------------------------------------------------------------------------------------


def _state_path() -> Path:
    return cache_dir() / STATE_FILE


def _state_lock():
    """A lock beside the state file: read-modify-write of it by several sessions and servers never loses a key."""
    from filelock import FileLock

    return FileLock(str(_state_path().with_name(f".{STATE_FILE}.lock")), timeout=5)


def _saved_choices() -> dict[str, Any]:
    """The saved choices; {} when the file is missing, unreadable, not JSON or not a JSON object."""
    try:
        saved = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


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


def set_choice(key: str, value: Any, persist: bool = True) -> None:
    """Remember a choice in this session and (``persist``) on disk, under a lock, written to a unique
    temporary name and moved into place (a reader never sees half a file)."""
    import tempfile

    from filelock import Timeout

    st.session_state[f"choice.{key}"] = value
    if not persist:
        return
    path = _state_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _state_lock():
            saved = _saved_choices()
            saved[key] = value
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(handle, "w") as file:
                    file.write(json.dumps(saved, indent=1, default=str))
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
    except (OSError, Timeout):  # a read-only or busy cache only loses persistence across reloads
        pass


RUN_COUNTER = "app.run"  # session key: page runs of this session (run_inside_app counts them)
DRAWN = "remembered.drawn"  # session key: {widget key: the run that last drew it}


def count_run() -> None:
    """Called on every run of a page (by :func:`run_inside_app`), so that :func:`remembered_widget` knows which widgets the last run drew."""
    st.session_state[RUN_COUNTER] = st.session_state.get(RUN_COUNTER, 0) + 1


def remember_loaded_model(source: str) -> None:
    """Save ``source`` as the model new sessions open on (call it once the model has loaded)."""
    if _saved_choices().get("model") != source:
        set_choice("model", source)


def remembered_widget(key: str, widget: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Draw ``widget`` with the remembered choice ``key`` as its value and remember what the user picks.

    The widget gets its own key (``widget.<key>``). It is seeded from the choice whenever the previous run did
    not draw it (another page, or this page stopped early, e.g. while another model was picked): Streamlit
    drops or keeps stale state of widgets that were not drawn, and the browser may hand back a cleared or
    min-clamped value for them. Only a change the user makes (``on_change``) is saved to disk; a value the
    widget merely shows is kept in this session.
    """
    widget_key = f"widget.{key}"
    default = kwargs.pop("value", None)
    run = st.session_state.get(RUN_COUNTER, 0)
    drawn = st.session_state.setdefault(DRAWN, {})
    if widget_key not in st.session_state or drawn.get(widget_key) not in (run, run - 1):
        remembered = choice(key, default)
        if remembered is not None:
            st.session_state[widget_key] = remembered
    drawn[widget_key] = run
    value = widget(*args, key=widget_key, on_change=lambda: set_choice(key, st.session_state[widget_key]), **kwargs)
    if value != choice(key):
        set_choice(key, value, persist=False)
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
    """The run with every file's sha256 checked, or the StoreError saying what is damaged; computed once per
    manifest stamp (a failure is cached too, so a damaged run is not re-hashed on every rerun)."""
    from analysis.core.store import StoreError
    from analysis.engine.results import CollectionStore

    try:
        return CollectionStore().load(run_id, verify=True)
    except StoreError as error:
        return error


def _run_stamp(run_id: str) -> str:
    """Changes when the run is rewritten (manifest mtime), so a recomputed run is reloaded."""
    from analysis.engine.results import CollectionStore

    try:
        return str((CollectionStore().path(run_id) / "manifest.json").stat().st_mtime_ns)
    except OSError:
        return "missing"


def load_run(run_id: str):
    """The stored run (``RunResults``), cached per process and manifest stamp, its files' checksums verified
    once per stamp; raises ``analysis.core.store.StoreError`` (missing, unfinished or damaged run)."""
    loaded = _load_run(run_id, _run_stamp(run_id))
    if isinstance(loaded, Exception):
        raise type(loaded)(str(loaded))
    return loaded


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
    truncated = views.truncation_notice(run)
    if truncated:
        st.caption(f":material/content_cut: {truncated}")
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
    follows the content) and return its path for ``CollectionConfig``. Written to a temporary name and moved
    into place; a file already there is reused only if its content hashes to the same sha256 (a short file
    left by an interrupted write, or one changed since, is written again)."""
    from analysis.core.store import atomic_write_bytes

    full = hashlib.sha256(data).hexdigest()
    folder = cache_dir() / UPLOADS
    path = folder / f"{full[:12]}_{export.sanitize(Path(filename).stem)}{Path(filename).suffix.lower()}"
    try:
        intact = path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == full
    except OSError:
        intact = False
    if not intact:
        atomic_write_bytes(path, data)
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
        st.markdown(f"**Model (Setup):** `{str(choice('model')).replace('`', '')}`")
        run = active_run()
        if run is None:
            st.markdown("**Run:** none yet")
        else:
            summary = views.run_summary(run)
            sketch = f" · {summary['projection']}" if summary["projection"] != "exact" else ""
            st.markdown(f"**Run:** `{run.run_id}`  \n{plain(summary['model'])} · {summary['modules']} modules{sketch}  \n"
                        f"safety set: {plain(summary['safety'])}  \nutility set: {plain(summary['utility'])}")
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
