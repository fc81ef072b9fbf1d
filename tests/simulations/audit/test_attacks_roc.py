"""ROC, AUC and TPR at low FPR against brute-force references (no sklearn in the venv)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.simulations.audit.attacks.roc import (
    attack_result,
    downsample_roc,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from fedcare.simulations.audit.findings import AttackResult


def pairwise_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(member scores above non-member) + half the ties, over every pair."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def scanned_tpr(pos: np.ndarray, neg: np.ndarray, target: float) -> float:
    """Best TPR of the rule "member iff score >= t" over every t with FPR <= target."""
    best = 0.0
    for t in np.r_[np.unique(np.r_[pos, neg]), np.inf]:
        if np.mean(neg >= t) <= target:
            best = max(best, float(np.mean(pos >= t)))
    return best


scores = st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(pos=scores, neg=scores)
def test_auc_and_tpr_match_brute_force_with_ties(pos: list[float], neg: list[float]) -> None:
    p, n = np.array(pos), np.array(neg)
    fpr, tpr = roc_curve(p, n)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert roc_auc(fpr, tpr) == pytest.approx(pairwise_auc(p, n), abs=1e-12)
    for target in (0.0, 0.001, 0.01, 0.1, 0.5):
        assert tpr_at_fpr(fpr, tpr, target) == pytest.approx(scanned_tpr(p, n, target))


def test_continuous_scores_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    p, n = rng.normal(0.7, 1.0, 300), rng.normal(0.0, 1.0, 2000)
    fpr, tpr = roc_curve(p, n)
    assert roc_auc(fpr, tpr) == pytest.approx(pairwise_auc(p, n), abs=1e-12)
    for target in (0.001, 0.01):
        assert tpr_at_fpr(fpr, tpr, target) == pytest.approx(scanned_tpr(p, n, target))


def test_perfect_and_reversed_attacks() -> None:
    fpr, tpr = roc_curve([5.0, 6.0], [1.0, 2.0, 3.0])
    assert roc_auc(fpr, tpr) == 1.0 and tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    fpr, tpr = roc_curve([1.0, 2.0], [5.0, 6.0])
    assert roc_auc(fpr, tpr) == 0.0 and tpr_at_fpr(fpr, tpr, 0.01) == 0.0


def test_all_tied_scores_give_chance() -> None:
    fpr, tpr = roc_curve(np.zeros(7), np.zeros(9))
    assert roc_auc(fpr, tpr) == 0.5
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.0  # the only threshold calls everyone a member


@pytest.mark.parametrize(
    ("pos", "neg"), [([], [1.0]), ([1.0], []), ([float("nan")], [1.0]), ([1.0], [np.inf])]
)
def test_bad_scores_are_refused(pos: list[float], neg: list[float]) -> None:
    with pytest.raises(ValueError, match="empty|NaN or inf"):
        roc_curve(pos, neg)


def test_downsampled_curve_keeps_ends_and_order() -> None:
    rng = np.random.default_rng(0)
    fpr, tpr = roc_curve(rng.normal(1, 1, 3000), rng.normal(0, 1, 3000))
    curve = downsample_roc(fpr, tpr, max_points=200)
    assert len(curve.fpr) <= 200 and len(curve.fpr) == len(curve.tpr)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert curve.fpr == sorted(curve.fpr) and curve.tpr == sorted(curve.tpr)
    # Every kept point lies on the full curve.
    full = set(zip(fpr.tolist(), tpr.tolist(), strict=True))
    assert all(pt in full for pt in zip(curve.fpr, curve.tpr, strict=True))
    # The area barely moves.
    assert roc_auc(curve.fpr, curve.tpr) == pytest.approx(roc_auc(fpr, tpr), abs=0.01)


def test_attack_result_fields_validate_against_the_contract() -> None:
    rng = np.random.default_rng(1)
    p, n = rng.normal(1, 1, 50), rng.normal(0, 1, 80)
    result = attack_result(
        attack="loss-threshold", site_id="s0", member_scores=p, nonmember_scores=n
    )
    assert AttackResult.model_validate_json(result.model_dump_json()) == result
    assert (result.n_members, result.n_nonmembers) == (50, 80)
    assert result.auc == pytest.approx(pairwise_auc(p, n))
    assert result.tpr_at_1pct_fpr == pytest.approx(scanned_tpr(p, n, 0.01))
    assert result.tpr_at_0_1pct_fpr == pytest.approx(scanned_tpr(p, n, 0.001))
