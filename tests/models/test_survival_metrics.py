"""Survival metrics against scikit-survival (the independent reference), on random and tied data."""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.metrics import (
    concordance_index_censored,
)
from sksurv.metrics import (
    cumulative_dynamic_auc as sk_auc,
)
from sksurv.metrics import (
    integrated_brier_score as sk_ibs,
)
from sksurv.util import Surv

from fedcare.models.metrics import MetricInputError, UndefinedMetricError
from fedcare.models.survival import interval_index
from fedcare.models.survival_metrics import (
    concordance_index,
    cumulative_dynamic_auc,
    histogram_contributions,
    integrated_brier_score,
    kaplan_meier,
    metrics_from_histogram,
)


def _data(seed: int, n: int, *, tied: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = rng.exponential(10.0 * np.exp(-0.8 * risk))
    censor = rng.exponential(15.0, size=n)
    event = time <= censor
    time = np.minimum(time, censor)
    if tied:  # coarse times and scores: many ties of both
        time = np.ceil(time)
        risk = np.round(risk, 1)
    return event, time, risk


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_c_index_matches_sksurv(seed: int, tied: bool) -> None:
    event, time, risk = _data(seed, 150, tied=tied)
    ref = concordance_index_censored(event, time, risk)[0]
    assert concordance_index(event, time, risk) == pytest.approx(ref, abs=1e-12)


def test_c_index_undefined_without_events() -> None:
    with pytest.raises(UndefinedMetricError):
        concordance_index([0, 0, 0], [1.0, 2.0, 3.0], [0.1, 0.2, 0.3])


def test_bad_survival_input_is_named() -> None:
    with pytest.raises(MetricInputError, match="0 \\(censored\\) or 1"):
        concordance_index([2, 0], [1.0, 2.0], [0.1, 0.2])
    with pytest.raises(MetricInputError, match="finite and at least 0"):
        concordance_index([1, 0], [-1.0, 2.0], [0.1, 0.2])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_reverse_kaplan_meier_matches_sksurv(seed: int, tied: bool) -> None:
    from sksurv.nonparametric import kaplan_meier_estimator

    event, time, _ = _data(seed, 120, tied=tied)
    t_ref, s_ref = kaplan_meier_estimator(event, time, reverse=True)
    t, s = kaplan_meier(event, time, reverse=True)
    np.testing.assert_allclose(t, t_ref)
    np.testing.assert_allclose(s, s_ref, atol=1e-12)
    t_ref, s_ref = kaplan_meier_estimator(event, time)
    t, s = kaplan_meier(event, time)
    np.testing.assert_allclose(s, s_ref, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 4])
def test_time_dependent_auc_matches_sksurv(seed: int, tied: bool) -> None:
    tr_e, tr_t, _ = _data(seed, 200, tied=tied)
    e, t, risk = _data(seed + 100, 120, tied=tied)
    times = np.array([3.0, 6.0, 9.0, 12.0])
    ref, ref_mean = sk_auc(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(e, t), risk, times)
    got, mean = cumulative_dynamic_auc((tr_e, tr_t), (e, t), risk, times)
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert mean == pytest.approx(ref_mean, abs=1e-12)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", [0, 5])
def test_integrated_brier_matches_sksurv(seed: int, tied: bool) -> None:
    tr_e, tr_t, _ = _data(seed, 200, tied=tied)
    e, t, risk = _data(seed + 100, 120, tied=tied)
    times = np.array([2.0, 4.0, 8.0, 12.0])
    rng = np.random.default_rng(seed)
    surv = np.sort(rng.uniform(size=(t.size, times.size)), axis=1)[:, ::-1]  # decreasing
    ref = sk_ibs(Surv.from_arrays(tr_e, tr_t), Surv.from_arrays(e, t), surv, times)
    got = integrated_brier_score((tr_e, tr_t), (e, t), surv, times)
    assert got == pytest.approx(ref, abs=1e-12)


def test_histogram_metrics_approach_exact_ones_on_fine_grids() -> None:
    """The DP release's C-index and AUC, noise-free, are those of binned data: with fine time
    intervals and risk bins they approach the exact (sksurv) values."""
    event, time, risk = _data(7, 600, tied=False)
    p = 1.0 / (1.0 + np.exp(-risk))
    cuts = np.linspace(0.5, 30.0, 60)
    k = interval_index(time, cuts)
    counts = histogram_contributions(event, k, p, intervals=cuts.size, bins=100).sum(axis=0)
    m = metrics_from_histogram(counts, intervals=cuts.size, bins=100)
    assert m["n"] == 600
    ref = concordance_index_censored(event, time, p)[0]
    assert m["c_index"] == pytest.approx(ref, abs=0.01)
    # td_auc: same estimator at the interval ends, IPCW from the same (binned) data
    inside = cuts[(cuts > time.min()) & (cuts < time.max())][:-1]
    _, ref_mean = sk_auc(Surv.from_arrays(event, time), Surv.from_arrays(event, time), p, inside)
    assert m["td_auc"] == pytest.approx(ref_mean, abs=0.02)


def test_histogram_rows_are_one_hot() -> None:
    rows = histogram_contributions([1, 0, 1], [0, 2, 1], [0.05, 0.5, 1.0], intervals=2, bins=4)
    assert rows.shape == (3, 4 * 3 * 2)
    np.testing.assert_array_equal(rows.sum(axis=1), 1.0)
    np.testing.assert_array_equal(np.linalg.norm(rows, axis=1), 1.0)


def test_small_noisy_count_is_withheld() -> None:
    counts = histogram_contributions([1, 0], [0, 1], [0.2, 0.3], intervals=1, bins=2).sum(axis=0)
    assert metrics_from_histogram(counts, intervals=1, bins=2, min_count=10) == {}
