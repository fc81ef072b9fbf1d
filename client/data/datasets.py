"""Torch datasets for a site's task, and :func:`build_task_data`, which every stage uses.

Datasets return **tuples of tensors** (never dicts), which is what Opacus's
``DPDataLoader`` and the default collate function need:

=====================  ==========================================================
dataset                item
=====================  ==========================================================
:class:`TabularDataset`     ``(x: float32[d], y: float32[])`` -- EHR or genomics
:class:`ImageDataset`       ``(x: float32[1, H, W], y: float32[])``
:class:`MultimodalDataset`  ``(x_ehr, x_img, x_gen, mask: float32[3], y)``
=====================  ==========================================================

``mask`` flags which modalities a patient has, in :data:`fedcare.common.spec.MODALITIES` order
(ehr, imaging, genomics); a missing modality's tensor is all zeros. A modality the task does
not read is a zero-width tensor (shape ``(0,)``) with mask 0.

:func:`build_task_data` turns a loaded :class:`SiteData` into a :class:`TaskData`: it keeps
the patients that have the task's label (and its modality, or for a multimodal task at least
one of its modalities), splits them by patient with :func:`split_patients`, fits the encoders
on the train split only, and encodes every split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, TensorDataset

from fedcare.common.encoding import TIMELINE_KEY, task_ehr_features, task_timeline, timeline_width
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import MODALITIES, TaskSpec

from .preprocess import GenomicsEncoder, ImageNormalizer, TabularEncoder
from .sequences import encode_timelines, timeline_patients
from .site import SiteData
from .split import SPLIT_NAMES, Split, split_patients
from .survival_labels import time_column

__all__ = [
    "Encoder",
    "InputDim",
    "TabularDataset",
    "ImageDataset",
    "MultimodalDataset",
    "TaskData",
    "build_task_data",
]

Encoder = TabularEncoder | GenomicsEncoder | ImageNormalizer
"""A fitted encoder of one modality."""

InputDim = int | tuple[int, int] | tuple[int, int, int]
"""A modality's encoded input size: a width, or ``(1, H, W)`` for images (and a timeline's
``(max_length, codes)`` under :data:`fedcare.common.encoding.TIMELINE_KEY`)."""

TensorLike = np.ndarray | torch.Tensor


def _float_tensor(x: TensorLike, what: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32).contiguous()
    if t.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or inf; encode it with fedcare.client.data.preprocess")
    return t


def _label_tensor(y: TensorLike) -> torch.Tensor:
    """Labels: ``(n,)`` binary, or ``(n, 2)`` = (time, event) of a survival label."""
    t = torch.as_tensor(y, dtype=torch.float32)
    return _float_tensor(t, "y", 2 if t.ndim == 2 and t.shape[1] == 2 else 1)


def _check_rows(**tensors: torch.Tensor) -> None:
    rows = {name: int(t.shape[0]) for name, t in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"tensors disagree on the number of patients: {rows}")


class TabularDataset(TensorDataset):
    """Vectors and binary labels: item ``(x: float32[d], y: float32[])``.

    Parameters
    ----------
    x:
        ``(n, d)`` encoded features.
    y:
        ``(n,)`` labels, 0.0 or 1.0.

    Examples
    --------
    >>> import numpy as np
    >>> ds = TabularDataset(np.zeros((3, 2)), np.array([0.0, 1.0, 1.0]))
    >>> x, y = ds[1]
    >>> tuple(x.shape), x.dtype, y.shape, float(y)
    ((2,), torch.float32, torch.Size([]), 1.0)
    """

    def __init__(self, x: TensorLike, y: TensorLike) -> None:
        xt, yt = _float_tensor(x, "x", 2), _label_tensor(y)
        _check_rows(x=xt, y=yt)
        super().__init__(xt, yt)

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[-1]


class ImageDataset(TensorDataset):
    """Images and binary labels: item ``(x: float32[1, H, W], y: float32[])``.

    Parameters
    ----------
    x:
        ``(n, 1, H, W)`` normalised images.
    y:
        ``(n,)`` labels, 0.0 or 1.0.
    """

    def __init__(self, x: TensorLike, y: TensorLike) -> None:
        xt, yt = _float_tensor(x, "x", 4), _label_tensor(y)
        if xt.shape[1] != 1:
            raise ValueError(f"images must have one channel, got shape {tuple(xt.shape)}")
        _check_rows(x=xt, y=yt)
        super().__init__(xt, yt)

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[-1]


class MultimodalDataset(TensorDataset):
    """Item ``(x_ehr, x_img, x_gen, mask, y)``; ``mask`` = (ehr, imaging, genomics) present.

    A modality a patient lacks (mask 0) is all zeros: the constructor multiplies each
    modality by its mask column, so this holds whatever the inputs. A modality the task does
    not read is passed as an ``(n, 0)`` array.

    Parameters
    ----------
    x_ehr:
        ``(n, d)`` encoded EHR, or ``(n, 0)``.
    x_img:
        ``(n, 1, H, W)`` normalised images, or ``(n, 0)``.
    x_gen:
        ``(n, g)`` encoded genomics, or ``(n, 0)``.
    mask:
        ``(n, 3)`` 0/1 flags in :data:`fedcare.common.spec.MODALITIES` order.
    y:
        ``(n,)`` labels, 0.0 or 1.0.
    """

    def __init__(
        self,
        x_ehr: TensorLike,
        x_img: TensorLike,
        x_gen: TensorLike,
        mask: TensorLike,
        y: TensorLike,
    ) -> None:
        m = _float_tensor(mask, "mask", 2)
        if m.shape[1] != len(MODALITIES) or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"mask must be (n, {len(MODALITIES)}) of 0/1 values")
        xs = []
        slots = ((x_ehr, "x_ehr", 2), (x_img, "x_img", 4), (x_gen, "x_gen", 2))
        for j, (raw, what, ndim) in enumerate(slots):
            t = torch.as_tensor(raw, dtype=torch.float32)
            unused = t.ndim == 2 and t.shape[1] == 0
            t = _float_tensor(t, what, 2 if unused else ndim)
            xs.append(t * m[:, j].reshape(-1, *([1] * (t.ndim - 1))))
        yt = _label_tensor(y)
        _check_rows(x_ehr=xs[0], x_img=xs[1], x_gen=xs[2], mask=m, y=yt)
        super().__init__(xs[0], xs[1], xs[2], m, yt)

    @property
    def mask(self) -> torch.Tensor:
        return self.tensors[3]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[-1]


# ------------------------------------------------------------------ modality inputs


class _ModalityInput(ABC):
    """How one modality of a site is selected, fitted (train only) and encoded."""

    modality: ClassVar[str]

    def __init__(self, site: SiteData, task: TaskSpec) -> None:
        self.site = site
        self.task = task

    @abstractmethod
    def input_dim(self) -> InputDim:
        """The encoded size, from the schema only."""

    @abstractmethod
    def present(self) -> frozenset[str]:
        """Ids of the patients who have this modality."""

    @abstractmethod
    def fit(self, ids: Sequence[str]) -> Encoder:
        """Fit the encoder on ``ids`` (the train patients having this modality)."""

    @abstractmethod
    def encode(self, ids: Sequence[str]) -> np.ndarray:
        """Encoded rows of ``ids`` (all having this modality), after :meth:`fit`."""


_INPUTS: dict[str, type[_ModalityInput]] = {}


def _register(cls: type[_ModalityInput]) -> type[_ModalityInput]:
    _INPUTS[cls.modality] = cls
    return cls


def _not_all_missing(df: pd.DataFrame | None, columns: Sequence[str]) -> frozenset[str]:
    if df is None or not columns:
        return frozenset()
    observed = df.loc[:, list(columns)].notna().any(axis=1)
    return frozenset(str(p) for p in df.index[observed.to_numpy()])


@_register
class _EHRInput(_ModalityInput):
    """EHR + event features (the task's ``features`` if it restricts them), schema order,
    then the task's timeline flattened (:mod:`fedcare.client.data.sequences`), if it reads one.

    A patient has EHR when their row holds at least one of those features (or, for a task
    reading a timeline, at least one of its events).
    """

    modality = "ehr"

    def __init__(self, site: SiteData, task: TaskSpec) -> None:
        super().__init__(site, task)
        features = task_ehr_features(site.spec.feature_schema, task)
        if not features:
            raise ConfigError(
                f"task {task.name!r} reads ehr, but the schema lists no [[schema.ehr]] or "
                "[[schema.events]] feature; add them to site.toml"
            )
        self.encoder = TabularEncoder(features)
        self.columns = [f.name for f in features]
        self.timeline = task_timeline(site.spec.feature_schema, task)
        if site.ehr is not None:
            absent = [c for c in self.columns if c not in site.ehr.columns]
            if absent:
                raise DataError(
                    f"site {site.spec.site_id!r}: the EHR table lacks schema feature(s) "
                    f"{', '.join(absent)}; reload the site with the current loader"
                )

    def input_dim(self) -> InputDim:
        extra = 0 if self.timeline is None else timeline_width(self.timeline)
        return self.encoder.width + extra

    def present(self) -> frozenset[str]:
        present = _not_all_missing(self.site.ehr, self.columns)
        if self.timeline is None:
            return present
        in_ehr = frozenset() if self.site.ehr is None else frozenset(self.site.ehr.index)
        return present | (timeline_patients(self.site.events, self.timeline) & in_ehr)

    def _rows(self, ids: Sequence[str]) -> pd.DataFrame:
        if self.site.ehr is None:
            return pd.DataFrame(columns=self.columns)
        return self.site.ehr.loc[list(ids), self.columns]

    def fit(self, ids: Sequence[str]) -> Encoder:
        return self.encoder.fit(self._rows(ids))

    def encode(self, ids: Sequence[str]) -> np.ndarray:
        static = self.encoder.transform(self._rows(ids))
        if self.timeline is None:
            return static
        sequences = encode_timelines(self.site.events, self.timeline, patient_ids=ids)
        return np.hstack([static, sequences.reshape(len(ids), -1)])


@_register
class _ImagingInput(_ModalityInput):
    """Images of the schema's shape; a patient has imaging when an image is loaded."""

    modality = "imaging"

    def __init__(self, site: SiteData, task: TaskSpec) -> None:
        super().__init__(site, task)
        schema = site.spec.feature_schema.imaging
        if schema is None:
            raise ConfigError(
                f"task {task.name!r} reads imaging, but the schema has no [schema.imaging] "
                "shape; add it to site.toml"
            )
        self.encoder = ImageNormalizer(schema.shape)

    def input_dim(self) -> InputDim:
        return self.encoder.output_shape

    def present(self) -> frozenset[str]:
        return frozenset(str(p) for p in (self.site.images or {}))

    def _images(self, ids: Sequence[str]) -> list[np.ndarray]:
        images = self.site.images or {}
        return [images[p] for p in ids]

    def fit(self, ids: Sequence[str]) -> Encoder:
        return self.encoder.fit(self._images(ids))

    def encode(self, ids: Sequence[str]) -> np.ndarray:
        return self.encoder.transform_many(self._images(ids))


@_register
class _GenomicsInput(_ModalityInput):
    """The genomics matrix; a patient has genomics when their row holds any value."""

    modality = "genomics"

    def __init__(self, site: SiteData, task: TaskSpec) -> None:
        super().__init__(site, task)
        schema = site.spec.feature_schema.genomics
        if schema is None:
            raise ConfigError(
                f"task {task.name!r} reads genomics, but the schema has no "
                "[schema.genomics]; add it to site.toml"
            )
        self.encoder = GenomicsEncoder(schema)
        self.columns = list(schema.features)

    def input_dim(self) -> InputDim:
        return self.encoder.width

    def present(self) -> frozenset[str]:
        genomics = self.site.genomics
        if genomics is not None:
            absent = [c for c in self.columns if c not in genomics.columns]
            if absent:
                raise DataError(
                    f"site {self.site.spec.site_id!r}: the genomics matrix lacks schema "
                    f"feature(s) {', '.join(absent[:5])}; reload the site with the current loader"
                )
        return _not_all_missing(genomics, self.columns)

    def _rows(self, ids: Sequence[str]) -> pd.DataFrame:
        if self.site.genomics is None:
            return pd.DataFrame(columns=self.columns)
        return self.site.genomics.loc[list(ids), self.columns]

    def fit(self, ids: Sequence[str]) -> Encoder:
        return self.encoder.fit(self._rows(ids))

    def encode(self, ids: Sequence[str]) -> np.ndarray:
        return self.encoder.transform(self._rows(ids))


_SINGLE_MODALITY_DATASETS: dict[str, Callable[[np.ndarray, np.ndarray], Dataset[Any]]] = {
    "ehr": TabularDataset,
    "genomics": TabularDataset,
    "imaging": ImageDataset,
}


# ------------------------------------------------------------------------ task data


@dataclass(frozen=True)
class TaskData:
    """One task's datasets at one site, and everything needed to rebuild or explain them.

    Attributes
    ----------
    site_id:
        The site's id.
    task:
        The task's spec.
    modalities:
        The modalities the task reads, in :data:`fedcare.common.spec.MODALITIES` order.
    train, val, test:
        The datasets; single-modality tasks get a :class:`TabularDataset` (ehr, genomics)
        or :class:`ImageDataset`, multimodal ones a :class:`MultimodalDataset`.
    input_dims:
        Modality -> encoded size (``int`` width, or ``(1, H, W)``); schema-derived, so equal
        at every site of a federation.
    n:
        Patients per split.
    encoders:
        Modality -> encoder fitted on the train split (``state_dict()`` for checkpoints).
    patient_ids:
        The patient ids of each split, in dataset row order.
    """

    site_id: str
    task: TaskSpec
    modalities: tuple[str, ...]
    train: Dataset[Any]
    val: Dataset[Any]
    test: Dataset[Any]
    input_dims: dict[str, InputDim]
    n: dict[str, int]
    encoders: dict[str, Encoder]
    patient_ids: Split

    @property
    def multimodal(self) -> bool:
        """Whether the datasets are :class:`MultimodalDataset`."""
        return len(self.modalities) > 1

    def dataset(self, split: str) -> Dataset[Any]:
        """The dataset of ``split`` (one of :data:`fedcare.client.data.split.SPLIT_NAMES`)."""
        if split not in SPLIT_NAMES:
            raise KeyError(f"no split {split!r}; the splits are {', '.join(SPLIT_NAMES)}")
        ds: Dataset[Any] = getattr(self, split)
        return ds


def _labelled(site: SiteData, task: TaskSpec) -> pd.Series:
    if task.label not in site.labels.columns:
        raise DataError(
            f"site {site.spec.site_id!r}: no label column {task.label!r} for task "
            f"{task.name!r}; check its [[labels]] entry and reload the site"
        )
    y = pd.to_numeric(site.labels[task.label], errors="coerce")
    y.index = [str(p) for p in y.index]
    if site.spec.label(task.label).kind == "survival":  # labelled: an event and a time
        time = pd.to_numeric(site.labels[time_column(task.label)], errors="coerce")
        y = y.where(time.to_numpy() >= 0)
    return y[y.notna()].astype(np.float64)


def _targets(site: SiteData, task: TaskSpec, labels: pd.Series, ids: Sequence[str]) -> np.ndarray:
    """The training targets of ``ids``: ``(n,)`` 0/1, or ``(n, 2)`` (time, event) for a
    survival label."""
    event = labels.loc[list(ids)].to_numpy(dtype=np.float32)
    if site.spec.label(task.label).kind != "survival":
        return event
    times = pd.Series(
        site.labels[time_column(task.label)].to_numpy(dtype=np.float64),
        index=[str(p) for p in site.labels.index],
    )
    return np.stack([times.loc[list(ids)].to_numpy(dtype=np.float32), event], axis=1)


def build_task_data(
    site: SiteData,
    task_name: str,
    *,
    seed: int | None = None,
    fractions: Sequence[float] | None = None,
) -> TaskData:
    """Select, split, fit (train only) and encode a site's patients for one task.

    Patients without the task's label are dropped. A single-modality task keeps the
    patients who have its modality; a multimodal task keeps those with at least one of its
    modalities, zero-filling and masking the others. Patients are split by
    :func:`split_patients` with the site's own ``[split]`` (``site.toml``) unless ``seed`` /
    ``fractions`` are given, so a patient's split does not depend on the task and no run
    config can choose it. Encoders are fitted on the train patients only.

    Parameters
    ----------
    site:
        The loaded, validated site.
    task_name:
        A task declared in the site's ``site.toml``.
    seed:
        Split seed (default: the site's ``split.seed``).
    fractions:
        ``(train, val, test)`` shares (default: the site's ``split.fractions``).

    Raises
    ------
    ConfigError
        Unknown task, or the schema lacks a modality the task reads.
    DataError
        A split is empty, the train split holds one class only, or the site lacks the
        single modality the task reads; the message names the site, the task and the fix.
    """
    spec = site.spec
    site_id = spec.site_id
    task = spec.task(task_name)
    modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in task.modalities)
    inputs = {m: _INPUTS[m](site, task) for m in modalities}
    multimodal = len(modalities) > 1

    present = {m: inputs[m].present() for m in modalities}
    if not multimodal and not present[modalities[0]]:
        raise DataError(
            f"site {site_id!r} has no {modalities[0]} data, which task {task.name!r} reads; "
            "run this task only at sites holding that modality, or pick another task"
        )
    labels = _labelled(site, task)
    have_any = frozenset().union(*present.values())
    eligible = sorted(p for p in labels.index if p in have_any)
    split = split_patients(
        eligible,
        seed=spec.split.seed if seed is None else seed,
        fractions=spec.split.fractions if fractions is None else fractions,
    )

    sizes = split.sizes()
    if min(sizes.values()) == 0:
        empty = ", ".join(name for name, k in sizes.items() if k == 0)
        raise DataError(
            f"site {site_id!r}, task {task.name!r}: the {empty} split is empty "
            f"({len(eligible)} labelled patients with {' or '.join(modalities)}; "
            f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']}); at least 3 "
            "such patients are needed -- add patients, or leave this site out of the task"
        )
    train_classes = sorted(set(labels.loc[list(split.train)].tolist()))
    survival = spec.label(task.label).kind == "survival"
    if survival and 1.0 not in train_classes:
        raise DataError(
            f"site {site_id!r}, task {task.name!r}: every one of the {sizes['train']} train "
            "patients is censored; a hazard model needs observed events -- add patients, "
            "try another split seed, or leave this site out of the task"
        )
    if not survival and len(train_classes) < 2:
        raise DataError(
            f"site {site_id!r}, task {task.name!r}: the train split holds only class "
            f"{int(train_classes[0])} ({sizes['train']} patients); both classes are needed "
            "-- add labelled patients of the other class, try another split seed, or leave "
            "this site out of the task"
        )

    encoders: dict[str, Encoder] = {}
    for m in modalities:
        encoders[m] = inputs[m].fit([p for p in split.train if p in present[m]])

    def encoded(m: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        dim = inputs[m].input_dim()
        shape = (len(ids), *(dim if isinstance(dim, tuple) else (dim,)))
        flags = np.fromiter((p in present[m] for p in ids), dtype=np.bool_, count=len(ids))
        out = np.zeros(shape, dtype=np.float32)
        if flags.any():
            out[flags] = inputs[m].encode([p for p, f in zip(ids, flags, strict=True) if f])
        return out, flags

    datasets: dict[str, Dataset[Any]] = {}
    for name in SPLIT_NAMES:
        ids = split[name]
        y = _targets(site, task, labels, ids)
        if not multimodal:
            x, _ = encoded(modalities[0], ids)
            datasets[name] = _SINGLE_MODALITY_DATASETS[modalities[0]](x, y)
            continue
        xs: list[np.ndarray] = []
        mask = np.zeros((len(ids), len(MODALITIES)), dtype=np.float32)
        for j, m in enumerate(MODALITIES):
            if m in inputs:
                x, flags = encoded(m, ids)
                mask[:, j] = flags
            else:
                x = np.zeros((len(ids), 0), dtype=np.float32)
            xs.append(x)
        datasets[name] = MultimodalDataset(xs[0], xs[1], xs[2], mask, y)

    dims = {m: inputs[m].input_dim() for m in modalities}
    timeline = task_timeline(spec.feature_schema, task)
    if timeline is not None:
        dims[TIMELINE_KEY] = (timeline.max_length, len(timeline.codes))
    return TaskData(
        site_id=site_id,
        task=task,
        modalities=modalities,
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        input_dims=dims,
        n=sizes,
        encoders=encoders,
        patient_ids=split,
    )
