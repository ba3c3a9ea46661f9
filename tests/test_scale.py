"""Scale: module partitions (several capture passes) give the run of one pass; the planner's estimates;
collection sharded over torch.distributed ranks equals one process."""

from __future__ import annotations

import dataclasses

import pytest

from analysis.core.config import ConfigError
from analysis.core.store import RunStore
from analysis.core.tasks import TaskContext
from analysis.engine.collect import collect
from analysis.engine.gradients import CollectionCancelled, CollectionConfig
from tests.test_store import all_arrays, assert_identical, config, llama, reference  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_modules_per_pass_is_validated_and_not_in_the_run_id(config):  # noqa: F811
    with pytest.raises(ConfigError, match="modules_per_pass"):
        CollectionConfig(modules_per_pass=-1)
    assert dataclasses.replace(config, modules_per_pass=3).run_id() == config.run_id()


def test_partitions_equal_one_pass(tmp_path, config, llama, reference):  # noqa: F811
    events = []
    ctx = TaskContext(progress=events.append)
    results = collect(dataclasses.replace(config, modules_per_pass=5), model=llama, store=RunStore(tmp_path), ctx=ctx)
    assert results.run_id == reference[0].run_id
    assert_identical(all_arrays(results), reference[1])
    assert results.table.equals(reference[0].table)
    assert any("pass 2/" in event.message for event in events)
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_resume_with_another_partitioning(tmp_path, config, llama, reference):  # noqa: F811
    store = RunStore(tmp_path)
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
