"""Low precision and devices: bfloat16 files, a bfloat16 collection, a bfloat16 fine-tune with float32 master
weights through checkpoint + cancel + resume, and the same collection on a GPU (skipped without one)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors import safe_open

from analysis.core.config import ModelConfig
from analysis.core.store import atomic_save_arrays
from analysis.engine.collect import collect
from analysis.engine.results import CollectionStore
from analysis.lab.finetune import FinetuneCancelled, run_finetune
from analysis.lab.loop import TrainingLoop
from tests.test_finetune import RESUME, _same_history, _weights, rows_context, tiny
from tests.test_store import all_arrays
from tests.test_store import config as collection_config  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BF16 = ModelConfig("tiny-llama", dtype="bfloat16")


def test_atomic_save_arrays_keeps_bfloat16(tmp_path):
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    shared = torch.arange(6.0)
    atomic_save_arrays(tmp_path / "a.safetensors", {"x": x, "n": np.arange(3), "s1": shared, "s2": shared[:6]})
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("x").dtype == torch.bfloat16 and torch.equal(handle.get_tensor("x"), x)
        assert torch.equal(handle.get_tensor("n"), torch.arange(3)) and torch.equal(handle.get_tensor("s2"), shared)


def test_bfloat16_collection_is_close_to_float32(tmp_path, collection_config):  # noqa: F811
    config32 = collection_config
    config16 = dataclasses.replace(config32, model=BF16)
    assert config16.run_id() != config32.run_id()
    r32 = all_arrays(collect(config32, store=CollectionStore(tmp_path / "32")))
    r16 = all_arrays(collect(config16, store=CollectionStore(tmp_path / "16")))
    assert r16.keys() == r32.keys()
    for key in ("spectra.safetensors:safety/model.layers.0.mlp.down_proj", "per_sample.safetensors:loss"):
        assert r16[key].dtype == r32[key].dtype  # accumulated in float32/float64, not bfloat16
        assert np.isfinite(r16[key]).all()
        np.testing.assert_allclose(r16[key], r32[key], rtol=0.1, atol=0.05 * np.abs(r32[key]).max(), err_msg=key)


def test_master_weights_keep_updates_below_bfloat16_resolution():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    loop = TrainingLoop([("w", weight)], total=10, optimizer="sgd", lr=1e-3)
    assert loop.masters[0].dtype == torch.float32
    for _ in range(10):  # each step moves 1e-3: below bf16's spacing at 1.0 (7.8e-3), 1e-2 in total
        loop.backward((weight.float() * 1.0).sum())
        loop.update()
    assert float(loop.masters[0][0]) == pytest.approx(0.99, abs=1e-6)
    assert float(weight[0]) == pytest.approx(0.99, abs=8e-3) and float(weight[0]) < 1.0  # plain bf16 would stay 1


def test_bfloat16_finetune_checkpoint_cancel_resume(tmp_path):
    config = tiny(**RESUME, model=BF16)
    whole = run_finetune(config, root=tmp_path / "a")
    assert whole.status == "complete"
    assert all(t.dtype == torch.bfloat16 for t in _weights(whole).values())

    def stop_at_3(ctx, row):
        if row["step"] == 3:
            ctx.cancel.set()

    with pytest.raises(FinetuneCancelled):
        run_finetune(config, rows_context(stop_at_3), root=tmp_path / "b")
    resumed = run_finetune(config, root=tmp_path / "b")
    assert resumed.status == "complete"
    _same_history(whole, resumed)
    for key, tensor in _weights(whole).items():
        assert torch.equal(tensor, _weights(resumed)[key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_collection_equals_cpu(tmp_path, collection_config):  # noqa: F811
    from analysis.core.tasks import TaskContext

    cpu = all_arrays(collect(collection_config, store=CollectionStore(tmp_path / "cpu")))
    gpu = all_arrays(collect(collection_config, store=CollectionStore(tmp_path / "gpu"), ctx=TaskContext(device="cuda")))
    for key in cpu:
        np.testing.assert_allclose(gpu[key], cpu[key], rtol=1e-3, atol=1e-5 * (np.abs(cpu[key]).max() + 1e-30),
                                   err_msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bfloat16_finetune(tmp_path):
    from analysis.core.tasks import TaskContext

    result = run_finetune(tiny(method="plain", max_steps=2, eval_every=2, model=BF16), TaskContext(device="cuda"),
                          root=tmp_path)
    assert result.status == "complete"


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    from analysis.lab.trainer import run_id_for

    config = tiny(method="plain", max_steps=2, eval_every=2, trainable="all")
    checkpointed = dataclasses.replace(config, gradient_checkpointing=True)
    assert run_id_for(checkpointed, "weights", {}) == run_id_for(config, "weights", {})
    plain = run_finetune(config, root=tmp_path / "a")
    recomputed = run_finetune(checkpointed, root=tmp_path / "b")
    for key, tensor in _weights(plain).items():
        torch.testing.assert_close(_weights(recomputed)[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_finetune_cli_takes_dtype_and_gradient_checkpointing():
    from analysis.__main__ import parse_task

    task = parse_task("finetune", ["--model", "tiny-llama", "--dtype", "bfloat16", "--gradient-checkpointing"])
    assert task.config.model == BF16 and task.config.gradient_checkpointing
