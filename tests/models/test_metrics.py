"""Binary metrics against brute-force references written here, and their properties.

scikit-learn is not installed, so every reference is an explicit loop over its textbook
definition: AUROC over all (positive, negative) pairs, AP as a sum over thresholds, ECE
over bins.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedcare.common.errors import DataError
from fedcare.common.keys import TASK_METRICS
from fedcare.models.metrics import (
    BINARY_METRICS,
    MetricInputError,
    UndefinedMetricError,
    accuracy,
    auprc,
    auroc,
    balanced_accuracy,
    binary_metrics,
    brier,
    ece,
    log_loss,
    split_metrics,
    youden_threshold,
)

# ----------------------------------------------------------------------------- references


def ref_auroc(y: list[int], s: list[float]) -> float:
    pos = [si for yi, si in zip(y, s, strict=True) if yi == 1]
    neg = [si for yi, si in zip(y, s, strict=True) if yi == 0]
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def ref_ap(y: list[int], s: list[float]) -> float:
    n_pos = sum(y)
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(s), reverse=True):
        tp = sum(1 for yi, si in zip(y, s, strict=True) if si >= thr and yi == 1)
        k = sum(1 for si in s if si >= thr)
        recall = tp / n_pos
        ap += (recall - prev_recall) * (tp / k)
        prev_recall = recall
    return ap


def ref_ece(y: list[int], s: list[float], n_bins: int = 10) -> float:
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [
            i for i, si in enumerate(s) if (lo <= si < hi) or (b == n_bins - 1 and si == 1.0)
        ]
        if members:
            acc = sum(y[i] for i in members) / len(members)
            conf = sum(s[i] for i in members) / len(members)
            total += len(members) / len(s) * abs(acc - conf)
    return total


def ref_balanced(y: list[int], s: list[float]) -> float:
    tp = sum(1 for yi, si in zip(y, s, strict=True) if yi == 1 and si >= 0.5)
    tn = sum(1 for yi, si in zip(y, s, strict=True) if yi == 0 and si < 0.5)
    return (tp / sum(y) + tn / (len(y) - sum(y))) / 2


def ref_log_loss(y: list[int], s: list[float], eps: float = 1e-12) -> float:
    total = 0.0
    for yi, si in zip(y, s, strict=True):
        p = min(max(si, eps), 1 - eps)
        total += -math.log(p) if yi == 1 else -math.log(1 - p)
    return total / len(y)


# ----------------------------------------------------------------------------- strategies

GRID = [i / 20 for i in range(21)]  # coarse scores: many ties, exact bin edges


@st.composite
def labelled_scores(draw: st.DrawFn, *, both: bool = True, tied: bool | None = None):
    n = draw(st.integers(min_value=2, max_value=30))
    y = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    if both:
        assume(0 < sum(y) < n)
    use_grid = draw(st.booleans()) if tied is None else tied
    if use_grid:
        s = draw(st.lists(st.sampled_from(GRID), min_size=n, max_size=n))
    else:
        s = draw(
            st.lists(
                st.floats(0.0, 1.0, allow_nan=False, allow_subnormal=False),
                min_size=n,
                max_size=n,
            )
        )
    return y, s


FAST = settings(max_examples=60, deadline=None)

# ----------------------------------------------------------------------------- references


@FAST
@given(labelled_scores())
def test_auroc_matches_pairwise_reference(data) -> None:
    y, s = data
    assert auroc(y, s) == pytest.approx(ref_auroc(y, s), abs=1e-12)


@FAST
@given(labelled_scores())
def test_auprc_matches_threshold_sum_reference(data) -> None:
    y, s = data
    assert auprc(y, s) == pytest.approx(ref_ap(y, s), abs=1e-12)


@FAST
@given(labelled_scores(both=False))
def test_ece_matches_bin_loop_reference(data) -> None:
    y, s = data
    assert ece(y, s) == pytest.approx(ref_ece(y, s), abs=1e-12)


@FAST
@given(labelled_scores(both=False))
def test_simple_metrics_match_references(data) -> None:
    y, s = data
    n = len(y)
    assert accuracy(y, s) == pytest.approx(
        sum((si >= 0.5) == (yi == 1) for yi, si in zip(y, s, strict=True)) / n
    )
    assert brier(y, s) == pytest.approx(
        sum((si - yi) ** 2 for yi, si in zip(y, s, strict=True)) / n
    )
    assert log_loss(y, s) == pytest.approx(ref_log_loss(y, s), rel=1e-9)


@FAST
@given(labelled_scores())
def test_balanced_accuracy_matches_reference(data) -> None:
    y, s = data
    assert balanced_accuracy(y, s) == pytest.approx(ref_balanced(y, s))


def test_hand_computed_values() -> None:
    y = [0, 0, 1, 1, 1, 0]
    s = [0.1, 0.6, 0.6, 0.9, 0.3, 0.2]
    # pairs (pos vs neg): 0.6: >0.1, =0.6, >0.2 -> 2.5; 0.9: 3; 0.3: >0.1, <0.6, >0.2 -> 2
    assert auroc(y, s) == pytest.approx(7.5 / 9)
    # thresholds 0.9 (P=1, R=1/3), 0.6 (P=2/3, R=2/3), 0.3 (P=3/4, R=1) ...
    assert auprc(y, s) == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    assert accuracy(y, s) == pytest.approx(4 / 6)  # right: 0.1, 0.6 (pos), 0.9, 0.2


# ----------------------------------------------------------------------------- properties


@FAST
@given(labelled_scores())
def test_auroc_of_reversed_scores_is_complement(data) -> None:
    y, s = data
    reversed_scores = [1.0 - v for v in s]
    assume(len(set(reversed_scores)) == len(set(s)))  # 1 - v must not merge values
    assert auroc(y, reversed_scores) == pytest.approx(1.0 - auroc(y, s), abs=1e-12)


@FAST
@given(labelled_scores())
def test_flipping_labels_complements_auroc(data) -> None:
    y, s = data
    assert auroc([1 - v for v in y], s) == pytest.approx(1.0 - auroc(y, s), abs=1e-12)


@FAST
@given(labelled_scores(tied=True), st.sampled_from(["cube", "exp", "logit"]))
def test_rank_metrics_invariant_to_monotone_transforms(data, transform) -> None:
    y, s = data
    arr = np.asarray(s)
    if transform == "cube":
        t = arr**3 + arr
    elif transform == "exp":
        t = np.exp(5 * arr) - 7.0
    else:
        c = np.clip(arr, 0.01, 0.99)
        t = np.log(c / (1 - c))
        assume(len(set(c.tolist())) == len(set(s)))  # clipping must not merge values
    assert auroc(y, t) == pytest.approx(auroc(y, s), abs=1e-12)
    assert auprc(y, t) == pytest.approx(auprc(y, s), abs=1e-12)


@FAST
@given(labelled_scores(both=False))
def test_bounded_metrics_stay_in_unit_interval(data) -> None:
    y, s = data
    m = binary_metrics(y, s)
    for name in ("accuracy", "brier", "ece", "auroc", "auprc", "balanced_accuracy"):
        if name in m:
            assert 0.0 <= m[name] <= 1.0, (name, m[name])
    assert m["loss"] >= 0.0
    assert m["n"] == len(y)


def test_perfect_separation() -> None:
    y = [0, 0, 1, 1]
    s = [0.1, 0.2, 0.8, 0.9]
    assert auroc(y, s) == 1.0
    assert auprc(y, s) == 1.0
    assert balanced_accuracy(y, s) == 1.0
    assert auroc(y, s[::-1]) == 0.0


def test_all_tied_scores_give_chance_auroc_and_prevalence_ap() -> None:
    y = [0, 1, 0, 1, 1]
    s = [0.4] * 5
    assert auroc(y, s) == 0.5
    assert auprc(y, s) == pytest.approx(3 / 5)


def test_perfectly_calibrated_bins_have_zero_ece() -> None:
    y = [0, 1, 0, 1, 1, 1, 1, 0]
    s = [0.5, 0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75]
    assert ece(y, s) == pytest.approx(0.0, abs=1e-15)


def test_ece_bin_edges_follow_the_documented_rule() -> None:
    # 0.3 lies in bin [0.3, 0.4); 1.0 in the last bin; 0.0 in the first.
    y = [1, 0, 1, 0]
    s = [0.3, 0.39, 1.0, 0.0]
    assert ece(y, s) == pytest.approx(ref_ece(y, s))
    assert ece(y, s, n_bins=1) == pytest.approx(abs(0.5 - np.mean(s)))


def test_log_loss_is_finite_for_confident_mistakes() -> None:
    value = log_loss([1, 0], [0.0, 1.0], eps=1e-6)
    assert value == pytest.approx(-math.log(1e-6))


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("metric", [auroc, auprc, balanced_accuracy])
@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_metrics_needing_both_classes_raise_typed_error(metric, labels) -> None:
    with pytest.raises(UndefinedMetricError, match="both"):
        metric(labels, [0.2, 0.5, 0.9])


def test_binary_metrics_omits_undefined_metrics_for_one_class() -> None:
    m = binary_metrics([1, 1, 1], [0.9, 0.6, 0.2])
    assert set(m) == {"n", "threshold", "accuracy", "brier", "ece", "loss"}
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_binary_metrics_names_are_wire_metric_names() -> None:
    m = binary_metrics([0, 1, 0, 1], [0.2, 0.7, 0.6, 0.4])
    assert set(m) == {"n", "threshold", *BINARY_METRICS}
    assert set(m) <= set(TASK_METRICS)
    assert all(isinstance(v, float) for v in m.values())
    assert m["auroc"] == pytest.approx(ref_auroc([0, 1, 0, 1], [0.2, 0.7, 0.6, 0.4]))


@pytest.mark.parametrize(
    ("y", "s", "match"),
    [
        ([0, 1], [0.5], "labels but"),
        ([], [], "no patients"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 2], [0.1, 0.2], "0 or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], [0.1, 1.5], r"\[0, 1\]"),
    ],
)
def test_malformed_input_raises_typed_error(y, s, match) -> None:
    with pytest.raises(MetricInputError, match=match) as info:
        binary_metrics(y, s)
    assert isinstance(info.value, DataError)
    assert isinstance(info.value, ValueError)


def test_rank_metrics_accept_unbounded_scores() -> None:
    y = [0, 1, 0, 1]
    logits = [-3.0, 2.0, 0.5, 7.0]
    assert auroc(y, logits) == pytest.approx(1.0)
    with pytest.raises(MetricInputError):
        brier(y, logits)


def test_boolean_labels_are_accepted() -> None:
    assert auroc(np.array([False, True]), np.array([0.2, 0.8])) == 1.0


def test_youden_threshold_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.3).astype(int)
    s = np.clip(0.2 + 0.15 * y + rng.normal(0, 0.1, 300), 0, 1)
    t = youden_threshold(y, s)
    # brute force over the grid of edges k/100 (never one patient's exact score)
    j = {k / 100: np.mean(s[y == 1] >= k / 100) - np.mean(s[y == 0] >= k / 100) for k in range(101)}
    assert t in j and j[t] == pytest.approx(max(j.values()))
    assert t not in set(s.tolist()) or t * 100 == round(t * 100)
    assert (
        binary_metrics(y, s, threshold=t)["balanced_accuracy"]
        > binary_metrics(y, s)["balanced_accuracy"]
    )


def test_split_metrics_applies_the_validation_threshold_to_test() -> None:
    y = np.array([0, 0, 1, 1] * 5)
    s = np.array([0.1, 0.2, 0.3, 0.4] * 5)
    m = split_metrics({"val": y, "test": y}, {"val": s, "test": s}, min_count=10)
    assert m["val.threshold"] == m["test.threshold"] == 0.3
    assert m["test.accuracy"] == 1.0
    assert "val.n" not in split_metrics(
        {"val": y[:4], "test": y}, {"val": s[:4], "test": s}, min_count=10
    )
