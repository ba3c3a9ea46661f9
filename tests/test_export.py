"""Export: valid PNG/SVG/PDF bytes via kaleido, self-contained HTML, CSV/JSON, whole-run zip, safe names."""

import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from analysis.views import export
from analysis.views import figures as F

needs_browser = pytest.mark.skipif(not export.static_export_available(), reason="no Chromium for kaleido")
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-"}


@pytest.fixture(scope="module")
def figure():
    return F.cer_figure({"safety": [3.0, 1.0, 0.5], "utility": [1.0, 0.9, 0.8]}, 0.9, "L0.mlp.down")


@pytest.fixture(scope="module")
def image_server():
    if export.start_image_server():
        yield
        export.stop_image_server()
    else:
        yield


@needs_browser
@pytest.mark.parametrize("fmt", export.IMAGE_FORMATS)
def test_static_images_are_valid(figure, image_server, fmt):
    data = export.figure_bytes(figure, fmt)
    if fmt == "svg":
        assert data.lstrip().startswith(b"<svg") and b"</svg>" in data[-200:]
    else:
        assert data.startswith(MAGIC[fmt])
    if fmt == "png":  # rendered at scale 2
        width = int.from_bytes(data[16:20], "big")
        assert width == export.WIDTH * export.PNG_SCALE


def test_html_is_self_contained(figure):
    html = export.figure_bytes(figure, "html").decode()
    assert "<html>" in html and "Plotly.newPlot" in html
    assert 'src="https://cdn' not in html and len(html) > 1_000_000  # plotly.js inlined


def test_unknown_format_is_a_clear_error(figure):
    with pytest.raises(export.ExportError, match="unknown figure format"):
        export.figure_bytes(figure, "bmp")


def test_without_browser_images_fail_clearly_and_html_still_works(figure, monkeypatch):
    monkeypatch.setattr(export, "static_export_available", lambda: False)
    with pytest.raises(export.ExportError, match="needs Chromium"):
        export.figure_bytes(figure, "png")
    assert b"<html>" in export.figure_bytes(figure, "html")[:100]
    archive = zipfile.ZipFile(io.BytesIO(export.run_zip("r1", {"cer": figure}, {}, {})))
    assert not any(name.endswith(".png") for name in archive.namelist())
    assert json.loads(archive.read("manifest.json"))["static_images"] is False


def test_data_exports_round_trip():
    frame = pd.DataFrame({"label": ["L0.attn.q", "L1.mlp.down"], "value": [0.5, np.nan]})
    assert export.data_bytes(frame, "csv").decode().splitlines() == ["label,value", "L0.attn.q,0.5", "L1.mlp.down,"]
    assert json.loads(export.data_bytes(frame, "json")) == [{"label": "L0.attn.q", "value": 0.5},
                                                            {"label": "L1.mlp.down", "value": None}]
    assert json.loads(export.to_json_bytes({"a": np.arange(3), "b": np.float32(1.5)})) == {"a": [0, 1, 2], "b": 1.5}


@pytest.mark.parametrize("name, expected", [
    ("spectra_L3.mlp.down", "spectra_L3.mlp.down"),
    ("../../etc/passwd", "etc_passwd"),
    ("a b/c\\d:e*?", "a_b_c_d_e"),
    ("...", "export"),
    ("ünïcode name", "n_code_name"),
])
def test_sanitize(name, expected):
    assert export.sanitize(name) == expected


def test_export_filename_joins_run_id_and_name():
    assert export.export_filename("abc123", "cer_L0.mlp.down", "PNG") == "abc123_cer_L0.mlp.down.png"
    assert "/" not in export.export_filename("x/y", "../z", "png")


def test_run_zip_contents(figure, image_server):
    table = pd.DataFrame({"label": ["L0.mlp.down"], "cosine_su": [-0.2]})
    data = export.run_zip("run/1", {"cer L0": figure}, {"modules": table}, {"config": {"n_safety": 4}})
    archive = zipfile.ZipFile(io.BytesIO(data))
    names = set(archive.namelist())
    expected = {"manifest.json", "report.html", "figures/plotly.min.js", "figures/run_1_cer_L0.html",
                "data/run_1_modules.csv", "data/run_1_modules.json"}
    if export.static_export_available():
        expected |= {f"figures/run_1_cer_L0.{fmt}" for fmt in export.IMAGE_FORMATS}
        assert archive.read("figures/run_1_cer_L0.png").startswith(MAGIC["png"])
    assert expected <= names
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["run"]["config"]["n_safety"] == 4
    assert set(manifest["contents"]["data"]) == {"data/run_1_modules.csv", "data/run_1_modules.json"}
    assert b'src="plotly.min.js"' in archive.read("figures/run_1_cer_L0.html")
    report = archive.read("report.html").decode()
    assert "Plotly.newPlot" in report and "cosine_su" in report and "n_safety" in report
