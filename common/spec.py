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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.tomlcompat import tomllib

__all__ = [
    "MODALITIES",
    "Modality",
    "Feature",
    "EventFeature",
    "GenomicsSchema",
    "ImagingSchema",
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


class FeatureSchema(_Frozen):
    """The federation-wide feature schema; fixes every encoded vector's width and order."""

    ehr: tuple[Feature, ...] = ()
    events: tuple[EventFeature, ...] = ()
    genomics: GenomicsSchema | None = None
    imaging: ImagingSchema | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSchema:
        names = [f.name for f in self.ehr] + [f.name for f in self.events]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema names a feature more than once: {', '.join(dupes)}")
        return self

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
    """A binary label: ``column`` of ``table``; a row is positive when it equals ``positive``."""

    name: str = Field(min_length=1)
    table: str
    column: str
    positive: int | str = 1
    description: str | None = None


class TaskSpec(_Frozen):
    """A supervised task: a label and the modalities (and optionally EHR features) it reads."""

    name: str = Field(min_length=1)
    label: str
    modalities: tuple[Modality, ...] = Field(min_length=1)
    features: tuple[str, ...] | None = None
    description: str | None = None


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
            unknown = [f for f in task.features or () if f not in feature_names]
            if unknown:
                raise ValueError(
                    f"task {task.name!r} names features not in the schema: {', '.join(unknown)}"
                )
        return self

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
