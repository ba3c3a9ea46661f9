"""Findings (analysis.views.findings) on a stored tiny run: every claim row carries its statistic, interval, test,
p-value, rule and verdict; the pages share one definition per quantity (regressions for the issue-19
contradictions). Known-answer tests of the verdicts: tests/test_resampling.py."""

import numpy as np
import pytest

from analysis.engine import evidence as ev
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionConfig
from analysis.engine.resampling import RESAMPLING_FILE, load_evidence
from analysis.engine.results import CollectionStore
from analysis.views import collection as views
from analysis.views import findings as fv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama):
    config = CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", n_safety=4,
                              n_utility=4, max_length=32, batch_size=4, top_k=2, curve_boot=2, n_boot=50, n_perm=50)
    return collect(config, model=tiny_llama, store=CollectionStore(tmp_path_factory.mktemp("runs")))


def test_findings_of_a_stored_run(tiny_run):
    assert (tiny_run.folder / RESAMPLING_FILE).exists()
    frame, text = fv.findings(tiny_run)
    assert list(frame.columns) == fv.FINDINGS_COLUMNS
    assert list(frame["claim"]) == ["I", "I", "I", "II", "II", "III", "III", "III"]
    assert set(frame["verdict"]) <= set(fv.VERDICTS) - {"not tested"}
    table = tiny_run.table
    assert frame["value"].iloc[0] == pytest.approx((table["safety_k90"] - table["utility_k90"]).median())
    assert frame["value"].iloc[2] == pytest.approx((table["safety_gram_effective_rank"]
                                                    - table["utility_gram_effective_rank"]).median())
    assert frame["value"].iloc[3] == pytest.approx(table["cosine_su"].median())
    assert frame["value"].iloc[6] == pytest.approx(table["safety_sample_phi_mean"].median())
    assert frame["null"].iloc[6] == pytest.approx(table["phi_baseline"].median())
    # every row: an interval around its value, a p-value, a rule in words, n per set
    assert np.isfinite(frame[["lo", "hi", "p_value", "null"]].to_numpy(float)).all()
    assert ((frame["lo"] <= frame["value"] + 1e-9) & (frame["value"] <= frame["hi"] + 1e-9)).all()
    assert frame["rule"].str.contains("supported if").all() and (frame["n"] == "4 + 4").all()
    assert all("small" in c and "not marked as aligned" in c for c in frame["caveat"])
    # measured on the aligned SmolLM2: median cos(G_s, G_u) +0.268 at n = 32 + 32, +0.403 at 64 + 64
    assert ["size depends on n" in c for c in frame["caveat"]] == [False] * 3 + [True] + [False] * 4
    assert tiny_run.run_id in text and text.count("\n- **") == 3


def test_no_none_and_shares_in_percent(tiny_run):
    """Regression: the 'compared with' column showed a literal None and shares were fractions (0.2299)."""
    frame, _ = fv.findings(tiny_run)
    assert frame["null"].map(lambda v: v is not None).all()
    pair_row = frame[frame["measure"].str.contains("share of safety")].iloc[0]
    assert pair_row["shown"].split(" ")[0].endswith("%") and "None" not in "".join(frame["shown"])


def test_single_sample_numbers_agree_across_pages(tiny_run):
    """Regression: 'Is one sample enough?' said phi = 0.37, Findings 0.303 for the same run (two averagings)."""
    frame, _ = fv.findings(tiny_run)
    phi_row = frame[frame["measure"] == ev.SUMMARIES["median_sample_phi"].name].iloc[0]
    summary = views.single_sample_summary(tiny_run)
    assert summary["phi"] == pytest.approx(phi_row["value"])
    assert (summary["phi_lo"], summary["phi_hi"]) == pytest.approx((phi_row["lo"], phi_row["hi"]))
    assert f"φ = {phi_row['value']:.3f}" in views.single_sample_answer(tiny_run)


def test_every_module_number_has_an_interval(tiny_run):
    """Regression: '19 of 28 modules' had no interval or test; now every per-module metric has both."""
    modules = fv.module_table(tiny_run)
    assert len(modules) == len(tiny_run.modules)
    for stat in ("safety_k90", "utility_effective_rank", "cosine_su", "phi_su", "safety_sample_phi_mean"):
        assert modules[[f"{stat}_lo", f"{stat}_hi"]].notna().all().all()
    for stat in ("diff_k90", "diff_effective_rank", "diff_gram_effective_rank", "cosine_su_zero"):
        assert modules[f"{stat}_q"].between(0, 1).all()


def test_older_run_gets_the_gram_part_on_demand(tiny_run, tmp_path):
    """A run stored before resampling: cosines get intervals from the Gram; rank claims say 'not tested'."""
    import shutil
    import types

    folder = tmp_path / "old"
    shutil.copytree(tiny_run.folder, folder)
    (folder / RESAMPLING_FILE).unlink()
    old = types.SimpleNamespace(folder=folder, config=tiny_run.config, manifest=tiny_run.manifest,
                                run_id="old", table=tiny_run.table, module_names=tiny_run.module_names,
                                modules=tiny_run.modules, gram=tiny_run.gram, _cache={})
    seen = []
    evidence = load_evidence(old, n_boot=50, n_perm=50, progress=seen.append)
    assert not evidence.spectral and seen[-1] == 1.0
    stored = load_evidence(tiny_run)
    assert np.allclose(evidence.boot["cosine_su"], stored.boot["cosine_su"])  # same seed, same rows
    frame, text = fv.findings(old, evidence)
    assert list(frame[frame["claim"] == "I"]["verdict"])[:2] == ["not tested", "not tested"]
    assert np.isfinite(frame[frame["claim"] == "I"]["p_value"].iloc[2])  # the sample-span rank: from the Gram
    assert np.isfinite(frame[frame["claim"] == "II"]["p_value"]).all()
    assert "Collect it again" in text


def test_findings_command(tiny_run, capsys):
    import json

    from analysis.__main__ import main

    store = str(tiny_run.folder.parent)
    assert main(["findings", "--run", tiny_run.run_id[:8], "--json", "--modules", "--store", store]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["run_id"] == tiny_run.run_id and payload["n_boot"] == 50 and payload["n_perm"] == 50
    assert [row["claim"] for row in payload["findings"]] == ["I", "I", "I", "II", "II", "III", "III", "III"]
    assert all(row["p_value"] is not None and row["lo"] is not None for row in payload["findings"])
    assert len(payload["modules"]) == len(tiny_run.modules)
    assert main(["findings", "--run", tiny_run.run_id, "--store", store]) == 0
    out = capsys.readouterr().out
    assert "95% CI" in out and "I — " in out
    assert main(["findings", "--run", "nope", "--store", store]) == 2


def test_pictures_and_exports_carry_the_intervals(tiny_run):
    tables = views.run_tables(tiny_run)
    assert {"findings", "module_intervals"} <= set(tables)
    assert {"p_value", "lo", "hi", "verdict"} <= set(tables["findings"].columns)
    assert {"cosine_su_lo", "cosine_su_hi", "cosine_su_zero_q", "diff_k90_q"} <= set(tables["module_intervals"].columns)
    figures = views.run_figures(tiny_run)
    assert {"null_claim_I", "null_claim_II", "null_claim_III", "module_diff_k90", "module_cosine"} <= set(figures)
    null = figures["null_claim_I"]
    assert null.data[0].type == "histogram" and len(null.data[0].x) == 50  # the 50 permutations
    bars = figures["module_cosine"].data[0]
    assert bars.error_y.array is not None and len(bars.x) == len(tiny_run.modules)
    module = views.default_module(tiny_run)
    _, cer = views.spectra_figures(tiny_run, module, 0.9)
    assert any("95% interval" in (trace.name or "") for trace in cer.data)
    assert any("Findings (decided by tests)" in line for line in views.run_answers(tiny_run))


def test_page_answers_say_what_is_tested(tiny_run):
    """Regression: '19 of 28 modules' and 'a median 23% of pairs' had no test; the answers now add one."""
    for answer in (views.low_rank_answer(tiny_run, 0.9), views.conflict_answer(tiny_run)):
        assert "after Benjamini-Hochberg" in answer and "Tested:" in answer
    module = views.default_module(tiny_run)
    assert "95% CI" in views.low_rank_answer(tiny_run, 0.9, module)
    assert "95% CI" in views.conflict_answer(tiny_run, module)


def test_a_module_without_a_certified_interval_says_so(tiny_run, monkeypatch):
    """Regression (seen on the aligned model, 210 modules, n = 32): a module whose k@0.9 the spectral core does
    not certify read 'k = 7 (95% CI nan–nan)'; it now says why there is no interval."""
    module = views.default_module(tiny_run)
    frame = views.module_intervals(tiny_run).copy()
    frame.loc[frame["label"] == module, ["safety_k90_lo", "safety_k90_hi"]] = np.nan
    monkeypatch.setattr(views, "module_intervals", lambda run: frame)
    answer = views.low_rank_answer(tiny_run, 0.9, module)
    assert "nan" not in answer and "no 95% CI for safety: the spectral core does not certify k@0.9" in answer
    # the across-module sentence counts only the modules the test could use
    frame.loc[frame["label"] == module, ["diff_k90_p", "diff_k90_q"]] = np.nan
    frame.loc[frame["label"] == module, "diff_k90_significant"] = False
    summary = views.low_rank_answer(tiny_run, 0.9)
    n = len(frame)
    assert f"of {n - 1} tested modules" in summary and f"1 of {n} modules not tested" in summary


def test_module_significance_lines_name_the_tests_and_count_only_tested_modules(tiny_run):
    """Regression: the Findings page printed column names ('diff_k90: significant in 0 of 210 modules') and
    counted modules the spectral core never tested; the lines now name the statistic and its test, count the
    tested modules and say how many were not tested."""
    modules = fv.module_table(tiny_run).copy()
    first = modules.index[0]
    modules.loc[first, ["diff_k90", "diff_k90_p", "diff_k90_q"]] = np.nan
    modules.loc[first, "diff_k90_significant"] = False
    lines = fv.significance_lines(modules)
    assert len(lines) == len(fv.MODULE_TESTS) and not any("diff_" in line or "_zero" in line for line in lines)
    k90 = next(line for line in lines if line.startswith("**k@0.9"))
    n = len(modules)
    assert f"of {n - 1} tested modules" in k90 and f"1 of {n} not tested" in k90
    modules["diff_effective_rank_p"] = np.nan
    rank = next(line for line in fv.significance_lines(modules) if line.startswith("**effective rank"))
    assert f"tested in none of the {n} modules" in rank
    cosine = next(line for line in lines if line.startswith("**cos(G_s, G_u)"))
    assert f"of {n} tested modules" in cosine and "not tested" not in cosine
