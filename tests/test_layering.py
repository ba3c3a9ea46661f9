"""The floors of the house (docs/design.md): each subpackage imports only from the floors below it.

Read from the source with ``ast`` (no import runs), so a lazy import inside a function counts too.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Bottom to top: a module may import from its own floor and the floors before it in this list.
FLOORS = ["core", "llm", "engine", "safety", "lab", "views"]


def imported_subpackages(path: Path) -> set[tuple[str, int]]:
    """{(analysis subpackage, line)} that a module imports, lazily or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "analysis" and len(parts) > 1 and parts[1] in FLOORS:
                found.add((parts[1], node.lineno))
    return found


def layering_violations(package_root: Path) -> list[str]:
    """Every import of a higher floor, as "file:line imports floor"."""
    problems = []
    for floor in FLOORS:
        allowed = set(FLOORS[:FLOORS.index(floor) + 1])
        for path in sorted((package_root / floor).rglob("*.py")):
            for imported, line in sorted(imported_subpackages(path)):
                if imported not in allowed:
                    problems.append(f"{path.relative_to(package_root.parent)}:{line} imports analysis.{imported}")
    return problems


def test_no_floor_imports_a_higher_one():
    assert layering_violations(ROOT / "analysis") == []


def test_the_backend_never_imports_streamlit():
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "analysis").rglob("*.py")
                 if "streamlit" in {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                                    if isinstance(node, ast.Import) for alias in node.names}
                 | {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom) and node.module}]
    assert offenders == []


def test_the_scan_sees_a_lazy_upward_import(tmp_path):
    """The checker itself: a function-level import of the engine from core is reported."""
    for floor in FLOORS:
        (tmp_path / "analysis" / floor).mkdir(parents=True)
    (tmp_path / "analysis" / "core" / "bad.py").write_text(
        "def f():\n    from analysis.engine.capture import FactorCapture\n    return FactorCapture\n")
    (tmp_path / "analysis" / "lab" / "fine.py").write_text("from analysis.core import config\n")
    assert layering_violations(tmp_path / "analysis") == ["analysis/core/bad.py:2 imports analysis.engine"]


@pytest.mark.parametrize("floor", FLOORS)
def test_every_floor_exists(floor):
    assert (ROOT / "analysis" / floor / "__init__.py").is_file()
