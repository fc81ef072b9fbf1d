"""``server_record.json``: the server's typed, versioned record of one run.

The ServerApp keeps this record while the run goes (:mod:`fedcare.server.recorder`), saves
it in every checkpoint and writes it into the run directory at the end (:data:`RECORD_NAME`);
``summary.json`` is built from it (:meth:`fedcare.common.summary.RunSummary.from_record`),
and ``fedcare audit verify``, the audit report and a simulation's ``metrics.csv`` read it.
Every one of them reads it through :class:`RunRecord`. The full reference is
``docs/summary-schema.md`` (section *server_record.json*)::

    record_version, run_id, task, model, strategy, personalization, rounds_planned,
    rounds_completed, resumed_from, optimizer_reset: {after_round, reason} | null,
    config: {run-config key: value},
    sites: {site_id: {site_id, n_train, n_test, status, reason, rounds_participated,
                      privacy: {enabled, epsilon, run_epsilon, delta, accountant, noise,
                                evaluation, mechanisms: [{round, noise_multiplier,
                                                          sample_rate, steps}]},
                      metrics: {name: value}, personal_metrics: {name: value}}},
    rounds: [{round, metrics: {name: value}, sites: {site_id: {name: value}},
              personal: {site_id: {name: value}},
              calibration: [{bin, mean_predicted, observed, n}]}],
    events: [{round, site_id, kind, detail}],
    nodes: {Flower node id: site_id},
    groups: [{name, column, labels}],
    explanation: {...} | null, survival: {...} | null

A round's ``sites`` hold each site's evaluation metrics (``<split>.<metric>``) and what the
server measured of its update: ``update-norm``, ``num-examples``, ``train-loss`` and the ε
the site reported (``epsilon``, ``run-epsilon``).

fedcare writes this file itself, so every model here rejects unknown keys. Versions:

* 4 (:data:`RECORD_VERSION`): written now; every field present. Adds ``survival`` (a
  survival task's observed and predicted curves, :class:`~fedcare.common.summary.SurvivalCurves`).
* 3: as 4 without ``survival`` (read as null). Added ``groups`` (the federation's group
  attributes, :class:`~fedcare.common.summary.GroupInfo`) and each round's ``calibration``
  (the global test calibration curve).
* 2: as 3 without ``groups`` and ``calibration`` (read as ``[]``).
* 1: fedcare before this module, whose records carry no ``record_version`` (a file, or the
  record inside a checkpoint of that fedcare). Still read (:data:`OLDER_READABLE_VERSIONS`):
  it lacks ``personalization`` (read as ``none``: that fedcare kept no personal models) and,
  in a checkpoint, ``rounds_completed`` (read as its last recorded round). The fields it
  lacks deeper down (``privacy.run_epsilon``, ``noise``, ``evaluation``,
  ``personal_metrics``, a round's ``personal``) are optional in every version: null or empty
  means the site did not report them.

Examples
--------
>>> record = RunRecord.start(
...     run_id="r1", task="readmission", model="ehr_mlp", strategy="fedavg",
...     personalization="none", rounds_planned=2, config={"dp": True},
... )
>>> record.round_entry(1).metrics["test.auroc"] = 0.71
>>> record.rounds_completed, record.to_dict()["record_version"]
(1, 4)
>>> RunRecord.from_dict(record.to_dict(), source="r1").rounds[0].metrics
{'test.auroc': 0.71}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.files import read_json_file, write_private_atomic
from fedcare.common.run_files import RECORD_NAME
from fedcare.common.summary import (
    CalibrationBin,
    EvaluationMode,
    Event,
    Explanation,
    GroupInfo,
    Mechanism,
    Metrics,
    NoiseSource,
    SiteStatus,
    SurvivalCurves,
)

__all__ = [
    "RECORD_NAME",
    "RECORD_VERSION",
    "OLDER_READABLE_VERSIONS",
    "RecordMechanism",
    "SitePrivacy",
    "SiteRecord",
    "RoundRecord",
    "OptimizerReset",
    "RunRecord",
    "load_run_record",
    "write_run_record",
]

RECORD_VERSION: Final = 4
#: Versions :meth:`RunRecord.from_dict` still reads (see the module docstring).
OLDER_READABLE_VERSIONS: Final = (1, 2, 3)

#: Run-config value types (Flower's run config: flat, scalar values).
ConfigValue = bool | int | float | str


class _Record(BaseModel):
    """Mutable while the run goes (each assignment validated); unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        validate_assignment=True,
        use_attribute_docstrings=True,
    )


class RecordMechanism(Mechanism):
    """A DP-SGD mechanism a site reported for one round: the summary's
    :class:`~fedcare.common.summary.Mechanism` (σ, q, steps) and the round (frozen once
    reported)."""

    round: int = Field(ge=1)
    """The round it was applied in."""


class SitePrivacy(_Record):
    """What a site reported of its differential privacy (its latest report)."""

    enabled: bool
    """Whether the site trained with DP-SGD (the run's ``dp`` until it reports)."""
    epsilon: float | None = Field(default=None, ge=0)
    """The site's lifetime ε after its latest charge; ``None`` until it reports one."""
    run_epsilon: float | None = Field(default=None, ge=0)
    """ε this run added; ``None`` until reported."""
    delta: float | None = Field(default=None, gt=0, lt=1)
    """δ of ``epsilon``."""
    accountant: str | None = Field(default=None, min_length=1)
    """The accountant that computed ε (``prv`` or ``rdp``)."""
    noise: NoiseSource | None = None
    """Where the site's DP noise came from; ``None`` until reported."""
    evaluation: EvaluationMode | None = None
    """How the site released its evaluation metrics; ``None`` until reported."""
    mechanisms: list[RecordMechanism] = Field(default_factory=list)
    """One mechanism per round the site trained in with DP, in the order reported."""


class SiteRecord(_Record):
    """One site's part in the run, as the server saw it."""

    site_id: str = Field(min_length=1)
    """The site's id (what its replies report)."""
    n_train: int = Field(default=0, ge=0)
    """Training examples in the site's latest accepted update."""
    n_test: int = Field(default=0, ge=0)
    """Test examples of its latest evaluation."""
    status: SiteStatus = "completed"
    """How its participation stands (:data:`fedcare.common.summary.SITE_STATUSES`)."""
    reason: str | None = None
    """Why the status is not ``completed``."""
    rounds_participated: list[int] = Field(default_factory=list)
    """Rounds whose aggregate included its update."""
    privacy: SitePrivacy
    """Its differential privacy, as reported."""
    metrics: Metrics = Field(default_factory=dict)
    """Its latest evaluation of the global model."""
    personal_metrics: Metrics = Field(default_factory=dict)
    """Its latest evaluation of its personalized model (empty without one)."""


class RoundRecord(_Record):
    """Everything recorded about one round (round 0: the initial model's evaluation)."""

    round: int = Field(ge=0)
    """The round's number in the run."""
    metrics: Metrics = Field(default_factory=dict)
    """The global evaluation metrics (empty when the round was not evaluated)."""
    sites: dict[str, Metrics] = Field(default_factory=dict)
    """Site id -> its evaluation metrics and its update's numbers (``update-norm``,
    ``num-examples``, ``train-loss``, ``epsilon``, ``run-epsilon``)."""
    personal: dict[str, Metrics] = Field(default_factory=dict)
    """Site id -> its personalized model's metrics this round (empty without any)."""
    calibration: list[CalibrationBin] = Field(default_factory=list)
    """The global model's test calibration curve this round (from the pooled release)."""


class OptimizerReset(_Record):
    """A resume whose checkpoint held no server optimizer state (fresh moments)."""

    after_round: int = Field(ge=1)
    """The round the run resumed after."""
    reason: str = Field(min_length=1)
    """Why the state could not be restored."""


class RunRecord(_Record):
    """The whole ``server_record.json`` (version :data:`RECORD_VERSION`)."""

    record_version: Literal[4] = RECORD_VERSION
    """Version of this record's shape."""
    run_id: str = Field(min_length=1)
    """The run's id."""
    task: str = Field(min_length=1)
    """The task trained."""
    model: str
    """The model trained (the run's resolved model; empty when none was named yet)."""
    strategy: str = Field(min_length=1)
    """The aggregation strategy."""
    personalization: str = Field(min_length=1)
    """How sites kept personal models (``none``, ``finetune``, ``fedper``, ``ditto``)."""
    rounds_planned: int = Field(ge=1)
    """Rounds the run was configured for."""
    rounds_completed: int = Field(default=0, ge=0)
    """The last round recorded (0 before the first)."""
    resumed_from: int | None = Field(default=None, ge=1)
    """The round the latest resume continued after; ``None`` for a run never resumed."""
    optimizer_reset: OptimizerReset | None = None
    """A resume that restarted the server optimizer's moments, and why."""
    config: dict[str, ConfigValue]
    """The resolved run config (Flower's spelling: ``target-epsilon``)."""
    sites: dict[str, SiteRecord] = Field(default_factory=dict)
    """Site id -> its record."""
    rounds: list[RoundRecord] = Field(default_factory=list)
    """One entry per round recorded (in the order first recorded; see :meth:`finish`)."""
    events: list[Event] = Field(default_factory=list)
    """Refusals, failures, drop-outs, rejections and skipped rounds, in order."""
    nodes: dict[str, str] = Field(default_factory=dict)
    """Flower node id (as a string) -> the site id it reported."""
    groups: list[GroupInfo] = Field(default_factory=list)
    """The federation's group attributes (its schema's ``[[schema.groups]]``)."""
    explanation: Explanation | None = None
    """Feature attributions of the final model (run config ``explain``), or None."""
    survival: SurvivalCurves | None = None
    """A survival task's observed and predicted curves of the final model, or None."""

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        wrong = sorted(k for k, site in self.sites.items() if site.site_id != k)
        if wrong:
            raise ValueError(f"sites {', '.join(wrong)} are filed under another site's id")
        numbers = [r.round for r in self.rounds]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"rounds lists a round more than once: {numbers}")
        return self

    # ------------------------------------------------------------------ building it

    @classmethod
    def start(
        cls,
        *,
        run_id: str,
        task: str,
        model: str,
        strategy: str,
        personalization: str,
        rounds_planned: int,
        config: dict[str, ConfigValue],
    ) -> RunRecord:
        """A new run's empty record."""
        return cls(
            run_id=run_id,
            task=task,
            model=model,
            strategy=strategy,
            personalization=personalization,
            rounds_planned=rounds_planned,
            config=dict(config),
        )

    def round_entry(self, rnd: int) -> RoundRecord:
        """The entry of round ``rnd``, added (and ``rounds_completed`` raised) if new."""
        for entry in self.rounds:
            if entry.round == rnd:
                return entry
        entry = RoundRecord(round=rnd)
        self.rounds.append(entry)
        self.rounds_completed = max(self.rounds_completed, rnd)
        return entry

    def round_or_none(self, rnd: int) -> RoundRecord | None:
        """The entry of round ``rnd``; ``None`` when it has none."""
        return next((e for e in self.rounds if e.round == rnd), None)

    def finish(self) -> None:
        """Order the rounds and set ``rounds_completed`` (at the end of a run)."""
        self.rounds.sort(key=lambda e: e.round)
        self.rounds_completed = max((e.round for e in self.rounds), default=0)

    # ------------------------------------------------------------------ reading it

    def per_site_round(self, key: str) -> dict[str, dict[int, float]]:
        """``site -> round -> value`` of one per-site number of the rounds (``update-norm``,
        ``epsilon``, ``test.auroc``, ...); rounds where a site has none are left out."""
        out: dict[str, dict[int, float]] = {}
        for entry in self.rounds:
            for site_id, values in entry.sites.items():
                if key in values:
                    out.setdefault(site_id, {})[entry.round] = values[key]
        return out

    def config_number(self, key: str) -> float | None:
        """A number of the run config (``max-update-norm``); ``None`` when absent or not a
        number."""
        value = self.config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    # ------------------------------------------------------------------ (de)serializing

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (what the file and a checkpoint hold)."""
        return self.model_dump(mode="json")

    def to_json(self) -> str:
        """The record as indented JSON, keys sorted."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Any, *, source: str) -> RunRecord:
        """Validate a record's data (a file's JSON, a checkpoint's record).

        Parameters
        ----------
        raw:
            The data.
        source:
            What it came from, named in an error (a path).

        Raises
        ------
        ConfigError
            ``raw`` is not a record of a version this fedcare reads; the message names
            ``source`` and every offending field.
        """
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: not a run record (a JSON object); the file is damaged: rerun the "
                "federation"
            )
        version = raw.get("record_version", 1)
        readable = (*OLDER_READABLE_VERSIONS, RECORD_VERSION)
        if isinstance(version, bool) or version not in readable:
            raise ConfigError(
                f"{source}: field record_version: version {version!r} is not one this "
                f"fedcare reads ({', '.join(map(str, readable))}); open it with the fedcare "
                "that wrote it"
            )
        if version == 1:
            raw = _from_version_1(raw)
        elif version in (2, 3):  # 2 lacks only ``groups``, 3 only ``survival``
            raw = {**raw, "record_version": RECORD_VERSION}
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(
                format_validation_error(source, e)
                + "; the run record is damaged or was edited: rerun the federation"
            ) from e


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record as version 2: the fields that fedcare did not write, filled."""
    rounds = raw.get("rounds")
    last = 0
    if isinstance(rounds, list):
        numbers = [r.get("round") for r in rounds if isinstance(r, dict)]
        last = max((n for n in numbers if isinstance(n, int)), default=0)
    return {
        "personalization": "none",
        "rounds_completed": last,
        **raw,
        "record_version": RECORD_VERSION,
    }


def load_run_record(path: Path) -> RunRecord:
    """Read and validate a run's ``server_record.json``.

    Raises
    ------
    ConfigError
        The file is missing, is not JSON (or JSON fedcare never writes: nested too deeply,
        an integer too long to read), or is not a run record of a version this fedcare
        reads; the message names the file (and the field) and the fix.
    """
    path = Path(path)
    raw = read_json_file(
        path,
        fix="the file is damaged or is not a fedcare run's: rerun the federation",
        missing="the server writes it at the end of a run: pass the run directory of a "
        "finished `fedcare simulate` or deployment run",
    )
    return RunRecord.from_dict(raw, source=str(path))


def write_run_record(path: Path, record: RunRecord) -> Path:
    """Write ``record`` to ``path`` atomically (mode 0600), validated first; return ``path``.

    Raises
    ------
    ConfigError
        The record does not validate as a whole (a list changed in place to hold a value
        the model refuses).
    """
    checked = RunRecord.from_dict(record.to_dict(), source=str(path))
    return write_private_atomic(path, checked.to_json().encode("utf-8"))
