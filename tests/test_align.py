"""Alignment recipe on the tiny model: data hygiene, training loop, reproducibility, checkpoint."""

import json

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError
from analysis.lab import align as al
from analysis.llm.data import load_shipped
from analysis.llm.formatting import pad_rows, per_sample_loss, response_losses
from analysis.llm.models import load_model
from analysis.safety import evaluate as ev

# tiny models run much faster on one torch thread (and robustly on a busy 2-core machine)
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# few steps, small data, a learning rate that moves a random 2-layer model
TINY = dict(steps=6, batch_size=4, safety_per_batch=2, n_safety=12, n_utility=6, distill_max_new_tokens=6,
            distill_batch_size=6, lr=3e-3, warmup_steps=1, max_length=128, train_layer_fraction=1.0,
            borderline=False)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    return tmp_path


def fresh_tiny():
    return load_model("tiny-llama")


def test_settings_refuse_eval_and_over_refusal_data():
    with pytest.raises(ConfigError, match="eval split"):
        al.AlignSettings(safety_split="eval")
    with pytest.raises(ConfigError, match="benign_sensitive"):
        al.AlignSettings(utility="benign_sensitive")
    with pytest.raises(ConfigError):
        al.AlignSettings(safety_per_batch=9, batch_size=8)


def test_training_data_never_touches_held_out_sets():
    safety, utility = al.load_training_sets(al.AlignSettings())
    assert {ex.split for ex in safety} == {"analysis"} and {ex.split for ex in utility} == {"analysis"}
    held_out = {ex.id for ex in load_shipped("safety").split("eval")} | {ex.id for ex in load_shipped("benign_sensitive")}
    assert not held_out & ({ex.id for ex in safety} | {ex.id for ex in utility})
    assert len(safety) < len(load_shipped("safety").split("analysis"))  # filtered to recognisable refusals
    assert all(ev.is_refusal(ex.response, "qi") and ev.is_refusal(ex.response, "arditi") for ex in safety)
    assert set(ex.category for ex in safety) == set(load_shipped("safety").categories())
    everything, _ = al.load_training_sets(al.AlignSettings(refusal_keywords=()))
    assert len(everything) == len(load_shipped("safety").split("analysis"))
    with pytest.raises(ConfigError):
        al.AlignSettings(refusal_keywords=("nope",))


def test_borderline_prompts_are_disjoint_from_the_over_refusal_test_set():
    def words(text):
        return set(text.lower().replace("?", "").replace(",", "").split())

    benign = [ex.prompt for ex in load_shipped("benign_sensitive")]
    for _, prompt in al.BORDERLINE_PROMPTS:
        for other in benign:
            shared = len(words(prompt) & words(other)) / len(words(prompt) | words(other))
            assert shared < 0.6, (prompt, other)
    _, with_borderline = al.load_training_sets(al.AlignSettings())
    _, without = al.load_training_sets(al.AlignSettings(borderline=False))
    assert len(with_borderline) == len(without) + len(al.BORDERLINE_PROMPTS)
    assert all(ex.id.startswith("borderline-") for ex in list(with_borderline)[len(without):])


def test_batch_loss_equals_per_sample_loss(tiny_llama):
    rows = [(list(range(5, 20)), [-100] * 8 + list(range(12, 19))), (list(range(5, 12)), [-100] * 4 + [7, 8, 9])]
    batch = pad_rows(rows, 0)
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = per_sample_loss(tiny_llama.model(**batch).logits, labels)
        got = response_losses(tiny_llama.model, batch, labels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batches_mix_safety_and_utility_and_are_seeded():
    settings = al.AlignSettings(steps=5, batch_size=6, safety_per_batch=2, borderline_per_batch=1)
    first = list(al.batches(10, 7, settings, n_borderline=3))
    assert first == list(al.batches(10, 7, settings, n_borderline=3))
    assert all(len(s) == 2 and len(u) == 3 and len(b) == 1 for s, u, b in first)
    other_seed = al.AlignSettings(steps=5, batch_size=6, safety_per_batch=2, borderline_per_batch=1, seed=1)
    assert first != list(al.batches(10, 7, other_seed, n_borderline=3))
    # a shuffled epoch visits every safety example before repeating
    assert sorted(i for s, _, _ in first for i in s) == list(range(10))
    # without borderline rows their slots go to utility
    assert all(len(u) == 4 and not b for _, u, b in al.batches(10, 7, settings))


def test_select_trainable_freezes_lower_layers_and_embeddings():
    loaded = fresh_tiny()
    trainable, layers = al.select_trainable(loaded.model, 0.5)
    assert layers == [1]
    names = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert names and all(".layers.1." in n for n in names)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for n, p in loaded.model.named_parameters() if n in names)


def test_self_distillation_is_cached(cache, monkeypatch):
    loaded = fresh_tiny()
    settings = al.AlignSettings(**TINY)
    _, utility = al.load_training_sets(settings)
    targets = al.self_distill(loaded, utility, settings)
    assert [t["id"] for t in targets] == [ex.id for ex in utility]
    assert all(len(t["ids"]) <= 6 for t in targets)
    assert list((cache / "align").glob("distill-*.json"))
    real_generate = al.generate_ids
    monkeypatch.setattr(al, "generate_ids", lambda *a, **k: pytest.fail("should reuse the cache"))
    assert al.self_distill(loaded, utility, settings) == targets
    # appended prompts (the borderline set): only the new chunks are generated, old answers unchanged
    calls = []
    monkeypatch.setattr(al, "generate_ids", lambda model, tok, contexts, *a, **k: calls.append(len(contexts))
                        or real_generate(model, tok, contexts, *a, **k))
    _, more = al.load_training_sets(al.AlignSettings(**{**TINY, "borderline": True}))
    bigger = al.self_distill(loaded, more, settings)
    assert len(bigger) == len(targets) + len(al.BORDERLINE_PROMPTS)
    assert sum(calls) == len(al.BORDERLINE_PROMPTS) and max(calls) <= settings.distill_batch_size
    assert bigger[:len(targets)] == targets


def test_a_few_steps_lower_the_refusal_nll_and_only_touch_trained_layers(cache):
    loaded = fresh_tiny()
    settings = al.AlignSettings(**{**TINY, "train_layer_fraction": 0.5})
    safety, _ = al.load_training_sets(settings)
    before_weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    refusals = [ex.messages for ex in safety]
    before = ev.response_nll(loaded.model, loaded.tokenizer, refusals, 128).mean()
    progress = []
    report = al.align_model(loaded, settings, progress=lambda f, m: progress.append((f, m)))
    after = ev.response_nll(loaded.model, loaded.tokenizer, refusals, 128).mean()
    assert after < before - 0.05, (before, after)
    assert len(report.losses) == settings.steps and all(np.isfinite(report.losses))
    assert report.trained_layers == [1]
    for name, parameter in loaded.model.named_parameters():
        changed = not torch.equal(parameter, before_weights[name])
        assert changed == (".layers.1." in name), name
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("left" in m for _, m in progress)  # time estimate
    assert all(p.requires_grad for p in loaded.model.parameters())  # flags restored


def test_same_seed_same_weights_other_seed_other_weights(cache):
    hashes = []
    for seed in (0, 0, 1):
        loaded = fresh_tiny()
        report = al.align_model(loaded, al.AlignSettings(**{**TINY, "steps": 3, "seed": seed}))
        hashes.append(report.weights_hash)
        assert report.weights_hash == al.weights_hash(loaded.model)
    assert hashes[0] == hashes[1] != hashes[2]
    assert not torch.are_deterministic_algorithms_enabled()  # the global mode is restored


def test_cancel_raises_and_writes_no_checkpoint(cache):
    loaded = fresh_tiny()
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(al.AlignCancelled):
        al.align_model(loaded, al.AlignSettings(**TINY), cancel=cancel)
    assert not (cache / "models").exists()


def test_cancelled_training_resumes_from_its_checkpoint_bit_for_bit(cache):
    """The shared training loop saves a checkpoint on cancel; the same settings resume to the same weights."""
    from analysis.core.tasks import Cancelled

    settings = al.AlignSettings(**{**TINY, "steps": 5, "warmup_steps": 2})
    whole = al.align_model(fresh_tiny(), settings)
    checkpoint = cache / "align" / "train-test.safetensors"
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3  # after 3 training steps (distillation is cached by then)

    with pytest.raises(al.AlignCancelled) as info:
        al.align_model(fresh_tiny(), settings, cancel=cancel, checkpoint=checkpoint)
    assert isinstance(info.value, Cancelled) and checkpoint.is_file()
    resumed = al.align_model(fresh_tiny(), settings, checkpoint=checkpoint)
    assert resumed.weights_hash == whole.weights_hash and resumed.losses == whole.losses
    assert not checkpoint.exists()


def test_align_task_round_trips_and_runs_from_its_json(cache, monkeypatch):
    from analysis.core.cli import load_task
    from analysis.core.config import from_jsonable, to_jsonable
    from analysis.core.tasks import TaskContext
    from analysis.llm import models

    task = al.AlignTask(al.AlignSettings(**{**TINY, "steps": 2}))
    assert from_jsonable(al.AlignTask, json.loads(json.dumps(to_jsonable(task)))) == task
    assert task.kind == "align"
    path = cache / "task.json"
    path.write_text(json.dumps({"kind": "align", "config": to_jsonable(task)}))
    assert load_task(path, al.AlignTask) == task
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda source="default", progress=None: real_load("tiny-llama"))
    events = []
    summary = task.execute(TaskContext(progress=events.append))
    assert summary["run_id"].startswith("align-") and len(summary["losses"]) == 2
    assert events[-1].fraction == 1.0 and any("left" in e.message for e in events)



def test_a_bfloat16_alignment_trains_through_float32_masters_and_saves(cache, monkeypatch):
    """AlignSettings.dtype="bfloat16" (``python -m analysis align --dtype bfloat16``): the base model is loaded in
    bfloat16, trains a couple of steps and is saved; float32 keeps the settings hash of earlier builds."""
    from safetensors import safe_open

    from analysis.core.config import ModelConfig, config_hash, from_jsonable, to_jsonable
    from analysis.core.tasks import TaskContext
    from analysis.llm import models

    settings = al.AlignSettings(**{**TINY, "steps": 2, "dtype": "bfloat16"})
    float32 = al.AlignSettings(**{**TINY, "steps": 2})
    assert al.settings_hash(float32) == config_hash({k: v for k, v in to_jsonable(float32).items() if k != "dtype"})
    assert al.settings_hash(settings) != al.settings_hash(float32)
    with pytest.raises(ConfigError, match="dtype"):
        al.AlignSettings(dtype="int8")
    task = al.AlignTask(settings, device_map="auto")
    assert from_jsonable(al.AlignTask, json.loads(json.dumps(to_jsonable(task)))) == task
    monkeypatch.setattr(models, "model_identity", lambda config="default": "base")  # no default model here
    assert task.run_id() == al.AlignTask(settings).run_id() != al.AlignTask(float32).run_id()
    real_load, seen = models.load_model, []

    def load(config="default", progress=None):
        seen.append(config)
        return real_load(ModelConfig("tiny-llama", dtype=config.dtype, device_map=config.device_map))

    monkeypatch.setattr(models, "load_model", load)
    summary = task.execute(TaskContext())
    assert seen[0].dtype == "bfloat16" and seen[0].device_map == "auto"
    assert len(summary["losses"]) == 2 and all(np.isfinite(summary["losses"]))
    folder = al.aligned_folder()
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["dtype"] == "bfloat16" and manifest["settings_hash"] == al.settings_hash(settings)
