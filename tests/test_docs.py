"""The project's own design notes: present, linked, true to the code; one measured alignment time everywhere."""

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def test_the_readme_links_design_notes_that_a_clone_has():
    readme = (ROOT / "README.md").read_text()
    assert "../shared" not in readme
    links = re.findall(r"\]\(([^)#]+)\)", readme)
    assert "docs/design.md" in links
    assert all((ROOT / link).exists() for link in links if not link.startswith("http")), links


def test_the_design_notes_name_only_modules_and_functions_that_exist():
    text = DESIGN.read_text()
    for path in set(re.findall(r"`((?:analysis|ui|pages|bench|tests)/[\w/]+(?:\.py)?)", text)):
        assert (ROOT / path).exists(), path
    for dotted in set(re.findall(r"`(analysis(?:\.\w+)+)`", text)):
        try:  # a module (imported here: a package has its submodules as attributes only once imported)
            importlib.import_module(dotted)
        except ModuleNotFoundError:  # a function or class of a module
            module, _, name = dotted.rpartition(".")
            assert hasattr(importlib.import_module(module), name), dotted


def test_one_measured_alignment_time_everywhere():
    """Every mention of how long the alignment takes quotes the measured figures of ALIGN_MEASURED."""
    from analysis.llm.models import ALIGN_MEASURED

    measured = ("6 min 08 s", "22 min 48 s", "6-23 min")
    assert all(figure in ALIGN_MEASURED for figure in measured)
    files = [ROOT / "README.md", ROOT / "Makefile", DESIGN, *ROOT.glob("pages/*.py"), *ROOT.glob("analysis/**/*.py")]
    stale = []
    for path in files:
        text = path.read_text()
        for figure in measured:
            text = text.replace(figure, "<measured>")
        stale += [f"{path.relative_to(ROOT)}: {match.group(0)}"
                  for match in re.finditer(r"(~|about )?\d+\s*(–|-)?\s*\d*\s*min(ute)?s?\b[^\n]{0,20}", text)
                  if re.search(r"align", text[max(0, match.start() - 200):match.end() + 50], re.I)]
    assert not stale, stale
