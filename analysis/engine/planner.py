"""What a collection will cost, before any work: memory, disk and a rough time, for the chosen model,
modules, n and length; and a refusal naming the setting to change when it does not fit a budget.

:func:`architecture` reads the model's shape without its weights (the HF config instantiated on torch's
``meta`` device: parameter count and every analysable module's (d_out, d_in)). :func:`plan_collection` turns
shape + :class:`~analysis.engine.collect_task.CollectionConfig` into a :class:`CollectionPlan`;
``plan.check(memory_budget=..., disk_budget=...)`` raises :class:`PlanError` naming what to lower.

The memory model (bytes; B = batch size, T = max_length, N = B T tokens of one batch, L layers, h hidden,
i intermediate, V vocabulary, e = bytes per element of the model dtype, f = 4 (float32 factors)):

* model: parameters x e (the loaded weights; + their float32 copy when a bfloat16 model is moved, not here);
* capture (one forward + backward of one batch): the larger of the autograd graph at the start of the
  backward, N (L (ACT_H h + ACT_I i) + ACT_OUTSIDE h) e + LOGIT_COPIES N V 4 (logits, log-softmax and their
  gradient in float32: per_sample_loss upcasts), and the factors of the pass's modules at its end,
  N sum(d_in + d_out) e (+ N sum(d_in + d_out) f for their float32 checkpoint copy when e != f). Measured:
  the graph's peak is reached first, and the factors grow while the graph is freed;
* analysis (one module at a time, ``workers`` at once): its factors for all n samples n T (d_in + d_out) f,
  plus the dense G_i chunk (<= chunk_bytes, and <= n d_out d_in f);
* peak = model + max(capture, analysis). Disk: every factor of one pass, n T sum(d_in + d_out) f, plus the
  results (small).
* ``projection_dim`` = p (:mod:`analysis.engine.sketch`): a projected module's (d_out, d_in) above read (p, p)
  (its factors are sketched in the capture hook; the full-width rows of one module exist only while it is
  sketched), and the capture holds the sketch matrices, p x (each distinct width and side) f.

ACT_H, ACT_I, LOGIT_COPIES were fitted on random-initialised Llama configs (bench/scaling.py, CPU, float32,
peak RSS of a fresh process: see :func:`measure_capture_peak`) and checked against the embedded SmolLM2 in
tests/test_scale.py (within 25%). T is the padded width: the longest sample of a batch, at most max_length,
so the plan is an upper bound for short samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from analysis.core.config import ConfigError, ModelConfig
from analysis.engine.sketch import Sketch, factor_widths, is_projected
from analysis.llm.anatomy import ModuleInfo, find_linear_modules, select_modules

if TYPE_CHECKING:
    from analysis.engine.collect_task import CollectionConfig

__all__ = ["ACT_H", "ACT_I", "LOGIT_COPIES", "Architecture", "CollectionPlan", "PlanError", "architecture",
           "fit_modules_per_pass", "measure_capture_peak", "plan_collection", "size_text"]

#: Saved activations per token and layer, in units of the hidden / intermediate width, and per token outside
#: the layers in units of the hidden width (fitted on random Llama configs, CPU float32, see above).
ACT_H = 8.6
ACT_I = 4.0
ACT_OUTSIDE = 61.0
#: float32 (N, V) tensors alive at the capture's peak: logits, log-softmax, their gradient (fitted: 3.9-4.2).
LOGIT_COPIES = 4.1
#: Rough throughput for the time estimate, FLOP/s (one CPU core; a GPU is ~1000x).
CPU_FLOPS = 3e10
GPU_FLOPS = 5e13
GiB = 2**30


def size_text(size: float) -> str:
    """``"1.23 GiB"`` or ``"45.6 MiB"``."""
    return f"{size / GiB:.2f} GiB" if size >= GiB else f"{size / 2**20:.1f} MiB"


class PlanError(ConfigError):
    """The collection does not fit the memory or disk budget; the message names the setting to change."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A model's shape: parameter count, bytes per parameter, layers, hidden / intermediate / vocabulary
    sizes and every analysable module (``ModuleInfo``, with (d_out, d_in))."""

    n_params: int
    param_bytes: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    modules: tuple[ModuleInfo, ...]


def architecture(model_config: ModelConfig | str, model=None) -> Architecture:
    """The shape of ``model_config``'s model: from ``model`` (an nn.Module) when given, else from its HF config
    instantiated on the ``meta`` device (no weights read, no memory used)."""
    import torch

    if isinstance(model_config, str):
        model_config = ModelConfig(source=model_config)
    if model is None:
        model = _meta_model(model_config)
    config = model.config
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    params = {id(p): p for p in model.parameters()}
    return Architecture(n_params=sum(p.numel() for p in params.values()),
                        param_bytes=torch.empty((), dtype=getattr(torch, model_config.dtype)).element_size(),
                        layers=layers, hidden=hidden, intermediate=intermediate, vocab=int(config.vocab_size),
                        modules=tuple(find_linear_modules(model)))


def _meta_model(model_config: ModelConfig):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from analysis.llm.models import (
        TINY_SOURCES,
        ModelLoadError,
        convert_default_model,
        hub_reachable,
        resolve_source,
        tiny_model,
    )

    if model_config.source in TINY_SOURCES:
        with torch.device("meta"):
            return tiny_model(model_config.source, seed=model_config.seed)[0]
    if model_config.source == "default":
        convert_default_model()
    location = resolve_source(model_config.source)
    is_folder = Path(location).expanduser().is_dir()
    reachable = None
    try:
        try:  # local files first, as load_model: an unknown id offline is an answer in ms, not a 28 s retry loop
            config = AutoConfig.from_pretrained(location, trust_remote_code=model_config.trust_remote_code,
                                                local_files_only=True)
        except OSError:
            reachable = False if is_folder else hub_reachable()
            if not reachable:
                raise
            config = AutoConfig.from_pretrained(location, trust_remote_code=model_config.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model_config.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError with long texts
        text = str(error).splitlines()[0][:300] if str(error) else ""
        if is_folder:
            hint = "the folder holds no readable Hugging Face config.json (a model checkpoint folder has one)"
        elif reachable is False or reachable is None:
            hint = ("it is not in the local Hugging Face cache and cannot be downloaded here; give a local "
                    "checkpoint folder, or check the id")
        else:
            hint = "the hub did not provide its config (check the id)"
        raise ModelLoadError(f"Could not read the shape of model {location!r}: {hint}. "
                             f"({type(error).__name__}: {text})") from error


@dataclasses.dataclass(frozen=True)
class CollectionPlan:
    """Predicted cost of a collection (bytes, seconds). ``peak_bytes`` = model + max(capture, analysis)."""

    model_bytes: int
    activation_bytes: int
    logit_bytes: int
    capture_factor_bytes: int
    analysis_bytes: int
    disk_bytes: int
    passes: int
    modules_per_pass: int
    n_modules: int
    seconds: float
    device: str
    #: modules whose factors are sketched (``projection_dim``), and that dimension (None: exact)
    projected_modules: int = 0
    projection_dim: int | None = None

    @property
    def capture_bytes(self) -> int:
        """Capture above the loaded model: max(graph + logits, the pass's factors of one batch)."""
        return max(self.activation_bytes + self.logit_bytes, self.capture_factor_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.model_bytes + max(self.capture_bytes, self.analysis_bytes)

    def lines(self) -> list[str]:
        """Human-readable summary (what the CLI prints before any work)."""
        gib = size_text
        return [
            f"plan: {self.n_modules} modules in {self.passes} pass(es) of <= {self.modules_per_pass} modules",
            f"  memory peak ~{gib(self.peak_bytes)} = model {gib(self.model_bytes)} + max(capture "
            f"{gib(self.capture_bytes)} [graph {gib(self.activation_bytes)}, logits {gib(self.logit_bytes)}, "
            f"factors {gib(self.capture_factor_bytes)}], analysis {gib(self.analysis_bytes)})",
            f"  disk ~{gib(self.disk_bytes)} of factor files at once (deleted when the run completes)",
            f"  time ~{self.seconds / 60:.1f} min of forward+backward on {self.device} (rough)",
        ] + ([f"  projected: {self.projected_modules} modules sketched to p = {self.projection_dim} (approximate "
              "spectra and cosines; angles in sketch space)"] if self.projection_dim is not None else [])

    def check(self, memory_budget: float | None = None, disk_budget: float | None = None) -> None:
        """Raise PlanError naming the setting to change when the peak memory or disk exceed the budgets
        (bytes; None: no limit)."""
        if memory_budget is not None and self.peak_bytes > memory_budget:
            what = ("modules_per_pass (--modules-per-pass)" if self.capture_factor_bytes > self.activation_bytes
                    else "batch_size (--batch-size) or max_length (--max-length)")
            if self.analysis_bytes > self.capture_bytes:
                what = "n_safety/n_utility (-n) or max_length (--max-length)"
            raise PlanError(f"the collection needs ~{size_text(self.peak_bytes)} of memory, over the budget of "
                            f"{size_text(memory_budget)}: lower {what}")
        if disk_budget is not None and self.disk_bytes > disk_budget:
            raise PlanError(f"the collection needs ~{size_text(self.disk_bytes)} of disk for its factors, over "
                            f"the budget of {size_text(disk_budget)}: lower modules_per_pass (--modules-per-pass)")


def plan_collection(config: CollectionConfig, arch: Architecture | None = None, *, device: str = "cpu",
                    chunk_bytes: int = 512 * 2**20, workers: int = 1) -> CollectionPlan:
    """The predicted cost of ``config`` (see the module docstring); ``arch`` defaults to
    ``architecture(config.model)``. Cheap: no weights are read."""
    arch = arch if arch is not None else architecture(config.model)
    modules = select_modules(arch.modules, config.layers, config.kinds, config.regex)
    per_pass = config.modules_per_pass or len(modules)
    groups = [modules[start:start + per_pass] for start in range(0, len(modules), per_pass)]
    e, f = arch.param_bytes, 4
    tokens = min(config.batch_size, max(config.n_safety, config.n_utility)) * config.max_length
    widths = {m.name: factor_widths(m, config.projection_dim) for m in modules}  # (p, p) when sketched
    widest = max(sum(sum(widths[m.name]) for m in group) for group in groups)
    activation = tokens * (arch.layers * (ACT_H * arch.hidden + ACT_I * arch.intermediate) + ACT_OUTSIDE * arch.hidden) * e
    logits = LOGIT_COPIES * tokens * arch.vocab * 4
    factors = tokens * widest * (e + (f if f != e else 0))
    if config.projection_dim is not None:
        factors += Sketch(config.projection_dim, config.seed, modules).matrix_bytes(f)
    n, T = config.n_total, config.max_length
    analysis = max(n * T * sum(widths[m.name]) * f + min(chunk_bytes, n * widths[m.name][0] * widths[m.name][1] * f)
                   for m in modules)
    analysis *= max(1, min(workers, len(modules)))
    flops = 4.0 * arch.n_params * n * T * len(groups)  # forward 2P + input-gradient backward ~2P per token
    rate = GPU_FLOPS if device.startswith("cuda") else CPU_FLOPS
    return CollectionPlan(model_bytes=arch.n_params * e, activation_bytes=int(activation), logit_bytes=int(logits),
                          capture_factor_bytes=int(factors), analysis_bytes=int(analysis),
                          disk_bytes=int(n * T * widest * f), passes=len(groups), modules_per_pass=per_pass,
                          n_modules=len(modules), seconds=flops / rate, device=device,
                          projected_modules=sum(is_projected(m, config.projection_dim) for m in modules),
                          projection_dim=config.projection_dim)


def fit_modules_per_pass(config: CollectionConfig, arch: Architecture, memory_budget: float,
                         **kwargs) -> int:
    """The largest ``modules_per_pass`` whose plan fits ``memory_budget`` (bytes); raises PlanError if even
    one module per pass does not fit."""
    modules = select_modules(arch.modules, config.layers, config.kinds, config.regex)
    for size in sorted({math.ceil(len(modules) / p) for p in range(1, len(modules) + 1)}, reverse=True):
        plan = plan_collection(dataclasses.replace(config, modules_per_pass=size), arch, **kwargs)
        if plan.peak_bytes <= memory_budget:
            return size
    plan.check(memory_budget=memory_budget)
    return 1


def measure_capture_peak(model, batch, modules: Sequence[ModuleInfo]) -> int:
    """Peak resident memory (bytes) of one ``capture_batch`` above the resident memory before it, on the CPU.

    Linux: the kernel's peak-RSS counter (VmHWM) is reset (``/proc/self/clear_refs`` = 5) right before the
    capture and read right after, so the model's load peak does not hide it. Why RSS and not tracemalloc:
    torch's CPU tensors are allocated outside Python's allocator, so tracemalloc does not see them; RSS is
    what the machine has to provide. Run it in a fresh process (freed memory kept by malloc lowers the
    next measurement)."""
    import torch

    from analysis.engine.capture import capture_batch

    def status(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(f"{key} not in /proc/self/status")

    with torch.no_grad():  # page in memory-mapped weights first: they are the model's memory, not the capture's
        for parameter in model.parameters():
            parameter.sum()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    factors = capture_batch(model, batch, modules)
    peak = status("VmHWM")
    del factors
    return peak - before


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a collection on ``device``: free GPU memory (``torch.cuda.mem_get_info``) for a CUDA
    device, else the memory the OS can hand out without swapping (``psutil.virtual_memory().available``)."""
    import torch

    from analysis.core.tasks import resolve_device

    device = resolve_device(device)
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)
