"""``summary.json``: the versioned, validated record of one federated run.

Field by field (version 1; see ``docs/summary-schema.md``)::

    schema_version, run_id, fedcare_version, flwr_version, task, strategy,
    rounds_planned, rounds_completed,
    sites: [{site_id, n_train, n_test, status, reason, rounds_participated,
             privacy: {enabled, epsilon, delta, accountant,
                       mechanisms: [{noise_multiplier, sample_rate, steps}]},
             metrics: {name: value}}],
    global: {rounds: [{round, metrics}], final: {name: value}},
    baselines: {local_only: {site_id: {name: value}}, pooled: {name: value}},
    events: [{round, site_id, kind, detail}]

A site's ``privacy.epsilon`` is the ε of its dataset's whole ledger history at the end of
the run (δ = ``privacy.delta``); ``mechanisms`` lists the DP-SGD mechanisms this run applied,
one per round, so an auditor can recompute ε independently. ``status`` is ``completed``,
``refused`` (the site declined: budget or policy, with ``reason``), ``dropped`` (no reply
within the round timeout) or ``rejected`` (the server rejected its update as malformed).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from common.spec import format_validation_error

__all__ = [
    "SCHEMA_VERSION",
    "Mechanism",
    "Privacy",
    "SiteResult",
    "RoundMetrics",
    "GlobalResult",
    "Baselines",
    "Event",
    "RunSummary",
    "load_summary",
    "write_summary",
]

SCHEMA_VERSION = 1
Metrics = dict[str, float]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Mechanism(_Strict):
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)


class Privacy(_Strict):
    enabled: bool
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    mechanisms: tuple[Mechanism, ...] = ()


class SiteResult(_Strict):
    site_id: str
    n_train: int = Field(ge=0)
    n_test: int = Field(ge=0)
    status: Literal["completed", "refused", "dropped", "rejected"]
    reason: str | None = None
    rounds_participated: tuple[int, ...] = ()
    privacy: Privacy
    metrics: Metrics = Field(default_factory=dict)


class RoundMetrics(_Strict):
    """Global metrics after ``round`` (round 0: the initial model, before any training)."""

    round: int = Field(ge=0)
    metrics: Metrics


class GlobalResult(_Strict):
    rounds: tuple[RoundMetrics, ...] = ()
    final: Metrics = Field(default_factory=dict)


class Baselines(_Strict):
    local_only: dict[str, Metrics] = Field(default_factory=dict)
    pooled: Metrics = Field(default_factory=dict)


class Event(_Strict):
    round: int
    site_id: str
    kind: str
    detail: str


class RunSummary(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    run_id: str
    fedcare_version: str
    flwr_version: str
    task: str
    strategy: str
    rounds_planned: int = Field(ge=1)
    rounds_completed: int = Field(ge=0)
    sites: tuple[SiteResult, ...]
    global_: GlobalResult = Field(alias="global")
    baselines: Baselines = Field(default_factory=Baselines)
    events: tuple[Event, ...] = ()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2)


def write_summary(summary: RunSummary, path: Path) -> None:
    """Write ``summary.json`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".summary-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(summary.to_json())
    os.replace(tmp, path)


def load_summary(path: Path) -> RunSummary:
    """Read and validate a ``summary.json``; errors name the file and field."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file; a finished run writes summary.json") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    try:
        return RunSummary.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from e
