"""The pages "Is the model safe?" and "Fine-tune: does SPF keep it safe?" in AppTest, on the tiny Llama."""

import json
import re

import pytest

from analysis.core import jobs
from analysis.lab import finetune
from tests.conftest import stop_all_jobs, wait_for_job
from tests.test_app import ROOT, chart_specs, fresh_app, no_exceptions, seed_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache; the tiny Llama preselected on both pages; small evaluations; no job left behind."""
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **{"eval.models": ["tiny-llama"], "eval.n_harmful": 6,
                                                "eval.max_new_tokens": 8, "ft.model": "tiny-llama"})
    yield tmp_path
    stop_all_jobs()


def finish(kind: str):
    status = wait_for_job(kind, 600)
    assert status.state == "done", f"{status.error}\n{jobs.log_tail(status.job_id, 40)}"
    return status


def test_safety_page_evaluates_and_reuses_the_stored_result(cache):
    at = fresh_app()
    at.switch_page("pages/safety.py").run()
    no_exceptions(at)
    assert any("Build the aligned model" == b.label for b in at.button)
    assert any("Not evaluated yet" in c.value for c in at.caption)
    next(b for b in at.button if b.label == "Evaluate").click().run()
    finish("evaluate")
    at.run()
    no_exceptions(at)
    rates, likelihoods = at.dataframe[0].value, at.dataframe[1].value  # two narrow tables, not one cut-off one
    assert list(rates["model"]) == ["Tiny random Llama (2 layers, demo)"]
    assert re.fullmatch(r"\d/6 = \d+% \[\d+-\d+%\]", rates["ASR (Qi)"][0])  # count/n = rate [Wilson]
    assert likelihoods["refusal NLL"][0].endswith("(n=6)") and "[" in likelihoods["refusal NLL"][0]
    assert any(i.value.startswith("**Answer.** Tiny random Llama") and "of 6 held-out harmful prompts" in i.value
               for i in at.info)
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert "Attack success rate per HEx-PHI category" in titles
    assert not any(b.label == "Evaluate" for b in at.button)  # stored: nothing left to run
    # another keyword list is a view of the same result, not a new evaluation
    at.radio(key="widget.eval.keywords").set_value("arditi").run()
    no_exceptions(at)
    assert not any(b.label == "Evaluate" for b in at.button)


@pytest.mark.skipif(not (ROOT / "cache" / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file(),
                    reason="the embedded model is not converted here (python -m analysis convert)")
def test_safety_page_runs_the_alignment_job_and_reports_a_dead_worker(cache):
    """The button queues the alignment in a worker process; a worker that dies (here: killed, as by the
    out-of-memory killer) shows as failed with its last output, and the page keeps working."""
    (cache / "models").mkdir()  # the converted base model only (the build is not run)
    (cache / "models" / "smollm2-135m-instruct").symlink_to(ROOT / "cache" / "models" / "smollm2-135m-instruct")
    at = fresh_app()
    at.switch_page("pages/safety.py").run()
    next(b for b in at.button if b.label == "Build the aligned model").click().run()
    no_exceptions(at)
    status = jobs.list_jobs(kind="align")[-1]
    assert status.active and "Building the safety-aligned default model" in status.label
    stop_all_jobs()  # SIGKILL
    at.run()
    no_exceptions(at)
    assert any("Alignment failed" in e.value and "ended without a result" in e.value for e in at.error)
    assert any("Build the aligned model" == b.label for b in at.button)  # and it can be started again


def test_finetune_page_runs_both_arms_and_shows_the_comparison(cache):
    at = fresh_app()
    at.switch_page("pages/finetune.py").run()
    no_exceptions(at)
    assert at.selectbox(key="widget.ft.model").value == "tiny-llama"
    at.number_input(key="widget.ft.epochs.harmful-10").set_value(2).run()
    no_exceptions(at)
    start = next(b for b in at.button if b.label == "Start")
    start.click().run()
    status = finish("finetune")
    assert list(status.result["runs"]) == ["plain", "spf"]
    rows = jobs.live(status.job_id)["rows"]
    assert [r["step"] for r in rows["plain"]] == [0, 1, 2] and [r["step"] for r in rows["spf"]] == [0, 1, 2]
    at.run()
    no_exceptions(at)
    assert any(i.value.startswith("**Answer.**") for i in at.info)
    table = at.dataframe[0].value
    assert list(table["method"]) == ["plain", "spf"] and table["asr_initial"].notna().all()
    titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
    assert any(t.startswith("Attack success rate") for t in titles) and any(t.startswith("Utility NLL") for t in titles)
    legends = {trace["name"] for s in chart_specs(at) for trace in s["data"] if s["layout"]["title"]["text"].startswith("Refusal NLL")}
    assert legends == {"plain fine-tuning", "SPF (conflict, k=8, R=10)"}
    assert len(finetune.list_finetune_runs(cache / "finetune")) == 2
    assert not any(b.label in ("Start", "Resume") for b in at.button)
    # Safe LoRA (post-hoc) on the SPF arm's saved model: a "safe-lora" job, then its per-module outcome
    assert at.text_input(key="widget.ft.sl.base").value == "tiny-llama"
    assert any("alignment delta is zero" in w.value for w in at.warning)  # tiny: no separate base model
    at.radio(key="widget.ft.sl.arm").set_value("spf").run()
    at.number_input(key="widget.ft.sl.threshold").set_value(0.9).run()
    at.number_input(key="widget.ft.sl.rank").set_value(2).run()
    next(b for b in at.button if b.label == "Project (Safe LoRA)").click().run()
    no_exceptions(at)
    status = finish("safe-lora")
    assert status.result["n_modules"] > 0 and status.result["threshold"] == 0.9 and status.result["rank"] == 2
    at.run()
    no_exceptions(at)
    assert any(s.value.startswith("Safe LoRA projection finished") for s in at.success)
    assert any(s.value.startswith(f"Projected {status.result['n_projected']} of {status.result['n_modules']}")
               for s in at.success)
    modules = next(d.value for d in at.dataframe if "cosine" in d.value)
    assert len(modules) == status.result["n_modules"] and set(modules.columns) >= {"module", "projected"}
    assert not any(b.label == "Project (Safe LoRA)" for b in at.button)  # stored
    assert any(b.label == "Use the defended model on Setup" for b in at.button)
    # the fine-tuned model can be analysed on Setup
    next(b for b in at.button if b.label == "Use the spf model on Setup").click().run()
    no_exceptions(at)
    assert json.loads((cache / "ui_state.json").read_text())["model"].endswith("model")


def test_finetune_page_offers_pcgrad_the_same_mode_and_the_kl_signal(cache):
    """The new choices reach the task: a PCGrad arm with the KL signal; its first refresh keeps no reference."""
    at = fresh_app()
    at.switch_page("pages/finetune.py").run()
    no_exceptions(at)
    assert set(at.radio(key="widget.ft.arms").options) >= {"Plain vs SPF, side by side", "PCGrad only (whole-gradient projection)"}
    assert list(at.radio(key="widget.ft.mode").options) == ["conflict", "orthogonal", "same"]
    assert list(at.radio(key="widget.ft.safety_loss").options) == ["refusal", "contrast", "compliance", "kl"]
    at.radio(key="widget.ft.mode").set_value("same").run()
    no_exceptions(at)
    assert any(b.label == "Start" for b in at.button)
    at.radio(key="widget.ft.arms").set_value("pcgrad").run()
    at.radio(key="widget.ft.safety_loss").set_value("kl").run()
    at.number_input(key="widget.ft.epochs.harmful-10").set_value(2).run()
    at.number_input(key="widget.ft.refresh").set_value(1).run()
    no_exceptions(at)
    next(b for b in at.button if b.label == "Start").click().run()
    status = finish("finetune")
    assert list(status.result["runs"]) == ["pcgrad"]
    rows = jobs.live(status.job_id)["rows"]["pcgrad"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["basis_skipped"] == 1 and rows[1]["safety_grad_norm"] == 0 and "pcgrad_dot" not in rows[1]
    assert rows[2]["basis_skipped"] == 0 and rows[2]["safety_grad_norm"] > 0 and "pcgrad_dot" in rows[2]
    at.run()
    no_exceptions(at)
    assert list(at.dataframe[0].value["method"]) == ["pcgrad"]
    legends = {trace["name"] for s in chart_specs(at) for trace in s["data"]}
    assert "PCGrad (R=1, kl)" in legends
    at.selectbox(key="widget.ft.trainable").set_value("lora").run()
    assert any("pcgrad" in e.value and "LoRA" in e.value for e in at.error)


def test_finetune_page_refuses_lora_with_spf(cache):
    at = fresh_app()
    at.switch_page("pages/finetune.py").run()
    at.selectbox(key="widget.ft.trainable").set_value("lora").run()
    no_exceptions(at)
    assert any("LoRA" in e.value for e in at.error)
    assert not any(b.label == "Start" for b in at.button)


def test_safety_page_takes_harmful_and_benign_prompt_sets_from_files(cache, tmp_path):
    from tests.test_benchmarks import HARMBENCH, XSTEST

    (tmp_path / "hb.csv").write_text(HARMBENCH)
    (tmp_path / "xs.csv").write_text(XSTEST)
    (tmp_path / "bad.csv").write_text("BehaviorID,SemanticCategory\nx,y\n")
    at = fresh_app()
    at.switch_page("pages/safety.py").run()
    no_exceptions(at)
    at.radio(key="widget.eval.harmful.source").set_value("path").run()
    assert any("Choose the harmful and benign prompt sets" in i.value for i in at.info)
    at.text_input(key="widget.eval.harmful.path").input(str(tmp_path / "bad.csv")).run()
    assert any("missing column(s) ['Behavior']" in e.value for e in at.error)
    at.text_input(key="widget.eval.harmful.path").input(str(tmp_path / "hb.csv")).run()
    at.radio(key="widget.eval.benign.source").set_value("path").run()
    at.text_input(key="widget.eval.benign.path").input(str(tmp_path / "xs.csv")).run()
    no_exceptions(at)
    assert not at.error
    assert sum("2 examples" in c.value for c in at.caption) == 2  # both sets described
    assert any("Not evaluated yet" in c.value for c in at.caption)
    assert any(n.label.startswith("New tokens per completion") and n.max == 512 for n in at.number_input)


def test_safety_page_measures_a_time_estimate_before_evaluating(cache):
    at = fresh_app()
    at.switch_page("pages/safety.py").run()
    no_exceptions(at)
    next(b for b in at.button if b.label.startswith("Estimate the time")).click().run()
    no_exceptions(at)
    assert any("at most about" in c.value and "new tokens/s at batch" in c.value for c in at.caption)
    assert not any("1–3 minutes" in c.value for c in at.caption)  # no built-in throughput


def test_page_defaults_are_the_task_defaults(tmp_path, monkeypatch):
    """The Safety page's generation lengths are EvalConfig's; the Fine-tune page's training and SPF settings are
    the chosen preset's (nothing typed in on the pages; issue 18)."""
    from analysis.core.options import default
    from analysis.safety.evaluate import EvalConfig

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    seed_cache(tmp_path, model="tiny-llama", **{"eval.models": ["tiny-llama"], "ft.model": "tiny-llama"})
    at = fresh_app()
    at.switch_page("pages/safety.py").run()
    no_exceptions(at)
    assert at.number_input(key="widget.eval.max_new_tokens").value == default(EvalConfig, "max_new_tokens")
    assert (at.number_input(key="widget.eval.utility_max_new_tokens").value
            == default(EvalConfig, "utility_max_new_tokens"))
    at.switch_page("pages/finetune.py").run()
    no_exceptions(at)
    preset = at.selectbox(key="widget.ft.preset").value
    base = finetune.preset(preset)
    assert at.number_input(key=f"widget.ft.lr.{preset}").value == base.lr
    assert at.number_input(key=f"widget.ft.epochs.{preset}").value == base.epochs
    assert at.number_input(key=f"widget.ft.batch.{preset}").value == base.batch_size
    assert [at.number_input(key=f"widget.ft.{name}").value for name in ("k", "refresh", "safety_batch")] == [
        base.spf.k, base.spf.refresh, base.spf.safety_batch]
