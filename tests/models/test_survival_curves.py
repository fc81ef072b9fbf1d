"""Survival curves (models/survival_curves.py) against scikit-survival and numpy.

The observed curve is checked against scikit-survival's ``kaplan_meier_estimator`` of the
times grouped into the cuts' intervals (an independent product-limit implementation), the
predicted curve against numpy's mean of the patients' curves, per site and pooled.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sksurv.nonparametric import kaplan_meier_estimator

from fedcare.common import keys
from fedcare.common.errors import DataError
from fedcare.models.survival import interval_index, survival_curves
from fedcare.models.survival_curves import (
    SENSITIVITY,
    CurveRelease,
    contributions,
    pooled_curve,
    release,
    release_from_wire,
    site_curve,
)

CUTS = (1.0, 2.0, 3.0, 4.0)


def _patients(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    time = rng.exponential(2.5, n)
    event = rng.random(n) < 0.7
    hazards = rng.uniform(0.05, 0.5, (n, len(CUTS)))
    return event.astype(int), time, hazards


def _km_at_cuts(event: np.ndarray, time: np.ndarray, upto: int) -> np.ndarray:
    """scikit-survival's Kaplan-Meier of the times grouped into intervals, after each of the
    first ``upto`` intervals (an event after the last cut censored, as the release does)."""
    k = interval_index(time, CUTS)
    e = (event == 1) & (k < len(CUTS))
    times, prob = kaplan_meier_estimator(e, k.astype(float))
    idx = np.searchsorted(times, np.arange(upto), side="right") - 1
    return np.where(idx >= 0, prob[np.clip(idx, 0, None)], 1.0)


def _exact(event: np.ndarray, time: np.ndarray, hazards: np.ndarray, min_count: float = 1):
    return release(
        event,
        interval_index(time, CUTS),
        survival_curves(hazards),
        cuts=CUTS,
        noise_multiplier=0.0,
        generator=None,
        min_count=min_count,
    )


def test_a_sites_exact_curves_are_kaplan_meier_and_the_mean_predicted_curve() -> None:
    event, time, hazards = _patients(np.random.default_rng(0), 300)
    rel = _exact(event, time, hazards)
    assert rel is not None and len(rel.at_risk) == len(CUTS)
    curve = site_curve(rel)
    np.testing.assert_allclose(curve.observed, _km_at_cuts(event, time, len(CUTS)), atol=1e-12)
    np.testing.assert_allclose(curve.predicted, survival_curves(hazards).mean(axis=0), atol=1e-12)
    assert curve.n == 300
    k = interval_index(time, CUTS)
    np.testing.assert_array_equal(curve.at_risk, [(k >= j).sum() for j in range(len(CUTS))])


def test_pooled_curves_are_the_kaplan_meier_of_all_sites_patients_together() -> None:
    rng = np.random.default_rng(1)
    sites = [_patients(rng, n) for n in (120, 80, 200)]
    pooled = pooled_curve([_exact(*s) for s in sites], min_count=10)  # type: ignore[misc]
    assert pooled is not None
    event, time, hazards = (np.concatenate(parts) for parts in zip(*sites, strict=True))
    np.testing.assert_allclose(
        pooled.observed, _km_at_cuts(event, time, len(pooled.observed)), atol=1e-12
    )
    np.testing.assert_allclose(pooled.predicted, survival_curves(hazards).mean(axis=0))
    assert pooled.n == 400 and len(pooled.observed) == len(CUTS)


def test_intervals_with_few_patients_at_risk_are_withheld_and_a_small_site_entirely() -> None:
    event, time, hazards = _patients(np.random.default_rng(2), 60)
    time[:] = 0.5
    time[:3] = 3.5  # three patients still at risk in the last interval before the last cut
    rel = _exact(event, time, hazards, min_count=10)
    assert rel is not None
    assert len(rel.at_risk) == 1  # interval 1 has 3 at risk: it and every later one withheld
    assert rel.at_risk == (60.0,) and len(rel.predicted) == len(CUTS)
    assert not any(keys.parse_curve_key(k) == (keys.CURVE_AT_RISK, 3) for k in rel.to_wire())
    assert _exact(event[:9], time[:9], hazards[:9], min_count=10) is None


def test_a_pooled_curve_stops_where_the_releasing_sites_have_too_few_at_risk() -> None:
    a = CurveRelease((30.0, 20.0, 12.0), (5.0, 4.0, 3.0), (25.0, 18.0, 12.0, 8.0))
    b = CurveRelease((30.0, 15.0), (6.0, 5.0), (26.0, 19.0, 13.0, 9.0))
    pooled = pooled_curve([a, b], min_count=15)
    assert pooled is not None
    assert pooled.at_risk == (60.0, 35.0)  # interval 2: only a's 12 at risk, below 15
    assert pooled.observed == pytest.approx((1 - 11 / 60, (1 - 11 / 60) * (1 - 9 / 35)))
    assert pooled.predicted == pytest.approx(tuple(np.add(a.predicted, b.predicted) / 60))


def test_one_patients_contribution_is_bounded_whatever_the_model_predicts() -> None:
    rng = np.random.default_rng(3)
    for intervals in (1, 4, 30):
        n = 500
        rows = contributions(
            rng.integers(0, 2, n),
            rng.integers(0, intervals + 1, n),
            rng.choice([0.0, 1.0, 7.0, -3.0], (n, intervals)),  # out of range: clipped
            intervals=intervals,
        )
        assert np.linalg.norm(rows, axis=1).max() <= SENSITIVITY + 1e-12


def test_the_dp_release_is_the_exact_one_plus_noise_of_the_mechanisms_scale() -> None:
    event, time, hazards = _patients(np.random.default_rng(4), 400)
    exact = _exact(event, time, hazards)
    sigma = 2.0
    draws = [
        release(
            event,
            interval_index(time, CUTS),
            survival_curves(hazards),
            cuts=CUTS,
            noise_multiplier=sigma,
            generator=np.random.default_rng(seed),
            min_count=10,
        )
        for seed in range(200)
    ]
    assert exact is not None and all(d is not None and len(d.at_risk) == 4 for d in draws)
    first = np.array([d.at_risk[0] for d in draws if d is not None]) - exact.at_risk[0]
    # r_0 sums all 10 noisy life-table cells: sd sigma * sqrt(2) * sqrt(10)
    assert np.std(first) == pytest.approx(sigma * SENSITIVITY * math.sqrt(10), rel=0.2)
    pred = np.array([d.predicted[0] for d in draws if d is not None]) - exact.predicted[0]
    assert np.std(pred) == pytest.approx(sigma * SENSITIVITY * math.sqrt(len(CUTS)), rel=0.2)


def test_a_release_reads_back_from_the_wire_and_a_malformed_one_is_named() -> None:
    rel = CurveRelease((30.0, 20.0), (5.0, 4.0), (25.0, 18.0, 12.0, 8.0))
    wire = {**rel.to_wire(), "test.c_index": 0.7}
    assert all(keys.is_allowed_metric(k) and keys.is_release_metric(k) for k in rel.to_wire())
    assert release_from_wire(wire, cuts=CUTS) == rel
    gap = {k: v for k, v in wire.items() if k != "curve.at_risk.0"}
    with pytest.raises(DataError, match="leading intervals"):
        release_from_wire(gap, cuts=CUTS)
    short = {k: v for k, v in wire.items() if k != "curve.predicted.3"}
    with pytest.raises(DataError, match="all 4 cuts"):
        release_from_wire(short, cuts=CUTS)
    with pytest.raises(DataError, match="events of every"):
        release_from_wire({k: v for k, v in wire.items() if k != "curve.events.1"}, cuts=CUTS)
    with pytest.raises(DataError, match="bounded finite"):
        release_from_wire({**wire, "curve.events.1": float("nan")}, cuts=CUTS)
    assert not keys.is_curve_metric("curve.at_risk.64")
    assert not keys.is_curve_metric("curve.at_risk.01")
