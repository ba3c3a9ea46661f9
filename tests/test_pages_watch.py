"""The page "Watch a training run" in AppTest: a run still being written, then one more row, then complete."""

import copy
import json

import pytest

from analysis.lab.watch import SafetyGeometryCallback
from analysis.lab.watch_store import open_watch_run, read_watch_run
from tests.test_app import chart_specs, fresh_app, no_exceptions, seed_cache
from tests.test_watch import SETTINGS, _train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path / "cache"))
    seed_cache(tmp_path / "cache", model="tiny-llama")
    return tmp_path / "cache"


def test_watch_page_without_runs_says_how_to_record_one(cache):
    at = fresh_app()
    at.switch_page("pages/watch.py").run()
    no_exceptions(at)
    assert any("No watched run yet" in i.value for i in at.info)


def test_watch_page_follows_a_run_that_is_still_being_written(cache, tiny_llama, tmp_path):
    recorded = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "done" / "run", interval=1,
                                      **dict(SETTINGS, eval_every=2, n_eval=2, eval_max_new_tokens=4))
    _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [recorded], steps=4)
    manifest = json.loads((tmp_path / "done" / "run" / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k in ("kind", "config", "model", "measured", "modules",
                                                          "safety_batch", "training")}
    writer = open_watch_run(cache / "watch" / "live", manifest)  # a script in the middle of training
    try:
        for row in recorded.rows[:2]:
            writer.write_row(row)
        assert read_watch_run(cache / "watch" / "live").status == "running"
        at = fresh_app()
        at.switch_page("pages/watch.py").run()
        no_exceptions(at)
        assert at.selectbox(key="widget.watch.run").value == str(cache / "watch" / "live")
        verdict = next(i.value for i in at.info if i.value.startswith("**Verdict.**"))
        assert "by step 1" in verdict and "still training" in verdict
        titles = [s["layout"]["title"]["text"] for s in chart_specs(at)]
        assert titles == ["The update against the safety gradient (all modules)", "Refusals on held-out harmful prompts",
                          "Share of the update in the safety subspace", "Does the safety subspace move?"]
        heatmap = chart_specs(at)[2]
        assert heatmap["data"][0]["x"] == ["0", "1"] and heatmap["data"][0]["y"] == ["L0", "L1"]

        writer.write_row(recorded.rows[2])  # the script records one more step
        at.run()
        no_exceptions(at)
        assert chart_specs(at)[2]["data"][0]["x"] == ["0", "1", "2"]
        assert "by step 2" in next(i.value for i in at.info if i.value.startswith("**Verdict.**"))
        at.radio(key="widget.watch.metric").set_value("cos").run()
        no_exceptions(at)
        assert chart_specs(at)[2]["layout"]["title"]["text"] == "cos(G_train, G_safety)"
        at.selectbox(key="widget.watch.kind").set_value("down").run()
        no_exceptions(at)
        assert "down modules" in chart_specs(at)[2]["layout"]["title"]["subtitle"]["text"]

        for row in recorded.rows[3:]:
            writer.write_row(row)
        writer.finish()
    finally:
        writer.close()
    at.run()
    no_exceptions(at)
    verdict = next(i.value for i in at.info if i.value.startswith("**Verdict.**"))
    assert "finished" in verdict and "Refusal NLL on 2 held-out harmful prompts" in verdict


def test_watch_page_says_when_a_folder_is_not_a_watch_run(cache, tmp_path):
    at = fresh_app()
    at.switch_page("pages/watch.py").run()
    at.text_input(key="widget.watch.path").set_value(str(tmp_path / "nowhere")).run()
    no_exceptions(at)
    assert any("not a watch run" in e.value for e in at.error)


def test_cli_lists_runs_and_prints_a_verdict(cache, tiny_llama, tmp_path, capsys):
    from analysis.__main__ import main

    watch = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=cache / "watch" / "cli", interval=1, **SETTINGS)
    _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [watch], steps=2)
    capsys.readouterr()
    assert main(["watch"]) == 0
    assert "cli" in capsys.readouterr().out
    assert main(["watch", str(cache / "watch" / "cli")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cli: complete, 2 recorded steps") and "by step 1" in out
    assert main(["watch", str(tmp_path / "nothing")]) == 2


def test_layer_aggregates_recombine_into_the_recorded_totals(tiny_llama, tmp_path):
    """Per-layer share / cos / dloss (views.watch.layer_frame) weighted back over the layers give the totals the
    callback recorded over all modules (an exact identity of the aggregation)."""
    import numpy as np

    from analysis.views import watch as views

    watch = SafetyGeometryCallback(tiny_llama.tokenizer, run_dir=tmp_path / "w" / "agg", interval=1, **SETTINGS)
    _train(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, tmp_path, [watch], steps=3)
    run = read_watch_run(tmp_path / "w" / "agg")
    layer_of = np.array([m["layer"] for m in run.modules])
    gg = run.per_module["grad_norm"] ** 2
    ss = run.per_module["safety_norm"] ** 2
    GG = np.stack([gg[:, layer_of == layer].sum(1) for layer in (0, 1)], 1)
    SS = np.stack([ss[:, layer_of == layer].sum(1) for layer in (0, 1)], 1)
    share = views.layer_frame(run, "share").to_numpy().T
    cos = views.layer_frame(run, "cos").to_numpy().T
    dloss = views.layer_frame(run, "dloss").to_numpy().T
    totals = run.totals[run.totals["cos"].notna()]
    assert np.allclose((share * GG).sum(1) / GG.sum(1), totals["share"], rtol=1e-9)
    assert np.allclose((cos * np.sqrt(GG * SS)).sum(1) / np.sqrt(GG.sum(1) * SS.sum(1)), totals["cos"], rtol=1e-9)
    assert np.allclose(dloss.sum(1), totals["dloss"], rtol=1e-9)
    assert views.kinds(run) == ["q", "k", "v", "o", "gate", "up", "down"]

