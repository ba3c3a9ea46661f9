"""The faster analysis routes give the numbers of the old ones (issue 12): the overlap-vs-n curve's dense
subsets from the top-k eigenpairs of their Gram ("eig") vs the exact SVD ("svd", the route before)."""

import numpy as np
import pytest
import torch

from analysis.engine import geometry as geo
from analysis.engine.analyse import CURVE_DENSE, analyse_module
from analysis.llm.anatomy import ModuleInfo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def decaying_pairs(n, d_out, d_in, rows, seed=0):
    """Per-sample factors whose gradients share a decaying spectrum (like real ones), float64."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, d_in, dtype=torch.float64)
    return [(torch.randn(rows + i % 3, d_out, generator=generator, dtype=torch.float64),
             torch.randn(rows + i % 3, d_in, generator=generator, dtype=torch.float64) * scale) for i in range(n)]


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_top_singular_eig_matches_the_exact_svd(shape):
    rng = np.random.default_rng(0)
    M = rng.standard_normal(shape) @ np.diag(np.logspace(0, -4, shape[1])) @ rng.standard_normal((shape[1], shape[1]))
    U, s, V = geo.top_singular_eig(M, 6)
    U0, s0, V0 = geo.top_singular(M, 6, method="exact")
    np.testing.assert_allclose(s, s0, rtol=1e-10)
    np.testing.assert_allclose(U, U0, atol=1e-9)  # same sign convention
    np.testing.assert_allclose(V, V0, atol=1e-9)
    assert geo.top_singular_eig(np.zeros(shape), 3)[1].size == 0
    low_rank = rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1]))
    assert geo.top_singular_eig(low_rank, 5)[0].shape[1] == 2  # null directions dropped


def test_curve_eig_route_equals_the_svd_route():
    assert CURVE_DENSE == "eig"
    d_out, d_in, n_safety, k = 24, 40, 8, 4
    pairs = decaying_pairs(12, d_out, d_in, rows=5)  # subsets of >= 3 samples take the dense route
    info = ModuleInfo("model.layers.0.mlp.down_proj", "down", 0, d_out, d_in)
    new = analyse_module(info, pairs, n_safety, k, curve_boot=5)
    old = analyse_module(info, pairs, n_safety, k, curve_boot=5, curve_dense="svd")
    assert set(new.arrays) == set(old.arrays) and new.row == old.row
    for key, value in old.arrays.items():
        if key.startswith("curve."):
            np.testing.assert_allclose(new.arrays[key], value, rtol=0, atol=1e-10, err_msg=key)
        else:
            np.testing.assert_array_equal(new.arrays[key], value, err_msg=key)


def test_collect_stores_what_the_old_per_module_route_gives(tmp_path, tiny_llama):
    """collect() (rows first, curves deferred, curves by "eig") vs analyse_module on the stored factors with the
    curve inline: identical arrays; vs the old "svd" curve route: equal to 1e-10."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig
    from analysis.engine.results import CollectionStore, result_location

    config = CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", n_safety=5,
                              n_utility=3, max_length=40, batch_size=3, top_k=2, curve_boot=3)
    results = collect(config, model=tiny_llama, store=CollectionStore(tmp_path), keep_work=True)
    assert results.curve_modules
    batches = sorted((results.folder / "work").glob("batch_*"))
    for info in results.modules:
        pairs = []
        for path in batches:
            with safe_open(str(path), framework="pt") as handle:
                offset = handle.get_tensor("row_offsets")
                D, A = handle.get_tensor(f"D/{info.name}"), handle.get_tensor(f"A/{info.name}")
            pairs += [(D[offset[j]:offset[j + 1]], A[offset[j]:offset[j + 1]]) for j in range(len(offset) - 1)]
        boot = config.curve_boot if info.name in results.curve_modules else 0
        for route in ("eig", "svd"):
            direct = analyse_module(info, pairs, 5, 2, seed=config.seed, curve_boot=boot, curve_dense=route)
            for quantity, value in direct.arrays.items():
                if quantity == "curve.n":
                    continue
                file, key = result_location(quantity, info.name)
                stored = load_file(str(results.folder / file))[key]
                if route == "eig" or not quantity.startswith("curve."):
                    np.testing.assert_array_equal(stored, value, err_msg=f"{info.label} {quantity}")
                else:
                    np.testing.assert_allclose(stored, value, rtol=0, atol=1e-10, err_msg=f"{info.label} {quantity}")
