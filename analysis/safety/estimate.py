"""How long an evaluation will take on this machine, from a short measured warm-up (no built-in throughput).

:func:`measure_speed` times the model itself on a few of the evaluation's own prompts: the prefill of one
generation batch, the decode step (forced to run the full number of steps), and the NLL forward per sample.
:func:`estimate_seconds` turns that into seconds per stage of :func:`~analysis.safety.evaluate.stage_plan`:
a generation stage costs ``batches * (prefill + new_tokens * step)`` (an upper bound: a batch stops early once
every answer in it ended), an NLL stage ``samples * per_sample``. Units: seconds; tokens per second counts
new tokens of a full batch.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = ["estimate_evaluation", "estimate_seconds", "measure_speed"]

WARMUP_STEPS = 8


@torch.no_grad()
def measure_speed(loaded: Any, config: Any, sets: Any, steps: int = WARMUP_STEPS) -> dict:
    """Measured on ``loaded`` (a LoadedModel on its device) with the first ``config.batch_size`` harmful +
    benign prompts of ``sets`` (a full batch where there are enough): {"batch": prompts per batch, "prefill_seconds": one batch's prompt pass,
    "step_seconds": one decode step of the batch, "tokens_per_second": batch / step, "nll_seconds_per_sample",
    "warmup_seconds": what measuring took}."""
    from analysis.llm.formatting import pad_rows, pad_token_id, render_prompt, with_system
    from analysis.llm.models import input_device
    from analysis.safety.nll import response_nll

    began = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    harmful = list(sets[0]) or list(sets[2])
    examples = (list(sets[0]) + list(sets[1]) or list(sets[2]))[:config.batch_size]  # a full batch where possible
    rows = [tokenizer(render_prompt(tokenizer, with_system(ex.context, config.system_prompt)),
                      add_special_tokens=False)["input_ids"] for ex in examples]
    batch = pad_rows(rows, pad_token_id(tokenizer), side="left")
    device = input_device(model)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    was_training = model.training
    model.eval()

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                       pad_token_id=pad_token_id(tokenizer), temperature=None, top_p=None, top_k=None)
        return time.perf_counter() - start

    try:
        timed(1)  # the first call pays one-off costs (allocation, kernel choice)
        prefill = timed(1)
        full = timed(steps + 1)
        step = max(full - prefill, 1e-9) / steps
        nll_examples = [with_system(ex.messages, config.system_prompt) for ex in harmful[:config.nll_batch_size]
                        if ex.response]
        nll_per_sample = 0.0
        if nll_examples:
            start = time.perf_counter()
            response_nll(model, tokenizer, nll_examples, config.max_length, config.nll_batch_size)
            nll_per_sample = (time.perf_counter() - start) / len(nll_examples)
    finally:
        model.train(was_training)
    return {"batch": len(examples), "prefill_seconds": prefill, "step_seconds": step,
            "tokens_per_second": len(examples) / step, "nll_seconds_per_sample": nll_per_sample,
            "warmup_seconds": time.perf_counter() - began}


def estimate_seconds(plan: dict, speed: dict, batch_size: int) -> dict:
    """{"stages": {stage: seconds}, "total": seconds} from a :func:`~analysis.safety.evaluate.stage_plan`
    and a :func:`measure_speed` result (generation stages an upper bound, see the module docstring)."""
    stages = {}
    for name, stage in plan.items():
        if stage["tokens"]:
            batches = math.ceil(stage["count"] / batch_size)
            stages[name] = batches * (speed["prefill_seconds"] + stage["tokens"] * speed["step_seconds"])
        else:
            stages[name] = stage["count"] * speed["nll_seconds_per_sample"]
    return {"stages": stages, "total": sum(stages.values())}


def estimate_evaluation(config: Any, model: Any = None, device: str = "cpu") -> dict:
    """Estimate for an :class:`~analysis.safety.evaluate.EvalConfig` on this machine: loads the model unless
    given, measures (:func:`measure_speed`) and returns {"stages", "total", "speed", "device"}; the judge
    and guard are not included."""
    from analysis.llm.models import load_model, place
    from analysis.safety.evaluate import load_sets, stage_plan

    sets = load_sets(config)
    if model is None:
        model = load_model(config.model)
        place(model.model, torch.device(device))
    speed = measure_speed(model, config, sets)
    estimate = estimate_seconds(stage_plan(config, sets), speed, config.batch_size)
    return {**estimate, "speed": speed, "device": str(device)}
