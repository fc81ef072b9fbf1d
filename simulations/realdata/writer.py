"""Writes a :class:`~fedcare.simulations.realdata.base.RealDataset` as fedcare site folders.

Layout of ``out/`` (the same as ``fedcare data synth`` writes, EHR only)::

    site-<i>/site.toml     the SiteSpec: [ehr], one [[labels]] and [[tasks]], the shared
                           [[schema.ehr]], the site's own [split] (and [simulation] opt-ins
                           unless written for a deployment)
    site-<i>/ehr.csv       patient_id, the schema's features, the label column (a survival
                           label: its event and time columns)
    site-<i>/genomics.csv  patient_id and one column per gene (datasets with genomics only)
    realdata.json          what was written: source file and its SHA-256, preprocessing
                           notes, per-site patients, positives and split sizes

CSV as the synthetic writer writes it: UTF-8, comma-separated, header row, ``\\n`` line
ends, no index, missing cells empty. Every site is checked with fedcare's own validator
before anything is moved into ``out``, and everything is staged in a temporary folder
beside ``out``, so a failure leaves ``out`` as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from fedcare.client.data.data_checks import validate_site
from fedcare.client.data.split import split_patients
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import (
    SPEC_FILENAME,
    EHRFiles,
    GenomicsFiles,
    SimulationSpec,
    SiteSpec,
    SplitSpec,
    TaskSpec,
)
from fedcare.simulations.realdata.base import PATIENT_ID, Hospital, RealDataset
from fedcare.simulations.synth.manifest import MANIFEST_FILENAME as SYNTH_MANIFEST
from fedcare.simulations.synth.manifest import TRUTH_FILENAME as SYNTH_TRUTH
from fedcare.simulations.synth.manifest import write_manifest
from fedcare.simulations.synth.writer import TABLE_WRITERS

__all__ = ["MANIFEST_FILENAME", "EHR_TABLE", "build_site_spec", "write_real_sites"]

MANIFEST_FILENAME = "realdata.json"
EHR_TABLE = "ehr.csv"
GENOMICS_TABLE = "genomics.csv"


def _site_folder(i: int) -> str:
    return f"site-{i}"


def build_site_spec(
    dataset: RealDataset, hospital: Hospital, *, seed: int, simulated: bool
) -> SiteSpec:
    """The ``site.toml`` of ``hospital``: EHR (and genomics where the dataset has it), the
    dataset's one label and task (binary or survival), a seeded split.

    ``simulated`` adds the ``[simulation]`` opt-ins a synthetic site carries (reproducible
    DP noise, exact evaluation metrics; see :class:`~fedcare.common.spec.SimulationSpec`).
    """
    return SiteSpec(
        site_id=hospital.site_id,
        patient_id=PATIENT_ID,
        ehr=EHRFiles(table=EHR_TABLE, max_missing_fraction=0.0),
        genomics=None if hospital.genomics is None else GenomicsFiles(matrix=GENOMICS_TABLE),
        labels=(dataset.label(EHR_TABLE),),
        tasks=(
            TaskSpec(
                name=dataset.task,
                label=dataset.task,
                modalities=dataset.modalities,
                description=dataset.title,
            ),
        ),
        schema=dataset.schema(),
        split=SplitSpec(seed=seed),
        simulation=SimulationSpec(noise_seed=seed, exact_evaluation=True) if simulated else None,
    )


def _check_out(out: Path, *, force: bool) -> None:
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"is below the file {path}"
                raise ConfigError(f"--out {out} {where}; give a new or empty folder")
            break
    if not force and out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"refusing to write into {out}: the folder is not empty; choose a new or empty "
            "--out folder, or pass --force to replace the site folders in it"
        )


def _replaced(out: Path) -> list[Path]:
    """What ``--force`` replaces: site folders (holding a site.toml) and run manifests."""
    if not out.is_dir():
        return []
    sites = [p for p in out.glob("site-*") if p.is_dir() and (p / SPEC_FILENAME).is_file()]
    manifests = [out / n for n in (MANIFEST_FILENAME, SYNTH_MANIFEST, SYNTH_TRUTH)]
    return sorted(sites) + [p for p in manifests if p.is_file()]


def _validate(folder: Path) -> None:
    report = validate_site(folder)
    if not report.ok:
        first = report.errors[0]
        raise DataError(
            f"{folder.name} ({report.summary.site_id}) fails fedcare's validation: "
            f"{first.file}, column {first.column!r}: {first.message}; this is a bug in "
            "simulations/realdata"
        )


def _site_summary(
    i: int, hospital: Hospital, dataset: RealDataset, spec: SiteSpec
) -> dict[str, Any]:
    table = hospital.table
    y = table[dataset.label_column]
    split = split_patients(
        table[PATIENT_ID].tolist(), seed=spec.split.seed, fractions=spec.split.fractions
    )
    return {
        "folder": _site_folder(i),
        "site_id": hospital.site_id,
        "source_name": hospital.source_name,
        "n_patients": len(table),
        "n_positive": int(y.sum()),
        "prevalence": float(y.mean()),
        "split": split.sizes(),
        "missing_cells": {
            f.name: int(table[f.name].isna().sum())
            for f in spec.feature_schema.ehr
            if table[f.name].isna().any()
        },
    }


def write_real_sites(
    dataset: RealDataset,
    out: Path,
    *,
    seed: int = 0,
    force: bool = False,
    simulated: bool = True,
) -> list[Path]:
    """Write ``dataset``'s sites into ``out``; returns the site folders (``site-<i>``).

    Parameters
    ----------
    dataset:
        The real dataset (see :data:`fedcare.simulations.realdata.DATASETS`).
    out:
        A new or empty folder (created when missing).
    seed:
        Seed (>= 0) of every site's train/val/test split (its ``[split] seed``) and, when
        ``simulated``, of its reproducible DP noise.
    force:
        Replace the site folders and manifests already in ``out`` instead of refusing.
    simulated:
        Give each site the ``[simulation]`` opt-ins (``False``: sites for a deployment).

    Raises
    ------
    ConfigError
        ``seed`` is negative, ``out`` is a file or not empty (without ``force``), or the
        package shipping the data is not installed.
    DataError
        The packaged CSV is not the one the dataset module was written for.
    """
    if seed < 0:
        raise ConfigError(f"seed {seed} is negative; use a seed >= 0 (--seed)")
    out = Path(out).resolve()
    _check_out(out, force=force)
    source = dataset.read()
    hospitals = dataset.hospitals(source.frame)
    schema = dataset.schema()
    writer = TABLE_WRITERS["csv"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.realdata-", dir=out.parent))
    try:
        staged = tmp / "staged"
        staged.mkdir()
        summaries = []
        for i, hospital in enumerate(hospitals):
            folder = staged / _site_folder(i)
            folder.mkdir()
            spec = build_site_spec(dataset, hospital, seed=seed, simulated=simulated)
            writer.write(folder / EHR_TABLE, hospital.table)
            if hospital.genomics is not None:
                writer.write(folder / GENOMICS_TABLE, hospital.genomics)
            dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
            (folder / SPEC_FILENAME).write_bytes(tomli_w.dumps(dumped).encode("utf-8"))
            _validate(folder)
            summaries.append(_site_summary(i, hospital, dataset, spec))
        manifest = {
            "generator": "fedcare.simulations.realdata",
            "dataset": dataset.name,
            "title": dataset.title,
            "source": {
                "package": source.package,
                "version": source.version,
                "file": source.file,
                "sha256": source.sha256,
                "rows": len(source.frame),
            },
            "task": dataset.task,
            "seed": seed,
            "simulated": simulated,
            "n_sites": len(hospitals),
            "n_patients": sum(s["n_patients"] for s in summaries),
            "schema_fingerprint": schema.fingerprint(),
            "preprocessing": list(dataset.notes()),
            "sites": summaries,
        }
        write_manifest(staged / MANIFEST_FILENAME, manifest)

        out.mkdir(exist_ok=True)
        trash = tmp / "replaced"
        trash.mkdir()
        for old in _replaced(out):
            os.replace(old, trash / old.name)
        for i in range(len(hospitals)):
            os.replace(staged / _site_folder(i), out / _site_folder(i))
        os.replace(staged / MANIFEST_FILENAME, out / MANIFEST_FILENAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / _site_folder(i) for i in range(len(hospitals))]
