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
    from analysis.llm.models import ALIGN_MEASURED

    assert "22 min 48 s" in ALIGN_MEASURED
    files = [ROOT / "README.md", ROOT / "Makefile", DESIGN, *ROOT.glob("pages/*.py"), *ROOT.glob("analysis/**/*.py")]
    stale = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in files
             for match in re.finditer(r"(~|about )?\d+\s*(–|-)?\s*\d*\s*min(ute)?s?\b[^\n]{0,20}", path.read_text())
             if re.search(r"align", path.read_text()[max(0, match.start() - 200):match.end() + 50], re.I)
             and "22 min 48 s" not in match.group(0) and "23 minutes" not in match.group(0)]
    assert not stale, stale
