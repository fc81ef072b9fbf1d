"""Offline RMIA's likelihood ratio, against the formula and the paper's pairwise score."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.common.errors import ConfigError
from fedcare.simulations.audit.attacks import attack_names, get_attack
from fedcare.simulations.audit.attacks.loss_threshold import loss_scores
from fedcare.simulations.audit.attacks.rmia import rmia_log_ratio


def test_ratio_is_the_formula() -> None:
    target = np.array([0.2, 1.5, 0.01])
    refs = np.array([[0.5, 1.0, 3.0], [0.7, 2.0, 2.0]])
    for a in (0.0, 0.3, 1.0):
        p_out = np.exp(-refs).mean(axis=0)
        expected = np.log(np.exp(-target) / (((1 + a) * p_out + 1 - a) / 2))
        np.testing.assert_allclose(rmia_log_ratio(target, refs, offline_a=a), expected)


def test_a_fitted_hard_patient_outscores_a_fitted_easy_one() -> None:
    # Same loss under the target; the first is hard for models that never saw it.
    lr = rmia_log_ratio([0.05, 0.05], [[3.0, 0.05], [2.5, 0.06]], offline_a=0.3)
    assert lr[0] > lr[1]
    # With a = 0 the references barely matter; the loss ordering survives.
    lr0 = rmia_log_ratio([0.1, 1.0], [[0.1, 1.0]], offline_a=0.0)
    assert lr0[0] > lr0[1]


def pairwise_rmia(lr_x: np.ndarray, lr_z: np.ndarray, gamma: float) -> np.ndarray:
    """The paper's score: the share of population samples z with LR(x) / LR(z) >= γ."""
    return (lr_x[:, None] - lr_z[None, :] >= np.log(gamma)).mean(axis=1)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_pairwise_score_orders_candidates_as_the_ratio_does(gamma: float) -> None:
    rng = np.random.default_rng(0)
    target, refs = rng.exponential(0.5, 300), rng.exponential(0.7, (4, 300))
    z_target, z_refs = rng.exponential(0.6, 200), rng.exponential(0.7, (4, 200))
    lr_x = rmia_log_ratio(target, refs)
    lr_z = rmia_log_ratio(z_target, z_refs)
    score = pairwise_rmia(lr_x, lr_z, gamma)
    order = np.argsort(lr_x)
    assert np.all(np.diff(score[order]) >= 0)  # non-decreasing in LR(x): same ROC, coarser


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        rmia_log_ratio([0.1, 0.2], [[0.1, 0.2, 0.3]])


def test_registry() -> None:
    assert {"loss-threshold", "rmia"} <= set(attack_names())
    assert get_attack("rmia").name == "rmia"
    with pytest.raises(ConfigError, match="loss-threshold"):
        get_attack("lira")
    assert loss_scores(np.array([0.5])).tolist() == [-0.5]
