"""Scenario files: one TOML that fixes a simulated multi-hospital experiment.

Example (``simulations/scenarios/demo.toml``)::

    name = "demo"
    sites = 4
    seed = 0

    [synth]                      # fedcare.simulations.synth.SynthConfig knobs
    patients_per_site = 300

    [federation]                 # run-config keys (fedcare.common.federation.FederationConfig)
    task = "multimodal_outcome"
    num-server-rounds = 3
    target-epsilon = 8.0

    [sweep]                      # optional: one run per value
    key = "target-epsilon"
    values = ["0.5", "1", "2", "4", "8", "inf"]

``data_root`` instead of ``[synth]`` uses existing site folders (each with its ``site.toml``).
A ``run-id`` in ``[federation]`` names the run; without one every run gets a fresh id. Every
sweep value is its own run: :meth:`Scenario.sweep_plan` validates each value's run config
before the first one trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.spec import format_validation_error
from fedcare.common.tomlcompat import tomllib
from fedcare.server.hospital_dp import check_hospital_dp
from fedcare.server.strategies import strategy_builder
from fedcare.simulations.synth import SynthConfig

__all__ = ["Scenario", "Sweep", "SweepValue", "load_scenario", "SCENARIO_DIR"]

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class Sweep(BaseModel):
    """One run-config key and the values to run it at (``inf`` epsilon = non-private)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    values: tuple[str, ...] = Field(min_length=1)

    def overrides(self, value: str) -> dict[str, Any]:
        """The run-config overrides of one sweep value.

        Numbers become ints or floats (ε and δ stay floats); ``target-epsilon`` ``inf``
        means no DP at all.

        Examples
        --------
        >>> Sweep(key="target-epsilon", values=("1",)).overrides("inf")
        {'dp': False}
        >>> Sweep(key="num-server-rounds", values=("2",)).overrides("2")
        {'num-server-rounds': 2}
        """
        if self.key == "target-epsilon" and value.lower() in ("inf", "infinity"):
            return {"dp": False}
        try:
            number: Any = float(value)
            if number.is_integer() and self.key not in ("target-epsilon", "target-delta"):
                number = int(number)
        except ValueError:
            number = value
        return {self.key: number}


@dataclass(frozen=True)
class SweepValue:
    """One run of a sweep: its value, its run-config overrides, and the validated config."""

    value: str
    overrides: dict[str, Any]
    config: FederationConfig


class Scenario(BaseModel):
    """A simulated experiment. Frozen; unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "default"
    sites: int = Field(default=4, ge=1)
    seed: int = 0
    data_root: str | None = None
    synth: SynthConfig = SynthConfig()
    federation: dict[str, Any] = Field(default_factory=dict)
    baselines: bool = True
    cpus_per_site: int = Field(default=1, ge=1)
    gpus_per_site: float = Field(default=0.0, ge=0)
    sweep: Sweep | None = None

    @field_validator("federation")
    @classmethod
    def _known_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            FederationConfig.from_run_config(value, source="[federation]")
        except ConfigError as e:  # a ValueError: pydantic then reports the other fields too
            raise ValueError(str(e)) from None
        return value

    def federation_config(self, **overrides: Any) -> FederationConfig:
        """The run config: ``[federation]`` with ``overrides`` on top (seed: the scenario's)."""
        return self._config(overrides, source=f"scenario {self.name!r}")

    def _config(self, overrides: dict[str, Any], *, source: str) -> FederationConfig:
        merged = {**self.federation, **overrides}
        merged.setdefault("seed", self.seed)
        config = FederationConfig.from_run_config(merged, source=source)
        try:  # registered strategies (plug-ins included) are known only here, not in common
            strategy_builder(config.strategy)
            check_hospital_dp(config)
        except ConfigError as e:
            raise ConfigError(f"{source}: field strategy: {e}") from e
        return config

    def sweep_plan(self) -> tuple[SweepValue, ...]:
        """Every value of the sweep as its own run, each one's config validated up front.

        A run id the scenario names gets ``-<key>-<value>`` appended per value, so no two
        values share a run; without one, every run gets its own fresh id when it starts.

        Raises
        ------
        ConfigError
            The scenario has no sweep, a value repeats, or any value's run config is invalid
            (every bad value is named, before anything trains).
        """
        if self.sweep is None:
            raise ConfigError(f"scenario {self.name!r} has no [sweep]; add one or use --sweep")
        sweep = self.sweep
        repeated = sorted({v for v in sweep.values if sweep.values.count(v) > 1})
        if repeated:
            raise ConfigError(
                f"sweep {sweep.key}: value(s) {', '.join(repeated)} appear more than once; "
                "list each value once"
            )
        named = self.federation.get("run-id")
        plan, errors = [], []
        for value in sweep.values:
            overrides = sweep.overrides(value)
            if named and "run-id" not in overrides:
                overrides["run-id"] = f"{named}-{sweep.key}-{value}"
            try:
                config = self._config(overrides, source=f"sweep {sweep.key}={value}")
            except ConfigError as e:
                errors.append(str(e))
                continue
            plan.append(SweepValue(value=value, overrides=overrides, config=config))
        if errors:
            raise ConfigError("\n".join(errors))
        return tuple(plan)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML; a bare name looks in ``simulations/scenarios/``."""
    path = Path(path)
    if not path.suffix and not path.exists():
        path = SCENARIO_DIR / f"{path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(f"{path}: no such scenario file (bundled scenarios: {known})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start} cannot be decoded); save the scenario as "
            "UTF-8 (a TOML file must be)"
        ) from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from e
    try:
        return Scenario.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
