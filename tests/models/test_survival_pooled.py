"""The pooled survival C-index (models/survival_pooled.py) against scikit-survival and numpy.

Three sites release their exact histograms through the site's own code path
(:func:`fedcare.models.survival.survival_release`, noise 0); the server's pooled C-index is
scikit-survival's Harrell C of the union of their patients with risks and times binned as the
histogram bins them, and the pooled histogram is numpy's of the union. The binning error
against the unbinned C-index stays within the documented bound, computed here pair by pair.
A malformed or oversized histogram is refused with one clear reason.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from fedcare.common import keys
from fedcare.common.errors import DataError
from fedcare.models.survival import SurvivalTask, event_probability, interval_index
from fedcare.models.survival import survival_release as release
from fedcare.models.survival_metrics import histogram_contributions
from fedcare.models.survival_pooled import (
    SurvivalHistogram,
    add_noise,
    binning_error_bound,
    global_survival_metrics,
    histogram_of,
    histograms_from_wire,
    site_mean_key,
)

CUTS = (1.0, 2.0, 4.0, 6.0)
K = len(CUTS)


def _site(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(time, event)`` targets and hazards; times tied on the cuts and beyond the last."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = np.round(rng.exponential(3.0 * np.exp(-0.8 * x)), 1)
    time[:5] = [1.0, 2.0, 2.0, 9.5, 0.0]  # on a cut, tied, after the last cut, at 0
    event = (rng.random(n) < 0.65).astype(float)
    hazards = 1.0 / (1.0 + np.exp(-(0.9 * x[:, None] - 1.5 + 0.1 * np.arange(K)[None, :])))
    return np.column_stack([time, event]), hazards


SITES = {"a": _site(0, 140), "b": _site(1, 90), "c": _site(2, 210)}


def _replies(bins: int) -> dict[str, dict[str, float]]:
    task = SurvivalTask(cuts=CUTS)
    return {
        name: release(
            task,
            {"test": y},
            {"test": h},
            noise_multiplier=0.0,
            generator=None,
            min_count=10,
            train=y,
            bins=bins,
            histogram=True,
        )  # fmt: skip
        for name, (y, h) in SITES.items()
    }


def _pooled(replies: dict[str, dict[str, float]], sigma: float = 0.0) -> dict[str, float]:
    """What the server does: validate each reply's histograms (exact, or noisy with noise
    multiplier ``sigma``), then pool (the weighted means as the guard's
    weighted_global_metrics would give them)."""
    hists = {
        s: histograms_from_wire(m, intervals=K, noise_multiplier=sigma) for s, m in replies.items()
    }
    own = {
        s: {k: v for k, v in m.items() if not keys.is_release_metric(k)} for s, m in replies.items()
    }
    n = np.array([m["test.n"] for m in own.values()])
    weighted = {
        "test.n": float(n.sum()),
        "test.c_index": float(np.average([m["test.c_index"] for m in own.values()], weights=n)),
    }
    return global_survival_metrics(weighted, own, hists)


def _union() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.concatenate([y for y, _ in SITES.values()])
    h = np.concatenate([h for _, h in SITES.values()])
    return y[:, 1].astype(int), y[:, 0], event_probability(h)


@pytest.mark.parametrize("bins", [10, 100])
def test_the_pooled_c_index_is_harrells_of_the_binned_union(bins: int) -> None:
    out = _pooled(_replies(bins))
    event, time, risk = _union()
    k = interval_index(time, CUTS)
    b = np.clip(np.floor(risk * bins), 0, bins - 1)
    # Same-interval pairs are never compared: Harrell's C on the interval with the censored
    # of an interval placed before its events, risks as their bins (ties count one half).
    ref = concordance_index_censored(event == 1, k + 1.0 - 0.5 * (event == 0), b)[0]
    assert out["test.c_index"] == pytest.approx(ref, abs=1e-12)
    assert out["test.n"] == event.size and out["test.events"] == event.sum()
    # The pooled histogram is numpy's histogram of the union (td_auc is a function of it).
    total = sum((histograms_from_wire(m, intervals=K)["test"] for m in _replies(bins).values()),
                start=SurvivalHistogram(np.zeros((bins, K + 1, 2))))  # fmt: skip
    ref_counts, _ = np.histogramdd(
        np.column_stack([b, k, event]), bins=(bins, K + 1, 2),
        range=((0, bins), (0, K + 1), (0, 2)),
    )  # fmt: skip
    np.testing.assert_array_equal(total.counts, ref_counts)
    assert 0.0 <= out["test.td_auc"] <= 1.0
    # The site-weighted mean is kept beside the pooled value, unchanged.
    own = [(r["test.c_index"], r["test.n"]) for r in _replies(bins).values()]
    assert out[site_mean_key("test", "c_index")] == pytest.approx(
        np.average([c for c, _ in own], weights=[n for _, n in own])
    )


def _pairs(event: np.ndarray, time: np.ndarray, k: np.ndarray, b: np.ndarray) -> float:
    """The documented bound, pair by pair (plain loops): lost share + half the tied share."""
    exact = binned = lost = tied = 0
    for i in np.flatnonzero(event == 1):
        for j in range(time.size):
            if i == j:
                continue
            comparable = time[j] > time[i] or (time[j] == time[i] and event[j] == 0)
            in_bins = k[j] > k[i]
            exact += comparable
            binned += in_bins
            lost += comparable and not in_bins
            tied += in_bins and b[i] == b[j]
    return lost / exact + 0.5 * tied / binned


@pytest.mark.parametrize("bins", [10, 100])
def test_the_binning_error_stays_within_the_documented_bound(bins: int) -> None:
    out = _pooled(_replies(bins))
    event, time, risk = _union()
    unbinned = concordance_index_censored(event == 1, time, risk)[0]
    k = interval_index(time, CUTS)
    b = np.clip(np.floor(risk * bins), 0, bins - 1)
    bound = _pairs(event, time, k, b)
    assert binning_error_bound(event, time, risk, cuts=CUTS, bins=bins) == pytest.approx(bound)
    assert abs(out["test.c_index"] - unbinned) <= bound
    assert bound < 1.0  # the bound says something here


def test_the_counting_histogram_is_the_sum_of_one_hot_contributions() -> None:
    y, h = SITES["a"]
    k, e, r = interval_index(y[:, 0], CUTS), y[:, 1].astype(int), event_probability(h)
    ones = histogram_contributions(e, k, r, intervals=K, bins=10).sum(axis=0)
    np.testing.assert_array_equal(histogram_of(e, k, r, intervals=K, bins=10).counts.ravel(), ones)


def test_dp_histograms_are_the_noisy_counts_the_sites_metrics_come_from() -> None:
    task = SurvivalTask(cuts=CUTS)
    y, h = SITES["c"]
    out = release(task, {"test": y}, {"test": h}, noise_multiplier=2.0,
                  generator=np.random.default_rng(5), min_count=10, histogram=True)  # fmt: skip
    hist = histograms_from_wire(out, intervals=K, noise_multiplier=2.0)["test"]
    again = add_noise(
        histogram_of(y[:, 1].astype(int), interval_index(y[:, 0], CUTS), event_probability(h),
                     intervals=K, bins=10),
        noise_multiplier=2.0, generator=np.random.default_rng(5),
    )  # fmt: skip
    np.testing.assert_array_equal(hist.counts, again.counts)  # the same draw: one step
    assert out["test.n"] == round(hist.n)
    assert hist.metrics()["c_index"] == pytest.approx(out["test.c_index"])
    # On the noise grid, and noisy (the exact counts are whole numbers).
    grid = hist.counts / 2.0**-10
    np.testing.assert_array_equal(grid, np.round(grid))
    assert np.any(hist.counts != np.round(hist.counts))
    # Without the flag, nothing but the derived metrics (personal models, baselines).
    plain = release(task, {"test": y}, {"test": h}, noise_multiplier=2.0,
                    generator=np.random.default_rng(5), min_count=10)  # fmt: skip
    assert not any(keys.is_surv_hist_metric(k) for k in plain)


def test_a_withheld_split_sends_no_histogram() -> None:
    task = SurvivalTask(cuts=CUTS)
    y, h = SITES["a"]
    out = release(task, {"test": y[:8], "val": y}, {"test": h[:8], "val": h},
                  noise_multiplier=0.0, generator=None, min_count=10, histogram=True)  # fmt: skip
    assert set(histograms_from_wire(out, intervals=K)) == {"val"}
    assert not any(k.startswith("test.") for k in out)


def _wire() -> dict[str, float]:
    return _replies(10)["a"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.pop(keys.surv_hist_key("test", 3, 2, 1)), "has 100 cells; the reply has 99"),
        (lambda m: m.update({keys.surv_hist_key("test", 10, 0, 0): 1.0}), "has 110 cells"),
        (lambda m: m.update({"test.surv_hist.100.0.0": 1.0}), "not a survival histogram cell"),
        (lambda m: m.update({"test.surv_hist.0.65.0": 1.0}), "not a survival histogram cell"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, K + 1, 0): 1.0}), "beyond the run's"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, 0, 0): math.nan}), "not a finite"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, 0, 0): 1e13}), "not a finite"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, 0, 0): True}), "not a number"),
        (lambda m: m.pop("test.n"), "which the reply withheld"),
        # A site's histogram holds the patients it declares: more patients than its n (it
        # would weigh in the pooled C-index beyond them), cells cancelling others', or no n.
        (lambda m: m.update({"test.n": m["test.n"] / 10}), "the reply declares test.n"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, 0, 0): 3000.0}), "declares test.n"),
        (lambda m: m.update({keys.surv_hist_key("test", 0, 0, 1): -1e11}), "declares test.n"),
        (lambda m: m.update({"test.n": -5.0}), "not a count of at least one patient"),
        # Positive mass paid for with negative cells (the sum still the declared n).
        (
            lambda m: m.update(
                {
                    keys.surv_hist_key("test", 0, 0, 0): 1e9,
                    keys.surv_hist_key("test", 1, 0, 0): m[keys.surv_hist_key("test", 1, 0, 0)]
                    + m[keys.surv_hist_key("test", 0, 0, 0)]
                    - 1e9,
                }
            ),
            "not whole non-negative numbers",
        ),  # fmt: skip
        (
            lambda m: m.update(
                {
                    keys.surv_hist_key("test", 0, 0, 0): 0.5,
                    keys.surv_hist_key("test", 1, 0, 0): m[keys.surv_hist_key("test", 1, 0, 0)]
                    + m[keys.surv_hist_key("test", 0, 0, 0)]
                    - 0.5,
                }
            ),
            "not whole non-negative numbers",
        ),  # fmt: skip
        (lambda m: m.update({"test.n": math.inf}), "not a count of at least one patient"),
    ],
)
def test_a_malformed_or_oversized_histogram_is_refused_with_its_reason(
    change: object, reason: str
) -> None:
    metrics = _wire()
    assert set(histograms_from_wire(metrics, intervals=K)) == {"test"}
    change(metrics)  # type: ignore[operator]
    with pytest.raises(DataError, match=reason):
        histograms_from_wire(metrics, intervals=K)


def test_a_histogram_in_a_run_that_is_not_survival_is_refused() -> None:
    with pytest.raises(DataError, match="not survival"):
        histograms_from_wire(_wire(), intervals=None)
    assert histograms_from_wire({"test.n": 3.0, "test.auroc": 0.5}, intervals=None) == {}


def test_sites_of_other_bins_keep_the_weighted_mean() -> None:
    replies = _replies(10)
    replies["c"] = _replies(100)["c"]
    out = _pooled(replies)
    assert "test.events" not in out and site_mean_key("test", "c_index") not in out
    # A site without a histogram (an older one) too.
    replies = _replies(10)
    replies["b"] = {k: v for k, v in replies["b"].items() if not keys.is_surv_hist_metric(k)}
    assert "test.events" not in _pooled(replies)


def test_dp_sites_pool_into_the_metrics_of_the_sum_of_their_noisy_counts() -> None:
    task = SurvivalTask(cuts=CUTS)
    replies = {
        name: release(task, {"test": y}, {"test": h}, noise_multiplier=1.0,
                      generator=np.random.default_rng(20 + i), min_count=10, histogram=True)
        for i, (name, (y, h)) in enumerate(SITES.items())
    }  # fmt: skip
    out = _pooled(replies, sigma=1.0)
    names = [k for k in replies["a"] if keys.is_surv_hist_metric(k)]
    summed = {k: sum(m[k] for m in replies.values()) for k in names}  # what the sites sent
    ref = SurvivalHistogram(np.zeros((10, K + 1, 2)))
    read = (histograms_from_wire(m, intervals=K, noise_multiplier=1.0) for m in replies.values())
    total = sum((h["test"] for h in read), start=ref)
    assert total.to_wire("test") == pytest.approx(summed)
    assert out["test.c_index"] == pytest.approx(total.metrics()["c_index"])
    assert out["test.n"] == round(sum(summed.values()))
    assert site_mean_key("test", "c_index") in out


def test_noisy_cells_may_be_negative_only_as_much_as_their_noise_makes() -> None:
    """A DP site's cells are noisy counts: negative ones are noise, bounded by its σ. A site
    that pairs a huge cell with a huge negative one (its sum still its n) to outweigh the
    others in the pooled C-index is refused; the honest draws of the tests above pass."""
    task = SurvivalTask(cuts=CUTS)
    y, h = SITES["a"]
    honest = release(task, {"test": y}, {"test": h}, noise_multiplier=1.0,
                     generator=np.random.default_rng(3), min_count=10, histogram=True)  # fmt: skip
    assert set(histograms_from_wire(honest, intervals=K, noise_multiplier=1.0)) == {"test"}
    forged = dict(honest)
    forged[keys.surv_hist_key("test", 9, 0, 1)] += 1e6  # one top-risk early event...
    forged[keys.surv_hist_key("test", 0, 1, 0)] -= 1e6  # ...paid for by a negative cell
    with pytest.raises(DataError, match="more than noise of"):
        histograms_from_wire(forged, intervals=K, noise_multiplier=1.0)
    # The same forgery under a larger stated noise is bounded by that noise.
    with pytest.raises(DataError, match="more than noise of"):
        histograms_from_wire(forged, intervals=K, noise_multiplier=100.0)
