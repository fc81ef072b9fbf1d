"""A site id is bound to the Flower node that first spoke for it (server/guard.py
``GuardedStrategy._speaks_for``), so one hospital's node cannot write another's record.

A malicious site (or anyone holding one registered SuperNode key) tries to:

* switch identity mid-run: reply as its own site in round 1, as another hospital in round 2
  (an update, a refusal with a tiny ε, an evaluation): refused under its own site, the other
  hospital's record untouched;
* speak for a hospital whose own node is live in the same round: refused, the real
  hospital's update aggregated, never the impostor's;
* and Flower's own error replies (a node gone offline: ``"Error: Node Unavailable ..."``)
  never name a site: the event is the node's bound site's, not a site called ``Error``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from tests._flower import task_identity
from tests.server.test_guard import _guard, _instruction, _reply


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=7):
        yield


def _ones(value: float = 1.0) -> np.ndarray:
    return np.full((2, 2), value, np.float32)


def test_a_node_cannot_switch_to_another_site_mid_run(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    guard.aggregate_train(1, [_reply(11, "site-a", _ones()), _reply(12, "site-b", _ones())])
    # Round 2: node 12 claims to be site-a, with an update and, next, a refusal.
    arrays, _ = guard.aggregate_train(
        2, [_reply(11, "site-a", _ones(2.0)), _reply(12, "site-a", _ones(50.0))]
    )
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), _ones(2.0))  # site-a's own update only
    sites = guard.record.sites
    assert sites["site-a"].status == "completed" and sites["site-a"].rounds_participated == [1, 2]
    assert sites["site-b"].status == "rejected"
    assert "speaks for site site-b" in (sites["site-b"].reason or "")
    TaskIdentity.node_id = 12
    forged = keys.with_ledger_epsilon("site-a: budget spent", epsilon=0.01, delta=1e-5)
    refusal = Message(Error(code=keys.ERR_BUDGET, reason=forged), reply_to=_instruction(12))
    guard.aggregate_train(3, [_reply(11, "site-a", _ones()), refusal])
    assert guard.record.sites["site-a"].status == "completed"
    assert guard.record.sites["site-a"].privacy.epsilon != 0.01


def test_two_live_nodes_never_speak_for_one_site(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    guard.aggregate_train(1, [_reply(11, "site-a", _ones()), _reply(12, "site-b", _ones())])
    guard._expected = {11, 12, 13}
    replies = [_reply(13, "site-a", _ones(9.0)), _reply(11, "site-a", _ones(3.0))]
    arrays, _ = guard.aggregate_train(2, [*replies, _reply(12, "site-b", _ones(3.0))])
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), _ones(3.0))  # never the impostor's 9
    assert guard.record.sites["site-a"].status == "completed"
    assert guard.record.sites["node-13"].status == "rejected"
    assert "another node speaks for" in (guard.record.sites["node-13"].reason or "")


def test_a_site_whose_node_is_gone_can_come_back_under_a_new_node(tmp_path: Path) -> None:
    """A SuperNode restarted without a stable node id: its old node is neither asked nor
    replying, so the site's new node may speak for it."""
    guard = _guard(tmp_path)
    guard._expected = {11, 12}
    guard.aggregate_train(1, [_reply(11, "site-a", _ones()), _reply(12, "site-b", _ones())])
    guard._expected = {11, 14}
    arrays, _ = guard.aggregate_train(
        2, [_reply(11, "site-a", _ones()), _reply(14, "site-b", _ones())]
    )
    assert arrays is not None
    assert guard.record.sites["site-b"].status == "completed"
    assert guard.record.sites["site-b"].rounds_participated == [1, 2]


def test_flower_s_own_error_names_no_site(tmp_path: Path) -> None:
    guard = _guard(tmp_path, **{"num-server-rounds": 1})
    guard._expected = {11, 12}
    guard.aggregate_train(1, [_reply(11, "site-a", _ones()), _reply(12, "site-b", _ones())])
    guard._skip_evaluation = False  # the last round's evaluation, as configure_evaluate sets it
    TaskIdentity.node_id = 12
    gone = Message(
        Error(
            code=ErrorCode.NODE_UNAVAILABLE,
            reason="Error: Node Unavailable — The destination node failed to report a heartbeat",
        ),
        reply_to=_instruction(12),
    )
    guard.aggregate_evaluate(1, [gone])
    events = [e for e in guard.record.events if e.kind == "evaluate-failed"]
    assert [e.site_id for e in events] == ["site-b"]
    assert "Error" not in guard.record.sites
