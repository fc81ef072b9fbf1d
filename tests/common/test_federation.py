"""The run config: validated once, unknown keys and bad values named; pyproject lists every key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedcare.common.errors import ConfigError
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_pyproject_declares_every_run_config_key_with_its_default() -> None:
    # flwr rejects a --run-config key that [tool.flwr.app.config] does not declare.
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RUN_CONFIG_DEFAULTS


def test_round_trip_through_flat_run_config() -> None:
    cfg = FederationConfig.from_run_config({"task": "readmission", "num-server-rounds": 5})
    assert cfg.num_server_rounds == 5
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("run_config", "needle"),
    [
        ({"num-server-round": 3}, "num-server-round: unknown key"),
        ({"num-server-rounds": 0}, "num-server-rounds: Input should be greater than or equal to 1"),
        ({"strategy": "Fed SGD"}, "is not a strategy name"),
        ({"target-delta": 2.0}, "target-delta"),
        ({"strategy": "fedprox"}, "needs proximal-mu > 0"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_run_config_names_the_key(run_config: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        FederationConfig.from_run_config(run_config, source="scenario x")
    assert needle in str(info.value)
    assert str(info.value).startswith("scenario x: ")
