"""Export figures and data: PNG / SVG / PDF (kaleido + Chromium), interactive HTML, CSV / JSON, zip, report.

Static images need a Chromium-based browser (kaleido 1.x drives one; it finds ``chromium`` on PATH,
e.g. Debian's /usr/bin/chromium, or the one named by ``$BROWSER_PATH``). Call :func:`start_image_server`
once per process: kaleido then keeps one browser open and an image takes ~0.3 s instead of 3-8 s.
Without a browser :func:`static_export_available` is False, :func:`figure_bytes` raises ExportError
with a clear message, and HTML / CSV / JSON exports still work.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import re
import threading
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from analysis.views.figures import HEIGHT, WIDTH

IMAGE_FORMATS = ("png", "svg", "pdf")
FIGURE_FORMATS = IMAGE_FORMATS + ("html",)
DATA_FORMATS = ("csv", "json")
MIME_TYPES = {
    "png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "html": "text/html",
    "csv": "text/csv", "json": "application/json", "zip": "application/zip",
}
PNG_SCALE = 2  # PNGs at twice the CSS size: crisp on slides and in papers
NO_BROWSER_MESSAGE = (
    "Static image export (PNG/SVG/PDF) needs Chromium, which was not found. Install it "
    "('apt-get install chromium') or point $BROWSER_PATH at a Chrome/Chromium binary. Meanwhile use the "
    "interactive HTML export, or the camera icon in each chart's toolbar for a PNG."
)

_server_lock = threading.Lock()
_image_lock = threading.Lock()


class ExportError(RuntimeError):
    """An export could not be produced; the message says why and what to do instead."""


def browser_path() -> str | None:
    """The Chromium-based browser kaleido would use, or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # pragma: no cover - choreographer internals moved
        import os
        import shutil

        return os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("google-chrome")


def static_export_available() -> bool:
    """True when PNG/SVG/PDF export can work (kaleido installed and a browser found)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return browser_path() is not None


def start_image_server() -> bool:
    """Start kaleido's process-wide browser once (idempotent); False if no browser is available."""
    if not static_export_available():
        return False
    import kaleido

    with _server_lock:
        if not kaleido._global_server.is_running():
            # mathjax=False: no CDN fetch (offline machines); figures use HTML sub/superscripts instead.
            kaleido.start_sync_server(mathjax=False, silence_warnings=True)
    return True


def stop_image_server() -> None:
    """Close kaleido's browser if it is running."""
    import kaleido

    with _server_lock:
        kaleido.stop_sync_server(silence_warnings=True)


def figure_bytes(figure: go.Figure, fmt: str, width: int = WIDTH, height: int | None = None,
                 scale: float | None = None) -> bytes:
    """Render a figure as PNG / SVG / PDF / HTML bytes.

    HTML is self-contained (plotly.js inlined, works offline). Images use kaleido's server when it is
    running (see :func:`start_image_server`), else a one-shot browser (slower).
    """
    fmt = fmt.lower()
    if fmt == "html":
        return figure_html(figure).encode("utf-8")
    if fmt not in IMAGE_FORMATS:
        raise ExportError(f"unknown figure format {fmt!r}: choose one of {', '.join(FIGURE_FORMATS)}")
    if not static_export_available():
        raise ExportError(NO_BROWSER_MESSAGE)
    import kaleido

    height = height or figure.layout.height or HEIGHT
    options = dict(format=fmt, width=width, height=height, scale=scale or (PNG_SCALE if fmt == "png" else 1))
    try:
        with _image_lock:  # kaleido's sync server handles one request at a time
            try:
                return kaleido.calc_fig_sync(figure.to_dict(), opts=options)
            except Exception:
                # On a loaded machine a fresh kaleido tab can be asked to render before its page script has
                # loaded ("kaleido_scopes is not defined"); a restarted browser then renders fine: one retry.
                if not kaleido._global_server.is_running():
                    raise
                with _server_lock:
                    kaleido.stop_sync_server(silence_warnings=True)
                    kaleido.start_sync_server(mathjax=False, silence_warnings=True)
                return kaleido.calc_fig_sync(figure.to_dict(), opts=options)
    except Exception as error:  # kaleido/choreographer raise assorted errors (browser crash, timeout)
        raise ExportError(f"{fmt.upper()} export failed ({type(error).__name__}: {error}). "
                          "The interactive HTML export does not need a browser.") from error


def figure_html(figure: go.Figure, full_html: bool = True, plotlyjs: bool | str = True) -> str:
    """Interactive HTML; plotly.js inlined by default (opens offline). ``plotlyjs="directory"`` refers to a
    ``plotly.min.js`` beside the file instead (the zip ships one copy); a fragment (``full_html=False``)
    never includes it."""
    return pio.to_html(figure, include_plotlyjs=plotlyjs if full_html else False, full_html=full_html,
                       config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": PNG_SCALE}})


def sanitize(name: str, max_length: int = 80) -> str:
    """A safe file-name stem: letters, digits, '.', '_', '-' only; no leading dots; never empty."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._-")
    stem = re.sub(r"_+", "_", stem)[:max_length].strip("._-")
    return stem or "export"


def export_filename(run_id: str, name: str, fmt: str) -> str:
    """``<run id>_<name>.<fmt>``, sanitised, e.g. ``a1b2c3_spectra_L3.mlp.down.png``."""
    return f"{sanitize(f'{run_id}_{name}', 120)}.{sanitize(fmt, 8).lower()}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return value


def to_json_bytes(value: Any) -> bytes:
    """JSON bytes of dicts / lists / numpy values / DataFrames (records); NaN becomes null."""
    if isinstance(value, pd.DataFrame):
        value = value.to_dict(orient="records")
    return json.dumps(_jsonable(value), indent=2, ensure_ascii=False).encode("utf-8")


def data_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """A table as CSV (UTF-8, no index) or JSON (list of records)."""
    fmt = fmt.lower()
    if fmt == "csv":
        return frame.to_csv(index=False).encode("utf-8")
    if fmt == "json":
        return to_json_bytes(frame)
    raise ExportError(f"unknown data format {fmt!r}: choose one of {', '.join(DATA_FORMATS)}")


def run_zip(run_id: str, figures: Mapping[str, go.Figure], tables: Mapping[str, pd.DataFrame],
            manifest: Mapping[str, Any], image_formats: Iterable[str] = IMAGE_FORMATS,
            summary: Mapping[str, Any] | None = None, notes: Sequence[str] = (),
            choices: Mapping[str, Any] | None = None) -> bytes:
    """One zip with ``figures/`` (HTML always, sharing one ``figures/plotly.min.js``; PNG/SVG/PDF if a browser
    exists), ``data/`` (CSV + JSON), ``manifest.json`` (the run's manifest plus what the zip contains and the
    ``choices`` the figures were made with, e.g. ``collection.export_choices``) and the self-contained
    ``report.html``."""
    static = static_export_available()
    if static:
        start_image_server()
    contents: dict[str, list[str]] = {"figures": [], "data": []}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("figures/plotly.min.js", get_plotlyjs())
        for name, figure in figures.items():
            path = f"figures/{export_filename(run_id, name, 'html')}"
            archive.writestr(path, figure_html(figure, plotlyjs="directory"))
            contents["figures"].append(path)
            for fmt in tuple(image_formats) if static else ():
                path = f"figures/{export_filename(run_id, name, fmt)}"
                archive.writestr(path, figure_bytes(figure, fmt))
                contents["figures"].append(path)
        for name, frame in tables.items():
            for fmt in DATA_FORMATS:
                path = f"data/{export_filename(run_id, name, fmt)}"
                archive.writestr(path, data_bytes(frame, fmt))
                contents["data"].append(path)
        archive.writestr("report.html", report_html(run_id, figures, tables, manifest, summary=summary, notes=notes,
                                                 choices=choices))
        full_manifest = {"run_id": run_id, "exported_at": _dt.datetime.now(_dt.UTC).isoformat(),
                         "static_images": static, "choices": dict(choices or {}), "contents": contents,
                         "run": dict(manifest)}
        archive.writestr("manifest.json", to_json_bytes(full_manifest))
    return buffer.getvalue()


def report_html(run_id: str, figures: Mapping[str, go.Figure], tables: Mapping[str, pd.DataFrame],
                manifest: Mapping[str, Any], title: str | None = None, summary: Mapping[str, Any] | None = None,
                notes: Sequence[str] = (), choices: Mapping[str, Any] | None = None) -> str:
    """A single self-contained HTML page that opens offline: a summary table, what the export contains
    (``choices``: the module and η its figures use), notes (e.g. the one-line answers), every figure (interactive, plotly.js inlined once), every table, and the full manifest
    (collapsed)."""
    title = title or f"Safety Subspace Explorer — run {run_id}"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:Arial,Helvetica,sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}table.summary td,table.summary th{text-align:left}"
        "pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}"
        "h2{margin-top:2em;border-bottom:1px solid #ddd}.table{overflow-x:auto}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Exported {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M UTC}.</p>",
    ]
    if summary:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
        parts.append(f"<table class='summary'>{rows}</table>")
    if choices:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in choices.items())
        parts.append(f"<h2>What this export contains</h2><table class='summary choices'>{rows}</table>")
    parts.extend(f"<p>{html.escape(note)}</p>" for note in notes)
    for name, figure in figures.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(figure_html(figure, full_html=False))
    for name, frame in tables.items():
        parts.append(f"<h2>Table: {html.escape(name)}</h2>")
        parts.append(f"<div class='table'>{frame.to_html(index=False, float_format=lambda x: f'{x:.4g}', border=0)}</div>")
    parts.append("<h2>Configuration and provenance</h2><details><summary>manifest.json</summary>"
                 f"<pre>{html.escape(to_json_bytes(manifest).decode('utf-8'))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
