"""The guard's reading of explanation releases (models/explain.py): summed over the sites,
recorded as the run's explanation; sent unasked, for another round, or with keys other than
the task's features, it is an ``evaluate-failed`` event, and the site is left out."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.summary import RunSummary
from fedcare.models.evaluation import release
from fedcare.models.explain import release as explain_release
from fedcare.server.guard import GuardedStrategy
from tests._flower import task_identity

NODES = {"site-a": 11, "site-b": 12}
FEATURES = (("ehr:age", "ehr:sex", "genomics:g1"), ("ehr", "ehr", "genomics"))


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


def _guard(tmp_path: Path, *, explain: bool = True, rounds: int = 2) -> GuardedStrategy:
    return GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=FederationConfig.from_run_config(
            {"min-sites": 1, "num-server-rounds": rounds, "explain": explain}
        ),
        run_dir=tmp_path,
        run_id="r1",
        explain_features=FEATURES if explain else None,
    )


def _site(seed: int, n: int) -> tuple[dict[str, float], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, 2, n).astype(float) for s in keys.EVAL_SPLITS}
    p = {s: np.clip(rng.random(n) * 0.6 + 0.4 * y[s], 0, 1) for s in keys.EVAL_SPLITS}
    wire = release(y, p, noise_multiplier=0.0, generator=None, min_count=10, bins=100)
    rows = rng.uniform(0, 1.5, (n, 3))
    rel = explain_release(rows, *FEATURES, noise_multiplier=0.0, generator=None)
    wire.update({keys.explain_key(j): v for j, v in enumerate(rel.sums)})
    wire[keys.EXPLAIN_N] = rel.n
    return wire, rows


def _clipped_mean(rows: np.ndarray) -> np.ndarray:
    """Each row clipped to norm 2 (written out here), then the mean per feature."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows * np.minimum(1.0, 2.0 / norms)).mean(axis=0)


def test_the_last_round_s_explanations_are_pooled_and_recorded(tmp_path: Path) -> None:
    (wa, ra), (wb, rb) = _site(0, 40), _site(1, 60)
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(2, [_reply("site-a", wa), _reply("site-b", wb)])
    e = guard.record.explanation
    assert e is not None and e.round == 2 and e.n == 100
    expected = _clipped_mean(np.vstack([ra, rb]))
    assert [e.importance[f] for f in FEATURES[0]] == pytest.approx(expected.tolist())
    assert [e.sites["site-a"][f] for f in FEATURES[0]] == pytest.approx(_clipped_mean(ra).tolist())
    total = expected.sum()
    assert e.modality_shares["ehr"] == pytest.approx(expected[:2].sum() / total)
    assert not guard.record.events
    assert not [k for k in guard.record.sites["site-a"].metrics if keys.is_explain_metric(k)]
    summary = RunSummary.from_record(guard.record, fedcare_version="0", flwr_version="0")
    assert summary.explanation == e


@pytest.mark.parametrize(
    ("explain", "rnd", "edit"),
    [
        (False, 2, {}),  # the run did not ask for one
        (True, 1, {}),  # not the last round
        (True, 2, {keys.explain_key(3): 1.0}),  # a feature the task does not have
        (True, 2, {keys.EXPLAIN_N: -5.0}),  # a negative count
        (True, 2, {keys.explain_key(0): float("nan")}),  # not finite
    ],
)
def test_an_explanation_the_run_did_not_ask_for_or_a_malformed_one_is_left_out(
    tmp_path: Path, explain: bool, rnd: int, edit: dict[str, float]
) -> None:
    (wa, _), (wb, rb) = _site(0, 40), _site(1, 60)
    guard = _guard(tmp_path, explain=explain)
    guard.aggregate_evaluate(rnd, [_reply("site-a", {**wa, **edit}), _reply("site-b", wb)])
    events = [(e.site_id, e.kind) for e in guard.record.events]
    assert ("site-a", "evaluate-failed") in events
    e = guard.record.explanation
    if e is not None:  # site-b's own explanation, alone
        assert set(e.sites) == {"site-b"} and e.n == len(rb)


def test_a_missing_sum_is_a_malformed_explanation(tmp_path: Path) -> None:
    (wa, _), (wb, _) = _site(0, 40), _site(1, 60)
    del wa[keys.explain_key(1)]
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(2, [_reply("site-a", wa), _reply("site-b", wb)])
    assert [(e.site_id, e.kind) for e in guard.record.events] == [("site-a", "evaluate-failed")]
    e = guard.record.explanation
    assert e is not None and set(e.sites) == {"site-b"}
