"""Round r's evaluation inside round r + 1's train message: what the guard asks and records.

The reference is the two-message flow the guard ran before: the same evaluation replies
sent as separate evaluate replies must leave the same round entry in the run record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.models.evaluation import release
from fedcare.server.app import run_federation
from fedcare.server.guard import GuardedStrategy
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import task_identity

REF = {"w": np.zeros((2, 2), dtype=np.float32)}
NODES = {"site-a": 11, "site-b": 12, "site-c": 13, "site-d": 14}


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=7):
        yield


class _Grid:
    """Just enough of a Grid for a strategy to sample nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _guard(tmp_path: Path, **cfg: object) -> GuardedStrategy:
    config = FederationConfig.from_run_config({"min-sites": 1, "num-server-rounds": 3, **cfg})
    return GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=config,
        run_dir=tmp_path,
        run_id="r1",
    )


def _release(seed: int, n: int = 60) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    y = {s: rng.integers(0, 2, n) for s in keys.EVAL_SPLITS}
    p = {s: np.clip(rng.random(n) * 0.7 + 0.3 * y[s], 0, 1) for s in keys.EVAL_SPLITS}
    return release(y, p, noise_multiplier=1.0, generator=np.random.default_rng(seed), min_count=10)


def _eval_records(site: str, rnd: int, values: Mapping[str, float]) -> dict[str, Any]:
    info = {keys.S_SITE_ID: site, keys.S_EVALUATION: keys.EVAL_DP, keys.S_EVALUATED_ROUND: rnd}
    return {
        keys.REC_EVAL_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 1, **values}),
        keys.REC_EVAL_SITE: ConfigRecord(info),
    }


def _reply(site: str, kind: str, records: Mapping[str, Any]) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=NODES[site], message_type=kind
    )
    TaskIdentity.node_id = NODES[site]
    return Message(RecordDict(dict(records)), reply_to=ins)


def _train_records(site: str, w: float = 1.0) -> dict[str, Any]:
    return {
        keys.REC_ARRAYS: ArrayRecord({"w": Array(np.full((2, 2), w, np.float32))}),
        keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 10, keys.M_STEPS: 4}),
        keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: site, keys.S_DP: False}),
    }


def _start_round(guard: GuardedStrategy, rnd: int, nodes: list[int]) -> list[Message]:
    arrays = ArrayRecord({"w": Array(REF["w"])})
    return list(guard.configure_train(rnd, arrays, ConfigRecord({}), _Grid(nodes)))  # type: ignore[arg-type]


def _asked(messages: list[Message]) -> set[object]:
    return {m.content[keys.REC_CONFIG].get(keys.CFG_EVALUATE_ROUND) for m in messages}


def test_each_round_that_evaluates_folds_into_the_next_train_message_but_the_last(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path, **{"evaluate-every": 2, "num-server-rounds": 5})
    arrays = ArrayRecord({"w": Array(REF["w"])})
    grid = _Grid([11, 12])
    asked = {rnd: _asked(_start_round(guard, rnd, [11, 12])) for rnd in range(1, 6)}
    # Round 0 has its own message (evaluate_initial); rounds 2 and 4 ride on 3 and 5.
    assert asked == {1: {None}, 2: {None}, 3: {2}, 4: {None}, 5: {4}}
    sent = {
        rnd: len(list(guard.configure_evaluate(rnd, arrays, ConfigRecord({}), grid)))  # type: ignore[arg-type]
        for rnd in range(1, 6)
    }
    assert sent == {1: 0, 2: 0, 3: 0, 4: 0, 5: 2}
    # A resumed run (3 rounds done) folds round 3's evaluation into round 4 (its first).
    resumed = _guard(tmp_path, **{"num-server-rounds": 5})
    resumed.round_offset = 3
    assert _asked(_start_round(resumed, 1, [11])) == {3}


def test_a_folded_evaluation_is_recorded_under_its_round_as_a_separate_one_was(
    tmp_path: Path,
) -> None:
    values = {site: _release(i) for i, site in enumerate(["site-a", "site-b"])}
    reference = _guard(tmp_path / "two-messages")
    reference.aggregate_evaluate(
        1,
        [
            _reply(s, "evaluate", {keys.REC_METRICS: v_rec, keys.REC_SITE: info})
            for s, v in values.items()
            for v_rec, info in [
                (
                    MetricRecord({keys.M_NUM_EXAMPLES: 1, **v}),
                    ConfigRecord({keys.S_SITE_ID: s, keys.S_EVALUATION: keys.EVAL_DP}),
                )
            ]
        ],
    )
    guard = _guard(tmp_path / "folded")
    guard._reference = {k: v.copy() for k, v in REF.items()}
    messages = _start_round(guard, 2, [11, 12])
    assert _asked(messages) == {1}
    replies = [
        _reply(s, "train", {**_train_records(s), **_eval_records(s, 1, v)})
        for s, v in values.items()
    ]
    arrays, _ = guard.aggregate_train(2, replies)
    assert arrays is not None  # the updates, without the evaluation's records, aggregated
    got, want = guard.record.round_entry(1), reference.record.round_entry(1)
    assert got.metrics == want.metrics and got.metrics
    assert got.sites == want.sites
    assert set(guard.record.round_entry(2).sites) == {"site-a", "site-b"}
    assert not guard.record.events


def test_a_missing_foreign_or_malformed_folded_evaluation_is_recorded_the_update_kept(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path)
    guard._reference = {k: v.copy() for k, v in REF.items()}
    _start_round(guard, 2, list(NODES.values()))
    broken = _eval_records("site-c", 1, _release(2))
    broken[keys.REC_EVAL_METRICS] = MetricRecord({"test.hist.0.1": -1.0})
    refused = ConfigRecord(
        {
            keys.S_EVALUATED_ROUND: 1,
            keys.F_CODE: keys.ERR_POLICY,
            keys.F_REASON: "site-d: site site-d has answered 25 evaluations of run r1",
        }
    )
    replies = [
        _reply("site-a", "train", _train_records("site-a")),  # none
        _reply("site-b", "train", {**_train_records("site-b"), **_eval_records("site-b", 0, {})}),
        _reply("site-c", "train", {**_train_records("site-c"), **broken}),
        _reply("site-d", "train", {**_train_records("site-d"), keys.REC_EVAL_REFUSAL: refused}),
    ]
    arrays, _ = guard.aggregate_train(2, replies)
    assert arrays is not None
    failed = {e.site_id: e.detail for e in guard.record.events if e.kind == "evaluate-failed"}
    assert set(failed) == set(NODES) and all(
        e.round == 1 for e in guard.record.events if e.kind == "evaluate-failed"
    )
    assert "no evaluation of round 1" in failed["site-a"]
    assert "evaluated round 0, not round 1" in failed["site-b"]
    assert "malformed" in failed["site-c"]
    assert failed["site-d"].startswith("site site-d has answered 25 evaluations")
    assert guard.record.round_entry(1).sites == {}
    assert set(guard.record.round_entry(2).sites) == set(NODES)  # every update was kept
    assert all(s.status == "completed" for s in guard.record.sites.values())


def test_a_training_refused_after_its_folded_evaluation_keeps_the_evaluation(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path)
    guard._reference = {k: v.copy() for k, v in REF.items()}
    _start_round(guard, 2, [11, 12])
    refusal = ConfigRecord(
        {keys.F_CODE: keys.ERR_DIVERGED, keys.F_REASON: "site-b: training diverged in round 2"}
    )
    replies = [
        _reply("site-a", "train", {**_train_records("site-a"), **_eval_records("site-a", 1, {})}),
        _reply(
            "site-b",
            "train",
            {**_eval_records("site-b", 1, _release(1)), keys.REC_TRAIN_REFUSAL: refusal},
        ),
    ]
    arrays, _ = guard.aggregate_train(2, replies)
    assert arrays is not None
    assert "site-b" in guard.record.round_entry(1).sites
    site_b = guard.record.sites["site-b"]
    assert (site_b.status, site_b.reason) == ("diverged", "training diverged in round 2")
    assert [(e.round, e.kind) for e in guard.record.events if e.site_id == "site-b"] == [
        (2, "diverged")
    ]
    # A training refusal that is malformed is a rejected reply, never the run's end.
    guard2 = _guard(tmp_path / "2")
    guard2._reference = {k: v.copy() for k, v in REF.items()}
    _start_round(guard2, 2, [11, 12])
    bad = ConfigRecord({keys.F_CODE: 1, keys.F_REASON: "site-b: ?"})
    replies = [
        _reply("site-a", "train", {**_train_records("site-a"), **_eval_records("site-a", 1, {})}),
        _reply("site-b", "train", {keys.REC_TRAIN_REFUSAL: bad}),
    ]
    assert guard2.aggregate_train(2, replies)[0] is not None
    rejected = [e for e in guard2.record.events if e.kind == "rejected"]
    assert len(rejected) == 1 and "not a site's error code" in rejected[0].detail


def test_a_site_dropping_in_the_next_round_leaves_its_evaluation_out(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    guard._reference = {k: v.copy() for k, v in REF.items()}
    guard.record.nodes["12"] = "site-b"
    _start_round(guard, 2, [11, 12, 13])
    TaskIdentity.node_id = 1
    ins = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=12, message_type="train")
    TaskIdentity.node_id = 12
    offline = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="gone"), reply_to=ins)
    replies = [
        _reply("site-a", "train", {**_train_records("site-a"), **_eval_records("site-a", 1, {})}),
        offline,
    ]  # site-c (node 13) never answers
    guard.aggregate_train(2, replies)
    assert set(guard.record.round_entry(1).sites) == {"site-a"}
    events = {(e.round, e.site_id, e.kind) for e in guard.record.events}
    assert events == {
        (2, "site-b", "dropped"),
        (2, "node-13", "dropped"),
        # The evaluation its train message carried is missing too: said, not left silent
        # (a node that never answered is the training's drop-out only).
        (1, "site-b", "evaluate-failed"),
    }


def test_evaluation_records_in_a_reply_nobody_asked_for_reject_the_update(
    tmp_path: Path,
) -> None:
    """Round 1's train message folds nothing (round 0 has its own evaluate message)."""
    guard = _guard(tmp_path)
    guard._reference = {k: v.copy() for k, v in REF.items()}
    assert _asked(_start_round(guard, 1, [11, 12])) == {None}
    replies = [
        _reply("site-a", "train", _train_records("site-a")),
        _reply("site-b", "train", {**_train_records("site-b"), **_eval_records("site-b", 0, {})}),
    ]
    assert guard.aggregate_train(1, replies)[0] is not None
    assert [(e.site_id, e.kind) for e in guard.record.events] == [("site-b", "rejected")]
    assert guard.record.round_or_none(0) is None


# ------------------------------------------------------------------ a whole run, resumed


class _Crash(Exception):
    """The server stopping mid-run (before any reply of the round came back)."""


class _EvaluatingSites:
    """Two scripted sites for ``run_federation``: each trains (adds 0.1) and evaluates
    whatever a message asks for, with a release of ``40 + round`` patients (so the record
    shows which round an evaluation was recorded under); ``asked`` lists (node, round) of
    every evaluation asked for. ``crash_at``: the round whose train message stops the run."""

    pull_interval = 0.0  # used as is by fedcare.server.grid.prompt

    def __init__(self, crash_at: int | None = None) -> None:
        self.asked: list[tuple[int, int]] = []
        self.crash_at = crash_at

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    @staticmethod
    def _evaluation(node: int, rnd: int) -> MetricRecord:
        rng = np.random.default_rng(node * 100 + rnd)
        n = 40 + rnd
        y = {s: rng.integers(0, 2, n) for s in keys.EVAL_SPLITS}
        p = {s: rng.random(n) for s in keys.EVAL_SPLITS}
        values = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
        return MetricRecord({keys.M_NUM_EXAMPLES: n, **values})

    def send_and_receive(
        self, messages: Iterator[Message] | list[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = []
        for message in messages:
            config = message.content[keys.REC_CONFIG]
            rnd = int(config[keys.CFG_FEDCARE_ROUND])  # type: ignore[arg-type]
            node = message.metadata.dst_node_id
            site = {keys.S_SITE_ID: f"site-{node}", keys.S_DP: False}
            if message.metadata.message_type == "evaluate":
                self.asked.append((node, rnd))
                records: dict[str, Any] = {
                    keys.REC_METRICS: self._evaluation(node, rnd),
                    keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: f"site-{node}"}),
                }
            else:
                if rnd == self.crash_at:
                    raise _Crash
                received = unpack_record(message.content.array_records[keys.REC_ARRAYS])
                update = {k: (v + 0.1).astype(v.dtype) for k, v in received.items()}
                records = {
                    keys.REC_ARRAYS: pack_record(update),
                    keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 10}),
                    keys.REC_SITE: ConfigRecord(site),
                }
                if keys.CFG_EVALUATE_ROUND in config:
                    before = int(config[keys.CFG_EVALUATE_ROUND])  # type: ignore[arg-type]
                    self.asked.append((node, before))
                    records[keys.REC_EVAL_METRICS] = self._evaluation(node, before)
                    records[keys.REC_EVAL_SITE] = ConfigRecord(
                        {keys.S_SITE_ID: f"site-{node}", keys.S_EVALUATED_ROUND: before}
                    )
            TaskIdentity.node_id = node
            replies.append(Message(RecordDict(records), reply_to=message))
            TaskIdentity.node_id = 1
        return replies


@pytest.fixture(scope="module")
def spec_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=1, seed=5, config=SynthConfig(patients_per_site=40))
    return root


def _run_cfg(sites: Path, run_dir: Path) -> FederationConfig:
    return FederationConfig.from_run_config(
        {
            "task": "readmission",
            "dp": False,
            "data-root": str(sites),
            "num-server-rounds": 3,
            "min-sites": 2,
            "num-sites": 2,
            "run-id": "folded-run",
            "run-dir": str(run_dir),
            "round-timeout": 5,
            "connect-timeout": 5,
        }
    )


def _evaluated(record: Any) -> dict[int, dict[str, float]]:
    """round -> site -> the test patients of the evaluation recorded under that round."""
    return {
        e.round: {site: values["test.n"] for site, values in e.sites.items() if "test.n" in values}
        for e in record.rounds
    }


def test_a_run_evaluates_each_round_once_under_its_own_round_resumed_or_not(
    spec_sites: Path, tmp_path: Path
) -> None:
    expected = {r: {"site-11": 40.0 + r, "site-12": 40.0 + r} for r in range(4)}
    whole = _EvaluatingSites()
    record = run_federation(whole, _run_cfg(spec_sites, tmp_path / "whole"))  # type: ignore[arg-type]
    assert sorted(whole.asked) == sorted((n, r) for n in (11, 12) for r in range(4))
    assert _evaluated(record) == expected
    assert all(e.metrics for e in record.rounds)  # each round has its global metrics
    assert not record.events
    # A round's progress line shows the latest evaluation known when it was written.
    lines = [
        json.loads(x) for x in (tmp_path / "whole" / "progress.jsonl").read_text().splitlines()
    ]
    assert [(x["round"], x["evaluated_round"]) for x in lines] == [(0, 0), (1, 0), (2, 1), (3, 3)]
    assert lines[2]["metrics"] == record.round_entry(1).metrics

    # Stopped when round 3's train message (carrying round 2's evaluation) went out: the
    # checkpoint after round 2 holds no evaluation of round 2 yet; the resumed run asks for
    # it once, with round 3's train message, and asks for no earlier round again.
    run_dir = tmp_path / "resumed"
    first = _EvaluatingSites(crash_at=3)
    with pytest.raises(_Crash):
        run_federation(first, _run_cfg(spec_sites, run_dir))  # type: ignore[arg-type]
    assert sorted(first.asked) == sorted((n, r) for n in (11, 12) for r in range(2))
    second = _EvaluatingSites()
    resumed = run_federation(second, _run_cfg(spec_sites, run_dir))  # type: ignore[arg-type]
    assert resumed.resumed_from == 2
    assert sorted(second.asked) == sorted((n, r) for n in (11, 12) for r in (2, 3))
    assert _evaluated(resumed) == expected
    assert [e.round for e in resumed.rounds] == [0, 1, 2, 3]
