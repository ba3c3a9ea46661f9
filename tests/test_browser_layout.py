"""At 1400 px wide, no figure title, subtitle or x-axis title is clipped (Plotly clips long titles, it never
wraps them)."""

import os
import shutil

import pytest

from tests.test_app import CHROMIUM, SMALL, chromium, seed_cache, server  # noqa: F401 - the server fixture

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or shutil.which("chromium") is None,
                                 reason="Debian chromium not installed")]

CLIPPED = """() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(plot => {
    const box = plot.getBoundingClientRect();
    return [...plot.querySelectorAll('.gtitle, .gtitle-subtitle, .xtitle')]
        .filter(title => { const r = title.getBoundingClientRect(); return r.width > 0 && (r.left < box.left - 1 || r.right > box.right + 1); })
        .map(title => title.textContent);
})"""


def test_no_figure_title_is_clipped_at_1400_px(server, tmp_path, monkeypatch, tiny_llama):  # noqa: F811
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    run = collect(CollectionConfig(model="tiny-llama", safety_split="analysis", utility_split="analysis", **SMALL),
                  model=tiny_llama)
    seed_cache(tmp_path, model="tiny-gpt2", run_id=run.run_id, **SMALL)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for path, charts in (("conflicts", 6), ("single_sample", 2), ("spectra", 2), ("findings", 5)):
            page.goto(f"{server}/{path}", timeout=60_000)
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .gtitle').length >= {charts}",
                                   timeout=180_000)
            page.wait_for_timeout(1000)
            assert page.evaluate(CLIPPED) == [], path
