"""Findings (analysis.views.findings): each seed claim with our number, verdict and caveat; on a stored
tiny run and on hand-made tables."""

import types

import numpy as np
import pandas as pd
import pytest

from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionConfig
from analysis.engine.results import CollectionStore
from analysis.views import findings as fv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    config = CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", n_safety=4,
                              n_utility=4, max_length=32, batch_size=4, top_k=2, curve_boot=2)
    return collect(config, model=tiny_llama, store=CollectionStore(tmp_path_factory.mktemp("runs")))


def test_findings_of_a_stored_run(tiny_run):
    frame, text = fv.findings(tiny_run)
    assert list(frame.columns) == fv.FINDINGS_COLUMNS
    assert list(frame["claim"]) == ["I", "I", "II", "II", "III", "III"]
    assert set(frame["verdict"]) <= {"supported", "partly supported", "not supported"}
    table = tiny_run.table
    assert frame["value"].iloc[0] == pytest.approx(table["safety_k90"].median())
    assert frame["reference"].iloc[1] == pytest.approx(table["utility_effective_rank"].median())
    assert frame["value"].iloc[2] == pytest.approx((table["cosine_su"] < 0).mean())
    assert frame["value"].iloc[3] == pytest.approx(table["cross_cos_frac_negative"].mean())
    assert frame["value"].iloc[4] == pytest.approx(table["safety_sample_phi_mean"].median())
    assert frame["reference"].iloc[4] == pytest.approx(table["phi_baseline"].median())
    # n = 4 + 4 is small and tiny-llama is not aligned: every claim says so
    assert all("small" in c or "1/4" in c for c in frame["caveat"])
    assert all("not marked as aligned" in c for c in frame["caveat"])
    assert tiny_run.run_id in text and text.count("\n- **") == 3


def fake(k_s, k_u, cos, frac, phi, n=(64, 64), model="default-aligned"):
    m = len(k_s)
    table = pd.DataFrame({
        "safety_k90": k_s, "utility_k90": k_u, "safety_effective_rank": np.asarray(k_s) + 0.5,
        "utility_effective_rank": np.asarray(k_u) + 0.5, "cosine_su": cos, "cross_cos_frac_negative": frac,
        "safety_sample_phi_mean": phi, "safety_sample_top1_mean": [0.9] * m, "phi_baseline": [0.01] * m,
        "phi_baseline_q95": [0.02] * m})
    return types.SimpleNamespace(table=table, run_id="r", config={"n_safety": n[0], "n_utility": n[1], "top_k": 8},
                                 manifest={"model": {"source": model}})


def test_verdicts_follow_the_numbers():
    frame, _ = fv.findings(fake([2, 3, 4], [5, 6, 7], [-0.1, -0.2, 0.3], [0.6, 0.7, 0.2], [0.6, 0.7, 0.8]))
    assert list(frame["verdict"]) == ["supported"] * 6
    assert (frame["caveat"] == "").all()  # large n, aligned model
    frame, _ = fv.findings(fake([5, 6, 7], [2, 3, 4], [0.1, 0.2, 0.3], [0.1, 0.1, 0.2], [0.01, 0.015, 0.01]))
    assert list(frame["verdict"]) == ["not supported"] * 6
    frame, _ = fv.findings(fake([2, 6, 4], [5, 3, 4], [-0.1, 0.2, 0.3], [0.3, 0.3, 0.3], [0.2, 0.3, 0.25]))
    assert list(frame["verdict"]) == ["partly supported"] * 6
    frame, _ = fv.findings(fake([2], [3], [0.1], [0.1], [0.6], n=(8, 16)))
    assert "different n" in frame["caveat"].iloc[0] and "n = 8 + 16 is small" in frame["caveat"].iloc[0]
