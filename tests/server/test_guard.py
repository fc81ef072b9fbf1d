"""The guard around a strategy, driven with real Flower messages (no network)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import PACKED_PREFIX, pack_record, unpack_record
from fedcare.server.checkpoint import load_checkpoint
from fedcare.server.guard import GuardedStrategy, weighted_global_metrics
from tests._flower import task_identity

REF = {"w": np.zeros((2, 2), dtype=np.float32)}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _instruction(node: int) -> Message:
    TaskIdentity.node_id = 1
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")


def _reply(node: int, site: str, w: np.ndarray, n: int = 10) -> Message:
    ins = _instruction(node)
    TaskIdentity.node_id = node
    content = RecordDict(
        {
            keys.REC_ARRAYS: ArrayRecord({"w": Array(w)}),
            keys.REC_METRICS: MetricRecord(
                {keys.M_NUM_EXAMPLES: n, keys.M_TRAIN_LOSS: 0.5, keys.M_STEPS: 4}
            ),
            keys.REC_SITE: ConfigRecord(
                {keys.S_SITE_ID: site, keys.S_DP: False, keys.S_REPLAYED: False}
            ),
        }
    )
    return Message(content, reply_to=ins)


def _guard(tmp_path: Path, **cfg: object) -> GuardedStrategy:
    config = FederationConfig.from_run_config({"min-sites": 1, **cfg})
    guard = GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=config,
        run_dir=tmp_path,
        run_id="r1",
    )
    guard._reference = {k: v.copy() for k, v in REF.items()}
    guard._expected = {11, 12, 13, 14}
    return guard


def test_bad_updates_rejected_refusals_and_dropouts_recorded_round_goes_on(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    nan = np.zeros((2, 2), np.float32)
    nan[0, 0] = np.nan
    TaskIdentity.node_id = 13
    refusal = Message(
        Error(code=keys.ERR_BUDGET, reason="site-c: budget spent"), reply_to=_instruction(13)
    )
    replies = [
        _reply(11, "site-a", np.ones((2, 2), np.float32), n=10),
        _reply(12, "site-b", nan),
        refusal,
        # node 14 never answers
    ]
    arrays, metrics = guard.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.ones((2, 2)))  # only site-a aggregated
    sites = guard.record.sites
    assert sites["site-a"].status == "completed"
    assert sites["site-b"].status == "rejected" and "NaN" in (sites["site-b"].reason or "")
    assert sites["site-c"].status == "refused" and sites["site-c"].reason == "budget spent"
    assert sites["node-14"].status == "dropped"
    kinds = sorted(e.kind for e in guard.record.events)
    assert kinds == ["dropped", "refused", "rejected"]


def test_a_failed_or_diverged_round_is_recorded_as_such_not_as_a_refusal(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 12, 13}
    replies = [_reply(11, "site-a", np.ones((2, 2), np.float32), n=10)]
    for node, code, text in (
        (12, keys.ERR_DIVERGED, "site-b: training diverged in round 1"),
        (13, keys.ERR_FAILED, "site-c: round 1 failed after its charge was written"),
    ):
        TaskIdentity.node_id = node
        replies.append(Message(Error(code=code, reason=text), reply_to=_instruction(node)))
    guard.aggregate_train(1, replies)
    sites = guard.record.sites
    assert sites["site-b"].status == "diverged" and "diverged" in (sites["site-b"].reason or "")
    assert sites["site-c"].status == "failed"
    assert sorted(e.kind for e in guard.record.events) == ["diverged", "failed"]


def test_a_refusing_site_is_shown_with_its_ledger_epsilon(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 13}
    TaskIdentity.node_id = 13
    reason = keys.with_ledger_epsilon("site-c: budget spent", epsilon=7.5, delta=1e-5)
    refusal = Message(Error(code=keys.ERR_BUDGET, reason=reason), reply_to=_instruction(13))
    guard.aggregate_train(1, [_reply(11, "site-a", np.ones((2, 2), np.float32)), refusal])
    site = guard.record.sites["site-c"]
    assert site.status == "refused" and site.reason == "budget spent"
    assert site.privacy.epsilon == 7.5 and site.privacy.delta == 1e-5


def test_wrong_shape_rejected_and_too_few_sites_keep_the_model(tmp_path: Path) -> None:
    guard = _guard(tmp_path, **{"min-sites": 2})
    guard._expected = {11, 12}
    replies = [
        _reply(11, "a", np.ones((2, 2), np.float32)),
        _reply(12, "b", np.ones((3, 2), np.float32)),
    ]
    assert guard.aggregate_train(1, replies) == (None, None)
    assert any(e.kind == "round-skipped" for e in guard.record.events)
    assert (guard.record.sites["b"].reason or "").startswith("array 'w' has shape (3, 2)")


def test_after_round_checkpoints_atomically_with_absolute_rounds(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard.round_offset = 2
    guard.after_round(1, ArrayRecord({"w": Array(np.full((2, 2), 3.0, np.float32))}))
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.round == 3 and ckpt.run_id == "r1"
    np.testing.assert_array_equal(ckpt.arrays["w"], np.full((2, 2), 3.0))
    assert not list(tmp_path.glob("*.tmp"))


def test_global_metrics_are_patient_weighted_over_reporting_sites() -> None:
    per_site = {
        "a": {"test.auroc": 0.9, "test.n": 30.0},
        "b": {"test.auroc": 0.6, "test.n": 10.0},
        "c": {"val.auroc": 0.7, "val.n": 12.0},  # test split withheld (small counts)
    }
    out = weighted_global_metrics(per_site)
    assert out["test.auroc"] == pytest.approx(np.average([0.9, 0.6], weights=[30, 10]))
    assert out["test.n"] == 40.0
    assert out["val.auroc"] == pytest.approx(0.7)


def test_flower_error_for_an_offline_site_is_a_drop_out_not_a_refusal(tmp_path: Path) -> None:
    """SuperLink answers NODE_UNAVAILABLE for a SuperNode that stopped sending heartbeats."""
    from flwr.common.constant import ErrorCode

    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    TaskIdentity.node_id = 12
    offline = Message(
        Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable"),
        reply_to=_instruction(12),
    )
    guard.record.nodes["12"] = "site-b"
    arrays, _ = guard.aggregate_train(
        1, [_reply(11, "site-a", np.ones((2, 2), np.float32)), offline]
    )
    assert arrays is not None
    kinds = {(e.site_id, e.kind) for e in guard.record.events}
    assert ("site-b", "dropped") in kinds
    assert ("site-b", "refused") not in kinds
    assert "went offline" in (guard.record.sites["site-b"].reason or "")


class _Grid:
    """Just enough of a Grid for a strategy to sample nodes."""

    def get_node_ids(self) -> list[int]:
        return [11, 12]


def test_evaluate_every_k_rounds_and_always_the_last(tmp_path: Path) -> None:
    guard = _guard(tmp_path, **{"evaluate-every": 2, "num-server-rounds": 5})
    arrays = ArrayRecord({"w": Array(REF["w"])})
    sent = {
        rnd: len(list(guard.configure_evaluate(rnd, arrays, ConfigRecord({}), _Grid())))  # type: ignore[arg-type]
        for rnd in range(1, 6)
    }
    # Rounds 2 and 4 evaluate inside rounds 3's and 5's train messages
    # (tests/server/test_guard_folded.py); only the last round has an evaluate message.
    assert sent == {1: 0, 2: 0, 3: 0, 4: 0, 5: 2}
    assert guard.aggregate_evaluate(5, []) is None


def test_a_hostile_site_record_cannot_reach_the_log_unbounded(tmp_path: Path) -> None:
    """Over-long or malformed site-supplied text is bounded; the round goes on."""
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    bad = _reply(11, "site-a", np.ones((2, 2), np.float32))
    bad.content[keys.REC_SITE][keys.S_SITE_ID] = "x" * 10_000
    TaskIdentity.node_id = 12
    refusal = Message(
        Error(code=keys.ERR_POLICY, reason="y" * 10_000 + ": " + "z" * 10_000),
        reply_to=_instruction(12),
    )
    arrays, _ = guard.aggregate_train(1, [bad, refusal])
    assert arrays is not None
    assert all(len(site) <= 128 for site in guard.record.sites)
    assert all(len(e.detail) <= 1000 for e in guard.record.events)


def test_wrongly_typed_reported_numbers_reject_the_update_not_the_run(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    good = _reply(11, "site-a", np.ones((2, 2), np.float32))
    bad = _reply(12, "site-b", np.ones((2, 2), np.float32))
    bad.content[keys.REC_SITE][keys.S_DP] = True
    bad.content[keys.REC_SITE][keys.S_EPSILON] = "not a number"
    arrays, _ = guard.aggregate_train(1, [good, bad])
    assert arrays is not None
    assert guard.record.sites["site-b"].status == "rejected"
    assert "malformed reply" in (guard.record.sites["site-b"].reason or "")
    assert guard.record.sites["site-a"].status == "completed"


def test_replies_packed_in_another_order_are_aggregated_in_the_rounds_layout(
    tmp_path: Path,
) -> None:
    """Flower averages packed arrays number by number: a site that packs its tensors in
    another order (or sends them plain) must not scramble the model, and a malformed
    packing is a rejected reply, never a crash."""
    reference = {"a": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    guard = _guard(tmp_path)
    guard._reference, guard._sent_packed = reference, True
    guard._expected = {11, 12, 13}
    ones = {"a": np.ones((2, 2), np.float32), "b": np.full(3, 2.0, np.float32)}
    threes = {"b": np.full(3, 4.0, np.float32), "a": np.full((2, 2), 3.0, np.float32)}
    replies = [
        _reply(11, "site-a", np.zeros(0)),
        _reply(12, "site-b", np.zeros(0)),
        _reply(13, "site-c", np.zeros(0)),
    ]
    replies[0].content[keys.REC_ARRAYS] = pack_record(ones)
    replies[1].content[keys.REC_ARRAYS] = pack_record(threes)  # b before a
    replies[2].content[keys.REC_ARRAYS] = ArrayRecord(
        {PACKED_PREFIX + '[["a",[9]]]': Array(np.zeros(4, np.float32))}
    )
    arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None and list(arrays) == list(pack_record(reference))
    mean = unpack_record(arrays)
    np.testing.assert_allclose(mean["a"], np.full((2, 2), 2.0))
    np.testing.assert_allclose(mean["b"], np.full(3, 3.0))
    site_c = guard.record.sites["site-c"]
    assert site_c.status == "rejected" and "malformed reply" in (site_c.reason or "")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.content.__setitem__("extra", MetricRecord({"x": 1})), "never sends"),
        (lambda m: m.content[keys.REC_METRICS].__setitem__(keys.M_NUM_EXAMPLES, -5), "positive"),
        (lambda m: m.content[keys.REC_METRICS].__setitem__(keys.M_NUM_EXAMPLES, 0), "positive"),
        (lambda m: m.content[keys.REC_ARRAYS]["w"].__setattr__("data", b""), "malformed"),
        (lambda m: m.content[keys.REC_SITE].__setitem__(keys.S_NOISE_MULTIPLIER, 0.0), "DP-SGD"),
        (lambda m: m.content[keys.REC_SITE].__setitem__(keys.S_SAMPLE_RATE, 2.0), "DP-SGD"),
        (lambda m: m.content[keys.REC_SITE].__setitem__(keys.S_STEPS, 0), "DP-SGD"),
        (lambda m: m.content[keys.REC_SITE].__setitem__(keys.S_ACCOUNTANT, ""), "short name"),
    ],
)
def test_a_reply_the_run_record_could_not_hold_is_rejected_not_a_crash(
    tmp_path: Path, change: Any, reason: str
) -> None:
    """What a site reports must fit the typed run record; anything else is a malformed
    reply (rejected, recorded), never an exception that ends the centre's run."""
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    good, bad = _reply(11, "a", np.ones((2, 2), np.float32)), _reply(12, "b", REF["w"])
    bad.content[keys.REC_SITE] = ConfigRecord(
        {
            keys.S_SITE_ID: "b",
            keys.S_DP: True,
            keys.S_REPLAYED: False,
            keys.S_EPSILON: 1.0,
            keys.S_DELTA: 1e-5,
            keys.S_ACCOUNTANT: "prv",
            keys.S_NOISE_MULTIPLIER: 1.0,
            keys.S_SAMPLE_RATE: 0.1,
            keys.S_STEPS: 3,
        }
    )
    change(bad)
    arrays, _ = guard.aggregate_train(1, [good, bad])
    assert arrays is not None
    site = guard.record.sites["b"]
    assert site.status == "rejected" and reason in site.reason


def test_a_refusal_without_a_reason_still_ends_in_a_summary(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 13}
    TaskIdentity.node_id = 13
    refusal = Message(Error(code=keys.ERR_BUDGET, reason="site-c: "), reply_to=_instruction(13))
    guard.aggregate_train(1, [_reply(11, "site-a", np.ones((2, 2), np.float32)), refusal])
    assert guard.record.sites["site-c"].reason == "(the site gave no reason)"


def test_metrics_a_site_adds_never_reach_the_strategy(tmp_path: Path) -> None:
    """Flower refuses a round whose replies' metric records differ; the guard hands the
    strategy only the checked numbers, so one site's extra or list-valued metric is inert."""
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    odd = _reply(12, "b", np.full((2, 2), 3.0, np.float32))
    odd.content[keys.REC_METRICS]["extra"] = [1.0, 2.0]
    arrays, _ = guard.aggregate_train(1, [_reply(11, "a", np.ones((2, 2), np.float32)), odd])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 2), 2.0))


def test_a_non_finite_aggregate_keeps_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite updates can still aggregate past float32 (one site sending ±3e38 into a
    weighted sum): the round is skipped, not the model replaced by inf, which would make
    every site charge and diverge next round."""
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    inf = ArrayRecord({"w": Array(np.full((2, 2), np.inf, np.float32))})
    monkeypatch.setattr(guard.strategy, "aggregate_train", lambda *a: (inf, MetricRecord({})))
    ones = np.ones((2, 2), np.float32)
    assert guard.aggregate_train(1, [_reply(11, "a", ones), _reply(12, "b", ones)]) == (
        None,
        None,
    )
    assert any(e.kind == "round-skipped" for e in guard.record.events)
