"""The site's side of secure aggregation: it answers the four stages (``common/secagg.py``).

In a run whose signed run config says ``secure-aggregation = true`` a site never sends its
update in the clear: a train message without the secure-aggregation record is refused.

1. **advertise** (the train message, with a ``secagg`` record naming the round's sites and
   threshold): the site trains as always (``handle_train``: policy, ledger, DP-SGD, audit),
   then keeps its update Δ = trained - received *at the site* (in the node's context state,
   which Flower keeps on the site's machine between messages), clipped to the run's bound C
   (``max-update-norm``; ``hospital-dp-clip`` with hospital-level DP), and answers with its
   training reply minus the arrays, plus fresh X25519 public keys and a seed commitment,
   signed with its site key (the key its audit log is signed with).
2. **share-keys**: checks every peer's signature, splits its masking key and seed among the
   round's sites, and sends each peer its shares encrypted under their pairwise key.
3. **masked-input**: encodes ``w Δ`` (``w`` in (0, 1], the centre's weight for it) in the ring
   and adds its self mask and pairwise masks; only the masked vector leaves.
4. **unmask**: for each site the centre says dropped, its share of that site's masking
   key; for each survivor, its share of that survivor's seed; never both for one site,
   never for a round below the threshold; then the round's secrets are erased, so a second
   request gets nothing. The answer is logged in the site's audit log (``secagg``).

Everything the site checks it takes from its own run config (the bound, the scale, the
least threshold), never from the centre's message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcare.client.audit import AUDIT_KEY_NAME, SiteAudit
from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import load_or_create_signing_key, public_key_raw
from fedcare.common.errors import FedcareError, PolicyViolation, RoundFailed
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import unpack_record
from fedcare.common.secagg import (
    PublicKeys,
    Quantizer,
    RoundContext,
    RoundKeys,
    SecAggError,
    check_overflow,
    key_statement,
    masked_input,
    min_threshold,
    new_round_keys,
    pack_nodes,
    share_keys,
    unmask_shares,
    unpack_nodes,
)

__all__ = ["SiteHooks", "answer_train", "answer_stage", "flat_update", "STATE_NAME"]

#: The context-state records that hold a round's secrets and update between stages.
STATE_NAME = "fedcare-secagg"
_UPDATE_NAME = "fedcare-secagg-update"


@dataclass(frozen=True)
class SiteHooks:
    """What the ClientApp lends this module for one message.

    train:
        fedcare's training handler for the message (``handle_train``).
    audit:
        Opens the site's audit log (its key is the site key that signs advertised keys).
    refuse:
        The site's refusal of a message: ``refuse(msg, error, phase)``, logged and naming
        the site.
    """

    train: Callable[[Message], Message]
    audit: Callable[[], SiteAudit]
    refuse: Callable[[Message, FedcareError, str], Message]


def flat_update(received: dict[str, np.ndarray], trained: dict[str, np.ndarray]) -> np.ndarray:
    """Δ = trained - received as one float64 vector, in the received model's order."""
    if set(received) != set(trained):
        raise RoundFailed("the trained model's tensors differ from the received model's")
    parts = [
        (np.asarray(trained[k], np.float64) - np.asarray(v, np.float64)).ravel()
        for k, v in received.items()
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def _clip(delta: np.ndarray, bound: float) -> np.ndarray:
    norm = float(np.linalg.norm(delta))
    if not np.isfinite(norm):
        raise RoundFailed("the local update holds a NaN or an infinity; it is not sent")
    return delta if norm <= bound else delta * (bound / norm)


def _record(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get(keys.REC_SECAGG)
    if record is None:
        raise PolicyViolation(
            "the centre's message has no secure-aggregation record; the run says "
            "secure-aggregation = true, so this site does not send its update in the clear"
        )
    return record


def _malformed(key: str) -> SecAggError:
    return SecAggError(f"the secure-aggregation record has a malformed {key!r}")


def _int(record: ConfigRecord, key: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(key)
    return value


def _float(record: ConfigRecord, key: str) -> float:
    value = record.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _malformed(key)
    return float(value)


def _bytes(record: ConfigRecord, key: str) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes):
        raise _malformed(key)
    return value


def _bytes_list(record: ConfigRecord, key: str, n: int) -> list[bytes]:
    value = record.get(key)
    if not isinstance(value, list) or len(value) != n:
        raise _malformed(key)
    out = [v for v in value if isinstance(v, bytes)]
    if len(out) != n:
        raise _malformed(key)
    return out


def _round_context(msg: Message) -> RoundContext:
    config = msg.content.config_records.get(keys.REC_CONFIG)
    run_id = config.get(keys.RC_RUN_ID) if config is not None else None
    rnd = config.get(keys.CFG_FEDCARE_ROUND) if config is not None else None
    if not isinstance(run_id, str) or not isinstance(rnd, int) or isinstance(rnd, bool):
        raise SecAggError("the centre's train message names no run id and round")
    return RoundContext(run_id=run_id, round=rnd)


def answer_train(msg: Message, context: Context, *, hooks: SiteHooks) -> Message:
    """A train message: as always in a plain run; stage 1 (advertise) in a secure one."""
    try:
        cfg = FederationConfig.from_run_config(context.run_config)
    except FedcareError:
        return hooks.train(msg)  # the training handler refuses the run config, naming why
    secure = keys.REC_SECAGG in msg.content.config_records
    if not cfg.secure_aggregation and not secure:
        return hooks.train(msg)
    try:
        if not cfg.secure_aggregation:
            raise PolicyViolation(
                "the centre asks for secure aggregation in a run whose signed config has "
                "secure-aggregation = false; refused"
            )
        request = _record(msg)
        if request.get(keys.SA_STAGE) != keys.SA_ADVERTISE:
            raise SecAggError("a train message of a secure run must be the advertise stage")
        ctx = _round_context(msg)
        nodes = unpack_nodes(_bytes(request, keys.SA_NODES))
        threshold = _int(request, keys.SA_THRESHOLD)
        least = max(min_threshold(len(nodes)), cfg.secagg_threshold)
        if context.node_id not in nodes:
            raise SecAggError("the centre's round does not list this site's node")
        if not least <= threshold <= len(nodes):
            raise SecAggError(
                f"the centre asks for threshold {threshold} among {len(nodes)} sites; this "
                f"site takes part only with a threshold in {least}..{len(nodes)}"
            )
        check_overflow(n_sites=len(nodes), bound=cfg.secagg_bound, scale_bits=cfg.secagg_scale_bits)
    except FedcareError as e:
        return hooks.refuse(msg, e, "secagg-advertise")
    reply = hooks.train(msg)
    if reply.has_error() or keys.REC_ARRAYS not in reply.content.array_records:
        return reply  # refused (or only evaluated): nothing to aggregate from this site
    try:
        received = unpack_record(msg.content.array_records[keys.REC_ARRAYS])
        trained = unpack_record(reply.content.array_records[keys.REC_ARRAYS])
        delta = _clip(flat_update(received, trained), cfg.secagg_bound)
        round_keys = new_round_keys(ctx)
        audit = hooks.audit()
        site_key = load_or_create_signing_key(audit.log.path.parent / AUDIT_KEY_NAME)
        public = round_keys.public
        signature = site_key.sign(key_statement(ctx, context.node_id, public))
    except FedcareError as e:
        return hooks.refuse(msg, e, "secagg-advertise")
    context.state[STATE_NAME] = ConfigRecord(
        {
            "run-id": ctx.run_id,
            "round": ctx.round,
            "stage": keys.SA_ADVERTISE,
            "threshold": threshold,
            "nodes": pack_nodes(nodes),
            "enc-private": round_keys.enc_private,
            "mask-private": round_keys.mask_private,
            "seed": round_keys.seed,
            "commitment": round_keys.seed_commitment,
            # Where stage 4 logs its answer, without loading the site again.
            "audit-dir": str(audit.log.path.parent),
            "site-id": audit.log.writer,
        }
    )
    context.state[_UPDATE_NAME] = ArrayRecord({"delta": Array(delta)})
    content = RecordDict(
        {k: v for k, v in reply.content.items() if k != keys.REC_ARRAYS}  # never the update
    )
    content[keys.REC_SECAGG] = ConfigRecord(
        {
            keys.SA_ENC_KEY: public.enc,
            keys.SA_MASK_KEY: public.mask,
            keys.SA_COMMITMENT: public.seed_commitment,
            keys.SA_SIGNATURE: signature,
            keys.SA_SITE_KEY: public_key_raw(site_key),
        }
    )
    return Message(content=content, reply_to=msg)


@dataclass(frozen=True)
class _Stored:
    ctx: RoundContext
    stage: str
    threshold: int
    nodes: list[int]
    keys: RoundKeys
    record: ConfigRecord


def _stored(context: Context, ctx_round: int, expect: str) -> _Stored:
    record = context.state.config_records.get(STATE_NAME)
    if record is None:
        raise SecAggError(
            "this site holds no secure-aggregation round (it never advertised keys, or it "
            "already answered the unmasking): nothing is revealed"
        )
    ctx = RoundContext(run_id=str(record["run-id"]), round=_int(record, "round"))
    if ctx.round != ctx_round or record["stage"] != expect:
        raise SecAggError(
            f"the centre asks for a stage of round {ctx_round} out of order (this site is at "
            f"{record['stage']!r} of round {ctx.round}); refused"
        )
    return _Stored(
        ctx=ctx,
        stage=str(record["stage"]),
        threshold=_int(record, "threshold"),
        nodes=unpack_nodes(record["nodes"]),
        keys=RoundKeys(
            enc_private=_bytes(record, "enc-private"),
            mask_private=_bytes(record, "mask-private"),
            seed=_bytes(record, "seed"),
            seed_commitment=_bytes(record, "commitment"),
        ),
        record=record,
    )


def _peers_from(record: ConfigRecord) -> dict[int, PublicKeys]:
    nodes = unpack_nodes(record["peer-nodes"])
    enc, mask, com = (
        _bytes_list(record, k, len(nodes)) for k in ("peer-enc", "peer-mask", "peer-commitment")
    )
    return {
        n: PublicKeys(enc=e, mask=m, seed_commitment=c)
        for n, e, m, c in zip(nodes, enc, mask, com, strict=True)
    }


def answer_stage(msg: Message, context: Context, *, hooks: SiteHooks) -> Message:
    """A stage message (share-keys, masked-input, unmask) of a secure round."""
    stage = "secagg"
    try:
        cfg = FederationConfig.from_run_config(context.run_config)
        if not cfg.secure_aggregation:
            raise PolicyViolation(
                "a secure-aggregation message in a run whose signed config has "
                "secure-aggregation = false; refused"
            )
        request = _record(msg)
        stage = f"secagg-{str(request.get(keys.SA_STAGE))[:16]}"
        rnd = _int(request, keys.SA_ROUND)
        handler = _STAGES.get(str(request.get(keys.SA_STAGE)))
        if handler is None:
            raise SecAggError(f"{stage!r} is not a secure-aggregation stage this site answers")
        content = handler(request, context, rnd, cfg, hooks)
    except FedcareError as e:
        context.state.config_records.pop(STATE_NAME, None)  # a failed round's secrets go
        context.state.array_records.pop(_UPDATE_NAME, None)
        return hooks.refuse(msg, e, stage)
    return Message(content=RecordDict({keys.REC_SECAGG: content}), reply_to=msg)


def _share_keys(
    request: ConfigRecord, context: Context, rnd: int, cfg: FederationConfig, hooks: SiteHooks
) -> ConfigRecord:
    st = _stored(context, rnd, keys.SA_ADVERTISE)
    me = context.node_id
    nodes = unpack_nodes(_bytes(request, keys.SA_NODES))
    n = len(nodes)
    enc = _bytes_list(request, keys.SA_ENC_KEY, n)
    mask = _bytes_list(request, keys.SA_MASK_KEY, n)
    com = _bytes_list(request, keys.SA_COMMITMENT, n)
    sig = _bytes_list(request, keys.SA_SIGNATURE, n)
    site_keys = _bytes_list(request, keys.SA_SITE_KEY, n)
    if not set(nodes) <= set(st.nodes):
        raise SecAggError("the centre lists sites in share-keys that the round did not start with")
    if len(nodes) < st.threshold:
        raise SecAggError(
            f"only {len(nodes)} site(s) advertised keys, fewer than the threshold {st.threshold}"
        )
    peers = {
        node: PublicKeys(enc=e, mask=m, seed_commitment=c)
        for node, e, m, c in zip(nodes, enc, mask, com, strict=True)
    }
    if me not in peers or peers[me] != st.keys.public:
        raise SecAggError("the centre did not forward this site's own keys unchanged")
    for node, signature, site_key in zip(nodes, sig, site_keys, strict=True):
        try:
            Ed25519PublicKey.from_public_bytes(site_key).verify(
                signature, key_statement(st.ctx, node, peers[node])
            )
        except (InvalidSignature, ValueError):
            raise SecAggError(
                f"node {node}'s advertised keys are not signed by the site key sent with them"
            ) from None
    boxes = share_keys(st.keys, me=me, peers=peers, threshold=st.threshold, ctx=st.ctx)
    record = ConfigRecord(dict(st.record))
    record["stage"] = keys.SA_SHARE_KEYS
    record["peer-nodes"] = pack_nodes(nodes)
    record["peer-enc"] = enc
    record["peer-mask"] = mask
    record["peer-commitment"] = com
    record["own-share"] = boxes.pop(me)
    context.state[STATE_NAME] = record
    others = list(boxes)
    return ConfigRecord(
        {keys.SA_NODES: pack_nodes(others), keys.SA_BOXES: [boxes[n] for n in others]}
    )


def _masked_input(
    request: ConfigRecord, context: Context, rnd: int, cfg: FederationConfig, hooks: SiteHooks
) -> ArrayRecord:
    st = _stored(context, rnd, keys.SA_SHARE_KEYS)
    me = context.node_id
    peers = _peers_from(st.record)
    sources = unpack_nodes(_bytes(request, keys.SA_NODES))
    boxes = _bytes_list(request, keys.SA_BOXES, len(sources))
    weight = _float(request, keys.SA_WEIGHT)
    if me in sources or not set(sources) <= set(peers):
        raise SecAggError("the centre forwards shares from sites that did not advertise keys")
    if len(sources) + 1 < st.threshold:
        raise SecAggError(
            f"only {len(sources) + 1} site(s) shared keys, fewer than the threshold {st.threshold}"
        )
    if not 0 < weight <= 1:
        raise SecAggError(f"the centre's weight {weight} for this site is not in (0, 1]")
    update = context.state.array_records.get(_UPDATE_NAME)
    if update is None:
        raise SecAggError("this site's update for the round is gone")
    delta = update["delta"].numpy()
    quantizer = Quantizer(scale_bits=cfg.secagg_scale_bits, bound=cfg.secagg_bound)
    round_peers = {n: peers[n] for n in [*sources, me]}
    masked = masked_input(
        quantizer.encode(weight * delta), st.keys, me=me, peers=round_peers, ctx=st.ctx
    )
    record = ConfigRecord(dict(st.record))
    record["stage"] = keys.SA_MASKED_INPUT
    record["inbox-nodes"] = pack_nodes(sources)
    record["inbox"] = boxes
    context.state[STATE_NAME] = record
    del context.state.array_records[_UPDATE_NAME]  # the update is not needed any more
    return ArrayRecord({keys.SA_MASKED: Array(masked)})


def _unmask(
    request: ConfigRecord, context: Context, rnd: int, cfg: FederationConfig, hooks: SiteHooks
) -> ConfigRecord:
    st = _stored(context, rnd, keys.SA_MASKED_INPUT)
    me = context.node_id
    # Whatever happens below, this round's secrets are gone after one unmasking request.
    del context.state.config_records[STATE_NAME]
    survivors = set(unpack_nodes(_bytes(request, keys.SA_SURVIVORS)))
    dropped = set(unpack_nodes(_bytes(request, keys.SA_DROPPED)))
    inbox_nodes = unpack_nodes(st.record["inbox-nodes"])
    boxes = _bytes_list(st.record, "inbox", len(inbox_nodes))
    inbox = dict(zip(inbox_nodes, boxes, strict=True))
    inbox[me] = _bytes(st.record, "own-share")
    shares = unmask_shares(
        st.keys,
        me=me,
        inbox=inbox,
        peers=_peers_from(st.record),
        survivors=survivors,
        dropped=dropped,
        threshold=st.threshold,
        ctx=st.ctx,
    )
    audit = SiteAudit.open(
        Path(str(st.record["audit-dir"])), site_id=str(st.record["site-id"]), dataset_fingerprint=""
    )
    audit.log.append(
        kinds.SECAGG,
        _site_entry(msg_round=st.ctx.round, me=me, st=st, survivors=survivors, dropped=dropped),
        run_id=st.ctx.run_id,
    )
    owners = sorted(shares)
    return ConfigRecord(
        {
            keys.SA_NODES: pack_nodes(owners),
            keys.SA_KINDS: [shares[o][0] for o in owners],
            keys.SA_SHARES: [shares[o][1] for o in owners],
        }
    )


def _site_entry(
    *, msg_round: int, me: int, st: _Stored, survivors: set[int], dropped: set[int]
) -> dict[str, object]:
    data: dict[str, object] = {
        "round": msg_round,
        "node_id": me,
        "threshold": st.threshold,
        "survivors": sorted(survivors),
        "dropped": sorted(dropped),
        "server_head": None,
        "server_key": None,
    }
    kinds.SITE_ENTRIES.check(kinds.SECAGG, data)
    return data


_STAGES: dict[str, Callable[..., ConfigRecord | ArrayRecord]] = {
    keys.SA_SHARE_KEYS: _share_keys,
    keys.SA_MASKED_INPUT: _masked_input,
    keys.SA_UNMASK: _unmask,
}
