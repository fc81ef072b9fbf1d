"""Longitudinal events (one row per measurement) and their per-patient aggregates.

An events table has the patient-id column and ``time``, ``code``, ``value``. ``time`` is
either numeric (any unit: days since admission, hours...) or ISO-8601 datetimes. Each
:class:`~fedcare.common.spec.EventFeature` aggregates the events carrying its ``code``:

``mean``, ``min``, ``max``
    over the events' non-missing values; NaN for a patient with none.
``last``
    the non-missing value with the latest ``time`` (on equal times, the later row);
    NaN for a patient with none.
``count``
    the number of events with that code (whatever their value); 0 for a patient
    with none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from fedcare.client.data.tables import as_text, to_numbers
from fedcare.common.spec import EventFeature

if TYPE_CHECKING:
    from pandas.api.typing import SeriesGroupBy

__all__ = [
    "EVENT_COLUMNS",
    "ParsedEvents",
    "parse_event_times",
    "parse_events",
    "aggregate_events",
]

EVENT_COLUMNS: tuple[str, ...] = ("time", "code", "value")


def parse_event_times(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Times as float64: numbers as they are, ISO datetimes as seconds since 1970 (UTC).

    The column is read in the format most of its cells have: numbers (ties go to
    numbers) or ISO-8601 datetimes (naive ones are taken as UTC); the cells that do
    not parse in that format are flagged.

    Returns
    -------
    times:
        float64; NaN where missing or unparseable.
    invalid:
        True where a cell is present but cannot be parsed.

    Examples
    --------
    >>> t, bad = parse_event_times(pd.Series(["2020-01-01T00:00:10", "1970-01-01", "x"]))
    >>> float(t[1]), bad.tolist()
    (0.0, [False, False, True])
    """
    numbers, not_number = to_numbers(column)
    if not not_number.any():
        return numbers, not_number
    text = as_text(column)
    present = text.notna().to_numpy()
    stamps = pd.to_datetime(text, format="ISO8601", errors="coerce", utc=True)
    valid = stamps.notna().to_numpy()
    if int(valid.sum()) <= int((present & ~not_number).sum()):
        # Mostly numbers: the cells that are not are the errors.
        return numbers, not_number
    times = np.full(len(text), np.nan)
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    times[valid] = ((stamps[valid] - epoch) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)
    return times, present & ~valid


@dataclass(frozen=True)
class ParsedEvents:
    """An events table parsed into typed columns, with the cells that failed.

    ``frame`` has columns ``patient_id`` (str), ``time`` (float), ``code`` (str or
    NaN), ``value`` (float) in file order; ``bad_time``/``bad_value`` flag cells present
    but unparseable (their parsed value is NaN).
    """

    frame: pd.DataFrame
    bad_time: np.ndarray
    bad_value: np.ndarray
    times_are_datetimes: bool = False
    """True when ``time`` was read as ISO-8601 datetimes (then in seconds since 1970)."""


def parse_events(raw: pd.DataFrame, *, id_column: str) -> ParsedEvents:
    """Parse a raw events table (as :func:`~fedcare.client.data.tables.read_table` returns it).

    The table must have ``id_column`` and ``time``, ``code``, ``value``.
    """
    times, bad_time = parse_event_times(raw["time"])
    # Read as datetimes when a parsed time is not a number (the column has one format).
    numbers, _ = to_numbers(raw["time"])
    as_datetimes = bool(np.isnan(numbers[np.isfinite(times)]).any())
    values, bad_value = to_numbers(raw["value"])
    frame = pd.DataFrame(
        {
            "patient_id": as_text(raw[id_column]).to_numpy(dtype=object),
            "time": times,
            "code": as_text(raw["code"]).to_numpy(dtype=object),
            "value": values,
        }
    )
    return ParsedEvents(
        frame=frame, bad_time=bad_time, bad_value=bad_value, times_are_datetimes=as_datetimes
    )


def _mean(g: SeriesGroupBy) -> pd.Series:
    return g.mean()


def _min(g: SeriesGroupBy) -> pd.Series:
    return g.min()


def _max(g: SeriesGroupBy) -> pd.Series:
    return g.max()


def _last(g: SeriesGroupBy) -> pd.Series:
    # Rows arrive sorted by time (stably); GroupBy.last skips missing values.
    return g.last()


def _count(g: SeriesGroupBy) -> pd.Series:
    return g.size()


_AGGREGATORS: dict[str, Callable[[SeriesGroupBy], pd.Series]] = {
    "mean": _mean,
    "min": _min,
    "max": _max,
    "last": _last,
    "count": _count,
}
_FILL: dict[str, float] = {"count": 0.0}


def aggregate_events(
    events: pd.DataFrame,
    features: Sequence[EventFeature],
    *,
    patient_ids: Iterable[str],
) -> pd.DataFrame:
    """One row per patient, one float column per event feature (schema order).

    Parameters
    ----------
    events:
        ``ParsedEvents.frame``: columns ``patient_id``, ``time``, ``code``, ``value``.
        Rows of patients not in ``patient_ids`` are ignored.
    features:
        The schema's event features.
    patient_ids:
        The rows of the result, in this order.

    Examples
    --------
    >>> ev = pd.DataFrame({"patient_id": ["a", "a", "b"], "time": [2.0, 1.0, 5.0],
    ...                    "code": ["HR", "HR", "HR"], "value": [80.0, 60.0, 70.0]})
    >>> f = [EventFeature(name="hr_last", code="HR", agg="last"),
    ...      EventFeature(name="hr_n", code="HR", agg="count")]
    >>> aggregate_events(ev, f, patient_ids=["a", "b", "c"]).to_dict("list")
    {'hr_last': [80.0, 70.0, nan], 'hr_n': [2.0, 1.0, 0.0]}
    """
    index = pd.Index(list(patient_ids), dtype=object, name="patient_id")
    ordered = events.sort_values("time", kind="stable")
    columns: dict[str, pd.Series] = {}
    for feature in features:
        rows = ordered[ordered["code"] == feature.code]
        grouped = rows.groupby("patient_id", sort=False)["value"]
        per_patient = _AGGREGATORS[feature.agg](grouped).astype(np.float64)
        column = per_patient.reindex(index)
        if feature.agg in _FILL:
            column = column.fillna(_FILL[feature.agg])
        columns[feature.name] = column.to_numpy(dtype=np.float64)
    return pd.DataFrame(columns, index=index, columns=[f.name for f in features])
