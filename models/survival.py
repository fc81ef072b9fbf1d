"""Time-to-event (survival) tasks: a discrete-time hazard model that DP-SGD can train.

The time axis is cut into ``K`` intervals by the label's shared ``cuts`` ``t_1 < ... < t_K``
(``site.toml``; chosen from clinical horizons by the federation, never from one site's
times): interval ``k`` is ``(t_k, t_{k+1}]`` with ``t_0 = 0``, and a time after ``t_K`` is
interval ``K`` (followed past the last cut: censored there).

The model (:class:`DiscreteHazardModel`) is any registered model (``ehr_mlp``,
``genomics_mlp``, ``fusion``, ...), whose one logit per patient becomes a risk score
``eta(x)``, followed by one ``nn.Linear(1, K)``: the hazard of interval ``k`` is
``h_k(x) = sigmoid(w_k eta(x) + b_k)`` (the logistic discrete-time hazard model; with equal
``w_k`` it is proportional in the odds). Only Linear layers are added, so every grad-sample
mode the backbone supports (ghost clipping included) stays valid.

The loss (:class:`DiscreteHazardLoss`) is each patient's negative log-likelihood: a patient
whose time falls in interval ``k`` survived intervals ``0..k-1`` (``-sum log(1 - h_j)``) and,
when the event happened, had it in ``k`` (``-log h_k``); a censored patient adds nothing for
interval ``k``. It is a sum of per-patient terms, so Opacus's per-sample clipping bounds each
patient's influence exactly as for a binary label. Cox's partial likelihood is *not* offered:
its per-patient term depends on every patient of the risk set in the batch, so one patient's
gradient is not separable and per-sample clipping would not bound it.

Survival curves: ``S(t_k | x) = prod_{j <= k} (1 - h_j(x))``; the risk score the metrics
rank is the predicted probability of the event by the last cut, ``1 - S(t_K | x)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import nn

from fedcare.common.errors import ConfigError
from fedcare.models.metrics import UndefinedMetricError
from fedcare.models.survival_metrics import (
    SURVIVAL_METRICS,
    concordance_index,
    cumulative_dynamic_auc,
    evaluation_times,
    integrated_brier_score,
    metrics_from_histogram,
)
from fedcare.models.survival_pooled import add_noise, histogram_of
from fedcare.models.tasks import TaskKind, register_task_kind

__all__ = [
    "INITIAL_HAZARD",
    "interval_index",
    "DiscreteHazardModel",
    "DiscreteHazardLoss",
    "SurvivalTask",
    "survival_curves",
    "event_probability",
    "survival_release",
]

INITIAL_HAZARD = 0.1
"""Every interval's hazard at initialisation (the head's bias), before any training."""


def _cuts(cuts: Sequence[float]) -> tuple[float, ...]:
    c = tuple(float(v) for v in cuts)
    increasing = all(b > a for a, b in zip(c, c[1:], strict=False))
    if not c or not all(np.isfinite(c)) or c[0] <= 0 or not increasing:
        raise ConfigError(
            f"survival cuts {list(c)} must be a non-empty, strictly increasing list of finite "
            "times above 0 (set them on the label in site.toml)"
        )
    return c


def interval_index(time: ArrayLike | torch.Tensor, cuts: Sequence[float]) -> Any:
    """The interval (0..K) each time falls in: ``k`` with ``t_k < time <= t_{k+1}``.

    Examples
    --------
    >>> interval_index(np.array([0.0, 1.0, 1.5, 9.0]), [1.0, 2.0]).tolist()
    [0, 0, 1, 2]
    """
    if isinstance(time, torch.Tensor):
        edges = torch.tensor(cuts, dtype=time.dtype, device=time.device)
        return torch.searchsorted(edges, time.contiguous(), side="left")
    return np.searchsorted(np.asarray(cuts, dtype=np.float64), np.asarray(time), side="left")


class DiscreteHazardModel(nn.Module):
    """A registered model's risk logit turned into ``K`` interval hazard logits.

    ``forward(*inputs)`` returns ``(B, K)`` logits ``w_k eta(x) + b_k``; ``w`` starts at 1
    and ``b`` at the logit of :data:`INITIAL_HAZARD` (no randomness: the backbone's weights
    come from the registry's seeded generator).
    """

    def __init__(self, backbone: nn.Module, *, intervals: int) -> None:
        super().__init__()
        if intervals < 1:
            raise ConfigError(f"a survival model needs at least one interval, got {intervals}")
        self.backbone = backbone
        self.hazard = nn.Linear(1, intervals)
        with torch.no_grad():
            self.hazard.weight.fill_(1.0)
            self.hazard.bias.fill_(float(np.log(INITIAL_HAZARD / (1.0 - INITIAL_HAZARD))))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        eta = self.backbone(*inputs)
        return self.hazard(eta.reshape(-1, 1))


class DiscreteHazardLoss(nn.Module):
    """Negative log-likelihood of the discrete-time hazard with right censoring.

    ``loss(logits, target)``: ``logits`` ``(B, K)``, ``target`` ``(B, 2)`` = (time, event).
    ``reduction``: ``"mean"`` / ``"sum"`` over patients, or ``"none"`` for the ``(B,)``
    per-patient losses (Opacus's ghost clipping sets it).

    Examples
    --------
    >>> loss = DiscreteHazardLoss([1.0, 2.0], reduction="none")
    >>> out = loss(torch.zeros(2, 2), torch.tensor([[1.5, 1.0], [0.5, 0.0]]))
    >>> [round(v, 4) for v in out.tolist()]  # 2 log 2: survived 0, event in 1; censored in 0
    [1.3863, 0.0]
    """

    def __init__(
        self, cuts: Sequence[float], *, reduction: Literal["mean", "sum", "none"] = "mean"
    ) -> None:
        super().__init__()
        self.cuts = _cuts(cuts)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k_max = len(self.cuts)
        if logits.ndim != 2 or logits.shape[1] != k_max or target.shape != (logits.shape[0], 2):
            raise ValueError(
                f"survival loss needs logits (B, {k_max}) and targets (B, 2) = (time, event); "
                f"got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        k = interval_index(target[:, 0], self.cuts)  # 0..K
        event = (target[:, 1] > 0.5) & (k < k_max)  # after the last cut: censored there
        j = torch.arange(k_max, device=logits.device)[None, :]
        at = j == k[:, None]
        y = (at & event[:, None]).to(logits.dtype)
        weight = ((j < k[:, None]) | (at & event[:, None])).to(logits.dtype)
        per_patient = (
            F.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="none")
        ).sum(dim=1)
        if self.reduction == "none":
            return per_patient
        if self.reduction == "sum":
            return per_patient.sum()
        return per_patient.mean() if per_patient.numel() else per_patient.sum()


def survival_curves(hazards: ArrayLike) -> np.ndarray:
    """``S(t_k | x)`` at each cut from interval hazards ``(n, K)`` in ``[0, 1]``."""
    h = np.clip(np.asarray(hazards, dtype=np.float64), 0.0, 1.0)
    return np.cumprod(1.0 - h, axis=1)


def event_probability(hazards: ArrayLike) -> np.ndarray:
    """The risk score: the probability of the event by the last cut, ``1 - S(t_K | x)``."""
    h = np.clip(np.asarray(hazards, dtype=np.float64), 0.0, 1.0)
    if h.shape[1] == 0:
        return np.zeros(h.shape[0])
    # -expm1(sum log1p(-h)): no rounding to 1 while the survival is still distinguishable
    with np.errstate(divide="ignore"):
        return -np.expm1(np.log1p(-h).sum(axis=1))


def _split_targets(y: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(y, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ConfigError(f"{what}: survival targets must be (n, 2) = (time, event)")
    return a[:, 1], a[:, 0]


@register_task_kind
class SurvivalTask(TaskKind):
    """Right-censored time to event: a discrete-time hazard over the label's ``cuts``.

    Examples
    --------
    >>> task = SurvivalTask(cuts=(365.0, 730.0))
    >>> task.wrap(nn.Linear(3, 1))(torch.zeros(4, 3)).shape
    torch.Size([4, 2])
    """

    name = "survival"
    output_dim = 1  # the registered model's one risk logit; wrap() adds the K hazards

    def __init__(self, *, cuts: Sequence[float] | None = None) -> None:
        if cuts is None:
            raise ConfigError(
                "a survival task needs the label's 'cuts' (interval edges); declare them on "
                "its [[labels]] entry in site.toml"
            )
        self.cuts = _cuts(cuts)

    @property
    def intervals(self) -> int:
        """``K``: hazards per patient."""
        return len(self.cuts)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The registered model with the ``K`` hazard head (:class:`DiscreteHazardModel`)."""
        return DiscreteHazardModel(model, intervals=self.intervals)

    def make_loss(self, *, reduction: Literal["mean", "sum"] = "mean") -> nn.Module:
        """:class:`DiscreteHazardLoss` over the cuts."""
        return DiscreteHazardLoss(self.cuts, reduction=reduction)

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """Interval hazards ``sigmoid(logits)``, ``(B, K)``."""
        return torch.sigmoid(output)

    def metrics(
        self,
        y_true: ArrayLike,
        y_score: ArrayLike,
        *,
        train: ArrayLike | None = None,
    ) -> dict[str, float]:
        """Exact ``n``, ``c_index``, ``td_auc`` and ``ibs`` of hazards ``(n, K)``
        against ``(time, event)`` targets; the censoring distribution of the IPCW estimators
        comes from ``train`` (default: the same patients). A metric that is undefined on
        these patients (no comparable pair, fewer than two cuts inside their follow-up) is
        absent, never NaN."""
        event, time = _split_targets(y_true, "survival metrics")
        hazards = np.asarray(y_score, dtype=np.float64)
        tr_event, tr_time = (event, time) if train is None else _split_targets(train, "train")
        out = {"n": float(event.size)}
        if event.size == 0:
            return out
        risk = event_probability(hazards)
        with contextlib.suppress(UndefinedMetricError):  # no comparable pair: absent
            out["c_index"] = concordance_index(event, time, risk)
        # The cuts inside both this split's and the train split's follow-up.
        inside = evaluation_times(self.cuts, time)
        inside = inside[inside < tr_time.max()] if tr_time.size else inside[:0]
        if inside.size:
            columns = [self.cuts.index(float(t)) for t in inside]
            surv = survival_curves(hazards)[:, columns]
            with contextlib.suppress(UndefinedMetricError):  # no case or control: absent
                _, out["td_auc"] = cumulative_dynamic_auc(
                    (tr_event, tr_time), (event, time), 1.0 - surv, inside
                )
            if inside.size >= 2:
                out["ibs"] = integrated_brier_score(
                    (tr_event, tr_time), (event, time), surv, inside
                )
        return out

    @property
    def metric_names(self) -> tuple[str, ...]:
        """``n`` and :data:`fedcare.models.survival_metrics.SURVIVAL_METRICS`."""
        return ("n", *SURVIVAL_METRICS)


def survival_release(
    task: SurvivalTask,
    y_by_split: dict[str, np.ndarray],
    hazards_by_split: dict[str, np.ndarray],
    *,
    noise_multiplier: float,
    generator: np.random.Generator | None,
    min_count: float,
    train: np.ndarray | None = None,
    bins: int = 10,
    histogram: bool = False,
) -> dict[str, float]:
    """One evaluation of a survival model on a site's splits, as the metrics to send.

    ``noise_multiplier`` 0 (exact mode, a simulated site's own opt-in or a non-private run
    the site allows): the exact metrics of :meth:`SurvivalTask.metrics` (IPCW from ``train``).
    Above 0: the Gaussian mechanism on each split's ``(risk bin, interval, event)``
    histogram (:func:`fedcare.models.survival_pooled.histogram_of`; one patient is one cell
    of one split, so the L2 sensitivity is 1 and the noise's standard deviation is
    ``noise_multiplier``; rounded to :data:`fedcare.models.evaluation.NOISE_GRID`), and only
    what is derived from the noisy counts leaves
    (:func:`~fedcare.models.survival_metrics.metrics_from_histogram`: ``n``, ``c_index``,
    ``td_auc``; no ``ibs``, which needs each patient's survival curve). The caller charges
    ``Mechanism(noise_multiplier, 1.0, 1)`` before anything leaves. A split whose (noisy)
    ``n`` is below ``min_count`` is withheld whole.

    ``histogram``: also send each released split's histogram of ``bins`` risk bins
    (``<split>.surv_hist.<b>.<k>.<e>``, :mod:`fedcare.models.survival_pooled`), for the
    server's pooled C-index: under DP the very noisy counts the metrics come from (the same
    Gaussian step, no further charge), in exact mode the exact counts.
    """
    if noise_multiplier > 0 and generator is None:
        raise ConfigError("a DP survival evaluation needs a generator for its noise (OS entropy)")
    out: dict[str, float] = {}
    for split in sorted(y_by_split):
        event, time = _split_targets(y_by_split[split], split)
        hazards = np.asarray(hazards_by_split[split], dtype=np.float64)
        hist = None
        if noise_multiplier > 0 or histogram:
            hist = add_noise(
                histogram_of(
                    event.astype(np.int64),
                    interval_index(time, task.cuts),
                    event_probability(hazards) if event.size else np.zeros(0),
                    intervals=task.intervals,
                    bins=bins,
                ),
                noise_multiplier=noise_multiplier,
                generator=generator,
            )
        if noise_multiplier == 0:
            if event.size < max(min_count, 1.0):
                continue
            derived = task.metrics(y_by_split[split], hazards, train=train)
        else:
            assert hist is not None
            derived = metrics_from_histogram(
                hist.counts.ravel(), intervals=task.intervals, bins=bins, min_count=min_count
            )
        out.update({f"{split}.{name}": value for name, value in derived.items()})
        if histogram and derived and hist is not None:
            out.update(hist.to_wire(split))
    return out
