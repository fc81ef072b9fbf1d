"""Secure aggregation over fedcare's real ClientApp: the centre's SecureGrid (server/secagg.py)
drives the four stages; every message reaches the real ClientApp (fedcare.client.app:app,
client/secagg.py) of a small synthetic hospital, in this process. :class:`Loopback` is the
transport only: it can lose a site's reply at any stage, or alter one, and it records every
message the centre receives."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid

from fedcare.client.app import app as site_app
from fedcare.client.secagg import STATE_NAME
from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.common.run_files import SITE_AUDIT_LOG
from fedcare.common.secagg import Quantizer, input_bound, weighted_input
from fedcare.server.secagg import SecureGrid, _SecureRound
from tests._flower import task_identity

N_SITES = 4
#: Each stage waits this long for a lost reply (a real wait: nothing hangs past it). The
#: replies that come arrive at once here, so only a lost one costs it.
ROUND_TIMEOUT = 1.5
UPDATE = "fedcare-secagg-update"


def synthetic_sites(root: Path) -> Path:
    """N_SITES small synthetic hospitals in ``root``."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    config = SynthConfig(patients_per_site=80, n_genes=12, image_size=16, image_format="npy")
    synthesize(root, n_sites=N_SITES, seed=3, config=config)
    return root


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_sites(tmp_path_factory.mktemp("secagg-sites"))


def run_config(sites: Path, state: Path, **extra: Any) -> dict[str, Any]:
    values = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": "readmission",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "secure-aggregation": True,
        "max-update-norm": 50.0,
        "run-id": "run-sa",
        **extra,
    }
    return FederationConfig.from_run_config(values).to_run_config()


class Loopback(Grid):
    """Delivers each message to the real ClientApp of its site (see the module docstring).

    ``lose``: stage -> nodes whose reply is lost; ``alter(stage, node, reply)`` may change a
    reply before the centre gets it. ``received`` holds every reply the centre got.
    """

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.lose: dict[str, set[int]] = {}
        self.withhold: set[str] = set()  # stages whose messages the centre never delivers
        self.alter: Callable[[str, int, Message], Message] | None = None
        #: ``tamper(stage, node, message)`` may change a message the centre sends before
        #: the site gets it (a malicious centre).
        self.tamper: Callable[[str, int, Message], None] | None = None
        #: What the centre received, as it arrived: (stage, node, record names, arrays).
        self.received: list[tuple[str, int, set[str], list[np.ndarray]]] = []
        self.kept: dict[int, np.ndarray] = {}  # each site's own clipped update (a reference)
        self._pending: dict[str, Message] = {}
        self._count = 0

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:  # fmt: skip
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; its reply (unless lost) waits for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._count}"  # as Flower's engine does
            ids.append(msg.metadata.message_id)
            reply = self._deliver(msg)
            if reply is not None:
                self._pending[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        record = msg.content.config_records.get(keys.REC_SECAGG)
        stage = str(record[keys.SA_STAGE]) if record is not None else "plain"
        context = self.contexts[node]
        if stage in self.withhold:
            return None
        if self.tamper is not None:
            self.tamper(stage, node, msg)
        with task_identity(run_id=1, node_id=node):
            reply = site_app(msg, context)
        if stage == keys.SA_ADVERTISE and UPDATE in context.state.array_records:
            self.kept[node] = context.state.array_records[UPDATE]["delta"].numpy().copy()
        if node in self.lose.get(stage, set()):
            return None
        if self.alter is not None:
            reply = self.alter(stage, node, reply)
        records = reply.content.array_records.values() if reply.has_content() else []
        arrays = [a.numpy().copy() for r in records for a in r.values()]
        names = set(reply.content) if reply.has_content() else set()
        self.received.append((stage, node, names, arrays))
        return reply


def site_contexts(sites: Path, state: Path, **extra: Any) -> dict[int, Context]:
    config = run_config(sites, state, **extra)
    return {
        2**63 + 11 * i: Context(  # node ids above a signed 64-bit integer, as Flower's may be
            run_id=1,
            node_id=2**63 + 11 * i,
            node_config={"partition-id": i, "num-partitions": N_SITES},
            state=RecordDict(),
            run_config=config,
        )
        for i in range(N_SITES)
    }


def global_model(sites: Path, cfg: FederationConfig) -> dict[str, np.ndarray]:
    from fedcare.server.app import federation_spec, initial_state

    _, state = initial_state(cfg, federation_spec(cfg))
    return {k: v.numpy() for k, v in state.items()}


def train_round(
    grid: Loopback, sites: Path, cfg: FederationConfig, model: dict[str, np.ndarray],
    *, evaluate_round: int | None = None,
) -> tuple[SecureGrid, list[Message]]:  # fmt: skip
    from fedcare.server.app import federation_spec

    fingerprint = federation_spec(cfg).feature_schema.fingerprint()
    secure = SecureGrid(grid, cfg=cfg)
    with task_identity(run_id=1, node_id=1):
        messages = [
            Message(
                RecordDict(
                    {
                        keys.REC_ARRAYS: pack_record(model),
                        keys.REC_CONFIG: ConfigRecord(
                            {
                                keys.CFG_FEDCARE_ROUND: 1 if evaluate_round is None else 2,
                                keys.RC_RUN_ID: cfg.run_id,
                                keys.CFG_SCHEMA_FINGERPRINT: fingerprint,
                                **(
                                    {}
                                    if evaluate_round is None
                                    else {keys.CFG_EVALUATE_ROUND: evaluate_round}
                                ),
                            }
                        ),
                    }
                ),
                dst_node_id=node,
                message_type="train",
            )
            for node in grid.contexts
        ]
        replies = list(secure.send_and_receive(messages, timeout=ROUND_TIMEOUT))
    return secure, replies


def _flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in model.values()])


def _examples(replies: list[Message]) -> dict[int, int]:
    return {
        r.metadata.src_node_id: int(r.content.metric_records[keys.REC_METRICS]["num-examples"])
        for r in replies
        if not r.has_error()
    }


def check_aggregate(
    replies: list[Message], grid: Loopback, model: dict[str, np.ndarray],
    survivors: set[int], cfg: FederationConfig, *, uniform: bool = False,
) -> None:  # fmt: skip
    """Every survivor's reply carries g + the weighted mean of the survivors' own updates,
    within the quantisation bound (and the float32 rounding of the model)."""
    ok = {r.metadata.src_node_id: r for r in replies if not r.has_error()}
    assert set(ok) == survivors
    n = _examples(replies)
    w = {k: 1.0 if uniform else float(n[k]) for k in survivors}
    reference = sum(w[k] * grid.kept[k] for k in survivors) / sum(w.values())
    quantizer = Quantizer(scale_bits=cfg.secagg_scale_bits, bound=cfg.secagg_bound)
    # Each of the n survivors rounds by 2^-(f+1); the mean divides by the survivors' share
    # of the weights (at least 1/4 here, sites of similar size).
    bound = quantizer.max_error(len(survivors)) * 4
    g = _flat(model)
    for reply in ok.values():
        got = _flat(unpack_record(reply.content.array_records[keys.REC_ARRAYS])) - g
        tolerance = bound + 2 * np.finfo(np.float32).eps * (np.abs(g) + np.abs(reference))
        assert np.all(np.abs(got - reference) <= tolerance)
        assert keys.REC_SECAGG not in reply.content


def test_the_centre_gets_the_weighted_mean_and_nothing_of_one_update(
    sites: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    grid = Loopback(contexts)
    secure, replies = train_round(grid, sites, cfg, model)
    assert secure.last_round is not None and secure.last_round.outcome == "ok"
    check_aggregate(replies, grid, model, set(contexts), cfg)
    # What the centre received: no model arrays in any stage-1 reply, only uint64 masked
    # vectors later, each uncorrelated with its site's update.
    assert {stage for stage, *_ in grid.received} == {
        keys.SA_ADVERTISE, keys.SA_SHARE_KEYS, keys.SA_MASKED_INPUT, keys.SA_UNMASK
    }  # fmt: skip
    n = _examples(replies)
    for stage, node, names, arrays in grid.received:
        if stage == keys.SA_ADVERTISE:
            assert keys.REC_ARRAYS not in names and not arrays
        for masked in arrays:
            assert stage == keys.SA_MASKED_INPUT and masked.dtype == np.uint64
            own = Quantizer(
                scale_bits=cfg.secagg_scale_bits,
                bound=input_bound(weight=n[node], bound=cfg.secagg_bound),
            )
            plain = own.encode(weighted_input(grid.kept[node], weight=n[node]))
            signed = masked.view(np.int64).astype(float)
            assert abs(np.corrcoef(plain.view(np.int64).astype(float), signed)[0, 1]) < 0.1
            assert np.mean(masked == plain) < 0.01
    # No secret is left at any site after the round.
    assert all(STATE_NAME not in c.state.config_records for c in contexts.values())
    assert all(UPDATE not in c.state.array_records for c in contexts.values())


@pytest.mark.parametrize(
    "stage", [keys.SA_ADVERTISE, keys.SA_SHARE_KEYS, keys.SA_MASKED_INPUT, keys.SA_UNMASK]
)
def test_one_drop_out_at_any_stage_is_recovered(sites: Path, tmp_path: Path, stage: str) -> None:
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    grid = Loopback(contexts)
    lost = sorted(contexts)[1]
    grid.lose[stage] = {lost}
    secure, replies = train_round(grid, sites, cfg, model)
    assert secure.last_round is not None and secure.last_round.outcome == "ok"
    # A site lost after sending its masked input is still in the sum (its seed is recovered
    # from the others' shares); one lost before is not (its pairwise masks are removed).
    survivors = set(contexts) if stage == keys.SA_UNMASK else set(contexts) - {lost}
    if stage != keys.SA_ADVERTISE:  # stage 1 lost: the guard records no reply as a drop-out
        dropped = [r for r in replies if r.has_error()]
        if stage != keys.SA_UNMASK:
            assert [r.metadata.src_node_id for r in dropped] == [lost]
            assert f"left secure aggregation at stage {stage}" in dropped[0].error.reason
            # The wait it names is the one the round had, not the run config's default.
            assert f"timeout of {ROUND_TIMEOUT:g} s" in dropped[0].error.reason
    check_aggregate(replies, grid, model, survivors, cfg)


def test_below_the_threshold_the_round_fails_for_everyone_with_the_reason(
    sites: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    grid = Loopback(contexts)
    grid.lose[keys.SA_MASKED_INPUT] = set(sorted(contexts)[:2])  # 2 of 4 left; threshold 3
    secure, replies = train_round(grid, sites, cfg, global_model(sites, cfg))
    assert len(replies) == N_SITES and all(r.has_error() for r in replies)
    lost = set(sorted(contexts)[:2])
    reasons = {r.metadata.src_node_id: r.error.reason for r in replies}
    assert all("left secure aggregation at stage masked-input" in reasons[k] for k in lost)
    others = [reasons[k] for k in set(contexts) - lost]
    assert all("fewer than the threshold 3" in reason for reason in others)
    assert secure.last_round is not None and "failed at masked-input" in secure.last_round.outcome


def test_hospital_dp_averages_uniformly_what_each_site_clipped(sites: Path, tmp_path: Path) -> None:
    contexts = site_contexts(
        sites, tmp_path, **{"hospital-dp-noise": 1.0, "hospital-dp-clip": 0.05}
    )
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    grid = Loopback(contexts)
    _, replies = train_round(grid, sites, cfg, model)
    assert all(np.linalg.norm(v) <= 0.05 * (1 + 1e-9) for v in grid.kept.values())
    check_aggregate(replies, grid, model, set(contexts), cfg, uniform=True)


def test_a_site_masking_something_else_fails_the_round_and_says_so(
    sites: Path, tmp_path: Path
) -> None:
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    liar = sorted(contexts)[0]

    def alter(stage: str, node: int, reply: Message) -> Message:
        if stage == keys.SA_MASKED_INPUT and node == liar:
            masked = reply.content.array_records[keys.REC_SECAGG][keys.SA_MASKED].numpy()
            masked = masked.copy()
            masked[:-1] += np.uint64(2**40)  # far outside the bound at scale 2^24; the
            # weight coordinate (the last) is left as the site masked it
            from flwr.app import Array, ArrayRecord

            reply.content[keys.REC_SECAGG] = ArrayRecord({keys.SA_MASKED: Array(masked)})
        return reply

    grid = Loopback(contexts)
    grid.alter = alter
    secure, replies = train_round(grid, sites, cfg, global_model(sites, cfg))
    assert all(r.has_error() for r in replies)
    assert secure.last_round is not None and "over the bound" in secure.last_round.outcome


def test_a_wrong_unmasking_share_is_detected(sites: Path, tmp_path: Path) -> None:
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    liar = sorted(contexts)[0]

    def alter(stage: str, node: int, reply: Message) -> Message:
        if stage == keys.SA_UNMASK and node == liar:
            record = reply.content.config_records[keys.REC_SECAGG]
            shares = list(record[keys.SA_SHARES])  # type: ignore[arg-type]
            shares[-1] = bytes(66 - 1) + b"\x07"
            record[keys.SA_SHARES] = shares
        return reply

    grid = Loopback(contexts)
    grid.alter = alter
    secure, replies = train_round(grid, sites, cfg, global_model(sites, cfg))
    assert all(r.has_error() for r in replies)
    assert secure.last_round is not None and "wrong share" in secure.last_round.outcome


def test_the_centre_cannot_weigh_one_site_up_the_site_weighs_itself(
    sites: Path, tmp_path: Path
) -> None:
    """A centre that gives the victim weight 1 and the others 1e-12 (the attack that read a
    victim's update) still gets FedAvg's mean: no site takes a weight from the message."""
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    victim = sorted(contexts)[0]

    def tamper(stage: str, node: int, msg: Message) -> None:
        if stage == keys.SA_MASKED_INPUT:
            record = msg.content.config_records[keys.REC_SECAGG]
            record[keys.SA_WEIGHT] = 1.0 if node == victim else 1e-12

    grid = Loopback(contexts)
    grid.tamper = tamper
    secure, replies = train_round(grid, sites, cfg, model)
    assert secure.last_round is not None and secure.last_round.outcome == "ok"
    check_aggregate(replies, grid, model, set(contexts), cfg)
    mean = _flat(unpack_record(replies[0].content.array_records[keys.REC_ARRAYS])) - _flat(model)
    assert np.max(np.abs(mean - grid.kept[victim])) > 1e-3  # not the victim's own update


def test_a_centre_that_expects_other_weights_fails_the_round(sites: Path, tmp_path: Path) -> None:
    """The centre's own weights only predict the sites'; the recovered total weight is
    theirs, so a centre pretending otherwise gets a failed round, not one site's update."""
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    victim = sorted(contexts)[0]
    original = _SecureRound.masked_input

    def skewed(self: _SecureRound, advertised: Any, shared: Any, weights: Any) -> Any:
        return original(
            self, advertised, shared, {n: 10**12 if n == victim else 1 for n in weights}
        )

    grid = Loopback(contexts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_SecureRound, "masked_input", skewed)
        secure, replies = train_round(grid, sites, cfg, global_model(sites, cfg))
    assert all(r.has_error() for r in replies)
    assert secure.last_round is not None and "total weight" in secure.last_round.outcome


def test_a_folded_evaluation_survives_a_drop_out_at_share_keys(sites: Path, tmp_path: Path) -> None:
    """A site lost after its stage-1 reply (which carried round 1's evaluation) still gets
    its evaluation to the guard, beside a training refusal: not an error that loses it."""
    contexts = site_contexts(sites, tmp_path, **{"num-server-rounds": 3})
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    grid = Loopback(contexts)
    lost = sorted(contexts)[1]
    grid.lose[keys.SA_SHARE_KEYS] = {lost}
    secure, replies = train_round(grid, sites, cfg, model, evaluate_round=1)
    assert secure.last_round is not None and secure.last_round.outcome == "ok"
    by_node = {r.metadata.src_node_id: r for r in replies}
    gone = by_node[lost]
    assert not gone.has_error()
    assert set(gone.content) == {keys.REC_EVAL_METRICS, keys.REC_EVAL_SITE, keys.REC_TRAIN_REFUSAL}
    refusal = gone.content.config_records[keys.REC_TRAIN_REFUSAL]
    assert refusal[keys.F_CODE] == keys.ERR_FAILED
    assert "left secure aggregation at stage share-keys" in str(refusal[keys.F_REASON])
    for node, reply in by_node.items():
        if node != lost:
            assert {keys.REC_EVAL_METRICS, keys.REC_EVAL_SITE} <= set(reply.content)


def test_a_folded_evaluation_survives_a_failed_round(sites: Path, tmp_path: Path) -> None:
    contexts = site_contexts(sites, tmp_path, **{"num-server-rounds": 3})
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    grid = Loopback(contexts)
    grid.lose[keys.SA_MASKED_INPUT] = set(sorted(contexts)[:2])  # below the threshold
    _, replies = train_round(grid, sites, cfg, global_model(sites, cfg), evaluate_round=1)
    assert len(replies) == N_SITES and not any(r.has_error() for r in replies)
    for reply in replies:
        assert keys.REC_EVAL_METRICS in reply.content
        refusal = reply.content.config_records[keys.REC_TRAIN_REFUSAL]
        assert refusal[keys.F_CODE] == keys.ERR_FAILED


def test_a_re_sent_round_is_refused_so_no_difference_isolates_an_update(
    sites: Path, tmp_path: Path
) -> None:
    """The centre runs round 1 again with the victim 'dropped' to subtract the two sums:
    every site refuses to advertise keys twice for one (run, round), durably."""
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    secure, _ = train_round(Loopback(contexts), sites, cfg, model)
    assert secure.last_round is not None and secure.last_round.outcome == "ok"
    again = site_contexts(sites, tmp_path)  # fresh node state: only the state dir remembers
    grid = Loopback(again)
    grid.lose[keys.SA_MASKED_INPUT] = {sorted(again)[2]}
    secure, replies = train_round(grid, sites, cfg, model)
    assert all(r.has_error() for r in replies)
    assert all("already advertised keys for run 'run-sa' round 1" in r.error.reason
               for r in replies)  # fmt: skip
    assert secure.last_round is not None and "failed at advertise" in secure.last_round.outcome
    assert not [stage for stage, *_ in grid.received if stage != keys.SA_ADVERTISE]
    # Each refusal is in the site's own signed audit log, with its phase and reason.
    for site in (f"site-{i}" for i in range(N_SITES)):
        log = tmp_path / site / SITE_AUDIT_LOG
        entries = [json.loads(line) for line in log.open(encoding="utf-8")]
        refused = [e["data"] for e in entries if e["kind"] == kinds.REFUSED]
        assert [r["phase"] for r in refused] == ["secagg-advertise"]
        assert "already advertised keys" in refused[0]["reason"]
        secagg = [e["data"] for e in entries if e["kind"] == kinds.SECAGG]
        assert [e["weighting"]["scheme"] for e in secagg] == ["num-examples"]


@pytest.mark.parametrize(("push", "accepted"), [(0.8, True), (2.5, False)])
def test_an_off_protocol_site_is_bounded_only_by_the_check_of_the_mean(
    sites: Path, tmp_path: Path, push: float, accepted: bool
) -> None:
    """The limit docs/threat-model.md states: a site that adds ``push C Σn`` along one
    direction to its masked input (not a clipped ``n_k Δ``) moves the mean by about
    ``push C``; the centre accepts it while the mean stays within the bound, and fails
    the round once it does not."""
    contexts = site_contexts(sites, tmp_path)
    cfg = FederationConfig.from_run_config(next(iter(contexts.values())).run_config)
    model = global_model(sites, cfg)
    evil = sorted(contexts)[1]
    counts: dict[int, int] = {}
    rng = np.random.default_rng(0)
    direction = rng.normal(size=_flat(model).size)
    direction /= np.linalg.norm(direction)
    quantizer = Quantizer(scale_bits=cfg.secagg_scale_bits, bound=cfg.secagg_bound)

    def alter(stage: str, node: int, reply: Message) -> Message:
        if stage == keys.SA_ADVERTISE:
            counts[node] = int(reply.content.metric_records[keys.REC_METRICS]["num-examples"])
        if stage == keys.SA_MASKED_INPUT and node == evil:
            from flwr.app import Array, ArrayRecord

            masked = reply.content.array_records[keys.REC_SECAGG][keys.SA_MASKED].numpy().copy()
            u = direction * push * cfg.secagg_bound * sum(counts.values())
            masked[:-1] += np.rint(u * quantizer.scale).astype(np.int64).view(np.uint64)
            reply.content[keys.REC_SECAGG] = ArrayRecord({keys.SA_MASKED: Array(masked)})
        return reply

    grid = Loopback(contexts)
    grid.alter = alter
    secure, replies = train_round(grid, sites, cfg, model)
    assert secure.last_round is not None
    if not accepted:
        assert all(r.has_error() for r in replies)
        assert "over the bound" in secure.last_round.outcome
        return
    assert secure.last_round.outcome == "ok"
    got = _flat(unpack_record(replies[0].content.array_records[keys.REC_ARRAYS])) - _flat(model)
    assert float(got @ direction) > (push - 0.1) * cfg.secagg_bound
