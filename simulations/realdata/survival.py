"""Real time-to-event data shipped with scikit-survival, as survival-task hospitals.

Three datasets (``sksurv.datasets``; the ARFF files ship inside the package, nothing is
downloaded):

``gbsg2``
    German Breast Cancer Study Group 2 (Schumacher et al. 1994): 686 node-positive breast
    cancer patients; recurrence-free survival in days (event: recurrence or death, 44%).
    Eight clinical features. Three hospitals.
``whas500``
    Worcester Heart Attack Study (Hosmer, Lemeshow & May 2008): 500 patients after an acute
    myocardial infarction; survival in days (event: death, 43%). Fourteen clinical features.
    Three hospitals.
``gse7390``
    GEO series GSE7390 (Desmedt et al. 2007, TRANSBIG): 198 node-negative breast cancer
    patients; time to distant metastasis in days (event: metastasis, 26%). The task reads the
    76-gene expression signature (genomics); age, ER status, grade and tumour size are in the
    EHR table. Two hospitals.

Preprocessing choices, the same for the three:

* None of the packaged tables names the centre a patient came from, so patients are dealt to
  hospitals by a fixed hash of their row number (:func:`hospital_of`): the sites are
  identically distributed, of nearly equal size, and the assignment never depends on a value.
* The time axis of the discrete-time hazard (the label's ``cuts``) is fixed by the dataset's
  clinical horizon, never by the data: yearly for the breast-cancer series (six years for
  GBSG2, whose follow-up ends near 7.3 years; ten for GSE7390), and 1, 3, 6 months then
  yearly to five years for WHAS500, where deaths cluster early after the infarction.
* Features keep their source units; ``min``/``max`` in the schema are physiological bounds.

A dataset may also name the run-config settings its federation should train with
(:attr:`SurvivalDataset.run_config`, recorded in ``realdata.json``'s notes and applied by
``benchmarks/survival.py``): GSE7390's two hospitals hold about 70 training patients each,
too few for minibatch DP-SGD, so they train the 77-parameter linear risk score
(``genomics_linear``, :mod:`fedcare.models.genomics_linear`) by full-batch DP gradient
descent (every step is the site's whole training split, Poisson rate 1) for 10 rounds at
learning rate 1. The settings were chosen on tuning seeds (100-139, never the reported
ones: the linear score at these settings 0.650, the genomics MLP's best full-batch setting
0.623); the evidence is in ``benchmarks/results/survival.md``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
from abc import abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import Feature, FeatureSchema, GenomicsSchema, LabelSpec, Modality
from fedcare.simulations.realdata.base import (
    PATIENT_ID,
    Hospital,
    RealDataset,
    SourceTable,
    booleans,
    categories,
    numbers,
)

__all__ = [
    "EVENT",
    "TIME",
    "hospital_of",
    "SurvivalDataset",
    "GBSG2",
    "WHAS500",
    "GSE7390",
]

EVENT = "event"
"""The event column written to each site's EHR table (1 = event, 0 = censored)."""
TIME = "time"
"""The time column written to each site's EHR table (days)."""

_DAYS_PER_YEAR = 365.25
_TRUTH = {"True": 1, "False": 0}


def hospital_of(row: int, *, dataset: str, sites: int) -> int:
    """The hospital (``0..sites-1``) of source row ``row``: a fixed hash, not a value.

    Examples
    --------
    >>> [hospital_of(i, dataset="gbsg2", sites=3) for i in range(6)]
    [2, 1, 1, 1, 2, 0]
    """
    digest = hashlib.sha256(f"{dataset}|{row}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % sites


class SurvivalDataset(RealDataset):
    """A scikit-survival dataset: features, an event and a time, dealt into hospitals."""

    package: ClassVar[str] = "scikit-survival"
    #: The ``sksurv.datasets`` loader and its ARFF file under ``sksurv/datasets/data``.
    loader: ClassVar[str]
    n_sites: ClassVar[int]
    cuts: ClassVar[tuple[float, ...]]
    label_column = EVENT
    #: Run-config keys (``model``, ``batch-size``, ``learning-rate``, ...) this dataset's
    #: federation trains with where a run does not set them; empty: the task's default model
    #: and the run-config defaults (the recipe, ``client/recipe.py``). A fact about the
    #: data's size, not fitted to a test set.
    run_config: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: Why :attr:`run_config` differs from the defaults (one clause, for the notes).
    run_config_reason: ClassVar[str] = ""

    def read(self) -> SourceTable:
        """The packaged table as text cells: the features, then ``event`` and ``time``."""
        try:
            import sksurv.datasets as ds

            version = importlib.metadata.version(self.package)
            raw = importlib.resources.files("sksurv.datasets") / "data" / self.source_file
            data = raw.read_bytes()
        except (ModuleNotFoundError, importlib.metadata.PackageNotFoundError) as e:
            raise ConfigError(
                f"the package {self.package!r}, which ships this dataset, is not installed; "
                "install fedcare's dependencies (`pip install -c constraints.txt -e .`)"
            ) from e
        load: Callable[[], tuple[pd.DataFrame, np.ndarray]] = getattr(ds, self.loader)
        x, y = load()
        if y.dtype.names is None or len(y.dtype.names) != 2:
            raise DataError(
                f"sksurv.datasets.{self.loader} returned no (event, time) record array; the "
                "installed scikit-survival is not the version this module was written for"
            )
        event_field, time_field = y.dtype.names
        frame = x.astype(object).where(x.notna(), None)
        frame = frame.map(lambda v: None if v is None else str(v))
        frame[EVENT] = [str(bool(v)) for v in y[event_field]]
        frame[TIME] = [repr(float(v)) for v in y[time_field]]
        return SourceTable(
            package=self.package,
            version=version,
            file=f"sksurv/datasets/data/{self.source_file}",
            sha256=hashlib.sha256(data).hexdigest(),
            frame=frame.reset_index(drop=True),
        )

    def label(self, table: str) -> LabelSpec:
        """The survival label: ``event`` (1) and ``time`` (days) over :attr:`cuts`."""
        return LabelSpec(
            name=self.task,
            table=table,
            column=EVENT,
            positive=1,
            kind="survival",
            time_column=TIME,
            cuts=self.cuts,
            time_unit="days",
            description=self.label_description,
        )

    @abstractmethod
    def features(self, source: pd.DataFrame) -> pd.DataFrame:
        """The EHR features of every source row, converted (the dataset's own)."""

    def genomics(self, source: pd.DataFrame) -> pd.DataFrame | None:
        """The genomics columns of every source row (``None``: no genomics)."""
        return None

    def hospitals(self, source: pd.DataFrame) -> tuple[Hospital, ...]:
        """Rows dealt to :attr:`n_sites` hospitals by :func:`hospital_of`."""
        table = self.features(source)
        table.insert(0, PATIENT_ID, [f"{self.name}-{i:04d}" for i in range(len(source))])
        table[EVENT] = booleans(source[EVENT], truth=_TRUTH, what=f"{self.name} event")
        table[TIME] = numbers(source[TIME], what=f"{self.name} time")
        genes = self.genomics(source)
        if genes is not None:
            genes.insert(0, PATIENT_ID, table[PATIENT_ID])
        site = np.array(
            [hospital_of(i, dataset=self.name, sites=self.n_sites) for i in range(len(source))]
        )
        return tuple(
            Hospital(
                site_id=f"{self.name}-{k}",
                source_name=f"hash group {k}",
                table=table[site == k].reset_index(drop=True),
                genomics=None if genes is None else genes[site == k].reset_index(drop=True),
            )
            for k in range(self.n_sites)
        )

    def notes(self) -> tuple[str, ...]:
        return (
            "No centre column in the source: patients are dealt to hospitals by a fixed hash "
            "of their row number (i.i.d. sites).",
            f"Survival label: event column {EVENT!r} (1 = event), time column {TIME!r} in "
            f"days; hazard intervals cut at {', '.join(f'{c:g}' for c in self.cuts)} days "
            "(clinical horizons, not fitted to the data).",
            *(
                (
                    "Train with run config "
                    + ", ".join(f"{k} = {v!r}" for k, v in self.run_config.items())
                    + f" ({self.run_config_reason})",
                )
                if self.run_config
                else ()
            ),
        )


def _num(name: str, unit: str | None, lo: float, hi: float) -> Feature:
    return Feature(name=name, kind="numeric", unit=unit, min=lo, max=hi)


def _years(*ks: int) -> tuple[float, ...]:
    return tuple(round(k * _DAYS_PER_YEAR, 2) for k in ks)


class GBSG2(SurvivalDataset):
    """German Breast Cancer Study Group 2: recurrence-free survival, 686 patients."""

    name = "gbsg2"
    title = "GBSG2 breast cancer trial (scikit-survival): recurrence-free survival"
    loader = "load_gbsg2"
    source_file = "GBSG2.arff"
    task = "recurrence"
    label_description = "recurrence-free survival: recurrence or death (1) or censored (0)"
    n_sites = 3
    cuts = _years(1, 2, 3, 4, 5, 6)

    def schema(self) -> FeatureSchema:
        return FeatureSchema(
            ehr=(
                _num("age", "years", 18, 100),
                _num("estrec", "fmol/l", 0, 5000),
                Feature(name="horTh", kind="binary", description="hormonal therapy"),
                Feature(name="menostat", kind="categorical", categories=("Pre", "Post")),
                _num("pnodes", "nodes", 0, 100),
                _num("progrec", "fmol/l", 0, 5000),
                Feature(name="tgrade", kind="categorical", categories=("I", "II", "III")),
                _num("tsize", "mm", 0, 200),
            )
        )

    def features(self, source: pd.DataFrame) -> pd.DataFrame:
        w = f"{self.name}"
        return pd.DataFrame(
            {
                "age": numbers(source["age"], what=f"{w} age"),
                "estrec": numbers(source["estrec"], what=f"{w} estrec"),
                "horTh": booleans(source["horTh"], truth={"yes": 1, "no": 0}, what=f"{w} horTh"),
                "menostat": categories(source["menostat"], allowed=("Pre", "Post"), what=w),
                "pnodes": numbers(source["pnodes"], what=f"{w} pnodes"),
                "progrec": numbers(source["progrec"], what=f"{w} progrec"),
                "tgrade": categories(source["tgrade"], allowed=("I", "II", "III"), what=w),
                "tsize": numbers(source["tsize"], what=f"{w} tsize"),
            }
        )


_WHAS_BINARY = ("afb", "av3", "chf", "cvd", "gender", "miord", "mitype", "sho")
_WHAS_NUMERIC = (
    ("age", "years", 18, 110),
    ("bmi", "kg/m2", 10, 70),
    ("diasbp", "mmHg", 0, 250),
    ("hr", "beats/min", 0, 250),
    ("los", "days", 0, 100),
    ("sysbp", "mmHg", 0, 300),
)


class WHAS500(SurvivalDataset):
    """Worcester Heart Attack Study: survival after myocardial infarction, 500 patients."""

    name = "whas500"
    title = "Worcester Heart Attack Study WHAS500 (scikit-survival): survival after MI"
    loader = "load_whas500"
    source_file = "whas500.arff"
    task = "death"
    label_description = "survival after acute myocardial infarction: death (1) or censored (0)"
    n_sites = 3
    cuts = (30.0, 91.0, 182.0, *_years(1, 2, 3, 4, 5))

    def schema(self) -> FeatureSchema:
        return FeatureSchema(
            ehr=(
                *(_num(n, u, lo, hi) for n, u, lo, hi in _WHAS_NUMERIC),
                *(Feature(name=n, kind="binary") for n in _WHAS_BINARY),
            )
        )

    def features(self, source: pd.DataFrame) -> pd.DataFrame:
        out: dict[str, pd.Series] = {
            n: numbers(source[n], what=f"{self.name} {n}") for n, *_ in _WHAS_NUMERIC
        }
        for n in _WHAS_BINARY:
            out[n] = booleans(source[n], truth={"1": 1, "0": 0}, what=f"{self.name} {n}")
        return pd.DataFrame(out)


_GRADES = ("well differentiated", "intermediate", "poorly differentiated", "unkown")


class GSE7390(SurvivalDataset):
    """GSE7390 (TRANSBIG): time to distant metastasis from a 76-gene signature, 198 patients."""

    name = "gse7390"
    title = "GSE7390 breast cancer gene expression (scikit-survival): time to metastasis"
    loader = "load_breast_cancer"
    source_file = "breast_cancer_GSE7390-metastasis.arff"
    task = "metastasis"
    label_description = "time to distant metastasis: metastasis (1) or censored (0)"
    n_sites = 2
    cuts = _years(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    modalities: ClassVar[tuple[Modality, ...]] = ("genomics",)
    #: The linear risk score by full-batch DP gradient descent: a batch above every site's
    #: training split (198, the patients in the source) makes each step the whole split
    #: (Poisson rate 1); 10 rounds of one step at learning rate 1 (chosen on seeds 100-139;
    #: see the module docstring).
    run_config = MappingProxyType(
        {
            "model": "genomics_linear",
            "batch-size": 198,
            "learning-rate": 1.0,
            "num-server-rounds": 10,
        }
    )
    run_config_reason = (
        "about 70 training patients per site: a 77-parameter linear risk score by full-batch "
        "DP gradient descent, every step the site's whole training split"
    )

    def _genes(self, source: pd.DataFrame) -> list[str]:
        return [c for c in source.columns if c.startswith("X")]

    def schema(self) -> FeatureSchema:
        genes = self._genes(self.read().frame)
        return FeatureSchema(
            ehr=(
                _num("age", "years", 18, 100),
                Feature(name="er", kind="binary", description="oestrogen receptor positive"),
                Feature(name="grade", kind="categorical", categories=_GRADES),
                _num("size", "cm", 0, 20),
            ),
            genomics=GenomicsSchema(kind="expression", features=tuple(genes)),
        )

    def features(self, source: pd.DataFrame) -> pd.DataFrame:
        w = self.name
        return pd.DataFrame(
            {
                "age": numbers(source["age"], what=f"{w} age"),
                "er": booleans(source["er"], truth={"positive": 1, "negative": 0}, what=w),
                "grade": categories(source["grade"], allowed=_GRADES, what=f"{w} grade"),
                "size": numbers(source["size"], what=f"{w} size"),
            }
        )

    def genomics(self, source: pd.DataFrame) -> pd.DataFrame:
        genes = self._genes(source)
        return pd.DataFrame({g: numbers(source[g], what=f"{self.name} {g}") for g in genes})
