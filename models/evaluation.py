"""Differentially private evaluation: a site's metrics as a noisy, summable release.

Evaluating weights the server sent is a query on patient data: with crafted weights, exact
metrics of a small split reveal one patient (the predictions can isolate them). So a site
releases, per split, noisy *sums* and derives every metric from them; the server adds the
sums of all sites up to compute the global metrics (far less noisy than averaging per-site
noisy metrics).

What one patient contributes
    A patient with predicted probability ``p`` in ``[0, 1]`` and label ``y`` in ``{0, 1}``
    falls in score bin ``b`` of ``B`` equal-width bins (``b/B <= p < (b+1)/B``, the last bin
    also holds ``p = 1``; ``B`` even, so 0.5 is an edge) and contributes, in its split only:

    * 1 to the histogram cell ``(b, y)``;
    * its log-loss clipped to ``[0, L]``, divided by ``L`` (:data:`LOSS_CLIP`), to
      ``loss_sum``;
    * its Brier term ``(p - y)^2`` (in ``[0, 1]``) to ``brier_sum``;
    * its position inside the bin, ``w * B * (p - b/B)`` in ``[0, w]`` with
      ``w =`` :data:`OFFSET_WEIGHT`, to ``bin_offset[b]`` (so the bin's mean prediction,
      hence the ECE, is estimated from data rather than taken as the bin's mid-point).

    A patient is in one split only (the site's splits are disjoint), so over every split of
    a release together one patient's contribution vector has L2 norm at most
    :data:`SENSITIVITY` ``= sqrt(3 + w^2)``.

The mechanism
    The release is the exact sums plus independent ``N(0, (σ Δ)^2)`` noise on every
    coordinate (``Δ =`` :data:`SENSITIVITY`). Under add/remove-one-patient adjacency that is
    the Gaussian mechanism with noise multiplier ``σ``: the ledger's
    ``Mechanism(noise_multiplier=σ, sample_rate=1.0, steps=1)``, accounted by the same
    accountant as DP-SGD and composed with it. Everything derived from the release (the
    metrics, the small-count suppression, the server's global metrics) is post-processing.
    Noisy values are rounded to a grid of :data:`NOISE_GRID` count units, which hides the
    low-order bits of floating-point noise (a hardening against Mironov-style attacks, not a
    proof; a discrete Gaussian would be that). ``σ = 0`` is the exact mode (no noise, no
    charge), only for a simulated site whose own site.toml asks for it.

Metrics (:func:`metrics_from_release`), each from the release only
    ``n``: the noisy total count (unbiased; rounded). ``accuracy`` and ``balanced_accuracy`` at
    the decision threshold the validation release supports (:func:`threshold_from_release`,
    a bin edge; positive iff ``p`` is at or above it; 0.5 without a validation release),
    reported as ``threshold``; ``auroc`` (binned Mann-Whitney, ties within a
    bin counted half) and ``auprc`` (step-wise average precision, one threshold per bin) from
    the histogram with negative noisy counts clipped to 0; ``brier`` and ``loss`` from their
    noisy sums over the noisy ``n``; ``ece`` over the ``B`` bins with each bin's noisy mean
    prediction (clipped into the bin). With ``σ = 0`` every metric but ``auroc``/``auprc`` equals
    :func:`fedcare.models.metrics.binary_metrics` (``loss`` as long as no log-loss exceeds ``L``);
    ``auroc``/``auprc`` equal those of the scores quantised to bin mid-points. One code path
    serves both modes, so per-site and global metrics are always the same functions.

A split whose noisy ``n`` is below the site's ``min_count`` is withheld whole.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from fedcare.common import keys
from fedcare.common.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

#: Where the noise comes from (seeded from OS entropy at a real site).
Generator = Union[np.random.Generator, "torch.Generator"]

__all__ = [
    "LOSS_CLIP",
    "OFFSET_WEIGHT",
    "SENSITIVITY",
    "DEFAULT_BINS",
    "NOISE_GRID",
    "MAX_RELEASE_VALUE",
    "Generator",
    "MalformedRelease",
    "SplitSums",
    "contributions",
    "exact_sums",
    "add_noise",
    "gaussian_on_grid",
    "noise_std",
    "metrics_from_release",
    "threshold_from_release",
    "releases_from_wire",
    "release",
]

LOSS_CLIP = 10.0
"""``L``: a patient's log-loss is clipped to ``[0, L]`` (``p`` within ``e^-10`` of wrong)."""

OFFSET_WEIGHT = 0.5
"""``w``: the largest contribution to a bin's position sum (raises ``Δ`` by 4% only)."""

SENSITIVITY = math.sqrt(3.0 + OFFSET_WEIGHT**2)
"""``Δ``: the largest L2 norm of one patient's contribution to a release."""

DEFAULT_BINS = 10
"""``B``: score bins of a release (sites of one federation must agree to be summed)."""

NOISE_GRID = 2.0**-10
"""Noisy values are rounded to multiples of this (count units)."""

MAX_RELEASE_VALUE = 1e12
"""The largest magnitude the server accepts for one coordinate of a site's release."""


class MalformedRelease(DataError, ValueError):
    """A reply's release is incomplete, has unknown keys, or holds a bad value."""


@dataclass(frozen=True)
class SplitSums:
    """The (exact or noisy) sums of one split's release.

    Parameters
    ----------
    counts:
        Shape ``(B, 2)``: ``counts[b, y]`` patients in score bin ``b`` with label ``y``.
    offsets:
        Shape ``(B,)``: the sum of ``w * B * (p - b/B)`` over the patients of bin ``b``.
    loss_sum:
        The sum of ``min(log-loss, L) / L``.
    brier_sum:
        The sum of ``(p - y)^2``.
    """

    counts: np.ndarray
    offsets: np.ndarray
    loss_sum: float
    brier_sum: float

    def __post_init__(self) -> None:
        counts = np.array(self.counts, dtype=np.float64)
        offsets = np.array(self.offsets, dtype=np.float64)
        bins = counts.shape[0] if counts.ndim == 2 else -1
        if counts.shape != (bins, 2) or offsets.shape != (bins,) or not _valid_bins(bins):
            raise ValueError(
                f"a release needs counts of shape (B, 2) and offsets of shape (B,) with B even "
                f"in [2, {keys.HIST_MAX_BINS}]; got {counts.shape} and {offsets.shape}"
            )
        counts.setflags(write=False)
        offsets.setflags(write=False)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "loss_sum", float(self.loss_sum))
        object.__setattr__(self, "brier_sum", float(self.brier_sum))

    @property
    def bins(self) -> int:
        """``B``, the number of score bins."""
        return int(self.counts.shape[0])

    def vector(self) -> np.ndarray:
        """Every coordinate in wire order: cells ``(b, y)``, offsets, loss, Brier."""
        return np.r_[self.counts.ravel(), self.offsets, self.loss_sum, self.brier_sum]

    @classmethod
    def from_vector(cls, vector: np.ndarray, *, bins: int) -> SplitSums:
        """The inverse of :meth:`vector`."""
        v = np.asarray(vector, dtype=np.float64)
        cells = 2 * bins
        return cls(v[:cells].reshape(bins, 2), v[cells : cells + bins], v[-2], v[-1])

    def __add__(self, other: SplitSums) -> SplitSums:
        if not isinstance(other, SplitSums):
            return NotImplemented
        if other.bins != self.bins:
            raise ValueError(f"cannot add a {self.bins}-bin release to a {other.bins}-bin one")
        return SplitSums.from_vector(self.vector() + other.vector(), bins=self.bins)

    def to_wire(self, split: str) -> dict[str, float]:
        """The release's metric keys (:mod:`fedcare.common.keys`) and values for ``split``."""
        return dict(zip(_wire_keys(split, self.bins), self.vector().tolist(), strict=True))


def _wire_keys(split: str, bins: int) -> list[str]:
    """The metric keys of a ``bins``-bin release of ``split``, in :meth:`SplitSums.vector` order."""
    return [
        *(keys.hist_key(split, b, y) for b in range(bins) for y in (0, 1)),
        *(keys.bin_offset_key(split, b) for b in range(bins)),
        f"{split}.{keys.R_LOSS_SUM}",
        f"{split}.{keys.R_BRIER_SUM}",
    ]


def _valid_bins(bins: object) -> bool:
    return (
        isinstance(bins, numbers.Integral)
        and not isinstance(bins, bool)
        and 2 <= int(bins) <= keys.HIST_MAX_BINS
        and int(bins) % 2 == 0
    )


def _check_bins(bins: object) -> int:
    if not _valid_bins(bins):
        raise ConfigError(
            f"bins must be an even integer in [2, {keys.HIST_MAX_BINS}] (0.5 must be a bin "
            f"edge), got {bins!r}"
        )
    return int(bins)  # type: ignore[call-overload]


def _check_inputs(y: Any, p: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    from fedcare.models.metrics import (
        MetricInputError,
    )  # models imports torch models: only when used

    t = np.asarray(y, dtype=np.float64)
    s = np.asarray(p, dtype=np.float64)
    if t.ndim != 1 or t.shape != s.shape:
        raise MetricInputError(
            f"{split}: labels {t.shape} and predictions {s.shape} must be 1-D of the same "
            "length (one prediction per patient)"
        )
    if not np.all((t == 0) | (t == 1)):
        raise MetricInputError(f"{split}: labels must be 0 or 1; encode the label as 0/1")
    if not np.all(np.isfinite(s)) or (s.size and (s.min() < 0.0 or s.max() > 1.0)):
        raise MetricInputError(
            f"{split}: predictions must be finite probabilities in [0, 1]; apply a sigmoid "
            "to logits first"
        )
    return t, s


def _bin_of(p: np.ndarray, bins: int) -> np.ndarray:
    """Score bin of each probability (as :func:`fedcare.models.metrics.ece` bins them)."""
    edges = np.arange(bins + 1) / bins
    return np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)


def contributions(y: Any, p: Any, *, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Each patient's contribution vector to a split's sums, shape ``(n, 3B + 2)``.

    Rows are in :meth:`SplitSums.vector` order; the sums are the column sums. Every row has
    L2 norm at most :data:`SENSITIVITY`.

    Examples
    --------
    >>> row = contributions([1], [1.0], bins=2)[0]
    >>> row.tolist()  # cell (1, 1), offsets, loss, brier
    [0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0]
    """
    bins = _check_bins(bins)
    t, s = _check_inputs(y, p, "contributions")
    n = t.size
    b = _bin_of(s, bins)
    rows = np.arange(n)
    out = np.zeros((n, 3 * bins + 2), dtype=np.float64)
    out[rows, 2 * b + t.astype(np.int64)] = 1.0
    position = np.clip(bins * (s - b / bins), 0.0, 1.0)
    out[rows, 2 * bins + b] = OFFSET_WEIGHT * position
    q = np.where(t == 1, s, 1.0 - s)  # the probability given to the true label
    loss = np.log(1.0 / np.maximum(q, math.exp(-LOSS_CLIP)))  # in [0, L]
    out[:, -2] = np.clip(loss, 0.0, LOSS_CLIP) / LOSS_CLIP
    out[:, -1] = (s - t) ** 2
    return out


def exact_sums(y: Any, p: Any, *, bins: int = DEFAULT_BINS) -> SplitSums:
    """The exact (noise-free) sums of one split; an empty split gives zeros."""
    bins = _check_bins(bins)
    return SplitSums.from_vector(contributions(y, p, bins=bins).sum(axis=0), bins=bins)


def _check_sigma(noise_multiplier: object) -> float:
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, numbers.Real)
        or not math.isfinite(noise_multiplier)
        or noise_multiplier < 0
    ):
        raise ConfigError(
            f"the evaluation noise multiplier must be a finite number >= 0 (0: exact, only for "
            f"a simulated site that asks for it), got {noise_multiplier!r}"
        )
    return float(noise_multiplier)


def check_release_noise(noise_multiplier: object, generator: object, *, what: str) -> float:
    """``noise_multiplier`` as a float, checked for one more Gaussian release of an
    evaluation (an attribution, a survival curve): a finite number >= 0 (0: the exact mode
    of a simulated site that asks for it), and a generator whenever it is above 0."""
    if (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, numbers.Real)
        or not math.isfinite(noise_multiplier)
        or float(noise_multiplier) < 0
    ):
        raise ConfigError(
            f"the {what} noise multiplier must be a finite number >= 0, got {noise_multiplier!r}"
        )
    sigma = float(noise_multiplier)
    if sigma > 0 and generator is None:
        raise ConfigError(f"a noisy {what} release needs a generator seeded from OS entropy")
    return sigma


def noise_std(noise_multiplier: float) -> float:
    """Standard deviation of the noise on each released count, in patients: ``σ Δ``.

    A split's noisy ``n`` sums ``2B`` cells, so its standard deviation is
    ``σ Δ sqrt(2B)``; the global sum over ``S`` sites has ``sqrt(S)`` times that.

    Examples
    --------
    >>> round(noise_std(5.0), 3)
    9.014
    """
    return _check_sigma(noise_multiplier) * SENSITIVITY


def _gaussian(generator: Generator, std: float, size: int) -> np.ndarray:
    if isinstance(generator, np.random.Generator):
        return generator.normal(0.0, std, size)
    import torch  # only for a torch generator

    if isinstance(generator, torch.Generator):
        z = torch.randn(size, generator=generator, dtype=torch.float64, device=generator.device)
        return z.cpu().numpy() * std
    raise ConfigError(
        f"evaluation noise needs a numpy.random.Generator or torch.Generator, got "
        f"{type(generator).__name__}; seed it from OS entropy at a real site"
    )


def gaussian_on_grid(values: np.ndarray, *, std: float, generator: Generator) -> np.ndarray:
    """``values`` plus independent ``N(0, std^2)`` noise on every coordinate, rounded to
    :data:`NOISE_GRID` (the Gaussian mechanism of every noisy release a site makes)."""
    noisy = values + _gaussian(generator, std, values.size)
    return np.round(noisy / NOISE_GRID) * NOISE_GRID


def add_noise(sums: SplitSums, *, std: float, generator: Generator) -> SplitSums:
    """``sums`` plus independent ``N(0, std^2)`` noise on every coordinate, on the grid."""
    noisy = gaussian_on_grid(sums.vector(), std=std, generator=generator)
    return SplitSums.from_vector(noisy, bins=sums.bins)


def threshold_from_release(sums: SplitSums | None) -> float:
    """The decision threshold a validation release supports: the bin edge ``k / B`` that
    maximises sensitivity + specificity (Youden's J) on its histogram (negative noisy counts
    clipped to 0), ties broken toward 0.5.

    Post-processing of a release, so choosing it costs no privacy; 0.5 when there is no
    release or one class has a noisy count below 1.

    Examples
    --------
    >>> s = exact_sums([0, 0, 0, 1, 1], [0.1, 0.2, 0.25, 0.35, 0.6], bins=10)
    >>> threshold_from_release(s)
    0.3
    >>> threshold_from_release(None)
    0.5
    """
    if sums is None:
        return 0.5
    c = np.clip(sums.counts, 0.0, None)
    neg, pos = c[:, 0], c[:, 1]
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos < 1.0 or n_neg < 1.0:
        return 0.5
    bins = sums.bins
    # Edge k: positive iff bin >= k. Sensitivity and specificity at every edge 0..B.
    tpr = np.r_[np.cumsum(pos[::-1])[::-1], 0.0] / n_pos
    fpr = np.r_[np.cumsum(neg[::-1])[::-1], 0.0] / n_neg
    j = tpr - fpr
    edges = np.arange(bins + 1)
    best = edges[j >= j.max() - 1e-12]
    k = int(best[np.argmin(np.abs(best - bins / 2))])
    return k / bins


def _edge(threshold: float, bins: int) -> int:
    k = round(float(threshold) * bins)
    if not 0 <= k <= bins or abs(k / bins - float(threshold)) > 1e-9:
        raise ConfigError(
            f"threshold {threshold!r} is not a bin edge of a {bins}-bin release; choose it "
            "with threshold_from_release"
        )
    return k


def metrics_from_release(
    sums: SplitSums, *, min_count: float = 1.0, threshold: float = 0.5
) -> dict[str, float]:
    """The task metrics (bare names of :data:`fedcare.common.keys.TASK_METRICS`) of a release.

    Parameters
    ----------
    sums:
        One split's release, one site's or summed over sites.
    min_count:
        Below this noisy ``n`` (and below 1) the split is withheld: ``{}``.
    threshold:
        The decision threshold of ``accuracy`` and ``balanced_accuracy`` (positive iff the
        score's bin starts at or above it); a bin edge, normally the validation release's
        :func:`threshold_from_release`.

    Returns
    -------
    dict[str, float]
        ``n``, ``threshold``, ``accuracy``, ``brier``, ``loss``, ``ece``; ``auroc``,
        ``auprc`` and ``balanced_accuracy`` only when each class has a (noisy) count of at
        least 1. An undefined metric is absent, never NaN.

    Examples
    --------
    >>> s = exact_sums([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], bins=10)
    >>> m = metrics_from_release(s)
    >>> m["n"], m["auroc"], m["accuracy"]
    (4.0, 0.75, 0.75)
    >>> metrics_from_release(s, threshold=0.9)["accuracy"]
    0.5
    """
    n = float(sums.counts.sum())
    if not n >= max(float(min_count), 1.0):
        return {}
    bins = sums.bins
    cut = _edge(threshold, bins)
    c = np.clip(sums.counts, 0.0, None)
    neg, pos = c[:, 0], c[:, 1]
    per_bin = neg + pos
    total = float(per_bin.sum())  # >= n > 0
    out = {
        "n": float(round(n)),
        "threshold": cut / bins,
        "accuracy": float((neg[:cut].sum() + pos[cut:].sum()) / total),
        "brier": float(np.clip(sums.brier_sum / n, 0.0, 1.0)),
        "loss": float(np.clip(sums.loss_sum * LOSS_CLIP / n, 0.0, LOSS_CLIP)),
    }
    # ECE: each bin's mean prediction from its noisy position sum, clipped into the bin.
    with np.errstate(divide="ignore", invalid="ignore"):
        position = np.where(per_bin > 0, sums.offsets / per_bin, OFFSET_WEIGHT / 2)
    mean_p = (np.arange(bins) + np.clip(position, 0.0, OFFSET_WEIGHT) / OFFSET_WEIGHT) / bins
    out["ece"] = float(np.abs(pos - per_bin * mean_p).sum() / total)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos >= 1.0 and n_neg >= 1.0:
        out["balanced_accuracy"] = float((pos[cut:].sum() / n_pos + neg[:cut].sum() / n_neg) / 2.0)
        neg_below = np.cumsum(neg) - neg
        out["auroc"] = float(np.sum(pos * (neg_below + neg / 2.0)) / (n_pos * n_neg))
        tp = np.cumsum(pos[::-1])  # thresholds from the top bin down
        predicted = np.cumsum(per_bin[::-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall_step = np.diff(np.r_[0.0, tp / n_pos])
        out["auprc"] = float(np.clip(np.sum(recall_step * precision), 0.0, 1.0))
    return out


def _number(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRelease(f"{key} is {type(value).__name__}, not a number")
    if not math.isfinite(value) or abs(value) > MAX_RELEASE_VALUE:
        raise MalformedRelease(f"{key} = {value!r} is not finite or exceeds {MAX_RELEASE_VALUE:g}")
    return float(value)


def _split_release(metrics: Mapping[str, Any], split: str) -> SplitSums | None:
    names = [k for k in metrics if k in keys.RELEASE_METRICS and k.startswith(f"{split}.")]
    if not names:
        return None
    # Whitelisted names: "<split>.hist.<b>.<y>", "<split>.bin_offset.<b>", "<split>.<sum>".
    bins = 1 + max((int(k.split(".")[2]) for k in names if k.count(".") >= 2), default=-1)
    if not _valid_bins(bins):
        raise MalformedRelease(
            f"{split}: a release has B score bins for an even B in [2, {keys.HIST_MAX_BINS}]; "
            f"its highest bin is {bins - 1}"
        )
    wire = _wire_keys(split, bins)
    expected = set(wire)
    if set(names) != expected:
        missing, extra = sorted(expected - set(names)), sorted(set(names) - expected)
        raise MalformedRelease(
            f"{split}: the release's keys are not those of a {bins}-bin release (missing: "
            f"{missing[:3] or 'none'}, unexpected: {extra[:3] or 'none'})"
        )
    return SplitSums.from_vector(np.array([_number(metrics, k) for k in wire]), bins=bins)


def releases_from_wire(metrics: Mapping[str, Any]) -> dict[str, SplitSums]:
    """The validated release of each split in a reply's metrics (splits without one absent).

    Raises
    ------
    MalformedRelease
        A split's release is incomplete, not a ``B``-bin release for an even ``B``, or holds
        a value that is not a finite number of magnitude at most :data:`MAX_RELEASE_VALUE`.
    """
    out = {}
    for split in keys.EVAL_SPLITS:
        sums = _split_release(metrics, split)
        if sums is not None:
            out[split] = sums
    return out


def release(
    y_by_split: Mapping[str, Any],
    p_by_split: Mapping[str, Any],
    *,
    noise_multiplier: float,
    generator: Generator | None,
    min_count: float,
    bins: int = DEFAULT_BINS,
) -> dict[str, float]:
    """One evaluation of a model on a site's splits, as the metrics to send.

    Parameters
    ----------
    y_by_split, p_by_split:
        Split (``"val"``, ``"test"``) -> labels (0/1) and predicted probabilities, one per
        patient. The splits must hold disjoint patients (``Δ`` assumes it).
    noise_multiplier:
        ``σ`` (> 0: DP release); ``0`` is the exact mode, only for a simulated site whose own
        site.toml asks for it.
    generator:
        ``numpy.random.Generator`` or ``torch.Generator`` the noise comes from; seed it from
        OS entropy at a real site. Unused (may be ``None``) when ``σ = 0``.
    min_count:
        Small-count suppression: a split whose noisy ``n`` is below it is withheld whole.
    bins:
        ``B``, even; sites must agree for the server to sum their releases.

    Returns
    -------
    dict
        ``"<split>.<metric>"`` (:func:`metrics_from_release`) and the release's sums
        (:meth:`SplitSums.to_wire`) of every split not withheld. With ``σ > 0`` the caller
        charges ``Mechanism(σ, 1.0, 1)`` (``fedcare.client.accounting``) to the ledger *before* the
        metrics leave, even when every split was withheld (the withholding depends on the
        noisy release). Every call draws fresh noise and must be charged: a repeated
        request must be charged again or answered with the stored release.

    Examples
    --------
    >>> y, p = {"test": [0, 1] * 10}, {"test": [0.2, 0.7] * 10}
    >>> out = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
    >>> out["test.n"], out["test.accuracy"], out["test.hist.7.1"]
    (20.0, 1.0, 10.0)
    """
    sigma = _check_sigma(noise_multiplier)
    bins = _check_bins(bins)
    if set(y_by_split) != set(p_by_split) or not set(y_by_split) <= set(keys.EVAL_SPLITS):
        raise ConfigError(
            f"labels for {sorted(y_by_split)} but predictions for {sorted(p_by_split)}; "
            f"give both for the same splits among {list(keys.EVAL_SPLITS)}"
        )
    if sigma > 0 and generator is None:
        raise ConfigError("a DP evaluation needs a generator for its noise (OS entropy)")
    std = sigma * SENSITIVITY
    released: dict[str, SplitSums] = {}
    for split in (s for s in keys.EVAL_SPLITS if s in y_by_split):
        sums = exact_sums(*_check_inputs(y_by_split[split], p_by_split[split], split), bins=bins)
        if sigma > 0 and generator is not None:  # (checked above: not None when σ > 0)
            sums = add_noise(sums, std=std, generator=generator)
        released[split] = sums
    # The decision threshold comes from the (noisy) validation release: post-processing,
    # and only from a validation split that is itself released (small-count suppression).
    val = released.get("val")
    usable = val is not None and float(val.counts.sum()) >= max(float(min_count), 1.0)
    threshold = threshold_from_release(val if usable else None)
    out: dict[str, float] = {}
    for split, sums in released.items():
        derived = metrics_from_release(sums, min_count=min_count, threshold=threshold)
        if not derived:
            continue  # withheld whole: small (noisy) count
        out.update(sums.to_wire(split))
        out.update({f"{split}.{name}": value for name, value in derived.items()})
    return out
