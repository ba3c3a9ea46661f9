"""Bootstrap intervals, permutation null and tested findings on synthetic factors with known answers
(analysis.engine.geometry.resampling, analysis.engine.resampling, analysis.engine.evidence, analysis.views.findings)."""

import types

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.engine import evidence as ev
from analysis.engine.analyse import analyse_module
from analysis.engine.geometry import resampling as rs
from analysis.engine.resampling import evidence_from_arrays, gram_resampling, resample_module
from analysis.llm.anatomy import ModuleInfo
from analysis.views import findings as fv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def factors(rng, U, V, coefficients, noise=0.02, noise_rows=2):
    """(D, A) with D^T A = sum_j c_j U_j V_j^T + a small random term (noise_rows extra token rows)."""
    D = coefficients[:, None] * U.T
    A = V.T.copy()
    D = np.vstack([D, noise * rng.standard_normal((noise_rows, U.shape[0]))])
    A = np.vstack([A, rng.standard_normal((noise_rows, V.shape[0])) / np.sqrt(V.shape[0])])
    return torch.tensor(D, dtype=torch.float32), torch.tensor(A, dtype=torch.float32)


def low_rank_set(rng, U, V, n, per_sample):
    """n samples, each on ``per_sample`` of the columns of U, V (all when per_sample >= their number), with
    coefficients ~ N(1, 0.3): the set's mean has the rank of U."""
    out = []
    for _ in range(n):
        idx = rng.choice(U.shape[1], size=min(per_sample, U.shape[1]), replace=False)
        out.append(factors(rng, U[:, idx], V[:, idx], 1.0 + 0.3 * rng.standard_normal(idx.size)))
    return out


def bases(rng, d, r):
    return np.linalg.qr(rng.standard_normal((d, r)))[0], np.linalg.qr(rng.standard_normal((d, r)))[0]


def synthetic_run(make_pairs, n_s, n_u, modules=3, top_k=2, n_boot=200, n_perm=200, seed=0, d=24):
    """A run-like object (table, config, manifest) and its Evidence from analyse_module on synthetic modules."""
    rows, arrays, names = [], [], []
    for m in range(modules):
        info = ModuleInfo(f"model.layers.{m}.self_attn.q_proj", "q", m, d, d)
        result = analyse_module(info, make_pairs(m), n_s, top_k, n_boot=n_boot, n_perm=n_perm, seed=seed)
        rows.append(result.row)
        arrays.append({k[len("resampling."):]: v for k, v in result.arrays.items() if k.startswith("resampling.")})
        names.append(info.name)
    table = pd.DataFrame(rows)
    run = types.SimpleNamespace(table=table, run_id="synthetic", config={"n_safety": n_s, "n_utility": n_u,
                                                                          "top_k": top_k, "seed": seed},
                                manifest={"model": {"source": "synthetic-aligned"}})
    return run, evidence_from_arrays(arrays, names, list(table["label"]), n_s, n_u, seed)


# --------------------------------------------------------------------------------------------------
# pure maths
# --------------------------------------------------------------------------------------------------


def test_weights_and_masks_keep_the_set_sizes():
    W = rs.resample_weights(5, 7, 50, seed=3)
    assert W.shape == (50, 12) and (W[:, :5].sum(axis=1) == 5).all() and (W[:, 5:].sum(axis=1) == 7).all()
    assert np.array_equal(W, rs.resample_weights(5, 7, 50, seed=3))  # seeded: every module gets the same rows
    masks = rs.permutation_masks(5, 7, 40, seed=3)
    assert (masks.sum(axis=1) == 5).all() and not (masks[:, :5].all(axis=1)).all()


def test_benjamini_hochberg_known_values():
    from analysis.core.stats import benjamini_hochberg

    p = np.array([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4/1, 4/2, 4/3, 4/4 = 0.02, 0.02, 0.04, 0.04 (monotone from the top)
    assert np.allclose(benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    # a NaN (untested module) is no test: the other p-value is alone, q = p
    assert np.isnan(benjamini_hochberg([np.nan, 0.01])[0]) and benjamini_hochberg([np.nan, 0.01])[1] == 0.01
    assert np.allclose(benjamini_hochberg([[0.01, 0.04], [0.03, 0.005]]), [[0.02, 0.04], [0.04, 0.02]])  # shape kept


def test_p_values_and_needed_n():
    assert rs.permutation_p_value(5.0, np.zeros(99)) == pytest.approx(2 / 100)
    assert rs.permutation_p_value(0.0, np.linspace(-1, 1, 101)) == 1.0
    assert rs.bootstrap_p_value(np.full(199, 0.3)) == pytest.approx(2 / 200)
    assert rs.bootstrap_p_value(np.linspace(-1, 1, 201)) == 1.0
    # estimate 1, interval +-1.96 * 1 (SE 1 at n = 10): SE must shrink to 1/1.96 -> n = 10 * 1.96^2
    assert rs.n_needed(1.0, 1 - 1.96, 1 + 1.96, 10) == pytest.approx(10 * 1.96**2)
    assert rs.n_needed(0.0, -1, 1, 10) == float("inf")


def test_core_spectra_equal_the_dense_spectra_of_resampled_means():
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((5, 12)), rng.standard_normal((5, 9))) for _ in range(6)]
    core = rs.SpectralCore(pairs, m=64)
    W = rs.resample_weights(3, 3, 4, seed=1) / 3
    dense = [sum(w * D.T @ A for w, (D, A) in zip(row, pairs)) for row in W]
    s2, _ = rs.core_spectra(core.means(W))
    for row, G in zip(s2, dense):
        exact = np.linalg.svd(G, compute_uv=False) ** 2
        assert np.allclose(row[: exact.size], exact, rtol=1e-9, atol=1e-9 * exact[0])
    K = np.array([[np.sum((Di.T @ Ai) * (Dj.T @ Aj)) for Dj, Aj in pairs] for Di, Ai in pairs])
    assert np.allclose(rs.captured_share(np.sum(core.means(W) ** 2, axis=(1, 2)), K, W), 1.0)
    truncated = rs.SpectralCore(pairs, m=3)  # fewer directions than the rank: lower bounds, energy missing
    s2_t, _ = rs.core_spectra(truncated.means(W))
    assert (s2_t[:, :3] <= s2[:, :3] * (1 + 1e-9)).all()
    assert (rs.captured_share(np.sum(truncated.means(W) ** 2, axis=(1, 2)), K, W) < 1).all()


def test_spectrum_stats_known_spectrum():
    s2 = np.array([[4.0, 1.0, 0.0]])
    stats = rs.spectrum_stats(s2, np.array([5.0]), (0.8, 0.9), cer_k=1)
    assert stats["k80"][0] == 1 and stats["k90"][0] == 2 and stats["cer"][0] == pytest.approx(0.8)
    assert stats["stable_rank"][0] == pytest.approx(5 / 4)
    p = np.array([2, 1]) / 3
    assert stats["effective_rank"][0] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    # energy the core misses: k@0.9 is "more than r"
    assert rs.spectrum_stats(s2, np.array([10.0]), (0.9,))["k90"][0] == 4


# --------------------------------------------------------------------------------------------------
# known answers (the Done-when)
# --------------------------------------------------------------------------------------------------


def test_claim_one_supported_when_safety_is_rank_two_and_utility_rank_twenty():
    rng = np.random.default_rng(1)

    def pairs(m):
        Us, Vs = bases(rng, 24, 2)
        Uu, Vu = bases(rng, 24, 20)
        return low_rank_set(rng, Us, Vs, 16, 2) + low_rank_set(rng, Uu, Vu, 16, 4)

    run, evidence = synthetic_run(pairs, 16, 16, n_perm=400)
    frame, text = fv.findings(run, evidence)
    first = frame.iloc[0]
    assert first["claim"] == "I" and first["verdict"] == "supported" and first["p_value"] < 0.01
    assert first["value"] < 0 and first["lo"] <= first["value"] <= first["hi"] and first["hi"] < 0
    assert frame.iloc[1]["verdict"] == "supported"  # effective rank too
    assert frame.iloc[2]["verdict"] == "supported"  # and the sample span's (exact from the Gram)
    assert "I — supported" in text


def test_claim_one_not_shown_when_both_sets_come_from_one_distribution():
    """Safety and utility drawn from one distribution: over 50 seeds the claim-I permutation test (median over
    modules of k@0.9 safety - utility) rejects in at most 10% at alpha = 0.05; the other seeds say 'not shown'."""
    rejections, verdicts = 0, []
    for seed in range(50):
        rng = np.random.default_rng(100 + seed)

        def pairs(m, rng=rng):
            U, V = bases(rng, 16, 6)
            return low_rank_set(rng, U, V, 16, 2)

        run, evidence = synthetic_run(pairs, 8, 8, modules=2, d=16, n_boot=20, n_perm=200, seed=seed)
        first = fv.findings(run, evidence)[0].iloc[0]
        rejections += first["p_value"] < 0.05
        verdicts.append(first["verdict"])
    assert rejections <= 5
    assert verdicts.count("not shown at this n") == 50 - rejections


def _cosine_pairs(rng, sign, n=12, d=16):
    """Safety and utility samples whose population means have cosine ``sign`` x 0.8."""
    U, V = bases(rng, d, 3)
    shared = U[:, :1], V[:, :1]
    safety = [factors(rng, np.hstack([shared[0], U[:, 1:2]]), np.hstack([shared[1], V[:, 1:2]]),
                      np.array([1.0, 0.75]) + 0.2 * rng.standard_normal(2)) for _ in range(n)]
    utility = [factors(rng, np.hstack([shared[0], U[:, 2:3]]), np.hstack([shared[1], V[:, 2:3]]),
                       np.array([sign * 1.0, 0.75]) + 0.2 * rng.standard_normal(2)) for _ in range(n)]
    return safety + utility


@pytest.mark.parametrize("sign, expected", [(-1, "supported"), (+1, "contradicted")])
def test_claim_two_follows_the_sign_of_a_constructed_cosine(sign, expected):
    rng = np.random.default_rng(7)
    run, evidence = synthetic_run(lambda m: _cosine_pairs(rng, sign), 12, 12, d=16, n_perm=50)
    frame, _ = fv.findings(run, evidence)
    row = frame[frame["claim"] == "II"].iloc[0]
    assert row["verdict"] == expected and np.sign(row["value"]) == sign and row["p_value"] < 0.05
    assert fv.claim_verdicts(frame)["II"] == expected


def test_bootstrap_interval_covers_the_population_cosine():
    """Samples G_i = mu_set + noise with known population means: the 95% percentile interval of
    cos(G_s, G_u) covers cos(mu_s, mu_u) in >= 90% of 60 independent draws."""
    rng = np.random.default_rng(11)
    d, n = 6, 24
    mu_s = rng.standard_normal((d, d))
    mu_u = -0.5 * mu_s + rng.standard_normal((d, d))
    truth = float(np.sum(mu_s * mu_u) / np.linalg.norm(mu_s) / np.linalg.norm(mu_u))
    covered = 0
    for _ in range(60):
        G = np.stack([mu_s + 0.5 * rng.standard_normal((d, d)) for _ in range(n)]
                     + [mu_u + 0.5 * rng.standard_normal((d, d)) for _ in range(n)]).reshape(2 * n, -1)
        draws = gram_resampling(G @ G.T, n, 300, 0, int(rng.integers(1 << 30)))["boot.cosine_su"]
        lo, hi = rs.percentile_interval(draws)
        covered += lo <= truth <= hi
    assert covered >= 54


def test_claim_three_one_safety_sample_beats_an_unrelated_sample():
    rng = np.random.default_rng(5)

    def pairs(m):
        Us, Vs = bases(rng, 24, 2)
        Uu, Vu = bases(rng, 24, 8)
        return low_rank_set(rng, Us, Vs, 10, 2) + low_rank_set(rng, Uu, Vu, 10, 3)

    run, evidence = synthetic_run(pairs, 10, 10, n_perm=200)
    frame, _ = fv.findings(run, evidence)
    rows = frame[frame["claim"] == "III"]
    assert list(rows["verdict"][:2]) == ["supported", "supported"]
    assert rows.iloc[1]["value"] > rows.iloc[1]["null"]  # above the random-subspace k/d


# --------------------------------------------------------------------------------------------------
# regressions: the three contradictions of the issue
# --------------------------------------------------------------------------------------------------


def test_a_verdict_never_contradicts_its_own_number():
    """'k@0.9 median 7.5 vs 7 -> supported' came from an unshown count; now the verdict follows the shown value."""
    assert fv.verdict(+0.5, 0.001, 0.0, -1) == "contradicted"
    assert fv.verdict(-0.5, 0.001, 0.0, -1) == "supported"
    assert fv.verdict(-0.5, 0.2, 0.0, -1) == "not shown at this n"
    assert fv.verdict(-0.5, float("nan"), 0.0, -1) == "not tested"


def test_module_evidence_has_intervals_and_corrected_p_values():
    rng = np.random.default_rng(3)
    run, evidence = synthetic_run(lambda m: _cosine_pairs(rng, -1), 12, 12, d=16, modules=2, n_perm=50)
    modules = ev.module_evidence(run.table, evidence)
    for stat in ("safety_k90", "cosine_su", "phi_su", "safety_effective_rank"):
        assert (modules[f"{stat}_lo"] <= modules[stat] + 1e-9).all() and (modules[stat] <= modules[f"{stat}_hi"] + 1e-9).all()
    assert (modules["cosine_su_zero_q"] >= modules["cosine_su_zero_p"]).all()
    assert modules["cosine_su_zero_significant"].all()


def test_k90_certificate_known_values():
    # s2 = (4, 1): CER (0.727, 0.909) of total 5.5; missing 0.5 -> upper bound at k = 1 is
    # (2 + sqrt(0.5))^2 / 5.5 = 1.33 >= 0.9: k could be 1 or 2, not certified
    loose = rs.spectrum_stats(np.array([[4.0, 1.0]]), np.array([5.5]))
    assert loose["k90"][0] == 2 and not loose["k90_certified"][0]
    # missing 0.001: upper bound at k = 1 is (2 + 0.0316)^2 / 5.001 = 0.825 < 0.9: k = 2 is certain
    tight = rs.spectrum_stats(np.array([[4.0, 1.0]]), np.array([5.001]))
    assert tight["k90"][0] == 2 and tight["k90_certified"][0] and tight["captured"][0] == pytest.approx(5 / 5.001)


def test_a_core_too_small_for_the_module_is_not_tested():
    """Rank-20 utility with a 3-direction core: k@0.9 cannot be certified, so claim I says 'not tested' rather
    than deciding from a projected statistic."""
    rng = np.random.default_rng(2)
    pairs = low_rank_set(rng, *bases(rng, 24, 2), 8, 2) + low_rank_set(rng, *bases(rng, 24, 20), 8, 4)
    info = ModuleInfo("model.layers.0.self_attn.q_proj", "q", 0, 24, 24)
    result = analyse_module(info, pairs, 8, 2)
    K = result.arrays["gram"]
    arrays = resample_module(pairs, K, 8, 2, 50, 50, 0, result.row, result.arrays["safety.phi"],
                             result.arrays["safety.top1"], np.full(8, 0.1), core_rank=3)
    assert arrays["certified_k90"][0] < 0.99 and arrays["captured_min"][0] < 0.99
    evidence = evidence_from_arrays([arrays], [info.name], [info.label], 8, 8, 0)
    assert evidence.masked["diff_k90"].all() and np.isnan(evidence.boot["diff_k90"]).all()
    run = types.SimpleNamespace(table=pd.DataFrame([result.row]), run_id="r", config={"n_safety": 8, "n_utility": 8,
                                "top_k": 2}, manifest={"model": {"source": "x-aligned"}})
    frame, _ = fv.findings(run, evidence)
    assert list(frame[frame["claim"] == "I"]["verdict"])[:2] == ["not tested", "not tested"]
    assert "certifies this statistic in none" in frame.iloc[0]["shown"]
    exact = resample_module(pairs, K, 8, 2, 50, 50, 0, result.row, result.arrays["safety.phi"],
                            result.arrays["safety.top1"], np.full(8, 0.1))
    assert exact["certified_k90"][0] == 1.0 and exact["captured_min"][0] > 0.999


def test_span_rank_of_a_subset_equals_the_gram_effective_rank_of_its_block():
    from analysis.engine import geometry as geo
    from analysis.engine.resampling import _span_ranks

    rng = np.random.default_rng(4)
    G = rng.standard_normal((10, 30)) * np.linspace(1, 3, 30)
    K = G @ G.T
    mask = np.r_[np.ones(4), np.zeros(6)][None]
    assert _span_ranks(K, mask)[0] == pytest.approx(geo.gram_effective_rank(K[:4, :4]))
    doubled = np.r_[2.0, 0, 0, 0, 1, 1, 0, 0, 0, 0][None]  # sample 0 twice: the rows sqrt(2) g_0, g_4, g_5
    rows = np.vstack([np.sqrt(2) * G[0], G[4], G[5]])
    assert _span_ranks(K, doubled)[0] == pytest.approx(geo.gram_effective_rank(rows @ rows.T))
