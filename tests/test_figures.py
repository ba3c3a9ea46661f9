"""Figure builders: right traces, labelled axes with units, log/diverging scales, one template."""

import numpy as np
import pandas as pd
import pytest

from analysis.views import figures as F


@pytest.fixture
def spectra():
    rng = np.random.default_rng(0)
    return {"safety": np.sort(rng.exponential(1, 40) ** 3)[::-1], "utility": np.sort(rng.exponential(1, 40))[::-1]}


@pytest.fixture
def layer_kind():
    rows = [(layer, kind, np.cos(layer + i), 1 + layer + i) for layer in range(3)
            for i, kind in enumerate(["down", "q", "up", "o"])]
    return pd.DataFrame(rows, columns=["layer", "kind", "cosine", "rank"])


def assert_styled(figure):
    assert figure.layout.template.layout.font.family == F.FONT_FAMILY
    assert figure.layout.title.text


def test_spectra_figure_log_axis_and_fixed_colours(spectra):
    figure = F.spectra_figure(spectra, "L3.mlp.down")
    assert_styled(figure)
    assert figure.layout.yaxis.type == "log"
    assert [t.name for t in figure.data] == ["safety", "utility"]
    assert figure.data[0].line.color == F.SERIES_COLORS["safety"]
    assert figure.data[1].line.color == F.SERIES_COLORS["utility"]
    assert figure.data[0].y[0] == pytest.approx(1.0)  # normalised by s_1
    assert figure.layout.title.subtitle.text == "L3.mlp.down"
    absolute = F.spectra_figure(spectra, normalise=False)
    assert "nats" in absolute.layout.yaxis.title.text


def test_spectra_figure_drops_numerical_zeros():
    s = np.array([1.0, 0.5, 0.1, 1e-12, 0.0])
    figure = F.spectra_figure({"safety": s})
    assert len(figure.data[0].y) == 3


def test_cer_figure_marks_k_at_eta(spectra):
    figure = F.cer_figure(spectra, eta=0.9)
    lines = [t for t in figure.data if t.mode == "lines"]
    assert len(lines) == 2 and all(t.y[-1] == pytest.approx(1.0) for t in lines)
    assert any(shape.y0 == 0.9 for shape in figure.layout.shapes)  # the eta line
    markers = [t for t in figure.data if t.mode == "markers"]
    for line, marker in zip(lines, markers):
        k = int(marker.x[0])
        assert f"k@η = {k}" in line.name
        assert line.y[k - 1] >= 0.9 and (k == 1 or line.y[k - 2] < 0.9)
    assert figure.layout.xaxis.type == "log"
    assert figure.layout.xaxis.title.text == "number of directions k"


def test_heatmap_layout_and_kind_order(layer_kind):
    figure = F.layer_kind_heatmap(layer_kind, "rank", "Effective rank", "directions")
    heatmap = figure.data[0]
    assert list(heatmap.x) == ["q", "o", "up", "down"]  # canonical order, not alphabetical
    assert list(heatmap.y) == ["0", "1", "2"]
    assert figure.layout.yaxis.autorange == "reversed"  # layer 0 at the top
    assert figure.layout.xaxis.title.text == "module kind" and figure.layout.yaxis.title.text == "layer"
    assert heatmap.zmid is None


def test_cosine_heatmap_is_diverging_and_centred(layer_kind):
    figure = F.layer_kind_heatmap(layer_kind, "cosine", "Cosine", "cosine", diverging=True)
    heatmap = figure.data[0]
    assert heatmap.zmid == 0 and (heatmap.zmin, heatmap.zmax) == (-1, 1)


def test_ratio_heatmap_colours_by_log2_but_prints_values(layer_kind):
    figure = F.layer_kind_heatmap(layer_kind, "rank", "Ratio", "ratio", log_colors=True)
    heatmap = figure.data[0]
    z, text = np.array(heatmap.z, dtype=float), np.array(heatmap.text, dtype=float)
    assert np.allclose(z, np.log2(text)) and heatmap.zmid == 0


def test_histogram_annotates_fraction_negative():
    cosines = np.array([-0.5, -0.2, -0.1, 0.3])
    figure = F.cosine_histogram(cosines)
    assert "75% negative" in figure.layout.annotations[0].text
    assert any(shape.x0 == 0 for shape in figure.layout.shapes)


def test_principal_angles_in_degrees_with_baseline():
    figure = F.principal_angles_figure({"safety vs utility": [0.0, np.pi / 4, np.pi / 2]}, [np.pi / 2] * 3)
    assert list(figure.data[0].y) == pytest.approx([0, 45, 90])
    assert figure.data[1].line.dash == "dash" and "degrees" in figure.layout.yaxis.title.text


def test_overlap_vs_n_band_and_baseline():
    curve = {"n": np.array([1, 2, 4, 8, 16]), "mean": np.linspace(0.2, 1, 5), "q05": np.linspace(0.1, 0.9, 5),
             "q95": np.linspace(0.3, 1, 5), "top1": np.linspace(0.5, 1, 5), "baseline": 0.02}
    figure = F.overlap_vs_n_figure(curve, "L3.mlp.down")
    band = figure.data[0]
    assert band.fill == "toself" and len(band.x) == 10
    assert any(t.name.startswith("mean |") for t in figure.data)
    assert any(shape.y0 == 0.02 for shape in figure.layout.shapes)


def test_single_sample_figure_averages_modules_per_layer():
    frame = pd.DataFrame({"layer": [0, 0, 1], "phi": [0.2, 0.4, 0.9], "top1_abs_cos": [0.5, 0.5, 1.0],
                          "baseline": [0.01, 0.01, 0.01]})
    figure = F.single_sample_figure(frame, "sample 3")
    assert list(figure.data[0].y) == pytest.approx([0.3, 0.9])
    assert len(figure.data) == 3


def test_category_bars_grouped_by_series():
    frame = pd.DataFrame({"category": ["a", "b", "a", "b"], "value": [0.1, 0.2, 0.3, 0.4],
                          "set": ["safety", "safety", "utility", "utility"]})
    figure = F.category_bar_figure(frame, "category", "value", "Per category", "fraction", series="set")
    assert [t.name for t in figure.data] == ["safety", "utility"]
    assert figure.data[0].marker.color == F.SERIES_COLORS["safety"]


def test_empty_inputs_give_a_message_not_an_error():
    for figure in (F.layer_kind_heatmap(pd.DataFrame(), "x", "T", "c"), F.cosine_histogram([]),
                   F.overlap_vs_n_figure({}), F.single_sample_figure(pd.DataFrame()),
                   F.metric_by_module_figure(pd.DataFrame(), {}, "T", "y")):
        assert figure.layout.annotations and figure.layout.annotations[0].text
