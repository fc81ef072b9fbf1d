"""The site's side of secure aggregation: it answers the four stages (``common/secagg.py``).

In a run whose signed run config says ``secure-aggregation = true`` a site never sends its
update in the clear: a train message without the secure-aggregation record is refused.

1. **advertise** (the train message, with a ``secagg`` record naming the round's sites and
   threshold): the site trains as always (``handle_train``: policy, ledger, DP-SGD, audit),
   then keeps its update Δ = trained - received *at the site* (in the node's context state,
   which Flower keeps on the site's machine between messages), clipped to the run's bound C
   (``max-update-norm``; ``hospital-dp-clip`` with hospital-level DP), and answers with its
   training reply minus the arrays, plus fresh X25519 public keys and a seed commitment,
   signed with its site key (the key its audit log is signed with). Before training it
   refuses a round that lists more sites than it pins (``SiteHooks.roster``) and a
   (run, round) it already advertised keys for (a durable marker in its state dir, written
   before it answers): a re-sent round would mask the same update under fresh keys.
2. **share-keys**: checks every peer's signature and that every peer's signing key is a
   pinned hospital's (none twice), splits its masking key and seed among the round's
   sites, and sends each peer its shares encrypted under their pairwise key.
3. **masked-input**: encodes ``[w Δ, w]`` in the ring, with its *own* weight ``w`` (its
   training-example count; 1 with hospital-level DP), never one from the centre, and adds
   its self mask and pairwise masks; only the masked vector leaves.
4. **unmask**: for each site the centre says dropped, its share of that site's masking
   key; for each survivor, its share of that survivor's seed; never both for one site,
   never for a round below the threshold; then the round's secrets are erased, so a second
   request gets nothing. The answer is logged in the site's audit log (``secagg``).

Everything the site checks it takes from its own run config (the bound, the scale, the
least threshold), never from the centre's message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tomllib
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcare.client.audit import AUDIT_KEY_NAME, SiteAudit
from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import load_or_create_signing_key, public_key_raw
from fedcare.common.errors import ConfigError, FedcareError, PolicyViolation, RoundFailed
from fedcare.common.federation import FederationConfig
from fedcare.common.files import private_dir, write_private_atomic
from fedcare.common.packed_arrays import unpack_record
from fedcare.common.secagg import (
    PublicKeys,
    Quantizer,
    RoundContext,
    RoundKeys,
    SecAggError,
    check_overflow,
    input_bound,
    key_statement,
    masked_input,
    min_threshold,
    new_round_keys,
    pack_nodes,
    share_keys,
    unmask_shares,
    unpack_nodes,
    weighted_input,
)

__all__ = [
    "SiteHooks",
    "answer_train",
    "answer_stage",
    "flat_update",
    "STATE_NAME",
    "ADVERTISED_DIR",
    "advertised_marker",
    "load_peers_file",
    "audit_keys",
]

#: The folder of a site's state dir that holds one marker per (run, round) it advertised
#: keys for: a site advertises keys for a round at most once, whatever the centre re-sends.
ADVERTISED_DIR = "secagg-advertised"

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
        The site's refusal of a message: ``refuse(msg, error, phase, audit)``, logged in
        ``audit`` where given (else in a deployed site's log) and naming the site.
    roster:
        The site's pinned peers: site id -> raw Ed25519 public key of that hospital's
        audit (and secure-aggregation) signing key, this site's own included. A deployed
        site's comes from the peers file its ``site-config.toml`` names
        (``secagg_peers``; ConfigError without one), a simulated site's from the simulated
        sites' own keys (:func:`audit_keys`).
    """

    train: Callable[[Message], Message]
    audit: Callable[[], SiteAudit]
    refuse: Callable[[Message, FedcareError, str, SiteAudit | None], Message]
    roster: Callable[[], Mapping[str, bytes]]


def load_peers_file(path: Path, *, origin: str) -> dict[str, bytes]:
    """A peers file: TOML with one table ``[peers]``, site id -> the hex (64 characters) of
    that hospital's raw Ed25519 audit public key, exchanged out of band between hospitals.

    ``origin`` names where the path came from (file and field), for the error message.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or holds anything else; one line naming it.
    """
    fix = (
        'write it as a [peers] table, one line per hospital: site-id = "<64 hex characters of '
        'its raw Ed25519 audit public key>"'
    )
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{origin}: cannot read the peers file {path} ({e}); {fix}") from e
    peers = raw.get("peers")
    if set(raw) != {"peers"} or not isinstance(peers, dict) or not peers:
        raise ConfigError(f"{origin}: the peers file {path} has no [peers] table only; {fix}")
    out: dict[str, bytes] = {}
    for site, text in peers.items():
        try:
            key = bytes.fromhex(text) if isinstance(text, str) else b""
            Ed25519PublicKey.from_public_bytes(key)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise ConfigError(
                f"{origin}: the peers file {path} gives site {site!r} no Ed25519 public key; {fix}"
            )
        out[str(site)] = key
    if len(set(out.values())) != len(out):
        raise ConfigError(f"{origin}: the peers file {path} gives two sites the same key; {fix}")
    return out


def audit_keys(sites: Iterable[tuple[str, Path]]) -> dict[str, bytes]:
    """Each site (site id, state dir) -> the public half of its audit signing key (created
    there first if missing, as the site would): a deployed site's own entry of its roster,
    and a simulation's whole roster (:class:`SiteHooks`).

    The simulated sites share one machine, so their roster pins what those files hold: it
    exercises the mechanism, not an out-of-band exchange between hospitals.
    """
    out = {}
    for site_id, state_dir in sites:
        private_dir(state_dir)
        out[site_id] = public_key_raw(load_or_create_signing_key(state_dir / AUDIT_KEY_NAME))
    return out


def advertised_marker(state_dir: Path, ctx: RoundContext) -> Path:
    """The marker a site writes (atomically, before it answers) once it advertised keys for
    ``ctx``'s run and round."""
    run = hashlib.sha256(ctx.run_id.encode("utf-8")).hexdigest()[:32]
    return state_dir / ADVERTISED_DIR / f"{run}-round-{ctx.round}"


def _check_roster_size(roster: Mapping[str, bytes], nodes: list[int], least: int) -> None:
    """Before training: the round lists no more sites than this site pins, and the pinned
    hospitals can reach the threshold."""
    if len(nodes) > len(roster):
        raise PolicyViolation(
            f"the centre's round lists {len(nodes)} sites but this site pins only "
            f"{len(roster)} hospitals' keys: a site it does not know would take part; refused"
        )
    if len(roster) < least:
        raise PolicyViolation(
            f"this site pins {len(roster)} hospitals' keys, fewer than the threshold {least} "
            "needs; refused"
        )


def _check_pinned(
    roster: Mapping[str, bytes], nodes: list[int], site_keys: list[bytes], *, me: int, own: bytes
) -> None:
    """Every peer's signing key is a pinned hospital's, no hospital twice, ours for us."""
    pinned = {key: site for site, key in roster.items()}
    seen: dict[bytes, int] = {}
    for node, key in zip(nodes, site_keys, strict=True):
        if key not in pinned:
            raise PolicyViolation(
                f"node {node}'s keys are signed by a key this site does not pin (not a known "
                "hospital's): a site the centre invented; refused before sharing anything"
            )
        if key in seen:
            raise PolicyViolation(
                f"nodes {seen[key]} and {node} both sign as {pinned[key]}: one hospital counted "
                "twice; refused"
            )
        seen[key] = node
        if (node == me) != (key == own):
            raise PolicyViolation("the centre lists this site's key under another node; refused")


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
        _check_roster_size(hooks.roster(), nodes, least)
        audit = hooks.audit()
        marker = advertised_marker(audit.log.path.parent, ctx)
        if marker.exists():
            replayed = PolicyViolation(
                f"this site already advertised keys for run {ctx.run_id!r} round {ctx.round} "
                f"({marker}); it takes part in a round once, so a re-sent round cannot "
                "isolate its update; refused (the round goes on without this site)"
            )
            return hooks.refuse(msg, replayed, "secagg-advertise", audit)
    except FedcareError as e:
        return hooks.refuse(msg, e, "secagg-advertise", None)
    reply = hooks.train(msg)
    if reply.has_error() or keys.REC_ARRAYS not in reply.content.array_records:
        return reply  # refused (or only evaluated): nothing to aggregate from this site
    # Training appended to the audit log: open it afresh to log what follows.
    audit_now: SiteAudit | None = None
    try:
        audit = audit_now = hooks.audit()
        weight = _own_weight(reply, cfg)
        check_overflow(
            n_sites=len(nodes),
            bound=input_bound(weight=weight, bound=cfg.secagg_bound),
            scale_bits=cfg.secagg_scale_bits,
        )
        received = unpack_record(msg.content.array_records[keys.REC_ARRAYS])
        trained = unpack_record(reply.content.array_records[keys.REC_ARRAYS])
        delta = _clip(flat_update(received, trained), cfg.secagg_bound)
        round_keys = new_round_keys(ctx)
        site_key = load_or_create_signing_key(audit.log.path.parent / AUDIT_KEY_NAME)
        public = round_keys.public
        signature = site_key.sign(key_statement(ctx, context.node_id, public))
        private_dir(marker.parent)
        write_private_atomic(
            marker,
            json.dumps(
                {"run_id": ctx.run_id, "round": ctx.round, "node_id": context.node_id}
            ).encode(),
        )
    except (FedcareError, OSError) as e:
        error = (
            e
            if isinstance(e, FedcareError)
            else RoundFailed(
                f"cannot record the keys advertised for this round in {marker.parent} ({e}); "
                "make the site's state folder writable"
            )
        )
        return _refuse_after_training(msg, reply, error, hooks, audit_now)
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
            "weight": weight,
            "weighting": "uniform" if cfg.hospital_dp_noise > 0 else "num-examples",
            "own-site-key": public_key_raw(site_key),
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


def _own_weight(reply: Message, cfg: FederationConfig) -> int:
    """The weight this site gives its own update: its training-example count (FedAvg's
    weighted mean; it reports the count in the clear anyway), or 1 with hospital-level DP
    (a uniform mean). Never a number the centre sends."""
    if cfg.hospital_dp_noise > 0:
        return 1
    metrics = reply.content.metric_records.get(keys.REC_METRICS)
    value = metrics.get(keys.M_NUM_EXAMPLES) if metrics is not None else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RoundFailed(f"the site's own training reply has no positive {keys.M_NUM_EXAMPLES}")
    return value


_FOLDED = (keys.REC_EVAL_METRICS, keys.REC_EVAL_SITE, keys.REC_EVAL_REFUSAL)


def _refuse_after_training(
    msg: Message, reply: Message, error: FedcareError, hooks: SiteHooks, audit: SiteAudit | None
) -> Message:
    """The site's refusal after it trained; an evaluation folded into the message (already
    done, in the reply) still goes back, beside the training's refusal."""
    refused = hooks.refuse(msg, error, "secagg-advertise", audit)
    folded = {n: reply.content[n] for n in _FOLDED if n in reply.content}
    if not folded or not refused.has_error():
        return refused
    record = ConfigRecord(
        {keys.F_CODE: int(refused.error.code), keys.F_REASON: refused.error.reason or ""}
    )
    return Message(RecordDict({**folded, keys.REC_TRAIN_REFUSAL: record}), reply_to=msg)


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
        return hooks.refuse(msg, e, stage, None)
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
    _check_pinned(hooks.roster(), nodes, site_keys, me=me, own=_bytes(st.record, "own-site-key"))
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
    if me in sources or not set(sources) <= set(peers):
        raise SecAggError("the centre forwards shares from sites that did not advertise keys")
    if len(sources) + 1 < st.threshold:
        raise SecAggError(
            f"only {len(sources) + 1} site(s) shared keys, fewer than the threshold {st.threshold}"
        )
    update = context.state.array_records.get(_UPDATE_NAME)
    if update is None:
        raise SecAggError("this site's update for the round is gone")
    delta = update["delta"].numpy()
    # The site's own weight, fixed when it trained; any weight in the request is ignored.
    weight = _int(st.record, "weight")
    quantizer = Quantizer(
        scale_bits=cfg.secagg_scale_bits, bound=input_bound(weight=weight, bound=cfg.secagg_bound)
    )
    round_peers = {n: peers[n] for n in [*sources, me]}
    masked = masked_input(
        quantizer.encode(weighted_input(delta, weight=weight)),
        st.keys,
        me=me,
        peers=round_peers,
        ctx=st.ctx,
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
        # What this site masked: [w Δ, w] with its own w (its num-examples, or 1: uniform).
        "weighting": {"scheme": str(st.record["weighting"]), "weight": _int(st.record, "weight")},
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
