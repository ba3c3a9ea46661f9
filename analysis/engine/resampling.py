"""Bootstrap intervals and permutation null of one module's metrics, and the run-wide evidence built from them.

:func:`resample_module` runs at analysis time, beside the point estimates (it needs the factors): B bootstrap
replicates (each set resampled with replacement at its own size) and P permutations (pooled samples split at
random with the original sizes), the same rows for every module of a run (seeded by the run's seed), so that
across-module summaries resample prompts, not modules. Spectral metrics of the resampled means come from the
module's :class:`~analysis.engine.geometry.resampling.SpectralCore` (m = CORE_RANK directions per side; on
SmolLM2, n = 8 + 8, 128 tokens, it holds >= 97% of every replicate's energy in layer 10's q_proj but only
>= 74% in its gate_proj: a mean of many prompts is high-rank; hence the certificates below);
cosines and pair shares are exact from the Gram matrix. Stored arrays (``resampling.safetensors``, key
``<kind>.<stat>/<module>``):

* ``boot.<stat>`` (B,): replicates of a per-module statistic (BOOT_STATS), re-centred: shifted so that their
  median is the exact point estimate (their interval: width from the bootstrap, position from the estimate).
  Resampling with replacement repeats prompts, and a mean of fewer distinct prompts has a lower rank and a
  larger share of per-prompt noise: uncentred, utility's k@0.9 interval sat wholly below its estimate on
  synthetic rank-20 data, and on SmolLM2 (n = 32) cos(G_s, G_u)'s sat below its estimate in most modules.
* ``certified_k90`` (1,): share of all replicates (observed, bootstrap, permutations) whose k@0.9 the core
  certifies exact (``geometry.resampling.spectrum_stats``); ``captured_min`` (1,): the smallest share of a
  replicate mean's energy inside the core. :class:`Evidence` keeps a module's k@0.9 replicates only when
  certified_k90 >= K90_CERTIFIED and its other spectral ones only when captured_min >= CORE_EXACT.
* ``perm.<stat>`` (P,) and ``core.<stat>`` (1,): the permutation null of PERM_STATS and the observed value
  computed the same way (in the core), for an exact permutation p-value.
* ``captured`` (B,): the smaller share of a bootstrap replicate's two means' energy inside the core (1 = exact).
* ``utility_phi_to_safety`` (n_u,): phi of each utility sample's top-k subspace with the *safety* batch top-k
  (claim III's unrelated-sample baseline).

:func:`gram_resampling` gives the Gram-only part (cosine, pair shares) for runs stored before resampling
existed. :class:`Evidence` gathers a run's arrays into (modules x draws) matrices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.engine.geometry import resampling as rs
from analysis.engine.geometry import subspaces as sub

__all__ = ["BOOT_STATS", "CORE_RANK", "PERM_STATS", "RESAMPLING_FILE", "Evidence", "gram_resampling",
           "load_evidence", "resample_module"]

#: Directions per side of the spectral core (exact when the stacked factors have rank <= this).
CORE_RANK = 128
#: A module's k@0.9 replicates are kept when at least this share of them is certified exact.
K90_CERTIFIED = 0.99
#: A module's other spectral replicates (effective / stable rank, CER, phi_su) are kept when every replicate
#: mean has at least this share of its energy inside the core.
CORE_EXACT = 0.999
RESAMPLING_FILE = "resampling.safetensors"
#: Per-module statistics with bootstrap replicates. diff_* = safety - utility.
BOOT_STATS = ("safety_k90", "utility_k90", "diff_k90", "safety_effective_rank", "utility_effective_rank",
              "diff_effective_rank", "safety_stable_rank", "utility_stable_rank", "safety_cer", "utility_cer",
              "cosine_su", "phi_su", "cross_cos_frac_negative", "safety_sample_phi_mean", "safety_sample_top1_mean",
              "utility_sample_phi_to_safety_mean", "diff_sample_phi", "safety_gram_effective_rank",
              "utility_gram_effective_rank", "diff_gram_effective_rank")
#: Statistics with a permutation null (safety and utility samples exchangeable).
PERM_STATS = ("diff_k90", "diff_effective_rank", "cosine_su", "diff_sample_phi", "diff_gram_effective_rank")
#: Spectral statistics (computed in the core; shifted by the core's error for the bootstrap).
SPECTRAL = ("safety_k90", "utility_k90", "diff_k90", "safety_effective_rank", "utility_effective_rank",
            "diff_effective_rank", "safety_stable_rank", "utility_stable_rank", "safety_cer", "utility_cer", "phi_su")


def _set_stats(cores: np.ndarray, weights: np.ndarray, K: np.ndarray, top_k: int) -> tuple[dict, np.ndarray]:
    """Spectral stats of the cores (R, m, m) of weighted means (weights (R, n), / set size) with their exact
    energies w^T K w (so k@0.9 carries its exactness certificate, ``spectrum_stats``) and top-k core bases."""
    s2, U = rs.core_spectra(cores, top_k)
    total = np.einsum("rn,rn->r", weights @ K, weights)
    stats = rs.spectrum_stats(s2, total, (0.9,), max(top_k, 1))
    return stats, U


def _phi(U_a: np.ndarray, U_b: np.ndarray) -> np.ndarray:
    k = min(U_a.shape[2], U_b.shape[2])
    return np.clip(np.sum((np.swapaxes(U_a, 1, 2) @ U_b) ** 2, axis=(1, 2)) / max(k, 1), 0.0, 1.0)


def _spectral(core: rs.SpectralCore, K: np.ndarray, safety_w: np.ndarray, utility_w: np.ndarray,
              top_k: int, vectors: bool = True) -> dict[str, np.ndarray]:
    """Spectral statistics of R pairs of weighted means (rows of safety_w, utility_w (R, n), / set size);
    ``vectors`` False skips the top-k bases and phi_su (the permutations need only the spectra). Also
    ``k90_certified`` (both sets' k@0.9 exact) and ``captured`` (the smaller share of the two means' energy
    inside the core), (R,) each."""
    s_stats, U_s = _set_stats(core.means(safety_w), safety_w, K, top_k if vectors else 0)
    u_stats, U_u = _set_stats(core.means(utility_w), utility_w, K, top_k if vectors else 0)
    out = {"safety_k90": s_stats["k90"], "utility_k90": u_stats["k90"],
           "safety_effective_rank": s_stats["effective_rank"], "utility_effective_rank": u_stats["effective_rank"],
           "safety_stable_rank": s_stats["stable_rank"], "utility_stable_rank": u_stats["stable_rank"],
           "safety_cer": s_stats["cer"], "utility_cer": u_stats["cer"],
           "k90_certified": s_stats["k90_certified"] & u_stats["k90_certified"],
           "captured": np.minimum(s_stats["captured"], u_stats["captured"])}
    if vectors:
        out["phi_su"] = _phi(U_s, U_u)
    out["diff_k90"] = out["safety_k90"] - out["utility_k90"]
    out["diff_effective_rank"] = out["safety_effective_rank"] - out["utility_effective_rank"]
    return out


def _split(weights: np.ndarray, n_safety: int) -> tuple[np.ndarray, np.ndarray]:
    """Set-mean weight rows (R, n): the safety block / its total, the utility block / its total, zeros elsewhere."""
    s, u = np.zeros_like(weights), np.zeros_like(weights)
    s[:, :n_safety], u[:, n_safety:] = weights[:, :n_safety], weights[:, n_safety:]
    return s / s.sum(axis=1, keepdims=True), u / u.sum(axis=1, keepdims=True)


def gram_resampling(K: Any, n_safety: int, n_boot: int, n_perm: int, seed: int) -> dict[str, np.ndarray]:
    """The Gram-exact part: ``boot.cosine_su``, ``boot.cross_cos_frac_negative``, ``boot.<set>_gram_effective_rank``
    and ``boot.diff_gram_effective_rank`` (B,), ``perm.cosine_su``, ``perm.diff_gram_effective_rank`` (P,), and
    their observed values ``core.*`` (1,). K (n, n), safety first."""
    Km = np.asarray(K, dtype=np.float64)
    n = Km.shape[0]
    n_utility = n - n_safety
    out: dict[str, np.ndarray] = {}
    observed = rs.weighted_cosines(Km, *_split(np.ones((1, n)), n_safety))
    out["core.cosine_su"] = observed
    if n_boot:
        W = rs.resample_weights(n_safety, n_utility, n_boot, seed)
        out["boot.cosine_su"] = _recentre(rs.weighted_cosines(Km, *_split(W, n_safety)), float(observed[0]))
        d = np.sqrt(np.clip(np.diag(Km), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            negative = (Km[:n_safety, n_safety:] / np.outer(d[:n_safety], d[n_safety:]) < 0).astype(float)
        out["boot.cross_cos_frac_negative"] = _recentre(
            np.einsum("bi,ij,bj->b", W[:, :n_safety], negative, W[:, n_safety:]) / (n_safety * n_utility),
            float(negative.mean()))
    out["core.diff_gram_effective_rank"] = _span_ranks(Km, np.r_[np.ones(n_safety), np.zeros(n_utility)][None])[0] \
        - _span_ranks(Km, np.r_[np.zeros(n_safety), np.ones(n_utility)][None])[0]
    if n_boot:
        safety_rank = _span_ranks(Km, np.hstack([W[:, :n_safety], np.zeros((n_boot, n_utility))]))
        utility_rank = _span_ranks(Km, np.hstack([np.zeros((n_boot, n_safety)), W[:, n_safety:]]))
        observed_ranks = (_span_ranks(Km, np.r_[np.ones(n_safety), np.zeros(n_utility)][None])[0],
                          _span_ranks(Km, np.r_[np.zeros(n_safety), np.ones(n_utility)][None])[0])
        out["boot.safety_gram_effective_rank"] = _recentre(safety_rank, observed_ranks[0])
        out["boot.utility_gram_effective_rank"] = _recentre(utility_rank, observed_ranks[1])
        out["boot.diff_gram_effective_rank"] = _recentre(safety_rank - utility_rank,
                                                         observed_ranks[0] - observed_ranks[1])
    if n_perm:
        masks = rs.permutation_masks(n_safety, n_utility, n_perm, seed).astype(float)
        out["perm.cosine_su"] = rs.weighted_cosines(Km, masks / n_safety, (1 - masks) / n_utility)
        out["perm.diff_gram_effective_rank"] = _span_ranks(Km, masks) - _span_ranks(Km, 1 - masks)
    return out


def _span_ranks(K: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Effective rank of the sample span of each weighted (multi)set (rows of weights (R, n), counts or 0/1):
    exp(H(p)) of the singular values sqrt(eig(W^1/2 K W^1/2)) of [sqrt(w_i) g_i] (``geometry.gram_effective_rank``
    of the set's Gram block when the weights are 0/1). Exact from the Gram matrix."""
    root = np.sqrt(np.clip(weights, 0, None))
    M = root[:, :, None] * K[None] * root[:, None, :]
    s = np.sqrt(np.clip(np.linalg.eigvalsh(M), 0, None))[:, ::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = s / s.sum(axis=1, keepdims=True)
        entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return np.where(s[:, 0] > 0, np.exp(entropy), 0.0)


def resample_module(pairs: Sequence[tuple[Any, Any]], K: Any, n_safety: int, top_k: int, n_boot: int, n_perm: int,
                    seed: int, observed: dict[str, float], safety_phi: np.ndarray, safety_top1: np.ndarray,
                    utility_phi_to_safety: np.ndarray, core_rank: int = CORE_RANK) -> dict[str, np.ndarray]:
    """All resampling arrays of one module (keys as stored, without the module: ``boot.<stat>``, ...).

    pairs: (D_i, A_i) of all samples, safety first; K their Gram (n, n); observed: the exact point estimates
    (table row keys ``safety_k90``, ``safety_effective_rank``, ... and ``phi_su``) on which the spectral
    replicates are re-centred; safety_phi / safety_top1 (n_s,): single-sample phi and |<u1_i, u1>| of the safety samples;
    utility_phi_to_safety (n_u,): phi of each utility sample's top-k with the safety batch top-k.
    """
    Km = np.asarray(K, dtype=np.float64)
    n = Km.shape[0]
    n_utility = n - n_safety
    out = gram_resampling(Km, n_safety, n_boot, n_perm, seed)
    out["utility_phi_to_safety"] = np.asarray(utility_phi_to_safety, dtype=float)
    core = rs.SpectralCore(pairs, core_rank, seed)
    obs_core = _spectral(core, Km, *_split(np.ones((1, n)), n_safety), top_k)
    certified, captured = [obs_core["k90_certified"]], [obs_core["captured"]]
    for stat in SPECTRAL:
        out[f"core.{stat}"] = obs_core[stat]
    phi_s, top1_s = np.asarray(safety_phi, float), np.asarray(safety_top1, float)
    phi_u = out["utility_phi_to_safety"]
    pooled_phi = np.concatenate([phi_s, phi_u])
    out["core.diff_sample_phi"] = np.array([np.nanmean(phi_s) - np.nanmean(phi_u)])
    if n_boot:
        W = rs.resample_weights(n_safety, n_utility, n_boot, seed)
        safety_w, utility_w = _split(W, n_safety)
        boot = _spectral(core, Km, safety_w, utility_w, top_k)
        certified.append(boot["k90_certified"])
        captured.append(boot["captured"])
        out["captured"] = boot["captured"]
        w_s, w_u = W[:, :n_safety], W[:, n_safety:]
        with np.errstate(invalid="ignore"):
            ok_s, ok_u = np.isfinite(phi_s), np.isfinite(phi_u)
            boot["safety_sample_phi_mean"] = (w_s[:, ok_s] @ phi_s[ok_s]) / w_s[:, ok_s].sum(axis=1)
            boot["safety_sample_top1_mean"] = (w_s[:, ok_s] @ top1_s[ok_s]) / w_s[:, ok_s].sum(axis=1)
            boot["utility_sample_phi_to_safety_mean"] = (w_u[:, ok_u] @ phi_u[ok_u]) / w_u[:, ok_u].sum(axis=1)
        boot["diff_sample_phi"] = boot["safety_sample_phi_mean"] - boot["utility_sample_phi_to_safety_mean"]
        exact = dict(observed)
        exact["diff_k90"] = observed.get("safety_k90", np.nan) - observed.get("utility_k90", np.nan)
        exact["diff_effective_rank"] = (observed.get("safety_effective_rank", np.nan)
                                        - observed.get("utility_effective_rank", np.nan))
        exact["utility_sample_phi_to_safety_mean"] = float(np.nanmean(phi_u)) if np.isfinite(phi_u).any() else np.nan
        exact["diff_sample_phi"] = out["core.diff_sample_phi"][0]
        for stat in BOOT_STATS:
            if stat in boot:
                out[f"boot.{stat}"] = _recentre(boot[stat], exact.get(stat, np.nan))
    if n_perm:
        masks = rs.permutation_masks(n_safety, n_utility, n_perm, seed)
        perm = _spectral(core, Km, masks / n_safety, (~masks) / n_utility, top_k, vectors=False)
        out["perm.diff_k90"], out["perm.diff_effective_rank"] = perm["diff_k90"], perm["diff_effective_rank"]
        certified.append(perm["k90_certified"])
        captured.append(perm["captured"])
        ok = np.isfinite(pooled_phi)
        with np.errstate(invalid="ignore"):
            out["perm.diff_sample_phi"] = ((masks[:, ok] @ pooled_phi[ok]) / masks[:, ok].sum(axis=1)
                                           - ((~masks[:, ok]) @ pooled_phi[ok]) / (~masks[:, ok]).sum(axis=1))
    out["core_rank"] = np.array([core.rank], dtype=float)
    out["certified_k90"] = np.array([np.mean(np.concatenate(certified))])
    out["captured_min"] = np.array([np.min(np.concatenate(captured))])
    return out


def _recentre(values: np.ndarray, estimate: float) -> np.ndarray:
    """Replicates shifted so that their median is the point estimate (see the module docstring); unchanged
    when either is undefined."""
    if not np.isfinite(estimate) or not np.isfinite(values).any():
        return values
    return values + (estimate - np.nanmedian(values))


# --------------------------------------------------------------------------------------------------
# a run's evidence
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Evidence:
    """A run's resampling arrays as matrices over modules (rows, model order) x draws (columns).

    boot[stat] (M, B), perm[stat] (M, P), core[stat] (M,) (the observed value computed as the permutation
    draws are), n_safety / n_utility / n_boot / n_perm / seed, modules (HF paths), labels, ``spectral``:
    False when only the Gram part is there (a run stored before resampling: spectral statistics and claim
    III's baseline need the factors, i.e. a new collection), captured (M,) the smallest share of a replicate
    mean's energy inside the core (1 = exact), ``source``: "stored" or "recomputed from the Gram"."""

    modules: list[str]
    labels: list[str]
    n_safety: int
    n_utility: int
    n_boot: int
    n_perm: int
    seed: int
    boot: dict[str, np.ndarray]
    perm: dict[str, np.ndarray]
    core: dict[str, np.ndarray]
    captured: np.ndarray
    spectral: bool
    source: str
    #: stat -> (M,) True where the module's replicates of a spectral stat were dropped (core not exact enough)
    masked: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    #: (M,) share of the module's replicates whose k@0.9 the core certifies exact
    certified_k90: np.ndarray | None = None


def _stack(per_module: list[dict[str, np.ndarray]], prefix: str) -> dict[str, np.ndarray]:
    keys = sorted({k[len(prefix):] for arrays in per_module for k in arrays if k.startswith(prefix)})
    out = {}
    for key in keys:
        rows = [arrays.get(prefix + key) for arrays in per_module]
        width = max(np.size(r) for r in rows if r is not None)
        out[key] = np.vstack([np.full(width, np.nan) if r is None else np.asarray(r, float).reshape(-1)
                              for r in rows])
    return out


K90_STATS = ("safety_k90", "utility_k90", "diff_k90")


def evidence_from_arrays(per_module: list[dict[str, np.ndarray]], modules: list[str], labels: list[str],
                         n_safety: int, n_utility: int, seed: int, source: str = "stored") -> Evidence:
    """:class:`Evidence` from each module's resampling arrays (keys as :func:`resample_module` returns).
    Spectral replicates of modules the core does not certify (K90_CERTIFIED, CORE_EXACT) become NaN and are
    listed in ``masked``."""
    boot, perm, core = _stack(per_module, "boot."), _stack(per_module, "perm."), _stack(per_module, "core.")

    def scalar(arrays: dict, key: str) -> float:
        value = arrays.get(key)
        return float(np.nanmin(value)) if value is not None and np.size(value) else float("nan")

    captured = np.array([scalar(a, "captured_min") if "captured_min" in a else scalar(a, "captured")
                         for a in per_module])
    certified = np.array([scalar(a, "certified_k90") for a in per_module])
    masked = {}
    for stat in SPECTRAL:
        bad = ~(certified >= K90_CERTIFIED) if stat in K90_STATS else ~(captured >= CORE_EXACT)
        masked[stat] = bad
        for table in (boot, perm):
            if stat in table:
                table[stat][bad] = np.nan
        if stat in core:
            core[stat][bad] = np.nan
    n_boot = next((v.shape[1] for v in boot.values()), 0)
    n_perm = next((v.shape[1] for v in perm.values()), 0)
    return Evidence(modules, labels, n_safety, n_utility, n_boot, n_perm, seed, boot, perm,
                    {k: v[:, 0] for k, v in core.items()}, captured, "safety_k90" in boot, source, masked, certified)


def load_evidence(run, n_boot: int = 200, n_perm: int = 200, progress=None) -> Evidence:
    """The run's :class:`Evidence`: its stored resampling arrays, or (a run stored before them) the Gram-only
    part recomputed on demand with ``n_boot`` / ``n_perm`` and the run's seed (``progress(fraction)`` after each
    module). Cached on the run object."""
    cache = getattr(run, "_cache", None)
    if isinstance(cache, dict) and "evidence" in cache:
        return cache["evidence"]
    n_s, n_u = int(run.config["n_safety"]), int(run.config["n_utility"])
    seed = int(run.config.get("seed", 0))
    path = Path(run.folder) / RESAMPLING_FILE
    per_module: list[dict[str, np.ndarray]] = []
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as handle:
            grouped: dict[str, dict[str, np.ndarray]] = {m: {} for m in run.module_names}
            for key in handle.keys():
                quantity, _, module = key.partition("/")
                if module in grouped:
                    grouped[module][quantity] = handle.get_tensor(key)
        per_module = [grouped[m] for m in run.module_names]
        source = "stored"
        stored_boot = next((a["boot.cosine_su"].size for a in per_module if "boot.cosine_su" in a), n_boot)
        stored_perm = next((a["perm.cosine_su"].size for a in per_module if "perm.cosine_su" in a), n_perm)
        for index, (name, arrays) in enumerate(zip(run.module_names, per_module)):
            if "core.diff_gram_effective_rank" not in arrays:  # stored by an older version: the Gram part now
                gram = gram_resampling(run.gram(name), n_s, stored_boot, stored_perm, seed)
                arrays.update({k: v for k, v in gram.items() if k not in arrays})
                source = "stored (Gram statistics added now)"
                if progress is not None:
                    progress((index + 1) / len(run.module_names))
    else:
        for index, name in enumerate(run.module_names):
            per_module.append(gram_resampling(run.gram(name), n_s, n_boot, n_perm, seed))
            if progress is not None:
                progress((index + 1) / len(run.module_names))
        source = "recomputed from the Gram"
    evidence = evidence_from_arrays(per_module, list(run.module_names), [m.label for m in run.modules], n_s, n_u,
                                    seed, source)
    if isinstance(cache, dict):
        cache["evidence"] = evidence
    return evidence


def unrelated_phi(per_sample_bases: Sequence[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """phi of each sample's top-k basis (list of (d, k_i), null dropped) with a reference basis (d, k'); NaN
    for an empty basis."""
    out = np.full(len(per_sample_bases), np.nan)
    for i, basis in enumerate(per_sample_bases):
        if basis.shape[1] and reference.shape[1]:
            out[i] = sub.subspace_overlap(basis, reference)
    return out
