"""A site's data, loaded and validated: the one object every later stage reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcare.client.data.events import ParsedEvents
from fedcare.common.spec import SiteSpec

__all__ = ["SiteData"]


@dataclass(frozen=True)
class SiteData:
    """Everything a site holds, indexed by patient id (always ``str``).

    Attributes
    ----------
    spec:
        The validated ``site.toml``.
    root:
        The site's data folder (paths in ``spec`` are relative to it).
    patient_ids:
        Sorted union of the patients seen in any modality or label table.
    ehr:
        One row per patient: the schema's EHR columns, then its event-derived features,
        in schema order; raw values (NaN where missing; categories as ``str``).
        ``None`` when the site has no EHR.
    images:
        Patient id -> float32 array of the schema's shape (raw grey levels).
        ``None`` when the site has no imaging.
    genomics:
        One row per patient, the schema's genomics features as float columns in schema
        order. ``None`` when the site has no genomics.
    labels:
        One column per declared label: 1.0, 0.0, or NaN where the patient has no value.
    fingerprint:
        SHA-256 over ``site.toml`` and every data file it names (the privacy ledger key).
    events:
        The parsed events table, kept only when the schema declares a timeline
        (:mod:`fedcare.client.data.sequences` encodes it); ``None`` otherwise.
    """

    spec: SiteSpec
    root: Path
    patient_ids: tuple[str, ...]
    ehr: pd.DataFrame | None
    images: dict[str, np.ndarray] | None
    genomics: pd.DataFrame | None
    labels: pd.DataFrame
    fingerprint: str
    events: ParsedEvents | None = None
