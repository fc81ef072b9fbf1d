"""The guard's reading of per-group releases: pooled over the sites that released each group,
recorded with the federation's groups and the calibration curve; a reply whose group keys
the federation's schema does not declare is an ``evaluate-failed`` event, left out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sklearn.metrics import roc_auc_score

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.spec import Feature, FeatureSchema, GroupAttribute
from fedcare.models.evaluation import release
from fedcare.models.fairness import release_groups
from fedcare.server.guard import GuardedStrategy
from fedcare.simulations.runner import metric_rows
from tests._flower import task_identity

NODES = {"site-a": 11, "site-b": 12}
SCHEMA = FeatureSchema(
    ehr=(Feature(name="sex", kind="categorical", categories=("F", "M")),),
    groups=(GroupAttribute(name="sex", column="sex"),),
)


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=7):
        yield


def _reply(site: str, values: Mapping[str, float]) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=NODES[site], message_type="evaluate"
    )
    TaskIdentity.node_id = NODES[site]
    content = RecordDict(
        {
            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 1, **values}),
            keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: site}),
        }
    )
    return Message(content, reply_to=ins)


def _guard(tmp_path: Path) -> GuardedStrategy:
    return GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=FederationConfig.from_run_config({"min-sites": 1}),
        run_dir=tmp_path,
        run_id="r1",
        schema_fingerprint=SCHEMA.fingerprint(),
        schema_json=SCHEMA.model_dump_json(),
    )


def _site(seed: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, 2, n).astype(float) for s in keys.EVAL_SPLITS}
    p = {s: np.clip(rng.random(n) * 0.6 + 0.4 * y[s], 0, 1) for s in keys.EVAL_SPLITS}
    return y, p, rng.integers(0, 2, n)  # the same sex codes for both splits


def _site_reply(y: dict, p: dict, g: np.ndarray) -> dict[str, float]:
    out = release(y, p, noise_multiplier=0.0, generator=None, min_count=10, bins=100)
    out.update(
        release_groups(
            y,
            p,
            {"sex": {s: g for s in keys.EVAL_SPLITS}},
            {"sex": 3},
            noise_multiplier=0.0,
            generator=None,
            min_count=10,
            threshold=out["test.threshold"],
            bins=100,
        )
    )
    return out


def test_global_group_metrics_are_those_of_the_pooled_patients_and_are_recorded(
    tmp_path: Path,
) -> None:
    (ya, pa, ga), (yb, pb, gb) = _site(0, 120), _site(1, 200)
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(
        1, [_reply("site-a", _site_reply(ya, pa, ga)), _reply("site-b", _site_reply(yb, pb, gb))]
    )
    assert out is not None
    y, p = np.r_[ya["test"], yb["test"]], np.r_[pa["test"], pb["test"]]
    g = np.r_[ga, gb]
    threshold = out["test.threshold"]
    for k in (0, 1):
        yk, pk = y[g == k], p[g == k]
        assert out[f"test.group.sex.{k}.n"] == len(yk)
        quantised = np.minimum(np.floor(pk * 100), 99)
        assert out[f"test.group.sex.{k}.auroc"] == pytest.approx(roc_auc_score(yk, quantised))
        assert out[f"test.group.sex.{k}.tpr"] == pytest.approx(np.mean(pk[yk == 1] >= threshold))
    gap = abs(out["test.group.sex.0.auroc"] - out["test.group.sex.1.auroc"])
    assert out["test.gap.sex.auroc"] == pytest.approx(gap)
    record = guard.record
    assert [(g.name, g.labels) for g in record.groups] == [("sex", ("F", "M", "unknown"))]
    site_metrics = record.sites["site-a"].metrics
    assert "test.group.sex.0.auroc" in site_metrics  # derived metrics kept per site
    assert not [k for k in site_metrics if keys.is_release_metric(k)]  # sums are not
    rows = {(r.site, r.split, r.metric) for r in metric_rows(record, {})}  # metrics.csv
    assert {("global", "test", "group.sex.0.auroc"), ("global", "test", "gap.sex.auroc")} <= rows
    assert ("site-a", "test", "group.sex.1.tpr") in rows
    curve = record.round_entry(1).calibration
    idx = np.minimum(np.floor(p * 10).astype(int), 9)
    assert [c.bin for c in curve] == sorted(set(idx.tolist()))
    assert [c.n for c in curve] == [float((idx == b).sum()) for b in sorted(set(idx.tolist()))]


@pytest.mark.parametrize(
    "bad",
    [
        {"test.group.race.0.n": 20.0},  # an attribute the federation does not declare
        {"test.group.sex.2.n": 20.0},  # a group without its release
        {"test.gap.sex.auroc": 2.0},  # out of range
    ],
)
def test_a_reply_with_bad_group_keys_is_left_out_and_recorded(
    tmp_path: Path, bad: dict[str, float]
) -> None:
    (ya, pa, ga), (yb, pb, gb) = _site(0, 120), _site(1, 200)
    guard = _guard(tmp_path)
    out = guard.aggregate_evaluate(
        1,
        [
            _reply("site-a", {**_site_reply(ya, pa, ga), **bad}),
            _reply("site-b", _site_reply(yb, pb, gb)),
        ],
    )
    assert out is not None
    events = [(e.site_id, e.kind) for e in guard.record.events]
    assert events == [("site-a", "evaluate-failed")]
    assert out["test.n"] == len(yb["test"])  # only site-b is pooled
    assert out["test.group.sex.0.n"] + out["test.group.sex.1.n"] == len(yb["test"])
