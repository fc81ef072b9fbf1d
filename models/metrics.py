"""Binary-task metrics: pure functions of numpy arrays.

Every function takes ``y_true`` (0/1 labels) and ``y_score`` (for ``auroc``/``auprc`` any
finite score where larger means "more positive"; for the others a probability in
``[0, 1]``), both 1-D of the same non-empty length, and returns a ``float``.

Inputs are validated first; a bad input raises :class:`MetricInputError` (a
:class:`~fedcare.common.errors.DataError` and a ``ValueError``). A metric that is undefined for a
valid input raises :class:`UndefinedMetricError`, never returns NaN: ``auroc``, ``auprc``
and ``balanced_accuracy`` need both classes present. :func:`binary_metrics` computes every
metric that *is* defined and leaves the others out of its result (so a one-class
validation set yields no ``auroc``, ``auprc`` or ``balanced_accuracy`` key).

The names :func:`binary_metrics` returns are those of :data:`fedcare.common.keys.TASK_METRICS`
(``loss`` is the log-loss, ``n`` the number of patients).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from numpy.typing import ArrayLike

from fedcare.common.errors import DataError

__all__ = [
    "MetricInputError",
    "UndefinedMetricError",
    "auroc",
    "auprc",
    "accuracy",
    "balanced_accuracy",
    "brier",
    "ece",
    "log_loss",
    "binary_metrics",
    "youden_threshold",
    "split_metrics",
    "BINARY_METRICS",
]


class MetricInputError(DataError, ValueError):
    """The labels or scores given to a metric are malformed (shape, values, NaN)."""


class UndefinedMetricError(MetricInputError):
    """The metric is not defined for this input (e.g. only one class is present)."""


def _check(
    y_true: ArrayLike, y_score: ArrayLike, *, probability: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(bool labels, float64 scores)``."""
    t = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if t.ndim != 1 or s.ndim != 1:
        raise MetricInputError(
            f"labels and scores must be 1-D, got shapes {t.shape} and {s.shape}; flatten them "
            "(one value per patient)"
        )
    if t.shape != s.shape:
        raise MetricInputError(
            f"{t.size} labels but {s.size} scores; pass one score per labelled patient"
        )
    if t.size == 0:
        raise MetricInputError("no patients to score; evaluate on a non-empty split")
    if t.dtype != np.bool_:
        tf = t.astype(np.float64)
        if not np.all((tf == 0) | (tf == 1)):
            raise MetricInputError(
                "labels must be 0 or 1 (binary task); found other values, e.g. "
                f"{t[(tf != 0) & (tf != 1)][:3].tolist()}; encode the label as 0/1"
            )
        t = tf == 1
    if not np.all(np.isfinite(s)):
        raise MetricInputError(
            f"{int(np.sum(~np.isfinite(s)))} scores are NaN or infinite; the model output "
            "diverged or the scores were not computed for every patient"
        )
    if probability and (s.min() < 0.0 or s.max() > 1.0):
        raise MetricInputError(
            f"scores must be probabilities in [0, 1], found range [{s.min():g}, {s.max():g}]; "
            "apply a sigmoid to logits first"
        )
    return t, s


def _need_both_classes(t: np.ndarray, metric: str) -> tuple[int, int]:
    n_pos = int(t.sum())
    n_neg = int(t.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "positive" if n_pos else "negative"
        raise UndefinedMetricError(
            f"{metric} is undefined: all {t.size} patients are {present}; it needs both "
            "classes — evaluate on a larger or stratified split"
        )
    return n_pos, n_neg


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` (ascending); tied values share their average rank."""
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # Start index of each run of equal values in the sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auroc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Equals the probability that a random positive outscores a random negative, ties
    counting one half.

    Raises
    ------
    UndefinedMetricError
        Only one class is present.

    Examples
    --------
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    t, s = _check(y_true, y_score, probability=False)
    n_pos, n_neg = _need_both_classes(t, "AUROC")
    ranks = _average_ranks(s)
    u = ranks[t].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auprc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Average precision: ``sum_k (R_k - R_{k-1}) P_k`` over decreasing score thresholds.

    Step-wise (no interpolation), one threshold per distinct score, as scikit-learn's
    ``average_precision_score``.

    Raises
    ------
    UndefinedMetricError
        Only one class is present (with no positive it is undefined; with no negative it
        is trivially 1 and says nothing).

    Examples
    --------
    >>> auprc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.8333333333333333
    """
    t, s = _check(y_true, y_score, probability=False)
    n_pos, _ = _need_both_classes(t, "AUPRC")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, t_sorted = s[order], t[order]
    # Last position of each run of equal scores: one threshold per distinct score.
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(t_sorted)[last].astype(np.float64)
    predicted = (last + 1).astype(np.float64)
    precision = tp / predicted
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def accuracy(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> float:
    """Fraction of patients classified correctly; positive iff ``y_score >= threshold``.

    Examples
    --------
    >>> accuracy([0, 1, 1], [0.2, 0.5, 0.4])
    0.6666666666666666
    """
    t, s = _check(y_true, y_score, probability=True)
    return float(np.mean((s >= threshold) == t))


def balanced_accuracy(y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5) -> float:
    """Mean of sensitivity and specificity at ``threshold`` (positive iff ``>=``).

    Raises
    ------
    UndefinedMetricError
        Only one class is present.

    Examples
    --------
    >>> balanced_accuracy([0, 0, 0, 1], [0.1, 0.2, 0.7, 0.9])
    0.8333333333333333
    """
    t, s = _check(y_true, y_score, probability=True)
    _need_both_classes(t, "balanced accuracy")
    pred = s >= threshold
    sensitivity = np.mean(pred[t])
    specificity = np.mean(~pred[~t])
    return float((sensitivity + specificity) / 2.0)


def brier(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Brier score: mean squared difference between probability and label, in ``[0, 1]``.

    Examples
    --------
    >>> brier([0, 1], [0.0, 0.5])
    0.125
    """
    t, s = _check(y_true, y_score, probability=True)
    return float(np.mean((s - t) ** 2))


def ece(y_true: ArrayLike, y_score: ArrayLike, *, n_bins: int = 10) -> float:
    """Expected calibration error over ``n_bins`` equal-width probability bins.

    ``ECE = sum_b (n_b / n) |mean(y in b) - mean(p in b)|``; bin ``b`` holds
    ``b / n_bins <= p < (b + 1) / n_bins``, the last bin also holds ``p = 1``; empty bins
    count zero.

    Examples
    --------
    >>> ece([0, 1, 1, 1], [0.2, 0.6, 0.7, 0.9])
    0.25
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise MetricInputError(f"n_bins must be a positive int, got {n_bins!r}")
    t, s = _check(y_true, y_score, probability=True)
    edges = np.arange(n_bins + 1) / n_bins
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_bins - 1)
    sum_true = np.bincount(idx, weights=t.astype(np.float64), minlength=n_bins)
    sum_score = np.bincount(idx, weights=s, minlength=n_bins)
    return float(np.sum(np.abs(sum_true - sum_score)) / s.size)


def log_loss(y_true: ArrayLike, y_score: ArrayLike, *, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (binary cross-entropy), probabilities clipped to
    ``[eps, 1 - eps]`` so a confident mistake costs ``-log(eps)``, not infinity.

    Examples
    --------
    >>> round(log_loss([0, 1], [0.5, 0.5]), 6)
    0.693147
    """
    if not 0.0 < eps < 0.5:
        raise MetricInputError(f"eps must be in (0, 0.5), got {eps!r}")
    t, s = _check(y_true, y_score, probability=True)
    p = np.clip(s, eps, 1.0 - eps)
    return float(-np.mean(np.where(t, np.log(p), np.log1p(-p))))


# name -> (function, needs both classes); the names are fedcare.common.keys.TASK_METRICS, but for
# ``threshold`` (the decision threshold the classification metrics used) and ``n``.
BINARY_METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], bool]] = {
    "auroc": (auroc, True),
    "auprc": (auprc, True),
    "accuracy": (accuracy, False),
    "balanced_accuracy": (balanced_accuracy, True),
    "brier": (brier, False),
    "ece": (ece, False),
    "loss": (log_loss, False),
}
_AT_THRESHOLD = ("accuracy", "balanced_accuracy")


def youden_threshold(y_true: ArrayLike, y_score: ArrayLike, *, bins: int = 100) -> float:
    """The decision threshold that maximises sensitivity + specificity (Youden's J).

    Chosen on *validation* patients and applied to the test patients, so the reported
    accuracy does not rest on a fixed 0.5 that a model trained on an unbalanced outcome (or
    under DP noise, whose probabilities crowd around the prevalence) never crosses. The
    candidates are the edges ``k / bins`` (positive iff ``score >= threshold``), the grid a
    DP release chooses on too (:func:`fedcare.models.evaluation.threshold_from_release`, the one
    home of the rule), so the threshold is never one patient's exact score; among ties the
    edge nearest 0.5 wins. With one class only, J is undefined and 0.5 is returned. Linear
    in the number of patients.

    Examples
    --------
    >>> youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    0.3
    >>> youden_threshold([1, 1], [0.2, 0.9])
    0.5
    """
    from fedcare.models.evaluation import exact_sums, threshold_from_release

    t, s = _check(y_true, y_score, probability=True)
    return threshold_from_release(exact_sums(t.astype(np.float64), s, bins=bins))


def binary_metrics(
    y_true: ArrayLike, y_score: ArrayLike, *, threshold: float = 0.5
) -> dict[str, float]:
    """Every metric of :data:`BINARY_METRICS` defined for this input, plus ``n`` and
    ``threshold``.

    Parameters
    ----------
    y_true:
        0/1 labels, shape ``(n,)``.
    y_score:
        Predicted probabilities of the positive class, shape ``(n,)``.
    threshold:
        The decision threshold of ``accuracy`` and ``balanced_accuracy`` (positive iff
        ``score >= threshold``): chosen on validation data (:func:`youden_threshold`) by the
        callers that report a model; 0.5 by default.

    Returns
    -------
    dict[str, float]
        ``n``, ``threshold``, ``accuracy``, ``brier``, ``ece``, ``loss`` (log-loss) always;
        ``auroc``, ``auprc`` and ``balanced_accuracy`` only when both classes are present —
        they are omitted, not NaN, otherwise.

    Raises
    ------
    MetricInputError
        Malformed input (see the module docstring), or a threshold outside ``[0, 1]``.

    Examples
    --------
    >>> sorted(binary_metrics([1, 1], [0.9, 0.6]))
    ['accuracy', 'brier', 'ece', 'loss', 'n', 'threshold']
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise MetricInputError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    t, s = _check(y_true, y_score, probability=True)
    both = bool(t.any() and not t.all())
    out: dict[str, float] = {"n": float(t.size), "threshold": float(threshold)}
    for name, (fn, needs_both) in BINARY_METRICS.items():
        if needs_both and not both:
            continue
        if name in _AT_THRESHOLD:
            out[name] = fn(t, s, threshold=threshold)  # type: ignore[call-arg]
        else:
            out[name] = fn(t, s)
    return out


def split_metrics(
    y_by_split: Mapping[str, ArrayLike],
    p_by_split: Mapping[str, ArrayLike],
    *,
    min_count: int = 1,
) -> dict[str, float]:
    """Exact metrics of every split, ``"<split>.<metric>"``, at one decision threshold chosen
    on the ``"val"`` split (:func:`youden_threshold`; 0.5 without a reported validation
    split). A split with fewer than ``min_count`` patients is withheld whole, and is then not
    used to choose the threshold either.

    Examples
    --------
    >>> m = split_metrics({"val": [0, 1], "test": [0, 1]}, {"val": [0.2, 0.3], "test": [0.1, 0.4]})
    >>> m["test.threshold"], m["test.accuracy"]
    (0.3, 1.0)
    """
    kept = {split: y for split, y in y_by_split.items() if len(np.asarray(y)) >= min_count}
    threshold = 0.5
    if "val" in kept:
        threshold = youden_threshold(kept["val"], p_by_split["val"])
    out: dict[str, float] = {}
    for split, y in kept.items():
        for name, value in binary_metrics(y, p_by_split[split], threshold=threshold).items():
            out[f"{split}.{name}"] = float(value)
    return out
