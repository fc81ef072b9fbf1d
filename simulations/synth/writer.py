"""Writes one synthetic site as a hospital would hold it: tables, images, ``site.toml``.

Layout of ``site-<i>/`` (``<t>`` is the site's table suffix, ``.csv`` or ``.parquet``)::

    site.toml            the SiteSpec (paths relative to this folder)
    ehr<t>               patient_id, the schema's EHR columns, readmission_30d
    events<t>            patient_id, time, code, value  (vital-sign rounds)
    outcomes<t>          patient_id, malignancy, drug_response, multimodal_outcome
    genomics<t>          patient_id, one column per gene (patients with genomics only)
    imaging/labels<t>    patient_id, file  (file name relative to imaging/)
    imaging/<patient_id>.png | .npy | .dcm

CSV: UTF-8, comma-separated, header row, ``\\n`` line ends, no index, missing cells empty.
Parquet: pyarrow, snappy, no pandas metadata; ``string`` / ``int64`` / ``double`` columns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from fedcare.common.spec import (
    SPEC_FILENAME,
    EHRFiles,
    FeatureSchema,
    GenomicsFiles,
    ImagingFiles,
    LabelSpec,
    SimulationSpec,
    SiteSpec,
    SplitSpec,
    TaskSpec,
)
from fedcare.simulations.synth.cohort import SyntheticSite
from fedcare.simulations.synth.imaging import ENCODERS
from fedcare.simulations.synth.survival import EVENT_COLUMN as SURVIVAL_EVENT
from fedcare.simulations.synth.survival import survival_tasks
from fedcare.simulations.synth.tasks import TASKS
from fedcare.simulations.synth.timeline import TIMELINE_NAME, temporal_tasks

__all__ = ["TableWriter", "TABLE_WRITERS", "IMAGING_FOLDER", "build_site_spec", "write_site"]

IMAGING_FOLDER = "imaging"


class TableWriter(ABC):
    """Writes a DataFrame in one table format."""

    suffix: str

    @abstractmethod
    def write(self, path: Path, frame: pd.DataFrame) -> None:
        """Write ``frame`` (no index) to ``path``."""


class CsvWriter(TableWriter):
    suffix = ".csv"

    def write(self, path: Path, frame: pd.DataFrame) -> None:
        frame.to_csv(path, index=False, lineterminator="\n", encoding="utf-8")


class ParquetWriter(TableWriter):
    suffix = ".parquet"

    def write(self, path: Path, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields, arrays = [], []
        for name in frame.columns:
            col = frame[name]
            if pd.api.types.is_integer_dtype(col.dtype):
                typ = pa.int64()
            elif pd.api.types.is_float_dtype(col.dtype):
                typ = pa.float64()
            else:
                typ = pa.string()
            values = [None if pd.isna(v) else v for v in col] if typ == pa.string() else col
            arrays.append(pa.array(values, type=typ))
            fields.append(pa.field(str(name), typ))
        table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
        pq.write_table(table, path, compression="snappy")


#: format name -> writer; a new format is one class and one line here.
TABLE_WRITERS: dict[str, TableWriter] = {"csv": CsvWriter(), "parquet": ParquetWriter()}


def _bound(fraction: float, floor: float) -> float:
    """A ``max_missing_fraction`` (share of patients lacking the modality) that the
    written data meets: the spec's default ``floor``, or the realized share + 0.05."""
    if fraction <= 0.0:
        return floor
    return float(min(1.0, max(floor, np.ceil(fraction * 100.0) / 100.0 + 0.05)))


def build_site_spec(site: SyntheticSite, *, schema: FeatureSchema, table_suffix: str) -> SiteSpec:
    """The ``site.toml`` contents for ``site`` written with ``table_suffix`` tables."""
    t = table_suffix
    table_file = {"ehr": f"ehr{t}", "outcomes": f"outcomes{t}"}
    n = site.n_patients  # every patient has an EHR row and events
    img_missing = 1.0 - len(site.image_ids) / n
    gen_missing = 1.0 - len(site.genomics) / n
    temporal: tuple[tuple[LabelSpec, ...], tuple[TaskSpec, ...]] = ((), ())
    if any(timeline.name == TIMELINE_NAME for timeline in schema.timelines):
        groups = tuple(g.name for g in schema.groups)
        temporal = temporal_tasks(table_file["outcomes"], groups=groups)
    survival: tuple[tuple[LabelSpec, ...], tuple[TaskSpec, ...]] = ((), ())
    if SURVIVAL_EVENT in site.outcomes.columns:  # SynthConfig(survival=True)
        groups = tuple(g.name for g in schema.groups)  # per-group C-index (survival_groups.py)
        survival = survival_tasks(table_file["outcomes"], groups=groups)
    return SiteSpec(
        site_id=site.site_id,
        patient_id="patient_id",
        ehr=EHRFiles(table=f"ehr{t}", events=f"events{t}", max_missing_fraction=0.0),
        imaging=ImagingFiles(
            folder=IMAGING_FOLDER,
            labels=f"{IMAGING_FOLDER}/labels{t}",
            file_column="file",
            max_missing_fraction=_bound(img_missing, 0.5),
        ),
        genomics=GenomicsFiles(
            matrix=f"genomics{t}", max_missing_fraction=_bound(gen_missing, 0.5)
        ),
        labels=tuple(
            LabelSpec(
                name=task.name,
                table=table_file[task.table],
                column=task.column,
                positive=1,
                description=task.description,
            )
            for task in TASKS.values()
        )
        + temporal[0]
        + survival[0],
        tasks=tuple(
            TaskSpec(
                name=task.name,
                label=task.name,
                modalities=task.modalities,
                description=task.signal,
                groups=tuple(g.name for g in schema.groups),
            )
            for task in TASKS.values()
        )
        + temporal[1]
        + survival[1],
        schema=schema,
    )


def write_site(
    folder: Path,
    site: SyntheticSite,
    *,
    schema: FeatureSchema,
    image_format: str,
    table_format: str,
    seed: int,
    simulated: bool = True,
) -> SiteSpec:
    """Write ``site`` into the (new, empty) ``folder``; returns the spec it wrote.

    ``simulated`` adds the ``[simulation]`` opt-ins (see :class:`SimulationSpec`); a site
    written for a deployment has none.
    """
    writer = TABLE_WRITERS[table_format]
    encoder = ENCODERS[image_format]
    t = writer.suffix
    folder.mkdir(parents=True, exist_ok=False)
    writer.write(folder / f"ehr{t}", site.ehr)
    writer.write(folder / f"events{t}", site.events)
    writer.write(folder / f"outcomes{t}", site.outcomes)
    writer.write(folder / f"genomics{t}", site.genomics)
    img_dir = folder / IMAGING_FOLDER
    img_dir.mkdir()
    files = encoder.write_all(
        img_dir, site.image_ids, site.images, uid_entropy=("fedcare-synth", str(seed), site.site_id)
    )
    writer.write(
        img_dir / f"labels{t}", pd.DataFrame({"patient_id": list(site.image_ids), "file": files})
    )
    spec = build_site_spec(site, schema=schema, table_suffix=t).model_copy(
        update={
            # A synthetic site is the experimenter's own: its split follows the data seed, and
            # it opts into reproducible DP noise and exact evaluation metrics, which the run's
            # summary and audit log then state. A real hospital's site.toml has neither.
            "split": SplitSpec(seed=seed),
            "simulation": (
                SimulationSpec(noise_seed=seed, exact_evaluation=True) if simulated else None
            ),
        }
    )
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    (folder / SPEC_FILENAME).write_bytes(tomli_w.dumps(dumped).encode("utf-8"))
    return spec
