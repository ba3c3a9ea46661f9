"""Optional random projection (LoGra-style sketch) of the per-sample gradient factors of wide modules.

``CollectionConfig.projection_dim = p`` (None, the default: no projection, every number exact). A module is
*projected* when min(d_out, d_in) > p; then every captured factor row is multiplied by a fixed Gaussian
sketch right in the capture hook, before it is stored:

    a_t -> P_in a_t   (P_in  (p, d_in),  entries N(0, 1/p)),
    d_t -> P_out d_t  (P_out (p, d_out), entries N(0, 1/p)),

so every per-sample gradient becomes G~_i = sum_t (P_out d_t)(P_in a_t)^T = P_out G_i P_in^T (p, p), and so do
the batch means and the Gram matrix. Factor memory and disk per module drop from T (d_in + d_out) to 2 T p
values; the dense G_i and set sums from d_out d_in to p^2 ((d/p)^2 for a square module). Modules with
min(d_out, d_in) <= p are captured exactly, as without projection. The sketches are seeded from
(config seed, side, width, p) only: the same config gives the same numbers; modules of the same width share
their sketch (memory: one (p, width) matrix per distinct width and side, not per module); P_in and P_out
are independent draws. E[P^T P] = I, so E <G~_i, G~_j>_F = <G_i, G_j>_F.

What stays meaningful on a projected module (a Johnson-Lindenstrauss sketch on both sides):
* approximately preserved: the top singular values s_j of the batch means and per-sample gradients, hence
  CER(k) for small k, k_eta, stable rank, participation ratio (for a rank-r gradient every singular value
  is within a factor (1 +- delta)^2, delta = (sqrt(r) + t) / sqrt(p), with probability >= 1 - 4 exp(-t^2/2):
  Gaussian singular-value bounds on P U and P V); Frobenius norms, Gram entries <G_i, G_j>_F, hence
  cosines between gradients (cos(G_s, G_u), per-sample cross cosines, fraction negative) up to
  O(1 / sqrt(p)) additive error.
* only roughly: effective rank exp(H(s / sum s)) weighs the small singular values; the sketch keeps at most p
  of them and mixes the tail, so on gradients of rank > p it is biased low.
Measured (``python -m bench sketch``: SmolLM2-135M, layers 0/15/29, n = 32 + 32, <= 64 tokens, mean over
modules and sets, per kind): p = 128 (factors 122 -> 22 kB per token): top-8 singular values 6-9 %, s_1 4-9 %,
CER(1) 2-8 %, CER(4) 0.4-6 %, CER(16) 0.5-8 %, stable rank 2-7 %, |cos error| 0.02-0.06, effective rank
31-67 %; p = 64 about 1.5x those, p = 256 about 0.7x (effective rank 28-46 %).
* NOT preserved: singular vectors / subspaces. U_k, V_k live in the p-dim sketch space; principal angles,
  overlaps phi (safety vs utility, single-sample vs batch, the overlap-vs-n curve) are angles between
  sketched subspaces, not between subspaces of weight space (their random baseline is k / p there, which
  the table uses), and the stored bases cannot be used as directions in W (e.g. for SPF).
The run's manifest says which modules were projected (``manifest["projection"]``, see :func:`describe`);
the table keeps each module's real (d_out, d_in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analysis.llm.anatomy import ModuleInfo

__all__ = ["CER_KS", "SIDES", "Sketch", "compare_projection", "describe", "factor_widths", "is_projected", "label",
           "projection_error", "sketch_matrix", "summarise_error"]

SIDES = ("in", "out")


def is_projected(info: ModuleInfo, projection_dim: int | None) -> bool:
    """True if ``info`` is sketched under ``projection_dim`` (min(d_out, d_in) > projection_dim)."""
    return projection_dim is not None and min(info.d_out, info.d_in) > projection_dim


def factor_widths(info: ModuleInfo, projection_dim: int | None) -> tuple[int, int]:
    """(d_out, d_in) of the stored factors D_i, A_i of ``info``: (p, p) if projected, else its own."""
    if is_projected(info, projection_dim):
        return projection_dim, projection_dim
    return info.d_out, info.d_in


def sketch_matrix(width: int, projection_dim: int, seed: int, side: str) -> torch.Tensor:
    """The fixed Gaussian sketch P (projection_dim, width), float64 on the CPU, entries N(0, 1 / projection_dim);
    a function of (seed, side, width, projection_dim) only (numpy SeedSequence -> torch CPU generator)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, SIDES.index(side), width, projection_dim]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(projection_dim, width, generator=generator, dtype=torch.float64) / math.sqrt(projection_dim)


class Sketch:
    """The sketches of one collection: ``project(name, D, A)`` maps a projected module's factor rows
    D (rows, d_out), A (rows, d_in) to (D P_out^T, A P_in^T) (rows, p) each, in float32 (float64 factors stay
    float64), on the factors' device; other modules' factors pass unchanged. Matrices are built once per
    (width, side, device, dtype) and kept."""

    def __init__(self, projection_dim: int, seed: int, modules: Sequence[ModuleInfo]):
        self.dim, self.seed = int(projection_dim), int(seed)
        self.modules = {m.name: m for m in modules if is_projected(m, projection_dim)}
        self._matrices: dict[tuple, torch.Tensor] = {}

    def matrix(self, width: int, side: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (width, side, str(device), dtype)
        if key not in self._matrices:
            self._matrices[key] = sketch_matrix(width, self.dim, self.seed, side).to(device=device, dtype=dtype)
        return self._matrices[key]

    def project(self, name: str, D: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D P_out^T, A P_in^T) if module ``name`` is projected, else (D, A)."""
        if name not in self.modules:
            return D, A
        dtype = torch.float64 if D.dtype == torch.float64 else torch.float32
        P_out = self.matrix(D.shape[1], "out", D.device, dtype)
        P_in = self.matrix(A.shape[1], "in", A.device, dtype)
        return D.to(dtype) @ P_out.T, A.to(dtype) @ P_in.T

    def matrix_bytes(self, itemsize: int = 4) -> int:
        """Memory of the sketch matrices of every projected module (one per distinct width and side)."""
        widths = {(m.d_out, "out") for m in self.modules.values()} | {(m.d_in, "in") for m in self.modules.values()}
        return sum(self.dim * width * itemsize for width, _ in widths)


def describe(projection_dim: int | None, seed: int, modules: Sequence[ModuleInfo]) -> dict | None:
    """The manifest's ``"projection"`` field: None for an exact run, else {"dim", "seed", "method",
    "modules" (HF paths of the projected modules), "note"}."""
    if projection_dim is None:
        return None
    return {"dim": int(projection_dim), "seed": int(seed), "method": "gaussian (P_out G P_in^T, N(0, 1/p))",
            "modules": [m.name for m in modules if is_projected(m, projection_dim)],
            "note": "spectra, CER, ranks and cosines are JL estimates; angles, overlaps and bases are in the "
                    "p-dim sketch space, not weight space"}


def label(manifest: dict) -> str:
    """"exact" or "projected p=512 (12 modules)" for a run's manifest."""
    projection = manifest.get("projection")
    if not projection:
        return "exact"
    return f"projected p={projection['dim']} ({len(projection['modules'])} modules)"


# --------------------------------------------------------------------------------------------------
# error of a projected run against the exact run of the same config
# --------------------------------------------------------------------------------------------------

#: k of the CER(k) whose error is reported.
CER_KS = (1, 4, 16)


def _relative(approx: float, exact: float) -> float:
    return abs(approx - exact) / abs(exact) if exact else float("nan")


def projection_error(exact: Any, projected: Any, top: int = 8):
    """Per projected module and set, the relative errors of the projected run's spectra against the exact
    run's (two ``RunResults`` of the same config but ``projection_dim``). pandas.DataFrame, one row per
    (module, set): module, label, kind, set, s_top_rel (mean over j <= ``top`` of |s~_j - s_j| / s_j),
    s1_rel, cer{k}_rel for k in CER_KS, effective_rank_rel, stable_rank_rel, and the module's
    cos(G_s, G_u): cosine_exact, cosine_projected, cosine_abs (absolute error), cosine_rel (relative:
    meaningless when the exact cosine is near 0). Modules the projected run left exact are skipped."""
    import pandas as pd

    from analysis.engine import geometry as geo

    projection = projected.manifest.get("projection") or {}
    names = set(projection.get("modules", []))
    exact_table = exact.table.set_index("module")
    projected_table = projected.table.set_index("module")
    rows = []
    for info in exact.modules:
        if info.name not in names:
            continue
        cos_e = float(exact_table.loc[info.name, "cosine_su"])
        cos_p = float(projected_table.loc[info.name, "cosine_su"])
        for which in ("safety", "utility"):
            s, s_p = exact.singular_values(info.name, which), projected.singular_values(info.name, which)
            j = min(top, int(np.count_nonzero(s > 1e-8 * s[0])) if s.size and s[0] > 0 else 0, s_p.size)
            cer, cer_p = geo.cumulative_energy(s), geo.cumulative_energy(s_p)
            row = {"module": info.name, "label": info.label, "kind": info.kind, "set": which,
                   "s_top_rel": float(np.mean(np.abs(s_p[:j] - s[:j]) / s[:j])) if j else float("nan"),
                   "s1_rel": _relative(float(s_p[0]), float(s[0]))}
            for k in CER_KS:
                row[f"cer{k}_rel"] = _relative(float(cer_p[min(k, cer_p.size) - 1]), float(cer[min(k, cer.size) - 1]))
            row["effective_rank_rel"] = _relative(geo.effective_rank(s_p), geo.effective_rank(s))
            row["stable_rank_rel"] = _relative(geo.stable_rank(s_p), geo.stable_rank(s))
            row.update(cosine_exact=cos_e, cosine_projected=cos_p, cosine_abs=abs(cos_p - cos_e),
                       cosine_rel=_relative(cos_p, cos_e))
            rows.append(row)
    return pd.DataFrame(rows)


def summarise_error(errors: Any):
    """Per module kind: the mean and max over modules and sets of every error column of
    :func:`projection_error` (pandas.DataFrame indexed by kind, columns "<error> mean" / "<error> max")."""
    columns = [c for c in errors.columns if c.endswith(("_rel", "_abs"))]
    grouped = errors.groupby("kind", sort=False)[columns]
    mean, worst = grouped.mean(), grouped.max()
    out = mean.add_suffix(" mean").join(worst.add_suffix(" max"))
    return out[[f"{c} {what}" for c in columns for what in ("mean", "max")]]


def compare_projection(config: Any, projection_dim: int, *, model: Any = None, store: Any = None,
                       ctx: Any = None, top: int = 8) -> dict[str, Any]:
    """Collect ``config`` (a CollectionConfig) exactly and with ``projection_dim`` (reusing stored runs) and
    return {"errors": :func:`projection_error`, "summary": :func:`summarise_error`, "exact", "projected"
    (the two RunResults), "seconds": {"exact", "projected"} (collection seconds of each run, from its
    manifest timings), "factor_bytes": {"exact", "projected"} (bytes of one token's factors over all
    selected modules)}."""
    from analysis.engine.collect import collect

    exact_config = dataclasses.replace(config, projection_dim=None)
    runs = {}
    for name, cfg in (("exact", exact_config), ("projected", dataclasses.replace(config, projection_dim=projection_dim))):
        runs[name] = collect(cfg, model=model, store=store, ctx=ctx)
    errors = projection_error(runs["exact"], runs["projected"], top=top)
    seconds = {name: sum(run.manifest.get("timings", {}).get(key, 0.0) for key in ("capture_seconds", "analyse_seconds"))
               for name, run in runs.items()}
    widths = {name: sum(sum(factor_widths(m, p)) for m in runs["exact"].modules)
              for name, p in (("exact", None), ("projected", projection_dim))}
    return {"errors": errors, "summary": summarise_error(errors) if len(errors) else errors, **runs,
            "seconds": seconds, "factor_bytes": {name: 4 * width for name, width in widths.items()}}
