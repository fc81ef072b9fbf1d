r"""The temporal task: a label carried by the *order and timing* of two events.

Turned on by ``SynthConfig(temporal_signal=True)`` (off by default: the default hospitals
are unchanged). Each patient then also gets, in the events file, one blood culture
(``CULT``, value 1) and one antibiotic start (``ABX``, value: the dose in grams)::

    t_CULT ~ Uniform(0, los_hours)
    t_ABX  = clip(t_CULT + Uniform(-WINDOW, 2 WINDOW), 0, los_hours)
    dose   ~ Uniform(0.5, 2.0), rounded to 0.1

and the label ``infection`` (suspected infection, after the Sepsis-3 rule "antibiotics
started within a window after a culture") has the true logit

``eta = -2.0 + delta + 3.0 [0 < t_ABX - t_CULT <= WINDOW] + 0.5 age_z + 0.7 chf``.

Per patient, ``CULT`` and ``ABX`` occur once each and their values carry no signal, so the
event aggregates (mean, min, max, last, count of each code) cannot see the window: only
the order and the gap between the two events can. The task comes twice in ``site.toml``:
``infection`` reads the EHR table and the event aggregates, ``infection_timeline`` also
reads the ``stay`` timeline (every vital sign, culture and antibiotic, the latest
:data:`MAX_LENGTH` events).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedcare.common.spec import EventFeature, LabelSpec, TaskSpec, TimelineCode, TimelineSchema

__all__ = [
    "TASK",
    "TIMELINE_TASK",
    "LABEL_COLUMN",
    "WINDOW_HOURS",
    "MAX_LENGTH",
    "draw_infection_events",
    "infection_logit",
    "timeline_schema",
    "temporal_event_features",
    "temporal_labels",
    "temporal_tasks",
]

TASK = "infection"
TIMELINE_TASK = "infection_timeline"
LABEL_COLUMN = "suspected_infection"
TIMELINE_NAME = "stay"
WINDOW_HOURS = 24.0
MAX_LENGTH = 48
DESCRIPTION = "suspected infection: antibiotics started within 24 h after a blood culture"
SIGNAL = (
    "Order and timing: an antibiotic start (ABX) within 24 h after the blood culture (CULT) "
    "raises the logit by 3; age and heart failure add a little. The event aggregates cannot "
    "see the window; a timeline model can."
)


def draw_infection_events(
    rng: np.random.Generator, patients: pd.DataFrame, patient_ids: list[str]
) -> tuple[pd.DataFrame, np.ndarray]:
    """Each patient's culture and antibiotic start, and whether they fall in the window.

    Returns
    -------
    events:
        ``patient_id``, ``time`` (hours), ``code`` (``CULT``/``ABX``), ``value``; two rows
        per patient.
    in_window:
        ``float`` 0/1 per patient: ``0 < t_ABX - t_CULT <= WINDOW_HOURS`` (as written).
    """
    n = len(patients)
    los = patients["los_hours"].to_numpy(dtype=float)
    t_cult = np.round(rng.uniform(0.0, 1.0, size=n) * los, 2)
    offset = rng.uniform(-WINDOW_HOURS, 2.0 * WINDOW_HOURS, size=n)
    t_abx = np.round(np.clip(t_cult + offset, 0.0, los), 2)
    dose = np.round(rng.uniform(0.5, 2.0, size=n), 1)
    gap = t_abx - t_cult
    in_window = ((gap > 0) & (gap <= WINDOW_HOURS)).astype(float)
    ids = np.asarray(patient_ids, dtype=object)
    events = pd.DataFrame(
        {
            "patient_id": np.concatenate([ids, ids]),
            "time": np.concatenate([t_cult, t_abx]),
            "code": np.array(["CULT"] * n + ["ABX"] * n, dtype=object),
            "value": np.concatenate([np.ones(n), dose]),
        }
    )
    return events, in_window


def infection_logit(clean: pd.DataFrame, in_window: np.ndarray) -> np.ndarray:
    """The true logit (no site shift) from clean EHR values and the window indicator."""
    return (
        -2.0
        + 3.0 * in_window
        + 0.5 * clean["age_z"].to_numpy(dtype=float)
        + 0.7 * clean["chf"].to_numpy(dtype=float)
    )


def temporal_labels(
    rng: np.random.Generator, clean: pd.DataFrame, in_window: np.ndarray, *, shift: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(probability, label)`` per patient; ``shift`` is the site's intercept shift."""
    p = 1.0 / (1.0 + np.exp(-(infection_logit(clean, in_window) + shift)))
    return p, (rng.random(len(p)) < p).astype(np.int64)


def temporal_event_features() -> tuple[EventFeature, ...]:
    """Aggregates of the two new codes (what an aggregate model can know of them)."""
    return (
        EventFeature(name="n_cult", code="CULT", agg="count", unit="count", min=0, max=100),
        EventFeature(name="abx_dose_max", code="ABX", agg="max", unit="g", min=0, max=10),
        EventFeature(name="abx_dose_last", code="ABX", agg="last", unit="g", min=0, max=10),
    )


def timeline_schema() -> TimelineSchema:
    """The ``stay`` timeline: vital signs, cultures and antibiotics, hours, latest 48."""
    return TimelineSchema(
        name=TIMELINE_NAME,
        codes=(
            TimelineCode(code="HR", center=80.0, scale=15.0, unit="bpm"),
            TimelineCode(code="SBP", center=125.0, scale=20.0, unit="mmHg"),
            TimelineCode(code="TEMP", center=37.0, scale=0.7, unit="degC"),
            TimelineCode(code="CULT", center=0.0, scale=1.0, description="blood culture drawn"),
            TimelineCode(code="ABX", center=1.0, scale=0.5, unit="g", description="antibiotic"),
        ),
        max_length=MAX_LENGTH,
        time_unit="hours",
        time_scale=24.0,
        description="the stay's vital signs, blood cultures and antibiotic starts",
    )


def temporal_tasks(
    outcomes_table: str, *, groups: tuple[str, ...] = ()
) -> tuple[tuple[LabelSpec, ...], tuple[TaskSpec, ...]]:
    """The label and the two tasks (aggregates only; with the timeline) for ``site.toml``."""
    label = LabelSpec(name=TASK, table=outcomes_table, column=LABEL_COLUMN, description=DESCRIPTION)
    tasks = (
        TaskSpec(name=TASK, label=TASK, modalities=("ehr",), description=SIGNAL, groups=groups),
        TaskSpec(
            name=TIMELINE_TASK,
            label=TASK,
            modalities=("ehr",),
            timeline=TIMELINE_NAME,
            description=SIGNAL,
            groups=groups,
        ),
    )
    return (label,), tasks
