"""In Chromium, user text is shown as text: a dataset prompt holding a Markdown image never makes the browser fetch
its URL (issue 23, item 7; the AppTest in test_ui_state checks the escaped strings, this checks the browser)."""

import json
import os
import shutil

import pytest

from tests.test_app import CHROMIUM, SMALL, chromium, seed_cache, server  # noqa: F401 - the server fixture

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or shutil.which("chromium") is None,
                                 reason="Debian chromium not installed")]

IMAGE = "![p](http://127.0.0.1:9/x.png)"  # port 9 (discard): the request would fail, but Chromium would make it


def test_a_markdown_image_in_a_prompt_is_never_fetched(server, tmp_path, monkeypatch, tiny_llama):  # noqa: F811
    from analysis.engine.collect import collect
    from analysis.engine.collect_task import CollectionConfig

    monkeypatch.setenv("SSE_CACHE_DIR", str(tmp_path))
    rows = [{"id": f"s{i}", "prompt": f"{IMAGE} prompt {i}", "response": "I won't."} for i in range(4)]
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = collect(CollectionConfig(model="tiny-llama", safety=str(path), utility_split="analysis", **SMALL),
                  model=tiny_llama)
    seed_cache(tmp_path, model="tiny-gpt2", run_id=run.run_id, **SMALL)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{server}/single_sample", timeout=60_000)
        page.get_by_text("prompt 0").first.wait_for(timeout=180_000)  # the page shows the prompt
        page.wait_for_timeout(2000)
        assert not [url for url in requested if "x.png" in url], requested
        assert page.locator("img[src*='x.png']").count() == 0
        assert page.get_by_text(IMAGE).count() > 0  # shown as the characters the user wrote
