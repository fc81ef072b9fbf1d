"""Scenario files: one TOML that fixes a simulated multi-hospital experiment.

Example (``simulations/scenarios/demo.toml``)::

    name = "demo"
    sites = 4
    seed = 0

    [synth]                      # simulations.synth.SynthConfig knobs
    patients_per_site = 300

    [federation]                 # run-config keys (common.federation.FederationConfig)
    task = "multimodal_outcome"
    num-server-rounds = 3
    target-epsilon = 8.0

    [sweep]                      # optional: one run per value
    key = "target-epsilon"
    values = ["0.5", "1", "2", "4", "8", "inf"]

``data_root`` instead of ``[synth]`` uses existing site folders (each with its ``site.toml``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.errors import ConfigError
from common.federation import FederationConfig
from common.spec import format_validation_error
from simulations.synth import SynthConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Scenario", "Sweep", "load_scenario", "SCENARIO_DIR"]

SCENARIO_DIR = Path(__file__).parent / "scenarios"


class Sweep(BaseModel):
    """One run-config key and the values to run it at (``inf`` epsilon = non-private)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    values: tuple[str, ...] = Field(min_length=1)


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
        FederationConfig.from_run_config(value, source="[federation]")
        return value

    def federation_config(self, **overrides: Any) -> FederationConfig:
        merged = {**self.federation, **overrides}
        merged.setdefault("seed", self.seed)
        return FederationConfig.from_run_config(merged, source=f"scenario {self.name!r}")


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
    try:
        return Scenario.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from e
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
