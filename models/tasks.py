"""Task definitions: what a model is trained for, its loss, its metrics, its default model.

A *task kind* (:class:`TaskKind`) fixes how model outputs are read: the loss, how logits
become scores, which metrics describe them. ``"binary"`` is here; ``"survival"`` (a
right-censored time to event, :mod:`fedcare.models.survival`) is chosen by a label's
``kind``; more kinds are added by subclassing :class:`TaskKind` in a new file and
decorating it with :func:`register_task_kind`.

A :class:`TaskDefinition` binds a site's :class:`~fedcare.common.spec.TaskSpec` (name, label,
modalities) to a kind and a registered model; :func:`default_model_for` picks the model
from the modalities.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from fedcare.common.errors import ConfigError
from fedcare.common.spec import MODALITIES, LabelSpec, TaskSpec
from fedcare.models.metrics import BINARY_METRICS, binary_metrics
from fedcare.models.registry import model_info

__all__ = [
    "TaskKind",
    "BinaryClassification",
    "TaskDefinition",
    "register_task_kind",
    "task_kind",
    "available_task_kinds",
    "canonical_modalities",
    "default_model_for",
    "task_definition",
]


class TaskKind(ABC):
    """How a model's output is trained and scored. Subclass and register to add a kind.

    Subclasses set :attr:`name` and :attr:`output_dim` and implement the three methods.
    Instances are stateless.
    """

    name: ClassVar[str]
    output_dim: ClassVar[int]

    @abstractmethod
    def make_loss(self, *, reduction: Literal["mean", "sum"] = "mean") -> nn.Module:
        """A fresh loss module ``loss(output, target)`` with the given reduction.

        Opacus ghost clipping needs the criterion's ``reduction`` attribute to equal its
        ``loss_reduction``.
        """

    @abstractmethod
    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """Turn model outputs into the scores :meth:`metrics` reads."""

    @abstractmethod
    def metrics(self, y_true: ArrayLike, y_score: ArrayLike) -> dict[str, float]:
        """Aggregate metrics of scores against targets (only the defined ones)."""

    @property
    @abstractmethod
    def metric_names(self) -> tuple[str, ...]:
        """Every metric name :meth:`metrics` may return."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model this kind trains, around a registered model (default: itself).

        A kind whose outputs are not the registered model's one logit (survival's ``K``
        interval hazards, :mod:`fedcare.models.survival`) adds its head here; every place that
        builds a task's model (site, server, baselines) calls it.
        """
        return model


K = TypeVar("K", bound=type[TaskKind])

_TASK_KINDS: dict[str, type[TaskKind]] = {}


def register_task_kind(cls: K) -> K:
    """Class decorator: register a :class:`TaskKind` subclass under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in _TASK_KINDS:
        raise ConfigError(f"a task kind named {name!r} is already registered; pick another name")
    _TASK_KINDS[name] = cls
    return cls


def available_task_kinds() -> tuple[str, ...]:
    """Names of the registered task kinds, sorted."""
    return tuple(sorted(_TASK_KINDS))


def task_kind(name: str, **options: Any) -> TaskKind:
    """A new instance of the task kind ``name`` (``options``: its keyword arguments, e.g.
    survival's ``cuts``); :class:`ConfigError` if unknown."""
    try:
        return _TASK_KINDS[name](**options)
    except KeyError:
        raise ConfigError(
            f"unknown task kind {name!r}; choose one of: {', '.join(available_task_kinds())}"
        ) from None


@register_task_kind
class BinaryClassification(TaskKind):
    """One logit per patient, ``BCEWithLogitsLoss``, sigmoid scores, binary metrics.

    Examples
    --------
    >>> import torch
    >>> task = BinaryClassification()
    >>> task.scores(torch.tensor([0.0])).tolist()
    [0.5]
    """

    name = "binary"
    output_dim = 1

    def make_loss(self, *, reduction: Literal["mean", "sum"] = "mean") -> nn.Module:
        """``nn.BCEWithLogitsLoss``; targets are float 0/1 of shape ``(B,)``."""
        return nn.BCEWithLogitsLoss(reduction=reduction)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """Probabilities of the positive class: ``sigmoid(logits)``."""
        return torch.sigmoid(output)

    def metrics(self, y_true: ArrayLike, y_score: ArrayLike) -> dict[str, float]:
        """:func:`fedcare.models.metrics.binary_metrics`."""
        return binary_metrics(np.asarray(y_true), np.asarray(y_score))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """``n``, ``threshold`` and the names of :data:`fedcare.models.metrics.BINARY_METRICS`."""
        return ("n", "threshold", *BINARY_METRICS)


# Single-modality defaults; more than one modality always means the fusion model.
_SINGLE_MODALITY_DEFAULT: dict[str, str] = {
    "ehr": "ehr_mlp",
    "imaging": "imaging_cnn",
    "genomics": "genomics_mlp",
}
_MULTIMODAL_DEFAULT = "fusion"
_TIMELINE_DEFAULT = "timeline"


def canonical_modalities(modalities: Iterable[str]) -> tuple[str, ...]:
    """``modalities`` checked and put in the order of :data:`fedcare.common.spec.MODALITIES`.

    Raises
    ------
    ConfigError
        Empty, a modality named twice, or an unknown modality.

    Examples
    --------
    >>> canonical_modalities(["genomics", "ehr"])
    ('ehr', 'genomics')
    """
    mods = list(modalities)
    if isinstance(modalities, str):
        mods = [modalities]
    unknown = sorted({m for m in mods if m not in MODALITIES})
    if not mods or unknown:
        raise ConfigError(
            f"modalities {mods!r} are not a non-empty subset of {MODALITIES}"
            + (f" (unknown: {unknown})" if unknown else "")
            + "; name the modalities the task reads"
        )
    if len(set(mods)) != len(mods):
        raise ConfigError(f"modalities {mods!r} name a modality twice; list each once")
    return tuple(m for m in MODALITIES if m in mods)


def default_model_for(modalities: Iterable[str], *, timeline: bool = False) -> str:
    """The registered model a task reading ``modalities`` uses by default.

    ``timeline``: the task also reads a patient timeline (``TaskSpec.timeline``); an
    EHR-only task then uses the ``timeline`` model.

    Examples
    --------
    >>> default_model_for(("ehr",))
    'ehr_mlp'
    >>> default_model_for(("ehr",), timeline=True)
    'timeline'
    >>> default_model_for(("imaging", "ehr"))
    'fusion'
    """
    mods = canonical_modalities(modalities)
    if len(mods) > 1:
        return _MULTIMODAL_DEFAULT
    if timeline and mods == ("ehr",):
        return _TIMELINE_DEFAULT
    return _SINGLE_MODALITY_DEFAULT[mods[0]]


@dataclass(frozen=True)
class TaskDefinition:
    """A task as training reads it.

    Attributes
    ----------
    name:
        Task name (``TaskSpec.name``).
    label:
        Label name (``TaskSpec.label``).
    modalities:
        Modalities read, in canonical order.
    kind:
        The :class:`TaskKind` (loss, scores, metrics).
    model:
        Registered model name.
    """

    name: str
    label: str
    modalities: tuple[str, ...]
    kind: TaskKind
    model: str


def task_definition(
    spec: TaskSpec,
    *,
    model: str | None = None,
    kind: str = "binary",
    label: LabelSpec | None = None,
) -> TaskDefinition:
    """Bind a :class:`~fedcare.common.spec.TaskSpec` to a task kind and a model.

    Parameters
    ----------
    spec:
        The task from ``site.toml``.
    model:
        A registered model name; ``None`` picks :func:`default_model_for`.
    kind:
        A registered task kind (used when ``label`` is not given).
    label:
        The task's label from ``site.toml``: its ``kind`` decides the task kind (a
        ``"survival"`` label: :class:`fedcare.models.survival.SurvivalTask` over its cuts).

    Raises
    ------
    ConfigError
        Unknown model or kind, or a model that cannot read the task's modalities.
    """
    mods = canonical_modalities(spec.modalities)
    name = (
        model if model is not None else default_model_for(mods, timeline=spec.timeline is not None)
    )
    info = model_info(name)
    missing = [m for m in mods if m not in info.modalities]
    if missing:
        raise ConfigError(
            f"task {spec.name!r} reads {list(mods)} but model {name!r} cannot read "
            f"{missing}; use model {default_model_for(mods)!r} or drop those modalities"
        )
    if label is not None and label.name != spec.label:
        raise ConfigError(f"task {spec.name!r} uses label {spec.label!r}, not {label.name!r}")
    if label is not None and label.kind == "survival":
        bound = task_kind("survival", cuts=label.cuts)
    else:
        bound = task_kind(kind if label is None else label.kind)
    return TaskDefinition(name=spec.name, label=spec.label, modalities=mods, kind=bound, model=name)
