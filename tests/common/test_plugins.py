"""Plug-ins: modules named by FEDCARE_PLUGINS or a ``fedcare.plugins`` entry point are imported
in every process that uses fedcare's registries, and one that fails is one clear error.

The cross-process tests start real Python processes: what a plug-in registers must be there
in a process that only imported fedcare (a site's worker, a Ray actor), not just in the
process that named it.
"""

from __future__ import annotations

import ast
import doctest
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcare.common import plugins
from fedcare.common.errors import ConfigError
from fedcare.common.plugins import (
    PLUGIN_GROUP,
    PLUGINS_ENV,
    load_plugins,
    plugin_entry_points,
    plugin_modules,
)

#: A plug-in that adds one of each: a model, a task kind and a strategy.
PLUGIN = """
from flwr.serverapp.strategy import FedMedian
from pydantic import PositiveInt
from torch import nn

from fedcare.models import BinaryClassification, HParams, register_model, register_task_kind
from fedcare.models.registry import feature_dim
from fedcare.server.strategies import register_strategy


class PluggedConfig(HParams):
    hidden: PositiveInt = 4


@register_model("plugged_mlp", modalities=("ehr",), ghost_clipping=True, ghost_norm_only=True)
class PluggedMLP(nn.Module):
    '''A one-hidden-layer MLP that a plug-in adds.'''

    Config = PluggedConfig

    def __init__(self, *, in_features, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    @classmethod
    def from_config(cls, *, input_dims, config):
        width = feature_dim(input_dims, "ehr", model="plugged_mlp")
        return cls(in_features=width, hidden=config.hidden)

    def forward(self, x):
        return self.net(x).squeeze(-1)


@register_task_kind
class PluggedBinary(BinaryClassification):
    name = "plugged-binary"


register_strategy("plugged-median", lambda cfg, quorum: FedMedian(**quorum))
"""

#: What a fresh process sees once it imported the module given as argv[1].
CHILD = """
import importlib
import json
import sys

importlib.import_module(sys.argv[1])
from fedcare.models import available_models, available_task_kinds, build_model
from fedcare.server.strategies import available_strategies

model = build_model("plugged_mlp", input_dims={"ehr": 3}, hidden=2)
print(json.dumps({
    "models": available_models(),
    "task_kinds": available_task_kinds(),
    "strategies": available_strategies(),
    "parameters": sum(p.numel() for p in model.parameters()),
}))
"""


def _env(path: Path, plugins_value: str) -> dict[str, str]:
    pythonpath = [str(path), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        PLUGINS_ENV: plugins_value,
        "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p),
    }


def _child(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=240, check=False
    )


@pytest.fixture()
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``tmp_path`` on ``sys.path``; the modules the test imports from it are forgotten after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if getattr(sys.modules[name], "__file__", "") and str(tmp_path) in str(
            sys.modules[name].__file__
        ):
            del sys.modules[name]


# --------------------------------------------------------------------------- naming


def test_the_variable_lists_modules_in_order_each_once() -> None:
    assert plugin_modules({PLUGINS_ENV: " a.b , c,,a.b ,"}) == ("a.b", "c")
    assert plugin_modules({}) == ()
    assert plugin_modules({PLUGINS_ENV: ""}) == ()


@pytest.mark.parametrize("value", ["my-plugin", "a..b", "lab/models", "1st"])
def test_a_value_that_is_not_a_module_name_is_refused_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_plugins(environ={PLUGINS_ENV: f"json,{value}"})
    message = str(info.value)
    assert message.startswith(f"{PLUGINS_ENV}: {value!r} is not a module name")
    assert f"e.g. {PLUGINS_ENV}=my_plugin,lab.models" in message


def test_the_loader_imports_nothing_above_common() -> None:
    """Imports go one way (common <- models <- client | server): the plug-ins import the
    registries, the loader does not."""
    tree = ast.parse(Path(plugins.__file__).read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported.append(node.module or "")
    ours = [name for name in imported if name.split(".")[0] == "fedcare"]
    assert ours and all(name.startswith("fedcare.common.") for name in ours), ours


def test_the_module_s_examples_run() -> None:
    result = doctest.testmod(plugins)
    assert result.attempted >= 2 and result.failed == 0


# --------------------------------------------------------------------------- this process


def test_each_named_module_is_imported_once(importable: Path) -> None:
    (importable / "counting_plugin.py").write_text(
        "import builtins\nbuiltins.counting_plugin_imports = "
        "getattr(builtins, 'counting_plugin_imports', 0) + 1\n",
        encoding="utf-8",
    )
    import builtins

    try:
        assert load_plugins(environ={PLUGINS_ENV: "counting_plugin"})[-1] == "counting_plugin"
        load_plugins(environ={PLUGINS_ENV: "counting_plugin,counting_plugin"})
        assert builtins.counting_plugin_imports == 1  # type: ignore[attr-defined]
    finally:
        del builtins.counting_plugin_imports  # type: ignore[attr-defined]


def test_a_plugin_that_raises_is_one_error_naming_it_and_the_fix(importable: Path) -> None:
    (importable / "broken_plugin.py").write_text(
        "raise RuntimeError('the registry moved')\n", encoding="utf-8"
    )
    for _ in range(2):  # not imported half the first time and silently skipped the next
        with pytest.raises(ConfigError) as info:
            load_plugins(environ={PLUGINS_ENV: "json,broken_plugin"})
        message = str(info.value)
        assert message.startswith(
            f"fedcare plug-in 'broken_plugin' (named in {PLUGINS_ENV}) failed to import: "
            "RuntimeError: the registry moved. Fix:"
        )
        assert "\n" not in message
        assert isinstance(info.value.__cause__, RuntimeError)


def test_a_plugin_that_is_not_installed_is_named_with_the_fix() -> None:
    with pytest.raises(ConfigError) as info:
        load_plugins(environ={PLUGINS_ENV: "no_such_fedcare_plugin_module"})
    message = str(info.value)
    assert "'no_such_fedcare_plugin_module'" in message
    assert "ModuleNotFoundError" in message
    assert "put its folder on PYTHONPATH" in message and f"remove it from {PLUGINS_ENV}" in message


def _distribution(root: Path, name: str, entries: dict[str, str]) -> None:
    """An installed distribution's metadata, as pip writes it, declaring ``entries``."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8"
    )
    lines = [f"[{PLUGIN_GROUP}]", *(f"{k} = {v}" for k, v in entries.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_an_entry_point_of_the_group_is_loaded_before_the_variable_s(importable: Path) -> None:
    (importable / "ep_plugin.py").write_text("VALUE = 1\n", encoding="utf-8")
    _distribution(importable, "fedcare_ep_demo", {"ep-demo": "ep_plugin"})
    assert ("ep-demo", "ep_plugin") in {(ep.name, ep.value) for ep in plugin_entry_points()}
    loaded = load_plugins(environ={PLUGINS_ENV: "json"})
    assert loaded.index("ep_plugin") < loaded.index("json")
    assert sys.modules["ep_plugin"].VALUE == 1


def test_a_broken_entry_point_is_named_with_its_distribution(importable: Path) -> None:
    _distribution(importable, "fedcare_broken_demo", {"broken": "no_such_module_for_fedcare"})
    with pytest.raises(ConfigError) as info:
        load_plugins(environ={})
    message = str(info.value)
    assert "'no_such_module_for_fedcare'" in message
    assert "entry point 'broken' (no_such_module_for_fedcare) of fedcare_broken_demo" in message
    assert "uninstall the distribution" in message


# --------------------------------------------------------------------------- other processes


def test_a_plugin_named_in_the_variable_registers_in_a_fresh_process(tmp_path: Path) -> None:
    (tmp_path / "lab_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    child = _child(["-c", CHILD, "fedcare.models"], _env(tmp_path, "lab_plugin"))
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert "plugged_mlp" in seen["models"] and "ehr_mlp" in seen["models"]
    assert "plugged-binary" in seen["task_kinds"] and "binary" in seen["task_kinds"]
    assert "plugged-median" in seen["strategies"]
    assert seen["parameters"] == 3 * 2 + 2 + 2 + 1  # Linear(3, 2) and Linear(2, 1)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["fedcare.client.app", "fedcare.server.app"])
def test_the_site_and_server_app_processes_see_the_plugin(tmp_path: Path, module: str) -> None:
    """What a site's ClientApp process (a Ray actor, a site worker) and the ServerApp's
    process import first is enough to have the plug-in's registrations."""
    (tmp_path / "lab_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    child = _child(["-c", CHILD, module], _env(tmp_path, "lab_plugin"))
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert "plugged_mlp" in seen["models"] and "plugged-median" in seen["strategies"]


def test_a_failing_plugin_stops_a_fresh_process_with_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "typo_plugin.py").write_text(
        "from fedcare.models import register_modle\n", encoding="utf-8"
    )
    child = _child(["-c", "import fedcare.models"], _env(tmp_path, "typo_plugin"))
    assert child.returncode == 1
    last = child.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "fedcare.common.errors.ConfigError: fedcare plug-in 'typo_plugin' (named in "
        f"{PLUGINS_ENV}) failed to import: ImportError: cannot import name 'register_modle'"
    )


def test_the_audit_code_hash_covers_the_plug_ins_a_process_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site that runs a plug-in runs code beyond fedcare's: its audit log's code_sha256
    (``running_code_hash``) names that code too, byte for byte."""
    from fedcare.common.audit import CODE_PACKAGES, code_hash

    plugin = tmp_path / "lab_plugin_for_hash.py"
    plugin.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "lab_plugin_for_hash")
    assert plugins.plugin_code_modules() == ("lab_plugin_for_hash",)
    fedcare_only = code_hash(CODE_PACKAGES)
    with_plugin = code_hash((*CODE_PACKAGES, *plugins.plugin_code_modules()))
    plugin.write_text("X = 2\n")
    changed = code_hash((*CODE_PACKAGES, *plugins.plugin_code_modules()))
    assert len({fedcare_only, with_plugin, changed}) == 3


def test_a_plug_in_s_whole_package_is_in_the_code_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lab.plugin`` registers a model that lives in ``lab/models.py``: a change there is
    a change of the code the site runs, so the hash covers the top-level package."""
    from fedcare.common.audit import CODE_PACKAGES, code_hash

    package = tmp_path / "lab_pkg_for_hash"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text("from lab_pkg_for_hash import models\n")
    (package / "models.py").write_text("W = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.PLUGINS_ENV, "lab_pkg_for_hash.plugin")
    assert plugins.plugin_code_modules() == ("lab_pkg_for_hash",)
    before = code_hash((*CODE_PACKAGES, *plugins.plugin_code_modules()))
    (package / "models.py").write_text("W = 2\n")
    assert code_hash((*CODE_PACKAGES, *plugins.plugin_code_modules())) != before
