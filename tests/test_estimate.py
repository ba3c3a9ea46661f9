"""The evaluation time estimate: arithmetic on a known speed, and a real warm-up on the tiny Llama."""

import math
import time

import pytest

from analysis.safety import estimate as est
from analysis.safety import evaluate as ev

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_estimate_seconds_on_a_known_speed():
    plan = {"harmful": {"count": 33, "tokens": 48}, "utility": {"count": 32, "tokens": 128},
            "refusal_nll": {"count": 88, "tokens": 0}}
    speed = {"prefill_seconds": 0.5, "step_seconds": 0.1, "nll_seconds_per_sample": 0.02}
    estimate = est.estimate_seconds(plan, speed, batch_size=16)
    assert estimate["stages"]["harmful"] == pytest.approx(3 * (0.5 + 48 * 0.1))  # 3 batches of <= 16
    assert estimate["stages"]["utility"] == pytest.approx(2 * (0.5 + 128 * 0.1))
    assert estimate["stages"]["refusal_nll"] == pytest.approx(88 * 0.02)
    assert estimate["total"] == pytest.approx(sum(estimate["stages"].values()))


def test_a_measured_estimate_bounds_the_real_evaluation(tiny_llama, tmp_path):
    config = ev.EvalConfig(model="tiny-llama", n_harmful=8, n_benign=4, n_utility=4, max_new_tokens=16,
                           utility_max_new_tokens=16, batch_size=4)
    estimate = est.estimate_evaluation(config, model=tiny_llama)
    speed = estimate["speed"]
    assert speed["batch"] == 4 and speed["step_seconds"] > 0 and speed["tokens_per_second"] > 0
    assert speed["warmup_seconds"] < 30 and math.isfinite(estimate["total"])
    assert set(estimate["stages"]) == set(ev.stage_plan(config, ev.load_sets(config)))
    start = time.perf_counter()
    ev.evaluate(config, model=tiny_llama, store=ev.evals_store(tmp_path))
    took = time.perf_counter() - start
    # generation stages are an upper bound; the whole run (model overheads included) within a broad factor
    assert took / 20 < estimate["total"] < took * 20, (took, estimate)


def test_estimate_text_states_the_total_shares_and_the_measurement():
    from analysis.views.safety import estimate_text

    estimate = {"total": 100.0, "stages": {"harmful": 50.0, "utility": 49.5, "refusal_nll": 0.5},
                "speed": {"tokens_per_second": 476.2, "batch": 16, "prefill_seconds": 0.25, "warmup_seconds": 3.21}}
    text = estimate_text(estimate)
    assert text.startswith("at most about 1 min 40 s (harmful 50%, utility 50%)")
    assert "476 new tokens/s at batch 16" in text and "warm-up took 3.2 s" in text


def test_the_cli_prints_the_estimate_and_evaluates_nothing(tmp_path, monkeypatch, capsys):
    from analysis.__main__ import main

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    code = main(["evaluate", "--model", "tiny-llama", "--n-harmful", "4", "--n-benign", "2", "--n-utility", "2",
                 "--max-new-tokens", "4", "--estimate", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("tiny-llama: at most about ") and "new tokens/s at batch" in out
    assert not (tmp_path / "evals").exists() or not any((tmp_path / "evals").glob("*/manifest.json"))
