"""Survival (time-to-event) labels: reading and checking a label's time and event columns.

A ``kind = "survival"`` label (:class:`fedcare.common.spec.LabelSpec`) names an *event*
column (``column``: 1 = the event happened, 0 = censored) and a ``time_column`` (time to the
event or to censoring). :func:`survival_label_problems` says what is wrong with them, one
message per rule; :func:`survival_label_columns` turns them into the two float columns the
site's label table holds: ``<name>`` (the event, 1.0 / 0.0 / NaN) and ``<name>.time``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcare.client.data.tables import as_text, binary_label, to_numbers
from fedcare.common.spec import LabelSpec

__all__ = [
    "TIME_SUFFIX",
    "time_column",
    "LabelProblem",
    "survival_label_problems",
    "survival_values",
]

TIME_SUFFIX = ".time"
"""The site's label table holds a survival label's times as ``<label name>.time``."""


def time_column(label_name: str) -> str:
    """The label-table column of a survival label's times."""
    return f"{label_name}{TIME_SUFFIX}"


@dataclass(frozen=True)
class LabelProblem:
    """One thing wrong with a survival label's columns (``row``: first offending, 1-based)."""

    rule: str
    column: str
    message: str
    fix: str
    row: int | None = None


def survival_values(table: pd.DataFrame, label: LabelSpec) -> tuple[np.ndarray, np.ndarray]:
    """``(event, time)`` as float64 (NaN where missing or invalid) of every row of ``table``.

    An event cell is 1.0 when it equals ``label.positive`` (as :func:`binary_label` compares:
    ``1`` matches ``"1"`` and ``"1.0"``), 0.0 otherwise, NaN when missing; the data checks
    (:func:`survival_label_problems`) refuse any value but 0 and ``positive`` first.
    """
    assert label.time_column is not None
    event = binary_label(table[label.column], label.positive)
    time, _ = to_numbers(table[label.time_column])
    return event, time


def _first_row(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0]) + 1


def survival_label_problems(table: pd.DataFrame, label: LabelSpec) -> list[LabelProblem]:
    """Every problem of a survival label's columns in ``table`` (rows with a patient id).

    Rules: the time column exists; times are numbers, finite and at least 0 wherever the
    event is given; the event column holds only 0 and ``positive`` (1); at least one
    patient is labelled; not every labelled patient is censored (no event: nothing to
    learn a hazard from).
    """
    assert label.time_column is not None
    out: list[LabelProblem] = []
    name, tcol, ecol = label.name, label.time_column, label.column
    if tcol not in table.columns:
        return [
            LabelProblem(
                "missing_column",
                tcol,
                f"survival label {name!r} reads time column {tcol!r}, which is absent",
                f"add the column {tcol!r} or fix 'time_column' in site.toml",
            )
        ]
    present = as_text(table[ecol]).notna().to_numpy()
    zero = binary_label(table[ecol], 0) == 1.0
    bad_event = present & ~zero & (binary_label(table[ecol], label.positive) != 1.0)
    if bad_event.any():
        out.append(
            LabelProblem(
                "not_binary",
                ecol,
                f"survival label {name!r}: the event column {ecol!r} holds values other than "
                f"0 and {label.positive!r} ({int(bad_event.sum())} rows)",
                "code the event as 1 (event happened) and 0 (censored)",
                _first_row(bad_event),
            )
        )
    event, time = survival_values(table, label)
    given = ~np.isnan(event) & ~bad_event
    raw = as_text(table[tcol])
    missing = given & raw.isna().to_numpy()
    _, not_number = to_numbers(table[tcol])
    checks = (
        ("not_numeric", given & not_number, "is not a number", "write times as numbers"),
        ("non_finite", given & np.isinf(time), "is infinite", "write a finite time"),
        (
            "out_of_range",
            given & (time < 0),
            "is negative",
            "a time counts from the origin (diagnosis, admission) and is at least 0",
        ),
        ("not_numeric", missing, "is missing", "fill in every labelled patient's time"),
    )
    for rule, mask, what, fix in checks:
        if mask.any():
            out.append(
                LabelProblem(
                    rule,
                    tcol,
                    f"survival label {name!r}: the time in column {tcol!r} {what} "
                    f"({int(mask.sum())} rows)",
                    fix,
                    _first_row(mask),
                )
            )
    labelled = int(given.sum())
    if labelled == 0:
        out.append(
            LabelProblem(
                "label_classes",
                ecol,
                f"survival label {name!r}: no patient has an event value in column {ecol!r}",
                "fill in the event column, or remove the label and its tasks from site.toml",
            )
        )
    elif float(np.nansum(event[given])) == 0:
        out.append(
            LabelProblem(
                "label_classes",
                ecol,
                f"survival label {name!r}: all {labelled} labelled patients are censored "
                f"(no {ecol} == {label.positive!r})",
                "check the event coding (1 = event); a hazard model needs observed events",
            )
        )
    return out
