"""The guard's evaluation path: global metrics from the sum of the sites' releases."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.models.evaluation import (
    exact_sums,
    metrics_from_release,
    release,
    releases_from_wire,
    threshold_from_release,
)
from fedcare.server.guard import GuardedStrategy, global_evaluate_metrics, weighted_global_metrics
from tests._flower import task_identity

NODES = {"site-a": 11, "site-b": 12, "site-c": 13}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _reply(
    site: str, values: Mapping[str, float], info: Mapping[str, Any] | None = None
) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=NODES[site], message_type="evaluate"
    )
    TaskIdentity.node_id = NODES[site]
    content = RecordDict(
        {
            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 1, **values}),
            keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: site, **(info or {})}),
        }
    )
    return Message(content, reply_to=ins)


def _guard(tmp_path: Path) -> GuardedStrategy:
    return GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=FederationConfig.from_run_config({"min-sites": 1}),
        run_dir=tmp_path,
        run_id="r1",
    )


def _data(seed: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, 2, n) for s in keys.EVAL_SPLITS}
    p = {s: np.clip(rng.random(n) * 0.7 + 0.3 * y[s], 0, 1) for s in keys.EVAL_SPLITS}
    return y, p


def _split_keys(metrics: Mapping[str, Any], split: str) -> dict[str, float]:
    return {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{split}.")}


def test_global_metrics_of_two_exact_sites_are_those_of_the_pooled_data(tmp_path: Path) -> None:
    (ya, pa), (yb, pb) = _data(0, 40), _data(1, 90)
    a = release(ya, pa, noise_multiplier=0.0, generator=None, min_count=10)
    b = release(yb, pb, noise_multiplier=0.0, generator=None, min_count=10)
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(1, [_reply("site-a", a), _reply("site-b", b)])
    assert out is not None
    sums = {
        split: exact_sums(np.r_[ya[split], yb[split]], np.r_[pa[split], pb[split]])
        for split in keys.EVAL_SPLITS
    }
    # One decision threshold, the one the pooled validation patients support.
    threshold = threshold_from_release(sums["val"])
    for split in keys.EVAL_SPLITS:
        pooled = metrics_from_release(sums[split], threshold=threshold)
        got = _split_keys(out, split)
        assert got.keys() == pooled.keys()
        for name, value in pooled.items():
            assert got[name] == pytest.approx(value, abs=1e-12), name
    # Global AUROC is the pooled one, not a patient-weighted mean of the sites' AUROCs.
    weighted = weighted_global_metrics(
        {
            "a": {k: v for k, v in a.items() if not keys.is_release_metric(k)},
            "b": {k: v for k, v in b.items() if not keys.is_release_metric(k)},
        }
    )
    assert out["test.auroc"] != pytest.approx(weighted["test.auroc"], abs=1e-9)


def test_global_metrics_of_noisy_sites_are_those_of_the_summed_noisy_release(
    tmp_path: Path,
) -> None:
    gen = np.random.default_rng(9)
    replies = {
        site: release(*_data(i, 60), noise_multiplier=2.0, generator=gen, min_count=10)
        for i, site in enumerate(NODES)
    }
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(1, [_reply(s, v) for s, v in replies.items()])
    assert out is not None
    totals = {}
    for split in keys.EVAL_SPLITS:
        parts = [releases_from_wire(v)[split] for v in replies.values() if f"{split}.n" in v]
        totals[split] = sum(parts[1:], start=parts[0])
    threshold = threshold_from_release(totals["val"])
    for split, total in totals.items():
        assert _split_keys(out, split) == metrics_from_release(total, threshold=threshold)
    # The run record keeps each site's derived metrics, never its release's sums.
    entry = guard.record.rounds[0]
    assert set(entry.metrics) == set(out.keys())
    for site, values in entry.sites.items():
        assert not [k for k in values if keys.is_release_metric(k)], site
        assert not [k for k in guard.record.sites[site].metrics if keys.is_release_metric(k)]
    assert all(k.split(".", 1)[1] in keys.TASK_METRICS for k in entry.metrics)


def test_a_malformed_release_is_refused_and_the_others_are_pooled(tmp_path: Path) -> None:
    (ya, pa), (yb, pb) = _data(0, 40), _data(1, 90)
    a = release(ya, pa, noise_multiplier=0.0, generator=None, min_count=10)
    b = release(yb, pb, noise_multiplier=0.0, generator=None, min_count=10)
    del b["test.hist.4.1"]
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(1, [_reply("site-a", a), _reply("site-b", b)])
    assert out is not None
    parsed = releases_from_wire(a)
    assert _split_keys(out, "test") == metrics_from_release(
        parsed["test"], threshold=threshold_from_release(parsed["val"])
    )
    [event] = guard.record.events
    assert event.site_id == "site-b" and event.kind == "evaluate-failed"
    assert "malformed reply" in event.detail and "test.hist.4.1" in event.detail
    assert "site-b" not in guard.record.rounds[0].sites


def test_a_reply_without_metrics_is_refused_not_a_crash(tmp_path: Path) -> None:
    TaskIdentity.node_id = 1
    ins = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=11, message_type="evaluate")
    TaskIdentity.node_id = 11
    reply = Message(
        RecordDict({keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: "site-a"})}), reply_to=ins
    )
    guard = _guard(tmp_path)
    assert guard.aggregate_evaluate(1, [reply]) is None
    assert guard.record.events[0].kind == "evaluate-failed"


def test_a_site_without_a_release_falls_back_to_the_weighted_mean() -> None:
    a_sums = exact_sums([0, 1] * 10, [0.2, 0.8] * 10)
    per_site = {
        "a": {"test.auroc": 1.0, "test.n": 20.0},
        "b": {"test.auroc": 0.5, "test.n": 60.0},  # an older site: metrics only
    }
    out = global_evaluate_metrics(per_site, {"a": {"test": a_sums}, "b": {}})
    assert out == weighted_global_metrics(per_site)
    # Different bin counts cannot be summed either.
    b_sums = exact_sums([0, 1] * 30, [0.2, 0.8] * 30, bins=20)
    out = global_evaluate_metrics(per_site, {"a": {"test": a_sums}, "b": {"test": b_sums}})
    assert out == weighted_global_metrics(per_site)
    # A withheld split (small counts) does not block pooling the others.
    per_site["c"] = {"val.n": 30.0}
    c_val = exact_sums([1] * 30, [0.7] * 30)
    out = global_evaluate_metrics(
        {"a": per_site["a"], "c": per_site["c"]},
        {"a": {"test": a_sums}, "c": {"val": c_val}},
    )
    assert out == {
        **{f"test.{k}": v for k, v in metrics_from_release(a_sums).items()},
        **{f"val.{k}": v for k, v in metrics_from_release(c_val).items()},
    }


def test_a_private_evaluations_epsilon_is_the_sites_latest(tmp_path: Path) -> None:
    """An evaluation is charged after the run's last training round: the record keeps the
    ε the evaluation reply states (never lowers it; ignores values that are not numbers)."""
    guard = _guard(tmp_path)
    y, p = _data(0, 60)
    values = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
    dp_info = {
        keys.S_EVALUATION: keys.EVAL_DP,
        keys.S_EPSILON: 7.9,
        keys.S_RUN_EPSILON: 4.0,
        keys.S_DELTA: 1e-5,
    }
    guard.aggregate_evaluate(1, [_reply("site-a", values, dp_info)])
    privacy = guard.record.sites["site-a"].privacy
    assert (privacy.epsilon, privacy.run_epsilon, privacy.delta) == (7.9, 4.0, 1e-5)
    assert privacy.evaluation == keys.EVAL_DP
    lower = {**dp_info, keys.S_EPSILON: 3.0, keys.S_RUN_EPSILON: float("nan")}
    guard.aggregate_evaluate(2, [_reply("site-a", values, lower)])
    assert (privacy.epsilon, privacy.run_epsilon) == (7.9, 4.0)


def test_personal_metrics_are_reported_per_site_and_never_pooled(tmp_path: Path) -> None:
    """A site's personalized model (client/personal/) is its own: its metrics go to that
    site's record (and the summary's ``personal_metrics``), never into the global ones."""
    (ya, pa), (yb, pb) = _data(0, 40), _data(1, 90)
    a = release(ya, pa, noise_multiplier=0.0, generator=None, min_count=10)
    b = release(yb, pb, noise_multiplier=0.0, generator=None, min_count=10)
    personal = {f"{keys.PERSONAL_PREFIX}test.auroc": 0.99, f"{keys.PERSONAL_PREFIX}test.n": 40.0}
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(1, [_reply("site-a", {**a, **personal}), _reply("site-b", b)])
    plain = _guard(tmp_path).aggregate_evaluate(1, [_reply("site-a", a), _reply("site-b", b)])
    assert out is not None and plain is not None
    assert dict(out) == dict(plain)  # the global metrics do not move
    assert not any(keys.is_personal_metric(k) for k in out)
    sites = guard.record.sites
    assert sites["site-a"].personal_metrics == {"test.auroc": 0.99, "test.n": 40.0}
    assert sites["site-b"].personal_metrics == {}
    assert not any(keys.is_personal_metric(k) for k in sites["site-a"].metrics)
    (entry,) = guard.record.rounds
    assert entry.personal == {"site-a": {"test.auroc": 0.99, "test.n": 40.0}}
    assert not any(keys.is_personal_metric(k) for k in entry.sites["site-a"])


def test_splits_released_on_other_grids_than_validation_do_not_stop_the_server() -> None:
    """A site (or a mix of exact and DP sites) whose validation release has other bins than
    its test release: the test split is scored at 0.5, not a crash of the ServerApp."""
    (y, p) = _data(0, 60)
    val = release(
        {"val": y["val"]},
        {"val": p["val"]},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        bins=10,
    )
    test = release(
        {"test": y["test"]},
        {"test": p["test"]},
        noise_multiplier=0.0,
        generator=None,
        min_count=10,
        bins=4,
    )
    out = global_evaluate_metrics({"s": {}}, {"s": releases_from_wire({**val, **test})})
    assert out["test.threshold"] == 0.5 and "test.auroc" in out and "val.threshold" in out
