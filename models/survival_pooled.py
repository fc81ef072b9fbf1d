"""The global (pooled) C-index of a survival task: the sites' evaluation histograms, summed.

A survival evaluation describes each released split by a ``(risk bin, interval, event)``
histogram (:func:`fedcare.models.survival_metrics.histogram_contributions`): the model's
predicted risk ``1 - S(t_K | x)`` in ``B`` equal-width bins of ``[0, 1]``, the interval of the
label's cuts the patient's time falls in (``0..K``,
:func:`fedcare.models.survival.interval_index`), and whether the event happened. One patient
is one cell.

What leaves a site (:func:`fedcare.models.survival.survival_release`)
    Under DP, the very noisy histogram the site's own C-index and time-dependent AUC are
    computed from: every cell plus ``N(0, σ^2)`` (L2 sensitivity 1), rounded to
    :data:`fedcare.models.evaluation.NOISE_GRID`. It is the output of the evaluation's first
    Gaussian step, ``Mechanism(σ, 1.0, 1)``, already charged and planned into the run's noise
    from round 1, so sending it costs no further ε (post-processing); no step is added. In the
    exact mode (a simulated site's own opt-in, no charge) the exact counts leave, at
    :data:`fedcare.common.keys.HIST_MAX_BINS` risk bins. A split is released whole or not at
    all: its histogram leaves only with its metrics, so a split whose (noisy) count is below
    the site's ``min_count`` sends neither (the small-count suppression of every release).

What the server computes (:func:`global_survival_metrics`)
    For each split, when every site that reported it sent its histogram (same ``B``), the
    sum of the histograms and, from it alone
    (:func:`fedcare.models.survival_metrics.metrics_from_histogram`), the global ``n``,
    ``events``, ``c_index`` and ``td_auc`` of all the sites' patients together: pairs of
    patients of different sites count, which a mean of per-site C-indices never sees. The
    site-weighted mean of the sites' own values is kept beside it as
    ``<split>.site_mean.c_index`` (and ``.td_auc``); ``ibs`` (exact mode only) stays the
    site-weighted mean. A split some reporting site sent no histogram for keeps the
    site-weighted mean as its global value, as before.

The binned C-index
    Harrell's C on binned data: a pair is comparable when one patient's event interval is
    *earlier* than the other's time interval; two patients of the same interval are never
    compared (their order inside it is unknown), whether event or censored. That is exactly
    Harrell's C (scikit-survival's ``concordance_index_censored``) of the risk bins on the
    times ``interval - 0.5 * censored`` (the censored of an interval placed before its
    events). Risks in the same bin count one half. Against the C-index of the unbinned risks
    and times of the same patients the error is at most
    ``|D| / |P| + |T| / (2 |P_b|)`` (:func:`binning_error_bound`), with ``P`` the comparable
    pairs of the exact data, ``D`` those of them inside one interval (lost), ``P_b = P \\ D``
    and ``T`` the pairs of ``P_b`` in the same risk bin: every binned-comparable pair is
    comparable exactly, the lost pairs move C by at most their share, and a tie moves a
    pair's score by at most one half.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
from fedcare.models.survival_metrics import metrics_from_histogram

__all__ = [
    "SITE_MEAN",
    "POOLED_METRICS",
    "SurvivalHistogram",
    "histogram_of",
    "add_noise",
    "histograms_from_wire",
    "global_survival_metrics",
    "binning_error_bound",
    "site_mean_key",
]

#: The global metrics a pooled survival histogram gives (``<split>.<name>``).
POOLED_METRICS = ("n", "events", "c_index", "td_auc")
#: Where the site-weighted mean of a survival metric goes once the pooled one replaces it.
SITE_MEAN = "site_mean"
_REPLACED = ("c_index", "td_auc")


def site_mean_key(split: str, metric: str) -> str:
    """``<split>.site_mean.<metric>``: the mean of the sites' own values, weighted by their
    ``n``, beside the pooled global value.

    >>> site_mean_key("test", "c_index")
    'test.site_mean.c_index'
    """
    return f"{split}.{SITE_MEAN}.{metric}"


@dataclass(frozen=True)
class SurvivalHistogram:
    """One split's (exact or noisy) histogram: ``counts[b, k, e]`` patients in risk bin ``b``
    (of ``B``), interval ``k`` (of ``K + 1``) with event ``e``."""

    counts: np.ndarray

    def __post_init__(self) -> None:
        c = np.array(self.counts, dtype=np.float64)
        if c.ndim != 3 or c.shape[2] != 2 or not 1 <= c.shape[0] <= keys.HIST_MAX_BINS:
            raise ValueError(
                f"a survival histogram is (B, K + 1, 2) with 1 <= B <= {keys.HIST_MAX_BINS}; "
                f"got shape {c.shape}"
            )
        if not 2 <= c.shape[1] <= keys.MAX_CURVE_INTERVALS + 1:
            raise ValueError(
                f"a survival histogram has K + 1 intervals for 1 <= K <= "
                f"{keys.MAX_CURVE_INTERVALS}; got {c.shape[1]}"
            )
        c.setflags(write=False)
        object.__setattr__(self, "counts", c)

    @property
    def bins(self) -> int:
        """``B``: risk bins."""
        return int(self.counts.shape[0])

    @property
    def intervals(self) -> int:
        """``K``: the label's cuts (the histogram has ``K + 1`` intervals)."""
        return int(self.counts.shape[1]) - 1

    @property
    def n(self) -> float:
        """The (noisy) number of patients."""
        return float(self.counts.sum())

    @property
    def events(self) -> float:
        """The (noisy) number of events (after the last cut included)."""
        return float(self.counts[:, :, 1].sum())

    def __add__(self, other: SurvivalHistogram) -> SurvivalHistogram:
        if not isinstance(other, SurvivalHistogram):
            return NotImplemented
        if other.counts.shape != self.counts.shape:
            raise DataError(
                f"survival histograms of shapes {self.counts.shape} and {other.counts.shape} "
                "cannot be added (sites of one run share the cuts and risk bins)"
            )
        return SurvivalHistogram(self.counts + other.counts)

    def metrics(self) -> dict[str, float]:
        """``n``, ``events``, ``c_index`` and ``td_auc`` of the histogram
        (:func:`~fedcare.models.survival_metrics.metrics_from_histogram`; an undefined one is
        absent); ``{}`` below one patient."""
        out = metrics_from_histogram(
            self.counts.ravel(), intervals=self.intervals, bins=self.bins, min_count=1.0
        )
        if out:
            out["events"] = float(max(round(self.events), 0))  # noisy: never below 0
        return out

    def to_wire(self, split: str) -> dict[str, float]:
        """The cells as reply metrics (:func:`fedcare.common.keys.surv_hist_key`)."""
        return {
            keys.surv_hist_key(split, b, k, e): float(self.counts[b, k, e])
            for b in range(self.bins)
            for k in range(self.intervals + 1)
            for e in (0, 1)
        }


def histogram_of(
    event: ArrayLike, interval: ArrayLike, risk: ArrayLike, *, intervals: int, bins: int
) -> SurvivalHistogram:
    """The exact histogram of one split's patients: the column sums of
    :func:`fedcare.models.survival_metrics.histogram_contributions`, by counting.

    Examples
    --------
    >>> h = histogram_of([1, 0, 1], [0, 2, 0], [0.05, 0.5, 0.07], intervals=2, bins=2)
    >>> float(h.counts[0, 0, 1]), float(h.counts[1, 2, 0]), h.n, h.events
    (2.0, 1.0, 3.0, 2.0)
    """
    e = np.asarray(event, dtype=np.int64).ravel()
    k = np.asarray(interval, dtype=np.int64).ravel()
    r = np.clip(np.asarray(risk, dtype=np.float64).ravel(), 0.0, 1.0)
    if not (e.size == k.size == r.size) or np.any((e != 0) & (e != 1)):
        raise ConfigError("survival histogram: one 0/1 event, interval and risk per patient")
    if np.any((k < 0) | (k > intervals)):
        raise ConfigError(f"survival histogram: intervals must be in 0..{intervals}")
    b = np.clip((r * bins).astype(np.int64), 0, bins - 1)  # as histogram_contributions
    cells = (b * (intervals + 1) + k) * 2 + e
    counts = np.bincount(cells, minlength=bins * (intervals + 1) * 2).astype(np.float64)
    return SurvivalHistogram(counts.reshape(bins, intervals + 1, 2))


def add_noise(
    hist: SurvivalHistogram, *, noise_multiplier: float, generator: Generator | None
) -> SurvivalHistogram:
    """``hist`` plus ``N(0, σ^2)`` on every cell, rounded to
    :data:`~fedcare.models.evaluation.NOISE_GRID` (one patient is one cell: L2 sensitivity 1,
    the Gaussian mechanism with noise multiplier ``σ``); ``σ = 0`` returns it unchanged."""
    sigma = check_release_noise(noise_multiplier, generator, what="survival histogram")
    if sigma == 0:
        return hist
    assert generator is not None  # (checked: a generator whenever σ > 0)
    noisy = gaussian_on_grid(hist.counts.ravel(), std=sigma, generator=generator)
    return SurvivalHistogram(noisy.reshape(hist.counts.shape))


def histograms_from_wire(
    metrics: Mapping[str, object], *, intervals: int | None, noise_multiplier: float = 0.0
) -> dict[str, SurvivalHistogram]:
    """A reply's survival histograms (split -> histogram), checked: every cell of a
    ``(B, K + 1, 2)`` histogram with ``K`` the run's cuts and ``B <= HIST_MAX_BINS``, finite
    values of bounded magnitude, and only for a split the reply reports (``<split>.n``).

    ``intervals``: the run's ``K``; ``None`` for a run that is not a survival task (any cell
    is then malformed). ``noise_multiplier``: the σ of the evaluation's release the reply
    reports, 0 for an exact one.

    A site weighs in the pooled histogram with the patients it declares, up to its noise:
    the cells add up to ``<split>.n`` (within the 0.5 of its rounding); exact cells are
    whole non-negative counts; noisy cells may be negative only as much as N(0, σ²) noise on
    every cell can make them (their negative mass at most ``σ (m / sqrt(2π) + 8 sqrt(m))``
    over ``m`` cells: the mean of the noise's negative part plus eight standard deviations,
    exceeded by an honest site with probability below 1e-15), so a site cannot add positive
    mass beyond its n by pairing it with negative cells.

    Raises
    ------
    DataError
        The first rule the histograms break, named.
    """
    cells: dict[str, dict[tuple[int, int, int], float]] = {}
    for name, value in metrics.items():
        parsed = keys.parse_surv_hist_key(name)
        if parsed is None:
            if f".{keys.R_SURV_HIST}." in name:
                raise DataError(
                    f"{name} is not a survival histogram cell (<split>.{keys.R_SURV_HIST}.<b>."
                    f"<k>.<e>, b below {keys.HIST_MAX_BINS}, k at most the run's cuts)"
                )
            continue
        if intervals is None:
            raise DataError(f"{name}: a survival histogram in a run whose task is not survival")
        split, b, k, e = parsed
        if k > intervals:
            raise DataError(f"{name}: interval {k} beyond the run's {intervals} cuts")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{name} is {type(value).__name__}, not a number")
        v = float(value)
        if not math.isfinite(v) or abs(v) > MAX_RELEASE_VALUE:
            raise DataError(f"{name} = {v!r} is not a finite number of magnitude at most 1e12")
        cells.setdefault(split, {})[(b, k, e)] = v
    out: dict[str, SurvivalHistogram] = {}
    for split, got in cells.items():
        assert intervals is not None  # (any cell of a non-survival run raised above)
        declared = metrics.get(f"{split}.n")
        if declared is None:
            raise DataError(f"a survival histogram of split {split!r}, which the reply withheld")
        if (
            isinstance(declared, bool)
            or not isinstance(declared, (int, float))
            or not math.isfinite(float(declared))
            or float(declared) < 1
        ):
            raise DataError(f"{split}.n = {declared!r} is not a count of at least one patient")
        bins = 1 + max(b for b, _, _ in got)
        size = bins * (intervals + 1) * 2
        if len(got) != size:
            raise DataError(
                f"{split}: a survival histogram of {bins} risk bins and {intervals} cuts has "
                f"{size} cells; the reply has {len(got)}"
            )
        counts = np.zeros((bins, intervals + 1, 2))
        for (b, k, e), v in got.items():
            counts[b, k, e] = v
        # A site's patients are its histogram's: its n is the rounded sum of the same cells
        # (exact or noisy), so a histogram of other patients than it reports is refused, and
        # no site weighs in the pooled C-index beyond the patients it declares.
        if abs(float(counts.sum()) - float(declared)) > 0.5 + 1e-9 * abs(float(declared)):
            raise DataError(
                f"{split}: the survival histogram holds {float(counts.sum()):.6g} patients, the "
                f"reply declares {split}.n = {float(declared):g}"
            )
        negative = float(np.clip(-counts, 0.0, None).sum())
        if noise_multiplier <= 0:
            if negative > 0 or not np.array_equal(counts, np.round(counts)):
                raise DataError(
                    f"{split}: an exact survival histogram of counts that are not whole "
                    "non-negative numbers"
                )
        elif negative > noise_multiplier * (
            counts.size / math.sqrt(2 * math.pi) + 8 * math.sqrt(counts.size)
        ):
            raise DataError(
                f"{split}: the survival histogram's negative cells ({negative:.6g} in all) are "
                f"more than noise of σ = {noise_multiplier:g} makes"
            )
        out[split] = SurvivalHistogram(counts)
    return out


def global_survival_metrics(
    weighted: Mapping[str, float],
    per_site: Mapping[str, Mapping[str, float]],
    histograms: Mapping[str, Mapping[str, SurvivalHistogram]],
) -> dict[str, float]:
    """A survival round's global metrics: ``weighted`` (the site-weighted means,
    :func:`fedcare.server.guard.weighted_global_metrics`) with each split whose reporting
    sites all sent a histogram of the same bins replaced by the pooled histogram's
    ``n``, ``events``, ``c_index`` and ``td_auc``, the weighted ``c_index`` and ``td_auc``
    kept as ``<split>.site_mean.<metric>``.

    ``per_site``: site -> its own metrics (a split it reported has ``<split>.n``);
    ``histograms``: site -> split -> its validated histogram.

    Examples
    --------
    >>> a = histogram_of([1, 0], [0, 1], [0.9, 0.1], intervals=1, bins=2)
    >>> b = histogram_of([1, 0], [0, 1], [0.2, 0.8], intervals=1, bins=2)
    >>> sites = {"a": {"test.n": 2.0, "test.c_index": 1.0},
    ...          "b": {"test.n": 2.0, "test.c_index": 0.0}}
    >>> out = global_survival_metrics({"test.n": 4.0, "test.c_index": 0.5}, sites,
    ...                               {"a": {"test": a}, "b": {"test": b}})
    >>> out["test.c_index"], out["test.site_mean.c_index"], out["test.events"]
    (0.5, 0.5, 2.0)
    """
    out = dict(weighted)
    for split in keys.EVAL_SPLITS:
        reporting = [site for site, values in per_site.items() if f"{split}.n" in values]
        hists = [histograms.get(site, {}).get(split) for site in reporting]
        present = [h for h in hists if h is not None]
        if not reporting or len(present) < len(hists):
            continue
        if len({h.counts.shape for h in present}) != 1:
            continue  # sites of other bins (an exact and a DP site): the weighted mean stays
        total = present[0]
        for h in present[1:]:
            total = total + h
        pooled = total.metrics()
        if not pooled:
            continue
        for metric in _REPLACED:
            value = out.pop(f"{split}.{metric}", None)
            if value is not None:
                out[site_mean_key(split, metric)] = value
        out.update({f"{split}.{name}": value for name, value in pooled.items()})
    return out


def binning_error_bound(
    event: ArrayLike, time: ArrayLike, risk: ArrayLike, *, cuts: ArrayLike, bins: int
) -> float:
    """The bound ``|D| / |P| + |T| / (2 |P_b|)`` on how far the binned C-index of these
    patients can be from Harrell's C of their unbinned risks and times (module docstring);
    for the documentation and tests: it needs every patient's exact time and risk.
    ``inf`` when no pair stays comparable after binning."""
    e = np.asarray(event, dtype=bool)
    t = np.asarray(time, dtype=np.float64)
    r = np.clip(np.asarray(risk, dtype=np.float64), 0.0, 1.0)
    k = np.searchsorted(np.asarray(cuts, dtype=np.float64), t, side="left")
    b = np.clip((r * bins).astype(np.int64), 0, bins - 1)
    later = (t[None, :] > t[:, None]) | ((t[None, :] == t[:, None]) & ~e[None, :])
    exact = e[:, None] & later
    np.fill_diagonal(exact, False)
    binned = e[:, None] & (k[None, :] > k[:, None])
    lost = exact & ~binned
    tied = binned & (b[None, :] == b[:, None])
    if not binned.any():
        return math.inf
    return float(lost.sum() / exact.sum() + 0.5 * tied.sum() / binned.sum())
