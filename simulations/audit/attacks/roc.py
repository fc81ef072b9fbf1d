"""ROC curves of membership scores, their AUC, and the TPR at a fixed low FPR: pure functions.

A membership-inference attack gives every candidate patient a score (higher = "more likely
a training member"); thresholding the score at ``t`` calls every patient with score ``>= t`` a
member. :func:`roc_curve` lists the (FPR, TPR) of every distinct threshold, from "nobody"
``(0, 0)`` to "everybody" ``(1, 1)``; tied scores move together, so the area under the curve
(:func:`roc_auc`, trapezoids) is the Mann-Whitney probability that a member outscores a
non-member, ties counted one half.

:func:`tpr_at_fpr` is the best TPR among the thresholds whose FPR does not exceed the target
(no interpolation between thresholds, which would credit the attack with a randomised rule).
With ``n`` non-members the smallest non-zero FPR is ``1/n``: below it the value is the TPR
at *zero* false positives, the fraction of members scored above every non-member. A site
with fewer than 1000 held-out patients therefore reports its TPR at 0.1% FPR that way.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fedcare.simulations.audit.findings import AttackResult, RocCurve

__all__ = [
    "MAX_ROC_POINTS",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "downsample_roc",
    "attack_result",
]

MAX_ROC_POINTS = 200
"""Most points an :class:`~fedcare.simulations.audit.findings.RocCurve` keeps."""


def _scores(values: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{what} is empty; an ROC curve needs members and non-members")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or inf; score every patient with a finite number")
    return arr


def roc_curve(
    member_scores: ArrayLike, nonmember_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of every distinct score threshold, from ``(0, 0)`` to ``(1, 1)``.

    Parameters
    ----------
    member_scores:
        Scores of the training members (positives).
    nonmember_scores:
        Scores of the held-out patients (negatives).

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        ``(fpr, tpr)``, both non-decreasing, starting at 0 and ending at 1.

    Raises
    ------
    ValueError
        Either array is empty or holds a non-finite score.

    Examples
    --------
    >>> fpr, tpr = roc_curve([3.0, 2.0], [1.0, 2.0])
    >>> fpr.tolist(), tpr.tolist()
    ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])
    """
    pos = _scores(member_scores, "member_scores")
    neg = _scores(nonmember_scores, "nonmember_scores")
    scores = np.concatenate([pos, neg])
    is_member = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    # The last index of every run of equal scores: one threshold per distinct score.
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1]
    tps = np.cumsum(is_member[order])[ends]
    fps = (ends + 1) - tps
    tpr = np.r_[0.0, tps / pos.size]
    fpr = np.r_[0.0, fps / neg.size]
    return fpr, tpr


def roc_auc(fpr: ArrayLike, tpr: ArrayLike) -> float:
    """Area under an ROC curve by trapezoids (ties between scores count one half).

    Examples
    --------
    >>> roc_auc([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    1.0
    """
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def tpr_at_fpr(fpr: ArrayLike, tpr: ArrayLike, target: float) -> float:
    """The largest TPR among the thresholds whose FPR is at most ``target``.

    Examples
    --------
    >>> tpr_at_fpr([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0], 0.01)
    0.5
    """
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target FPR {target} is not in [0, 1]")
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    return float(np.max(y[x <= target + 1e-12]))


def downsample_roc(fpr: ArrayLike, tpr: ArrayLike, *, max_points: int = MAX_ROC_POINTS) -> RocCurve:
    """An ROC curve of at most ``max_points`` points, ends and low-FPR corner kept.

    Points are kept evenly along the curve's thresholds, plus every point up to 1% FPR (while
    the budget allows): that corner is what the report's log-scale plot shows.
    """
    if max_points < 3:
        raise ValueError(f"max_points must be at least 3, got {max_points}")
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    n = x.size
    if n <= max_points:
        keep = np.arange(n)
    else:
        low = np.flatnonzero(x <= 0.01)[: max_points // 2]
        even = np.linspace(0, n - 1, max_points - low.size).round().astype(int)
        keep = np.unique(np.r_[low, even, 0, n - 1])
    return RocCurve(fpr=[float(v) for v in x[keep]], tpr=[float(v) for v in y[keep]])


def attack_result(
    *,
    attack: str,
    site_id: str,
    member_scores: ArrayLike,
    nonmember_scores: ArrayLike,
) -> AttackResult:
    """Summarise one attack's scores at one site as an :class:`AttackResult`.

    Examples
    --------
    >>> r = attack_result(attack="loss-threshold", site_id="s", member_scores=[2.0, 3.0],
    ...                   nonmember_scores=[1.0, 0.0])
    >>> r.auc, r.tpr_at_1pct_fpr
    (1.0, 1.0)
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    fpr, tpr = roc_curve(members, nonmembers)
    return AttackResult(
        attack=attack,
        site_id=site_id,
        n_members=int(members.size),
        n_nonmembers=int(nonmembers.size),
        auc=roc_auc(fpr, tpr),
        tpr_at_0_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01),
        roc=downsample_roc(fpr, tpr),
    )
