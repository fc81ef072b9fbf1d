"""Every docstring example in fedcare runs and shows what it says (STYLE.md, habit 11).

The modules are found as installed, under the ``fedcare`` namespace (the folders are mapped
onto it, so ``pytest --doctest-modules`` on the folders would import them a second time
under their folder names).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("fedcare", *(f"fedcare.{p}" for p in ("common", "models", "client", "server")))
PACKAGES += ("fedcare.simulations",)


def _modules() -> list[str]:
    names = set(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names.update(
            m.name for m in pkgutil.walk_packages(path, f"{package}.") if m.name not in names
        )
    return sorted(n for n in names if not n.endswith("__main__"))


def _examples(name: str) -> list[doctest.DocTest]:
    return [t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples]


MODULES = _modules()
WITH_EXAMPLES = [name for name in MODULES if _examples(name)]


def test_every_package_is_walked() -> None:
    assert {"fedcare.client.accounting", "fedcare.server.guard", "fedcare.api"} <= set(MODULES)
    assert len(WITH_EXAMPLES) >= 50  # 60 modules had examples when this test was written


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name: str) -> None:
    tests = _examples(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
