"""The strategy registry: a strategy is a name and a builder; a plug-in adds one anywhere.

``register_strategy`` is how fedcare's seven strategies are offered and how a plug-in adds
an eighth; ``build_strategy`` builds whatever the run config names (hospital-level DP only
around the mean strategies, fedavg and fedprox), and refuses a name nobody registered,
listing those there are. The run config checks only that ``strategy`` is a well-formed name: a site
never builds a strategy, so it needs no centre's plug-in to accept a run.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from flwr.serverapp.strategy import FedAvg, Strategy

from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.server import strategies
from fedcare.server.strategies import (
    available_strategies,
    build_strategy,
    register_strategy,
    strategy_builder,
)

BUILT_IN = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")


class Marked(FedAvg):
    """A FedAvg that remembers the run config and quorum its builder was given."""

    def __init__(self, cfg: FederationConfig, quorum: dict[str, Any]) -> None:
        super().__init__(**quorum)
        self.cfg = cfg
        self.quorum = dict(quorum)


@pytest.fixture(autouse=True)
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers into a copy of the registry, gone after it."""
    monkeypatch.setattr(strategies, "_BUILDERS", dict(strategies._BUILDERS))


def _cfg(**values: Any) -> FederationConfig:
    return FederationConfig.from_run_config(values)


def test_fedcare_s_own_strategies_are_registrations() -> None:
    assert set(BUILT_IN) <= set(available_strategies())
    assert list(available_strategies()) == sorted(available_strategies())


def test_a_registered_strategy_is_built_from_the_run_config_with_the_quorum() -> None:
    register_strategy("marked", Marked)
    cfg = _cfg(strategy="marked", **{"min-sites": 2, "server-learning-rate": 0.3})
    strategy = build_strategy(cfg, n_sites=5)
    assert isinstance(strategy, Marked)
    assert strategy.cfg == cfg
    assert strategy.quorum == {
        "min_train_nodes": 2,
        "min_evaluate_nodes": 2,
        "min_available_nodes": 2,
    }


def test_a_registered_strategy_is_refused_with_hospital_dp() -> None:
    """Hospital-level DP calibrates its noise for a uniform mean; a plug-in's aggregate may
    move by more than C / n per hospital, so it is refused, naming the strategy."""
    register_strategy("marked", Marked)
    cfg = _cfg(strategy="marked", **{"hospital-dp-noise": 0.7, "hospital-dp-clip": 3.0})
    with pytest.raises(ConfigError, match="'marked'"):
        build_strategy(cfg, n_sites=4)


def test_an_unknown_strategy_is_refused_naming_every_registered_one() -> None:
    register_strategy("marked", Marked)
    with pytest.raises(ConfigError) as info:
        build_strategy(_cfg(strategy="fedsgd"), n_sites=2)
    message = str(info.value)
    assert message.startswith("unknown strategy 'fedsgd'; registered strategies: ")
    for name in (*BUILT_IN, "marked"):
        assert name in message
    assert "register_strategy" in message and "docs/api.md" in message
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        strategy_builder("fedsgd")


def test_a_name_is_registered_once() -> None:
    register_strategy("marked", Marked)
    with pytest.raises(ConfigError, match="'marked' is already registered"):
        register_strategy("marked", Marked)
    with pytest.raises(ConfigError, match="'fedavg' is already registered"):
        register_strategy("fedavg", Marked)
    assert strategy_builder("marked") is Marked


@pytest.mark.parametrize("name", ["", "FedAvg", "fed avg", "9lives", "fed.avg", "x" * 65, None])
def test_a_malformed_name_is_refused_at_registration(name: Any) -> None:
    with pytest.raises(ConfigError, match="lowercase letters, digits"):
        register_strategy(name, Marked)
    assert name not in strategies._BUILDERS


def test_a_builder_must_be_callable_and_must_build_a_strategy() -> None:
    with pytest.raises(ConfigError, match="must be callable"):
        register_strategy("broken", "FedAvg")  # type: ignore[arg-type]
    register_strategy("returns-none", lambda cfg, quorum: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match="returned NoneType, not a flwr.serverapp.strategy"):
        build_strategy(_cfg(strategy="returns-none"), n_sites=2)


def test_the_run_config_takes_any_well_formed_name_and_refuses_others() -> None:
    # Registration is the server's business; a site validates the run config without it.
    assert _cfg(strategy="not-registered-here").strategy == "not-registered-here"
    with pytest.raises(ConfigError) as info:
        _cfg(strategy="Fed SGD")
    assert "strategy" in str(info.value) and "is not a strategy name" in str(info.value)


def test_the_registry_s_examples_run() -> None:
    result = doctest.testmod(strategies, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0


PLUGIN = """
from flwr.serverapp.strategy import FedMedian

from fedcare.server.strategies import register_strategy

register_strategy("plugged-median", lambda cfg, quorum: FedMedian(**quorum))
"""

CHILD = """
import json

import fedcare.server.app  # the ServerApp's module: what a run's server process imports
from fedcare.common.federation import FederationConfig
from fedcare.server.strategies import available_strategies, build_strategy

cfg = FederationConfig.from_run_config({"strategy": "plugged-median", "min-sites": 2})
built = build_strategy(cfg, n_sites=3)
print(json.dumps({"names": available_strategies(), "built": type(built).__name__,
                  "quorum": built.min_available_nodes}))
"""


def test_a_plugin_strategy_reaches_a_fresh_serverapp_process(tmp_path: Path) -> None:
    (tmp_path / "strategy_plugin.py").write_text(textwrap.dedent(PLUGIN), encoding="utf-8")
    env = {
        **os.environ,
        "FEDCARE_PLUGINS": "strategy_plugin",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert "plugged-median" in seen["names"] and set(BUILT_IN) <= set(seen["names"])
    assert (seen["built"], seen["quorum"]) == ("FedMedian", 2)
    assert "plugged-median" not in available_strategies()  # this process never loaded it


def test_a_built_in_strategy_is_a_flower_strategy() -> None:
    for name in BUILT_IN:
        cfg = _cfg(strategy=name, **({"proximal-mu": 0.1} if name == "fedprox" else {}))
        assert isinstance(build_strategy(cfg, n_sites=3), Strategy), name
