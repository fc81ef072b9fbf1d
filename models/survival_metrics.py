"""Metrics of time-to-event predictions: Harrell's C-index, time-dependent AUC, IPCW Brier.

Exact metrics (a site's own, or the experimenter's baselines) follow the estimators of
scikit-survival, which the tests use as the independent reference:

* :func:`concordance_index`: Harrell's C. A pair ``(i, j)`` is comparable when ``i`` had the
  event and ``T_i < T_j``, or ``T_i = T_j`` with ``j`` censored; it is concordant when
  ``i``'s risk is higher; risks within ``tied_tol`` count one half.
* :func:`cumulative_dynamic_auc`: Uno's cumulative/dynamic AUC at each time ``t`` (cases: an
  event by ``t``, weighted by the inverse probability of censoring ``1 / G(T_i)``; controls:
  still event-free after ``t``) and its mean weighted by the Kaplan-Meier drop of the test
  data; ``G`` is the Kaplan-Meier estimate of the censoring distribution of the *training*
  data.
* :func:`brier_scores` and :func:`integrated_brier_score`: the IPCW Brier score of predicted
  survival probabilities at each time, and its trapezoidal integral over the times divided by
  their span.

:func:`histogram_contributions` and :func:`metrics_from_histogram` are the differentially
private release (:mod:`fedcare.models.survival`): every patient adds 1 to one cell of a
(risk bin, time interval, event) histogram, and the C-index and time-dependent AUC are
computed from the (noisy) counts alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from fedcare.models.metrics import MetricInputError, UndefinedMetricError

__all__ = [
    "SURVIVAL_METRICS",
    "check_survival",
    "kaplan_meier",
    "step_function",
    "concordance_index",
    "cumulative_dynamic_auc",
    "brier_scores",
    "integrated_brier_score",
    "evaluation_times",
    "histogram_contributions",
    "metrics_from_histogram",
]

SURVIVAL_METRICS = ("c_index", "td_auc", "ibs")
"""Metric names a survival evaluation may report, besides ``n``."""


def check_survival(event: ArrayLike, time: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(event as bool, time as float64)``, checked: 1-D, same length, 0/1 events, finite
    times at or above 0."""
    e = np.asarray(event, dtype=np.float64)
    t = np.asarray(time, dtype=np.float64)
    if e.ndim != 1 or e.shape != t.shape:
        raise MetricInputError(
            f"{what}: events {e.shape} and times {t.shape} must be 1-D of the same length"
        )
    if not np.all((e == 0) | (e == 1)):
        raise MetricInputError(f"{what}: events must be 0 (censored) or 1 (event)")
    if not np.all(np.isfinite(t)) or (t.size and t.min() < 0):
        raise MetricInputError(f"{what}: times must be finite and at least 0")
    return e.astype(bool), t


def kaplan_meier(
    event: ArrayLike, time: ArrayLike, *, reverse: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The Kaplan-Meier estimate: ``(distinct times, survival just after each)``.

    ``reverse=True`` estimates the censoring distribution ``G``: censorings are the
    "events", and an event at the same time as a censoring is taken to come first (the
    patient who had the event was not at risk of being censored after it).

    Examples
    --------
    >>> t, s = kaplan_meier([1, 0, 1], [1.0, 2.0, 3.0])
    >>> t.tolist(), [round(float(v), 3) for v in s]
    ([1.0, 2.0, 3.0], [0.667, 0.667, 0.0])
    """
    e, t = check_survival(event, time, "kaplan_meier")
    times = np.unique(t)
    at_risk = (t[None, :] >= times[:, None]).sum(axis=1).astype(np.float64)
    same = t[None, :] == times[:, None]
    if reverse:
        hits = (same & ~e[None, :]).sum(axis=1)
        at_risk = at_risk - (same & e[None, :]).sum(axis=1)
    else:
        hits = (same & e[None, :]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(at_risk > 0, 1.0 - hits / at_risk, 1.0)
    return times, np.cumprod(factor)


def step_function(times: np.ndarray, values: np.ndarray, at: ArrayLike) -> np.ndarray:
    """A right-continuous step function (1 before ``times[0]``) evaluated at ``at``."""
    idx = np.searchsorted(times, np.asarray(at, dtype=np.float64), side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], 1.0)


def concordance_index(
    event: ArrayLike, time: ArrayLike, risk: ArrayLike, *, tied_tol: float = 1e-8
) -> float:
    """Harrell's C-index of risk scores (higher risk = earlier event).

    Raises
    ------
    UndefinedMetricError
        No comparable pair (no event, or every event at the latest time).

    Examples
    --------
    >>> concordance_index([1, 1, 0], [1.0, 2.0, 3.0], [0.9, 0.5, 0.1])
    1.0
    >>> concordance_index([1, 1, 0], [1.0, 2.0, 3.0], [0.1, 0.5, 0.9])
    0.0
    """
    e, t = check_survival(event, time, "concordance_index")
    r = np.asarray(risk, dtype=np.float64)
    if r.shape != t.shape or not np.all(np.isfinite(r)):
        raise MetricInputError("concordance_index: one finite risk score per patient")
    later = (t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :])
    comparable = e[:, None] & later
    np.fill_diagonal(comparable, False)
    if not comparable.any():
        raise UndefinedMetricError("C-index: no comparable pair (an event before another time)")
    diff = r[:, None] - r[None, :]
    tied = np.abs(diff) <= tied_tol
    concordant = (diff > 0) & ~tied
    score = concordant[comparable].sum() + 0.5 * tied[comparable].sum()
    return float(score / comparable.sum())


def _censoring(train_event: np.ndarray, train_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if train_event.all():  # nobody censored: G = 1
        return np.unique(train_time), np.ones(np.unique(train_time).size)
    return kaplan_meier(train_event, train_time, reverse=True)


def _times(times: ArrayLike) -> np.ndarray:
    ts = np.atleast_1d(np.asarray(times, dtype=np.float64))
    if ts.ndim != 1 or ts.size == 0 or not np.all(np.isfinite(ts)) or np.any(np.diff(ts) <= 0):
        raise MetricInputError("evaluation times must be a non-empty increasing 1-D array")
    return ts


def cumulative_dynamic_auc(
    train: tuple[ArrayLike, ArrayLike],
    test: tuple[ArrayLike, ArrayLike],
    risk: ArrayLike,
    times: ArrayLike,
    *,
    tied_tol: float = 1e-8,
) -> tuple[np.ndarray, float]:
    """Uno's cumulative/dynamic AUC at each of ``times`` and its KM-weighted mean.

    Parameters
    ----------
    train, test:
        ``(event, time)`` of the data the censoring distribution is estimated on and of the
        patients scored.
    risk:
        ``(n,)`` risk scores, or ``(n, len(times))`` (one column per time).
    times:
        Increasing evaluation times inside the test data's follow-up.
    """
    tr_e, tr_t = check_survival(*train, "cumulative_dynamic_auc (train)")
    e, t = check_survival(*test, "cumulative_dynamic_auc (test)")
    ts = _times(times)
    r = np.asarray(risk, dtype=np.float64)
    if r.ndim == 1:
        r = np.repeat(r[:, None], ts.size, axis=1)
    if r.shape != (t.size, ts.size):
        raise MetricInputError("cumulative_dynamic_auc: risk must be (n,) or (n, len(times))")
    g_times, g = _censoring(tr_e, tr_t)
    ghat = step_function(g_times, g, t)
    if np.any(ghat[e] == 0):
        raise UndefinedMetricError("time-dependent AUC: censoring survival is 0 at an event")
    w = np.where(e, 1.0 / np.where(ghat > 0, ghat, 1.0), 0.0)
    scores = np.empty(ts.size)
    for j, tj in enumerate(ts):
        case = (t <= tj) & e
        control = t > tj
        if not case.any() or not control.any():
            raise UndefinedMetricError(f"time-dependent AUC at {tj:g}: no case or no control")
        diff = r[case, j][:, None] - r[control, j][None, :]
        tied = np.abs(diff) <= tied_tol
        hit = ((diff > 0) & ~tied) + 0.5 * tied
        scores[j] = float((w[case][:, None] * hit).sum() / (w[case].sum() * control.sum()))
    if ts.size == 1:
        return scores, float(scores[0])
    km_t, km_s = kaplan_meier(e, t)
    s = step_function(km_t, km_s, ts)
    drop = -np.diff(np.r_[1.0, s])
    return scores, float((scores * drop).sum() / (1.0 - s[-1]))


def brier_scores(
    train: tuple[ArrayLike, ArrayLike],
    test: tuple[ArrayLike, ArrayLike],
    survival: ArrayLike,
    times: ArrayLike,
) -> np.ndarray:
    """The IPCW Brier score of predicted survival probabilities ``(n, len(times))``."""
    tr_e, tr_t = check_survival(*train, "brier_scores (train)")
    e, t = check_survival(*test, "brier_scores (test)")
    ts = _times(times)
    s = np.asarray(survival, dtype=np.float64).reshape(t.size, ts.size)
    g_times, g = _censoring(tr_e, tr_t)
    with np.errstate(divide="ignore"):
        inv_t = 1.0 / step_function(g_times, g, ts)  # inf where G = 0: such a term is 0 below
        inv_y = 1.0 / step_function(g_times, g, t)
    inv_t[~np.isfinite(inv_t)] = 0.0
    inv_y[~np.isfinite(inv_y)] = 0.0
    out = np.empty(ts.size)
    for j, tj in enumerate(ts):
        case = (t <= tj) & e
        control = t > tj
        out[j] = np.mean(
            np.square(s[:, j]) * case * inv_y + np.square(1.0 - s[:, j]) * control * inv_t[j]
        )
    return out


def integrated_brier_score(
    train: tuple[ArrayLike, ArrayLike],
    test: tuple[ArrayLike, ArrayLike],
    survival: ArrayLike,
    times: ArrayLike,
) -> float:
    """The trapezoidal integral of :func:`brier_scores` over ``times`` (at least two), divided
    by ``times[-1] - times[0]``."""
    ts = _times(times)
    if ts.size < 2:
        raise UndefinedMetricError("the integrated Brier score needs at least two times")
    b = brier_scores(train, test, survival, ts)
    return float(np.sum((b[1:] + b[:-1]) / 2.0 * np.diff(ts)) / (ts[-1] - ts[0]))


def evaluation_times(cuts: Sequence[float], time: ArrayLike) -> np.ndarray:
    """The cut points strictly inside the follow-up of ``time`` (where the estimators are
    defined): ``min(time) < t < max(time)``."""
    t = np.asarray(time, dtype=np.float64)
    c = np.asarray(cuts, dtype=np.float64)
    if t.size == 0:
        return c[:0]
    return c[(c > t.min()) & (c < t.max())]


# ------------------------------------------------------------------ the DP histogram


def histogram_contributions(
    event: ArrayLike, interval: ArrayLike, risk: ArrayLike, *, intervals: int, bins: int
) -> np.ndarray:
    """Each patient's one-hot cell of the ``(bins, intervals + 1, 2)`` histogram, flattened.

    ``risk`` in ``[0, 1]`` (the predicted probability of the event by the last cut) picks the
    bin; ``interval`` (0..K, :func:`fedcare.models.survival.interval_index`) the time
    interval; ``event`` the last axis. Every row has exactly one 1: L2 sensitivity 1.
    """
    e = np.asarray(event, dtype=np.int64)
    k = np.asarray(interval, dtype=np.int64)
    r = np.clip(np.asarray(risk, dtype=np.float64), 0.0, 1.0)
    b = np.clip((r * bins).astype(np.int64), 0, bins - 1)
    cells = (b * (intervals + 1) + k) * 2 + e
    out = np.zeros((e.size, bins * (intervals + 1) * 2))
    out[np.arange(e.size), cells] = 1.0
    return out


def metrics_from_histogram(
    counts: np.ndarray, *, intervals: int, bins: int, min_count: float = 1.0
) -> dict[str, float]:
    """``n``, ``c_index`` and ``td_auc`` of a (noisy) histogram.

    Times are known only to their interval and risks to their bin: a pair is comparable when
    the earlier patient had the event in an *earlier* interval than the other's time, and
    risks in one bin count one half (so the C-index is Harrell's on binned data). The AUC at
    the end of each interval ``j < K`` weights cases by ``1 / G`` with ``G`` the
    Kaplan-Meier estimate of censoring over the intervals, from the same counts; ``td_auc``
    is the mean weighted by the Kaplan-Meier drop, as :func:`cumulative_dynamic_auc`.
    Negative noisy counts are clipped to 0. ``{}`` below ``min_count``.
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None).reshape(bins, intervals + 1, 2)
    n = float(np.asarray(counts, dtype=np.float64).sum())
    if not n >= max(float(min_count), 1.0):
        return {}
    out = {"n": float(round(n))}
    per_k = c.sum(axis=0)  # (K+1, 2)
    # C-index: event in interval k (bin b) vs anyone in a later interval (bin b').
    later = np.cumsum(c.sum(axis=2)[:, ::-1], axis=1)[:, ::-1]  # (B, K+1): time in >= k
    later = np.concatenate([later[:, 1:], np.zeros((bins, 1))], axis=1)  # strictly after k
    below = np.cumsum(later, axis=0) - later  # bins below b
    ev = c[:, :, 1]
    pairs = ev.sum(axis=0) @ later.sum(axis=0)
    if pairs > 0:
        out["c_index"] = float(np.sum(ev * (below + 0.5 * later)) / pairs)
    # Censoring survival over intervals: censored in k are at risk with everyone still in >= k
    # once the events of k are out (events come first, as kaplan_meier(reverse=True)).
    at_risk = np.cumsum(per_k.sum(axis=1)[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = np.where(
            at_risk - per_k[:, 1] > 0, 1.0 - per_k[:, 0] / (at_risk - per_k[:, 1]), 1.0
        )
    g_before = np.r_[1.0, np.cumprod(factor)[:-1]]  # G just before interval k
    weight = np.where(g_before > 0, 1.0 / np.where(g_before > 0, g_before, 1.0), 0.0)
    km = np.cumprod(
        np.where(at_risk > 0, 1.0 - per_k[:, 1] / np.where(at_risk > 0, at_risk, 1.0), 1.0)
    )
    aucs, drops = [], []
    for j in range(intervals):
        cases = (ev[:, : j + 1] * weight[: j + 1]).sum(axis=1)  # (B,)
        controls = c[:, j + 1 :, :].sum(axis=(1, 2))
        if cases.sum() <= 0 or controls.sum() < 1:
            continue
        ctrl_below = np.cumsum(controls) - controls
        aucs.append(
            float(np.sum(cases * (ctrl_below + 0.5 * controls)) / (cases.sum() * controls.sum()))
        )
        drops.append((1.0 if j == 0 else km[j - 1]) - km[j])
    if aucs:
        d = np.asarray(drops)
        out["td_auc"] = float(np.dot(aucs, d) / d.sum()) if d.sum() > 0 else float(np.mean(aucs))
    return out
