"""Survival curves of a survival task: observed (life table) and predicted, released by a site
as noisy sums, pooled by the server, drawn on the model card.

A survival task's last evaluation also describes the test split as curves at the label's
cuts ``t_1 < ... < t_K`` (interval ``k`` is ``(t_k, t_{k+1}]``, interval ``K`` after the last
cut; :func:`fedcare.models.survival.interval_index`):

What one patient contributes (:func:`contributions`)
    A one-hot cell of the ``(K + 1, 2)`` life table (the interval its time falls in, and
    whether the event happened there; an event after the last cut counts as censored there,
    as in the model's loss), and its predicted survival at the ``K`` cuts,
    ``S(t_1 | x), ..., S(t_K | x)`` in ``[0, 1]``, scaled by ``1 / sqrt(K)``. Both parts have
    L2 norm at most 1, so one patient's whole contribution has norm at most
    :data:`SENSITIVITY` ``= sqrt(2)``.

The mechanism (:func:`release`)
    The exact sums plus ``N(0, (σ Δ)^2)`` on every coordinate, rounded to
    :data:`fedcare.models.evaluation.NOISE_GRID`: the Gaussian mechanism with noise multiplier
    ``σ`` under add/remove-one-patient adjacency, one more step ``Mechanism(σ, 1.0, 1)`` of
    the evaluation's charge (:data:`RELEASE_STEPS`). Everything below is post-processing.

What leaves the site (:func:`release`, :meth:`CurveRelease.to_wire`)
    From the noisy table, the number at risk at the start of each interval,
    ``r_k = sum_{j >= k}`` (events + censored in ``j``), and the events ``d_k``; and the noisy
    sums of predicted survival at each cut (unscaled). Small counts are suppressed: the
    intervals from the first whose (noisy) number at risk is below the site's ``min_count``
    on are withheld (a late interval with one patient at risk is never described: its
    survival would rest on that patient), and the whole release is withheld below
    ``min_count`` patients. Per-interval counts are differences of at-risk numbers; they are
    protected by the noise (one patient is one cell), as the cells of the evaluation's
    histogram are. Nothing per patient leaves.

The curves (:func:`site_curve`, :func:`pooled_curve`)
    ``observed``: the Kaplan-Meier (product-limit) estimate at the cuts, ``S(t_{k+1}) =
    prod_{j <= k} (1 - d_j / r_j)``; on exact counts it equals scikit-survival's
    ``kaplan_meier_estimator`` of the times grouped into intervals (events and censorings of
    one interval tied, the censored still at risk there). ``predicted``: the mean predicted
    survival ``sum_i S(t_k | x_i) / r_0`` (the model's marginal curve, to compare with the
    observed one: calibration of a survival model). The server sums the sites' ``r_k`` and
    ``d_k`` over the sites that released interval ``k`` (a site whose later intervals are
    withheld leaves those hazards to the others) and their predicted sums over all sites.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from fedcare.common import keys
from fedcare.common.errors import ConfigError, DataError
from fedcare.models.evaluation import (
    MAX_RELEASE_VALUE,
    Generator,
    check_release_noise,
    gaussian_on_grid,
)

__all__ = [
    "SENSITIVITY",
    "RELEASE_STEPS",
    "CurveRelease",
    "Curve",
    "contributions",
    "release",
    "release_from_wire",
    "site_curve",
    "pooled_curve",
]

#: L2 bound of one patient's contribution: a one-hot life-table cell and a scaled curve.
SENSITIVITY = math.sqrt(2.0)
#: Gaussian steps the curve release adds to the evaluation that carries it.
RELEASE_STEPS = 1


@dataclass(frozen=True)
class CurveRelease:
    """What a site sends: ``at_risk[k]`` and ``events[k]`` for the released intervals
    ``0..L-1`` (``L <= K``), and ``predicted[k]``, the sum over its patients of the
    predicted survival at cut ``t_{k+1}``, for every ``k < K``. Noisy unless exact."""

    at_risk: tuple[float, ...]
    events: tuple[float, ...]
    predicted: tuple[float, ...]

    @property
    def n(self) -> float:
        """The (noisy) number of patients: those at risk at time 0."""
        return self.at_risk[0] if self.at_risk else 0.0

    def to_wire(self) -> dict[str, float]:
        """The release as reply metrics (``curve.at_risk.<k>``, ``curve.events.<k>``,
        ``curve.predicted.<k>``; :func:`fedcare.common.keys.curve_key`)."""
        out: dict[str, float] = {}
        for part, values in (
            (keys.CURVE_AT_RISK, self.at_risk),
            (keys.CURVE_EVENTS, self.events),
            (keys.CURVE_PREDICTED, self.predicted),
        ):
            out.update({keys.curve_key(part, k): float(v) for k, v in enumerate(values)})
        return out


@dataclass(frozen=True)
class Curve:
    """Curves at the cuts: ``observed[k]`` (Kaplan-Meier) at ``t_{k+1}`` for ``k < L`` and
    ``predicted[k]`` (mean predicted survival) for ``k < K``; ``at_risk``/``events`` the
    counts the observed curve comes from; ``n`` the patients of the predicted mean."""

    n: float
    at_risk: tuple[float, ...]
    events: tuple[float, ...]
    observed: tuple[float, ...]
    predicted: tuple[float, ...]


def _intervals(cuts: Sequence[float]) -> int:
    k = len(cuts)
    if k < 1 or k > keys.MAX_CURVE_INTERVALS:
        raise ConfigError(
            f"survival curves need 1 to {keys.MAX_CURVE_INTERVALS} cuts; the label has {k} "
            "(set fewer 'cuts' on the survival label in site.toml)"
        )
    return k


def contributions(
    event: ArrayLike, interval: ArrayLike, survival: ArrayLike, *, intervals: int
) -> np.ndarray:
    """Each patient's contribution row: the one-hot life-table cell ``(interval, event)``
    (``(K + 1) * 2`` columns, interval-major) then ``survival / sqrt(K)`` (``K`` columns).

    Examples
    --------
    >>> contributions([1, 0], [0, 2], [[0.5, 0.5], [1.0, 1.0]], intervals=2).round(3).tolist()
    [[0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.354, 0.354], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.707, 0.707]]
    """
    e = np.asarray(event, dtype=np.int64)
    k = np.asarray(interval, dtype=np.int64)
    s = np.clip(np.asarray(survival, dtype=np.float64), 0.0, 1.0).reshape(e.size, intervals)
    if e.shape != k.shape or np.any((k < 0) | (k > intervals)) or np.any((e != 0) & (e != 1)):
        raise ConfigError("survival curves: one 0/1 event and one interval 0..K per patient")
    e = np.where(k < intervals, e, 0)  # after the last cut: censored there
    table = np.zeros((e.size, (intervals + 1) * 2))
    table[np.arange(e.size), k * 2 + e] = 1.0
    return np.hstack([table, s / math.sqrt(intervals)])


def release(
    event: ArrayLike,
    interval: ArrayLike,
    survival: ArrayLike,
    *,
    cuts: Sequence[float],
    noise_multiplier: float,
    generator: Generator | None,
    min_count: float,
) -> CurveRelease | None:
    """A site's curve release of one split, or None when withheld whole (fewer than
    ``min_count`` noisy patients).

    ``noise_multiplier`` 0 is the exact mode (a simulated site's own opt-in); above 0 the
    site has charged ``Mechanism(σ, 1.0, 1)`` before calling this.
    """
    intervals = _intervals(cuts)
    check_release_noise(noise_multiplier, generator, what="survival-curve")
    sums = contributions(event, interval, survival, intervals=intervals).sum(axis=0)
    if sums.size == 0 or np.asarray(event).size == 0:
        sums = np.zeros((intervals + 1) * 2 + intervals)
    if noise_multiplier > 0:
        assert generator is not None
        sums = gaussian_on_grid(sums, std=noise_multiplier * SENSITIVITY, generator=generator)
    table = sums[: (intervals + 1) * 2].reshape(intervals + 1, 2)
    predicted = sums[(intervals + 1) * 2 :] * math.sqrt(intervals)
    at_risk = np.cumsum(table.sum(axis=1)[::-1])[::-1]  # r_k: time in interval >= k
    small = np.flatnonzero(at_risk[:intervals] < max(float(min_count), 1.0))
    released = int(small[0]) if small.size else intervals
    if released == 0:
        return None
    return CurveRelease(
        at_risk=tuple(float(v) for v in at_risk[:released]),
        events=tuple(float(v) for v in table[:released, 1]),
        predicted=tuple(float(v) for v in predicted),
    )


def release_from_wire(metrics: Mapping[str, object], *, cuts: Sequence[float]) -> CurveRelease:
    """A site's curve release read back from its reply's ``curve.*`` metrics, checked: the
    run's ``K`` predicted sums, at-risk and event counts of the same leading intervals
    ``0..L-1`` (``1 <= L <= K``), finite values of bounded magnitude.

    Raises
    ------
    DataError
        The release is malformed (missing or extra intervals, a bad value).
    """
    intervals = _intervals(cuts)
    parts: dict[str, dict[int, float]] = {
        keys.CURVE_AT_RISK: {},
        keys.CURVE_EVENTS: {},
        keys.CURVE_PREDICTED: {},
    }
    for name, value in metrics.items():
        parsed = keys.parse_curve_key(name)
        if parsed is None:
            continue
        part, k = parsed
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"survival curve value {name} is not a number")
        v = float(value)
        if not math.isfinite(v) or abs(v) > MAX_RELEASE_VALUE:
            raise DataError(f"survival curve value {name} = {v!r} is not a bounded finite number")
        parts[part][k] = v
    risk, events, predicted = (parts[p] for p in keys.CURVE_PARTS)
    released = len(risk)
    if sorted(predicted) != list(range(intervals)):
        raise DataError(
            f"a survival curve release must carry the predicted sums of all {intervals} cuts"
        )
    if not 1 <= released <= intervals or sorted(risk) != list(range(released)):
        raise DataError("a survival curve release must carry leading intervals 0..L-1, L <= K")
    if sorted(events) != sorted(risk):
        raise DataError("a survival curve release must carry events of every released interval")
    if risk[0] < 1:
        raise DataError("a survival curve release must have at least one patient at risk")
    return CurveRelease(
        at_risk=tuple(risk[k] for k in range(released)),
        events=tuple(events[k] for k in range(released)),
        predicted=tuple(predicted[k] for k in range(intervals)),
    )


def _curve(
    at_risk: Sequence[float], events: Sequence[float], predicted: Sequence[float], n: float
) -> Curve:
    r = np.asarray(at_risk, dtype=np.float64)
    d = np.clip(np.asarray(events, dtype=np.float64), 0.0, None)
    d = np.minimum(d, np.maximum(r, 0.0))  # noisy counts: an interval's hazard stays in [0, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        hazard = np.where(r > 0, d / np.where(r > 0, r, 1.0), 0.0)
    observed = np.cumprod(1.0 - hazard)
    mean = np.clip(np.asarray(predicted, dtype=np.float64) / n, 0.0, 1.0) if n > 0 else ()
    return Curve(
        n=float(n),
        at_risk=tuple(float(v) for v in r),
        events=tuple(float(v) for v in d),
        observed=tuple(float(v) for v in observed),
        predicted=tuple(float(v) for v in mean),
    )


def site_curve(rel: CurveRelease) -> Curve:
    """One site's curves from its own release.

    Examples
    --------
    >>> c = site_curve(CurveRelease((10.0, 8.0), (2.0, 4.0), (9.0, 5.0)))
    >>> c.observed, c.predicted
    ((0.8, 0.4), (0.9, 0.5))
    """
    return _curve(rel.at_risk, rel.events, rel.predicted, rel.n)


def pooled_curve(releases: Sequence[CurveRelease], *, min_count: float) -> Curve | None:
    """The federation's curves from the sites' releases, or None without any.

    Interval ``k``'s number at risk and events are the sums over the sites that released it;
    the observed curve stops before the first interval no site released or whose pooled
    number at risk is below ``min_count``. The predicted mean is the sum of all sites'
    predicted sums over the sum of their patients.

    Examples
    --------
    >>> a = CurveRelease((10.0, 8.0), (2.0, 4.0), (9.0, 5.0))
    >>> b = CurveRelease((10.0,), (0.0,), (10.0, 8.0))
    >>> c = pooled_curve([a, b], min_count=5)
    >>> c.at_risk, c.observed, c.predicted
    ((20.0, 8.0), (0.9, 0.45), (0.95, 0.65))
    """
    if not releases:
        return None
    intervals = len(releases[0].predicted)
    if any(len(r.predicted) != intervals for r in releases):
        raise DataError("survival curve releases of different cuts cannot be pooled")
    at_risk: list[float] = []
    events: list[float] = []
    for k in range(intervals):
        having = [r for r in releases if len(r.at_risk) > k]
        total = float(sum(r.at_risk[k] for r in having))
        if not having or total < max(float(min_count), 1.0):
            break
        at_risk.append(total)
        events.append(float(sum(r.events[k] for r in having)))
    predicted = np.sum([r.predicted for r in releases], axis=0)
    n = float(sum(r.n for r in releases))
    return _curve(at_risk, events, predicted, n)
