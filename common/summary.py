"""``summary.json``: the versioned, validated record of one federated run.

Field by field (version 5; the full reference with an example is ``docs/summary-schema.md``)::

    schema_version, run_id, fedcare_version, flwr_version, task, strategy, personalization,
    rounds_planned, rounds_completed,
    sites: [{site_id, n_train, n_test, status, reason, rounds_participated,
             privacy: {enabled, epsilon, run_epsilon, delta, accountant, noise, evaluation,
                       mechanisms: [{noise_multiplier, sample_rate, steps}]},
             metrics: {name: value}, personal_metrics: {name: value}}],
    global: {rounds: [{round, metrics}], final: {name: value},
             calibration: [{bin, mean_predicted, observed, n}]},
    baselines: {local_only: {site_id: {name: value}}, pooled: {name: value}},
    events: [{round, site_id, kind, detail}],
    groups: [{name, column, labels}],
    explanation: {round, features, modalities, n, importance, modality_shares, sites} | null,
    survival: {round, cuts, time_unit, n, at_risk, events, observed, predicted,
               sites: {site_id: {n, observed, predicted}}} | null

A site's ``privacy.epsilon`` is the ε of its dataset's whole ledger history at the end of
the run, earlier runs included (its *lifetime* ε, δ = ``privacy.delta``);
``privacy.run_epsilon`` is what this run added; ``mechanisms`` lists the DP-SGD mechanisms
this run applied, one per round, so an auditor can recompute ε independently.
``privacy.noise`` is ``reproducible`` when the site drew its DP noise from a seed in its own
``site.toml`` instead of OS entropy, and ``privacy.evaluation`` is ``exact`` when it released
evaluation metrics without DP noise: both only ever for simulated sites, and both are stated
wherever the run's results are shown. ``status`` is one of
:data:`SITE_STATUSES`. Metric names are ``<split>.<metric>`` (``test.auroc``); values are
finite floats, because JSON has no NaN or infinity. Per-group metrics
(:mod:`fedcare.models.fairness`) are ``<split>.group.<attribute>.<g>.<metric>`` and
``<split>.gap.<attribute>.<metric>``, where ``g`` indexes ``groups[].labels``.

The JSON key of the global results is ``global``, a Python keyword: the attribute is
``RunSummary.global_`` and every dump uses the alias (``serialize_by_alias``), so
``summary.model_dump()["global"]`` exists and :func:`load_summary` reads it back.

Examples
--------
>>> s = RunSummary.model_validate(
...     {"run_id": "r1", "fedcare_version": "0.1.0", "flwr_version": "1.42.0",
...      "task": "readmission", "strategy": "fedavg", "rounds_planned": 1,
...      "rounds_completed": 1, "sites": [], "global": {"final": {"test.auroc": 0.8}}}
... )
>>> s.global_.final["test.auroc"]
0.8
>>> "global" in s.model_dump()
True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.files import read_json_file, write_private_atomic
from fedcare.common.run_files import RECORD_NAME, SUMMARY_NAME

if TYPE_CHECKING:  # run_record builds on this module's types: imported for annotations only
    from fedcare.common.run_record import RunRecord

__all__ = [
    "RECORD_NAME",
    "SUMMARY_NAME",
    "SCHEMA_VERSION",
    "OLDER_READABLE_VERSIONS",
    "SITE_STATUSES",
    "EVENT_KINDS",
    "ALL_SITES",
    "SiteStatus",
    "EventKind",
    "NOISE_SOURCES",
    "EVALUATION_MODES",
    "NoiseSource",
    "EvaluationMode",
    "Metrics",
    "Mechanism",
    "Privacy",
    "SiteResult",
    "RoundMetrics",
    "CalibrationBin",
    "GlobalResult",
    "Baselines",
    "Event",
    "GroupInfo",
    "Explanation",
    "SiteSurvivalCurve",
    "SurvivalCurves",
    "RunSummary",
    "load_summary",
    "write_summary",
]

#: The version of the schema this module writes (and reads).
SCHEMA_VERSION: Final = 5
#: Older versions :func:`load_summary` still reads: version 1 lacks ``privacy.run_epsilon``,
#: ``privacy.noise`` and ``privacy.evaluation``, which read as null (not recorded); versions
#: 1 and 2 lack ``personalization`` and ``sites[].personal_metrics`` (read as ``none`` and
#: ``{}``: no personal models then); versions 1 to 3 lack ``groups`` (read as ``[]``); versions
#: 1 to 4 lack ``survival`` (read as null: no survival curves then).
OLDER_READABLE_VERSIONS: Final = (1, 2, 3, 4)

SiteStatus = Literal["completed", "refused", "failed", "diverged", "dropped", "rejected"]
#: ``completed``: the site's last round went through. ``refused``: the site declined
#: (privacy budget or its policy) and said why in ``reason``. ``failed``: its round failed
#: after the privacy charge was written (the charge is kept). ``diverged``: its local
#: training diverged (non-finite weights; usually the learning rate), charge kept.
#: ``dropped``: no reply within the round timeout. ``rejected``: the server rejected its
#: update as malformed (shape, dtype, non-finite values, norm bound).
SITE_STATUSES: tuple[str, ...] = get_args(SiteStatus)

EventKind = Literal[
    "refused", "failed", "diverged", "dropped", "rejected", "evaluate-failed", "round-skipped"
]
#: What an :class:`Event` records: the three non-completed site statuses, a site's failed
#: evaluation, and a round the server skipped (too few valid updates; ``site_id`` is ``*``).
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)

NoiseSource = Literal["os-entropy", "reproducible"]
#: Where a site's DP noise came from (``fedcare.common.keys.NOISE_*``): ``os-entropy`` (a real site,
#: always) or ``reproducible`` (a simulated site whose own site.toml seeds its noise).
NOISE_SOURCES: tuple[str, ...] = get_args(NoiseSource)

EvaluationMode = Literal["dp", "exact"]
#: How a site released its evaluation metrics (``fedcare.common.keys.EVAL_*``): ``dp`` (noisy,
#: charged
#: to its ledger) or ``exact`` (a simulated site whose own site.toml asks for it).
EVALUATION_MODES: tuple[str, ...] = get_args(EvaluationMode)

#: ``Event.site_id`` of an event about the whole federation rather than one site.
ALL_SITES = "*"

#: Metric name (``<split>.<metric>``, e.g. ``test.auroc``) -> finite value.
Metrics = dict[str, float]


class _Strict(BaseModel):
    """Frozen, unknown keys rejected, finite floats only, dumps by alias."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        use_attribute_docstrings=True,
    )


class Mechanism(_Strict):
    """One DP-SGD mechanism applied by a site in one round (Poisson-sampled Gaussian)."""

    noise_multiplier: float = Field(gt=0)
    """σ: the noise standard deviation divided by the clipping norm."""
    sample_rate: float = Field(gt=0, le=1)
    """q: the Poisson sampling probability of one record per step."""
    steps: int = Field(ge=1)
    """Number of noisy gradient steps taken with this σ and q."""


class Privacy(_Strict):
    """A site's record-level differential privacy at the end of the run."""

    enabled: bool
    """Whether the site trained with DP-SGD."""
    epsilon: float | None = Field(default=None, ge=0)
    """Lifetime ε: the site's whole ledger history for this dataset (all runs) at δ, after its
    last round of this run; ``None`` if it never trained."""
    run_epsilon: float | None = Field(default=None, ge=0)
    """ε this run added to the dataset (at δ); ``None`` if it never trained or did not say."""
    delta: float | None = Field(default=None, gt=0, lt=1)
    """δ of ``epsilon`` and ``run_epsilon``."""
    accountant: str | None = Field(default=None, min_length=1)
    """Accountant that computed ε (``prv`` or ``rdp``)."""
    noise: NoiseSource | None = None
    """Where the DP noise came from (:data:`NOISE_SOURCES`); ``None``: not reported."""
    evaluation: EvaluationMode | None = None
    """How evaluation metrics were released (:data:`EVALUATION_MODES`); ``None``: not
    reported."""
    mechanisms: tuple[Mechanism, ...] = ()
    """The mechanisms this run applied, in round order."""

    @model_validator(mode="after")
    def _consistent(self) -> Privacy:
        if not self.enabled and (
            self.epsilon is not None
            or self.run_epsilon is not None
            or self.noise is not None
            or self.mechanisms
        ):
            raise ValueError(
                "privacy.enabled is false but epsilon, run_epsilon, noise or mechanisms are "
                "set; set enabled = true or drop them"
            )
        if (self.epsilon is not None or self.run_epsilon is not None) and self.delta is None:
            raise ValueError("epsilon is set without delta; ε means nothing without its δ")
        return self


class SiteResult(_Strict):
    """One site's part in the run."""

    site_id: str = Field(min_length=1)
    """The site's id (``site.toml``)."""
    n_train: int = Field(ge=0)
    """Training examples the site used in its last round."""
    n_test: int = Field(ge=0)
    """Test examples the site evaluated on."""
    status: SiteStatus
    """``completed``, ``refused``, ``dropped`` or ``rejected`` (see :data:`SITE_STATUSES`)."""
    reason: str | None = None
    """Why the site is not ``completed``; required for every other status."""
    rounds_participated: tuple[int, ...] = ()
    """Rounds whose aggregate included this site's update, increasing."""
    privacy: Privacy
    """The site's differential privacy."""
    metrics: Metrics = Field(default_factory=dict)
    """The site's last evaluation of the global model on its own splits."""
    personal_metrics: Metrics = Field(default_factory=dict)
    """The site's last evaluation of its personalized model (the run's ``personalization``)
    on the same splits; empty without one. The site's alone: never part of ``global``."""

    @model_validator(mode="after")
    def _consistent(self) -> SiteResult:
        if self.status != "completed" and not (self.reason and self.reason.strip()):
            raise ValueError(f"status {self.status!r} needs a reason saying why")
        rounds = self.rounds_participated
        if any(r < 1 for r in rounds) or list(rounds) != sorted(set(rounds)):
            raise ValueError(
                f"rounds_participated must be distinct rounds >= 1, increasing; got {list(rounds)}"
            )
        return self


class RoundMetrics(_Strict):
    """Global metrics after ``round`` (round 0: the initial model, before any training)."""

    round: int = Field(ge=0)
    """The round number."""
    metrics: Metrics
    """Patient-weighted mean over the sites of each metric."""


class CalibrationBin(_Strict):
    """One bin of the global model's test calibration curve (from the pooled release)."""

    bin: int = Field(ge=0)
    """The score bin (of ten equal-width bins of the predicted probability)."""
    mean_predicted: float = Field(ge=0, le=1)
    """The bin's mean predicted probability."""
    observed: float = Field(ge=0, le=1)
    """The bin's observed rate of positives."""
    n: float = Field(ge=0)
    """The bin's (noisy, rounded) patient count."""


class GlobalResult(_Strict):
    """The federation's global model, round by round and at the end."""

    rounds: tuple[RoundMetrics, ...] = ()
    """One entry per evaluated round, increasing."""
    final: Metrics = Field(default_factory=dict)
    """Metrics of the final global model (those of the last round)."""
    calibration: tuple[CalibrationBin, ...] = ()
    """The final global model's test calibration curve (the last round's), bins with a
    count of at least 1; empty when not evaluated."""

    @model_validator(mode="after")
    def _increasing(self) -> GlobalResult:
        numbers = [r.round for r in self.rounds]
        if numbers != sorted(set(numbers)):
            raise ValueError(f"rounds must be distinct and increasing; got {numbers}")
        return self


class Baselines(_Strict):
    """Reference points: each site alone, and all data pooled (non-private)."""

    local_only: dict[str, Metrics] = Field(default_factory=dict)
    """Site id -> metrics of a model trained on that site alone."""
    pooled: Metrics = Field(default_factory=dict)
    """Metrics of one model trained on the union of all sites' data."""


class Event(_Strict):
    """Something that went wrong with a site (or a round) during the run."""

    round: int = Field(ge=0)
    """The round it happened in."""
    site_id: str = Field(min_length=1)
    """The site concerned, or ``*`` (:data:`ALL_SITES`) for the whole federation."""
    kind: EventKind
    """What happened (see :data:`EVENT_KINDS`)."""
    detail: str
    """The human-readable cause."""


class GroupInfo(_Strict):
    """A group attribute the run's evaluations could report per-group metrics of."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """The attribute (``[[schema.groups]]`` name), as in ``<split>.group.<name>.<g>.<metric>``."""
    column: str = Field(min_length=1)
    """The EHR column its groups are read from."""
    labels: tuple[str, ...] = Field(min_length=2)
    """The groups, in index order; the last is ``unknown`` (a missing value)."""


class Explanation(_Strict):
    """Feature attributions of the model evaluated in ``round`` (:mod:`fedcare.models.explain`):
    each feature's mean absolute integrated-gradients attribution (clipped per patient, in
    logit units), from the sites' noisy releases."""

    round: int = Field(ge=0)
    """The round whose global model was explained (the run's last)."""
    features: tuple[str, ...]
    """``<modality>:<feature>``, in the schema's order."""
    modalities: tuple[str, ...]
    """Each feature's modality."""
    n: float
    """The noisy number of test patients the global numbers come from (summed over sites)."""
    importance: dict[str, float] = Field(default_factory=dict)
    """Feature -> global importance, from the summed releases; empty when their noisy count
    is below the run's ``site-min-count``."""
    modality_shares: dict[str, float] = Field(default_factory=dict)
    """Modality -> its share of the global importance (sums to 1)."""
    sites: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Site id -> feature -> that site's importance (its own release)."""


def _probabilities(values: tuple[float, ...], what: str) -> tuple[float, ...]:
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"{what} must be survival probabilities in [0, 1]; got {list(values)}")
    return values


class SiteSurvivalCurve(_Strict):
    """One site's survival curves from its own release."""

    n: float
    """Its noisy number of test patients."""
    observed: tuple[float, ...]
    """Kaplan-Meier survival at the first cuts (up to its last released interval)."""
    predicted: tuple[float, ...]
    """The model's mean predicted survival at every cut."""

    @model_validator(mode="after")
    def _in_range(self) -> SiteSurvivalCurve:
        _probabilities(self.observed, "observed")
        _probabilities(self.predicted, "predicted")
        return self


class SurvivalCurves(_Strict):
    """Survival curves of the test patients at the label's cuts, from the sites' noisy
    releases (:mod:`fedcare.models.survival_curves`): the observed Kaplan-Meier curve of the
    pooled life table, and the evaluated model's mean predicted survival."""

    round: int = Field(ge=0)
    """The round whose global model predicted (the run's last)."""
    cuts: tuple[float, ...] = Field(min_length=1)
    """The label's cuts ``t_1 < ... < t_K``: ``observed[k]`` and ``predicted[k]`` are at
    ``cuts[k]``."""
    time_unit: str | None = None
    """The unit of the cuts (the label's ``time_unit``), when declared."""
    n: float
    """The noisy number of test patients of all releases together."""
    at_risk: tuple[float, ...] = ()
    """Pooled noisy number at risk at the start of each interval the curve covers."""
    events: tuple[float, ...] = ()
    """Pooled noisy events in each of those intervals."""
    observed: tuple[float, ...] = ()
    """Kaplan-Meier survival at ``cuts[0..L-1]``; it stops where fewer than ``site-min-count``
    patients were at risk."""
    predicted: tuple[float, ...] = ()
    """Mean predicted survival at every cut."""
    sites: dict[str, SiteSurvivalCurve] = Field(default_factory=dict)
    """Site id -> its own curves (sites whose release was withheld are absent)."""

    @model_validator(mode="after")
    def _consistent(self) -> SurvivalCurves:
        _probabilities(self.observed, "observed")
        _probabilities(self.predicted, "predicted")
        k = len(self.cuts)
        sizes = {len(self.at_risk), len(self.events), len(self.observed)}
        if len(sizes) != 1 or len(self.observed) > k or len(self.predicted) not in (0, k):
            raise ValueError(
                f"survival curves: {len(self.at_risk)} at-risk, {len(self.events)} event and "
                f"{len(self.observed)} observed values, {len(self.predicted)} predicted, for "
                f"{k} cuts"
            )
        return self


class RunSummary(_Strict):
    """The whole ``summary.json`` of one run (schema :data:`SCHEMA_VERSION`)."""

    schema_version: Literal[5] = SCHEMA_VERSION
    """Version of this schema; a reader refuses a version it does not know."""
    run_id: str = Field(min_length=1)
    """The run's id."""
    fedcare_version: str
    """fedcare's version that ran the federation."""
    flwr_version: str
    """Flower's version that ran the federation."""
    task: str = Field(min_length=1)
    """The task trained (``fedcare.models.tasks``)."""
    strategy: str = Field(min_length=1)
    """The aggregation strategy (``fedavg``, ``fedprox``, ...)."""
    personalization: str = Field(default="none", min_length=1)
    """How sites kept personal models (``none``, ``finetune``, ``fedper``, ``ditto``)."""
    rounds_planned: int = Field(ge=1)
    """Rounds the run was configured for."""
    rounds_completed: int = Field(ge=0)
    """The last round the run reached."""
    sites: tuple[SiteResult, ...]
    """Every site that took part, by site id."""
    global_: GlobalResult = Field(alias="global")
    """The global model's results (JSON key ``global``)."""
    baselines: Baselines = Field(default_factory=Baselines)
    """Local-only and pooled reference results."""
    events: tuple[Event, ...] = ()
    """Refusals, drop-outs, rejections and skipped rounds, in order."""
    groups: tuple[GroupInfo, ...] = ()
    """The federation's group attributes (``[[schema.groups]]``): what a per-group metric's
    attribute and group index name."""
    explanation: Explanation | None = None
    """Feature attributions of the final model, when the run asked for them (``explain``)."""
    survival: SurvivalCurves | None = None
    """Observed and predicted survival curves of a survival task's final model."""

    @model_validator(mode="after")
    def _consistent(self) -> RunSummary:
        if self.rounds_completed > self.rounds_planned:
            raise ValueError(
                f"rounds_completed ({self.rounds_completed}) exceeds rounds_planned "
                f"({self.rounds_planned})"
            )
        ids = [s.site_id for s in self.sites]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise ValueError(f"site_id {', '.join(duplicated)} appears more than once in sites")
        beyond = [r.round for r in self.global_.rounds if r.round > self.rounds_planned]
        if beyond:
            raise ValueError(
                f"global.rounds has round(s) {beyond} beyond rounds_planned={self.rounds_planned}"
            )
        return self

    @classmethod
    def from_record(
        cls,
        record: RunRecord,
        *,
        fedcare_version: str,
        flwr_version: str,
        baselines: Mapping[str, Any] | None = None,
    ) -> RunSummary:
        """The summary of the run ``record`` describes (``server_record.json``).

        Sites are listed by site id, rounds in order; a site's mechanisms keep the round
        order and drop their round number; the final metrics are the last round's.

        Parameters
        ----------
        record:
            The server's run record.
        fedcare_version, flwr_version:
            The versions that ran the federation.
        baselines:
            ``{"local_only": {site_id: metrics}, "pooled": metrics}``; default: empty.

        Raises
        ------
        pydantic.ValidationError
            The record does not make a valid summary (say, a site not completed without a
            reason).
        """
        rounds = sorted(record.rounds, key=lambda e: e.round)
        sites = []
        for site_id in sorted(record.sites):
            site = record.sites[site_id].model_dump(mode="json")
            mechanisms = sorted(site["privacy"]["mechanisms"], key=lambda m: m["round"])
            site["privacy"]["mechanisms"] = [
                {k: m[k] for k in Mechanism.model_fields} for m in mechanisms
            ]
            sites.append(site)
        return cls.model_validate(
            {
                "run_id": record.run_id,
                "fedcare_version": fedcare_version,
                "flwr_version": flwr_version,
                "task": record.task,
                "strategy": record.strategy,
                "personalization": record.personalization,
                "rounds_planned": record.rounds_planned,
                "rounds_completed": record.rounds_completed,
                "sites": sites,
                "global": {
                    "rounds": [{"round": e.round, "metrics": e.metrics} for e in rounds],
                    "final": rounds[-1].metrics if rounds else {},
                    "calibration": [
                        c.model_dump(mode="json")
                        for c in (rounds[-1].calibration if rounds else [])
                    ],
                },
                "baselines": dict(baselines) if baselines else {"local_only": {}, "pooled": {}},
                "events": [e.model_dump(mode="json") for e in record.events],
                "groups": [g.model_dump(mode="json") for g in record.groups],
                "explanation": (
                    None
                    if record.explanation is None
                    else record.explanation.model_dump(mode="json")
                ),
                "survival": (
                    None if record.survival is None else record.survival.model_dump(mode="json")
                ),
            }
        )

    def to_json(self) -> str:
        """The summary as indented JSON, keyed by alias (``global``)."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2)


def write_summary(summary: RunSummary, path: Path) -> None:
    """Write ``summary.json`` atomically: a reader sees the old file or the new, never half.

    Parameters
    ----------
    summary:
        The validated summary.
    path:
        Destination; its folder is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_atomic(path, summary.to_json().encode("utf-8"))


def load_summary(path: Path) -> RunSummary:
    """Read and validate a ``summary.json``.

    Parameters
    ----------
    path:
        The file.

    Returns
    -------
    RunSummary
        The validated summary.

    Raises
    ------
    ConfigError
        The file is missing, is not JSON (or JSON fedcare never writes: nested too deeply,
        an integer too long to read), has a schema version this fedcare does not read, or
        does not match the schema; the message names the file and every offending field.

    Notes
    -----
    A version-1 file (:data:`OLDER_READABLE_VERSIONS`) reads as the current version with
    ``privacy.run_epsilon``, ``privacy.noise`` and ``privacy.evaluation`` null: that fedcare
    did not record them. A version-1 or 2 file reads with ``personalization`` ``none`` and
    every ``personal_metrics`` empty (that fedcare kept no personal models).
    """
    path = Path(path)
    raw: Any = read_json_file(
        path,
        fix="the file is damaged or is not a fedcare run's: rewrite it with write_summary or rerun",
        missing="a finished run writes summary.json into its run directory",
    )
    if isinstance(raw, dict) and "schema_version" in raw:
        version = raw["schema_version"]
        readable = (*OLDER_READABLE_VERSIONS, SCHEMA_VERSION)
        if isinstance(version, bool) or version not in readable:
            raise ConfigError(
                f"{path}: field schema_version: version {version!r} is not one this fedcare "
                f"reads ({', '.join(map(str, readable))}); open it with the fedcare that wrote it"
            )
        raw = {**raw, "schema_version": SCHEMA_VERSION}  # older versions lack only optionals
    try:
        return RunSummary.model_validate(raw, by_alias=True, by_name=False)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from e
