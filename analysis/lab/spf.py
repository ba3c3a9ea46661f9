"""SPF, safety-preserving fine-tuning: the safety basis of every selected linear module (and what every run
measures with it: conflict cosines, subspace drift, removed shares). The projection of the fine-tuning gradient
(or the optimizer's update) against it is the SPF defence's, :mod:`analysis.lab.defences.spf`; the pure
projections are :mod:`analysis.engine.geometry.projections`. The maths and its refinements are documented here.

SPF, sign convention (DESIGN.md "SPF step"; refinements documented here)
-----------------------------------------------------------------------
For a selected linear module let G_s be the safety gradient (d L_safety / d W, L_safety = CE of refusals
on harmful prompts), G_s = sum_j s_j u_j v_j^T its SVD with s_j > 0, B_j = u_j v_j^T (orthonormal under
<.,.>_F; B_j does not depend on the SVD's sign choice, since u_j and v_j flip together), and G_u the
fine-tuning gradient. The optimizer moves W by dW = -lr * G_u (for SGD), so to first order
    dL_safety = <G_s, dW> = -lr * <G_s, G_u> = -lr * sum_j s_j c_j  (+ terms outside the basis),
with c_j = <G_u, B_j>. Since s_j > 0, component j *raises* the safety loss exactly when c_j < 0: that is
the conflict, and "conflict" mode removes those components (``geometry.project_conflict``); afterwards
c'_j = max(c_j, 0) >= 0, so within the top-k safety subspace the step can only lower the safety loss.
The rule is right *because* the basis comes from the safety *gradient* (positive coefficients s_j). If one
built the basis from the descent direction -G_s, or from a harmful/affirmative gradient, the sign flips.
"orthogonal" mode removes U_k U_k^T G_u entirely (``geometry.project_orthogonal``): G'_u = (I - U_k U_k^T) G_u,
so U_k^T G'_u = 0, and <G_s, G'_u> = 0 when k covers the rank of G_s, i.e. no first-order change of the safety
loss (CERT-Lab's "orth" arm).
"same" mode is its complement, the control arm (CERT-Lab's "same", ``geometry.project_same``): G'_u = U_k U_k^T G_u keeps only the
part of the fine-tuning gradient inside the (left) safety subspace, so (I - U_k U_k^T) G'_u = 0: the model is
updated only along safety directions. "orthogonal" + "same" = the plain step; comparing the three tells
whether the harm travels inside or outside the safety subspace.
A module whose basis is empty (its safety gradient is zero) is not projected in any mode. The SPF step (mode
and target -> projection) is the SPF defence's, :mod:`analysis.lab.defences.spf`; this module keeps the
safety basis and the measurements every run shares.

Refinement 1 (AdamW). Adam rescales every coordinate (update = -lr * m / (sqrt(v) + eps)), which destroys
the orthogonality of a projected *gradient*: with ``spf.target="gradient"`` (DESIGN.md's reading, the
default) the property above holds for SGD but only approximately for AdamW. ``spf.target="update"``
projects the optimizer's actual weight change instead: after ``optimizer.step()`` the pseudo-gradient
P = -(W_new - W_old) is projected with the same rule and W = W_old - P'. That keeps the first-order
guarantee under AdamW (tested), at the cost of one weight copy per step.
Refinement 2. Basis directions with s_j <= 1e-6 s_1 (rank of G_s below k) are dropped: their singular
vectors are arbitrary and are not part of the safety subspace.
Refinement 3. The safety basis is computed at the weights *before* the update it is first used for:
updates 1, R+1, 2R+1, ... compute G_s from a fresh seeded safety batch (``spf.safety_batch`` refusals of the
``safety`` analysis split; 1 is allowed) and refresh U_k, V_k. Top-k by a seeded randomized range finder
in torch (``spf.svd="randomized"``, the default for matrices larger than 128; ``"lowrank"`` uses
``torch.svd_lowrank`` instead, seeded from the same generator: the same algorithm, but it works on the
transpose of a wide matrix and draws its test matrix from the global RNG, so its bases are not bitwise
those of "randomized" (even with the same draw, float32 rounding differs at ~1e-8), which therefore stays
the default and keeps stored runs reproducible; ``"exact"``
uses ``geometry.top_singular``): geometry's float64/scikit-learn path costs ~0.5 s per 1536 x 576 matrix
on a CPU, x 210 modules per refresh.
Option (``spf.safety_loss="contrast"``, not in DESIGN.md). Measured on the aligned SmolLM2: harmful-prefix
fine-tuning makes the model comply while the refusal NLL barely moves (the attack raises "Sure, here is"
rather than lowering the refusal), so a basis of the refusal-CE gradient keeps the refusal NLL flat and
still lets ASR rise. "contrast" uses L_safety = CE(refusal) - CE(affirmative target) on the same prompts:
its gradient also points along the compliance direction, and the same projection rules apply.
Option (``spf.safety_loss="kl"``, SafeGrad's reading). L_safety = KL(p_ref || p_theta), p_ref the frozen
initial (aligned) model, per refusal example the mean over its response tokens of
sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), then the mean over the safety batch (nats/token); its gradient
points away from the aligned model's behaviour on harmful prompts. At theta = theta_0 (update 1) KL and its
gradient are exactly zero (the logit gradient p_theta - p_ref is formed so that it vanishes bitwise), and a
basis of a zero gradient is meaningless: a refresh whose safety-gradient norm is below
``ZERO_SAFETY_RTOL`` x the fine-tuning gradient's norm keeps *no* basis (no projection until the next
refresh; for "pcgrad" no reference gradient) and says so in its metrics row (``safety_grad_norm``,
``basis_skipped`` = 1). The reference costs no extra copy: it is the trainer's ``theta0`` (the initial
trainable weights it already keeps for ``weight_distance``, one copy of the trainable weights, in the model's
dtype), evaluated with ``torch.func.functional_call`` on the same modules (frozen weights are shared), under
``no_grad``: the price is one more forward pass per refresh. bfloat16 models: theta0 is the bf16 initial
weights and the model holds the float32 master weights rounded to bf16, so KL sees only the part of the
update that survives bf16 rounding (a coordinate whose change is below bf16 resolution stays at theta0); the
basis is computed and kept in float32 (no QR / LAPACK in bf16). LoRA: SPF / PCGrad refuse LoRA, and a plain
LoRA run computes no safety gradient (no SPF modules), so the reference is never evaluated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from analysis.core.config import ConfigError
from analysis.lab.config import SPFConfig
from analysis.llm.anatomy import as_out_in

BASIS_RTOL = 1e-6
#: A safety gradient whose norm (over the SPF modules) is at most this times the fine-tuning gradient's norm is
#: treated as zero: no basis is kept (e.g. the "kl" safety loss at theta = theta_0).
ZERO_SAFETY_RTOL = 1e-6

__all__ = ["BASIS_RTOL", "ZERO_SAFETY_RTOL", "SPFModule", "SPFProjector", "principal_cosines",
           "spf_modules", "top_k_basis"]


# --------------------------------------------------------------------------------------------------
# SPF pieces (public for tests and the benchmark)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SPFModule:
    """A linear module SPF projects: HF path, layer, the nn.Module and its weight parameter."""

    name: str
    layer: int | None
    module: nn.Module
    weight: nn.Parameter


def spf_modules(model: nn.Module, spf: SPFConfig) -> list[SPFModule]:
    """The selected linear modules whose weight is trainable, in model order."""
    from analysis.llm.anatomy import SelectionError, find_linear_modules, select_modules

    infos = find_linear_modules(model)
    try:
        chosen = select_modules(infos, spf.layers, spf.kinds, spf.regex)
    except SelectionError as error:
        raise ConfigError(f"SPF module selection: {error}") from None
    named = dict(model.named_modules())
    out = [SPFModule(m.name, m.layer, named[m.name], named[m.name].weight) for m in chosen
           if named[m.name].weight.requires_grad]
    if not out:
        raise ConfigError("none of the SPF modules is trainable: widen the trainable parameters or the selection")
    return out


def top_k_basis(G: torch.Tensor, k: int, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets (U (m, k'), s (k',), V (p, k')) of a gradient G (m, p), k' <= k after dropping
    directions with s_j <= BASIS_RTOL * s_1 (and all of them for a zero matrix); on G's device and dtype
    (float32 for a bfloat16 / float16 G).

    "exact" uses ``geometry.top_singular`` (float64 LAPACK); "randomized" a seeded range finder with
    ``power_iters`` QR-stabilised power iterations in the gradient's dtype (orthonormal columns by
    construction; the test matrix is drawn from ``generator``, on the CPU); "lowrank" ``torch.svd_lowrank``
    with q = k + oversample and ``power_iters`` iterations, its global-RNG draw seeded from ``generator``;
    "auto" = exact when min(m, p) <= 128, else randomized. Exact is used whenever k + oversample >= min(m, p).
    """
    m, p = G.shape
    k = min(k, m, p)
    if method == "auto":
        method = "exact" if min(m, p) <= 128 else "randomized"
    G = G.detach()
    if G.dtype in (torch.bfloat16, torch.float16):  # no QR / LAPACK in half precision: the basis is float32
        G = G.float()
    if method == "exact" or k + oversample >= min(m, p):
        from analysis.engine.geometry import top_singular

        U, s, V = top_singular(G, k, method="exact")
        U, s, V = (torch.from_numpy(np.ascontiguousarray(x)).to(device=G.device, dtype=G.dtype) for x in (U, s, V))
    elif method == "lowrank":
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[G.device] if G.device.type == "cuda" else []):
            torch.manual_seed(seed)
            U, s, V = torch.svd_lowrank(G, q=k + oversample, niter=power_iters)
        U, s, V = U[:, :k], s[:k], V[:, :k]
    else:
        q = k + oversample
        omega = torch.randn(p, q, generator=generator, dtype=G.dtype).to(G.device)
        Q = torch.linalg.qr(G @ omega).Q
        for _ in range(power_iters):
            Q = torch.linalg.qr(G @ torch.linalg.qr(G.T @ Q).Q).Q
        Ub, s, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
        U, s, V = Q @ Ub[:, :k], s[:k], Vh[:k].T
    if s.numel() == 0 or float(s[0]) <= 0:
        return G.new_zeros(m, 0), G.new_zeros(0), G.new_zeros(p, 0)
    keep = int((s > BASIS_RTOL * s[0]).sum())
    return U[:, :keep].contiguous(), s[:keep].contiguous(), V[:, :keep].contiguous()


def __getattr__(name: str):
    """``project_gradients`` (the SPF step of a mode) moved to the SPF defence and ``project_same`` to the
    engine's projections; both stay importable from here."""
    if name == "project_gradients":
        from analysis.lab.defences.spf import project_gradients

        return project_gradients
    if name == "project_same":
        from analysis.engine.geometry import project_same

        return project_same
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def principal_cosines(Q_a: torch.Tensor, Q_b: torch.Tensor) -> list[float]:
    """Cosines (descending, in [0, 1]) of the principal angles between span(Q_a) and span(Q_b) (d, k_a / k_b),
    via ``geometry.principal_angles`` (float64)."""
    from analysis.engine.geometry import principal_angles

    theta = principal_angles(Q_a.detach().to("cpu", torch.float64), Q_b.detach().to("cpu", torch.float64))
    return [float(c) for c in np.cos(theta)]


class SPFProjector:
    """The SPF state of one run: the selected ``modules``, their safety basis {module: (U_k, V_k)}, and the
    removed share per projected step (``removed_rows``: (step, [||removed|| / ||G|| per module])).

    The basis is refreshed at steps 1, R+1, ... from the safety gradient (:meth:`safety_gradients`) by the
    run's defence (:mod:`analysis.lab.defences.spf` projects against it; a plain run only measures).
    ``project`` is kept for callers that still pass it and is not used.

    Drift (a measurement, :meth:`record_drift`): the first basis is kept as ``reference`` {module: (U_0, V_0)}
    and every refresh appends (step, cos_left, cos_right) to ``drift_rows``, cos_* (n_modules, k) the cosines
    of the principal angles between the new and the first basis (descending, NaN-padded to k). Only these
    cosines are kept, not the bases (memory: 2 k floats per module and refresh). Each basis comes from that
    step's seeded safety batch (as SPF uses it), so the drift includes the batch-to-batch variation of the
    subspace, not only the change of the weights (:mod:`analysis.lab.why` compares start and end on fixed prompts).
    """

    def __init__(self, modules: list[SPFModule], spf: SPFConfig, project: bool = False):
        self.modules = modules
        self.config = spf
        self.project = project
        self.basis: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.removed_rows: list[tuple[int, list[float]]] = []
        self.reference: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.drift_rows: list[tuple[int, list[list[float]], list[list[float]]]] = []

    def refresh_due(self, step: int) -> bool:
        return bool(self.modules) and (step - 1) % self.config.refresh == 0

    def safety_gradients(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """G_safety (d_out, d_in) of every module: d ``loss`` / d W, without touching ``.grad``."""
        grads = torch.autograd.grad(loss, [m.weight for m in self.modules])
        return {m.name: as_out_in(m.module, g) for m, g in zip(self.modules, grads)}

    def refresh_basis(self, safety: Mapping[str, torch.Tensor], step: int, generator: torch.Generator) -> None:
        """Top-k basis of every module's safety gradient (``generator``: the step's seeded generator)."""
        self.basis.update(self.top_k_bases(safety, generator))

    def top_k_bases(self, safety: Mapping[str, torch.Tensor], generator: torch.Generator,
                    spf: SPFConfig | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module: (U_k, V_k)} of the safety gradients, as :meth:`refresh_basis` computes them (not stored);
        ``spf``: other basis settings (k, svd, ...) than the run's."""
        spf = spf if spf is not None else self.config
        out = {}
        for module in self.modules:
            U, _, V = top_k_basis(safety[module.name], spf.k, spf.svd, spf.oversample, spf.power_iters, generator)
            out[module.name] = (U, V)
        return out

    def record_drift(self, step: int, basis: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                     k: int | None = None) -> dict[str, float]:
        """Append the principal-angle cosines of ``basis`` vs the first recorded basis (which it becomes when
        there is none yet) to ``drift_rows``; returns ``drift_overlap`` / ``drift_overlap_right``: the mean over
        modules of the subspace overlap phi (mean cos^2, 1 = unchanged, random ~ k/d) of the left / right
        singular subspaces."""
        if not self.reference:
            self.reference = {name: (U.detach().clone(), V.detach().clone()) for name, (U, V) in basis.items()}
        k = k if k is not None else self.config.k
        rows: tuple[list[list[float]], list[list[float]]] = ([], [])
        for module in self.modules:
            for side in (0, 1):
                row = [float("nan")] * k
                now, first = basis[module.name][side], self.reference[module.name][side]
                if now.shape[1] and first.shape[1]:
                    cosines = principal_cosines(first, now)
                    row[:len(cosines)] = cosines
                rows[side].append(row)
        self.drift_rows.append((step, rows[0], rows[1]))
        out = {}
        for side, key in ((0, "drift_overlap"), (1, "drift_overlap_right")):
            cos = np.array(rows[side], dtype=np.float64)
            phi = np.nanmean(cos ** 2, axis=1) if cos.size and np.isfinite(cos).any() else np.array([np.nan])
            out[key] = float(np.nanmean(phi)) if np.isfinite(phi).any() else float("nan")
        return out

    def conflict_cosines(self, safety: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """cos(G_safety, G_utility) per layer (the layer's modules taken together, ``cos/L<layer>``) and
        their mean (``cos_mean``); G_utility is the current ``.grad``."""
        per_layer: dict[int | None, list[float]] = {}
        for module in self.modules:
            G_u = as_out_in(module.module, module.weight.grad)
            G_s = safety[module.name]
            sums = per_layer.setdefault(module.layer, [0.0, 0.0, 0.0])
            sums[0] += float((G_s * G_u).sum())
            sums[1] += float(G_s.pow(2).sum())
            sums[2] += float(G_u.pow(2).sum())
        out = {}
        for layer, (dot, ss, uu) in per_layer.items():
            out[f"cos/L{layer}"] = dot / math.sqrt(ss * uu) if ss > 0 and uu > 0 else float("nan")
        values = [v for v in out.values() if math.isfinite(v)]
        out["cos_mean"] = float(np.mean(values)) if values else float("nan")
        return out

    def removed_metrics(self, step: int, removed: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """``spf_removed_mean`` and ``spf_removed_total`` of a projected step (recorded in ``removed_rows``)."""
        fractions = [removed[m.name][0] for m in self.modules]
        norms = [removed[m.name][1] for m in self.modules]
        total_sq = sum(n * n for n in norms)
        self.removed_rows.append((step, fractions))
        return {"spf_removed_mean": float(np.mean(fractions)),
                "spf_removed_total": (math.sqrt(sum((f * n) ** 2 for f, n in zip(fractions, norms)) / total_sq)
                                      if total_sq > 0 else 0.0)}
