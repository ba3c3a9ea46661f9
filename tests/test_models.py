"""Model loading: embedded default (converted once), tiny random models, clear errors, summaries."""

import time

import pytest
import torch

from analysis.core.config import ConfigError, ModelConfig
from analysis.llm.models import (
    ModelLoadError,
    convert_default_model,
    default_gguf_path,
    load_model,
    model_identity,
    models_dir,
    resolve_source,
    summarize,
)


def test_tiny_models_have_expected_layer_types(tiny_llama, tiny_gpt2):
    llama, gpt2 = summarize(tiny_llama.model, tiny_llama.tokenizer), summarize(tiny_gpt2.model, tiny_gpt2.tokenizer)
    assert llama.family == "llama" and gpt2.family == "gpt2"
    assert {m.kind for m in llama.modules} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert {m.kind for m in gpt2.modules} == {"qkv", "o", "up", "down"}
    assert len(llama.modules) == 14 and len(gpt2.modules) == 8  # 2 layers each, lm_head excluded
    assert llama.has_chat_template and not gpt2.has_chat_template
    # GPT-2's Conv1D stores (d_in, d_out); the summary reports W as (d_out, d_in).
    c_fc = next(m for m in gpt2.modules if m.name.endswith("mlp.c_fc"))
    assert (c_fc.d_out, c_fc.d_in) == (128, 32)


def test_tiny_model_is_seeded():
    a, b, c = (load_model(ModelConfig("tiny-llama", seed=s)) for s in (1, 1, 2))
    weight = lambda m: m.model.model.layers[0].mlp.down_proj.weight  # noqa: E731
    assert torch.equal(weight(a), weight(b)) and not torch.equal(weight(a), weight(c))
    assert a.identity == b.identity != c.identity


def test_unknown_hub_id_offline_gives_clear_error():
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model-xyz")


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Downloads allowed, but the hub endpoint is a localhost socket that accepts and never answers (what a
    machine without internet sees as a hang); HF_HOME is empty so nothing is cached."""
    import socket

    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    yield endpoint
    server.close()


def test_unknown_hub_id_fails_fast_when_the_hub_is_unreachable(unreachable_hub):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "cannot be reached" in message and "hf download no-such-org/no-such-model-xyz" in message


def test_hub_check_honours_offline_mode(monkeypatch):
    from analysis.llm.models import hub_offline, hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert hub_offline() and not hub_reachable()
    assert time.perf_counter() - start < 0.5


def test_folder_without_checkpoint_gives_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a Hugging Face model checkpoint"):
        load_model(str(tmp_path))


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_gpt2):
    tiny_gpt2.model.config.save_pretrained(tmp_path)
    tiny_gpt2.tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_gpt2.model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle-only checkpoint
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(tmp_path))
    loaded = load_model(ModelConfig(str(tmp_path), allow_pickle=True))
    assert summarize(loaded.model).family == "gpt2"


def test_bad_config_values():
    with pytest.raises(ConfigError):
        ModelConfig(source=" ")
    with pytest.raises(ConfigError, match="dtype"):
        ModelConfig(dtype="int8")


def test_aligned_model_missing_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="python -m analysis align"):
        resolve_source("default-aligned")


@pytest.mark.slow
def test_converted_default_equals_gguf_logits(default_model):
    """The cached safetensors checkpoint gives the same logits as the model dequantised from the GGUF."""
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = default_model.tokenizer("Safety gradients are low-rank.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = from_gguf(ids).logits
        actual = default_model.model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    summary = summarize(default_model.model, default_model.tokenizer)
    assert summary.n_layers == 30 and len(summary.modules) == 210 and summary.has_chat_template


@pytest.mark.slow
def test_second_load_of_default_is_fast(default_model):
    assert convert_default_model().joinpath("model.safetensors").is_file()
    start = time.perf_counter()
    again = load_model("default")
    assert time.perf_counter() - start < 10  # the cached checkpoint loads in ~0.4 s here, GGUF ~20 s
    assert again.identity == default_model.identity


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-gpt2"])
def test_model_identity_equals_the_loaded_identity_for_tiny_models(source):
    for config in (ModelConfig(source), ModelConfig(source, dtype="float64", seed=3)):
        assert model_identity(config) == load_model(config).identity
    assert model_identity(source) == model_identity(ModelConfig(source))
    assert model_identity(ModelConfig(source, seed=1)) != model_identity(ModelConfig(source))


@pytest.mark.slow
def test_model_identity_of_the_default_and_its_folder_equal_the_loaded_identity(default_model):
    from analysis.llm.models import DEFAULT_NAME

    folder = str(models_dir() / DEFAULT_NAME)
    assert model_identity("default") == default_model.identity
    assert model_identity(folder) == load_model(folder).identity == default_model.identity


def test_model_identity_of_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot download"):
        model_identity("no-such-org/no-such-model-xyz")  # offline in tests (conftest)


def test_model_identity_without_loading_equals_the_loaded_identity(tmp_path, monkeypatch, tiny_gpt2, default_model):
    from analysis.llm.models import model_identity

    assert model_identity(ModelConfig("tiny-llama", seed=3)) == load_model(ModelConfig("tiny-llama", seed=3)).identity
    assert model_identity("tiny-gpt2") == tiny_gpt2.identity
    assert model_identity("default") == default_model.identity
    folder = tmp_path / "checkpoint"
    tiny_gpt2.model.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    assert model_identity(str(folder)) == load_model(str(folder)).identity
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelLoadError, match="python -m analysis align"):
        model_identity("default-aligned")


# --------------------------------------------------------------------------------------------------
# device_map: accelerate places the model (a model larger than one GPU); tasks must not move it


@pytest.mark.parametrize("source", ["tiny-llama", "folder"])
def test_device_map_auto_gives_the_same_logits_and_is_not_in_run_ids(source, tmp_path, tiny_llama):
    from analysis.core.config import config_hash
    from analysis.llm.models import dispatched, input_device, place

    if source == "folder":  # the from_pretrained path
        tiny_llama.model.save_pretrained(tmp_path)
        tiny_llama.tokenizer.save_pretrained(tmp_path)
        source = str(tmp_path)
    plain = load_model(ModelConfig(source))
    mapped = load_model(ModelConfig(source, device_map="auto"))
    assert dispatched(mapped.model) and not dispatched(plain.model) and mapped.identity == plain.identity
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(plain.model(ids).logits, mapped.model(ids).logits)
    first = input_device(mapped.model)
    assert first == next(mapped.model.parameters()).device  # the CPU here, the first GPU on a GPU machine
    assert place(mapped.model, "meta") is mapped.model and input_device(mapped.model) == first  # not moved
    assert config_hash(ModelConfig(source, device_map="auto")) == config_hash(ModelConfig(source))
    with pytest.raises(ConfigError, match="device_map"):
        ModelConfig(source, device_map="everywhere")


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_device_map_auto_puts_the_model_on_the_gpu():
    from analysis.llm.models import input_device

    mapped = load_model(ModelConfig("tiny-llama", device_map="auto"))
    assert input_device(mapped.model).type == "cuda"


def test_the_model_commands_take_device_map():
    import argparse

    from analysis.__main__ import task_class
    from analysis.core.cli import add_task_command, task_from_options
    from analysis.safety import evaluate

    def parse(kind, *options):
        parser = argparse.ArgumentParser()
        add_task_command(parser, task_class(kind))
        return parser.parse_args(["--device-map", "auto", *options])

    def task(kind, *options):
        return task_from_options(task_class(kind), parse(kind, *options))

    assert task("collect").model.device_map == "auto"
    assert task("collect", "--device-map", "sequential").model.device_map == "sequential"
    assert evaluate.tasks_from_options(parse("evaluate", "--model", "tiny-llama"))[0].model.device_map == "auto"
    assert task_class("finetune").from_options(parse("finetune", "--model", "tiny-llama")).config.model.device_map \
        == "auto"
    aligned = task("align", "--dtype", "bfloat16")
    assert aligned.device_map == "auto" and aligned.settings.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parse("collect", "--device-map", "everywhere")
