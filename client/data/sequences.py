"""A patient's event stream as a fixed-size sequence (a *timeline*), encoded from the schema.

A :class:`~fedcare.common.spec.TimelineSchema` keeps the events whose code it lists. For
each patient, the ``max_length`` most recent of them are kept, in time order (equal times
keep their file order), left-aligned; the remaining positions are padding. Each position
holds the channels of :data:`fedcare.common.encoding.TIMELINE_CHANNELS`:

``code``
    the code's number: 1 for the timeline's first code, 2 for the second...; 0 = padding.
``value``
    ``clip((value - center) / scale, -value_clip, value_clip)`` with the code's declared
    constants; 0 when the value is missing.
``value_present``
    1 when the event has a value, else 0.
``gap_before``
    ``log1p(dt / time_scale)``, ``dt`` the time since the previous kept event (0 for the
    first), in the timeline's ``time_unit``.
``time_to_latest``
    ``log1p(dt / time_scale)``, ``dt`` the time from this event to the patient's latest
    kept event.
``present``
    1 for an event, 0 for padding.

Every constant comes from the shared schema: nothing is fitted on a site's patients, so
every site encodes a patient identically and the encoding reveals nothing about the site.
Events with a missing time or code are left out (:mod:`fedcare.client.data.data_checks`
reports them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fedcare.client.data.events import ParsedEvents
from fedcare.common.encoding import TIMELINE_CHANNELS
from fedcare.common.spec import TIME_UNIT_SECONDS, TimelineSchema

__all__ = ["CHANNEL", "encode_timelines", "timeline_patients"]

CHANNEL: dict[str, int] = {name: i for i, name in enumerate(TIMELINE_CHANNELS)}
"""Channel name -> index in the last axis of :func:`encode_timelines`' result."""


def _kept(events: ParsedEvents, timeline: TimelineSchema) -> pd.DataFrame:
    """The timeline's events with a time, code index and time in the timeline's unit."""
    frame = events.frame
    index = {c.code: i + 1 for i, c in enumerate(timeline.codes)}
    rows = frame[frame["code"].isin(list(index)) & np.isfinite(frame["time"].to_numpy())]
    rows = rows.assign(
        code_index=rows["code"].map(index).to_numpy(dtype=np.int64),
        order=np.arange(len(rows)),
    )
    if events.times_are_datetimes:
        rows = rows.assign(time=rows["time"] / TIME_UNIT_SECONDS[timeline.time_unit])
    return rows


def timeline_patients(events: ParsedEvents | None, timeline: TimelineSchema) -> frozenset[str]:
    """Ids of the patients with at least one event of the timeline."""
    if events is None:
        return frozenset()
    return frozenset(str(p) for p in _kept(events, timeline)["patient_id"].dropna().unique())


def encode_timelines(
    events: ParsedEvents | None, timeline: TimelineSchema, *, patient_ids: Sequence[str]
) -> np.ndarray:
    """Each patient's timeline: ``float32`` of shape ``(n, max_length, channels)``.

    Parameters
    ----------
    events:
        The parsed events table (:func:`fedcare.client.data.events.parse_events`); None
        encodes every patient as all padding.
    timeline:
        The schema's timeline.
    patient_ids:
        The rows of the result, in this order; events of other patients are ignored.

    Examples
    --------
    >>> from fedcare.client.data.events import parse_events
    >>> from fedcare.common.spec import TimelineCode
    >>> raw = pd.DataFrame({"patient_id": ["a", "a", "a", "b"], "time": [3, 1, 2, 5],
    ...                     "code": ["HR", "HR", "SBP", "HR"], "value": [90, 70, 120, 80]})
    >>> tl = TimelineSchema(name="v", codes=(TimelineCode(code="HR", center=80, scale=10),),
    ...                     max_length=3, time_unit="hours")
    >>> x = encode_timelines(parse_events(raw, id_column="patient_id"), tl,
    ...                      patient_ids=["a", "b", "c"])
    >>> x.shape
    (3, 3, 6)
    >>> x[0, :, CHANNEL["value"]].tolist(), x[0, :, CHANNEL["present"]].tolist()
    ([-1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    """
    length, channels = timeline.max_length, len(TIMELINE_CHANNELS)
    ids = [str(p) for p in patient_ids]
    out = np.zeros((len(ids), length, channels), dtype=np.float32)
    if events is None or not ids:
        return out
    rows = _kept(events, timeline)
    row_of = pd.Index(ids, dtype=object)
    owner = row_of.get_indexer(rows["patient_id"].astype(object))
    rows = rows.assign(owner=owner)[owner >= 0]
    if rows.empty:
        return out
    # Time order within a patient; equal times keep file order. Keep the latest `length`.
    rows = rows.sort_values(["owner", "time", "order"], kind="stable")
    from_end = rows.groupby("owner", sort=False).cumcount(ascending=False).to_numpy()
    rows = rows[from_end < length]
    group = rows.groupby("owner", sort=False)
    position = group.cumcount().to_numpy()
    times = rows["time"].to_numpy(dtype=np.float64)
    gap = times - group["time"].shift(1).to_numpy(dtype=np.float64)
    gap[np.isnan(gap)] = 0.0
    to_latest = group["time"].transform("max").to_numpy(dtype=np.float64) - times

    centers = np.array([0.0, *(c.center for c in timeline.codes)])
    scales = np.array([1.0, *(c.scale for c in timeline.codes)])
    code = rows["code_index"].to_numpy()
    raw_value = rows["value"].to_numpy(dtype=np.float64)
    has_value = np.isfinite(raw_value)
    value = np.where(has_value, (raw_value - centers[code]) / scales[code], 0.0)
    clip = timeline.value_clip

    r, p = rows["owner"].to_numpy(), position
    out[r, p, CHANNEL["code"]] = code
    out[r, p, CHANNEL["value"]] = np.clip(value, -clip, clip)
    out[r, p, CHANNEL["value_present"]] = has_value
    out[r, p, CHANNEL["gap_before"]] = np.log1p(np.maximum(gap, 0.0) / timeline.time_scale)
    out[r, p, CHANNEL["time_to_latest"]] = np.log1p(to_latest / timeline.time_scale)
    out[r, p, CHANNEL["present"]] = 1.0
    return out
