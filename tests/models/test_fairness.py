"""fedcare.models.fairness: per-group metrics of a private release, checked against references.

Exact group metrics are compared with scikit-learn and numpy on each group's own patients
(AUROC on the scores quantised to the release's bins, which is what a binned Mann-Whitney
computes); the noise against ``σ Δ``; small-count suppression as a property (hypothesis):
whatever subtracting the released groups from the split recovers holds at least ``k``
patients, or none.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from fedcare.common import keys
from fedcare.common.spec import Feature, FeatureSchema, GroupAttribute
from fedcare.models.evaluation import MalformedRelease, exact_sums
from fedcare.models.fairness import (
    calibration_curve,
    coarsen,
    declared_groups,
    global_calibration,
    global_fairness_metrics,
    group_codes,
    group_releases_from_wire,
    release_groups,
    suppressed_groups,
)

SCHEMA = FeatureSchema(
    ehr=(
        Feature(name="age", kind="numeric"),
        Feature(name="sex", kind="categorical", categories=("F", "M")),
        Feature(name="smoker", kind="binary"),
    ),
    groups=(
        GroupAttribute(name="sex", column="sex"),
        GroupAttribute(name="age_band", column="age", cuts=(50, 70)),
        GroupAttribute(name="smoker", column="smoker"),
    ),
)


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, probabilities and group codes (3 groups) with a group-dependent signal."""
    g = rng.integers(0, 3, n)
    y = rng.integers(0, 2, n).astype(float)
    strength = np.array([0.3, 1.2, 2.0])[g]
    p = 1.0 / (1.0 + np.exp(-(strength * (2 * y - 1) + rng.normal(0, 1, n))))
    return y, p, g


def test_group_codes_partition_every_patient_missing_values_last() -> None:
    assert declared_groups(SCHEMA) == {"sex": 3, "age_band": 4, "smoker": 3}
    assert group_codes(SCHEMA, "sex", ["M", "F", None, "X", float("nan")]).tolist() == [
        1,
        0,
        2,
        2,
        2,
    ]
    ages = [18, 49.99, 50, 69.5, 70, 101, None]
    assert group_codes(SCHEMA, "age_band", ages).tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert group_codes(SCHEMA, "smoker", [0, 1, 1.0, float("nan")]).tolist() == [0, 1, 1, 2]


def test_exact_group_metrics_are_those_of_each_groups_patients() -> None:
    rng = np.random.default_rng(0)
    y, p, g = _data(rng, 900)
    bins, threshold = 100, 0.43
    out = release_groups(
        {"test": y},
        {"test": p},
        {"grp": {"test": g}},
        {"grp": 3},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        threshold=threshold,
        bins=bins,
    )
    aurocs = []
    for k in range(3):
        yk, pk = y[g == k], p[g == k]
        prefix = f"test.group.grp.{k}"
        quantised = np.minimum(np.floor(pk * bins), bins - 1)
        assert out[f"{prefix}.n"] == len(yk)
        assert out[f"{prefix}.auroc"] == pytest.approx(roc_auc_score(yk, quantised), abs=1e-12)
        assert out[f"{prefix}.tpr"] == pytest.approx(np.mean(pk[yk == 1] >= threshold))
        assert out[f"{prefix}.fpr"] == pytest.approx(np.mean(pk[yk == 0] >= threshold))
        assert out[f"{prefix}.mean_predicted"] == pytest.approx(pk.mean(), abs=1e-9)
        assert out[f"{prefix}.observed"] == pytest.approx(yk.mean())
        assert out[f"{prefix}.brier"] == pytest.approx(np.mean((pk - yk) ** 2))
        idx = np.minimum(np.floor(pk * bins).astype(int), bins - 1)
        ece = sum(abs(yk[idx == b].sum() - pk[idx == b].sum()) for b in range(bins)) / len(yk)
        assert out[f"{prefix}.ece"] == pytest.approx(ece, abs=1e-9)
        aurocs.append(roc_auc_score(yk, quantised))
    assert out["test.gap.grp.auroc"] == pytest.approx(max(aurocs[:2]) - min(aurocs[:2]))
    assert aurocs[1] > aurocs[0] + 0.15, "the planted group-dependent signal"
    assert all(keys.is_allowed_metric(k) for k in out)


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=17),
    k=st.integers(min_value=1, max_value=30),
)
def test_withheld_groups_hold_at_least_k_patients_together_or_none(
    counts: list[int], k: int
) -> None:
    """(A split below k is itself withheld, and its groups with it.)"""
    assume(sum(counts) >= k)
    hidden = suppressed_groups([float(c) for c in counts], min_count=k)
    assert {i for i, c in enumerate(counts) if c < k} <= hidden
    recovered = sum(counts[i] for i in hidden)  # split minus the released groups
    assert recovered == 0 or recovered >= k


def test_a_small_group_cannot_be_recovered_from_the_split_by_subtraction() -> None:
    """Three patients in one group: every group of the attribute is withheld (k = 10)."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60).astype(float)
    p = rng.uniform(0, 1, 60)
    g = np.r_[np.zeros(3, int), np.ones(57, int)]  # 3 in group 0, none unknown
    out = release_groups(
        {"test": y},
        {"test": p},
        {"sex": {"test": g}},
        {"sex": 3},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        threshold=0.5,
        bins=10,
    )
    assert out == {}
    g2 = np.r_[np.zeros(12, int), np.ones(48, int)]
    released = release_groups(
        {"test": y},
        {"test": p},
        {"sex": {"test": g2}},
        {"sex": 3},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        threshold=0.5,
        bins=10,
    )
    assert released["test.group.sex.0.n"] == 12 and released["test.group.sex.1.n"] == 48
    assert "test.group.sex.2.n" not in released  # the empty unknown group hides nobody


def test_dp_group_release_adds_noise_of_sigma_delta_to_every_sum() -> None:
    rng = np.random.default_rng(2)
    y, p, g = _data(rng, 3000)
    sigma = 2.0
    noise = []
    for seed in range(40):
        out = release_groups(
            {"test": y},
            {"test": p},
            {"grp": {"test": g}},
            {"grp": 3},
            noise_multiplier=sigma,
            generator=np.random.default_rng(seed),
            min_count=10,
            threshold=0.5,
            bins=10,
        )
        for k in range(2):
            prefix = keys.group_prefix("test", "grp", k)
            exact = exact_sums(y[g == k], p[g == k], bins=10).to_wire(prefix)
            noise += [out[name] - value for name, value in exact.items()]
    # Δ = sqrt(3 + w^2) with w = 0.5, worked out here, not taken from the code.
    assert np.std(noise) == pytest.approx(sigma * math.sqrt(3.25), rel=0.05)
    assert abs(np.mean(noise)) < 0.1


def _wire(y: np.ndarray, p: np.ndarray, g: np.ndarray) -> dict[str, float]:
    return release_groups(
        {"test": y, "val": y},
        {"test": p, "val": p},
        {"sex": {"test": g, "val": g}},
        {"sex": 3},
        noise_multiplier=0.0,
        generator=None,
        min_count=5,
        threshold=0.5,
        bins=10,
    )


def test_the_servers_reading_of_a_reply_validates_every_group_key() -> None:
    rng = np.random.default_rng(3)
    y, p, g = _data(rng, 200)
    g = np.minimum(g, 1)
    wire = _wire(y, p, g)
    read = group_releases_from_wire(wire, {"sex": 3})
    assert set(read) == {(s, "sex", k) for s in ("test", "val") for k in (0, 1)}
    expected = exact_sums(y[g == 1], p[g == 1], bins=10)
    assert np.allclose(read[("test", "sex", 1)].vector(), expected.vector())

    def refused(metrics: dict[str, float], declared: dict[str, int], match: str) -> None:
        with pytest.raises(MalformedRelease, match=match):
            group_releases_from_wire(metrics, declared)

    refused(wire, {"age_band": 4}, "not in the federation's schema")
    refused(wire, {"sex": 1}, "has groups 0..0")
    incomplete = {k: v for k, v in wire.items() if k != "test.group.sex.0.hist.3.1"}
    refused(incomplete, {"sex": 3}, "not those of a 10-bin release")
    derived_only = {k: v for k, v in wire.items() if not keys.is_group_release_metric(k)}
    refused(derived_only, {"sex": 3}, "without the group's release")
    refused({**wire, "test.group.sex.0.auroc": 1.5}, {"sex": 3}, "outside")
    refused({**wire, "test.gap.sex.auroc": -0.1}, {"sex": 3}, "outside")
    refused({**wire, "test.group.sex.0.hist.0.0": float("nan")}, {"sex": 3}, "not finite")


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("test.group.sex.0.auroc", True),
        ("val.group.age_band.16.hist.99.1", True),
        ("test.gap.sex.calibration_error", True),
        ("test.group.sex.17.auroc", False),  # past the largest group index
        ("test.group.sex.0.hist.100.0", False),  # past the largest bin
        ("test.group.sex.01.n", False),
        ("test.group.Sex.0.n", False),
        ("test.group.sex.0.patient_id", False),
        ("train.group.sex.0.n", False),
        ("test.gap.sex.n", False),
        ("personal.test.group.sex.0.auroc", False),
    ],
)
def test_the_allow_list_admits_group_keys_precisely(name: str, allowed: bool) -> None:
    assert keys.is_allowed_metric(name) is allowed


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_a_fine_release_coarsens_exactly_to_the_coarse_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40).astype(float)
    p = rng.uniform(0, 1, 40)
    fine = coarsen(exact_sums(y, p, bins=100), 10)
    assert np.allclose(fine.vector(), exact_sums(y, p, bins=10).vector(), atol=1e-9)


def test_global_group_metrics_and_calibration_are_those_of_the_pooled_patients() -> None:
    rng = np.random.default_rng(4)
    sites = {f"site-{i}": _data(rng, 400) for i in range(3)}
    releases, groups = {}, {}
    for site, (y, p, g) in sites.items():
        releases[site] = {"test": exact_sums(y, p, bins=100), "val": exact_sums(y, p, bins=100)}
        wire = release_groups(
            {"test": y},
            {"test": p},
            {"grp": {"test": g}},
            {"grp": 3},
            noise_multiplier=0.0,
            generator=None,
            min_count=10,
            threshold=0.5,
            bins=100 if site != "site-2" else 10,  # one site with another grid: coarsened
        )
        groups[site] = group_releases_from_wire(wire, {"grp": 3})
    out = global_fairness_metrics(releases, groups, {"grp": 3}, threshold=0.4)
    y = np.concatenate([v[0] for v in sites.values()])
    p = np.concatenate([v[1] for v in sites.values()])
    g = np.concatenate([v[2] for v in sites.values()])
    for k in range(3):
        yk, pk = y[g == k], p[g == k]
        assert out[f"test.group.grp.{k}.n"] == len(yk)
        quantised = np.minimum(np.floor(pk * 10), 9)  # pooled on the coarsest grid
        assert out[f"test.group.grp.{k}.auroc"] == pytest.approx(roc_auc_score(yk, quantised))
        assert out[f"test.group.grp.{k}.tpr"] == pytest.approx(np.mean(pk[yk == 1] >= 0.4))
    curve = global_calibration(releases)
    idx = np.minimum(np.floor(p * 10).astype(int), 9)
    expected = [
        (b, p[idx == b].mean(), y[idx == b].mean(), float((idx == b).sum()))
        for b in range(10)
        if (idx == b).any()
    ]
    assert [c[0] for c in curve] == [e[0] for e in expected]
    for got, want in zip(curve, expected, strict=True):
        assert got[1:] == pytest.approx(want[1:], abs=1e-9)
    assert calibration_curve(exact_sums([], [], bins=10)) == []
