"""SafetyGeometryCallback (analysis.lab.watch) inside a real transformers Trainer on the tiny model: its numbers
against the engine's offline numbers and autograd, watch mode leaves training bitwise unchanged, its SPF /
PCGrad step equals the lab trainer's, gradient accumulation, LoRA factors, TRL's SFTTrainer, the run folder."""

import copy

import numpy as np
import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig
from analysis.engine import geometry as geo
from analysis.engine.analyse import batch_svd
from analysis.engine.capture import capture_batch
from analysis.lab.watch import SafetyGeometryCallback, WatchConfig, safety_gradients, watched_modules
from analysis.lab.watch_store import list_watch_runs, read_watch_run
from analysis.llm.formatting import pad_rows, pad_token_id, response_losses, tokenize_batch, tokenize_conversation
from analysis.llm.models import load_model

MAX_LENGTH = 48
SETTINGS = dict(max_length=MAX_LENGTH, safety_batch=3, k=4, eval_every=None)


@pytest.fixture(scope="module")
def tiny64(one_torch_thread):
    """tiny-llama in float64: the reference-precision comparisons."""
    return load_model(ModelConfig("tiny-llama", dtype="float64"))


def _dataset(tokenizer, n=16):
    from analysis.llm.data import load_any

    rows = []
    for example in load_any("utility").split("analysis").take(n, seed=0):
        ids, labels, _ = tokenize_conversation(tokenizer, list(example.messages), MAX_LENGTH)
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _collator(tokenizer):
    def collate(items):
        batch = pad_rows([(r["input_ids"], r["labels"]) for r in items], pad_token_id(tokenizer), "right")
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels", "position_ids")}
    return collate


def _train(model, tokenizer, tmp_path, callbacks, steps=6, batch=4, accum=1, optim="sgd", lr=0.05, clip=0.0,
           seed=0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=steps, learning_rate=lr, optim=optim, max_grad_norm=clip, lr_scheduler_type="constant",
        report_to="none", use_cpu=True, save_strategy="no", logging_steps=1000, disable_tqdm=True, seed=seed,
        dataloader_num_workers=0, weight_decay=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tokenizer), data_collator=_collator(tokenizer),
                      callbacks=callbacks)
    trainer.train()
    return trainer


class Snapshot:
    """A callback that keeps the weights and gradients at ``on_pre_optimizer_step`` of the given steps
    (put it before or after the watch callback to see the gradient before or after its projection)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights, self.grads = {}, {}

    def __getattr__(self, name):  # every other TrainerCallback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.grads[state.global_step] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.grad is not None}


def _safety_batch(tokenizer):
    from analysis.lab.watch import load_conversations

    conversations = load_conversations("safety", "analysis", SETTINGS["safety_batch"], 0, "safety")
    return conversations, tokenize_batch(tokenizer, conversations, MAX_LENGTH)


def _assert_rows_equal_the_engine(run, snapshot, reference, lr=None):
    """Each recorded row = the engine's offline numbers on the snapshot's weights and gradients of that step
    (capture_batch -> mean G_i, geometry.cosine, analyse.batch_svd) to 1e-6; with ``lr`` (plain SGD) the
    first-order loss change is -lr <G_s, G>."""
    names = [m["name"] for m in run.modules]
    _, batch = _safety_batch(reference.tokenizer)
    offline = copy.deepcopy(reference.model).eval()
    for row_index, step in enumerate(run.steps):
        offline.load_state_dict(snapshot.weights[step], strict=False)
        factors = capture_batch(offline, batch, names)
        grads = snapshot.grads[step]
        dot_sum = gg_sum = ss_sum = 0.0
        for j, name in enumerate(names):
            G_s = sum(factors.sample_gradient(name, i) for i in range(factors.n_samples)) / factors.n_samples
            G = grads[f"{name}.weight"]
            _, U_k, _ = batch_svd(G_s.numpy(), SETTINGS["k"])
            share = float(np.sum((U_k.T @ G.numpy()) ** 2) / np.sum(G.numpy() ** 2))
            assert run.per_module["cos"][row_index, j] == pytest.approx(geo.cosine(G_s, G), abs=1e-6)
            assert run.per_module["share"][row_index, j] == pytest.approx(share, abs=1e-6)
            dot = float((G_s * G).sum())
            if lr is not None:
                assert run.per_module["dloss"][row_index, j] == pytest.approx(-lr * dot, rel=1e-6, abs=1e-12)
            dot_sum, gg_sum, ss_sum = dot_sum + dot, gg_sum + float(G.pow(2).sum()), ss_sum + float(G_s.pow(2).sum())
        totals = run.totals[run.totals["step"] == step].iloc[0]
        assert totals["cos"] == pytest.approx(dot_sum / np.sqrt(gg_sum * ss_sum), abs=1e-6)
        if lr is not None:
            assert totals["dloss"] == pytest.approx(totals["dloss_sgd"], rel=1e-6)  # SGD: the update is -lr G
        assert totals["safety_loss"] == pytest.approx(float(factors.losses.mean()), abs=1e-9)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="mode"):
        WatchConfig(mode="spff")
    with pytest.raises(ConfigError, match="multiple"):
        WatchConfig(interval=4, eval_every=6)
    with pytest.raises(ConfigError, match="interval"):
        WatchConfig(interval=0)


def test_trainer_rows_equal_the_engine_offline_numbers(tiny64, tmp_path):
    """Done-when 1: one row per interval; cosines and subspace shares = the engine's numbers on the same
    checkpoint and batch (capture_batch -> mean G_i, geometry.cosine, analyse.batch_svd) to 1e-6; the
    first-order loss change of an SGD step equals -lr <G_s, G>; the run folder is a complete store run."""
    model = copy.deepcopy(tiny64.model)
    tokenizer = tiny64.tokenizer
    snapshot = Snapshot(range(0, 7, 3))
    watch = SafetyGeometryCallback(tokenizer, run_dir=tmp_path / "watch" / "run", interval=3, **SETTINGS)
    _train(model, tokenizer, tmp_path, [snapshot, watch], steps=7, lr=0.05)

    run = read_watch_run(tmp_path / "watch" / "run")
    assert run.status == "complete" and run.steps == [0, 3, 6] and len(watch.rows) == 3
    from analysis.core.store import RunStore

    assert RunStore(tmp_path / "watch").verify("run") == []
    assert list(list_watch_runs(tmp_path / "watch")["run_id"]) == ["run"]
    names = [m["name"] for m in run.modules]
    assert len(names) == 14  # 2 layers x (q, k, v, o, gate, up, down)

    _assert_rows_equal_the_engine(run, snapshot, tiny64, lr=0.05)
    assert np.allclose(run.per_module["drift"][0], 1.0)  # step 0 against itself


def test_safety_gradient_equals_autograd_for_weights_and_lora_factors(tiny64):
    """The captured G_safety (no .grad written) equals autograd of the mean refusal loss, full and LoRA."""
    from peft import LoraConfig, get_peft_model

    _, batch = _safety_batch(tiny64.tokenizer)
    full = copy.deepcopy(tiny64.model)
    lora = get_peft_model(copy.deepcopy(tiny64.model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                                   init_lora_weights=False))
    for model in (full, lora):
        modules = watched_modules(model)
        _, safety = safety_gradients(model, batch, modules, k=4)
        assert all(m.weight.grad is None for m in modules)
        loss = response_losses(model, batch.model_inputs(), batch.labels).mean()
        reference = torch.autograd.grad(loss, [m.weight for m in modules])
        for m, G in zip(modules, reference):
            torch.testing.assert_close(safety[m.name].G, G, atol=1e-8, rtol=1e-6)
    assert [m.label for m in watched_modules(lora)][:2] == ["L0.attn.q.A", "L0.attn.q.B"]


def test_watch_mode_leaves_training_bitwise_unchanged(tiny_llama, tmp_path):
    """Done-when 2: the same final weights with and without the callback (dropout on, evaluations on)."""
    finals = []
    for with_callback in (False, True):
        model = copy.deepcopy(tiny_llama.model)
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.1  # training draws random numbers: the callback must not shift them
        callbacks = [SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "w" / "run", interval=2,
                                            **dict(SETTINGS, eval_every=2, n_eval=2, eval_max_new_tokens=4))
                     ] if with_callback else []
        _train(model, tiny_llama.tokenizer, tmp_path, callbacks, steps=4, optim="adamw_torch", lr=1e-3, clip=1.0)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(finals[0][name], finals[1][name]) for name in finals[0])
    rows = read_watch_run(tmp_path / "w" / "run").totals
    assert rows["refusal_nll"].notna().sum() == 3  # steps 0, 2 and the end


@pytest.mark.parametrize("mode, spf_mode", [("spf", "conflict"), ("spf", "orthogonal"), ("spf", "same"),
                                            ("pcgrad", "conflict")])
def test_projected_update_equals_the_lab_trainer_step(tiny64, tmp_path, mode, spf_mode):
    """Done-when 3: the gradient the optimizer receives equals the lab's SPF (SPFProjector, exact basis) /
    PCGrad projection of the same gradients against the same safety batch, to 1e-6; refreshed every R."""
    from analysis.lab.config import FinetuneConfig, SPFConfig
    from analysis.lab.defences import training_defence
    from analysis.lab.spf import SPFProjector, spf_modules
    from analysis.llm.anatomy import as_out_in

    model = copy.deepcopy(tiny64.model)
    tokenizer = tiny64.tokenizer
    before, after = Snapshot([0, 1, 2]), Snapshot([0, 1, 2])
    watch = SafetyGeometryCallback(tokenizer, run_dir=tmp_path / "w" / mode, interval=1, mode=mode,
                                   spf_mode=spf_mode, refresh=2, **SETTINGS)
    _train(model, tokenizer, tmp_path, [before, watch, after], steps=3)

    _, batch = _safety_batch(tokenizer)
    lab_model = copy.deepcopy(tiny64.model)
    for step in (0, 1, 2):
        basis_step = step - step % 2  # refresh every 2 steps: the basis of step 0 is used at step 1
        lab_model.load_state_dict(before.weights[basis_step], strict=False)
        lab_model.train()
        spf = SPFConfig(k=SETTINGS["k"], mode=spf_mode, svd="exact")
        projector = SPFProjector(spf_modules(lab_model, spf), spf)
        defence = training_defence(mode)(FinetuneConfig(method=mode, spf=spf), projector)  # the trainer's hooks
        safety = projector.safety_gradients(response_losses(lab_model, batch.model_inputs(), batch.labels).mean())
        defence.refresh(1, safety, zero=False, generator=torch.Generator().manual_seed(0))
        lab_model.load_state_dict(before.weights[step], strict=False)
        for m in projector.modules:
            m.weight.grad = before.grads[step][f"{m.name}.weight"].clone()
        with torch.no_grad():
            defence.before_step(step, {m.name: as_out_in(m.module, m.weight.grad) for m in projector.modules})
        for m in projector.modules:
            assert torch.allclose(after.grads[step][f"{m.name}.weight"], m.weight.grad, atol=1e-6), (step, m.name)
    changed = [not torch.equal(after.grads[step][name], before.grads[step][name])
               for step in (0, 1, 2) for name in after.grads[step]]
    rows = watch.rows
    if mode == "spf":
        assert any(changed)  # the projection did something
    else:
        assert all((r["removed"] == 0) == (r["pcgrad_cos"] >= 0) for r in rows)  # PCGrad acts on conflict only
    assert [r["refreshed"] for r in rows] == [True, False, True]
    assert all(0 <= r["removed"] <= 1 for r in rows)
    if mode == "spf" and spf_mode == "orthogonal":
        assert all(abs(r["share_applied"]) < 1e-12 for r in rows if r["refreshed"])  # nothing left in U_k


def test_gradient_accumulation_records_as_the_full_batch(tiny64, tmp_path):
    """Done-when 4: 2 micro-batches of 2 record the same rows as one batch of 4."""
    runs = []
    for batch, accum in ((4, 1), (2, 2)):
        watch = SafetyGeometryCallback(tiny64.tokenizer, run_dir=tmp_path / "w" / f"b{batch}", interval=1, **SETTINGS)
        _train(copy.deepcopy(tiny64.model), tiny64.tokenizer, tmp_path, [watch], steps=3, batch=batch, accum=accum)
        runs.append(read_watch_run(tmp_path / "w" / f"b{batch}"))
    for metric in ("cos", "share", "dloss", "grad_norm", "drift"):
        assert np.allclose(runs[0].per_module[metric], runs[1].per_module[metric], rtol=1e-6, atol=1e-9), metric


def test_lora_run_records_its_adapter_factors(tiny_llama, tmp_path):
    """Done-when 5: a peft LoRA run measures lora_A / lora_B of the adapted modules and says so."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_llama.model), LoraConfig(r=2, lora_alpha=4,
                                                                       target_modules=["q_proj", "v_proj"]))
    watch = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "w" / "lora", interval=1, **SETTINGS)
    _train(model, tiny_llama.tokenizer, tmp_path, [watch], steps=3, optim="adamw_torch", lr=1e-2)
    run = read_watch_run(tmp_path / "w" / "lora")
    assert run.manifest["measured"]["what"].startswith("LoRA")
    assert [m["label"] for m in run.modules] == [f"L{i}.attn.{k}.{f}" for i in (0, 1) for k in "qv" for f in "AB"]
    assert {m["factor"] for m in run.modules} == {"A", "B"}
    cos = run.per_module["cos"]
    factor_b = [j for j, m in enumerate(run.modules) if m["factor"] == "B"]
    assert np.isfinite(cos[:, factor_b]).all()  # B gets a gradient from step 0 (A only once B != 0)
    assert np.isfinite(cos[1:]).all()


def test_trl_sft_trainer_records_one_row_per_interval(tiny64, tmp_path):
    """Done-when 1 (TRL): a 10-step SFTTrainer run on chat messages records steps 0, 5 (interval 5), and its rows
    equal the engine's offline numbers on the same weights and gradients (AdamW: no SGD loss change)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from analysis.llm.data import load_any

    messages = [list(ex.messages) for ex in load_any("utility").split("analysis").take(8, seed=0)]
    config = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=10, per_device_train_batch_size=2,
                           learning_rate=1e-3, max_length=MAX_LENGTH, report_to="none", use_cpu=True,
                           save_strategy="no", logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0)
    snapshot = Snapshot([0, 5])
    watch = SafetyGeometryCallback(run_dir=tmp_path / "w" / "trl", interval=5, **SETTINGS)
    trainer = trl.SFTTrainer(model=copy.deepcopy(tiny64.model), args=config, processing_class=tiny64.tokenizer,
                             train_dataset=Dataset.from_list([{"messages": m} for m in messages]),
                             callbacks=[snapshot, watch])
    trainer.train()
    run = read_watch_run(tmp_path / "w" / "trl")
    assert run.status == "complete" and run.steps == [0, 5]
    _assert_rows_equal_the_engine(run, snapshot, tiny64)


def test_a_complete_run_folder_is_not_overwritten(tiny_llama, tmp_path):
    from analysis.lab.watch_store import WatchRunError

    for attempt in range(2):
        watch = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "w" / "same", interval=2, **SETTINGS)
        if attempt == 0:
            _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [watch], steps=2)
        else:
            with pytest.raises(WatchRunError, match="complete"):
                _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [watch], steps=2)


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_mixed_precision_runs_record_finite_numbers(tiny_llama, tmp_path, precision):
    """bf16 weights (G_safety and the sums in float32/float64) and bf16 autocast (the capture runs outside it)."""
    from transformers import Trainer, TrainingArguments

    model = copy.deepcopy(tiny_llama.model)
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    watch = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "w" / precision, interval=1,
                                   mode="spf", refresh=1, **SETTINGS)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-3, bf16=precision == "bf16-autocast", report_to="none", use_cpu=True,
                             save_strategy="no", logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=_dataset(tiny_llama.tokenizer),
            data_collator=_collator(tiny_llama.tokenizer), callbacks=[watch]).train()
    run = read_watch_run(tmp_path / "w" / precision)
    assert run.steps == [0, 1]
    for metric in ("cos", "share", "dloss", "drift"):
        assert np.isfinite(run.per_module[metric]).all(), metric
    assert ((run.per_module["share"] >= 0) & (run.per_module["share"] <= 1 + 1e-6)).all()
    assert run.manifest["model"]["dtype"] == ("bfloat16" if precision == "bf16-weights" else "float32")


DDP_SCRIPT = '''
import json, sys, torch
from analysis.core.config import ModelConfig
from analysis.llm.models import load_model
from analysis.lab.watch import SafetyGeometryCallback
from tests.test_watch import SETTINGS, _train
from pathlib import Path
folder, mode = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
loaded = load_model(ModelConfig("tiny-llama", dtype="float64"))
watch = SafetyGeometryCallback(loaded.tokenizer, run_dir=folder / "run", interval=1, mode=mode, refresh=1, **SETTINGS)
trainer = _train(loaded.model, loaded.tokenizer, folder, [watch], steps=3, batch=2)
rank = trainer.args.process_index
torch.save({n: p.detach() for n, p in loaded.model.named_parameters()}, folder / f"rank{rank}.pt")
(folder / f"rank{rank}.json").write_text(json.dumps({"rows": len(watch.rows), "writer": watch.writer is not None}))
'''


@pytest.mark.parametrize("mode", ["watch", "spf"])
def test_ddp_rank0_writes_and_every_rank_projects(tmp_path, mode):
    """torchrun --nproc-per-node 2 (gloo, CPU): rank 0 alone measures and writes the run; with SPF every rank
    projects its (all-reduced) gradient the same way, so the replicas stay identical."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(tmp_path), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # each rank reports through its own file: the ranks' stdout lines interleave (CI saw "rank{...}\n 1 rows")
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports == [{"rows": 3, "writer": True}, {"rows": 0, "writer": False}]
    run = read_watch_run(tmp_path / "run")
    assert run.status == "complete" and run.steps == [0, 1, 2]
    assert run.manifest["training"]["world_size"] == 2
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_an_interrupted_run_is_resumed_with_its_step0_basis(tiny_llama, tmp_path):
    """A run whose process is gone (lock released, not complete) is resumed by the next callback with the same
    run_dir: the manifest counts the resume, the step-0 basis of the first attempt is the drift reference."""
    class Crash(Exception):
        pass

    class CrashAfterStep1(Snapshot):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise Crash

    folder = tmp_path / "w" / "resumed"
    first = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=folder, interval=1, **SETTINGS)
    with pytest.raises(Crash):
        _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [first, CrashAfterStep1([])], steps=4)
    first.writer.close()  # what the end of its process does
    assert read_watch_run(folder).status == "interrupted"
    reference = first.writer.load_reference()
    second = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=folder, interval=1, **SETTINGS)
    _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [second], steps=3, lr=0.5)
    run = read_watch_run(folder)
    assert run.status == "complete" and run.manifest["resumed"] == 1 and run.steps == [0, 1, 2]
    assert set(second._reference) == set(reference)
    assert all(np.array_equal(second._reference[name], reference[name]) for name in reference)
