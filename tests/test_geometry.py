"""Known-answer and property tests for analysis.engine.geometry (small sizes: the whole file runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.engine import geometry as g
from analysis.engine.geometry import GeometryError
from analysis.engine.geometry import svd as geometry_svd

FAST = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def rand_orth(rng, n, k):
    """Haar-ish random n x k matrix with orthonormal columns."""
    Q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return Q


def build(s, m, n, seed=0):
    """Matrix U diag(s) V^T with random orthonormal U (m, r), V (n, r)."""
    rng = np.random.default_rng(seed)
    s = np.asarray(s, float)
    U, V = rand_orth(rng, m, s.size), rand_orth(rng, n, s.size)
    return U @ np.diag(s) @ V.T, U, V


def projector(B):
    return B @ B.T


def angle_pair(d, thetas):
    """Q_a = [e_1..e_k], Q_b columns cos(t_i) e_i + sin(t_i) e_{k+i}: principal angles exactly thetas."""
    k = len(thetas)
    Qa = np.eye(d)[:, :k]
    Qb = np.zeros((d, k))
    for i, t in enumerate(thetas):
        Qb[i, i], Qb[k + i, i] = np.cos(t), np.sin(t)
    return Qa, Qb


def hand_metrics(s):
    s = np.sort(np.asarray(s, float))[::-1]
    e = s**2
    p = s / s.sum()
    p = p[p > 0]
    return {
        "cer": np.cumsum(e) / e.sum(),
        "eff": np.exp(-(p * np.log(p)).sum()),
        "stable": e.sum() / e[0],
        "pr": e.sum() ** 2 / (e**2).sum(),
    }


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------


def test_geometry_error_is_value_error():
    assert issubclass(GeometryError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "call",
    [
        lambda M: g.singular_values(M),
        lambda M: g.top_singular(M, 2),
        lambda M: g.factored_svd(M, M),
        lambda M: g.cumulative_energy(np.abs(M[1])),
        lambda M: g.cosine(M, np.ones_like(M)),
        lambda M: g.gram_spectrum(M @ M.T if np.isfinite(M).all() else M),
        lambda M: g.subspace_overlap(M, M),
        lambda M: g.project_orthogonal(M, np.eye(4)[:, :1]),
        lambda M: g.project_conflict(torch.from_numpy(M), np.eye(4)[:, :1], np.eye(4)[:, :1]),
    ],
)
def test_nan_inf_raise(bad, call):
    M = np.eye(4)
    M[1, 2] = bad
    with pytest.raises(GeometryError, match="NaN/Inf"):
        call(M)


def test_torch_input_accepted_and_numpy_returned():
    M, _, _ = build([3.0, 2.0, 1.0], 6, 5)
    s_np = g.singular_values(M)
    s_t = g.singular_values(torch.from_numpy(M).float())
    assert isinstance(s_t, np.ndarray) and s_t.dtype == np.float64
    np.testing.assert_allclose(s_t, s_np, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_k():
    with pytest.raises(GeometryError, match="2-D"):
        g.singular_values(np.ones(3))
    with pytest.raises(GeometryError, match="empty"):
        g.singular_values(np.ones((0, 3)))
    with pytest.raises(GeometryError, match="k must"):
        g.top_singular(np.eye(3), 0)
    with pytest.raises(GeometryError, match="positive integer"):
        g.top_singular(np.eye(3), 1.5)
    with pytest.raises(GeometryError, match="complex"):
        g.singular_values(np.eye(2) * 1j)


# --------------------------------------------------------------------------------------------------
# spectrum and metrics: known answers
# --------------------------------------------------------------------------------------------------

S_KNOWN = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])


def test_spectrum_of_built_matrix():
    M, _, _ = build(S_KNOWN, 12, 9, seed=1)
    s = g.singular_values(M)
    assert s.shape == (9,)
    np.testing.assert_allclose(s[:6], S_KNOWN, rtol=1e-12)
    np.testing.assert_allclose(s[6:], 0, atol=1e-12)


def test_metrics_match_hand_formulas():
    h = hand_metrics(S_KNOWN)
    np.testing.assert_allclose(g.cumulative_energy(S_KNOWN), h["cer"], rtol=1e-14)
    assert g.effective_rank(S_KNOWN) == pytest.approx(h["eff"], rel=1e-14)
    assert g.stable_rank(S_KNOWN) == pytest.approx(h["stable"], rel=1e-14)
    assert g.participation_ratio(S_KNOWN) == pytest.approx(h["pr"], rel=1e-14)
    # energies 25, 9, 4, 1, .25, .01 of total 39.26
    assert g.k_at_energy(S_KNOWN, 0.6) == 1  # 25/39.26 = 0.637
    assert g.k_at_energy(S_KNOWN, 0.86) == 2  # 34/39.26 = 0.866
    assert g.k_at_energy(S_KNOWN, 0.9) == 3  # 38/39.26 = 0.968
    assert g.k_at_energy(S_KNOWN, 38 / 39.26) == 3
    assert g.k_at_energy(S_KNOWN, 34 / 39.26) == 2  # exact boundary counts as reached
    assert g.k_at_energy(S_KNOWN, 1.0) == 6


def test_metrics_on_built_matrix_spectrum_and_unsorted_input():
    M, _, _ = build(S_KNOWN, 10, 8, seed=2)
    s = g.singular_values(M)
    h = hand_metrics(S_KNOWN)
    assert g.effective_rank(s) == pytest.approx(h["eff"], rel=1e-10)
    assert g.stable_rank(s) == pytest.approx(h["stable"], rel=1e-12)
    assert g.participation_ratio(s) == pytest.approx(h["pr"], rel=1e-12)
    np.testing.assert_allclose(g.cumulative_energy(s)[:6], h["cer"], rtol=1e-12)
    # unsorted input is sorted descending first
    np.testing.assert_allclose(g.cumulative_energy(S_KNOWN[::-1]), h["cer"], rtol=1e-14)


def test_flat_spectrum_ranks_equal_count():
    s = np.full(7, 2.5)
    assert g.effective_rank(s) == pytest.approx(7)
    assert g.stable_rank(s) == pytest.approx(7)
    assert g.participation_ratio(s) == pytest.approx(7)
    assert g.k_at_energy(s, 3 / 7) == 3


def test_k_at_energy_eta_one_counts_nonzero_with_trailing_zeros():
    s = np.array([3.0, 1e-3, 0.0, 0.0])
    assert g.k_at_energy(s, 1.0) == 2
    assert g.cumulative_energy(s)[-1] == 1.0


def test_k_at_energy_bad_eta():
    for eta in (0.0, -0.1, 1.1, float("nan")):
        with pytest.raises(GeometryError, match="eta"):
            g.k_at_energy(S_KNOWN, eta)


def test_zero_spectrum_conventions():
    z = np.zeros(5)
    np.testing.assert_array_equal(g.cumulative_energy(z), np.ones(5))
    assert g.k_at_energy(z, 0.9) == 0
    assert g.effective_rank(z) == 0.0
    assert g.stable_rank(z) == 0.0
    assert g.participation_ratio(z) == 0.0
    summ = g.spectrum_summary(z)
    assert summ["k_eta"] == 0 and summ["s1"] == 0.0 and summ["energy"] == 0.0
    # empty spectrum (e.g. factored_svd of all-padding input) behaves the same
    e = np.zeros(0)
    assert g.cumulative_energy(e).shape == (0,)
    assert g.k_at_energy(e) == 0 and g.effective_rank(e) == 0.0
    # zero matrix -> zero singular values (defined)
    np.testing.assert_array_equal(g.singular_values(np.zeros((4, 3))), np.zeros(3))


def test_negative_spectrum_raises():
    with pytest.raises(GeometryError, match=">= 0"):
        g.effective_rank([1.0, -0.5])


def test_spectrum_summary_keys_and_values():
    summ = g.spectrum_summary(S_KNOWN, eta=0.9)
    h = hand_metrics(S_KNOWN)
    assert summ["n"] == 6 and summ["s1"] == 5.0 and summ["eta"] == 0.9
    assert summ["energy"] == pytest.approx(39.26)
    assert summ["top1_energy"] == pytest.approx(25 / 39.26)
    assert summ["k_eta"] == 3
    assert summ["effective_rank"] == pytest.approx(h["eff"])
    assert summ["stable_rank"] == pytest.approx(h["stable"])
    assert summ["participation_ratio"] == pytest.approx(h["pr"])
    assert all(isinstance(v, (int, float)) for v in summ.values())


def test_metrics_scale_invariant_and_no_overflow():
    big = S_KNOWN * 1e200
    assert g.participation_ratio(big) == pytest.approx(g.participation_ratio(S_KNOWN))
    np.testing.assert_allclose(g.cumulative_energy(big), g.cumulative_energy(S_KNOWN))
    assert g.stable_rank(S_KNOWN * 1e-200) == pytest.approx(g.stable_rank(S_KNOWN))


@FAST
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_cer_monotone_ending_at_one(values):
    s = np.array(values)
    cer = g.cumulative_energy(s)
    assert cer.shape == s.shape
    assert np.all(np.diff(cer) >= -1e-15)
    assert cer[-1] == 1.0
    assert np.all((cer >= 0) & (cer <= 1 + 1e-15))
    k = g.k_at_energy(s, 0.9)
    if s.max() > 0:
        assert 1 <= k <= len(s) and cer[k - 1] >= 0.9 - 1e-12
        assert k == 1 or cer[k - 2] < 0.9
        r = np.count_nonzero(s)
        assert 1 - 1e-9 <= g.effective_rank(s) <= r + 1e-9
        assert 1 - 1e-9 <= g.stable_rank(s) <= r + 1e-9
        assert 1 - 1e-9 <= g.participation_ratio(s) <= r + 1e-9
    else:
        assert k == 0


# --------------------------------------------------------------------------------------------------
# top_singular
# --------------------------------------------------------------------------------------------------


def test_top_singular_exact_known():
    M, U, V = build(S_KNOWN, 10, 7, seed=3)
    Uk, sk, Vk = g.top_singular(M, 3)
    assert Uk.shape == (10, 3) and sk.shape == (3,) and Vk.shape == (7, 3)
    np.testing.assert_allclose(sk, S_KNOWN[:3], rtol=1e-12)
    np.testing.assert_allclose(projector(Uk), projector(U[:, :3]), atol=1e-10)
    np.testing.assert_allclose(projector(Vk), projector(V[:, :3]), atol=1e-10)
    np.testing.assert_allclose(Uk @ np.diag(sk) @ Vk.T, U[:, :3] @ np.diag(S_KNOWN[:3]) @ V[:, :3].T, atol=1e-10)


def test_top_singular_k_clipped_and_beyond_rank():
    M, U, _ = build([2.0, 1.0], 6, 4, seed=4)  # rank 2
    Uk, sk, Vk = g.top_singular(M, 10)  # clipped to min(6, 4) = 4
    assert Uk.shape == (6, 4) and sk.shape == (4,) and Vk.shape == (4, 4)
    np.testing.assert_allclose(sk, [2, 1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(Uk.T @ Uk, np.eye(4), atol=1e-12)  # completion is orthonormal
    # orthonormal_basis drops the zero-singular-value directions
    B = g.orthonormal_basis(M, k=10)
    assert B.shape == (6, 2)
    np.testing.assert_allclose(projector(B), projector(U), atol=1e-10)


def test_top_singular_zero_matrix():
    Uk, sk, Vk = g.top_singular(np.zeros((5, 3)), 2)
    np.testing.assert_array_equal(sk, [0, 0])
    np.testing.assert_allclose(Uk.T @ Uk, np.eye(2), atol=1e-12)
    assert g.orthonormal_basis(np.zeros((5, 3))).shape == (5, 0)


def test_top_singular_randomized_matches_exact_and_is_deterministic(monkeypatch):
    rng = np.random.default_rng(5)
    s = np.concatenate([[50.0, 30, 20, 10], 0.1 * rng.random(100)])
    M, _, _ = build(s, 300, 320, seed=6)
    U1, s1, V1 = g.top_singular(M, 4, method="randomized")
    U2, s2, V2 = g.top_singular(M, 4, method="exact")
    np.testing.assert_allclose(s1, s2, rtol=1e-8)
    np.testing.assert_allclose(projector(U1), projector(U2), atol=1e-7)
    np.testing.assert_allclose(projector(V1), projector(V2), atol=1e-7)
    np.testing.assert_allclose(U1, U2, atol=1e-6)  # same sign convention
    U3, s3, V3 = g.top_singular(M, 4, method="randomized")
    np.testing.assert_array_equal(U1, U3)
    np.testing.assert_array_equal(s1, s3)
    # "auto" picks randomized for big matrices with k << min(m, n), exact otherwise
    np.testing.assert_array_equal(g.top_singular(M, 4)[0], U2)
    monkeypatch.setattr(geometry_svd, "RANDOMIZED_MIN_DIM", 200)  # read where top_singular lives
    np.testing.assert_array_equal(g.top_singular(M, 4)[0], U1)
    np.testing.assert_array_equal(g.top_singular(M, 40)[0], g.top_singular(M, 40, method="exact")[0])
    # a zero matrix never goes through the randomized range finder
    assert np.all(g.top_singular(np.zeros((300, 300)), 3, method="randomized")[1] == 0)


def test_top_singular_signs_deterministic():
    M, _, _ = build(S_KNOWN, 8, 8, seed=7)
    U, _, V = g.top_singular(M, 4)
    idx = np.argmax(np.abs(U), axis=0)
    assert np.all(U[idx, np.arange(4)] > 0)


# --------------------------------------------------------------------------------------------------
# factored SVD
# --------------------------------------------------------------------------------------------------


def _factors(seed, T=7, d_out=12, d_in=15, pad=3):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((T, d_out))
    A = rng.standard_normal((T, d_in))
    D = np.vstack([D, np.zeros((pad, d_out))])  # padding: zero output gradients ...
    A = np.vstack([A, rng.standard_normal((pad, d_in))])  # ... with nonzero activations
    return D, A


@pytest.mark.parametrize("method", ["auto", "qr", "dense"])
def test_factored_svd_matches_dense(method):
    D, A = _factors(8)
    G = D.T @ A
    U, s, V = g.factored_svd(D, A, method=method)
    assert U.shape == (12, 7) and s.shape == (7,) and V.shape == (15, 7)  # r = T' = 7 (padding dropped)
    Ud, sd, Vdt = np.linalg.svd(G)
    np.testing.assert_allclose(s, sd[:7], rtol=1e-8)
    np.testing.assert_allclose(projector(U), projector(Ud[:, :7]), atol=1e-10)
    np.testing.assert_allclose(projector(V), projector(Vdt[:7].T), atol=1e-10)
    np.testing.assert_allclose(U @ np.diag(s) @ V.T, G, atol=1e-10)


def test_factored_svd_top_k_vs_torch_and_exact_types():
    D, A = _factors(9, T=5, d_out=20, d_in=9, pad=2)
    Dt, At = torch.from_numpy(D), torch.from_numpy(A)
    U, s, V = g.factored_svd(Dt, At, k=3)
    Ut, st_, Vht = torch.linalg.svd(Dt.T @ At)
    np.testing.assert_allclose(s, st_[:3].numpy(), rtol=1e-8)
    np.testing.assert_allclose(projector(U), projector(Ut[:, :3].numpy()), atol=1e-10)
    np.testing.assert_allclose(projector(V), projector(Vht[:3].T.numpy()), atol=1e-10)
    # k beyond the rank bound is clipped to min(T', d_out, d_in)
    assert g.factored_svd(D, A, k=50)[1].shape == (5,)


def test_factored_svd_T_larger_than_dims():
    D, A = _factors(10, T=30, d_out=6, d_in=4, pad=0)
    U, s, V = g.factored_svd(D, A)
    assert s.shape == (4,)
    np.testing.assert_allclose(s, np.linalg.svd(D.T @ A, compute_uv=False), rtol=1e-8)


def test_factored_svd_all_padding_is_empty():
    U, s, V = g.factored_svd(np.zeros((4, 5)), np.ones((4, 3)))
    assert U.shape == (5, 0) and s.shape == (0,) and V.shape == (3, 0)
    assert g.effective_rank(s) == 0.0 and g.k_at_energy(s) == 0


def test_factored_svd_bad_input():
    with pytest.raises(GeometryError, match="same number of rows"):
        g.factored_svd(np.ones((3, 4)), np.ones((2, 4)))
    D, A = _factors(11)
    A[0, 0] = np.nan
    with pytest.raises(GeometryError, match="NaN/Inf"):
        g.factored_svd(D, A)


def test_stack_factors_and_many():
    pairs = [_factors(s, T=3 + s, d_out=8, d_in=6, pad=1) for s in range(4)]
    w = np.array([0.5, 1.0, 2.0, -1.0])
    Dc, Ac = g.stack_factors(pairs, w)
    dense = sum(wi * D.T @ A for wi, (D, A) in zip(w, pairs))
    np.testing.assert_allclose(Dc.T @ Ac, dense, atol=1e-12)
    _, s, _ = g.factored_svd(Dc, Ac)
    np.testing.assert_allclose(s, np.linalg.svd(dense, compute_uv=False)[: s.size], rtol=1e-8)
    many = g.factored_svd_many(pairs, k=2)
    assert len(many) == 4
    for (D, A), (_, si, _) in zip(pairs, many):
        np.testing.assert_allclose(si, np.linalg.svd(D.T @ A, compute_uv=False)[:2], rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# subspaces: overlap, angles, random baseline
# --------------------------------------------------------------------------------------------------

THETAS = np.array([0.0, 0.3, 0.7, 1.2, np.pi / 2])


def test_principal_angles_and_overlap_known():
    Qa, Qb = angle_pair(12, THETAS)
    ang = g.principal_angles(Qa, Qb)
    np.testing.assert_allclose(ang, THETAS, atol=1e-12)  # ascending
    assert g.subspace_overlap(Qa, Qb) == pytest.approx(np.mean(np.cos(THETAS) ** 2), abs=1e-14)
    assert g.subspace_overlap(Qa, Qa) == pytest.approx(1.0)
    assert g.subspace_overlap(Qa, np.eye(12)[:, 5:10]) == 0.0


def test_principal_angles_small_angles_accurate():
    Qa, Qb = angle_pair(6, [1e-9, 2e-6])
    np.testing.assert_allclose(g.principal_angles(Qa, Qb), [1e-9, 2e-6], rtol=1e-6)


def test_overlap_unequal_dims_uses_min_k():
    Qa = np.eye(10)[:, :2]
    Qb = np.eye(10)[:, :5]  # contains span(Qa)
    assert g.subspace_overlap(Qa, Qb) == pytest.approx(1.0)
    assert g.principal_angles(Qa, Qb).shape == (2,)


def test_overlap_requires_orthonormal_and_nonempty():
    with pytest.raises(GeometryError, match="orthonormal"):
        g.subspace_overlap(2 * np.eye(5)[:, :2], np.eye(5)[:, :2])
    with pytest.raises(GeometryError, match="empty"):
        g.subspace_overlap(np.zeros((5, 0)), np.eye(5)[:, :2])
    with pytest.raises(GeometryError, match="different spaces"):
        g.subspace_overlap(np.eye(5)[:, :2], np.eye(4)[:, :2])
    with pytest.raises(GeometryError, match="zero"):
        g.principal_angles(np.zeros((5, 2)), np.eye(5)[:, :2])


def test_random_subspaces_overlap_near_k_over_d():
    d, k = 60, 4
    base = g.random_overlap_baseline(d, k, n_draws=300, seed=1)
    assert base["expected"] == k / d
    assert abs(base["mean"] - k / d) < 4 * base["std"] / np.sqrt(300)
    assert base["q05"] < k / d < base["q95"]
    rng = np.random.default_rng(123)
    phis = [g.subspace_overlap(rand_orth(rng, d, k), rand_orth(rng, d, k)) for _ in range(40)]
    inside = np.mean([(base["q05"] - 1e-3) <= p <= (base["q95"] + 1e-3) for p in phis])
    assert inside >= 0.7  # about 90% expected
    assert abs(np.mean(phis) - k / d) < 4 * base["std"] / np.sqrt(40)
    assert g.random_overlap_baseline(d, k, n_draws=50, seed=1) == g.random_overlap_baseline(d, k, n_draws=50, seed=1)
    with pytest.raises(GeometryError):
        g.random_overlap_baseline(3, 4)


@st.composite
def subspace_pairs(draw):
    d = draw(st.integers(2, 12))
    ka = draw(st.integers(1, d))
    kb = draw(st.integers(1, d))
    seed = draw(st.integers(0, 2**32 - 1))
    return d, ka, kb, seed


@FAST
@given(subspace_pairs())
def test_overlap_and_angles_properties(args):
    d, ka, kb, seed = args
    rng = np.random.default_rng(seed)
    Qa, Qb = rand_orth(rng, d, ka), rand_orth(rng, d, kb)
    phi = g.subspace_overlap(Qa, Qb)
    assert 0.0 <= phi <= 1.0
    ang = g.principal_angles(Qa, Qb)
    assert ang.shape == (min(ka, kb),)
    assert np.all(np.diff(ang) >= -1e-12) and np.all((ang >= 0) & (ang <= np.pi / 2))
    assert phi == pytest.approx(np.mean(np.cos(ang) ** 2), abs=1e-10)
    # invariance to a change of basis inside each subspace: Q -> Q R, R orthogonal
    Ra, Rb = rand_orth(rng, ka, ka), rand_orth(rng, kb, kb)
    assert g.subspace_overlap(Qa @ Ra, Qb @ Rb) == pytest.approx(phi, abs=1e-10)
    np.testing.assert_allclose(g.principal_angles(Qa @ Ra, Qb @ Rb), ang, atol=1e-7)
    # symmetric
    assert g.subspace_overlap(Qb, Qa) == pytest.approx(phi, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# cosines
# --------------------------------------------------------------------------------------------------


def test_cosine_known_and_torch():
    a = np.array([[1.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [0.0, 0.0]])
    assert g.cosine(a, b) == pytest.approx(1 / np.sqrt(2))
    assert g.cosine(a, -a) == -1.0
    assert g.cosine(torch.tensor(a), torch.tensor(b)) == pytest.approx(1 / np.sqrt(2))
    assert g.cosine(a * 1e300, b * 1e300) == pytest.approx(1 / np.sqrt(2))


def test_cosine_zero_norm_and_shape_raise():
    with pytest.raises(GeometryError, match="zero"):
        g.cosine(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(GeometryError, match="shapes"):
        g.cosine(np.ones((2, 2)), np.ones((2, 3)))


def test_cross_cosines_from_gram_matches_explicit():
    rng = np.random.default_rng(12)
    Ga = rng.standard_normal((4, 5, 3))
    Gb = rng.standard_normal((6, 5, 3))
    Xa, Xb = Ga.reshape(4, -1), Gb.reshape(6, -1)
    C = g.cross_cosines_from_gram(Xa @ Xb.T, np.sum(Xa**2, 1), np.sum(Xb**2, 1))
    explicit = np.array([[g.cosine(x, y) for y in Gb] for x in Ga])
    np.testing.assert_allclose(C, explicit, atol=1e-12)
    Kaa = Xa @ Xa.T
    np.testing.assert_allclose(g.gram_cosines(Kaa), [[g.cosine(x, y) for y in Ga] for x in Ga], atol=1e-12)
    with pytest.raises(GeometryError, match="indices \\[1\\]"):
        g.cross_cosines_from_gram(np.zeros((2, 2)), np.array([1.0, 0.0]), np.ones(2))


def test_fraction_negative_and_per_layer():
    assert g.fraction_negative(np.array([[-0.5, 0.0], [0.2, -1e-9]])) == 0.5
    with pytest.raises(GeometryError):
        g.fraction_negative(np.zeros(0))
    eye = np.eye(3)
    out = g.cosines_per_layer({"l0": (eye, eye), "l1": (eye, -eye)})
    assert out == {"l0": pytest.approx(1.0), "l1": pytest.approx(-1.0)}
    with pytest.raises(GeometryError, match="l2"):
        g.cosines_per_layer({"l2": (eye, np.zeros((3, 3)))})


# --------------------------------------------------------------------------------------------------
# Gram (sample) view
# --------------------------------------------------------------------------------------------------


def test_gram_spectrum_matches_svd_of_stacked():
    rng = np.random.default_rng(13)
    X = rng.standard_normal((7, 40))  # rows = vec(G_i)
    s = g.gram_spectrum(X @ X.T)
    np.testing.assert_allclose(s, np.linalg.svd(X, compute_uv=False), rtol=1e-10)
    assert g.gram_effective_rank(X @ X.T) == pytest.approx(g.effective_rank(np.linalg.svd(X, compute_uv=False)))
    # rank deficient: duplicates -> zeros (clipped, never NaN)
    Xd = np.vstack([X[:3], X[:3]])
    sd = g.gram_spectrum(Xd @ Xd.T)
    assert np.all(np.isfinite(sd)) and np.all(sd >= 0)
    np.testing.assert_allclose(sd[:3], np.linalg.svd(Xd, compute_uv=False)[:3], rtol=1e-10)
    np.testing.assert_allclose(sd[3:], 0, atol=1e-6 * sd[0])
    np.testing.assert_array_equal(g.gram_spectrum(np.zeros((3, 3))), np.zeros(3))
    assert g.gram_effective_rank(np.zeros((3, 3))) == 0.0


def test_gram_spectrum_rejects_non_gram():
    with pytest.raises(GeometryError, match="symmetric"):
        g.gram_spectrum(np.array([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(GeometryError, match="semi-definite"):
        g.gram_spectrum(np.diag([1.0, -1.0]))
    with pytest.raises(GeometryError, match="square"):
        g.gram_spectrum(np.ones((2, 3)))


def _gram_blocks(Xs, Xu):
    return Xs @ Xs.T, Xs @ Xu.T, Xu @ Xu.T


def test_gram_principal_angles_match_explicit_spans():
    rng = np.random.default_rng(14)
    d = 30
    Xs = rng.standard_normal((4, d))
    Xu = rng.standard_normal((6, d))
    Xu[:2] = rng.standard_normal((2, 2)) @ Xs[:2] + 1e-2 * rng.standard_normal((2, d))  # near-shared
    ang = g.gram_principal_angles(*_gram_blocks(Xs, Xu))
    ref = g.principal_angles(Xs.T, Xu.T)
    assert ang.shape == (4,)
    np.testing.assert_allclose(ang, ref, atol=1e-7)
    Qs, Qu = sla.orth(Xs.T), sla.orth(Xu.T)
    assert g.gram_subspace_overlap(*_gram_blocks(Xs, Xu)) == pytest.approx(g.subspace_overlap(Qs, Qu), abs=1e-10)


def test_gram_principal_angles_rank_deficient_blocks():
    rng = np.random.default_rng(15)
    d = 25
    base_s = rng.standard_normal((3, d))
    Xs = np.vstack([base_s, base_s[:2] * 2.0, base_s[0] - base_s[1]])  # 6 samples, rank 3
    Xu = np.vstack([rng.standard_normal((2, d)), base_s[2]])  # shares one direction
    Xu = np.vstack([Xu, Xu[0]])  # duplicated sample: rank 3 of 4
    ang = g.gram_principal_angles(*_gram_blocks(Xs, Xu))
    ref = g.principal_angles(Xs.T, Xu.T)  # scipy orth drops the deficiency too
    assert ang.shape == ref.shape == (3,)
    np.testing.assert_allclose(ang, ref, atol=1e-6)
    assert ang[0] < 1e-6  # the shared direction
    assert np.all(np.isfinite(ang))
    with pytest.raises(GeometryError, match="zero"):
        g.gram_principal_angles(np.zeros((2, 2)), np.zeros((2, 3)), Xu[:3] @ Xu[:3].T)


def test_gram_basis_floor_is_relative():
    lam = np.array([1.0, 1e-5, 1e-12, 0.0])
    E, L = g.gram_basis(np.diag(lam) * 1e6)
    np.testing.assert_allclose(L, [1e6, 10.0])  # 1e-12 relative is below the 1e-10 floor
    assert E.shape == (4, 2)
    E2, L2 = g.gram_basis(np.diag(lam), floor=1e-13)
    assert L2.size == 3


# --------------------------------------------------------------------------------------------------
# single-sample overlap and overlap_vs_n
# --------------------------------------------------------------------------------------------------


def test_single_sample_overlap_known():
    Qa, Qb = angle_pair(10, [0.2, 0.9])
    out = g.single_sample_overlap(Qa, Qb)
    assert out["phi"] == pytest.approx((np.cos(0.2) ** 2 + np.cos(0.9) ** 2) / 2)
    assert out["top1_abs_cos"] == pytest.approx(np.cos(0.2))
    assert out["k"] == 2
    assert g.single_sample_overlap(-Qa, Qb)["top1_abs_cos"] == pytest.approx(np.cos(0.2))


def _shared_direction_factors(n, seed, d_out=10, d_in=8, T=3, signal=3.0, noise=0.5):
    """Per-sample factors whose gradients share u v^T (first token row) plus per-token noise."""
    rng = np.random.default_rng(seed)
    u = np.zeros(d_out)
    u[0] = 1.0
    v = np.zeros(d_in)
    v[0] = 1.0
    pairs = []
    for _ in range(n):
        D = noise * rng.standard_normal((T, d_out))
        A = rng.standard_normal((T, d_in))
        D = np.vstack([D, signal * u, np.zeros((1, d_out))])  # last row: padding
        A = np.vstack([A, v, rng.standard_normal((1, d_in))])
        pairs.append((D, A))
    return pairs, u


def test_overlap_vs_n_rises_with_n_and_is_deterministic():
    pairs, u = _shared_direction_factors(40, seed=16)
    ns = [1, 3, 10, 40]
    out = g.overlap_vs_n(pairs, k=1, ns=ns, n_boot=15, seed=3)
    assert list(out["n"]) == ns and out["phi"].shape == (4, 15)
    m = out["mean"]
    assert m[0] < 0.5 and m[2] > 0.9  # one sample is noisy, ten find the shared direction
    assert np.all(np.diff(m) > -1e-12)
    assert m[-1] == pytest.approx(1.0)  # n = N: every subset is the full batch
    assert np.all(np.diff(out["top1_mean"]) > -1e-12)
    assert np.all(out["q05"] <= out["mean"] + 1e-12) and np.all(out["mean"] <= out["q95"] + 1e-12)
    assert out["baseline"] == pytest.approx(1 / 10)
    # the batch direction is the shared one
    U, _, _ = g.factored_svd(*g.stack_factors(pairs), k=1)
    assert abs(U[:, 0] @ u) > 0.9
    again = g.overlap_vs_n(pairs, k=1, ns=ns, n_boot=15, seed=3)
    for key in ("mean", "q05", "q95", "phi", "top1_mean"):
        np.testing.assert_array_equal(out[key], again[key])
    # per-n streams: results for n do not depend on the other sizes requested
    solo = g.overlap_vs_n(pairs, k=1, ns=[10], n_boot=15, seed=3)
    np.testing.assert_array_equal(solo["phi"][0], out["phi"][2])
    other = g.overlap_vs_n(pairs, k=1, ns=[10], n_boot=15, seed=4)
    assert not np.array_equal(other["phi"], solo["phi"])


def test_overlap_vs_n_dense_and_callable_agree_with_factored():
    pairs, _ = _shared_direction_factors(12, seed=17)
    dense = np.stack([D.T @ A for D, A in pairs])
    kw = dict(k=2, ns=[1, 4, 12], n_boot=6, seed=0)
    f = g.overlap_vs_n(pairs, **kw)
    d = g.overlap_vs_n(dense, **kw)
    d_list = g.overlap_vs_n(list(torch.from_numpy(dense)), **kw)
    c = g.overlap_vs_n(lambda idx: dense[idx].mean(axis=0), n_samples=12, **kw)
    for other in (d, d_list, c):
        np.testing.assert_allclose(other["phi"], f["phi"], atol=1e-8)
    r = g.overlap_vs_n(pairs, side="right", **kw)
    assert r["baseline"] == pytest.approx(2 / 8)


def test_overlap_vs_n_bad_input():
    pairs, _ = _shared_direction_factors(5, seed=18)
    with pytest.raises(GeometryError, match="ns"):
        g.overlap_vs_n(pairs, k=1, ns=[6])
    with pytest.raises(GeometryError, match="n_samples"):
        g.overlap_vs_n(lambda idx: np.eye(3), k=1, ns=[1])
    with pytest.raises(GeometryError, match="side"):
        g.overlap_vs_n(pairs, k=1, ns=[1], side="up")


# --------------------------------------------------------------------------------------------------
# SPF projections
# --------------------------------------------------------------------------------------------------


def _safety_basis(seed, m=9, p=7, k=3):
    Gs, _, _ = build([4.0, 2.0, 1.0, 0.5], m, p, seed=seed)
    U, _, V = g.top_singular(Gs, k)
    return U, V


def test_project_conflict_known_answer():
    U, V = _safety_basis(19)
    c_true = np.array([-2.0, 1.5, -0.5])
    rng = np.random.default_rng(20)
    rest = rng.standard_normal((9, 7))
    rest -= U @ (U.T @ rest)  # orthogonal to every u_j: no B_j components
    Gu = U @ np.diag(c_true) @ V.T + rest
    Gp, frac = g.project_conflict(Gu, U, V)
    c_after = np.einsum("ij,ik,jk->k", Gp, U, V)
    np.testing.assert_allclose(c_after, [0.0, 1.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(Gp, Gu - U @ np.diag([-2.0, 0, -0.5]) @ V.T, atol=1e-12)
    assert frac == pytest.approx(np.sqrt(2.0**2 + 0.5**2) / np.linalg.norm(Gu))


def test_project_conflict_no_conflict_unchanged():
    U, V = _safety_basis(21)
    Gu = U @ np.diag([1.0, 0.2, 3.0]) @ V.T + 0.1 * np.random.default_rng(0).standard_normal((9, 7))
    c = np.einsum("ij,ik,jk->k", Gu, U, V)
    assert np.all(c > 0)
    Gp, frac = g.project_conflict(Gu, U, V)
    np.testing.assert_array_equal(Gp, Gu)
    assert frac == 0.0


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_projection_properties(seed, k):
    rng = np.random.default_rng(seed)
    m, p = 8, 6
    U, V = rand_orth(rng, m, k), rand_orth(rng, p, k)
    Gu = rng.standard_normal((m, p))
    Gc, fc = g.project_conflict(Gu, U, V)
    assert np.all(np.einsum("ij,ik,jk->k", Gc, U, V) >= -1e-12)
    assert fc == pytest.approx(np.linalg.norm(Gu - Gc) / np.linalg.norm(Gu))
    Go, fo = g.project_orthogonal(Gu, U)
    np.testing.assert_allclose(U.T @ Go, 0, atol=1e-12)
    np.testing.assert_allclose(np.einsum("ij,ik,jk->k", Go, U, V), 0, atol=1e-12)
    assert fo == pytest.approx(np.linalg.norm(U.T @ Gu) / np.linalg.norm(Gu))
    assert 0 <= fc <= fo + 1e-12 <= 1 + 1e-12  # conflict removes a subset of what orthogonal removes


def test_project_orthogonal_known_and_unchanged():
    U = np.eye(5)[:, :2]
    Gu = np.arange(15, dtype=float).reshape(5, 3) + 1
    Go, frac = g.project_orthogonal(Gu, U)
    expected = Gu.copy()
    expected[:2] = 0
    np.testing.assert_allclose(Go, expected)
    assert frac == pytest.approx(np.linalg.norm(Gu[:2]) / np.linalg.norm(Gu))
    G_perp = expected
    Gp2, f2 = g.project_orthogonal(G_perp, U)
    np.testing.assert_array_equal(Gp2, G_perp)
    assert f2 == 0.0


def test_projections_zero_gradient():
    U, V = _safety_basis(22)
    for Gp, frac in (g.project_conflict(np.zeros((9, 7)), U, V), g.project_orthogonal(np.zeros((9, 7)), U)):
        np.testing.assert_array_equal(Gp, 0)
        assert frac == 0.0


def test_projections_torch_native():
    U, V = _safety_basis(23)
    rng = np.random.default_rng(24)
    Gu = rng.standard_normal((9, 7))
    Gt = torch.from_numpy(Gu).float()
    Ut, Vt = torch.from_numpy(U).float(), torch.from_numpy(V).float()
    Gc, fc = g.project_conflict(Gt, Ut, Vt)
    assert isinstance(Gc, torch.Tensor) and Gc.dtype == torch.float32 and Gc.shape == (9, 7)
    ref, fref = g.project_conflict(Gu, U, V)
    assert isinstance(ref, np.ndarray)
    np.testing.assert_allclose(Gc.numpy(), ref, atol=1e-5)
    assert fc == pytest.approx(fref, abs=1e-5)
    Go, fo = g.project_orthogonal(Gt.bfloat16(), U)  # numpy basis with a torch gradient is fine
    assert isinstance(Go, torch.Tensor) and Go.dtype == torch.bfloat16
    ref_o, _ = g.project_orthogonal(Gu, U)
    np.testing.assert_allclose(Go.float().numpy(), ref_o, atol=5e-2)
    # gradients are not tracked by the projection
    Gr = torch.from_numpy(Gu).requires_grad_()
    assert not g.project_orthogonal(Gr, Ut.double())[0].requires_grad


def test_projections_bad_input():
    U, V = _safety_basis(25)
    with pytest.raises(GeometryError, match="orthonormal"):
        g.project_orthogonal(np.ones((9, 7)), 2 * U)
    with pytest.raises(GeometryError, match="does not match"):
        g.project_conflict(np.ones((9, 7)), U, V[:5])
    with pytest.raises(GeometryError, match="same k"):
        g.project_conflict(np.ones((9, 7)), U, V[:, :2])
    Gt = torch.ones(9, 7)
    Gt[0, 0] = float("inf")
    with pytest.raises(GeometryError, match="NaN/Inf"):
        g.project_orthogonal(Gt, torch.from_numpy(U))


# --------------------------------------------------------------------------------------------------
# factored_svd_batched: same as factored_svd per sample
# --------------------------------------------------------------------------------------------------


def _assert_same_svd(got, want, d_out):
    U, s, V = got
    U0, s0, V0 = want
    assert s.shape == s0.shape and U.shape == U0.shape and V.shape == V0.shape
    np.testing.assert_allclose(s, s0, rtol=1e-8, atol=1e-12 * max(1.0, s0[0] if s0.size else 1.0))
    if s.size:
        assert np.allclose(U.T @ U, np.eye(s.size), atol=1e-8)
        # same subspaces (values here are distinct): the projectors agree
        np.testing.assert_allclose(U @ U.T, U0 @ U0.T, atol=1e-8)
        np.testing.assert_allclose(V @ V.T, V0 @ V0.T, atol=1e-8)


def test_factored_svd_batched_matches_dense_and_per_sample():
    rng = np.random.default_rng(7)
    d_out, d_in, k = 40, 24, 5
    pairs = []
    for T in (9, 3, 12, 1, 7):  # different T, one with T < k
        D, A = rng.standard_normal((T + 2, d_out)), rng.standard_normal((T + 2, d_in))
        D[-1] = 0  # padding rows are dropped
        A[-2] = 0
        pairs.append((D, A))
    out = g.factored_svd_batched(pairs, k)
    assert len(out) == len(pairs)
    for (D, A), got in zip(pairs, out):
        _assert_same_svd(got, g.factored_svd(D, A, k), d_out)
        s_dense = sla.svdvals(D.T @ A)[: got[1].size]
        np.testing.assert_allclose(got[1], s_dense, rtol=1e-8)
        U, s, V = got
        np.testing.assert_allclose(U.T @ (D.T @ A) @ V, np.diag(s), atol=1e-9 * s[0])


def test_factored_svd_batched_rank_deficient_torch_and_empty():
    rng = np.random.default_rng(8)
    T, d_out, d_in, k = 10, 30, 20, 6
    D = rng.standard_normal((T, 2)) @ rng.standard_normal((2, d_out))  # rank 2 < k
    A = rng.standard_normal((T, d_in))
    D2, A2 = rng.standard_normal((T, d_out)), rng.standard_normal((T, 3)) @ rng.standard_normal((3, d_in))
    pairs = [(torch.tensor(D), torch.tensor(A)), (D2, A2), (np.zeros((4, d_out)), np.ones((4, d_in)))]
    out = g.factored_svd_batched(pairs, k)
    for (Dp, Ap), got in zip(pairs[:2], out[:2]):
        want = g.factored_svd(Dp, Ap, k)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-8, atol=1e-10 * want[1][0])
        r = int(np.sum(want[1] > 1e-8 * want[1][0]))
        assert r in (2, 3)
        np.testing.assert_allclose(got[0][:, :r] @ got[0][:, :r].T, want[0][:, :r] @ want[0][:, :r].T, atol=1e-8)
        assert np.allclose(got[0].T @ got[0], np.eye(got[0].shape[1]), atol=1e-8)
    assert out[2][1].shape == (0,) and out[2][0].shape == (d_out, 0) and out[2][2].shape == (d_in, 0)
    assert g.factored_svd_batched([], 3) == []
    with pytest.raises(GeometryError):
        g.factored_svd_batched([(np.ones((3, 4)), np.ones((3, 5))), (np.ones((3, 6)), np.ones((3, 5)))], 2)
    with pytest.raises(GeometryError):
        g.factored_svd_batched([(np.ones((3, 4)), np.ones((2, 5)))], 2)
    with pytest.raises(GeometryError):
        g.factored_svd_batched([(np.ones((3, 4)), np.ones((3, 5)))], 0)


def test_factored_svd_batched_rank_above_k_but_below_T():
    rng = np.random.default_rng(9)
    T, d_out, d_in, k = 16, 30, 25, 4
    D = rng.standard_normal((T, 6)) @ rng.standard_normal((6, d_out))  # rank 6: k <= rank < T
    A = rng.standard_normal((T, 9)) @ rng.standard_normal((9, d_in))
    got, want = g.factored_svd_batched([(D, A)], k)[0], g.factored_svd(D, A, k)
    _assert_same_svd(got, want, d_out)
    np.testing.assert_allclose(got[1], sla.svdvals(D.T @ A)[:k], rtol=1e-8)


def test_factored_svd_batched_float32_torch_and_nan():
    rng = np.random.default_rng(10)
    pairs = [(torch.tensor(rng.standard_normal((T, 12)), dtype=torch.float32),
              torch.tensor(rng.standard_normal((T, 9)), dtype=torch.float32)) for T in (5, 8)]
    for (D, A), got in zip(pairs, g.factored_svd_batched(pairs, 3)):
        _assert_same_svd(got, g.factored_svd(D, A, 3), 12)
    bad = [(np.full((3, 4), np.nan), np.ones((3, 5)))]
    with pytest.raises(GeometryError):
        g.factored_svd_batched(bad, 2)
