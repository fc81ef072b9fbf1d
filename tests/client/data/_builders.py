"""A small, hand-written valid site, with the values written kept as the reference.

The builder writes every format the loaders read (EHR CSV or Parquet, events with
numeric or ISO times, PNG 8/16-bit, NPY and DICOM images, a genomics Parquet matrix,
labels in two tables) and returns what it wrote, computed here with plain Python, so
tests compare the loaders' output with these references and never with the code's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

IMAGE_SHAPE = (8, 10)  # not square: a transposed image is caught
DICOM_SLOPE = 0.5
DICOM_INTERCEPT = -10.0
IMAGE_KINDS = ("png8", "png16", "npy", "dcm")
EVENT_FEATURES: list[dict[str, Any]] = [
    {"name": "hr_mean", "code": "HR", "agg": "mean", "unit": "bpm", "min": 20, "max": 250},
    {"name": "hr_max", "code": "HR", "agg": "max", "unit": "bpm", "min": 20, "max": 250},
    {"name": "hr_count", "code": "HR", "agg": "count"},
    {"name": "creat_last", "code": "CREAT", "agg": "last", "unit": "mg/dL"},
    {"name": "creat_min", "code": "CREAT", "agg": "min", "unit": "mg/dL"},
]
GENES = ("BRCA1", "TP53", "EGFR", "KRAS")


@dataclass
class BuiltSite:
    """The site folder and every value written into it."""

    root: Path
    spec: dict[str, Any]
    patient_ids: list[str]
    ehr: dict[str, dict[str, Any]]  # pid -> feature -> value (NaN/None where missing)
    events: list[tuple[str, float, str, float]]  # (pid, time, code, value) as written
    event_features: dict[str, dict[str, float]]  # pid -> event feature -> reference value
    images: dict[str, np.ndarray] = field(default_factory=dict)  # pid -> float32 expected
    image_files: dict[str, str] = field(default_factory=dict)  # pid -> path under imaging/
    genomics: dict[str, dict[str, float]] = field(default_factory=dict)
    labels: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> pid -> y

    def path(self, rel: str) -> Path:
        return self.root / rel

    def write_spec(self) -> None:
        (self.root / "site.toml").write_bytes(tomli_w.dumps(self.spec).encode())


def write_dicom(
    path: Path, pixels: np.ndarray, *, uid_suffix: int = 0, rescale: bool = True
) -> None:
    """Write ``pixels`` (uint16) as a DICOM file, with the rescale tags when ``rescale``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    uid = UID(f"1.2.826.0.1.3680043.10.999.{uid_suffix}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if rescale:
        ds.RescaleSlope = str(DICOM_SLOPE)
        ds.RescaleIntercept = str(DICOM_INTERCEPT)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_image(
    path: Path,
    kind: str,
    rng: np.random.Generator,
    *,
    uid_suffix: int = 0,
    shape: tuple[int, int] = IMAGE_SHAPE,
) -> np.ndarray:
    """Write one image of ``kind``; return the float32 grey levels a reader must give."""
    from PIL import Image

    if kind == "png8":
        raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
        Image.fromarray(raw).save(path)
        return raw.astype(np.float32)
    if kind == "png16":
        raw = rng.integers(0, 65536, size=shape, dtype=np.uint16)
        raw[0, 0] = 65535  # a value no 8-bit reading could give
        Image.fromarray(raw).save(path)
        return raw.astype(np.float32)
    if kind == "npy":
        raw = rng.normal(100.0, 20.0, size=shape).astype(np.float32)
        np.save(path, raw)
        return raw
    if kind == "dcm":
        raw = rng.integers(0, 4096, size=shape, dtype=np.uint16)
        write_dicom(path, raw, uid_suffix=uid_suffix)
        return (raw.astype(np.float64) * DICOM_SLOPE + DICOM_INTERCEPT).astype(np.float32)
    raise ValueError(kind)


def reference_aggregate(
    events: list[tuple[str, float, str, float]], feature: dict[str, Any], pid: str
) -> float:
    """The event feature of one patient, by plain Python (the loaders' reference)."""
    rows = [(i, t, v) for i, (p, t, c, v) in enumerate(events) if p == pid and c == feature["code"]]
    if feature["agg"] == "count":
        return float(len(rows))
    values = [(t, i, v) for i, t, v in rows if not math.isnan(v)]
    if not values:
        return math.nan
    if feature["agg"] == "mean":
        return sum(v for _, _, v in values) / len(values)
    if feature["agg"] == "min":
        return min(v for _, _, v in values)
    if feature["agg"] == "max":
        return max(v for _, _, v in values)
    if feature["agg"] == "last":
        return max(values)[2]  # latest time; on equal times the later row
    raise ValueError(feature["agg"])


def build_site(
    root: Path,
    *,
    n: int = 12,
    seed: int = 0,
    ehr_format: str = "csv",
    genomics_format: str = "parquet",
    iso_times: bool = False,
    site_id: str = "site-0",
) -> BuiltSite:
    """Write a valid site of ``n`` patients under ``root``; return what was written."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pids = [f"{i:04d}" for i in range(1, n + 1)]  # leading zeros must survive

    # EHR: one row per patient; bmi has gaps; ward codes keep their leading zero.
    ehr: dict[str, dict[str, Any]] = {}
    for i, pid in enumerate(pids):
        ehr[pid] = {
            "age": float(rng.integers(18, 95)),
            "bmi": math.nan if i % 5 == 3 else round(float(rng.normal(27, 4)), 2),
            "sex": ["F", "M"][i % 2],
            "ward": ["01", "02", "10"][i % 3],
            "diabetes": float(i % 3 == 0),
        }
    readmission = {pid: float(i % 3 == 1) for i, pid in enumerate(pids)}
    ehr_frame = pd.DataFrame(
        {
            "patient_id": pids,
            "age": [ehr[p]["age"] for p in pids],
            "bmi": [ehr[p]["bmi"] for p in pids],
            "sex": [ehr[p]["sex"] for p in pids],
            "ward": [ehr[p]["ward"] for p in pids],
            "diabetes": [int(ehr[p]["diabetes"]) for p in pids],
            "readmission_30d": [int(readmission[p]) for p in pids],
        }
    )
    ehr_file = f"ehr.{ehr_format}"
    if ehr_format == "csv":
        ehr_frame.to_csv(root / ehr_file, index=False)
    else:
        ehr_frame.to_parquet(root / ehr_file, index=False)

    # Events: HR for everyone (several, some values missing), CREAT for some only.
    events: list[tuple[str, float, str, float]] = []
    for i, pid in enumerate(pids):
        for _ in range(int(rng.integers(1, 5))):
            value = math.nan if rng.random() < 0.15 else round(float(rng.normal(80, 12)), 1)
            events.append((pid, float(rng.integers(0, 30)), "HR", value))
        if i % 4 != 0:
            for _ in range(int(rng.integers(1, 4))):
                events.append(
                    (
                        pid,
                        float(rng.integers(0, 30)),
                        "CREAT",
                        round(float(rng.uniform(0.5, 2.0)), 2),
                    )
                )
    events.append((pids[0], 3.0, "OTHER", 1.0))  # a code no feature uses: ignored
    order = rng.permutation(len(events))
    events = [events[k] for k in order]
    epoch = pd.Timestamp("2021-01-01")
    events_frame = pd.DataFrame(
        {
            "patient_id": [e[0] for e in events],
            "time": [
                (epoch + pd.Timedelta(days=e[1])).isoformat() if iso_times else e[1] for e in events
            ],
            "code": [e[2] for e in events],
            "value": [e[3] for e in events],
        }
    )
    events_frame.to_csv(root / "events.csv", index=False)
    event_features = {
        pid: {f["name"]: reference_aggregate(events, f, pid) for f in EVENT_FEATURES}
        for pid in pids
    }

    # Imaging: three patients in four have an image; every format appears.
    (root / "imaging").mkdir(exist_ok=True)
    images: dict[str, np.ndarray] = {}
    image_files: dict[str, str] = {}
    finding: dict[str, float] = {}
    rows: list[dict[str, str]] = []
    for i, pid in enumerate(pids):
        if i % 4 == 2:
            continue
        kind = IMAGE_KINDS[len(rows) % len(IMAGE_KINDS)]
        ext = {"png8": "png", "png16": "png", "npy": "npy", "dcm": "dcm"}[kind]
        name = f"scans/{pid}.{ext}"
        (root / "imaging" / "scans").mkdir(exist_ok=True)
        images[pid] = write_image(root / "imaging" / name, kind, rng, uid_suffix=i + 1)
        image_files[pid] = name
        word = ["yes", "no", "YES", "no"][len(rows) % 4]
        finding[pid] = 1.0 if word.lower() == "yes" else 0.0
        rows.append({"patient_id": pid, "file": name, "finding": word})
    pd.DataFrame(rows).to_csv(root / "imaging" / "labels.csv", index=False)

    # Genomics: all but two patients.
    genomics: dict[str, dict[str, float]] = {}
    for i, pid in enumerate(pids):
        if i in (1, 5):
            continue
        genomics[pid] = {g: round(float(rng.lognormal(1.0, 0.5)), 4) for g in GENES}
    genomics_frame = pd.DataFrame(
        {"patient_id": list(genomics), **{g: [genomics[p][g] for p in genomics] for g in GENES}}
    )
    genomics_file = f"genomics.{genomics_format}"
    if genomics_format == "csv":
        genomics_frame.to_csv(root / genomics_file, index=False)
    else:
        genomics_frame.to_parquet(root / genomics_file, index=False)

    spec: dict[str, Any] = {
        "spec_version": 1,
        "site_id": site_id,
        "patient_id": "patient_id",
        "ehr": {"table": ehr_file, "events": "events.csv"},
        "imaging": {"folder": "imaging", "labels": "imaging/labels.csv", "file_column": "file"},
        "genomics": {"matrix": genomics_file},
        "labels": [
            {"name": "readmission", "table": ehr_file, "column": "readmission_30d", "positive": 1},
            {
                "name": "finding",
                "table": "imaging/labels.csv",
                "column": "finding",
                "positive": "yes",
            },
        ],
        "tasks": [
            {"name": "readmission", "label": "readmission", "modalities": ["ehr", "genomics"]},
            {"name": "finding", "label": "finding", "modalities": ["imaging"]},
        ],
        "schema": {
            "ehr": [
                {"name": "age", "kind": "numeric", "unit": "years", "min": 0, "max": 120},
                {"name": "bmi", "kind": "numeric", "unit": "kg/m2", "min": 10, "max": 80},
                {"name": "sex", "kind": "categorical", "categories": ["F", "M"]},
                {"name": "ward", "kind": "categorical", "categories": ["01", "02", "10"]},
                {"name": "diabetes", "kind": "binary"},
            ],
            "events": EVENT_FEATURES,
            "genomics": {"kind": "expression", "features": list(GENES), "min": 0.0},
            "imaging": {"shape": list(IMAGE_SHAPE)},
        },
    }
    site = BuiltSite(
        root=root,
        spec=spec,
        patient_ids=pids,
        ehr=ehr,
        events=events,
        event_features=event_features,
        images=images,
        image_files=image_files,
        genomics=genomics,
        labels={"readmission": readmission, "finding": finding},
    )
    site.write_spec()
    return site


def edit_csv(path: Path, change: Any) -> None:
    """Rewrite a CSV through ``change(frame) -> frame`` with every cell kept as text."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    change(frame).to_csv(path, index=False)
