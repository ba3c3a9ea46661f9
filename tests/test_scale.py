"""Scale: module partitions (several capture passes) give the run of one pass; the planner's estimates;
collection sharded over torch.distributed ranks equals one process."""

from __future__ import annotations

import dataclasses

import pytest

from analysis.core.config import ConfigError
from analysis.core.tasks import TaskContext
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionCancelled, CollectionConfig
from analysis.engine.results import CollectionStore
from tests.test_store import all_arrays, assert_identical, config, llama, reference  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_modules_per_pass_is_validated_and_not_in_the_run_id(config):  # noqa: F811
    with pytest.raises(ConfigError, match="modules_per_pass"):
        CollectionConfig(modules_per_pass=-1)
    assert dataclasses.replace(config, modules_per_pass=3).run_id() == config.run_id()


def test_partitions_equal_one_pass(tmp_path, config, llama, reference):  # noqa: F811
    events = []
    ctx = TaskContext(progress=events.append)
    results = collect(dataclasses.replace(config, modules_per_pass=5), model=llama, store=CollectionStore(tmp_path), ctx=ctx)
    assert results.run_id == reference[0].run_id
    assert_identical(all_arrays(results), reference[1])
    assert results.table.equals(reference[0].table)
    assert any("pass 2/" in event.message for event in events)
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_resume_with_another_partitioning(tmp_path, config, llama, reference):  # noqa: F811
    store = CollectionStore(tmp_path)
    ctx = TaskContext()
    seen = []

    def progress(event):
        seen.append(event.message)
        if "pass 2/" in event.message:
            ctx.cancel.set()

    ctx.progress = progress
    with pytest.raises(CollectionCancelled):
        collect(dataclasses.replace(config, modules_per_pass=4), model=llama, store=store, ctx=ctx)
    resumed = collect(dataclasses.replace(config, modules_per_pass=7), model=llama, store=store)
    assert_identical(all_arrays(resumed), reference[1])
    whole = collect(config, model=llama, store=store)  # one pass: the stored run is reused
    assert whole.manifest["created"] == resumed.manifest["created"]


# --------------------------------------------------------------------------------------------------
# planner

MEASURE = """
import json, sys, torch
torch.set_num_threads(1)
from analysis.engine.collect import _to_device  # noqa: F401 (same import path as a collection)
from analysis.llm.anatomy import find_linear_modules, select_modules
from analysis.engine.collect_task import CollectionConfig, load_set
from analysis.engine.planner import measure_capture_peak
from analysis.llm.formatting import tokenize_batch
from analysis.llm.models import load_model
config = CollectionConfig.from_dict(json.loads(sys.argv[1]))
model = load_model(config.model)
examples = load_set(config, "safety").examples[: config.batch_size]
batch = tokenize_batch(model.tokenizer, [e.messages for e in examples], config.max_length)
modules = select_modules(find_linear_modules(model.model), config.layers, config.kinds, config.regex)
print(json.dumps({"peak": measure_capture_peak(model.model, batch, modules), "width": batch.input_ids.shape[1]}))
"""


def test_planner_reads_the_shape_without_weights_and_refuses_over_budget():
    from analysis.engine.planner import PlanError, architecture, fit_modules_per_pass, plan_collection

    arch = architecture("tiny-llama")
    assert arch.layers == 2 and arch.hidden == 32 and len(arch.modules) == 14
    small = CollectionConfig(model="tiny-llama", n_safety=4, n_utility=4, max_length=32)
    plan = plan_collection(small, arch)
    assert plan.passes == 1 and plan.peak_bytes > plan.model_bytes > 0 and plan.disk_bytes > 0
    assert any("memory peak" in line for line in plan.lines())
    with pytest.raises(PlanError, match="lower"):
        plan.check(memory_budget=plan.peak_bytes / 2)
    with pytest.raises(PlanError, match="modules_per_pass"):
        plan.check(disk_budget=plan.disk_bytes / 2)
    split = plan_collection(dataclasses.replace(small, modules_per_pass=3), arch)
    assert split.passes == 5 and split.disk_bytes < plan.disk_bytes
    big = dataclasses.replace(small, n_safety=4, batch_size=4, max_length=512)
    assert fit_modules_per_pass(big, arch, memory_budget=10 * 2**30) == 14


@pytest.mark.slow
def test_planner_predicts_the_capture_peak_of_the_embedded_model_within_25_percent():
    """Fresh process: peak RSS of one capture of all 210 modules of SmolLM2, batch 8, 64 tokens (see
    planner.measure_capture_peak for why RSS), against the plan's capture memory."""
    import json
    import subprocess
    import sys

    from analysis.core.config import to_jsonable
    from analysis.engine.planner import plan_collection

    embedded = CollectionConfig(model="default", n_safety=8, n_utility=8, batch_size=8, max_length=64)
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(to_jsonable(embedded))], capture_output=True,
                         text=True, check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["width"] == 64  # the plan assumes full-length batches
    predicted = plan_collection(embedded).capture_bytes
    print(f"planner: predicted {predicted / 2**20:.0f} MiB, measured {measured['peak'] / 2**20:.0f} MiB")
    assert abs(predicted - measured["peak"]) <= 0.25 * measured["peak"]


# --------------------------------------------------------------------------------------------------
# torch.distributed


def test_two_process_gloo_collection_equals_one_process(tmp_path, config, reference):  # noqa: F811
    """torchrun --standalone --nproc-per-node 2 -m analysis collect (gloo on the CPU): the same run id and
    arrays as one process; rank 0 wrote the run, modules in 2 passes on top."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "analysis", "collect", "--model", "tiny-llama", "--safety", config.safety,
               "--utility", config.utility, "--n-safety", str(config.n_safety), "--n-utility", str(config.n_utility),
               "--batch-size", str(config.batch_size), "--max-length", str(config.max_length),
               "--top-k", str(config.top_k), "--curve-boot", str(config.curve_boot), "--modules-per-pass", "9",
               "--store", str(tmp_path), "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = CollectionStore(tmp_path).load(reference[0].run_id)
    assert results.manifest["status"] == "complete"
    assert_identical(all_arrays(results), reference[1])


def test_map_batches_deals_whole_batches_and_gathers_in_order(monkeypatch):
    """Batch j to rank j % world; each rank's work sees exactly the batches one process would; every rank
    gets all outputs in order."""
    from analysis.core.distributed import Ranks, map_batches

    items, seen, shares = list(range(11)), {}, []
    monkeypatch.setattr(Ranks, "all_gather", lambda self, value: shares.append(value) or [value])
    for rank in (0, 1):
        def work(part, rank=rank):
            seen[rank] = [part[i:i + 3] for i in range(0, len(part), 3)]
            return [10 * x for x in part]

        map_batches(Ranks(rank, 2), items, 3, work)
    assert seen == {0: [[0, 1, 2], [6, 7, 8]], 1: [[3, 4, 5], [9, 10]]}
    monkeypatch.setattr(Ranks, "all_gather", lambda self, value: shares)
    assert map_batches(Ranks(0, 2), items, 3, lambda part: [10 * x for x in part]) == [10 * x for x in items]
    assert map_batches(None, items, 3, lambda part: [x + 1 for x in part]) == [x + 1 for x in items]


def test_several_ranks_refuse_a_device_map(monkeypatch):
    import torch

    from analysis.core.distributed import start

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="device_map"):
        start(torch.device("cpu"), "auto")


def test_a_device_mapped_collection_equals_the_reference(tmp_path, config, reference):  # noqa: F811
    """ModelConfig.device_map="auto": accelerate places the model, the collection does not move it; the same
    run id and arrays."""
    from analysis.core.config import ModelConfig

    mapped = dataclasses.replace(config, model=ModelConfig("tiny-llama", device_map="auto"))
    assert mapped.run_id() == reference[0].run_id
    results = collect(mapped, store=CollectionStore(tmp_path))
    assert results.run_id == reference[0].run_id
    assert_identical(all_arrays(results), reference[1])


def test_two_process_gloo_evaluation_equals_one_process(tmp_path, llama):  # noqa: F811
    """torchrun --nproc-per-node 2 -m analysis evaluate (gloo): the generation batches are dealt over the two
    ranks; rank 0 stores the same records, NLLs and metrics as one process, the other rank prints nothing."""
    import os
    import subprocess
    import sys

    import numpy as np

    from analysis.safety import evaluate as ev

    task = ev.EvalConfig(model="tiny-llama", max_new_tokens=4, utility_max_new_tokens=6, n_harmful=5, n_benign=3,
                         n_utility=8, batch_size=2)
    one = ev.evaluate(task, model=llama, store=ev.evals_store(tmp_path / "one"))
    assert any(r["set"] == "utility" for r in one.records)  # the utility answers are sharded too
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "analysis", "evaluate", "--model", "tiny-llama", "--max-new-tokens", "4",
               "--utility-max-new-tokens", "6", "--n-harmful", "5", "--n-benign", "3", "--n-utility", "8",
               "--batch-size", "2", "--examples", "0", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SSE_CACHE_DIR": str(tmp_path / "two")}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count(f"-> run {one.run_id}") == 1  # rank 0 alone reports
    two = ev.load_evaluation(ev.evals_store(tmp_path / "two" / "evals"), one.run_id)
    assert two.records == one.records and two.metrics == one.metrics
    for name in one.nll:
        np.testing.assert_array_equal(two.nll[name], one.nll[name])
