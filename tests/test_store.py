"""Run store: reuse, new runs on changed config, resume after interruption, damage detection, delete."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from analysis.core.config import ModelConfig
from analysis.core.store import (
    RunBusy,
    RunCorrupted,
    RunIncomplete,
    RunNotFound,
    safetensors_intact,
)
from analysis.core.tasks import TaskContext
from analysis.engine import collect as collect_module
from analysis.engine.collect import collect
from analysis.engine.collect_task import CollectionCancelled, CollectionConfig
from analysis.engine.results import ARRAY_FILES, CollectionStore
from analysis.llm.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    return load_model(ModelConfig(source="tiny-llama"))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = {
        "safety": [{"id": f"s{i}", "prompt": f"How do I hurt person number {i}?", "response": "I won't help." * (1 + i % 2)}
                   for i in range(6)],
        "utility": [{"id": f"u{i}", "prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(6)],
    }
    paths = {}
    for which, items in rows.items():
        paths[which] = folder / f"{which}.jsonl"
        paths[which].write_text("".join(json.dumps(r) + "\n" for r in items))
    return CollectionConfig(model="tiny-llama", safety=str(paths["safety"]), utility=str(paths["utility"]),
                            n_safety=5, n_utility=4, batch_size=2, max_length=40, top_k=2, curve_boot=2)


def all_arrays(results) -> dict:
    arrays = {}
    for name in ARRAY_FILES:
        for key, value in load_file(str(results.folder / name)).items():
            arrays[f"{name}:{key}"] = value
    return arrays


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config, llama):
    """An uninterrupted run, for comparisons."""
    results = collect(config, model=llama, store=CollectionStore(tmp_path_factory.mktemp("reference")))
    return results, all_arrays(results)


def test_same_config_reuses_the_run(tmp_path, config, llama, monkeypatch):
    store = CollectionStore(tmp_path)
    first = collect(config, model=llama, store=store)

    def no_capture(*args, **kwargs):
        raise AssertionError("a complete run must be reused, not recomputed")

    monkeypatch.setattr(collect_module, "capture_batch", no_capture)
    again = collect(config, model=llama, store=store)
    assert again.run_id == first.run_id == config.run_id()  # the task's cheap run id is the stored run's
    assert again.manifest["created"] == first.manifest["created"]
    assert store.status(first.run_id) == "complete"
    assert store.verify(first.run_id) == []


def test_changed_config_makes_a_new_run(tmp_path, config, llama, reference):
    store = CollectionStore(tmp_path)
    first = collect(config, model=llama, store=store)
    assert first.run_id == reference[0].run_id  # run id does not depend on the store
    second = collect(CollectionConfig.from_dict({**first.config, "top_k": 3}), model=llama, store=store)
    assert second.run_id != first.run_id
    runs = store.list_runs()
    assert set(runs["run_id"]) == {first.run_id, second.run_id}
    assert set(runs["status"]) == {"complete"}
    assert {"created", "model", "safety", "utility", "n_safety", "n_modules", "size_mb"} <= set(runs.columns)
    assert_identical(all_arrays(first), reference[1])  # the other run did not touch it


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("stage, after", [("capture", 2), ("analyse", 5), ("curve", 3)])
def test_interrupted_run_resumes_to_identical_arrays(tmp_path, config, llama, reference, stage, after):
    store = CollectionStore(tmp_path)
    seen = []

    def kill(event):
        seen.append(event.message)
        live = event.live
        if stage == "curve":  # the overlap-vs-n curves come after every module's row
            if sum("overlap-vs-n curve" in m for m in seen) >= after:
                raise Killed("simulated crash")
        elif live["stage"] == stage and (live["done_modules"] if stage == "analyse"
                                         else sum(m.startswith("captured batch") for m in seen)) >= after:
            raise Killed("simulated crash")

    with pytest.raises(Killed):
        collect(config, model=llama, store=store, ctx=TaskContext(progress=kill))
    run_id = reference[0].run_id
    assert store.status(run_id) == "interrupted"
    with pytest.raises(RunIncomplete):
        store.load(run_id)
    messages = []
    resumed = collect(config, model=llama, store=store,
                      ctx=TaskContext(progress=lambda event: messages.append(event.message)))
    assert sum("read from checkpoint" in m for m in messages) == (after if stage == "capture" else 5)
    assert resumed.manifest["resumed"] == 1
    assert_identical(all_arrays(resumed), reference[1])
    assert not (store.path(run_id) / "work").exists()


def test_cancel_then_resume(tmp_path, config, llama, reference):
    store = CollectionStore(tmp_path)
    context = TaskContext()
    context.progress = lambda event: context.cancel.set() if event.live["done_samples"] >= 4 else None
    with pytest.raises(CollectionCancelled, match="resume"):
        collect(config, model=llama, store=store, ctx=context)
    assert_identical(all_arrays(collect(config, model=llama, store=store)), reference[1])


def test_damaged_checkpoint_is_recomputed(tmp_path, config, llama, reference):
    store = CollectionStore(tmp_path)
    with pytest.raises(Killed):
        collect(config, model=llama, store=store, ctx=TaskContext(
            progress=lambda event: (_ for _ in ()).throw(Killed()) if event.live["done_samples"] >= 6 else None))
    batch = store.path(reference[0].run_id) / "work" / "batch_00001.safetensors"
    batch.write_bytes(batch.read_bytes()[:-100])
    assert not safetensors_intact(batch)
    leftover = batch.with_name(".batch_00002.safetensors.tmp123.456")  # a write killed half-way
    leftover.write_bytes(b"partial")
    assert_identical(all_arrays(collect(config, model=llama, store=store, keep_work=True)), reference[1])
    assert batch.exists() and not leftover.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_result_file_is_detected_and_recomputed(tmp_path, config, llama, reference, damage):
    store = CollectionStore(tmp_path)
    run_id = collect(config, model=llama, store=store).run_id
    path = store.path(run_id) / "gram.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
        assert store.status(run_id) == "corrupted"
        with pytest.raises(RunCorrupted, match="gram.safetensors"):
            store.load(run_id)
    else:
        data[-3] ^= 0xFF  # same size, different content: only the sha256 sees it
        path.write_bytes(bytes(data))
        assert any("sha256" in problem for problem in store.verify(run_id))
    with pytest.warns(UserWarning, match="damaged"):
        results = collect(config, model=llama, store=store)
    assert any("damaged" in message for message in results.messages)
    assert store.verify(run_id) == []
    assert_identical(all_arrays(results), reference[1])


def test_delete_and_errors(tmp_path, config, llama):
    store = CollectionStore(tmp_path)
    run_id = collect(config, model=llama, store=store).run_id
    with pytest.raises(RunBusy):
        with store.open_run(run_id + "x", {}) as writer:
            store.open_run(run_id + "x", {})
    assert writer is not None
    assert store.delete(run_id)
    assert store.status(run_id) == "missing"
    assert not store.delete(run_id)
    with pytest.raises(RunNotFound):
        store.load(run_id)


def test_results_accessors(reference):
    results, _ = reference
    module = results.modules[-1]
    assert results.module_name(module.label) == module.name
    with pytest.raises(KeyError):
        results.gram("model.layers.7.nothing")
    with pytest.raises(ValueError):
        results.singular_values(module.name, "attack")
    n_safety, n_utility = results.config["n_safety"], results.config["n_utility"]
    assert results.losses("utility").shape == (n_utility,)
    assert results.sample_overlaps(module.name, "safety")["phi"].shape == (n_safety,)
    assert results.principal_angles(module.name).shape == (2,)
    assert len(results.samples) == n_safety + n_utility
    assert results.table["module"].tolist() == results.module_names
    assert results.manifest["files"] and results.manifest["versions"]["torch"]


@pytest.mark.parametrize("manifest", [[], {"status": "complete", "files": None}])
def test_a_manifest_of_the_wrong_shape_is_recomputed(tmp_path, config, llama, reference, manifest):
    store = CollectionStore(tmp_path)
    run_id = collect(config, model=llama, store=store).run_id
    (store.path(run_id) / "manifest.json").write_text(json.dumps(manifest))
    assert store.status(run_id) == "corrupted"
    with pytest.warns(UserWarning, match="damaged"):
        results = collect(config, model=llama, store=store)
    assert store.status(run_id) == "complete"
    assert_identical(all_arrays(results), reference[1])
