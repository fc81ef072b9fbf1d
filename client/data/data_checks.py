"""Validation of a site's data folder against its ``site.toml``: every problem, at once.

:func:`validate_site` runs every registered check and collects every problem before
reporting; nothing stops at the first one. A :class:`DataProblem` names the file, the column
and the first offending row (1-based data row: row 1 is the first row under the header),
says what is wrong and how to fix it. Row lists are capped (the first
:data:`ROWS_SHOWN` rows and a count), and so is the number of problems of one kind in
one file (:data:`PROBLEMS_PER_GROUP`), so a million-row file gives a readable report.

The report is local to the site's own machine: messages show row numbers and, for a
schema check, the offending cell value; nothing else about a patient.

Checks are registered with :func:`_check`, in the order they run; each reads the files
through one :class:`~fedcare.client.data.files.SiteFiles`, so every file is parsed once.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import ValidationError

from fedcare.client.data.events import EVENT_COLUMNS, aggregate_events, parse_events
from fedcare.client.data.files import CONFINEMENT_FIX, PathOutsideSite, SiteFiles, normalize_relpath
from fedcare.client.data.fingerprint import image_paths, spec_tables
from fedcare.client.data.survival_labels import survival_label_problems, survival_values
from fedcare.client.data.tables import (
    TableLayoutError,
    as_text,
    binary_label,
    columns_to_numbers,
    ends_with_newline,
    to_numbers,
)
from fedcare.common.errors import DataError, validation_problems
from fedcare.common.spec import MODALITIES, SPEC_FILENAME, Feature, SiteSpec
from fedcare.common.tomlcompat import tomllib

__all__ = [
    "ROWS_SHOWN",
    "PROBLEMS_PER_GROUP",
    "RULES",
    "Severity",
    "DataProblem",
    "SiteSummary",
    "ValidationReport",
    "validate_site",
    "validate_and_open",
]

ROWS_SHOWN = 5
PROBLEMS_PER_GROUP = 10
Severity = Literal["error", "warning"]

RULES: dict[str, str] = {
    "spec": "site.toml is missing, is not TOML, or does not match the spec",
    "outside_site": "a path in site.toml leads outside the site folder, or to a special file",
    "missing_file": "a file named by site.toml does not exist",
    "unreadable_file": "a table cannot be parsed as CSV/Parquet",
    "torn_row": "a CSV row has fewer (or more) fields than the header: a file cut mid-row",
    "separator": "a CSV is separated by ';', tabs or '|' instead of commas",
    "no_final_newline": "a CSV does not end with a newline: its last cell may be cut (warning)",
    "missing_column": "a column the spec needs is absent",
    "extra_column": "a column the spec does not use (warning: ignored)",
    "missing_id": "a row has no patient id",
    "duplicate_id": "a patient id appears on more than one row",
    "not_numeric": "a numeric cell is not a number",
    "out_of_range": "a value lies outside the schema's [min, max]",
    "unknown_category": "a categorical value is not one of the schema's categories",
    "not_binary": "a binary cell is not 0 or 1",
    "non_finite": "a value is +inf or -inf",
    "label_classes": "a label has one class only, or no labelled patient",
    "image_missing": "an image listed in the imaging labels table does not exist",
    "image_outside": "an image path leads outside the site folder, or to a special file",
    "image_unreadable": "an image file cannot be decoded",
    "image_shape": "an image does not have the schema's shape",
    "empty_site": "the site has no patient",
    "coverage": "more patients lack a modality than its max_missing_fraction allows",
    "event_time": "an event's time is missing or is neither a number nor an ISO datetime",
    "event_code": "an event has no code",
    "event_value": "an event's value is not a number",
    "event_unknown_patient": "events of patients absent from the EHR table (warning: ignored)",
    "event_code_absent": "no event carries a schema feature's code (warning)",
    "timeline_code_absent": "no event carries a code a schema timeline keeps (warning)",
    "more": "more problems of one kind in one file than the report lists",
}


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a site's files.

    Attributes
    ----------
    severity:
        ``"error"`` blocks loading; ``"warning"`` does not.
    file:
        Path relative to the site folder (``site.toml`` for spec problems).
    column:
        The column (or spec field) concerned, if any.
    row:
        The first offending 1-based data row, if any.
    message:
        What is wrong.
    fix:
        How to fix it.
    rule:
        The rule's key in :data:`RULES`.
    """

    severity: Severity
    file: str
    column: str | None
    row: int | None
    message: str
    fix: str
    rule: str = ""


@dataclass(frozen=True)
class SiteSummary:
    """Counts for the report: no patient-level value.

    ``modalities`` maps each declared modality to its number of patients;
    ``labels`` maps each label to ``(positives, labelled patients)``.
    """

    site_id: str | None
    patients: int
    modalities: dict[str, int] = field(default_factory=dict)
    labels: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidationReport:
    """Every problem found in one site folder, and a summary of what it holds."""

    path: Path
    spec: SiteSpec | None
    problems: tuple[DataProblem, ...]
    summary: SiteSummary

    @property
    def errors(self) -> tuple[DataProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[DataProblem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "path": str(self.path),
            "site_id": self.summary.site_id,
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "problems": [asdict(p) for p in self.problems],
            "summary": {
                "patients": self.summary.patients,
                "modalities": dict(self.summary.modalities),
                "labels": {
                    name: {"positives": pos, "labelled": n}
                    for name, (pos, n) in self.summary.labels.items()
                },
            },
        }


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


def _show(value: object, limit: int = 24) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rows(indices: Sequence[int] | np.ndarray, values: Sequence[object] | None = None) -> str:
    """``rows 3 ('abc'), 7 ('x') and 12 more`` from 0-based indices."""
    indices = [int(i) for i in indices]
    shown = []
    for k, i in enumerate(indices[:ROWS_SHOWN]):
        item = str(i + 1)
        if values is not None:
            item += f" ({_show(values[k])})"
        shown.append(item)
    word = "row" if len(indices) == 1 else "rows"
    text = f"{word} {', '.join(shown)}"
    if len(indices) > ROWS_SHOWN:
        text += f" and {len(indices) - ROWS_SHOWN} more"
    return text


def _names(names: Sequence[str], limit: int = 8) -> str:
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += f" and {len(names) - limit} more"
    return text


def _plural(n: int, word: str, verb: str | None = None) -> str:
    """``1 cell is`` / ``3 cells are``: a count, its noun and (optionally) a verb agreeing."""
    text = f"{n} {word}" if n == 1 else f"{n} {word}s"
    if verb is None:
        return text
    plural_verbs = {
        "is": "are",
        "has": "have",
        "does": "do",
        "falls": "fall",
        "holds": "hold",
        "repeats": "repeat",
    }
    return f"{text} {verb if n == 1 else plural_verbs[verb]}"


def _close(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --------------------------------------------------------------------------------------
# The per-call state checks share
# --------------------------------------------------------------------------------------


class _Context:
    """What one validation run knows: the spec, the files, and what it found."""

    def __init__(self, spec: SiteSpec, files: SiteFiles) -> None:
        self.spec = spec
        self.files = files
        self.problems: list[DataProblem] = []
        # modality -> ids of patients holding it (only for modalities whose table read).
        self.present: dict[str, set[str]] = {}
        self.label_ids: set[str] = set()
        self.label_stats: dict[str, tuple[int, int]] = {}
        # normalised paths from site.toml that lead outside the site (already reported).
        self.refused: set[str] = set()

    def add(
        self,
        rule: str,
        file: str,
        message: str,
        fix: str,
        *,
        column: str | None = None,
        row: int | None = None,
        severity: Severity = "error",
    ) -> None:
        self.problems.append(
            DataProblem(
                severity=severity,
                file=file,
                column=column,
                row=row,
                message=message,
                fix=fix,
                rule=rule,
            )
        )

    def relative(self, message: str) -> str:
        """A reader's message with the site folder stripped from its paths."""
        return message.replace(f"{self.files.root}/", "")

    def table(self, relpath: str) -> pd.DataFrame | None:
        """The table, or None when it is missing/unreadable (already reported)."""
        try:
            table = self.files.table(relpath)
        except DataError:
            return None
        return table if self.spec.patient_id in table.columns else None

    def valid_ids(self, table: pd.DataFrame) -> pd.Series:
        ids = table[self.spec.patient_id]
        return ids[ids.notna()]


_Checker = Callable[[_Context], None]
_CHECKS: list[tuple[str, _Checker]] = []


def _check(name: str) -> Callable[[_Checker], _Checker]:
    """Register a check; checks run in registration order."""

    def decorate(fn: _Checker) -> _Checker:
        _CHECKS.append((name, fn))
        return fn

    return decorate


# --------------------------------------------------------------------------------------
# Cell-level checks shared by EHR, events and genomics
# --------------------------------------------------------------------------------------


def _check_numbers(
    ctx: _Context,
    *,
    file: str,
    column: str,
    cells: pd.Series,
    lo: float | None,
    hi: float | None,
    what: str = "",
    rows: np.ndarray | None = None,
    numbers: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Report non-numbers, infinities and out-of-range values; return the floats.

    ``rows`` maps positions in ``cells`` to table rows (0-based) when ``cells`` is a
    subset of the table. ``numbers`` is :func:`to_numbers` of ``cells`` where the caller
    converted many columns at once (:func:`columns_to_numbers`).
    """
    values, invalid = to_numbers(cells) if numbers is None else numbers
    raw = cells.tolist()
    where = np.arange(len(values)) if rows is None else np.asarray(rows)
    label = what or f"column {column!r}"
    if invalid.any():
        idx = np.flatnonzero(invalid)
        ctx.add(
            "not_numeric",
            file,
            f"{label} is numeric but has {_plural(len(idx), 'non-numeric cell')}: "
            f"{_rows(where[idx], [raw[i] for i in idx])}",
            "write a number (decimal point '.') or leave the cell empty for a missing value",
            column=column,
            row=int(where[idx[0]]) + 1,
        )
    infinite = np.isinf(values)
    if infinite.any():
        idx = np.flatnonzero(infinite)
        ctx.add(
            "non_finite",
            file,
            f"{label} holds {_plural(len(idx), 'infinite value')}: "
            f"{_rows(where[idx], [raw[i] for i in idx])}",
            "replace inf/-inf by the real measurement, or leave the cell empty (missing)",
            column=column,
            row=int(where[idx[0]]) + 1,
        )
    finite = np.isfinite(values)
    outside = np.zeros(len(values), dtype=bool)
    if lo is not None:
        outside |= finite & (values < lo)
    if hi is not None:
        outside |= finite & (values > hi)
    if outside.any():
        idx = np.flatnonzero(outside)
        bounds = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        ctx.add(
            "out_of_range",
            file,
            f"{label} allows {bounds} but {_plural(len(idx), 'value', 'falls')} outside: "
            f"{_rows(where[idx], [raw[i] for i in idx])}",
            "correct the values (check the unit), or widen min/max in the schema if they "
            "are genuine",
            column=column,
            row=int(where[idx[0]]) + 1,
        )
    return values


def _check_categorical(ctx: _Context, file: str, feature: Feature, cells: pd.Series) -> None:
    text = as_text(cells)
    allowed = set(feature.categories or ())
    unknown = text.notna().to_numpy() & ~text.isin(allowed).to_numpy()
    if unknown.any():
        idx = np.flatnonzero(unknown)
        ctx.add(
            "unknown_category",
            file,
            f"column {feature.name!r} takes {_names(list(feature.categories or ()))} but "
            f"{_plural(len(idx), 'cell', 'holds')} other values: "
            f"{_rows(idx, [text.iloc[i] for i in idx])}",
            "map the values onto the schema's categories (exact spelling), leave the cell "
            "empty, or add the category to the schema at every site",
            column=feature.name,
            row=int(idx[0]) + 1,
        )


def _check_binary(ctx: _Context, file: str, feature: Feature, cells: pd.Series) -> None:
    values, invalid = to_numbers(cells)
    raw = cells.tolist()
    bad = invalid | (~np.isnan(values) & (values != 0.0) & (values != 1.0))
    if bad.any():
        idx = np.flatnonzero(bad)
        ctx.add(
            "not_binary",
            file,
            f"column {feature.name!r} is binary but {_plural(len(idx), 'cell', 'is')} not 0 or 1: "
            f"{_rows(idx, [raw[i] for i in idx])}",
            "write 1 (yes) or 0 (no), or leave the cell empty for a missing value",
            column=feature.name,
            row=int(idx[0]) + 1,
        )


def _check_numeric_feature(ctx: _Context, file: str, feature: Feature, cells: pd.Series) -> None:
    _check_numbers(ctx, file=file, column=feature.name, cells=cells, lo=feature.min, hi=feature.max)


_FEATURE_CHECKS: dict[str, Callable[[_Context, str, Feature, pd.Series], None]] = {
    "numeric": _check_numeric_feature,
    "categorical": _check_categorical,
    "binary": _check_binary,
}


def _missing_column(ctx: _Context, file: str, column: str, table: pd.DataFrame, what: str) -> None:
    ctx.add(
        "missing_column",
        file,
        f"no column {column!r}{_close(column, table.columns)}; {what}",
        f"add a {column!r} column, or fix the name in site.toml",
        column=column,
    )


# --------------------------------------------------------------------------------------
# The checks, in the order they run
# --------------------------------------------------------------------------------------


def _used_columns(spec: SiteSpec) -> dict[str, set[str]]:
    """Table -> the columns the spec reads from it."""
    used: dict[str, set[str]] = defaultdict(lambda: {spec.patient_id})
    if spec.ehr is not None:
        used[normalize_relpath(spec.ehr.table)].update(f.name for f in spec.feature_schema.ehr)
        if spec.ehr.events is not None:
            used[normalize_relpath(spec.ehr.events)].update(EVENT_COLUMNS)
    if spec.imaging is not None:
        used[normalize_relpath(spec.imaging.labels)].add(spec.imaging.file_column)
    if spec.genomics is not None and spec.feature_schema.genomics is not None:
        used[normalize_relpath(spec.genomics.matrix)].update(spec.feature_schema.genomics.features)
    for label in spec.labels:
        used[normalize_relpath(label.table)].add(label.column)
        if label.time_column is not None:  # a survival label's times
            used[normalize_relpath(label.table)].add(label.time_column)
    return used


@_check("paths")
def _check_paths(ctx: _Context) -> None:
    """Every path site.toml names stays inside the site folder and is no special file."""
    for name, path in ctx.spec.path_fields():
        try:
            ctx.files.path(path)
        except PathOutsideSite as e:
            ctx.refused.add(normalize_relpath(path))
            ctx.add(
                "outside_site",
                SPEC_FILENAME,
                f"{name} = {path!r} {e.reason}",
                CONFINEMENT_FIX,
                column=name,
            )


@_check("tables")
def _check_tables(ctx: _Context) -> None:
    """Each table exists, parses, has patient ids, each once, and no stray column."""
    spec = ctx.spec
    events = normalize_relpath(spec.ehr.events) if spec.ehr and spec.ehr.events else None
    used = _used_columns(spec)
    for rel in spec_tables(spec):
        if rel in ctx.refused:
            continue
        if not ctx.files.exists(rel):
            ctx.add(
                "missing_file",
                rel,
                "file not found (site.toml names it)",
                "create the file, or fix its path in site.toml (relative to the folder "
                "holding site.toml)",
            )
            continue
        try:
            table = ctx.files.table(rel)
        except TableLayoutError as e:
            ctx.add(e.rule, rel, e.problem, e.fix)
            continue
        except DataError as e:
            ctx.add(
                "unreadable_file",
                rel,
                ctx.relative(str(e)),
                "re-export the table as UTF-8 CSV with a header row, or as Parquet",
            )
            continue
        if rel.lower().endswith(".csv") and not ends_with_newline(ctx.files.path(rel)):
            ctx.add(
                "no_final_newline",
                rel,
                f"the file does not end with a newline, so its last row (data row "
                f"{len(table)}) may have been cut inside its last cell",
                "check that the file was copied completely (compare it with the source), "
                "then end it with a newline",
                row=len(table) or None,
                severity="warning",
            )
        pid = spec.patient_id
        if pid not in table.columns:
            ctx.add(
                "missing_column",
                rel,
                f"no patient-id column {pid!r}{_close(pid, table.columns)} "
                f"(columns found: {_names(list(table.columns))})",
                "add the patient-id column, or set patient_id in site.toml to its name",
                column=pid,
            )
            continue
        ids = table[pid]
        missing = np.flatnonzero(ids.isna().to_numpy())
        if len(missing):
            ctx.add(
                "missing_id",
                rel,
                f"{_plural(len(missing), 'row', 'has')} no patient id: {_rows(missing)}",
                "fill in the patient id or delete the row",
                column=pid,
                row=int(missing[0]) + 1,
            )
        if rel != events:
            dup = ids.notna().to_numpy() & ids.duplicated(keep="first").to_numpy()
            if dup.any():
                idx = np.flatnonzero(dup)
                ctx.add(
                    "duplicate_id",
                    rel,
                    f"{_plural(len(idx), 'row', 'repeats')} a patient id already seen "
                    f"(one row per patient): {_rows(idx, [ids.iloc[i] for i in idx])}",
                    "merge or delete the repeated rows so each patient appears once",
                    column=pid,
                    row=int(idx[0]) + 1,
                )
        extra = [c for c in table.columns if c not in used[rel]]
        if extra:
            ctx.add(
                "extra_column",
                rel,
                f"{_plural(len(extra), 'column')} not in the schema will be ignored: "
                f"{_names(extra)}",
                "nothing to do if intended; otherwise add them to the schema or fix their names",
                severity="warning",
            )


@_check("ehr")
def _check_ehr(ctx: _Context) -> None:
    """EHR columns exist and every cell fits its feature's kind and range."""
    spec = ctx.spec
    if spec.ehr is None:
        return
    rel = normalize_relpath(spec.ehr.table)
    table = ctx.table(rel)
    if table is None:
        return
    ctx.present["ehr"] = set(ctx.valid_ids(table))
    for feature in spec.feature_schema.ehr:
        if feature.name not in table.columns:
            _missing_column(
                ctx, rel, feature.name, table, f"the schema's EHR feature ({feature.kind})"
            )
            continue
        _FEATURE_CHECKS[feature.kind](ctx, rel, feature, table[feature.name])


@_check("events")
def _check_events(ctx: _Context) -> None:
    """Events have a time, a code and a numeric value, and belong to known patients."""
    spec = ctx.spec
    if spec.ehr is None or spec.ehr.events is None:
        return
    rel = normalize_relpath(spec.ehr.events)
    table = ctx.table(rel)
    if table is None:
        return
    absent = [c for c in EVENT_COLUMNS if c not in table.columns]
    for column in absent:
        _missing_column(
            ctx, rel, column, table, "an events table has patient id, time, code, value"
        )
    if absent:
        return
    parsed = parse_events(table, id_column=spec.patient_id)
    frame = parsed.frame
    raw_time = table["time"].tolist()
    if parsed.bad_time.any():
        idx = np.flatnonzero(parsed.bad_time)
        ctx.add(
            "event_time",
            rel,
            f"{_plural(len(idx), 'time')} cannot be parsed as a number or an ISO-8601 datetime: "
            f"{_rows(idx, [raw_time[i] for i in idx])}",
            "use one format for the whole column: numbers (e.g. days) or ISO datetimes "
            "such as 2021-03-04T10:30:00",
            column="time",
            row=int(idx[0]) + 1,
        )
    no_time = np.flatnonzero(frame["time"].isna().to_numpy() & ~parsed.bad_time)
    if len(no_time):
        ctx.add(
            "event_time",
            rel,
            f"{_plural(len(no_time), 'event', 'has')} no time: {_rows(no_time)}",
            "fill in the time of each event, or delete the row",
            column="time",
            row=int(no_time[0]) + 1,
        )
    no_code = np.flatnonzero(frame["code"].isna().to_numpy())
    if len(no_code):
        ctx.add(
            "event_code",
            rel,
            f"{_plural(len(no_code), 'event', 'has')} no code: {_rows(no_code)}",
            "fill in the code of each event, or delete the row",
            column="code",
            row=int(no_code[0]) + 1,
        )
    if parsed.bad_value.any():
        idx = np.flatnonzero(parsed.bad_value)
        raw_value = table["value"].tolist()
        ctx.add(
            "event_value",
            rel,
            f"column 'value' has {_plural(len(idx), 'non-numeric value')}: "
            f"{_rows(idx, [raw_value[i] for i in idx])}",
            "write a number (decimal point '.') or leave the value empty",
            column="value",
            row=int(idx[0]) + 1,
        )
    values = frame["value"].to_numpy()
    infinite = np.flatnonzero(np.isinf(values))
    if len(infinite):
        raw_value = table["value"].tolist()
        ctx.add(
            "non_finite",
            rel,
            f"{_plural(len(infinite), 'event value', 'is')} infinite: "
            f"{_rows(infinite, [raw_value[i] for i in infinite])}",
            "replace inf/-inf by the real measurement, or leave the value empty",
            column="value",
            row=int(infinite[0]) + 1,
        )
    known = ctx.present.get("ehr")
    if known is not None:
        ids = frame["patient_id"]
        in_ehr = pd.Index(list(known), dtype=object).get_indexer(ids.astype(object)) >= 0
        stray = np.flatnonzero(ids.notna().to_numpy() & ~in_ehr)
        if len(stray):
            n_patients = ids.iloc[stray].nunique()
            ctx.add(
                "event_unknown_patient",
                rel,
                f"{_plural(len(stray), 'event')} of {_plural(n_patients, 'patient')} absent from "
                f"{spec.ehr.table} will be ignored: {_rows(stray)}",
                f"add those patients to {spec.ehr.table}, or drop their events",
                column=spec.patient_id,
                row=int(stray[0]) + 1,
                severity="warning",
            )
    codes = set(frame["code"].dropna())
    for timeline in spec.feature_schema.timelines:
        absent = [c.code for c in timeline.codes if c.code not in codes]
        if absent:
            ctx.add(
                "timeline_code_absent",
                rel,
                f"no event has code(s) {', '.join(map(repr, absent))}, which timeline "
                f"{timeline.name!r} keeps, so no timeline holds them",
                "check the codes' spelling in [[schema.timelines]] and in the events table",
                column="code",
                severity="warning",
            )
    seen_ranges: set[tuple[str, float | None, float | None]] = set()
    for feature in spec.feature_schema.events:
        if feature.code not in codes:
            ctx.add(
                "event_code_absent",
                rel,
                f"no event has code {feature.code!r}, so feature {feature.name!r} is missing "
                "for every patient",
                "check the code's spelling in the schema and in the events table",
                column="code",
                severity="warning",
            )
            continue
        if feature.min is None and feature.max is None:
            continue
        if feature.agg == "count":
            counts = aggregate_events(frame, [feature], patient_ids=sorted(known or ()))
            n = counts[feature.name].to_numpy()
            outside = np.zeros(len(n), dtype=bool)
            if feature.min is not None:
                outside |= n < feature.min
            if feature.max is not None:
                outside |= n > feature.max
            if outside.any():
                ctx.add(
                    "out_of_range",
                    rel,
                    f"event feature {feature.name!r} counts code {feature.code!r} per patient "
                    f"and allows [{feature.min}, {feature.max}], but "
                    f"{_plural(int(outside.sum()), 'patient', 'falls')} outside",
                    "check the events' codes, or widen min/max in the schema",
                    column=feature.name,
                )
            continue
        key = (feature.code, feature.min, feature.max)
        if key in seen_ranges:
            continue
        seen_ranges.add(key)
        rows = np.flatnonzero((frame["code"] == feature.code).to_numpy() & np.isfinite(values))
        _check_numbers(
            ctx,
            file=rel,
            column="value",
            cells=table["value"].iloc[rows],
            lo=feature.min,
            hi=feature.max,
            what=f"code {feature.code!r} (event feature {feature.name!r})",
            rows=rows,
        )


def _image_group(
    ctx: _Context,
    rule: str,
    labels_file: str,
    column: str,
    items: list[tuple[int, str]],
    message: str,
    fix: str,
) -> None:
    if not items:
        return
    shown = "; ".join(f"row {r + 1}: {text}" for r, text in items[:ROWS_SHOWN])
    more = f"; and {len(items) - ROWS_SHOWN} more" if len(items) > ROWS_SHOWN else ""
    verb, rest = message.split(" ", 1)
    ctx.add(
        rule,
        labels_file,
        f"{_plural(len(items), 'image', verb)} {rest}: {shown}{more}",
        fix,
        column=column,
        row=items[0][0] + 1,
    )


@_check("imaging")
def _check_imaging(ctx: _Context) -> None:
    """Every listed image exists, decodes, is finite and has the schema's shape."""
    spec = ctx.spec
    if spec.imaging is None or spec.feature_schema.imaging is None:
        return
    rel = normalize_relpath(spec.imaging.labels)
    table = ctx.table(rel)
    if table is None:
        return
    column = spec.imaging.file_column
    if column not in table.columns:
        _missing_column(
            ctx, rel, column, table, "it lists each patient's image, relative to the imaging folder"
        )
        return
    if normalize_relpath(spec.imaging.folder) in ctx.refused:
        return  # imaging.folder leads outside the site: reported once, in site.toml
    shape = tuple(spec.feature_schema.imaging.shape)
    ids = table[spec.patient_id].tolist()
    present: set[str] = set()
    missing: list[tuple[int, str]] = []
    outside: list[tuple[int, str]] = []
    unreadable: list[tuple[int, str]] = []
    wrong_shape: list[tuple[int, str]] = []
    infinite: list[tuple[int, str]] = []
    for row, path in image_paths(spec, ctx.files).items():
        pid = ids[row]
        if isinstance(pid, str):
            present.add(pid)
        try:
            exists = ctx.files.exists(path)
        except PathOutsideSite as e:
            outside.append((row, f"{path!r} {e.reason}"))
            continue
        if not exists:
            missing.append((row, repr(path)))
            continue
        try:
            image = ctx.files.image(path)
        except DataError as e:
            unreadable.append((row, ctx.relative(str(e)).rsplit("; ", 1)[0]))
            continue
        if image.shape != shape:
            wrong_shape.append((row, f"{path!r} is {'x'.join(map(str, image.shape))}"))
            continue
        if not np.isfinite(image).all():
            infinite.append((row, repr(path)))
    ctx.present["imaging"] = present
    folder = spec.imaging.folder
    _image_group(
        ctx,
        "image_missing",
        rel,
        column,
        missing,
        f"is listed but absent from {folder!r}",
        f"add the files, or fix the paths (relative to {folder!r}) in {rel}",
    )
    _image_group(
        ctx,
        "image_outside",
        rel,
        column,
        outside,
        "is refused (fedcare reads only regular files inside the site folder)",
        f"{CONFINEMENT_FIX}; then list it in {rel} relative to {folder!r}",
    )
    _image_group(
        ctx,
        "image_unreadable",
        rel,
        column,
        unreadable,
        "is unreadable",
        "re-export them as greyscale PNG (8/16-bit), NPY or uncompressed DICOM",
    )
    _image_group(
        ctx,
        "image_shape",
        rel,
        column,
        wrong_shape,
        f"does not have the schema's shape {shape[0]}x{shape[1]}",
        "resample the images to the schema's [schema.imaging] shape (height x width, "
        "one grey channel)",
    )
    _image_group(
        ctx,
        "non_finite",
        rel,
        column,
        infinite,
        "holds NaN or infinite pixels",
        "replace non-finite pixels by real grey levels",
    )


@_check("genomics")
def _check_genomics(ctx: _Context) -> None:
    """Every schema gene/variant has a column of finite numbers in range."""
    spec = ctx.spec
    schema = spec.feature_schema.genomics
    if spec.genomics is None or schema is None:
        return
    rel = normalize_relpath(spec.genomics.matrix)
    table = ctx.table(rel)
    if table is None:
        return
    ctx.present["genomics"] = set(ctx.valid_ids(table))
    absent = [f for f in schema.features if f not in table.columns]
    if absent:
        ctx.add(
            "missing_column",
            rel,
            f"{_plural(len(absent), 'schema gene/variant', 'has')} no column: {_names(absent)}",
            "add one column per schema feature (missing values may be empty), or fix the names",
            column=absent[0],
        )
    present = [name for name in schema.features if name in table.columns]
    for name, numbers in columns_to_numbers(table, present).items():
        _check_numbers(
            ctx,
            file=rel,
            column=name,
            cells=table[name],
            lo=schema.min,
            hi=schema.max,
            numbers=numbers,
        )


@_check("labels")
def _check_labels(ctx: _Context) -> None:
    """Each label column exists and holds both classes."""
    for label in ctx.spec.labels:
        rel = normalize_relpath(label.table)
        table = ctx.table(rel)
        if table is None:
            continue
        ctx.label_ids.update(ctx.valid_ids(table))
        if label.column not in table.columns:
            _missing_column(ctx, rel, label.column, table, f"label {label.name!r} reads it")
            continue
        has_id = table[ctx.spec.patient_id].notna().to_numpy()
        if label.kind == "survival":
            _check_survival_label(ctx, rel, table[has_id], label)
            continue
        y = binary_label(table[label.column], label.positive)[has_id]
        labelled = int(np.sum(~np.isnan(y)))
        positives = int(np.nansum(y))
        ctx.label_stats[label.name] = (positives, labelled)
        if labelled == 0:
            ctx.add(
                "label_classes",
                rel,
                f"label {label.name!r}: no patient has a value in column {label.column!r}",
                "fill in the label, or remove the label and its tasks from site.toml",
                column=label.column,
            )
        elif positives in (0, labelled):
            which = "positive" if positives else "negative"
            ctx.add(
                "label_classes",
                rel,
                f"label {label.name!r} has one class only: all {labelled} labelled patients are "
                f"{which} (positive means {label.column} == {label.positive!r})",
                "check the label's 'positive' value in site.toml and the column's coding; a "
                "model needs both classes",
                column=label.column,
            )


def _check_survival_label(ctx: _Context, rel: str, table: pd.DataFrame, label: Any) -> None:
    """A survival label's time and event columns (:mod:`fedcare.client.data.survival_labels`)."""
    event, _ = survival_values(table, label) if label.time_column in table.columns else ([], [])
    labelled = int(np.sum(~np.isnan(np.asarray(event, dtype=np.float64))))
    ctx.label_stats[label.name] = (int(np.nansum(np.asarray(event, dtype=np.float64))), labelled)
    for p in survival_label_problems(table, label):
        ctx.add(p.rule, rel, p.message, p.fix, column=p.column, row=p.row)


@_check("coverage")
def _check_coverage(ctx: _Context) -> None:
    """The site has patients, and each modality covers enough of them."""
    spec = ctx.spec
    everyone = set().union(*ctx.present.values(), ctx.label_ids)
    if not everyone:
        if ctx.present:
            ctx.add(
                "empty_site",
                SPEC_FILENAME,
                f"the site has no patient: {', '.join(spec_tables(spec))} hold no data row",
                "add patients' rows to the tables site.toml names",
            )
        return
    for modality in MODALITIES:
        files = getattr(spec, modality)
        if files is None or modality not in ctx.present:
            continue
        have = len(ctx.present[modality] & everyone)
        lacking = len(everyone) - have
        fraction = lacking / len(everyone)
        if fraction > files.max_missing_fraction + 1e-12:
            ctx.add(
                "coverage",
                SPEC_FILENAME,
                f"{modality} covers {have} of {len(everyone)} patients "
                f"({fraction:.0%} lack it; {modality}.max_missing_fraction allows "
                f"{files.max_missing_fraction:.0%})",
                f"add the missing patients' {modality} data, or raise "
                f"{modality}.max_missing_fraction in site.toml",
                column=f"{modality}.max_missing_fraction",
            )


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _spec_problems(path: Path) -> tuple[SiteSpec | None, list[DataProblem]]:
    """Parse site.toml; one problem per invalid field."""
    if not path.is_file():
        return None, [
            DataProblem(
                "error",
                SPEC_FILENAME,
                None,
                None,
                f"{path.parent} is not a site folder: there is no {SPEC_FILENAME} in it",
                "pass the folder holding the site's site.toml, or write one (see "
                "common/spec.py for the format) or generate a site with `fedcare data synth`",
                "spec",
            )
        ]
    if path.suffix.lower() != ".toml":
        return None, [
            DataProblem(
                "error",
                path.name,
                None,
                None,
                f"{path} is not a site folder: it is a file, and a site is a folder holding "
                f"a {SPEC_FILENAME}",
                f"pass the folder holding the site's {SPEC_FILENAME} (or that file itself)",
                "spec",
            )
        ]
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        return None, [
            DataProblem(
                "error",
                SPEC_FILENAME,
                None,
                None,
                f"not valid TOML: {e}",
                "fix the TOML syntax",
                "spec",
            )
        ]
    try:
        return SiteSpec.model_validate(raw), []
    except ValidationError as e:
        reference = "common/spec.py"
        return None, [
            DataProblem(
                "error",
                SPEC_FILENAME,
                p.field,
                None,
                p.problem,
                p.fix or f"correct the value (the format is documented in {reference})",
                "spec",
            )
            for p in validation_problems(e, reference=reference)
        ]


def _cap(problems: list[DataProblem]) -> tuple[DataProblem, ...]:
    """Keep the first PROBLEMS_PER_GROUP problems of each (rule, file); count the rest."""
    kept: list[DataProblem] = []
    dropped: dict[tuple[str, str], list[DataProblem]] = defaultdict(list)
    seen: dict[tuple[str, str], int] = defaultdict(int)
    for p in problems:
        key = (p.rule, p.file)
        seen[key] += 1
        if seen[key] <= PROBLEMS_PER_GROUP:
            kept.append(p)
        else:
            dropped[key].append(p)
    for (rule, file), rest in dropped.items():
        severity: Severity = "error" if any(p.severity == "error" for p in rest) else "warning"
        kept.append(
            DataProblem(
                severity,
                file,
                None,
                None,
                f"{len(rest)} more {rule!r} problems in {file} not listed "
                f"({RULES.get(rule, rule)})",
                "fix the problems listed first, then run the check again",
                "more",
            )
        )
    return tuple(kept)


def validate_and_open(path: str | Path) -> tuple[ValidationReport, SiteFiles | None]:
    """Validate a site and return the reader that parsed its files (for the loaders).

    Parameters
    ----------
    path:
        A site folder, or its ``site.toml``.
    """
    path = Path(path)
    spec_path = path if path.suffix == ".toml" or path.is_file() else path / SPEC_FILENAME
    root = spec_path.parent
    spec, problems = _spec_problems(spec_path)
    if spec is None:
        summary = SiteSummary(site_id=None, patients=0)
        return ValidationReport(root, None, _cap(problems), summary), None
    files = SiteFiles(root, id_column=spec.patient_id)
    ctx = _Context(spec, files)
    for _name, run in _CHECKS:
        run(ctx)
    everyone = set().union(*ctx.present.values(), ctx.label_ids)
    summary = SiteSummary(
        site_id=spec.site_id,
        patients=len(everyone),
        modalities={m: len(ctx.present[m]) for m in spec.modalities if m in ctx.present},
        labels=dict(ctx.label_stats),
    )
    return ValidationReport(root, spec, _cap(ctx.problems), summary), files


def validate_site(path: str | Path) -> ValidationReport:
    """Check a site folder against its ``site.toml``; collect every problem.

    Parameters
    ----------
    path:
        A site folder, or its ``site.toml``.

    Returns
    -------
    ValidationReport
        ``report.ok`` is False when any error was found; ``report.problems`` lists
        every problem (errors and warnings), capped per kind and file.
    """
    return validate_and_open(path)[0]
