"""Loading a site's files into :class:`~fedcare.client.data.site.SiteData`.

:func:`load_site` validates the site first (:func:`~fedcare.client.data.data_checks.validate_site`)
and refuses, with every problem listed, when anything is wrong; the per-modality loaders
below then only convert. Called on their own, the loaders do not validate: a cell that
does not convert becomes NaN.

Each modality has one loader, registered in :data:`MODALITY_LOADERS`; patients are
joined across modalities by id, and a patient may lack a modality.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcare.client.data.data_checks import validate_and_open
from fedcare.client.data.events import ParsedEvents, aggregate_events, parse_events
from fedcare.client.data.files import SiteFiles
from fedcare.client.data.fingerprint import dataset_fingerprint, image_paths
from fedcare.client.data.site import SiteData
from fedcare.client.data.survival_labels import survival_values, time_column
from fedcare.client.data.tables import as_text, binary_label, columns_to_numbers, to_numbers
from fedcare.common.errors import DataValidationError
from fedcare.common.spec import Feature, SiteSpec

__all__ = [
    "MODALITY_LOADERS",
    "load_ehr",
    "load_images",
    "load_genomics",
    "load_labels",
    "load_timeline_events",
    "load_site",
]


def _files(spec: SiteSpec, root: str | Path, files: SiteFiles | None) -> SiteFiles:
    return files if files is not None else SiteFiles(Path(root), id_column=spec.patient_id)


def _one_row_per_patient(table: pd.DataFrame, id_column: str) -> pd.DataFrame:
    """Rows with an id, first occurrence of each, sorted by id, indexed by id."""
    rows = table[table[id_column].notna()].drop_duplicates(subset=id_column, keep="first")
    rows = rows.set_index(id_column, drop=True)
    rows.index = pd.Index(rows.index.astype(object), dtype=object, name=id_column)
    return rows.sort_index()


def _numeric(cells: pd.Series) -> np.ndarray:
    return to_numbers(cells)[0]


def _categorical(cells: pd.Series) -> np.ndarray:
    return as_text(cells).to_numpy(dtype=object)


_CONVERTERS: dict[str, Callable[[pd.Series], np.ndarray]] = {
    "numeric": _numeric,
    "binary": _numeric,
    "categorical": _categorical,
}


def _ehr_column(rows: pd.DataFrame, feature: Feature) -> np.ndarray:
    if feature.name not in rows.columns:
        fill: Any = np.nan
        return np.full(len(rows), fill, dtype=object if feature.kind == "categorical" else float)
    return _CONVERTERS[feature.kind](rows[feature.name])


def load_ehr(
    spec: SiteSpec, root: str | Path, *, files: SiteFiles | None = None
) -> pd.DataFrame | None:
    """One row per patient of the EHR table: schema features, then event features.

    Returns
    -------
    pandas.DataFrame or None
        Indexed by patient id (``str``, sorted). Numeric and binary columns are float;
        categorical ones ``object`` holding ``str`` (NaN where missing); event features
        are float (see :mod:`fedcare.client.data.events`). None when the site has no EHR.
    """
    if spec.ehr is None:
        return None
    files = _files(spec, root, files)
    rows = _one_row_per_patient(files.table(spec.ehr.table), spec.patient_id)
    columns: dict[str, np.ndarray] = {f.name: _ehr_column(rows, f) for f in spec.feature_schema.ehr}
    ehr = pd.DataFrame(columns, index=rows.index, columns=list(columns))
    for f in spec.feature_schema.ehr:
        if f.kind == "categorical":
            ehr[f.name] = ehr[f.name].astype(object)
    event_features = spec.feature_schema.events
    if event_features:
        if spec.ehr.events is None:  # the spec forbids this; kept for type checkers
            raise ValueError("event features need ehr.events")
        parsed = parse_events(files.table(spec.ehr.events), id_column=spec.patient_id)
        aggregated = aggregate_events(parsed.frame, event_features, patient_ids=list(ehr.index))
        for event_feature in event_features:
            ehr[event_feature.name] = aggregated[event_feature.name].to_numpy()
    return ehr


def load_images(
    spec: SiteSpec, root: str | Path, *, files: SiteFiles | None = None
) -> dict[str, np.ndarray] | None:
    """Patient id -> float32 image (raw grey levels), for every patient with an image.

    Images are listed in the imaging labels table (``file_column``, relative to the
    imaging folder). None when the site has no imaging.
    """
    if spec.imaging is None:
        return None
    files = _files(spec, root, files)
    table = files.table(spec.imaging.labels)
    ids = table[spec.patient_id].tolist()
    images: dict[str, np.ndarray] = {}
    for row, path in image_paths(spec, files).items():
        pid = ids[row]
        if isinstance(pid, str) and pid not in images:
            images[pid] = files.image(path)
    return dict(sorted(images.items()))


def load_genomics(
    spec: SiteSpec, root: str | Path, *, files: SiteFiles | None = None
) -> pd.DataFrame | None:
    """Patients x schema genes/variants as floats, indexed by patient id (sorted).

    None when the site has no genomics.
    """
    if spec.genomics is None or spec.feature_schema.genomics is None:
        return None
    files = _files(spec, root, files)
    rows = _one_row_per_patient(files.table(spec.genomics.matrix), spec.patient_id)
    features = spec.feature_schema.genomics.features
    numbers = columns_to_numbers(rows, [name for name in features if name in rows.columns])
    columns = {
        name: numbers[name][0] if name in numbers else np.full(len(rows), np.nan)
        for name in features
    }
    return pd.DataFrame(columns, index=rows.index, columns=list(features))


def load_labels(
    spec: SiteSpec,
    root: str | Path,
    *,
    patient_ids: Iterable[str],
    files: SiteFiles | None = None,
) -> pd.DataFrame:
    """One float column per declared label (1.0, 0.0, NaN), one row per patient id.

    A row is 1.0 when its label cell equals the label's ``positive`` (compared as text,
    case-insensitively), 0.0 for any other value, NaN when the cell is missing or the
    patient is not in the label's table.
    """
    files = _files(spec, root, files)
    index = pd.Index(list(patient_ids), dtype=object, name=spec.patient_id)
    labels = pd.DataFrame(index=index)
    for label in spec.labels:
        rows = _one_row_per_patient(files.table(label.table), spec.patient_id)
        if label.kind == "survival":  # the event as the label, its times beside it
            event, time = survival_values(rows, label)
            labels[label.name] = pd.Series(event, index=rows.index).reindex(index).to_numpy()
            labels[time_column(label.name)] = (
                pd.Series(time, index=rows.index).reindex(index).to_numpy(dtype=np.float64)
            )
            continue
        values = pd.Series(binary_label(rows[label.column], label.positive), index=rows.index)
        labels[label.name] = values.reindex(index).to_numpy(dtype=np.float64)
    return labels


def load_timeline_events(
    spec: SiteSpec, root: str | Path, *, files: SiteFiles | None = None
) -> ParsedEvents | None:
    """The parsed events table when the schema declares a timeline; None otherwise."""
    if not spec.feature_schema.timelines or spec.ehr is None or spec.ehr.events is None:
        return None
    files = _files(spec, root, files)
    return parse_events(files.table(spec.ehr.events), id_column=spec.patient_id)


def _ids_of(value: pd.DataFrame | dict[str, np.ndarray] | None) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, dict):
        return set(value)
    return set(value.index)


ModalityLoader = Callable[..., "pd.DataFrame | dict[str, np.ndarray] | None"]
MODALITY_LOADERS: dict[str, ModalityLoader] = {
    "ehr": load_ehr,
    "images": load_images,
    "genomics": load_genomics,
}
"""SiteData field -> loader; each takes ``(spec, root, *, files)``."""


def load_site(path: str | Path) -> SiteData:
    """Validate a site folder, then load it.

    Parameters
    ----------
    path:
        The site folder (holding ``site.toml``), or the ``site.toml`` itself.

    Raises
    ------
    DataValidationError
        When validation finds any error; ``problems`` holds every
        :class:`~fedcare.client.data.data_checks.DataProblem` (warnings included).
    """
    report, files = validate_and_open(path)
    if not report.ok or report.spec is None or files is None:
        errors = report.errors
        first = errors[0]
        where = first.file + (f", column {first.column!r}" if first.column else "")
        raise DataValidationError(
            f"site at {report.path}: {len(errors)} data error(s); first: {where}: "
            f"{first.message}. Fix: {first.fix}. Run `fedcare data check {report.path}` for "
            "the full report",
            list(report.problems),
        )
    spec, root = report.spec, report.path
    loaded = {name: loader(spec, root, files=files) for name, loader in MODALITY_LOADERS.items()}
    patient_ids: set[str] = set().union(*(_ids_of(v) for v in loaded.values()))
    for label in spec.labels:
        ids = files.table(label.table)[spec.patient_id]
        patient_ids.update(ids[ids.notna()])
    ordered = tuple(sorted(patient_ids))
    return SiteData(
        spec=spec,
        root=root,
        patient_ids=ordered,
        ehr=loaded["ehr"],
        images=loaded["images"],
        genomics=loaded["genomics"],
        labels=load_labels(spec, root, patient_ids=ordered, files=files),
        fingerprint=dataset_fingerprint(spec, root, files=files),
        events=load_timeline_events(spec, root, files=files),
    )
