"""Per-group survival metrics (models/survival_groups.py) against scikit-survival and numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from fedcare.common import keys
from fedcare.common.errors import DataError
from fedcare.models.survival import SurvivalTask, event_probability
from fedcare.models.survival_groups import (
    check_survival_group_metrics,
    global_survival_group_metrics,
    release_survival_groups,
)

TASK = SurvivalTask(cuts=(1.0, 2.0, 3.0))


def _split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    risk = rng.normal(size=n)
    time = rng.exponential(np.exp(-risk)) * 2.0
    event = (rng.random(n) < 0.7).astype(float)
    hazards = 1 / (1 + np.exp(-(risk[:, None] + rng.normal(0, 0.5, (n, 3)) - 1.5)))
    return np.column_stack([time, event]), hazards


def _release(y, h, g, *, sigma: float = 0.0, min_count: float = 10, seed: int = 0):
    return release_survival_groups(
        TASK,
        {"test": y},
        {"test": h},
        {"sex": {"test": g}},
        {"sex": 3},
        noise_multiplier=sigma,
        generator=np.random.default_rng(seed) if sigma else None,
        min_count=min_count,
        train=y,
    )


def test_exact_group_c_index_is_scikit_survivals_on_the_groups_patients() -> None:
    rng = np.random.default_rng(0)
    y, h = _split(rng, 300)
    g = rng.integers(0, 2, 300)
    out = _release(y, h, g)
    values = {}
    for group in (0, 1):
        mask = g == group
        ref = concordance_index_censored(
            y[mask, 1].astype(bool), y[mask, 0], event_probability(h[mask])
        )[0]
        prefix = keys.group_prefix("test", "sex", group)
        assert out[f"{prefix}.c_index"] == pytest.approx(ref, abs=1e-12)
        assert out[f"{prefix}.n"] == mask.sum()
        values[group] = ref
    assert out[keys.gap_key("test", "sex", "c_index")] == pytest.approx(abs(values[0] - values[1]))
    assert all(keys.is_allowed_metric(k) for k in out)
    assert not any(k.endswith(".ibs") for k in out)


def test_a_small_group_is_withheld_with_the_next_smallest() -> None:
    rng = np.random.default_rng(1)
    y, h = _split(rng, 120)
    g = np.r_[np.zeros(3, int), np.ones(40, int), np.full(77, 2)]  # 3 in group 0
    out = _release(y, h, g)
    names = {k.split(".")[3] for k in out if ".group." in k}
    assert names == {"2"}  # group 0 (3 patients) and the next smallest (40) withheld
    assert keys.gap_key("test", "sex", "c_index") not in out


def test_the_dp_release_is_noisy_counts_metrics_only() -> None:
    rng = np.random.default_rng(2)
    y, h = _split(rng, 400)
    g = rng.integers(0, 3, 400)  # every group (unknown too) holds patients: none suppressed
    sigma = 1.0
    ns = []
    for seed in range(100):
        out = _release(y, h, g, sigma=sigma, seed=seed)
        assert {k.rsplit(".", 1)[1] for k in out} <= {"n", "c_index", "td_auc"}
        assert all(keys.is_allowed_metric(k) for k in out)
        ns.append(out[f"{keys.group_prefix('test', 'sex', 0)}.n"] - (g == 0).sum())
    cells = 10 * (len(TASK.cuts) + 1) * 2  # the group's histogram cells, each noised
    assert np.std(ns) == pytest.approx(sigma * math.sqrt(cells), rel=0.25)


def test_global_group_metrics_are_count_weighted_means_of_the_sites() -> None:
    sites = {
        "a": {"test.group.sex.0.n": 30.0, "test.group.sex.0.c_index": 0.7,
              "test.group.sex.1.n": 20.0, "test.group.sex.1.c_index": 0.6,
              "test.group.sex.1.td_auc": 0.65},
        "b": {"test.group.sex.0.n": 10.0, "test.group.sex.0.c_index": 0.5,
              "test.group.sex.0.td_auc": 0.55},
    }  # fmt: skip
    out = global_survival_group_metrics(sites, {"sex": 3})
    assert out["test.group.sex.0.c_index"] == pytest.approx(
        np.average([0.7, 0.5], weights=[30, 10])
    )
    assert out["test.group.sex.0.n"] == 40.0 and out["test.group.sex.0.td_auc"] == 0.55
    assert out["test.gap.sex.c_index"] == pytest.approx(out["test.group.sex.0.c_index"] - 0.6)
    assert out["test.gap.sex.td_auc"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("test.group.age.0.c_index", 0.5, "not in the schema"),
        ("test.group.sex.0.auroc", 0.5, "reports only"),
        ("test.group.sex.3.n", 12.0, "groups 0..2"),
        ("test.group.sex.0.c_index", 1.5, r"outside \[0, 1\]"),
        ("test.gap.sex.tpr", 0.1, "reports only"),
        ("test.group.sex.0.hist.1.0", 3.0, "reports only"),
    ],
)
def test_the_server_refuses_survival_group_keys_it_did_not_ask_for(
    name: str, value: float, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        check_survival_group_metrics({name: value}, {"sex": 3})
    check_survival_group_metrics({"test.group.sex.0.c_index": 0.7, "test.n": 5}, {"sex": 3})
