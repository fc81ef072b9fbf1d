"""Small in-memory sites (``SiteData`` built directly, no files) for the split /
preprocessing / dataset tests. The loaders' file-writing builder is ``_builders.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcare.client.data.site import SiteData
from fedcare.common.spec import SiteSpec

SHAPE = (8, 8)
GENES = ("g1", "g2", "g3", "g4", "g5")
SEX = ("M", "F", "X")  # deliberately not sorted: one-hot must follow schema order

SCHEMA: dict[str, Any] = {
    "ehr": [
        {"name": "age", "kind": "numeric", "unit": "years", "min": 0, "max": 120},
        {"name": "sex", "kind": "categorical", "categories": list(SEX)},
        {"name": "diabetes", "kind": "binary"},
    ],
    "events": [{"name": "hr_mean", "code": "HR", "agg": "mean", "unit": "bpm"}],
    "genomics": {"kind": "expression", "features": list(GENES)},
    "imaging": {"shape": list(SHAPE)},
}

TASKS: list[dict[str, Any]] = [
    {"name": "readmission", "label": "outcome", "modalities": ["ehr"]},
    {
        "name": "restricted",
        "label": "outcome",
        "modalities": ["ehr"],
        "features": ["hr_mean", "age"],
    },
    {"name": "imaging_only", "label": "outcome", "modalities": ["imaging"]},
    {"name": "genomics_only", "label": "outcome", "modalities": ["genomics"]},
    {"name": "multimodal", "label": "outcome", "modalities": ["genomics", "ehr", "imaging"]},
    {"name": "ehr_imaging", "label": "outcome", "modalities": ["imaging", "ehr"]},
]

EHR_COLUMNS = ("age", "sex", "diabetes", "hr_mean")


def make_spec(site_id: str = "site-0") -> SiteSpec:
    return SiteSpec.model_validate(
        {
            "site_id": site_id,
            "ehr": {"table": "ehr.csv", "events": "events.csv"},
            "imaging": {"folder": "images", "labels": "images.csv"},
            "genomics": {"matrix": "genomics.csv"},
            "labels": [{"name": "outcome", "table": "ehr.csv", "column": "outcome"}],
            "tasks": TASKS,
            "schema": SCHEMA,
        }
    )


@dataclass(frozen=True)
class Truth:
    """What the builder put in the site, for independent checks."""

    has_ehr: frozenset[str]
    has_image: frozenset[str]
    has_genomics: frozenset[str]
    labelled: frozenset[str]


def make_site(
    n: int = 80,
    *,
    site_id: str = "site-0",
    seed: int = 0,
    p_ehr: float = 0.85,
    p_image: float = 0.7,
    p_genomics: float = 0.6,
    p_label: float = 0.9,
    shift: float = 0.0,
) -> tuple[SiteData, Truth]:
    """A random site of ``n`` patients; each modality and the label present at random.

    Patients without EHR are absent from the EHR index (even ids) or present as an all-NaN
    row (odd ids), so both loader conventions are exercised. ``shift`` moves the numeric
    distributions, to make "another site with the same schema".
    """
    rng = np.random.default_rng(seed)
    ids = [f"{site_id}-p{i:04d}" for i in range(n)]
    has_ehr = rng.random(n) < p_ehr
    has_img = rng.random(n) < p_image
    has_gen = rng.random(n) < p_genomics
    has_label = rng.random(n) < p_label

    age = rng.normal(60 + shift, 15, n)
    age[rng.random(n) < 0.1] = np.nan
    sex = np.array(rng.choice(list(SEX), n), dtype=object)
    sex[rng.random(n) < 0.1] = None
    diabetes = rng.integers(0, 2, n).astype(float)
    diabetes[rng.random(n) < 0.1] = np.nan
    hr = rng.normal(80 + shift, 10, n)
    hr[rng.random(n) < 0.2] = np.nan
    age[np.isnan(age) & np.isnan(hr)] = 50.0  # a patient with EHR always has some value
    ehr = pd.DataFrame(
        {"age": age, "sex": sex, "diabetes": diabetes, "hr_mean": hr},
        index=pd.Index(ids, name="patient_id"),
    )
    for i in np.flatnonzero(~has_ehr):
        ehr.iloc[i] = [np.nan, None, np.nan, np.nan]
    keep = [i for i in range(n) if has_ehr[i] or i % 2 == 1]
    ehr = ehr.iloc[keep]

    images = {
        ids[i]: rng.normal(100 + shift, 20, SHAPE).astype(np.float32)
        for i in range(n)
        if has_img[i]
    }
    genomics = pd.DataFrame(
        rng.normal(5 + shift, 2, (n, len(GENES))),
        columns=list(GENES),
        index=pd.Index(ids, name="patient_id"),
    )
    genomics.iloc[~has_gen] = np.nan
    holes = rng.random(genomics.shape) < 0.05
    holes[:, 0] = False  # a patient with genomics always has g1
    genomics = genomics.mask(holes)

    outcome = rng.integers(0, 2, n).astype(float)
    outcome[~has_label] = np.nan
    labels = pd.DataFrame({"outcome": outcome}, index=pd.Index(ids, name="patient_id"))

    site = SiteData(
        spec=make_spec(site_id),
        root=Path("/nonexistent") / site_id,
        patient_ids=tuple(sorted(ids)),
        ehr=ehr,
        images=images,
        genomics=genomics,
        labels=labels,
        fingerprint="0" * 64,
    )
    truth = Truth(
        has_ehr=frozenset(p for p, h in zip(ids, has_ehr, strict=True) if h),
        has_image=frozenset(images),
        has_genomics=frozenset(p for p, h in zip(ids, has_gen, strict=True) if h),
        labelled=frozenset(p for p, h in zip(ids, has_label, strict=True) if h),
    )
    return site, truth
