"""The Setup walk in Chromium: switch to a model that stops the page and back, a bad model id, reload, a second
tab: the settings stay what they were, and nothing clamped or unloadable is saved for new sessions."""

import json
import os
import shutil

import pytest

from tests.test_app import CHROMIUM, SMALL, chromium, server  # noqa: F401 - the server fixture

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK) or shutil.which("chromium") is None,
                                 reason="Debian chromium not installed")]


def settings(page) -> dict:
    """The values the Setup page shows (number inputs by label, the Layers field)."""
    page.get_by_label("Safety samples n").wait_for(timeout=120_000)
    values = {label: page.get_by_label(label).input_value()
              for label in ("Safety samples n", "Utility samples n", "Sequence length (tokens)", "Subspace dimension k")}
    values["Layers"] = page.get_by_label("Layers", exact=True).input_value()
    return values


def test_setup_walk_keeps_settings_across_model_switches_reloads_and_tabs(server, tmp_path):  # noqa: F811
    expected = {"Safety samples n": str(SMALL["n_safety"]), "Utility samples n": str(SMALL["n_utility"]),
                "Sequence length (tokens)": str(SMALL["max_length"]), "Subspace dimension k": str(SMALL["top_k"]),
                "Layers": "all"}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server, timeout=60_000)
        assert settings(page) == expected
        page.get_by_text("Other: Hugging Face id or local folder").click()
        page.get_by_text("Type a hub id").wait_for(timeout=60_000)
        page.get_by_text("Tiny random GPT-2").click()
        page.get_by_text("Linear modules").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        assert settings(page) == expected
        page.get_by_text("Other: Hugging Face id or local folder").click()
        field = page.get_by_label("Hugging Face id or local checkpoint folder")
        field.fill("nonexistent/model-xyz")
        field.press("Enter")
        page.get_by_text("Could not load model").first.wait_for(timeout=120_000)
        page.get_by_text("Tiny random GPT-2").click()
        page.get_by_text("Linear modules").first.wait_for(timeout=120_000)
        page.wait_for_timeout(1500)
        page.get_by_label("Safety samples n").click()  # one more click: nothing clamped gets written
        page.wait_for_timeout(1000)
        assert settings(page) == expected
        page.reload()
        assert settings(page) == expected
        other = browser.new_page(viewport={"width": 1400, "height": 1000})
        other.goto(server, timeout=60_000)
        assert settings(other) == expected
        assert other.get_by_text("Could not load model").count() == 0
        saved = json.loads((tmp_path / "ui_state.json").read_text())
        assert saved["model"] == "tiny-gpt2"
        assert {saved[key] for key in ("n_safety", "n_utility")} == {SMALL["n_safety"]}
        assert saved["max_length"] == SMALL["max_length"] and saved["top_k"] == SMALL["top_k"]
