"""DP evaluation releases: binned metrics against references, the noise, the sensitivity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.models.evaluation import (
    LOSS_CLIP,
    SENSITIVITY,
    MalformedRelease,
    SplitSums,
    contributions,
    exact_sums,
    metrics_from_release,
    noise_std,
    release,
    releases_from_wire,
    threshold_from_release,
)
from fedcare.models.metrics import MetricInputError, accuracy, auprc, balanced_accuracy, brier, ece


def _quantised(p: np.ndarray, bins: int) -> np.ndarray:
    """Each score replaced by the mid-point of its bin (the last bin also holds 1.0)."""
    b = np.minimum(np.floor(p * bins), bins - 1)
    return (b + 0.5) / bins


def _mann_whitney(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties one half: every pair, directly."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    p = np.clip(rng.beta(2, 2, n) * 0.6 + 0.35 * y, 0, 1)
    p[:6] = [0.0, 1.0, 0.5, 0.3, 0.7, 0.49999999]  # bin edges and the ends
    return y, p


@pytest.mark.parametrize("bins", [2, 10, 20])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_mode_agrees_with_independent_references(bins: int, seed: int) -> None:
    y, p = _sample(np.random.default_rng(seed), 300)
    m = metrics_from_release(exact_sums(y, p, bins=bins))
    q = _quantised(p, bins)
    assert m["n"] == 300
    assert m["auroc"] == pytest.approx(_mann_whitney(y, q), abs=1e-12)
    assert m["auprc"] == pytest.approx(auprc(y, q), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy(y, p), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy(y, p), abs=1e-12)
    assert m["brier"] == pytest.approx(brier(y, p), abs=1e-12)
    assert m["ece"] == pytest.approx(ece(y, p, n_bins=bins), abs=1e-12)
    q_true = np.where(y == 1, p, 1 - p)
    loss = np.minimum(-np.log(np.maximum(q_true, 1e-300)), LOSS_CLIP)
    assert m["loss"] == pytest.approx(float(np.mean(loss)), abs=1e-12)


def test_binned_auroc_is_close_to_the_exact_one_for_smooth_scores() -> None:
    from fedcare.models.metrics import auroc

    y, p = _sample(np.random.default_rng(5), 2000)
    assert metrics_from_release(exact_sums(y, p))["auroc"] == pytest.approx(auroc(y, p), abs=0.02)


def test_undefined_metrics_are_absent_never_nan() -> None:
    one_class = metrics_from_release(exact_sums(np.zeros(20), np.linspace(0, 1, 20)))
    assert set(one_class) == {"n", "threshold", "accuracy", "brier", "loss", "ece"}
    assert all(math.isfinite(v) for v in one_class.values())
    assert metrics_from_release(exact_sums(np.zeros(0), np.zeros(0))) == {}


@settings(max_examples=200, deadline=None)
@given(
    bins=st.sampled_from([2, 4, 10, 20, 100]),
    y=st.integers(0, 1),
    p=st.one_of(
        st.sampled_from([0.0, 1.0, 0.5, 0.1, 0.9, 1e-300, 5e-324, 1 - 1e-16, np.nextafter(0.5, 0)]),
        st.floats(0.0, 1.0),
    ),
)
def test_one_patient_moves_the_release_by_at_most_the_sensitivity(
    bins: int, y: int, p: float
) -> None:
    rng = np.random.default_rng(0)
    others_y, others_p = rng.integers(0, 2, 30), rng.random(30)
    without = exact_sums(others_y, others_p, bins=bins).vector()
    with_ = exact_sums(np.r_[others_y, y], np.r_[others_p, p], bins=bins).vector()
    norm = float(np.linalg.norm(with_ - without))
    assert norm <= SENSITIVITY + 1e-9
    assert np.linalg.norm(contributions([y], [p], bins=bins)[0]) <= SENSITIVITY + 1e-12


def test_the_sensitivity_bound_is_nearly_attained() -> None:
    """p = 0 with label 1: count 1, clipped loss 1, Brier 1 (and position 0)."""
    assert np.linalg.norm(contributions([1], [0.0])[0]) == pytest.approx(math.sqrt(3))
    worst = max(
        np.linalg.norm(row) for row in contributions([1] * 999, np.linspace(0, 0.0999, 999))
    )
    assert math.sqrt(3) <= worst <= SENSITIVITY


@pytest.mark.parametrize("make", ["numpy", "torch"])
def test_noise_has_the_stated_standard_deviation_and_is_independent(make: str) -> None:
    sigma, draws = 2.0, 2000
    rng = np.random.default_rng(11)
    y, p = {"test": rng.integers(0, 2, 500)}, {"test": rng.random(500)}
    gen = np.random.default_rng(12345) if make == "numpy" else torch.Generator().manual_seed(7)
    exact = exact_sums(y["test"], p["test"]).vector()
    noise = np.empty((draws, exact.size))
    for i in range(draws):
        out = release(y, p, noise_multiplier=sigma, generator=gen, min_count=10)
        noise[i] = releases_from_wire(out)["test"].vector() - exact
    std = noise_std(sigma)
    assert std == pytest.approx(sigma * SENSITIVITY)
    # Each coordinate's sd within 10% (sampling sd of one sd estimate: ~1.3%).
    np.testing.assert_allclose(noise.std(axis=0), std, rtol=0.10)
    assert abs(noise.std() / std - 1) < 0.02  # pooled over 32 coordinates
    assert np.all(np.abs(noise.mean(axis=0)) < 5 * std / math.sqrt(draws))
    corr = np.corrcoef(noise.T)
    assert np.max(np.abs(corr - np.eye(exact.size))) < 0.1  # sampling sd ~0.018


def test_a_split_below_min_count_is_withheld_whole_and_still_charged() -> None:
    rng = np.random.default_rng(0)
    y = {"val": rng.integers(0, 2, 8), "test": rng.integers(0, 2, 40)}
    p = {"val": rng.random(8), "test": rng.random(40)}
    out = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
    assert not [k for k in out if k.startswith("val.")]
    assert out["test.n"] == 40 and f"test.{keys.R_LOSS_SUM}" in out
    out = release(y, p, noise_multiplier=1e4, generator=rng, min_count=1e6)
    assert out == {}


def test_suppression_uses_the_noisy_count() -> None:
    rng = np.random.default_rng(3)
    y, p = {"test": np.ones(12)}, {"test": np.full(12, 0.9)}
    kept = [
        "test.n" in release(y, p, noise_multiplier=1.0, generator=rng, min_count=12)
        for _ in range(400)
    ]
    assert 0.3 < np.mean(kept) < 0.7  # true n sits on the threshold: about half released


def test_every_sent_key_is_a_wire_key_and_round_trips() -> None:
    rng = np.random.default_rng(1)
    y = {s: rng.integers(0, 2, 50) for s in keys.EVAL_SPLITS}
    p = {s: rng.random(50) for s in keys.EVAL_SPLITS}
    out = release(y, p, noise_multiplier=0.5, generator=rng, min_count=10, bins=20)
    assert [k for k in out if not keys.is_allowed_metric(k)] == []
    derived = {k.split(".", 1)[1] for k in out if not keys.is_release_metric(k)}
    assert derived <= set(keys.TASK_METRICS)
    parsed = releases_from_wire(out)
    assert set(parsed) == set(keys.EVAL_SPLITS) and parsed["test"].bins == 20
    for split, sums in parsed.items():
        assert sums.to_wire(split) == {
            k: v for k, v in out.items() if keys.is_release_metric(k) and k.startswith(f"{split}.")
        }
        m = metrics_from_release(
            sums, min_count=10, threshold=threshold_from_release(parsed["val"])
        )
        assert m == {
            k.split(".", 1)[1]: v
            for k, v in out.items()
            if k.startswith(f"{split}.") and not keys.is_release_metric(k)
        }


def _wire() -> dict[str, float]:
    return exact_sums([0, 1, 1], [0.1, 0.6, 0.95]).to_wire("test")


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.pop("test.hist.3.1"),
        lambda w: w.pop("test.loss_sum"),
        lambda w: w.pop("test.bin_offset.9"),
        lambda w: w.update({"test.hist.10.0": 0.0, "test.hist.10.1": 0.0}),
        lambda w: w.update({"test.hist.0.0": float("nan")}),
        lambda w: w.update({"test.brier_sum": float("inf")}),
        lambda w: w.update({"test.hist.0.0": 1e13}),
        lambda w: w.update({"test.hist.0.0": True}),
        lambda w: w.update({"test.hist.0.0": "1"}),
    ],
)
def test_malformed_wire_releases_are_refused(change: object) -> None:
    wire: dict[str, object] = dict(_wire())
    change(wire)  # type: ignore[operator]
    with pytest.raises(MalformedRelease):
        releases_from_wire(wire)


def test_summed_releases_equal_the_pooled_release() -> None:
    rng = np.random.default_rng(4)
    ya, pa, yb, pb = rng.integers(0, 2, 40), rng.random(40), rng.integers(0, 2, 70), rng.random(70)
    pooled = exact_sums(np.r_[ya, yb], np.r_[pa, pb])
    np.testing.assert_allclose((exact_sums(ya, pa) + exact_sums(yb, pb)).vector(), pooled.vector())
    with pytest.raises(ValueError):
        _ = exact_sums(ya, pa, bins=10) + exact_sums(yb, pb, bins=20)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"noise_multiplier": -1.0}, ConfigError),
        ({"noise_multiplier": float("nan")}, ConfigError),
        ({"noise_multiplier": 1.0, "generator": None}, ConfigError),
        ({"noise_multiplier": 1.0, "generator": 42}, ConfigError),
        ({"bins": 7}, ConfigError),
        ({"bins": 0}, ConfigError),
        ({"bins": 102}, ConfigError),
        ({"p": {"test": [0.5, 1.5]}}, MetricInputError),
        ({"p": {"test": [0.5, float("nan")]}}, MetricInputError),
        ({"y": {"test": [0, 2]}}, MetricInputError),
        ({"p": {"val": [0.1, 0.2]}}, ConfigError),
        ({"y": {"train": [0, 1]}, "p": {"train": [0.1, 0.2]}}, ConfigError),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs: dict, error: type[Exception]) -> None:
    args = {
        "y": {"test": [0, 1]},
        "p": {"test": [0.2, 0.8]},
        "noise_multiplier": 0.0,
        "generator": np.random.default_rng(0),
        "min_count": 1,
        "bins": 10,
        **kwargs,
    }
    with pytest.raises(error):
        release(args.pop("y"), args.pop("p"), **args)


def test_split_sums_reject_a_bad_shape() -> None:
    with pytest.raises(ValueError):
        SplitSums(np.zeros((3, 2)), np.zeros(3), 0.0, 0.0)


def test_release_threshold_is_youden_on_the_validation_histogram() -> None:
    """The decision threshold maximises sensitivity + specificity over the bin edges of the
    validation release (checked against a brute force over the exact scores quantised to
    bin edges), and the test split's accuracy uses it, not 0.5."""
    from fedcare.models.metrics import accuracy

    rng = np.random.default_rng(11)
    y = (rng.random(400) < 0.2).astype(float)
    p = np.clip(0.12 + 0.1 * y + rng.normal(0, 0.05, 400), 0, 1)  # never crosses 0.5
    bins = 20
    sums = exact_sums(y, p, bins=bins)
    t = threshold_from_release(sums)
    best = max(
        (np.mean(p[y == 1] >= k / bins) - np.mean(p[y == 0] >= k / bins), -abs(k / bins - 0.5), k)
        for k in range(bins + 1)
    )
    assert t == best[2] / bins
    assert 0.0 < t < 0.5
    out = release(
        {"val": y, "test": y},
        {"val": p, "test": p},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        bins=bins,
    )
    assert out["test.threshold"] == t
    assert out["test.accuracy"] == pytest.approx(accuracy(y, p, threshold=t))
    assert out["test.balanced_accuracy"] > 0.7  # at 0.5 it would be exactly 0.5


def test_small_validation_split_does_not_choose_the_threshold() -> None:
    y = np.array([0, 1] * 3, dtype=float)
    p = np.array([0.1, 0.2] * 3)
    out = release(
        {"val": y, "test": np.r_[y, y, y]},
        {"val": p, "test": np.r_[p, p, p]},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        bins=10,
    )
    assert "val.n" not in out
    assert out["test.threshold"] == 0.5
