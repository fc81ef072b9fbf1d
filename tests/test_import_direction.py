"""Imports go one way: common <- models <- client | server <- simulations <- fedcare.

A module may import its own package and the packages below it, never one above it, and
client and server never import each other (a hospital installs no server code path it
does not run, and the centre none of a site's). Read from the sources' import statements
(including imports inside functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: What each package may import of fedcare's (besides itself).
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "models": {"common"},
    "client": {"common", "models"},
    "server": {"common", "models"},
    "simulations": {"common", "models", "client", "server"},
    "fedcare": {"common", "models", "client", "server", "simulations"},
}


def _imports(path: Path) -> set[str]:
    """The fedcare packages a file imports (``fedcare.client.x`` -> ``client``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "fedcare":  # from fedcare import client
                names += [f"fedcare.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedcare" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_those_below_it(package: str) -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(_imports(path) - ALLOWED[package] - {package})
        for path in _sources(package)
    }
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_checker_sees_every_form_of_import(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "import fedcare.server.app\n"
        "from fedcare.client import app\n"
        "from fedcare import simulations\n"
        "def f():\n    from fedcare.models.registry import build_model\n"
    )
    assert _imports(source) == {"server", "client", "simulations", "models"}
