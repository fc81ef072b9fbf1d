"""fedcare installs one namespace, ``fedcare.*``, mapped from the repository's folders.

A wheel that put ``common`` or ``models`` at the top of site-packages would collide with any
other project using those names; these tests build the real wheel and read what it holds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedcare.common.tomlcompat import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_with_an_init_is_a_listed_package() -> None:
    config = _setuptools()
    mapped = config["package-dir"]
    expected = set()
    for package, folder in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((package, *rel)))
    assert set(config["packages"]) == expected


def test_the_folders_are_mapped_under_fedcare_and_nothing_else() -> None:
    mapped = _setuptools()["package-dir"]
    assert all(name == "fedcare" or name.startswith("fedcare.") for name in mapped)
    assert set(mapped.values()) == {
        "fedcare",
        "common",
        "models",
        "client",
        "server",
        "simulations",
    }


@pytest.mark.slow
def test_the_wheel_installs_only_fedcare(tmp_path: Path) -> None:
    """``pip install .`` puts one package in site-packages: fedcare (plus its metadata)."""
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".*", "build", "dist", "runs", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(tmp_path), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedcare-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedcare"}
    for needed in (
        "fedcare/py.typed",
        "fedcare/client/app.py",
        "fedcare/server/app.py",
        "fedcare/simulations/scenarios/demo.toml",
    ):
        assert needed in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedcare = fedcare.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
