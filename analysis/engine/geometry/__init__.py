"""Pure maths on gradient geometry: spectra, energy ratios, ranks, subspaces, Gram view, SPF projections.

Arrays in, arrays out. Every public function accepts numpy arrays or torch tensors; torch is converted
to numpy float64 at the boundary (:func:`as_array`) and all computation runs in float64. Results are
numpy arrays or plain Python scalars, except the SPF projections (:func:`project_conflict`,
:func:`project_orthogonal`, :func:`project_same`) which run natively in torch and return a tensor when given a tensor.

Notation (see DESIGN.md, "The maths"): for one linear module with weight W (d_out x d_in), a gradient
G (d_out x d_in) = sum_t d_t a_t^T = D^T A with D (T, d_out) output gradients and A (T, d_in) inputs.
Gradients carry the loss's units per weight unit; singular values have the same units as G, energies
(s^2, CER numerators) its square; angles are in radians; overlaps, cosines, CER and fractions are
dimensionless.

Conventions for degenerate input (all tested in tests/test_geometry.py):

* NaN or Inf anywhere raises :class:`GeometryError`; nothing returns a silent NaN.
* A zero spectrum (all s_j = 0, or an empty spectrum) is the spectrum of a rank-0 matrix: CER(k) = 1 for
  every k ("nothing to capture"), ``k_at_energy`` = 0, effective / stable rank and participation
  ratio = 0.
* A zero matrix has a defined SVD (singular values 0, arbitrary orthonormal vectors). Functions that need
  a *direction* from it (cosine with a zero gradient, an overlap with an empty subspace, a principal
  angle with a zero span) raise :class:`GeometryError` instead.
* Projections of a zero utility gradient return it unchanged with removed fraction 0.

Modules: ``base`` (GeometryError, :func:`as_array` and checks), ``svd`` (dense and factored SVDs),
``spectra`` (spectrum metrics), ``subspaces`` (bases, overlaps, angles, cosines), ``samples`` (Gram-matrix
sample view, single-sample estimates), ``projections`` (SPF). Everything public is importable from here.
"""

from __future__ import annotations

from analysis.engine.geometry.base import ORTHONORMAL_TOL, GeometryError, as_array
from analysis.engine.geometry.projections import project_conflict, project_orthogonal, project_same
from analysis.engine.geometry.samples import (
    gram_basis,
    gram_effective_rank,
    gram_principal_angles,
    gram_spectrum,
    gram_subspace_overlap,
    overlap_vs_n,
    single_sample_overlap,
)
from analysis.engine.geometry.spectra import (
    cumulative_energy,
    effective_rank,
    k_at_energy,
    participation_ratio,
    spectrum_summary,
    stable_rank,
)
from analysis.engine.geometry.subspaces import (
    cosine,
    cosines_per_layer,
    cross_cosines_from_gram,
    fraction_negative,
    gram_cosines,
    orthonormal_basis,
    principal_angles,
    random_overlap_baseline,
    subspace_overlap,
)
from analysis.engine.geometry.svd import (
    BATCHED_NULL_RTOL,
    EIG_NULL_RTOL,
    RANDOMIZED_MAX_FRACTION,
    RANDOMIZED_MIN_DIM,
    factored_svd,
    factored_svd_batched,
    factored_svd_many,
    singular_values,
    stack_factors,
    top_singular,
    top_singular_eig,
)

__all__ = [
    "BATCHED_NULL_RTOL", "EIG_NULL_RTOL", "ORTHONORMAL_TOL", "RANDOMIZED_MAX_FRACTION", "RANDOMIZED_MIN_DIM",
    "GeometryError",
    "as_array",
    # matrix view
    "singular_values",
    "top_singular",
    "top_singular_eig",
    "factored_svd",
    "factored_svd_many",
    "factored_svd_batched",
    "stack_factors",
    "cumulative_energy",
    "k_at_energy",
    "effective_rank",
    "stable_rank",
    "participation_ratio",
    "spectrum_summary",
    "orthonormal_basis",
    "subspace_overlap",
    "principal_angles",
    "random_overlap_baseline",
    "cosine",
    "cross_cosines_from_gram",
    "gram_cosines",
    "fraction_negative",
    "cosines_per_layer",
    # sample view
    "gram_spectrum",
    "gram_effective_rank",
    "gram_basis",
    "gram_principal_angles",
    "gram_subspace_overlap",
    # single sample
    "single_sample_overlap",
    "overlap_vs_n",
    # SPF
    "project_conflict",
    "project_orthogonal",
    "project_same",
]
