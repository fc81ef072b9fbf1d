"""Crafted-weights evaluation: exact metrics reveal one patient; the DP release does not.

The attack seen: a curious centre sends weights whose predictions isolate one validation
patient (an extreme glucose value) and reads that patient's presence and label off the
metrics. Here the crafted model gives that patient p = 0.999 and everyone else p = 0.02.
The attacker knows every other patient (the strongest attacker DP speaks of), so it knows
the exact release of both neighbouring datasets and runs the best (likelihood-ratio) test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from fedcare.client.accounting import Mechanism, epsilon
from fedcare.common import keys
from fedcare.models.evaluation import (
    SENSITIVITY,
    SplitSums,
    add_noise,
    exact_sums,
    noise_std,
    release,
)

SIGMA = 5.0
DELTA = 1e-5
DRAWS = 2000
MIN_COUNT = 10


def _hospital(target_label: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """24 ordinary validation patients (+ the extreme one), 60 test patients; crafted p."""
    rng = np.random.default_rng(2024)  # the same other patients in every neighbour
    glucose = {"val": rng.normal(110, 20, 24), "test": rng.normal(110, 20, 60)}
    labels = {"val": rng.integers(0, 2, 24), "test": rng.integers(0, 2, 60)}
    if target_label is not None:
        glucose["val"] = np.r_[glucose["val"], 650.0]
        labels["val"] = np.r_[labels["val"], target_label]

    def crafted(g: np.ndarray) -> np.ndarray:  # "weights" that isolate glucose > 400
        return np.where(g > 400, 0.999, 0.02)

    return labels, {split: crafted(g) for split, g in glucose.items()}


def _exact(target_label: int | None) -> dict[str, SplitSums]:
    y, p = _hospital(target_label)
    return {s: exact_sums(y[s], p[s]) for s in keys.EVAL_SPLITS}


def _vector(sums: dict[str, SplitSums]) -> np.ndarray:
    return np.concatenate([sums[s].vector() for s in keys.EVAL_SPLITS])


def test_exact_evaluation_reveals_presence_and_label() -> None:
    releases = {
        label: release(*_hospital(label), noise_multiplier=0.0, generator=None, min_count=MIN_COUNT)
        for label in (None, 0, 1)
    }
    top = keys.hist_key("val", 9, 0), keys.hist_key("val", 9, 1)
    assert [releases[None][k] for k in top] == [0.0, 0.0]
    assert [releases[0][k] for k in top] == [1.0, 0.0]
    assert [releases[1][k] for k in top] == [0.0, 1.0]
    # The derived metrics alone tell all three apart too (what the attack used).
    derived = [tuple(v[f"val.{m}"] for m in ("n", "brier", "auroc")) for v in releases.values()]
    assert len(set(derived)) == 3


def _tradeoff(t0: np.ndarray, t1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of "reject H0 when T > t" for thresholds at the pooled quantiles."""
    thresholds = np.quantile(np.r_[t0, t1], np.linspace(0.005, 0.995, 199))
    fpr = (t0[None, :] > thresholds[:, None]).mean(axis=1)
    tpr = (t1[None, :] > thresholds[:, None]).mean(axis=1)
    return fpr, tpr


def _assert_dp(fpr: np.ndarray, tpr: np.ndarray, eps: float, delta: float) -> None:
    """TPR <= e^eps FPR + delta (and the same for the complements), within 4.5 sampling sd."""
    for a, b in ((tpr, fpr), (1 - fpr, 1 - tpr)):
        slack = 4.5 * np.sqrt((a * (1 - a) + math.exp(2 * eps) * b * (1 - b)) / DRAWS) + 1e-3
        excess = a - (math.exp(eps) * b + delta)
        assert np.all(excess <= slack), float(np.max(excess - slack))


@pytest.mark.slow
def test_dp_evaluation_bounds_the_best_test_by_the_charged_epsilon() -> None:
    """What leaves the site (withheld splits included) obeys the charged (ε, δ)."""
    gen = np.random.default_rng(77)
    eps = epsilon([Mechanism(noise_multiplier=SIGMA, sample_rate=1.0, steps=1)], delta=DELTA)
    assert 0.5 < eps < 1.0  # σ = 5: about 0.74
    seen: dict[int | None, list[dict[str, float]]] = {None: [], 0: [], 1: []}
    for label, outputs in seen.items():
        data = _hospital(label)
        for _ in range(DRAWS):
            out = release(*data, noise_multiplier=SIGMA, generator=gen, min_count=MIN_COUNT)
            outputs.append(out)
    assert 0.1 < np.mean(["val.n" in out for out in seen[0]]) < 0.9  # withheld at times

    def statistic(outputs: list[dict[str, float]], mu0: np.ndarray, d: np.ndarray) -> np.ndarray:
        """The projection below on the validation release; withheld: the lowest value."""
        keys_val = list(SplitSums(np.zeros((10, 2)), np.zeros(10), 0, 0).to_wire("val"))
        t = np.full(len(outputs), -1e9)
        for i, out in enumerate(outputs):
            if "val.n" in out:
                t[i] = (np.array([out[k] for k in keys_val]) - mu0) @ d
        return t

    for h0, h1, group in NEIGHBOURS:
        mu0, mu1 = _exact(h0)["val"].vector(), _exact(h1)["val"].vector()
        d = mu1 - mu0
        fpr, tpr = _tradeoff(statistic(seen[h0], mu0, d), statistic(seen[h1], mu0, d))
        _assert_dp(fpr, tpr, group * eps, _group_delta(group, eps))


def test_the_noisy_release_is_the_gaussian_mechanism_it_is_charged_as() -> None:
    """Before any withholding: the best test's power is the Gaussian trade-off curve of
    noise multiplier σ (so the (ε, δ) bound above is tight, not vacuous), and obeys it."""
    gen = np.random.default_rng(78)
    eps = epsilon([Mechanism(noise_multiplier=SIGMA, sample_rate=1.0, steps=1)], delta=DELTA)
    std = noise_std(SIGMA)
    samples = {
        label: np.array(
            [
                _vector({s: add_noise(x, std=std, generator=gen) for s, x in exact.items()})
                for _ in range(DRAWS)
            ]
        )
        for label, exact in ((label, _exact(label)) for label in (None, 0, 1))
    }
    for h0, h1, group in NEIGHBOURS:
        mu0, mu1 = _vector(_exact(h0)), _vector(_exact(h1))
        d = mu1 - mu0
        assert np.linalg.norm(d) <= group * SENSITIVITY + 1e-9  # add/remove; a label flip: 2
        # The Neyman-Pearson test: project onto the difference of the exact releases.
        t0 = (samples[h0] - mu0) @ d / (np.linalg.norm(d) * std)
        t1 = (samples[h1] - mu0) @ d / (np.linalg.norm(d) * std)
        fpr, tpr = _tradeoff(t0, t1)
        _assert_dp(fpr, tpr, group * eps, _group_delta(group, eps))
        mu = np.linalg.norm(d) / std  # T ~ N(0, 1) vs N(mu, 1)
        np.testing.assert_allclose(tpr, norm.sf(norm.isf(fpr) - mu), atol=0.05)
        assert float(np.max(tpr - fpr)) < 2 * norm.cdf(mu / 2) - 1 + 0.05  # advantage ~ 0.1


#: (H0, H1, group size): without vs with the patient (label 0 or 1), and a label flip.
NEIGHBOURS = ((None, 0, 1), (None, 1, 1), (0, 1, 2))


def _group_delta(group: int, eps: float) -> float:
    """δ of a group of ``group`` (1 or 2) neighbours: (2ε, (1 + e^ε) δ) for two."""
    return DELTA if group == 1 else (1 + math.exp(eps)) * DELTA
