"""The centre's side of secure aggregation: one training round in four stages over the Grid.

With ``secure-aggregation = true`` the ServerApp's grid is a :class:`SecureGrid`. A round's
train messages (the strategy's, as always) become stage 1; the grid then drives stages 2-4
(``query.secagg`` messages; ``common/secagg.py`` has the protocol) and hands the guard what
the centre can know: for every site that survived the round, its training reply (metrics,
privacy report) carrying the *aggregate* model ``g + Δ̄`` in place of its own, where Δ̄ is
the weighted mean of the survivors' updates recovered from their masked inputs. The guard's
checks (finite, norm within ``max-update-norm``) then apply to that mean, and FedAvg's
mean of identical models is the model itself; each site's own update is never seen.

Weights are the sites' own, never the centre's: each site masks ``[n_k Δ_k, n_k]`` (``n_k``
its ``num-examples``, which its reply reports in the clear too), so the centre unmasks
``Σ n_k Δ_k`` and ``Σ n_k`` over the survivors and divides: FedAvg's weighted mean. With
hospital-level DP each site masks ``[Δ_k, 1]``: a uniform mean, as
:class:`~fedcare.server.hospital_dp.HospitalDP` needs; its clipping is then done by each site
(to ``hospital-dp-clip``) before masking, and its noise (σ = z C / n over the survivors) is
added by the centre to the unmasked mean. The recovered total weight must equal the
survivors' reported counts (else the round fails).

Drop-outs: a site that does not answer a stage within ``round-timeout`` leaves the round
(each stage waits at most that long, so a round takes at most four timeouts); while at
least ``threshold`` sites answer every stage the sum of the survivors is recovered, and the
dropped sites reach the guard as drop-outs naming the stage. Below the threshold, or when
the recovered sum is not finite or outside ``n x bound`` (a site that masked something else
than the protocol says), the round fails for every site with that reason and the global
model is unchanged. Every round's stages, the sites that answered each and the outcome go
into the server's audit log (``secagg`` entries).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcare.common import keys
from fedcare.common.audit import public_key_fingerprint
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import is_packed, layout_of, pack_record, unpack_record
from fedcare.common.secagg import (
    SHARE_OF_KEY,
    SHARE_OF_SEED,
    PublicKeys,
    Quantizer,
    RoundContext,
    SecAggError,
    check_overflow,
    input_bound,
    key_statement,
    min_threshold,
    pack_nodes,
    unmask,
    unpack_nodes,
    weighted_mean,
)
from fedcare.server.audit import ServerAudit
from fedcare.server.grid import DelegatingGrid, PromptGrid

__all__ = ["SecureGrid", "RoundStats", "apply_mean_update", "STAGE_POLL_S"]

#: How often stages 2-4 ask the grid for replies (seconds). Flower's simulation engine
#: hands messages to the sites every 0.1 s whatever this is; in a deployment these are
#: requests to the SuperLink on the centre's own machine, for the second or so a stage lasts.
STAGE_POLL_S = 0.02

log = logging.getLogger(__name__)

#: The records a stage-1 reply carries for an evaluation folded into the train message
#: (``server/guard.py`` reads them).
_FOLDED = (keys.REC_EVAL_METRICS, keys.REC_EVAL_SITE, keys.REC_EVAL_REFUSAL)

_SITE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass
class RoundStats:
    """What one secure round moved: payload bytes (array data, bytes and strings of the
    records) sent to and received from each site, per stage, each stage's wall time (from
    sending its messages to the last reply), and the outcome."""

    sent: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    sites: int = 0
    outcome: str = ""


def _payload(content: RecordDict) -> int:
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            total += sum(len(a.data) for a in record.values())
        elif isinstance(record, (ConfigRecord, MetricRecord)):
            for value in record.values():
                items = value if isinstance(value, list) else [value]
                for item in items:
                    total += len(item) if isinstance(item, (bytes, str)) else 8
    return total


def apply_mean_update(
    reference: Mapping[str, np.ndarray], mean: np.ndarray, *, packed: bool
) -> ArrayRecord:
    """The model ``reference + mean`` (``mean`` flat, in ``reference``'s order), in its
    dtypes and packing."""
    out, offset = {}, 0
    for name, value in reference.items():
        size = int(np.asarray(value).size)
        step = mean[offset : offset + size].reshape(np.shape(value))
        offset += size
        new = np.asarray(value, np.float64) + step
        if np.issubdtype(value.dtype, np.integer):
            new = np.rint(new)
        out[name] = new.astype(value.dtype)
    if offset != mean.size:
        raise SecAggError("the recovered sum does not have the model's size")
    if packed:
        return pack_record(out, layout=layout_of(reference))
    return ArrayRecord({name: Array(value) for name, value in out.items()})


class _RoundFailed(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


class SecureGrid(DelegatingGrid):
    """Delegates to ``grid``; a round of train messages runs as a secure round (see the
    module docstring). Evaluation and every other message go through unchanged.

    Parameters
    ----------
    grid:
        The ServerApp's grid.
    cfg:
        The run's configuration (``secure-aggregation`` on; its bound, scale, threshold,
        round timeout, and whether hospital-level DP weights uniformly).
    audit:
        The server's audit log; ``None``: no audit entries.
    """

    def __init__(
        self, grid: Grid, *, cfg: FederationConfig, audit: ServerAudit | None = None
    ) -> None:
        super().__init__(grid)
        self.cfg = cfg
        self.audit = audit
        #: The last secure round's traffic and outcome (the benchmark reads it).
        self.last_round: RoundStats | None = None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        if not msgs or any(m.metadata.message_type != MessageType.TRAIN for m in msgs):
            return self._grid.send_and_receive(msgs, timeout=timeout)
        return _SecureRound(self, msgs, timeout).run()


class _SecureRound:
    """One secure round's state at the centre."""

    def __init__(self, grid: SecureGrid, msgs: list[Message], timeout: float | None) -> None:
        self.grid = grid
        self.cfg = grid.cfg
        self.timeout = timeout
        self.msgs = {m.metadata.dst_node_id: m for m in msgs}
        config = msgs[0].content.config_records[keys.REC_CONFIG]
        self.ctx = RoundContext(
            run_id=str(config[keys.RC_RUN_ID]),
            round=_round_of(config),
        )
        self.reference = unpack_record(msgs[0].content.array_records[keys.REC_ARRAYS])
        self.packed = any(is_packed(n) for n in msgs[0].content.array_records[keys.REC_ARRAYS])
        n = len(msgs)
        self.threshold = self.cfg.secagg_threshold or min_threshold(n)
        self.out: dict[int, Message] = {}
        #: Each node's stage-1 reply (its training reply minus the update).
        self.replies: dict[int, Message] = {}
        self.site_ids: dict[int, str] = {}
        self.answered: dict[str, list[int]] = {}
        self.stats = RoundStats(sites=n)

    # ---------------------------------------------------------------- helpers

    def site(self, node: int) -> str:
        return self.site_ids.get(node, f"node-{node}")

    def _exchange(self, stage: str, contents: dict[int, RecordDict], parse: Any) -> dict[int, Any]:
        """Send each node its content as a ``query.secagg`` message; the parsed valid
        replies by node (a node that does not answer, or answers wrongly, drops out)."""
        messages = {
            node: self.grid.create_message(
                content, keys.MT_SECAGG, node, group_id=str(self.ctx.round)
            )
            for node, content in contents.items()
        }
        self.stats.sent[stage] = sum(_payload(c) for c in contents.values())
        start = time.monotonic()
        # The stage's small messages are answered in milliseconds: poll for them at
        # STAGE_POLL_S, not at the wrapped grid's interval (0.1 s: a third of a round here).
        fast = PromptGrid(self.grid._grid, poll_s=STAGE_POLL_S)
        replies = fast.send_and_receive(list(messages.values()), timeout=self.timeout)
        self.stats.seconds[stage] = round(time.monotonic() - start, 4)
        got: dict[int, Any] = {}
        received = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in messages or node in got:
                continue
            if reply.has_error():
                self.dropped(node, stage, f"refused: {(reply.error.reason or '')[:300]}")
                continue
            received += _payload(reply.content)
            try:
                got[node] = parse(node, reply.content)
            except (SecAggError, KeyError, TypeError, ValueError) as e:
                self.dropped(node, stage, f"malformed reply ({type(e).__name__}: {e})"[:300])
        for node in messages:
            if node not in got and node not in self.out:
                self.dropped(node, stage, self._no_reply())
        self.stats.received[stage] = received
        self.answered[stage] = sorted(got)
        if len(got) < self.threshold:
            raise _RoundFailed(
                stage,
                f"only {len(got)} of {len(contents)} site(s) answered the {stage} stage, fewer "
                f"than the threshold {self.threshold}: the sum cannot be recovered without "
                "weakening the protection",
            )
        return got

    def _no_reply(self) -> str:
        """Why a node that sent nothing dropped: the wait this stage actually had."""
        if self.timeout is None:
            return "no reply (the grid returned without one; no timeout was set)"
        return f"no reply within the round's timeout of {self.timeout:g} s"

    def _lost(self, node: int, code: int, text: str) -> Message:
        """What the guard gets for a node that leaves the round: an error reply; for a node
        whose stage-1 reply carried a folded evaluation, that evaluation (the site sent it)
        and the training's refusal instead (``server/guard.py``)."""
        first = self.replies.get(node)
        folded = {}
        if first is not None:
            folded = {n: first.content[n] for n in _FOLDED if n in first.content}
        if not folded:
            return Message(Error(code=code, reason=text), reply_to=self.msgs[node])
        refusal = ConfigRecord({keys.F_CODE: keys.ERR_FAILED, keys.F_REASON: text})
        return Message(
            RecordDict({**folded, keys.REC_TRAIN_REFUSAL: refusal}), reply_to=self.msgs[node]
        )

    def dropped(self, node: int, stage: str, reason: str) -> None:
        """Node leaves the round at ``stage``: the guard records it as a drop-out."""
        text = f"{self.site(node)}: left secure aggregation at stage {stage}: {reason}"
        # Before it trained it is Flower's drop-out; after, a failure after its charge.
        code = ErrorCode.NODE_UNAVAILABLE if node not in self.site_ids else keys.ERR_FAILED
        self.out[node] = self._lost(node, code, text)
        log.warning("round %s: %s", self.ctx.round, text)

    def fail(self, nodes: Iterable[int], stage: str, reason: str) -> None:
        for node in nodes:
            if node in self.out:
                continue
            text = f"{self.site(node)}: secure aggregation failed at stage {stage}: {reason}"
            self.out[node] = self._lost(node, keys.ERR_FAILED, text)

    # ---------------------------------------------------------------- stages

    def run(self) -> list[Message]:
        outcome = "ok"
        try:
            check_overflow(
                n_sites=len(self.msgs),
                bound=self.cfg.secagg_bound,
                scale_bits=self.cfg.secagg_scale_bits,
            )
            if self.threshold > len(self.msgs):
                raise _RoundFailed(
                    "advertise",
                    f"the round has {len(self.msgs)} site(s), fewer than secagg-threshold="
                    f"{self.threshold}",
                )
            advertised, weights = self.advertise()
            shared = self.share_keys(advertised)
            masked = self.masked_input(advertised, shared, weights)
            mean = self.unmask(advertised, masked, set(shared))
            record = apply_mean_update(self.reference, mean, packed=self.packed)
            for node in masked:
                reply = self.replies[node]
                del reply.content[keys.REC_SECAGG]
                reply.content[keys.REC_ARRAYS] = record
                self.out[node] = reply
        except _RoundFailed as e:
            outcome = f"failed at {e.stage}: {e.reason}"
            log.warning("round %s: secure aggregation %s", self.ctx.round, outcome)
            self.fail(self.msgs, e.stage, e.reason)
        except SecAggError as e:
            outcome = f"failed: {e}"
            log.warning("round %s: secure aggregation %s", self.ctx.round, outcome)
            self.fail(self.msgs, "unmask", str(e))
        self.stats.outcome = outcome
        self.grid.last_round = self.stats
        if self.grid.audit is not None:
            names = {
                stage: [self.site(n) for n in self.answered.get(stage, [])]
                for stage in (
                    keys.SA_ADVERTISE,
                    keys.SA_SHARE_KEYS,
                    keys.SA_MASKED_INPUT,
                    keys.SA_UNMASK,
                )
            }
            self.grid.audit.secagg(
                self.ctx.round,
                data={
                    "threshold": self.threshold,
                    "advertised": names[keys.SA_ADVERTISE],
                    "shared": names[keys.SA_SHARE_KEYS],
                    "masked": names[keys.SA_MASKED_INPUT],
                    "unmasked": names[keys.SA_UNMASK],
                    "outcome": outcome[:1000],
                    "bytes": {"sent": self.stats.sent, "received": self.stats.received},
                    "seconds": self.stats.seconds,
                },
            )
        return list(self.out.values())

    def advertise(self) -> tuple[dict[int, tuple[PublicKeys, bytes, bytes]], dict[int, int]]:
        """Stage 1: the train messages with the round's sites and threshold."""
        nodes = pack_nodes(self.msgs)
        for msg in self.msgs.values():
            msg.content[keys.REC_SECAGG] = ConfigRecord(
                {
                    keys.SA_STAGE: keys.SA_ADVERTISE,
                    keys.SA_NODES: nodes,
                    keys.SA_THRESHOLD: self.threshold,
                }
            )
        start = time.monotonic()
        replies = self.grid._grid.send_and_receive(list(self.msgs.values()), timeout=self.timeout)
        self.stats.seconds[keys.SA_ADVERTISE] = round(time.monotonic() - start, 4)
        advertised: dict[int, tuple[PublicKeys, bytes, bytes]] = {}
        examples: dict[int, int] = {}
        self.stats.received[keys.SA_ADVERTISE] = 0
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self.msgs or node in self.out or node in advertised:
                continue
            if reply.has_error() or keys.REC_SECAGG not in reply.content.config_records:
                self.out[node] = reply  # a refusal (or no update): the guard records it
                continue
            self.stats.received[keys.SA_ADVERTISE] += _payload(reply.content)
            info = reply.content.config_records.get(keys.REC_SITE)
            site = info.get(keys.S_SITE_ID) if info is not None else None
            if isinstance(site, str) and _SITE_ID.fullmatch(site):
                self.site_ids[node] = site
            try:
                advertised[node] = _advertisement(self.ctx, node, reply.content, info)
                examples[node] = _num_examples(reply.content)
            except (SecAggError, KeyError, TypeError, ValueError) as e:
                self.dropped(node, keys.SA_ADVERTISE, f"malformed reply ({e})"[:300])
                continue
            self.replies[node] = reply
        for node in self.msgs:
            if node not in advertised and node not in self.out:
                self.dropped(node, keys.SA_ADVERTISE, self._no_reply())
        self.answered[keys.SA_ADVERTISE] = sorted(advertised)
        if len(advertised) < self.threshold:
            raise _RoundFailed(
                keys.SA_ADVERTISE,
                f"only {len(advertised)} of {len(self.msgs)} site(s) trained and advertised "
                f"keys, fewer than the threshold {self.threshold}",
            )
        self.stats.sent[keys.SA_ADVERTISE] = sum(_payload(m.content) for m in self.msgs.values())
        # Each site masks [w_k Δ_k, w_k] with its own weight: its num-examples (FedAvg), or
        # 1 with hospital-level DP (a uniform mean). The centre only predicts them, to size
        # the ring and to check the recovered total weight.
        uniform = self.cfg.hospital_dp_noise > 0
        weights = {n: 1 if uniform else examples[n] for n in advertised}
        try:
            check_overflow(
                n_sites=len(advertised),
                bound=input_bound(weight=max(weights.values()), bound=self.cfg.secagg_bound),
                scale_bits=self.cfg.secagg_scale_bits,
            )
        except SecAggError as e:
            raise _RoundFailed(keys.SA_ADVERTISE, str(e)) from e
        return advertised, weights

    def share_keys(
        self, advertised: dict[int, tuple[PublicKeys, bytes, bytes]]
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: every site gets every site's keys; answers one ciphertext per peer."""
        order = sorted(advertised)
        record = ConfigRecord(
            {
                keys.SA_STAGE: keys.SA_SHARE_KEYS,
                keys.SA_ROUND: self.ctx.round,
                keys.SA_NODES: pack_nodes(order),
                keys.SA_ENC_KEY: [advertised[n][0].enc for n in order],
                keys.SA_MASK_KEY: [advertised[n][0].mask for n in order],
                keys.SA_COMMITMENT: [advertised[n][0].seed_commitment for n in order],
                keys.SA_SIGNATURE: [advertised[n][1] for n in order],
                keys.SA_SITE_KEY: [advertised[n][2] for n in order],
            }
        )

        def parse(node: int, content: RecordDict) -> dict[int, bytes]:
            rec = content.config_records[keys.REC_SECAGG]
            dst = unpack_nodes(rec[keys.SA_NODES])
            boxes = rec[keys.SA_BOXES]
            if set(dst) != set(order) - {node} or not isinstance(boxes, list):
                raise SecAggError("its shares are not one per other site")
            typed = [b for b in boxes if isinstance(b, bytes)]
            if len(typed) != len(dst) or len(boxes) != len(dst):
                raise SecAggError("its shares are malformed")
            return dict(zip(dst, typed, strict=True))

        contents = {n: RecordDict({keys.REC_SECAGG: ConfigRecord(dict(record))}) for n in order}
        return self._exchange(keys.SA_SHARE_KEYS, contents, parse)

    def masked_input(
        self,
        advertised: dict[int, tuple[PublicKeys, bytes, bytes]],
        shared: dict[int, dict[int, bytes]],
        weights: dict[int, int],
    ) -> dict[int, np.ndarray]:
        """Stage 3: each site gets the shares addressed to it (never a weight: each site
        weighs its own input)."""
        self.weight = {n: weights[n] for n in shared}
        # The model's coordinates and the weight's.
        size = sum(int(np.asarray(v).size) for v in self.reference.values()) + 1
        contents = {}
        for node in shared:
            sources = [j for j in sorted(shared) if j != node]
            contents[node] = RecordDict(
                {
                    keys.REC_SECAGG: ConfigRecord(
                        {
                            keys.SA_STAGE: keys.SA_MASKED_INPUT,
                            keys.SA_ROUND: self.ctx.round,
                            keys.SA_NODES: pack_nodes(sources),
                            keys.SA_BOXES: [shared[j][node] for j in sources],
                        }
                    )
                }
            )

        def parse(node: int, content: RecordDict) -> np.ndarray:
            masked = content.array_records[keys.REC_SECAGG][keys.SA_MASKED].numpy()
            if masked.dtype != np.uint64 or masked.shape != (size,):
                raise SecAggError(f"its masked input is not {size} ring elements")
            return masked

        return self._exchange(keys.SA_MASKED_INPUT, contents, parse)

    def unmask(
        self,
        advertised: dict[int, tuple[PublicKeys, bytes, bytes]],
        masked: dict[int, np.ndarray],
        shared: set[int],
    ) -> np.ndarray:
        """Stage 4: survivors send shares; the sum is recovered, checked and averaged."""
        survivors = sorted(masked)
        dropped = sorted(shared - set(masked))
        record = ConfigRecord(
            {
                keys.SA_STAGE: keys.SA_UNMASK,
                keys.SA_ROUND: self.ctx.round,
                keys.SA_SURVIVORS: pack_nodes(survivors),
                keys.SA_DROPPED: pack_nodes(dropped),
            }
        )

        def parse(node: int, content: RecordDict) -> dict[int, tuple[str, bytes]]:
            rec = content.config_records[keys.REC_SECAGG]
            owners = unpack_nodes(rec[keys.SA_NODES])
            kinds_, shares = rec[keys.SA_KINDS], rec[keys.SA_SHARES]
            if not isinstance(kinds_, list) or not isinstance(shares, list):
                raise SecAggError("its shares are malformed")
            if set(owners) != shared or not len(kinds_) == len(owners) == len(shares):
                raise SecAggError("it did not send one share per site of the round")
            out = {}
            for owner, kind, share in zip(owners, kinds_, shares, strict=True):
                want = SHARE_OF_KEY if owner in dropped else SHARE_OF_SEED
                if kind != want or not isinstance(share, bytes):
                    raise SecAggError(f"its share for node {owner} is not the {want} asked for")
                out[owner] = (str(kind), share)
            return out

        contents = {n: RecordDict({keys.REC_SECAGG: ConfigRecord(dict(record))}) for n in masked}
        shares = self._exchange(keys.SA_UNMASK, contents, parse)
        public = {n: advertised[n][0] for n in shared}
        total = unmask(
            masked,
            public=public,
            shares=shares,
            threshold=self.threshold,
            ctx=self.ctx,
            dropped=dropped,
        )
        quantizer = Quantizer(scale_bits=self.cfg.secagg_scale_bits, bound=self.cfg.secagg_bound)
        rounding = quantizer.max_error(len(survivors))
        decoded = quantizer.decode(total)
        try:
            _, weight = weighted_mean(decoded)
        except SecAggError as e:
            raise _RoundFailed(keys.SA_UNMASK, str(e)) from e
        expected = sum(self.weight[n] for n in survivors)
        if abs(weight - expected) > rounding:
            raise _RoundFailed(
                keys.SA_UNMASK,
                f"the recovered total weight {weight:.6g} is not the survivors' reported "
                f"{expected} ({'sites' if self.cfg.hospital_dp_noise > 0 else 'num-examples'}):"
                " a site masked another weight than it reported; the global model is unchanged",
            )
        weight = float(expected)
        mean = decoded[:-1] / weight
        # Each survivor's input has norm <= w_k C, so the weighted mean's norm is <= C, up
        # to the rounding of n inputs (n / 2^(f+1) per coordinate, divided by the weight).
        slack = rounding * math.sqrt(max(mean.size, 1)) / weight
        norm = float(np.linalg.norm(mean))
        if not math.isfinite(norm) or norm > self.cfg.secagg_bound + slack:
            raise _RoundFailed(
                keys.SA_UNMASK,
                f"the recovered mean update has norm {norm:.4g}, over the bound "
                f"{self.cfg.secagg_bound:g} every site enforces: a site masked something else "
                "than its bounded update; the global model is unchanged",
            )
        return mean


def _advertisement(
    ctx: RoundContext, node: int, content: RecordDict, info: ConfigRecord | None
) -> tuple[PublicKeys, bytes, bytes]:
    rec = content.config_records[keys.REC_SECAGG]
    values = [
        rec[k]
        for k in (
            keys.SA_ENC_KEY,
            keys.SA_MASK_KEY,
            keys.SA_COMMITMENT,
            keys.SA_SIGNATURE,
            keys.SA_SITE_KEY,
        )
    ]
    typed = [v for v in values if isinstance(v, bytes)]
    if len(typed) != len(values):
        raise SecAggError("its advertised keys are not bytes")
    enc, mask, commitment, signature, site_key = typed
    public = PublicKeys(enc=enc, mask=mask, seed_commitment=commitment)
    public.check()
    try:
        Ed25519PublicKey.from_public_bytes(site_key).verify(
            signature, key_statement(ctx, node, public)
        )
    except (InvalidSignature, ValueError):
        raise SecAggError("its advertised keys are not signed by its site key") from None
    reported = info.get(keys.S_AUDIT_KEY) if info is not None else None
    if reported is not None and reported != public_key_fingerprint(site_key):
        raise SecAggError("the key that signed its advertised keys is not its audit key")
    return public, signature, site_key


def _round_of(config: ConfigRecord) -> int:
    value = config[keys.CFG_FEDCARE_ROUND]
    if not isinstance(value, int) or isinstance(value, bool):
        raise SecAggError(f"the round's {keys.CFG_FEDCARE_ROUND} is not an integer")
    return value


def _num_examples(content: RecordDict) -> int:
    metrics = content.metric_records[keys.REC_METRICS]
    value = metrics[keys.M_NUM_EXAMPLES]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SecAggError(f"{keys.M_NUM_EXAMPLES} is not a positive count")
    return value
