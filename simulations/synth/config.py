"""The knobs of the synthetic-hospital generator: one frozen, validated config."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SynthConfig", "IMAGE_FORMATS", "TABLE_FORMATS", "ImageFormat", "TableFormat"]

ImageFormat = Literal["mixed", "png", "npy", "dicom"]
TableFormat = Literal["mixed", "csv", "parquet"]

#: The concrete image formats; ``"mixed"`` cycles through them by site index.
IMAGE_FORMATS: tuple[str, ...] = ("png", "npy", "dicom")
#: The concrete table formats; ``"mixed"`` alternates them by site index.
TABLE_FORMATS: tuple[str, ...] = ("csv", "parquet")


class SynthConfig(BaseModel):
    """How the synthetic hospitals differ from each other; every default is fixed.

    Attributes
    ----------
    patients_per_site:
        Mean number of patients per site (the site sizes average to exactly this,
        up to rounding; no site gets fewer than 10).
    size_skew:
        Site-size heterogeneity: sizes are proportional to ``exp(N(0, size_skew))``
        weights normalised to mean 1. ``0`` gives equal sizes.
    prevalence_skew:
        Standard deviation of a per-(site, task) shift of the label logit's intercept.
        ``0`` gives every site the same intercept.
    covariate_shift:
        Standard deviation, in population-sd units, of a per-site shift of the latent
        frailty, age, BMI and every lab. ``0`` gives identically distributed sites.
    missing_modality_rate:
        Expected fraction of a site's patients lacking imaging and/or genomics (each
        such patient lacks imaging only, genomics only, or both, with equal chance).
    feature_missing_rate:
        Expected fraction of missing cells in the EHR columns that may be missing
        (BMI, SpO2, the labs, smoking): half missing completely at random, half at
        random given the admission type (elective stays skip more measurements).
    n_genes:
        Number of genes in the expression matrix (the first six drivers are hidden
        among them at seed-chosen positions).
    image_size:
        Height and width of every image, in pixels.
    image_format:
        ``"png"`` (16-bit grey), ``"npy"`` (float32), ``"dicom"`` or ``"mixed"``
        (site ``i`` uses ``("png", "npy", "dicom")[i % 3]``).
    table_format:
        ``"csv"``, ``"parquet"`` or ``"mixed"`` (site ``i`` uses
        ``("csv", "parquet")[i % 2]``), for every table of the site.
    temporal_signal:
        Add the temporal task (:mod:`fedcare.simulations.synth.timeline`): a blood culture
        and an antibiotic start per patient in the events file, a label carried by their
        order and timing, the ``stay`` timeline in the schema and the tasks ``infection``
        (event aggregates) and ``infection_timeline`` (the timeline). Off by default, which
        leaves the default hospitals unchanged.
    simulated:
        Write each ``site.toml`` with the simulation-only opt-ins (``[simulation]``:
        reproducible DP noise from the seed, exact evaluation metrics). Turn it off for
        hospitals used in a deployment, which refuse that table.
    groups:
        Declare the group attributes ``sex`` (F, M) and ``age_band`` (cut at 50 and 70
        years) in the schema (``[[schema.groups]]``) and on every task, so every evaluation
        reports per-group metrics (:mod:`fedcare.models.fairness`).
    group_shift:
        A group-dependent shift for the fairness report to find: for female patients every
        task's true logit is shrunk toward the site's mean logit of its female patients by
        this fraction (``eta' = m + (1 - group_shift) (eta - m)``), so the label carries less
        signal for them (``0``: no shift; ``1``: none at all). Male patients are unchanged.

    survival:
        Add the time-to-event task (:mod:`fedcare.simulations.synth.survival`): time to
        readmission or death, right-censored, in the outcomes table, with the survival label
        and the EHR task ``survival``. Off by default, which leaves the default hospitals
        unchanged.

    Examples
    --------
    >>> SynthConfig().patients_per_site
    300
    >>> SynthConfig(image_format="npy").image_format_for(site=2)
    'npy'
    >>> SynthConfig().image_format_for(site=2)
    'dicom'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    patients_per_site: int = Field(default=300, ge=10, le=1_000_000)
    size_skew: float = Field(default=0.3, ge=0.0, le=3.0)
    prevalence_skew: float = Field(default=0.3, ge=0.0, le=5.0)
    covariate_shift: float = Field(default=0.3, ge=0.0, le=5.0)
    missing_modality_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    feature_missing_rate: float = Field(default=0.1, ge=0.0, le=0.5)
    n_genes: int = Field(default=200, ge=10, le=50_000)
    image_size: int = Field(default=32, ge=16, le=1024)
    image_format: ImageFormat = "mixed"
    table_format: TableFormat = "mixed"
    temporal_signal: bool = False
    simulated: bool = True
    groups: bool = False
    group_shift: float = Field(default=0.0, ge=0.0, le=1.0)
    survival: bool = False

    def image_format_for(self, *, site: int) -> str:
        """The concrete image format that site ``site`` is written in."""
        if self.image_format == "mixed":
            return IMAGE_FORMATS[site % len(IMAGE_FORMATS)]
        return self.image_format

    def table_format_for(self, *, site: int) -> str:
        """The concrete table format that site ``site`` is written in."""
        if self.table_format == "mixed":
            return TABLE_FORMATS[site % len(TABLE_FORMATS)]
        return self.table_format
