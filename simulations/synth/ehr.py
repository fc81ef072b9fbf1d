"""EHR: the per-patient table, its missing values, and the longitudinal events file.

The clean table holds the rounded values of :mod:`fedcare.simulations.synth.latent`; the label
logits read that clean table, and only then are cells removed (see
:func:`apply_missingness`). Events are vital-sign rounds (HR, SBP, TEMP) at several
times of the stay; the schema aggregates them into per-patient event features.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedcare.common.spec import EventFeature, Feature
from fedcare.simulations.synth.latent import ADMISSION, COMORBIDITIES, LABS, SEXES, SMOKING, sigmoid

__all__ = [
    "EVENT_CODES",
    "MISSABLE",
    "ehr_features",
    "event_features",
    "clean_ehr_table",
    "draw_events",
    "aggregate_events",
    "apply_missingness",
]

#: Event code -> (unit, measurement-noise sd, decimals).
EVENT_CODES: dict[str, tuple[str, float, int]] = {
    "HR": ("bpm", 7.0, 0),
    "SBP": ("mmHg", 10.0, 0),
    "TEMP": ("degC", 0.35, 1),
}

#: EHR columns that may be missing; age, sex, admission type and the binaries never are.
MISSABLE: tuple[str, ...] = ("bmi", "spo2", *LABS, "smoking")

#: Relative chance of a MAR-missing cell by admission type (elective stays skip tests).
MAR_WEIGHT: dict[str, float] = {"elective": 2.0, "urgent": 1.0, "emergency": 0.5}

_NUMERIC: dict[str, tuple[str, float, float, int, str]] = {
    # name: (unit, min, max, decimals, description)
    "age": ("years", 18, 100, 0, "age at admission"),
    "n_medications": ("count", 0, 60, 0, "active medications at admission"),
    "bmi": ("kg/m2", 14, 60, 1, "body-mass index"),
    "spo2": ("%", 70, 100, 0, "oxygen saturation at admission"),
}


def ehr_features() -> tuple[Feature, ...]:
    """The EHR table's schema features, in column order."""
    feats: list[Feature] = []
    for name in ("age",):
        unit, lo, hi, _, desc = _NUMERIC[name]
        feats.append(
            Feature(name=name, kind="numeric", unit=unit, min=lo, max=hi, description=desc)
        )
    feats.append(
        Feature(name="sex", kind="categorical", categories=SEXES, description="administrative sex")
    )
    feats.append(
        Feature(
            name="smoking",
            kind="categorical",
            categories=SMOKING,
            description="smoking status (may be missing)",
        )
    )
    feats.append(
        Feature(
            name="admission_type",
            kind="categorical",
            categories=ADMISSION,
            description="how the patient was admitted",
        )
    )
    for name in COMORBIDITIES:
        feats.append(Feature(name=name, kind="binary", description=f"history of {name}"))
    feats.append(
        Feature(name="anticoagulant", kind="binary", description="on an anticoagulant at admission")
    )
    for name in ("n_medications", "bmi", "spo2"):
        unit, lo, hi, _, desc = _NUMERIC[name]
        feats.append(
            Feature(name=name, kind="numeric", unit=unit, min=lo, max=hi, description=desc)
        )
    for name, lab in LABS.items():
        feats.append(
            Feature(
                name=name,
                kind="numeric",
                unit=lab.unit,
                min=lab.lo,
                max=lab.hi,
                description=f"admission {name} (may be missing)",
            )
        )
    return tuple(feats)


def event_features() -> tuple[EventFeature, ...]:
    """The per-patient aggregates of the events file, in encoding order."""
    return (
        EventFeature(
            name="hr_mean",
            code="HR",
            agg="mean",
            unit="bpm",
            min=20,
            max=250,
            description="mean heart rate over the stay",
        ),
        EventFeature(
            name="hr_max",
            code="HR",
            agg="max",
            unit="bpm",
            min=20,
            max=250,
            description="highest heart rate over the stay",
        ),
        EventFeature(
            name="n_hr",
            code="HR",
            agg="count",
            unit="count",
            min=0,
            max=1000,
            description="number of heart-rate measurements",
        ),
        EventFeature(
            name="sbp_last",
            code="SBP",
            agg="last",
            unit="mmHg",
            min=40,
            max=260,
            description="last systolic blood pressure",
        ),
        EventFeature(
            name="sbp_min",
            code="SBP",
            agg="min",
            unit="mmHg",
            min=40,
            max=260,
            description="lowest systolic blood pressure",
        ),
        EventFeature(
            name="temp_max",
            code="TEMP",
            agg="max",
            unit="degC",
            min=33,
            max=43,
            description="highest temperature",
        ),
    )


def clean_ehr_table(patients: pd.DataFrame, patient_ids: list[str]) -> pd.DataFrame:
    """The complete EHR table: ``patient_id`` then the schema columns, rounded as written."""
    table: dict[str, object] = {"patient_id": patient_ids}
    for feat in ehr_features():
        col = patients[feat.name].to_numpy()
        if feat.kind == "numeric":
            decimals = _NUMERIC[feat.name][3] if feat.name in _NUMERIC else LABS[feat.name].decimals
            col = np.round(col.astype(float), decimals)
            if decimals == 0:
                col = col.astype(np.int64) if feat.name in ("age", "n_medications") else col
        elif feat.kind == "binary":
            col = col.astype(np.int64)
        else:
            col = col.astype(object)
        table[feat.name] = col
    return pd.DataFrame(table)


def draw_events(
    rng: np.random.Generator, patients: pd.DataFrame, patient_ids: list[str]
) -> pd.DataFrame:
    """Vital-sign rounds: columns ``patient_id`` (str), ``time`` (hours since admission,
    float), ``code`` (``HR``/``SBP``/``TEMP``), ``value`` (float); sorted by patient, time,
    code."""
    n = len(patients)
    frailty = patients["frailty"].to_numpy()
    rounds = 2 + rng.poisson(2.0 + 4.0 * sigmoid(frailty))
    owner = np.repeat(np.arange(n), rounds)
    los = patients["los_hours"].to_numpy()[owner]
    times = np.round(rng.uniform(0.0, 1.0, size=len(owner)) * los, 2)
    order = np.lexsort((times, owner))
    owner, times = owner[order], times[order]
    frames = []
    for code, (_, noise, decimals) in EVENT_CODES.items():
        base = patients[f"{code.lower()}_base"].to_numpy()[owner]
        values = np.round(base + noise * rng.standard_normal(len(owner)), decimals)
        frames.append(pd.DataFrame({"row": np.arange(len(owner)), "code": code, "value": values}))
    long = pd.concat(frames, ignore_index=True).sort_values(["row", "code"], kind="stable")
    rows = long["row"].to_numpy()
    ids = np.asarray(patient_ids, dtype=object)
    return pd.DataFrame(
        {
            "patient_id": ids[owner[rows]],
            "time": times[rows],
            "code": long["code"].to_numpy().astype(object),
            "value": long["value"].to_numpy(dtype=float),
        }
    )


def aggregate_events(events: pd.DataFrame, patient_ids: list[str]) -> pd.DataFrame:
    """The schema's event features, one row per patient (in ``patient_ids`` order).

    ``last`` is the value at the latest time; ``count`` counts rows with the code.
    """
    out = pd.DataFrame(index=pd.Index(patient_ids, name="patient_id"))
    ordered = events.sort_values(["patient_id", "time"], kind="stable")
    for feat in event_features():
        rows = ordered[ordered["code"] == feat.code].groupby("patient_id")["value"]
        agg = {
            "mean": rows.mean,
            "min": rows.min,
            "max": rows.max,
            "last": rows.last,
            "count": rows.count,
        }[feat.agg]()
        out[feat.name] = agg.reindex(out.index).to_numpy(dtype=float)
    return out


def apply_missingness(
    rng: np.random.Generator, table: pd.DataFrame, *, rate: float
) -> pd.DataFrame:
    """Blank cells of :data:`MISSABLE` columns: half MCAR, half MAR on admission type.

    A cell of patient ``i`` is missing when one uniform draw falls below
    ``rate / 2 + rate / 2 * w_i / mean(w)``, with ``w_i`` from :data:`MAR_WEIGHT`; the
    expected missing fraction per column is ``rate`` (capped at 1 per cell).
    """
    out = table.copy()
    if rate <= 0.0:
        return out
    w = out["admission_type"].map(MAR_WEIGHT).to_numpy(dtype=float)
    p = np.minimum(rate / 2.0 + rate / 2.0 * w / w.mean(), 1.0)
    for name in MISSABLE:
        missing = rng.random(len(out)) < p
        col = out[name].astype(object if name == "smoking" else float)
        col[missing] = None if name == "smoking" else np.nan
        out[name] = col
    return out
