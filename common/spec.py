"""The dataset spec: what a site holds, and the feature schema every site shares.

A site's data folder carries a ``site.toml`` that names its files (EHR table, optional
longitudinal events, imaging folder and labels table, genomics matrix), the patient-id
column, label definitions, tasks, and the feature schema. The schema is shared by every
site of a federation: it fixes the encoded feature vector (its width and order), so two
sites that agree on :func:`FeatureSchema.fingerprint` encode patients identically.

Paths in a spec are relative to the folder that holds ``site.toml``.

Example ``site.toml``::

    spec_version = 1
    site_id = "site-0"
    patient_id = "patient_id"

    [ehr]
    table = "ehr.csv"
    events = "events.csv"

    [[labels]]
    name = "readmission"
    table = "ehr.csv"
    column = "readmission_30d"
    positive = 1

    [[tasks]]
    name = "readmission"
    label = "readmission"
    modalities = ["ehr"]

    [[schema.ehr]]
    name = "age"
    kind = "numeric"
    unit = "years"
    min = 0
    max = 120
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.tomlcompat import tomllib

__all__ = [
    "MODALITIES",
    "Modality",
    "Feature",
    "EventFeature",
    "GenomicsSchema",
    "ImagingSchema",
    "GroupAttribute",
    "MAX_GROUP_ATTRIBUTES",
    "MAX_GROUPS",
    "TimelineCode",
    "TimelineSchema",
    "TIME_UNIT_SECONDS",
    "FeatureSchema",
    "EHRFiles",
    "ImagingFiles",
    "GenomicsFiles",
    "LabelSpec",
    "TaskSpec",
    "SplitSpec",
    "SimulationSpec",
    "SiteSpec",
    "SPEC_FILENAME",
    "load_site_spec",
    "format_validation_error",
    "schema_differences",
    "describe_schema_difference",
]

SPEC_FILENAME = "site.toml"
MODALITIES: tuple[str, ...] = ("ehr", "imaging", "genomics")
Modality = Literal["ehr", "imaging", "genomics"]


class _Frozen(BaseModel):
    """Immutable, strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Feature(_Frozen):
    """One column of the per-patient EHR table.

    ``numeric`` features may carry an allowed ``[min, max]`` range; ``categorical`` ones
    list their ``categories`` (one-hot in this order); ``binary`` ones take 0 or 1.
    """

    name: str = Field(min_length=1)
    kind: Literal["numeric", "categorical", "binary"]
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> Feature:
        if self.kind == "categorical":
            if not self.categories:
                raise ValueError(
                    f"categorical feature {self.name!r} needs a non-empty 'categories' list"
                )
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"feature {self.name!r} lists a category twice")
        elif self.categories is not None:
            raise ValueError(
                f"feature {self.name!r} is {self.kind}; only categorical features take 'categories'"
            )
        if self.kind != "numeric" and (self.min is not None or self.max is not None):
            raise ValueError(f"feature {self.name!r}: only numeric features take 'min'/'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name!r}: min {self.min} is above max {self.max}")
        return self


class EventFeature(_Frozen):
    """A per-patient feature aggregated from longitudinal events with one ``code``."""

    name: str = Field(min_length=1)
    code: str = Field(min_length=1)
    agg: Literal["mean", "min", "max", "last", "count"]
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    description: str | None = None


class GenomicsSchema(_Frozen):
    """Columns of the patients x genes (or variants) matrix, in encoding order."""

    kind: Literal["expression", "dosage"]
    features: tuple[str, ...] = Field(min_length=1)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> GenomicsSchema:
        if len(set(self.features)) != len(self.features):
            raise ValueError("genomics features list a gene/variant twice")
        return self


class ImagingSchema(_Frozen):
    """Every image is one 2-D grey-level array of ``shape`` (height, width)."""

    shape: tuple[int, int]

    @model_validator(mode="after")
    def _check(self) -> ImagingSchema:
        if min(self.shape) < 4:
            raise ValueError(f"imaging shape {self.shape} is too small; use at least 4x4")
        return self


TimeUnit = Literal["seconds", "minutes", "hours", "days", "weeks"]

#: Seconds per :data:`TimeUnit` (ISO-8601 event times are converted with these).
TIME_UNIT_SECONDS: dict[str, float] = {
    "seconds": 1.0,
    "minutes": 60.0,
    "hours": 3600.0,
    "days": 86400.0,
    "weeks": 604800.0,
}


class TimelineCode(_Frozen):
    """One event code a timeline keeps, and the constants that standardise its values.

    A value ``v`` is encoded as ``clip((v - center) / scale, -value_clip, value_clip)``.
    The constants are part of the shared schema (declared, e.g. from reference ranges),
    never fitted on one site's patients: every site encodes identically and nothing about
    a site's patients is needed to build the model.
    """

    code: str = Field(min_length=1)
    center: float = 0.0
    scale: float = Field(default=1.0, gt=0)
    unit: str | None = None
    description: str | None = None


class TimelineSchema(_Frozen):
    """``[[schema.timelines]]``: a patient's event stream kept as a sequence.

    ``codes`` are the event codes kept (in this order they are numbered 1, 2, ...; other
    codes are left out); a patient's ``max_length`` most recent events with those codes
    are kept, in time order. ``time_unit`` is the unit of the events table's numeric times
    (ISO-8601 datetimes are converted into it); a time gap ``dt`` is encoded as
    ``log1p(dt / time_scale)``. See :mod:`fedcare.client.data.sequences`.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    codes: tuple[TimelineCode, ...] = Field(min_length=1)
    max_length: int = Field(ge=1, le=1024)
    time_unit: TimeUnit
    time_scale: float = Field(default=1.0, gt=0)
    value_clip: float = Field(default=5.0, gt=0)
    description: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TimelineSchema:
        codes = [c.code for c in self.codes]
        dupes = sorted({c for c in codes if codes.count(c) > 1})
        if dupes:
            raise ValueError(
                f"timeline {self.name!r} lists code(s) {', '.join(dupes)} more than once; "
                "list each code once"
            )
        return self


MAX_GROUP_ATTRIBUTES = 8
"""The most ``[[schema.groups]]`` a schema may declare (each one a Gaussian release more per
private evaluation of a task that reports it, see :mod:`fedcare.models.fairness`)."""

MAX_GROUPS = 16
"""The most groups one attribute may have (its categories, or its cut points + 1)."""


class GroupAttribute(_Frozen):
    """``[[schema.groups]]``: a patient attribute that evaluation reports metrics per group of.

    ``column`` is an EHR feature of the schema. A ``categorical`` one has a group per
    category, a ``binary`` one the groups ``0`` and ``1``; a ``numeric`` one is cut into bands
    at the strictly increasing ``cuts`` (a patient with ``cuts[i-1] <= value < cuts[i]`` is in
    band ``i``). ``labels`` optionally renames the groups (one per group, in order). A patient
    whose value is missing is in a last group, ``unknown``, which every release carries too
    (so the groups always partition the patients). The schema holds which groups exist,
    never who is in them.

    Examples
    --------
    >>> GroupAttribute(name="age_band", column="age", cuts=(50, 70)).group_labels(None)
    ('<50', '50-70', '>=70')
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    column: str = Field(min_length=1)
    cuts: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _check(self) -> GroupAttribute:
        if self.cuts is not None:
            if not self.cuts or any(not math.isfinite(c) for c in self.cuts):
                raise ValueError(f"group {self.name!r}: 'cuts' must be finite numbers")
            if any(b <= a for a, b in zip(self.cuts, self.cuts[1:], strict=False)):
                raise ValueError(
                    f"group {self.name!r}: cuts {list(self.cuts)} must be strictly increasing"
                )
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"group {self.name!r} lists a label twice")
        return self

    def group_labels(self, feature: Feature | None) -> tuple[str, ...]:
        """The attribute's groups in order (without the final ``unknown``)."""
        if self.labels is not None:
            return self.labels
        if self.cuts is not None:
            c = [f"{x:g}" for x in self.cuts]
            middle = (f"{a}-{b}" for a, b in zip(c, c[1:], strict=False))
            return (f"<{c[0]}", *middle, f">={c[-1]}")
        if feature is not None and feature.kind == "categorical" and feature.categories:
            return feature.categories
        return ("0", "1")


def _check_groups(groups: Sequence[GroupAttribute], ehr: Sequence[Feature]) -> None:
    """Each ``[[schema.groups]]`` reads an EHR feature the way its kind allows."""
    if len(groups) > MAX_GROUP_ATTRIBUTES:
        raise ValueError(
            f"[[schema.groups]] declares {len(groups)} attributes; at most "
            f"{MAX_GROUP_ATTRIBUTES} (each costs a private release per evaluation)"
        )
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError("two [[schema.groups]] share a name")
    columns = [g.column for g in groups]
    shared = sorted({c for c in columns if columns.count(c) > 1})
    if shared:
        # Two groupings of one column (e.g. age cut at 50 and at 51) would let a centre
        # subtract one group from another and isolate the patients between their cuts,
        # which each attribute's own small-count suppression cannot see.
        raise ValueError(
            f"two [[schema.groups]] read the column {shared[0]!r}; declare one group "
            "attribute per column (its categories, or one set of cuts)"
        )
    features = {f.name: f for f in ehr}
    for g in groups:
        feature = features.get(g.column)
        if feature is None:
            raise ValueError(
                f"group {g.name!r} reads column {g.column!r}, which is not a [[schema.ehr]] "
                f"feature (EHR features: {', '.join(features) or 'none'})"
            )
        if feature.kind == "numeric" and g.cuts is None:
            raise ValueError(
                f"group {g.name!r}: column {g.column!r} is numeric; give its bands' 'cuts', "
                "e.g. cuts = [50, 70]"
            )
        if feature.kind != "numeric" and g.cuts is not None:
            raise ValueError(
                f"group {g.name!r}: column {g.column!r} is {feature.kind}; only a numeric "
                "column takes 'cuts' (its groups are its categories)"
            )
        n = len(g.cuts) + 1 if g.cuts is not None else len(g.group_labels(feature))
        if g.labels is not None and len(g.labels) != n:
            raise ValueError(
                f"group {g.name!r} has {n} groups but {len(g.labels)} labels; give one "
                "label per group"
            )
        if n > MAX_GROUPS:
            raise ValueError(f"group {g.name!r} has {n} groups; at most {MAX_GROUPS}")


class FeatureSchema(_Frozen):
    """The federation-wide feature schema; fixes every encoded vector's width and order.

    ``groups`` (``[[schema.groups]]``) are the patient attributes evaluation may report
    per-group metrics of (:class:`GroupAttribute`).
    """

    ehr: tuple[Feature, ...] = ()
    events: tuple[EventFeature, ...] = ()
    genomics: GenomicsSchema | None = None
    imaging: ImagingSchema | None = None
    timelines: tuple[TimelineSchema, ...] = ()
    groups: tuple[GroupAttribute, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSchema:
        names = [f.name for f in self.ehr] + [f.name for f in self.events]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema names a feature more than once: {', '.join(dupes)}")
        timelines = [t.name for t in self.timelines]
        if len(set(timelines)) != len(timelines):
            raise ValueError("two [[schema.timelines]] share a name")
        _check_groups(self.groups, self.ehr)
        return self

    @model_serializer(mode="wrap")
    def _without_empty_timelines(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A schema without timelines dumps (and fingerprints) as it did before they existed.
        dumped: dict[str, Any] = handler(self)
        if not self.timelines:
            dumped.pop("timelines", None)
        if not self.groups:  # likewise a schema without [[schema.groups]]
            dumped.pop("groups", None)
        return dumped

    def group(self, name: str) -> GroupAttribute:
        """The group attribute called ``name``; a :class:`ConfigError` lists the declared ones."""
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups) or "none"
        raise ConfigError(f"the schema declares no group {name!r} (declared: {known})")

    def group_labels(self, name: str) -> tuple[str, ...]:
        """The groups of attribute ``name`` in wire order, ``unknown`` (missing value) last."""
        g = self.group(name)
        feature = next((f for f in self.ehr if f.name == g.column), None)
        return (*g.group_labels(feature), "unknown")

    def timeline(self, name: str) -> TimelineSchema:
        """The timeline called ``name``; a :class:`ConfigError` lists the declared ones."""
        for timeline in self.timelines:
            if timeline.name == name:
                return timeline
        known = ", ".join(t.name for t in self.timelines) or "none"
        raise ConfigError(
            f"the schema declares no timeline {name!r} (declared: {known}); add a "
            "[[schema.timelines]] entry to site.toml"
        )

    def fingerprint(self) -> str:
        """SHA-256 of the canonical schema: equal fingerprints encode identically."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class EHRFiles(_Frozen):
    table: str
    events: str | None = None
    max_missing_fraction: float = Field(default=0.0, ge=0.0, le=1.0)


class ImagingFiles(_Frozen):
    folder: str
    labels: str
    file_column: str = "file"
    max_missing_fraction: float = Field(default=0.5, ge=0.0, le=1.0)


class GenomicsFiles(_Frozen):
    matrix: str
    max_missing_fraction: float = Field(default=0.5, ge=0.0, le=1.0)


class LabelSpec(_Frozen):
    """A label: ``column`` of ``table``; a row is positive when it equals ``positive``.

    ``kind = "binary"`` (the default): a binary label. ``kind = "survival"``: a right-censored
    time to event; ``column`` is then the *event* column (``positive``: the event happened,
    any other value: censored, and the site's data checks require 0/1 coding),
    ``time_column`` the time to the event or to censoring (finite, >= 0, in ``time_unit``),
    and ``cuts`` the increasing interval edges ``t_1 < ... < t_K`` of the discrete-time hazard
    model (:mod:`fedcare.models.survival`). The cuts belong to the federation's shared spec,
    like the feature schema: they are chosen from clinical horizons (e.g. yearly), never from
    one site's times.
    """

    name: str = Field(min_length=1)
    table: str
    column: str
    positive: int | str = 1
    description: str | None = None
    kind: Literal["binary", "survival"] = "binary"
    time_column: str | None = None
    cuts: tuple[float, ...] | None = None
    time_unit: str | None = None

    @model_validator(mode="after")
    def _check_kind(self) -> LabelSpec:
        if self.kind == "binary":
            extra = [
                k for k in ("time_column", "cuts", "time_unit") if getattr(self, k) is not None
            ]
            if extra:
                raise ValueError(
                    f"label {self.name!r} is binary; {', '.join(extra)} belong to a survival "
                    'label: set kind = "survival" or remove them'
                )
            return self
        if not self.time_column:
            raise ValueError(
                f"survival label {self.name!r} needs a 'time_column' (time to event or censoring)"
            )
        if self.time_column == self.column:
            raise ValueError(
                f"survival label {self.name!r}: the time column and the event column ('column') "
                "must differ"
            )
        cuts = self.cuts or ()
        if not cuts:
            raise ValueError(
                f"survival label {self.name!r} needs 'cuts', the interval edges of the time "
                "axis (e.g. yearly: [365, 730, 1095])"
            )
        if not all(math.isfinite(c) and c > 0 for c in cuts) or any(
            b <= a for a, b in zip(cuts, cuts[1:], strict=False)
        ):
            raise ValueError(
                f"survival label {self.name!r}: cuts {list(cuts)} must be finite, above 0 and "
                "strictly increasing"
            )
        return self


class TaskSpec(_Frozen):
    """A supervised task: a label and the modalities (and optionally EHR features) it reads.

    ``groups`` names ``[[schema.groups]]`` attributes whose per-group metrics every
    evaluation of the task reports (:mod:`fedcare.models.fairness`).

    ``timeline`` names a ``[[schema.timelines]]`` entry: the task then also reads each
    patient's event stream as a sequence (part of its EHR input; the task must read ``ehr``).
    """

    name: str = Field(min_length=1)
    label: str
    modalities: tuple[Modality, ...] = Field(min_length=1)
    features: tuple[str, ...] | None = None
    description: str | None = None
    groups: tuple[str, ...] = ()
    timeline: str | None = None


class SplitSpec(_Frozen):
    """``[split]``: how this site assigns its patients to train, validation and test.

    The assignment belongs to the site: no run config can move a patient between splits
    (a coordinating centre that chose the split could pick which patients it evaluates on).
    ``seed`` selects the hash-based assignment (``client/data/split.py``); ``fractions`` are
    the ``(train, val, test)`` shares.
    """

    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if not all(f > 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"split fractions {self.fractions} must each be above 0 and sum to 1, "
                "e.g. [0.7, 0.15, 0.15]"
            )
        return self


class SimulationSpec(_Frozen):
    """``[simulation]``: settings only a *simulated* site may carry.

    A simulated site belongs to the experimenter, who may want what a real hospital must
    never grant a coordinating centre; a deployed site refuses to run with this table.

    ``noise_seed``
        Draw DP-SGD's noise and Poisson sampling from generators seeded by this value (and
        the round) instead of the operating system's entropy, so that a run can be repeated
        exactly (every run on this site then draws the same noise in the same round). The
        summary and audit log then say the noise was reproducible.
    ``exact_evaluation``
        Release exact evaluation metrics instead of the differentially private release
        (``models/evaluation.py``) charged to the ledger.
    """

    noise_seed: int | None = None
    exact_evaluation: bool = False


class SiteSpec(_Frozen):
    """The contents of a site's ``site.toml``."""

    spec_version: Literal[1] = 1
    site_id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    patient_id: str = "patient_id"
    ehr: EHRFiles | None = None
    imaging: ImagingFiles | None = None
    genomics: GenomicsFiles | None = None
    labels: tuple[LabelSpec, ...] = ()
    tasks: tuple[TaskSpec, ...] = ()
    feature_schema: FeatureSchema = Field(alias="schema")
    split: SplitSpec = Field(default_factory=SplitSpec)
    simulation: SimulationSpec | None = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this site holds, in canonical order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    @model_validator(mode="after")
    def _consistent(self) -> SiteSpec:
        if not self.modalities:
            raise ValueError(
                "the site declares no modality; add an [ehr], [imaging] or [genomics] table"
            )
        if self.ehr is not None and not self.feature_schema.ehr and not self.feature_schema.events:
            raise ValueError("[ehr] is declared but [[schema.ehr]] lists no feature")
        if self.ehr is not None and self.feature_schema.events and self.ehr.events is None:
            raise ValueError("[[schema.events]] features need an events file: set ehr.events")
        if self.feature_schema.timelines and (self.ehr is None or self.ehr.events is None):
            raise ValueError(
                "[[schema.timelines]] read the events file: declare [ehr] with ehr.events"
            )
        if self.imaging is not None and self.feature_schema.imaging is None:
            raise ValueError("[imaging] is declared but [schema.imaging] (shape) is missing")
        if self.genomics is not None and self.feature_schema.genomics is None:
            raise ValueError("[genomics] is declared but [schema.genomics] is missing")
        label_names = [label.name for label in self.labels]
        if len(set(label_names)) != len(label_names):
            raise ValueError("two [[labels]] share a name")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError("two [[tasks]] share a name")
        feature_names = {f.name for f in self.feature_schema.ehr} | {
            f.name for f in self.feature_schema.events
        }
        for task in self.tasks:
            if task.label not in label_names:
                raise ValueError(
                    f"task {task.name!r} uses label {task.label!r}, which no [[labels]] "
                    f"defines (defined: {', '.join(label_names) or 'none'})"
                )
            timelines = [t.name for t in self.feature_schema.timelines]
            if task.timeline is not None and task.timeline not in timelines:
                raise ValueError(
                    f"task {task.name!r} reads timeline {task.timeline!r}, which no "
                    f"[[schema.timelines]] declares (declared: {', '.join(timelines) or 'none'})"
                )
            if task.timeline is not None and "ehr" not in task.modalities:
                raise ValueError(
                    f"task {task.name!r} reads timeline {task.timeline!r}, part of the EHR "
                    "input: add 'ehr' to its modalities"
                )
            unknown = [f for f in task.features or () if f not in feature_names]
            if unknown:
                raise ValueError(
                    f"task {task.name!r} names features not in the schema: {', '.join(unknown)}"
                )
            self._check_task_groups(task)
        return self

    def _check_task_groups(self, task: TaskSpec) -> None:
        declared = [g.name for g in self.feature_schema.groups]
        unknown = [g for g in task.groups if g not in declared]
        if unknown:
            raise ValueError(
                f"task {task.name!r} reports groups no [[schema.groups]] declares: "
                f"{', '.join(unknown)} (declared: {', '.join(declared) or 'none'})"
            )
        if len(set(task.groups)) != len(task.groups):
            raise ValueError(f"task {task.name!r} lists a group twice")
        if task.groups and self.ehr is None:
            raise ValueError(
                f"task {task.name!r} reports groups, which are read from the EHR table; "
                "the site declares no [ehr]"
            )

    def path_fields(self) -> tuple[tuple[str, str], ...]:
        """Every path this spec names, as ``(field, path)``, in spec order.

        ``field`` is the key as :func:`format_validation_error` spells it
        (``"ehr.table"``, ``"labels.0.table"``); every path must stay inside the site
        folder.
        """
        fields: list[tuple[str, str]] = []
        if self.ehr is not None:
            fields.append(("ehr.table", self.ehr.table))
            if self.ehr.events is not None:
                fields.append(("ehr.events", self.ehr.events))
        if self.imaging is not None:
            fields.append(("imaging.folder", self.imaging.folder))
            fields.append(("imaging.labels", self.imaging.labels))
        if self.genomics is not None:
            fields.append(("genomics.matrix", self.genomics.matrix))
        fields.extend((f"labels.{i}.table", label.table) for i, label in enumerate(self.labels))
        return tuple(fields)

    def task(self, name: str) -> TaskSpec:
        """The task called ``name``; a :class:`ConfigError` lists the known ones."""
        for task in self.tasks:
            if task.name == name:
                return task
        known = ", ".join(t.name for t in self.tasks) or "none"
        raise ConfigError(
            f"site {self.site_id!r} defines no task {name!r} (defined: {known}); "
            f"add a [[tasks]] entry to its {SPEC_FILENAME}"
        )

    def label(self, name: str) -> LabelSpec:
        for label in self.labels:
            if label.name == name:
                return label
        raise ConfigError(f"site {self.site_id!r} defines no label {name!r}")


def load_site_spec(path: str | Path) -> SiteSpec:
    """Read and validate a ``site.toml`` (or the one inside a site folder).

    Raises
    ------
    ConfigError
        When the file is missing, is not TOML, or does not match the spec; the message
        names the file and every offending field.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such file; a site folder needs a {SPEC_FILENAME} "
            "(write one by hand or with `fedcare data synth`)"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
    try:
        return SiteSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(str(path), e)) from e


# --------------------------------------------------------------------------------------
# Naming how two sites' feature schemas differ
# --------------------------------------------------------------------------------------

_LISTED = 8


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _listed(names: Sequence[str]) -> str:
    text = ", ".join(names[:_LISTED])
    if len(names) > _LISTED:
        text += f" and {len(names) - _LISTED} more"
    return text


def _what_it_is(feature: Feature | EventFeature) -> str:
    """``'smoking' (categorical: never, former, current)``: a feature in a few words."""
    if isinstance(feature, EventFeature):
        parts = [f"{feature.agg} of code {feature.code!r}"]
    else:
        parts = [feature.kind]
        if feature.categories:
            parts[0] += f": {', '.join(feature.categories)}"
    if feature.unit:
        parts.append(f"unit {feature.unit!r}")
    return f"{feature.name!r} ({'; '.join(parts)})"


def _changed(
    label: str, a: BaseModel, b: BaseModel, a_name: str, b_name: str, skip: tuple[str, ...] = ()
) -> str | None:
    """``label: unit 'years' in a, 'months' in b and max 120 in a, 1440 in b``, or None."""
    da, db = a.model_dump(), b.model_dump()
    changes = [
        f"{key} {_shown(da[key])} in {a_name}, {_shown(db[key])} in {b_name}"
        for key in da
        if key not in skip and da[key] != db[key]
    ]
    return f"{label}: {' and '.join(changes)}" if changes else None


def _named_differences(
    what: str,
    a_items: Sequence[Feature] | Sequence[EventFeature],
    b_items: Sequence[Feature] | Sequence[EventFeature],
    a_name: str,
    b_name: str,
) -> list[str]:
    a = {f.name: f for f in a_items}
    b = {f.name: f for f in b_items}
    out: list[str] = []
    for mine, theirs, name in ((a, b, a_name), (b, a, b_name)):
        only = [_what_it_is(f) for n, f in mine.items() if n not in theirs]
        if only:
            plural = "s" if len(only) > 1 else ""
            out.append(f"{what}{plural} only in {name}: {_listed(only)}")
    for n, feature in a.items():
        if n in b:
            change = _changed(f"{what} {n!r}", feature, b[n], a_name, b_name, skip=("name",))
            if change is not None:
                out.append(change)
    order_a = [n for n in a if n in b]
    order_b = [n for n in b if n in a]
    if order_a != order_b:
        out.append(
            f"{what}s in another order (the encoded vector follows it): "
            f"{_listed(order_a)} in {a_name}; {_listed(order_b)} in {b_name}"
        )
    return out


def _genomics_differences(
    a: GenomicsSchema | None, b: GenomicsSchema | None, a_name: str, b_name: str
) -> list[str]:
    if a is None and b is None:
        return []
    if a is None or b is None:
        has, lacks = (a_name, b_name) if b is None else (b_name, a_name)
        return [f"[schema.genomics] only in {has} (none in {lacks})"]
    out: list[str] = []
    change = _changed("genomics", a, b, a_name, b_name, skip=("features",))
    if change is not None:
        out.append(change)
    for mine, theirs, name in ((a, b, a_name), (b, a, b_name)):
        only = [g for g in mine.features if g not in theirs.features]
        if only:
            out.append(f"genomics features only in {name}: {_listed(only)}")
    order_a = [g for g in a.features if g in b.features]
    order_b = [g for g in b.features if g in a.features]
    if order_a != order_b:
        out.append(
            f"genomics features in another order: {_listed(order_a)} in {a_name}; "
            f"{_listed(order_b)} in {b_name}"
        )
    return out


def _imaging_differences(
    a: ImagingSchema | None, b: ImagingSchema | None, a_name: str, b_name: str
) -> list[str]:
    if a is None and b is None:
        return []
    if a is None or b is None:
        has, lacks = (a_name, b_name) if b is None else (b_name, a_name)
        return [f"[schema.imaging] only in {has} (none in {lacks})"]
    if a.shape != b.shape:
        return [
            f"imaging shape {a.shape[0]}x{a.shape[1]} in {a_name}, "
            f"{b.shape[0]}x{b.shape[1]} in {b_name}"
        ]
    return []


def _entry_differences(
    what: str,
    a: Sequence[GroupAttribute] | Sequence[TimelineSchema],
    b: Sequence[GroupAttribute] | Sequence[TimelineSchema],
    a_name: str,
    b_name: str,
    *,
    ordered: bool,
) -> list[str]:
    """Named schema entries (``[[schema.groups]]``, ``[[schema.timelines]]``) only on one
    side or changed; with ``ordered``, the same names in another order too (a group's index
    is its place)."""
    mine, theirs = {e.name: e for e in a}, {e.name: e for e in b}
    out = [
        f"{what} {n!r} only in {name}"
        for x, y, name in ((mine, theirs, a_name), (theirs, mine, b_name))
        for n in x
        if n not in y
    ]
    for n, entry in mine.items():
        if n in theirs:
            change = _changed(f"{what} {n!r}", entry, theirs[n], a_name, b_name, skip=("name",))
            if change is not None:
                out.append(change)
    if ordered and not out and [e.name for e in a] != [e.name for e in b]:
        out.append(f"{what}s in another order in {a_name} and {b_name}")
    return out


def schema_differences(
    a: FeatureSchema, b: FeatureSchema, *, a_name: str = "a", b_name: str = "b"
) -> list[str]:
    """Every way two feature schemas differ, one phrase each; empty when they are equal.

    EHR and event features are matched by name: a feature only one schema has is named
    with its kind, categories and unit; a feature both have is listed with each property
    that differs (kind, unit, min, max, categories, code, aggregation, description).
    Genomics and imaging schemas are compared field by field, and a different feature
    order is reported too (it changes the encoded vector).

    Examples
    --------
    >>> a = FeatureSchema(ehr=(Feature(name="age", kind="numeric", unit="years"),))
    >>> b = FeatureSchema(ehr=(Feature(name="age", kind="numeric", unit="months"),
    ...                        Feature(name="smoker", kind="binary")))
    >>> for line in schema_differences(a, b, a_name="site-0", b_name="site-1"):
    ...     print(line)
    EHR feature only in site-1: 'smoker' (binary)
    EHR feature 'age': unit 'years' in site-0, 'months' in site-1
    """
    return [
        *_named_differences("EHR feature", a.ehr, b.ehr, a_name, b_name),
        *_named_differences("event feature", a.events, b.events, a_name, b_name),
        *_genomics_differences(a.genomics, b.genomics, a_name, b_name),
        *_imaging_differences(a.imaging, b.imaging, a_name, b_name),
        *_entry_differences("timeline", a.timelines, b.timelines, a_name, b_name, ordered=False),
        *_entry_differences("group", a.groups, b.groups, a_name, b_name, ordered=True),
    ]


def describe_schema_difference(
    a: FeatureSchema,
    b: FeatureSchema,
    *,
    a_name: str = "a",
    b_name: str = "b",
    limit: int = 10,
) -> str:
    """How two feature schemas differ, feature by feature, in one line.

    Parameters
    ----------
    a, b:
        The schemas (``spec.feature_schema``).
    a_name, b_name:
        What to call each in the text (``"site-0"``, ``"the federation's schema"``).
    limit:
        At most this many differences are spelled out; the rest are counted.

    Returns
    -------
    str
        The differences joined by ``"; "`` (see :func:`schema_differences`), or
        ``"the feature schemas are identical"``.

    Examples
    --------
    >>> a = FeatureSchema(ehr=(Feature(name="sex", kind="categorical", categories=("F", "M")),))
    >>> b = FeatureSchema(ehr=(Feature(name="sex", kind="categorical", categories=("M", "F")),))
    >>> describe_schema_difference(a, b, a_name="site-0", b_name="site-1")
    "EHR feature 'sex': categories ['F', 'M'] in site-0, ['M', 'F'] in site-1"
    """
    found = schema_differences(a, b, a_name=a_name, b_name=b_name)
    if not found:
        return "the feature schemas are identical"
    text = "; ".join(found[:limit])
    if len(found) > limit:
        text += f"; and {len(found) - limit} more difference(s)"
    return text
