"""The guard around any aggregation strategy: validate, record, checkpoint.

:class:`GuardedStrategy` wraps a Flower strategy (as Flower's own DP wrappers do) and adds
what a hospital federation needs on every round:

* the absolute round number goes to every site (a resumed run continues its numbering, so a
  site's ledger never charges a round twice) and to the wrapped strategy (FedAdam's bias
  correction counts rounds: a resumed run takes the steps an uninterrupted one would);
* each reply is checked before aggregation: a refusal (an error reply: budget spent, task not
  allowed) is recorded with its reason; an update with wrong names, shapes or dtypes, a NaN,
  or a norm over the bound is rejected and recorded; the round goes on with the rest;
* a site that does not answer within the round timeout is recorded as dropped;
* federated evaluation keeps each site's metrics; the global metrics are those of the sum
  of the sites' (noisy) evaluation releases, validated first (a malformed one is recorded
  and left out), or a patient-weighted mean where a site sent no release;
* round r's evaluation travels with round r + 1's train message (whose model is the global
  model after round r): the message asks for it (``keys.CFG_EVALUATE_ROUND``), each site
  evaluates before it trains, and its reply carries the evaluation in records of its own,
  which the guard takes out, checks and records under round r before it checks the update.
  A deployed round is then one message exchange, not two. Only round 0 (the initial model)
  and the last round are evaluated by evaluate messages of their own; with
  ``evaluate-every`` k, only rounds that evaluate fold it. A reply without the evaluation it
  was asked for, with another round's, or with a malformed one is recorded as a failed
  evaluation of that site; its update is judged on its own;
* after every round the global model, the run record and the server optimizer's state
  (FedAdam's and FedYogi's moments; ``server/strategies.py``) are checkpointed atomically,
  in one file, and a progress line is appended to ``progress.jsonl``
  (:class:`~fedcare.server.recorder.RunRecorder`);
* with a :class:`~fedcare.server.audit.ServerAudit`, each of these events also becomes a signed
  entry of the server's audit log (model hashes sent and aggregated, each update's hash,
  norm and the site's privacy report, refusals, rejections, drop-outs), and every message
  to the sites carries the log's head.

What the guard finds goes into the run record (:class:`~fedcare.common.run_record.RunRecord`,
the source of ``server_record.json`` and the run's ``summary.json``), which the run recorder
(:mod:`fedcare.server.recorder`) keeps and checkpoints; the guard itself keeps no record.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import hash_arrays
from fedcare.common.errors import DataError, UpdateRejected
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import is_packed, layout_of, pack_record, unpack_record
from fedcare.common.run_record import RunRecord
from fedcare.common.spec import FeatureSchema, LabelSpec
from fedcare.common.summary import (
    ALL_SITES,
    EvaluationMode,
    EventKind,
    Explanation,
    GroupInfo,
    NoiseSource,
)
from fedcare.models.evaluation import (
    SplitSums,
    metrics_from_release,
    releases_from_wire,
    threshold_from_release,
)
from fedcare.models.explain import (
    DEFAULT_CLIP,
    AttributionRelease,
    importances_from_release,
    modality_shares,
    sum_releases,
)
from fedcare.models.fairness import (
    declared_groups,
    global_calibration,
    global_fairness_metrics,
    group_releases_from_wire,
)
from fedcare.models.survival_curves import CurveRelease, release_from_wire
from fedcare.models.survival_groups import (
    check_survival_group_metrics,
    global_survival_group_metrics,
)
from fedcare.models.survival_pooled import (
    SurvivalHistogram,
    global_survival_metrics,
    histograms_from_wire,
)
from fedcare.server.audit import ServerAudit, record_sha256
from fedcare.server.recorder import DPReport, EndStatus, RunRecorder, TrainReport
from fedcare.server.strategies import optimizer_state
from fedcare.server.update_checks import validate_update

__all__ = ["GuardedStrategy", "arrays_to_numpy"]

log = logging.getLogger(__name__)

#: Flower's own error replies for a site it could not reach (offline, message expired, the
#: ClientApp process crashed): the site dropped out; it did not refuse.
_UNREACHABLE = frozenset(
    {
        ErrorCode.MESSAGE_UNAVAILABLE,
        ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_CRASHED,
    }
)
_AUDITED_EVENTS = frozenset(kinds.SERVER_EVENT_KINDS)
#: A site's error reply after its charge: a failure or a divergence, not a refusal.
_STATUS_OF_CODE: dict[int, EndStatus] = {
    keys.ERR_FAILED: kinds.FAILED,
    keys.ERR_DIVERGED: kinds.DIVERGED,
}


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays (copies) of an ArrayRecord, packed on the wire or not
    (:mod:`fedcare.common.packed_arrays`); :class:`ValueError` if its packing is malformed."""
    return unpack_record(arrays)


def in_layout(
    named: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, packed: bool = True
) -> ArrayRecord:
    """``named`` in ``reference``'s order, packed exactly as ``reference`` is (same groups,
    order and names), or as plain named arrays where the round sent them plain.

    What the strategy aggregates is then one layout, whatever order or packing a site's
    reply used: Flower aggregates packed arrays number by number, so two layouts of the
    same tensors must never meet there.
    """
    ordered = {name: named[name] for name in reference}
    if packed:
        return pack_record(ordered, layout=layout_of(reference))
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in ordered.items()})


def with_model_dtypes(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` with every array in the dtype of the model the round sent.

    Flower's FedAdam/FedYogi/FedAdagrad multiply by a NumPy float64 scalar, which under
    NumPy 2 turns a float32 model into float64; the sites then train float32 weights, and
    every update of the next round would be rejected as the wrong dtype. The model's dtypes
    are the round's reference, so the aggregate is cast back to them (a no-op for FedAvg).
    """
    current = arrays_to_numpy(arrays)
    if set(current) != set(reference):  # the guard hands every strategy the round's tensors
        raise ValueError(
            "the strategy's aggregate holds other tensors than the model it was sent "
            f"({sorted(set(current) ^ set(reference))[:5]}); a strategy must return the "
            "model's arrays"
        )
    if all(current[name].dtype == reference[name].dtype for name in current):
        return arrays
    cast = {name: value.astype(reference[name].dtype) for name, value in current.items()}
    return in_layout(cast, reference, packed=any(is_packed(name) for name in arrays))


class GuardedStrategy(Strategy):
    """Wraps ``strategy``; see the module docstring.

    Parameters
    ----------
    strategy:
        The aggregation strategy (FedAvg, FedProx, ..., possibly DP-wrapped).
    cfg:
        The run's configuration.
    run_dir:
        Where checkpoints and progress go (:class:`~fedcare.server.recorder.RunRecorder`).
    run_id:
        The run's id (sites key their ledger charges on it).
    round_offset:
        Rounds completed before this start (resume); round ``r`` of Flower's loop is round
        ``round_offset + r`` of the run.
    record:
        The run record to extend (a checkpoint's, when resuming); a new one by default.
    schema_fingerprint:
        The federation's feature-schema fingerprint, sent to every site.
    schema_json:
        The federation's feature schema itself (JSON; no patient data), sent with it so a
        site whose schema differs can say which features differ.
    audit:
        The server's audit log for this run (none: no audit entries).
    explain_features:
        The features a run with ``explain`` names (``models.explain.task_features``).
    survival_label:
        A survival task's label (its ``cuts`` and ``time_unit``): its last evaluation's
        survival curve releases are pooled into the record (``models/survival_curves.py``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        cfg: FederationConfig,
        run_dir: Path,
        run_id: str,
        round_offset: int = 0,
        record: RunRecord | None = None,
        schema_fingerprint: str = "",
        schema_json: str = "",
        audit: ServerAudit | None = None,
        explain_features: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
        survival_label: LabelSpec | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_id
        self.round_offset = round_offset
        self.recorder = RunRecorder(cfg=cfg, run_dir=run_dir, run_id=run_id, record=record)
        self.schema_fingerprint = schema_fingerprint
        self.schema_json = schema_json
        self.audit = audit
        self._reference: dict[str, np.ndarray] = {}
        #: Whether the round sent its model packed (fedcare's ServerApp always does).
        self._sent_packed = False
        self._expected: set[int] = set()
        #: The site each node speaks for in this process, from its first reply that names
        #: one (:meth:`_speaks_for`): a node never speaks for two sites, nor two live nodes
        #: for one.
        self._node_sites: dict[int, str] = {}
        self._skip_evaluation = False
        #: Per-group releases (models/fairness.py) of a round's evaluation, until pooled.
        self._group_releases: dict[int, dict[str, dict[tuple[str, str, int], SplitSums]]] = {}
        self._groups_declared: tuple[dict[str, int], list[GroupInfo]] | None = None
        #: The (absolute) round whose evaluation this round's train messages ask for.
        self._folded: int | None = None
        #: The features a run with ``explain`` names (models.explain.task_features), and the
        #: sites' attribution releases of a round's evaluation, until pooled.
        self.explain_features = explain_features
        self._explain_releases: dict[int, dict[str, AttributionRelease]] = {}
        #: A survival task's label (its cuts), and the sites' curve releases until pooled.
        self.survival_label = survival_label
        self._curve_releases: dict[int, dict[str, CurveRelease]] = {}
        #: Its sites' (risk bin, interval, event) histograms of a round, until pooled.
        self._survival_histograms: dict[int, dict[str, dict[str, SurvivalHistogram]]] = {}

    # ------------------------------------------------------------------ helpers

    @property
    def record(self) -> RunRecord:
        """The run record (the recorder's)."""
        return self.recorder.record

    def absolute(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _site_of(self, node_id: int) -> str:
        return self._node_sites.get(node_id) or self.recorder.site_of(node_id)

    def _speaks_for(self, node: int, claimed: str | None, live: set[int]) -> tuple[str, str]:
        """The site a reply from ``node`` speaks for, and why its claim is refused (``""``
        when it is not).

        A reply's site id is the site's word (its site record, or its error reason's
        prefix); the centre binds it to the Flower node that sent it (a registered
        SuperNode's key in a deployment) at the first reply that names one. After that the
        node speaks only for that site: a reply claiming another is refused under the bound
        site. A site already bound to another node that is live (asked this round or
        replying in this batch, ``live``) cannot be claimed: two nodes never speak for one
        site. A bound node that is gone (a SuperNode restarted under a new node id) gives
        its site up to the next node that claims it.
        """
        bound = self._node_sites.get(node)
        if bound is not None:
            if claimed is not None and claimed != bound:
                return bound, (
                    f"its node speaks for site {bound} in this run, but the reply claims to "
                    f"be site {claimed}"
                )
            return bound, ""
        if claimed is None:
            return self._site_of(node), ""
        holder = next((n for n, site in self._node_sites.items() if site == claimed), None)
        if holder is not None and (holder in live or holder in self._expected):
            return f"node-{node}", (
                f"the reply claims to be site {claimed}, which another node speaks for in this run"
            )
        if holder is not None:
            del self._node_sites[holder]
        self._node_sites[node] = claimed
        return claimed, ""

    def _event(self, server_round: int, site_id: str, kind: EventKind, detail: str) -> None:
        self._event_at(self.absolute(server_round), site_id, kind, detail)

    def _event_at(self, rnd: int, site_id: str, kind: EventKind, detail: str) -> None:
        """:meth:`_event` for an absolute round ``rnd``."""
        self.recorder.event(rnd, site_id=site_id, kind=kind, detail=detail)
        log.warning("round %s: site %s %s: %s", rnd, site_id, kind, detail)
        if self.audit is not None and kind in _AUDITED_EVENTS:
            self.audit.event(rnd, kind=kind, site_id=site_id, reason=detail)

    def _with_round(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        out = ConfigRecord(dict(config))
        out[keys.CFG_FEDCARE_ROUND] = self.absolute(server_round)
        out[keys.CFG_SCHEMA_FINGERPRINT] = self.schema_fingerprint
        if self.schema_json:
            out[keys.CFG_SCHEMA] = self.schema_json
        out[keys.RC_RUN_ID] = self.run_id
        if self.audit is not None:
            out[keys.CFG_AUDIT_HEAD] = self.audit.head
            out[keys.CFG_AUDIT_KEY] = self.audit.key_fingerprint
        return out

    # ------------------------------------------------------------------ train

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = arrays_to_numpy(arrays)
        self._sent_packed = any(is_packed(name) for name in arrays)
        if self.audit is not None:
            self.audit.round_start(
                self.absolute(server_round), model_sha256=hash_arrays(self._reference)
            )
        config = self._with_round(config, server_round)
        before = self.absolute(server_round) - 1
        # The round before's evaluation goes with this round's model (the one it evaluates).
        self._folded = before if self.folds_evaluation(before) else None
        if self._folded is not None:
            config[keys.CFG_EVALUATE_ROUND] = self._folded
        messages = list(
            self.strategy.configure_train(self.absolute(server_round), arrays, config, grid)
        )
        self._expected = {m.metadata.dst_node_id for m in messages}
        return messages

    def folds_evaluation(self, rnd: int) -> bool:
        """Whether round ``rnd``'s evaluation goes with round ``rnd + 1``'s train message:
        every round the run evaluates after (``evaluation_rounds``) but round 0 (evaluated
        before training starts) and the last (no round follows it)."""
        return 1 <= rnd < self.cfg.num_server_rounds and rnd in self.cfg.evaluation_rounds

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        folded, self._folded = self._folded, None
        if folded is not None:
            self._aggregate_folded(folded, replies)
        lost = {
            r.metadata.src_node_id: r.error.reason
            for r in replies
            if r.has_error() and r.error.code in _UNREACHABLE
        }
        answered = {r.metadata.src_node_id for r in replies} - set(lost)
        kept: list[Message] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() and reply.error.code in _UNREACHABLE:
                continue  # Flower answered for a site that went offline: a drop-out, below
            refusal: tuple[int, str] | None = None
            if reply.has_error():
                refusal = int(reply.error.code), reply.error.reason or ""
            elif keys.REC_TRAIN_REFUSAL in reply.content:  # after a folded evaluation
                try:
                    refusal = _train_refusal(reply)
                except (KeyError, TypeError, ValueError) as e:
                    site_id = self._site_of(node)
                    detail = f"malformed reply ({type(e).__name__}: {str(e)[:200]})"
                    self._reject(server_round, site_id, node, None, detail, None)
                    continue
            if refusal is not None:
                text, epsilon, delta = keys.ledger_epsilon(refusal[1])
                claimed, reason = _claim_in_reason(text, refusal[0])
                site_id, conflict = self._speaks_for(node, claimed, answered)
                if conflict:
                    self._reject(server_round, site_id, node, None, conflict, None)
                    continue
                self.recorder.node_is(node, site_id)
                status = _STATUS_OF_CODE.get(refusal[0], kinds.REFUSED)
                # epsilon: the site's ledger, as it reports it (kept in a DP run)
                self.recorder.site_ended(
                    site_id, status=status, reason=reason, epsilon=epsilon, delta=delta
                )
                self._event(server_round, site_id, status, reason)
                continue
            info = reply.content.config_records.get(keys.REC_SITE)
            site_id, conflict = self._speaks_for(node, _reported_site_id(info), answered)
            if conflict:
                self._reject(server_round, site_id, node, None, conflict, info)
                continue
            self.recorder.node_is(node, site_id)
            sha256: str | None = None
            try:
                extra = set(reply.content) - {keys.REC_ARRAYS, keys.REC_METRICS, keys.REC_SITE}
                if extra:  # Flower's strategies refuse the whole round over one such reply
                    raise ValueError(f"the reply carries records fedcare never sends: {extra}")
                update = arrays_to_numpy(reply.content.array_records[keys.REC_ARRAYS])
                sha256 = hash_arrays(update)
                norm = validate_update(update, self._reference, max_norm=self.cfg.max_update_norm)
                report = _train_report(reply.content[keys.REC_METRICS], info)
            except UpdateRejected as e:
                self._reject(server_round, site_id, node, sha256, str(e), info)
                continue
            except Exception as e:  # any failure to read a site's reply is that reply's fault
                detail = f"malformed reply ({type(e).__name__}: {str(e)[:200]})"
                self._reject(server_round, site_id, node, sha256, detail, info)
                continue
            # The strategy aggregates the update in the layout the round sent, and the metrics
            # fedcare's strategies read, rebuilt from checked scalars (Flower refuses a round
            # whose replies' metric records differ, and divides by their total weight).
            reply.content[keys.REC_ARRAYS] = in_layout(
                update, self._reference, packed=self._sent_packed
            )
            reply.content[keys.REC_METRICS] = _checked_metrics(report)
            kept.append(reply)
            self.recorder.trained(self.absolute(server_round), site_id, report, norm=norm)
            if self.audit is not None and sha256 is not None:
                self.audit.update(
                    self.absolute(server_round),
                    site_id=site_id,
                    node_id=node,
                    sha256=sha256,
                    norm=norm,
                    num_examples=report.num_examples,
                    info=info,
                )
        for node in sorted(self._expected - answered):
            site_id = self._site_of(node)
            reason = (
                f"went offline: {lost[node]}"
                if node in lost
                else f"no reply within round-timeout={self.cfg.round_timeout:g} s"
            )
            self.recorder.site_ended(site_id, status=kinds.DROPPED, reason=reason)
            self._event(server_round, site_id, kinds.DROPPED, reason)
        if len(kept) < self.cfg.min_sites:
            self._event(
                server_round,
                ALL_SITES,
                kinds.ROUND_SKIPPED,
                f"only {len(kept)} valid update(s), fewer than min-sites={self.cfg.min_sites}; "
                "the global model is unchanged",
            )
            self._audit_aggregate(server_round, None, 0)
            return None, None
        _drop_partial_metric(kept, keys.M_TRAIN_LOSS)
        arrays, metrics = self.strategy.aggregate_train(self.absolute(server_round), kept)
        if arrays is not None:
            arrays = with_model_dtypes(arrays, self._reference)
            if not all(np.isfinite(v).all() for v in arrays_to_numpy(arrays).values()):
                # Finite updates can still sum past float32 (one site sending ±3e38): a
                # non-finite model would make every site charge and diverge next round.
                self._event(
                    server_round,
                    ALL_SITES,
                    kinds.ROUND_SKIPPED,
                    "the aggregate is not finite (an update too large for the model's dtype; "
                    "bound updates with max-update-norm); the global model is unchanged",
                )
                self._audit_aggregate(server_round, None, 0)
                return None, None
        self._audit_aggregate(server_round, arrays, len(kept) if arrays is not None else 0)
        return arrays, metrics

    def _reject(
        self,
        server_round: int,
        site_id: str,
        node: int,
        sha256: str | None,
        detail: str,
        info: ConfigRecord | None,
    ) -> None:
        self.recorder.site_ended(site_id, status=kinds.REJECTED, reason=detail)
        self._event(server_round, site_id, kinds.REJECTED, detail)
        if self.audit is not None:
            self.audit.rejected(
                self.absolute(server_round),
                site_id=site_id,
                node_id=node,
                sha256=sha256,
                reason=detail,
                info=info,
            )

    def _audit_aggregate(self, server_round: int, arrays: ArrayRecord | None, n: int) -> None:
        """Log the global model after this round (unchanged when nothing was aggregated)."""
        if self.audit is None:
            return
        sha256 = record_sha256(arrays) if arrays is not None else hash_arrays(self._reference)
        self.audit.aggregate(self.absolute(server_round), model_sha256=sha256, updates=n)

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.absolute(server_round)
        if rnd != self.cfg.num_server_rounds:
            # evaluate-every: no evaluation this round, or it goes with the next round's train
            # message (folds_evaluation); only the last round's has a message of its own.
            self._skip_evaluation = True
            return []
        self._skip_evaluation = False
        return self.strategy.configure_evaluate(
            rnd, arrays, self._with_round(config, server_round), grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self.absolute(server_round)
        self.recorder.round_recorded(rnd)
        if self._skip_evaluation:
            self._skip_evaluation = False
            return None
        per_site: dict[str, dict[str, float]] = {}
        releases: dict[str, dict[str, SplitSums]] = {}
        replies = list(replies)
        live = {r.metadata.src_node_id for r in replies}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                text, _, _ = keys.ledger_epsilon(reply.error.reason or "")
                claimed, reason = _claim_in_reason(text, int(reply.error.code))
                site_id, conflict = self._speaks_for(node, claimed, live)
                self._event_at(rnd, site_id, kinds.EVALUATE_FAILED, conflict or reason)
                continue
            info = reply.content.config_records.get(keys.REC_SITE)
            site_id, conflict = self._speaks_for(node, _reported_site_id(info), live)
            if conflict:
                self._event_at(rnd, site_id, kinds.EVALUATE_FAILED, conflict)
                continue
            self._site_evaluated(
                rnd, site_id, reply.content.get(keys.REC_METRICS), info, per_site, releases
            )
        return self._global_evaluation(rnd, per_site, releases)

    def _aggregate_folded(self, rnd: int, replies: list[Message]) -> None:
        """Round ``rnd``'s evaluation, from the train replies of round ``rnd + 1`` that carry
        it; its records are taken out of each reply (the update is checked without them).

        An error reply carries none: it is an ``evaluate-failed`` event of round ``rnd`` with
        the error's reason (as an error reply to an evaluate message is), besides the
        training's refusal or drop-out of round ``rnd + 1``. A reply that lacks it, carries
        another round's or a malformed one is an ``evaluate-failed`` event too.
        """
        per_site: dict[str, dict[str, float]] = {}
        releases: dict[str, dict[str, SplitSums]] = {}
        live = {r.metadata.src_node_id for r in replies}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                text, _, _ = keys.ledger_epsilon(reply.error.reason or "")
                claimed, error = _claim_in_reason(text, int(reply.error.code))
                site_id, conflict = self._speaks_for(node, claimed, live)
                self._event_at(
                    rnd,
                    site_id,
                    kinds.EVALUATE_FAILED,
                    conflict
                    or f"its train message of round {rnd + 1}, which carried this evaluation, "
                    f"was answered with an error: {error}",
                )
                continue
            taken = {name: reply.content[name] for name in _FOLDED if name in reply.content}
            for name in taken:
                del reply.content[name]
            metrics = taken.get(keys.REC_EVAL_METRICS)
            info = taken.get(keys.REC_EVAL_SITE)
            refusal = taken.get(keys.REC_EVAL_REFUSAL)
            trained = reply.content.config_records.get(keys.REC_SITE)
            site_id, conflict = self._speaks_for(
                node,
                _reported_site_id(info if isinstance(info, ConfigRecord) else trained),
                live,
            )
            try:
                if conflict:
                    raise ValueError(conflict)
                if refusal is not None:
                    if metrics is not None or info is not None:
                        raise ValueError("it carries an evaluation and its refusal")
                    if not isinstance(refusal, ConfigRecord):
                        raise TypeError("its evaluation refusal is not a config record")
                    _check_round(refusal, rnd)
                    reason = refusal[keys.F_REASON]
                    if not isinstance(reason, str):
                        raise TypeError("its evaluation refusal gives no reason")
                    text, _, _ = keys.ledger_epsilon(reason)
                    claimed, why = _claim_in_reason(text, keys.ERR_POLICY)
                    if claimed is not None and claimed != site_id:
                        raise ValueError(
                            f"its evaluation refusal claims to be site {claimed}, the reply "
                            f"{site_id}"
                        )
                    self._event_at(rnd, site_id, kinds.EVALUATE_FAILED, why)
                    continue
                if metrics is None or info is None:
                    raise ValueError(
                        f"the reply carries no evaluation of round {rnd}, which its train "
                        "message asked for"
                    )
                if not isinstance(info, ConfigRecord):
                    raise TypeError("its evaluation's site record is not a config record")
                _check_round(info, rnd)
            except (KeyError, TypeError, ValueError) as e:
                detail = f"malformed evaluation ({type(e).__name__}: {str(e)[:200]})"
                self._event_at(rnd, site_id, kinds.EVALUATE_FAILED, detail)
                continue
            self._site_evaluated(rnd, site_id, metrics, info, per_site, releases)
        self._global_evaluation(rnd, per_site, releases)

    def _site_evaluated(
        self,
        rnd: int,
        site_id: str,
        metrics: Any,
        info: ConfigRecord | None,
        per_site: dict[str, dict[str, float]],
        releases: dict[str, dict[str, SplitSums]],
    ) -> None:
        """Check one site's evaluation of round ``rnd`` and record it (into ``per_site`` and
        ``releases`` too); a malformed one is an ``evaluate-failed`` event, left out."""
        try:
            if not isinstance(metrics, MetricRecord):
                raise TypeError("the reply has no metrics record")
            releases[site_id] = releases_from_wire(metrics)
            if self.survival_label is None:
                groups = group_releases_from_wire(metrics, self._fairness()[0])
            else:  # a survival task's groups send derived metrics only (survival_groups.py)
                check_survival_group_metrics(metrics, self._fairness()[0])
                groups = {}
            explained = self._explanation_from_wire(rnd, metrics)
            curve = self._curve_from_wire(rnd, metrics)
            cuts = self.survival_label.cuts if self.survival_label is not None else None
            histograms = histograms_from_wire(
                metrics,
                intervals=len(cuts) if cuts else None,
                noise_multiplier=(
                    _release_noise(info)
                    if any(keys.is_surv_hist_metric(k) for k in metrics)
                    else 0.0
                ),
            )
        except (KeyError, TypeError, ValueError, DataError) as e:
            releases.pop(site_id, None)
            detail = f"malformed reply ({type(e).__name__}: {str(e)[:200]})"
            self._event_at(rnd, site_id, kinds.EVALUATE_FAILED, detail)
            return
        self._group_releases.setdefault(rnd, {})[site_id] = groups
        if explained is not None:
            self._explain_releases.setdefault(rnd, {})[site_id] = explained
        if curve is not None:
            self._curve_releases.setdefault(rnd, {})[site_id] = curve
        if histograms:
            self._survival_histograms.setdefault(rnd, {})[site_id] = histograms
        values = {  # the site's own metrics; its release's sums only feed the global ones
            k: float(v)
            for k, v in metrics.items()
            if keys.is_allowed_metric(k)
            and not keys.is_release_metric(k)
            and k != keys.M_NUM_EXAMPLES
            and isinstance(v, (int, float))
            and math.isfinite(float(v))
            and not (k.endswith(".n") and float(v) < 0)  # a count is never negative
        }
        # A site's personalized model (client/personal/) is its own: reported per site,
        # never pooled into the global metrics.
        personal = _personal_metrics(values)
        values = {k: v for k, v in values.items() if not keys.is_personal_metric(k)}
        per_site[site_id] = values
        evaluation, epsilon, run_epsilon, delta = _evaluation_report(info)
        self.recorder.evaluated(
            rnd,
            site_id,
            metrics=values,
            personal=personal,
            evaluation=evaluation,
            epsilon=epsilon,
            run_epsilon=run_epsilon,
            delta=delta,
        )

    def _global_evaluation(
        self,
        rnd: int,
        per_site: dict[str, dict[str, float]],
        releases: dict[str, dict[str, SplitSums]],
    ) -> MetricRecord | None:
        """Round ``rnd``'s global metrics, recorded (:func:`global_evaluate_metrics`), with the
        per-group metrics and the calibration curve of the pooled releases
        (:func:`fedcare.models.fairness.global_fairness_metrics`)."""
        global_metrics = global_evaluate_metrics(per_site, releases)
        histograms = self._survival_histograms.pop(rnd, {})
        if self.survival_label is not None:  # the pooled C-index (models/survival_pooled.py)
            global_metrics = global_survival_metrics(global_metrics, per_site, histograms)
        declared, described = self._fairness()
        global_metrics = {k: v for k, v in global_metrics.items() if not keys.is_group_metric(k)}
        global_metrics.update(
            global_fairness_metrics(
                releases,
                self._group_releases.pop(rnd, {}),
                declared,
                threshold=global_metrics.get("test.threshold"),
            )
        )
        if self.survival_label is not None:
            global_metrics.update(global_survival_group_metrics(per_site, declared))
        self.recorder.groups(described)
        explained = self._explain_releases.pop(rnd, {})
        if explained:
            self.recorder.explanation(
                explanation_of(rnd, explained, min_count=self.cfg.site_min_count)
            )
        curves = self._curve_releases.pop(rnd, {})
        if curves and self.survival_label is not None and self.survival_label.cuts:
            self.recorder.survival(
                rnd,
                curves,
                cuts=self.survival_label.cuts,
                time_unit=self.survival_label.time_unit,
                min_count=self.cfg.site_min_count,
            )
        self.recorder.calibration(
            rnd, global_calibration(releases, min_count=self.cfg.site_min_count)
        )
        self.recorder.global_metrics(rnd, global_metrics)
        return MetricRecord(dict(global_metrics)) if global_metrics else None

    def _explanation_from_wire(self, rnd: int, metrics: MetricRecord) -> AttributionRelease | None:
        """A site's attribution release (``explain.<j>``, ``explain.n``), or None when it
        sent none; sent when the run did not ask for one (its last round, ``explain``) or
        with keys other than its features' is a malformed reply (ValueError)."""
        sent = sorted(k for k in metrics if keys.is_explain_metric(k))
        if not sent:
            return None
        if self.explain_features is None or rnd != self.cfg.num_server_rounds:
            raise ValueError(f"an explanation of round {rnd}, which the run did not ask for")
        features, modalities = self.explain_features
        wanted = sorted([keys.EXPLAIN_N, *(keys.explain_key(j) for j in range(len(features)))])
        if sent != wanted:
            raise ValueError(
                f"an explanation of {len(sent) - 1} sums where the run's task names "
                f"{len(features)} features"
            )
        n = float(metrics[keys.EXPLAIN_N])  # type: ignore[arg-type]
        if not n >= 0:
            raise ValueError("an explanation's patient count is negative")
        return AttributionRelease(
            features=features,
            modalities=modalities,
            sums=tuple(float(metrics[keys.explain_key(j)]) for j in range(len(features))),  # type: ignore[arg-type]
            n=n,
            clip=DEFAULT_CLIP,
        )

    def _curve_from_wire(self, rnd: int, metrics: MetricRecord) -> CurveRelease | None:
        """A site's survival curve release (``curve.*``), or None when it sent none; one the
        run did not ask for (not a survival task, not its last round) is a malformed reply
        (ValueError), as is one of other cuts (DataError)."""
        if not any(keys.is_curve_metric(k) for k in metrics):
            return None
        label = self.survival_label
        if label is None or not label.cuts or rnd != self.cfg.num_server_rounds:
            raise ValueError(f"survival curves of round {rnd}, which the run did not ask for")
        return release_from_wire(dict(metrics), cuts=label.cuts)

    def _fairness(self) -> tuple[dict[str, int], list[GroupInfo]]:
        """The federation's group attributes (from its schema): their group counts, which
        bound what a reply's per-group keys may name, and their descriptions for the record."""
        if self._groups_declared is None:
            declared: dict[str, int] = {}
            described: list[GroupInfo] = []
            if self.schema_json:
                schema = FeatureSchema.model_validate_json(self.schema_json)
                declared = declared_groups(schema)
                described = [
                    GroupInfo(name=g.name, column=g.column, labels=schema.group_labels(g.name))
                    for g in schema.groups
                ]
            self._groups_declared = (declared, described)
        return self._groups_declared

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Federated evaluation of the starting model, recorded as round 0."""
        messages = self.strategy.configure_evaluate(
            0, arrays, self._with_round(ConfigRecord(), 0), grid
        )
        replies = grid.send_and_receive(messages=messages, timeout=self.cfg.round_timeout)
        self.aggregate_evaluate(0, replies)

    # ------------------------------------------------------------------ after each round

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` hook: checkpoint and report progress (round 0 = start).

        Flower calls it last in every round, so a caller's record in its JSON form is
        brought up to date here."""
        rnd = self.absolute(server_round)
        if server_round == 0 and self.round_offset > 0:
            return None
        self.recorder.checkpoint(
            rnd, arrays=arrays_to_numpy(arrays), optimizer=optimizer_state(self.strategy)
        )
        return None

    def summary(self) -> None:
        self.strategy.summary()


def explanation_of(
    rnd: int, releases: Mapping[str, AttributionRelease], *, min_count: int
) -> Explanation:
    """Round ``rnd``'s explanation: each site's importances from its own release, and the
    global ones and modality shares from their sum (withheld below ``min_count`` patients)."""
    total = sum_releases(list(releases.values()))
    assert total is not None  # called with at least one release
    importance = importances_from_release(total, min_count=min_count) or {}
    modality_of = dict(zip(total.features, total.modalities, strict=True))
    sites = {
        site: own
        for site, rel in sorted(releases.items())
        if (own := importances_from_release(rel, min_count=1)) is not None
    }
    return Explanation(
        round=rnd,
        features=total.features,
        modalities=total.modalities,
        n=total.n,
        importance=importance,
        modality_shares=modality_shares(importance, modality_of) if importance else {},
        sites=sites,
    )


def weighted_global_metrics(per_site: dict[str, dict[str, float]]) -> dict[str, float]:
    """Patient-weighted mean of each metric over the sites that report it.

    A metric ``<split>.<name>`` is weighted by that site's ``<split>.n``; the global
    ``<split>.n`` is the sum. Sites that withheld a split (small counts) do not take part.
    """
    out: dict[str, float] = {}
    names = sorted({k for values in per_site.values() for k in values})
    for name in names:
        split = name.split(".", 1)[0]
        pairs = [
            (values[name], values.get(f"{split}.n", 0.0))
            for values in per_site.values()
            if name in values
        ]
        if name.endswith(".n"):
            out[name] = float(sum(v for v, _ in pairs))
            continue
        weights = np.array([w for _, w in pairs], dtype=float)
        if weights.sum() <= 0:
            continue
        out[name] = float(np.average([v for v, _ in pairs], weights=weights))
    return out


def global_evaluate_metrics(
    per_site: dict[str, dict[str, float]], releases: dict[str, dict[str, SplitSums]]
) -> dict[str, float]:
    """A round's global metrics: pooled from the sites' releases where possible.

    For each split, when every site that reported it sent a release for it (same number of
    bins), the global metrics are those of the summed release
    (:func:`fedcare.models.evaluation.metrics_from_release`: the metrics of the pooled, noisy
    histogram, at the decision threshold the pooled validation release supports); otherwise
    (a site without a release, e.g. an older one) they are :func:`weighted_global_metrics`.
    ``releases``: site -> split -> validated release.
    """
    weighted = weighted_global_metrics(per_site)
    pooled: dict[str, float] = {}
    pooled_splits: set[str] = set()
    totals: dict[str, SplitSums] = {}
    for split in keys.EVAL_SPLITS:
        reporting = [
            site
            for site, values in per_site.items()
            if f"{split}.n" in values or split in releases.get(site, {})
        ]
        sums = [releases.get(site, {}).get(split) for site in reporting]
        present = [s for s in sums if s is not None]
        if not reporting or len(present) < len(sums) or len({s.bins for s in present}) != 1:
            continue
        pooled_splits.add(split)
        totals[split] = sum(present[1:], start=present[0])
    # One decision threshold for every split: the one the pooled validation release supports
    # (0.5, an edge of every release, where a split has another number of bins than it).
    val = totals.get("val")
    threshold = threshold_from_release(val)
    for split, total in totals.items():
        same_grid = val is not None and total.bins == val.bins
        derived = metrics_from_release(total, threshold=threshold if same_grid else 0.5)
        pooled.update({f"{split}.{k}": v for k, v in derived.items()})
    out = {k: v for k, v in weighted.items() if k.split(".", 1)[0] not in pooled_splits}
    out.update(pooled)
    return out


#: The records a train reply carries for the evaluation folded into its message.
_FOLDED = (keys.REC_EVAL_METRICS, keys.REC_EVAL_SITE, keys.REC_EVAL_REFUSAL)
#: The error codes a site's refusal may carry (``keys.ERR_*``): only these carry a site id
#: (its reason starts with ``<site-id>: ``); Flower's own (a node gone offline, a ClientApp
#: that crashed) name no site (:func:`_claim_in_reason`).
_SITE_CODES = frozenset(
    {
        keys.ERR_BUDGET,
        keys.ERR_POLICY,
        keys.ERR_DATA,
        keys.ERR_CONFIG,
        keys.ERR_FAILED,
        keys.ERR_DIVERGED,
    }
)


def _check_round(record: ConfigRecord, rnd: int) -> None:
    """A folded evaluation's record must name the round it was asked for."""
    said = _number(record, keys.S_EVALUATED_ROUND, int)
    if said != rnd:
        raise ValueError(f"it evaluated round {said}, not round {rnd} as asked")


def _train_refusal(reply: Message) -> tuple[int, str]:
    """The code and reason of a training refusal sent as a record (after the evaluation its
    message carried); KeyError/TypeError/ValueError when it is malformed."""
    if set(reply.content) != {keys.REC_TRAIN_REFUSAL}:
        raise ValueError("a training refusal carries other records")
    record = reply.content[keys.REC_TRAIN_REFUSAL]
    if not isinstance(record, ConfigRecord):
        raise TypeError("the training refusal is not a config record")
    code = _number(record, keys.F_CODE, int)
    if code not in _SITE_CODES:
        raise ValueError(f"the training refusal's code {code} is not a site's error code")
    reason = record[keys.F_REASON]
    if not isinstance(reason, str):
        raise TypeError("the training refusal gives no reason")
    return code, reason


def _personal_metrics(values: dict[str, float]) -> dict[str, float]:
    """A site's personalized-model metrics, ``personal.test.auroc`` -> ``test.auroc``."""
    return {
        k.removeprefix(keys.PERSONAL_PREFIX): v
        for k, v in values.items()
        if keys.is_personal_metric(k)
    }


def _number(record: MetricRecord | ConfigRecord, key: str, kind: type[int] | type[float]) -> Any:
    """A finite number a site reported, as ``kind``; TypeError/ValueError otherwise."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} is {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise ValueError(f"{key} is not finite")
    if kind is int and value != int(value):
        raise ValueError(f"{key} = {value} is not a whole number")
    return kind(value)


def _train_report(metrics: Any, info: ConfigRecord | None) -> TrainReport:
    """The numbers a training reply reports, checked before the update is accepted."""
    if not isinstance(metrics, MetricRecord):
        raise TypeError("the reply has no metrics record")
    dp: DPReport | None = None
    if info is not None and info.get(keys.S_DP) is True:
        accountant = info[keys.S_ACCOUNTANT]
        if not isinstance(accountant, str) or not 0 < len(accountant) <= 32:
            raise TypeError("the site's accountant is not a short name")
        delta = _number(info, keys.S_DELTA, float)
        if not 0 < delta < 1:
            raise ValueError(f"{keys.S_DELTA} = {delta} is not in (0, 1)")
        noise = _choice(info, keys.S_NOISE, (keys.NOISE_OS_ENTROPY, keys.NOISE_REPRODUCIBLE))
        noise_multiplier = _number(info, keys.S_NOISE_MULTIPLIER, float)
        sample_rate = _number(info, keys.S_SAMPLE_RATE, float)
        steps = _number(info, keys.S_STEPS, int)
        # The run record's bounds (common/run_record.py): a reply outside them is malformed.
        if not (noise_multiplier > 0 and 0 < sample_rate <= 1 and steps >= 1):
            raise ValueError(
                f"the reported mechanism (noise multiplier {noise_multiplier}, sample rate "
                f"{sample_rate}, steps {steps}) is not a DP-SGD mechanism"
            )
        dp = DPReport(
            epsilon=_epsilon(info, keys.S_EPSILON),
            run_epsilon=(
                _epsilon(info, keys.S_RUN_EPSILON) if keys.S_RUN_EPSILON in info else None
            ),
            delta=delta,
            accountant=accountant,
            noise=_noise_source(noise),
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
        )
    evaluation = _choice(info, keys.S_EVALUATION, (keys.EVAL_DP, keys.EVAL_EXACT))
    num_examples = _number(metrics, keys.M_NUM_EXAMPLES, int)
    if num_examples < 1:  # the strategy's weight: a site that trained on no one has no update
        raise ValueError(f"{keys.M_NUM_EXAMPLES} = {num_examples} is not a positive count")
    return TrainReport(
        num_examples=num_examples,
        # A site sends its training loss only where its evaluation is exact (a statistic of
        # its patients under weights the server chose): absent is normal, malformed is not.
        train_loss=(
            _number(metrics, keys.M_TRAIN_LOSS, float) if keys.M_TRAIN_LOSS in metrics else None
        ),
        evaluation=_evaluation_mode(evaluation),
        dp=dp,
    )


def _checked_metrics(report: TrainReport) -> MetricRecord:
    """The metrics a kept reply gives the strategy: its checked number of examples (a
    positive weight) and training loss, nothing the site added."""
    numbers: dict[str, int | float | list[int] | list[float]] = {
        keys.M_NUM_EXAMPLES: report.num_examples
    }
    if report.train_loss is not None:
        numbers[keys.M_TRAIN_LOSS] = report.train_loss
    return MetricRecord(numbers)


def _noise_source(value: str | None) -> NoiseSource | None:
    """A checked noise source (one of ``keys.NOISE_*``) as its type."""
    if value == keys.NOISE_OS_ENTROPY:
        return "os-entropy"
    if value == keys.NOISE_REPRODUCIBLE:
        return "reproducible"
    return None


def _evaluation_mode(value: str | None) -> EvaluationMode | None:
    """A checked evaluation mode (one of ``keys.EVAL_*``) as its type."""
    if value == keys.EVAL_DP:
        return "dp"
    if value == keys.EVAL_EXACT:
        return "exact"
    return None


def _epsilon(info: ConfigRecord, key: str) -> float:
    """An ε a site reported: a finite number >= 0; TypeError/ValueError otherwise."""
    value = _number(info, key, float)
    if value < 0:
        raise ValueError(f"{key} = {value} is negative")
    return float(value)


def _choice(info: ConfigRecord | None, key: str, allowed: tuple[str, ...]) -> str | None:
    """One of ``allowed`` a site reported under ``key``; ``None`` when it did not report it.

    A value outside ``allowed`` is a ValueError (the update is rejected as malformed).
    """
    if info is None or key not in info:
        return None
    value = info[key]
    if value not in allowed:
        raise ValueError(f"{key} = {str(value)[:40]!r} is not one of {', '.join(allowed)}")
    return str(value)


#: Characters of a site's refusal reason kept in the run record and summary.
_MAX_REASON = 1000
#: A site id as site.toml allows it (bounded: it enters logs and the summary).
_SITE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _reported_site_id(info: ConfigRecord | None) -> str | None:
    """The site id a reply's site record reports, or None when it reports no valid one.

    A reply's site record is the site's word (bound to its node by
    :meth:`GuardedStrategy._speaks_for`); a malformed id must not reach the audit log.
    """
    if info is None or keys.S_SITE_ID not in info:
        return None
    value = info[keys.S_SITE_ID]
    if isinstance(value, str) and _SITE_ID.fullmatch(value):
        return value
    return None


def _claim_in_reason(reason: str, code: int) -> tuple[str | None, str]:
    """``(site id, reason)`` of an error reason: a site prefixes its own with ``<site-id>: ``.
    Flower's reasons (``"Error: Node Unavailable ..."``) and any other code's name no site.

    >>> _claim_in_reason("site-1: over budget", 4001)
    ('site-1', 'over budget')
    >>> _claim_in_reason("Error: Node Unavailable", 5)
    (None, 'Error: Node Unavailable')
    """
    head, sep, rest = reason.partition(": ")
    if code in _SITE_CODES and sep and _SITE_ID.fullmatch(head):
        claimed, text = head, rest
    else:
        claimed, text = None, reason
    # A site that gives no reason still ended its round: the record says so in words.
    return claimed, (text.strip() or "(the site gave no reason)")[:_MAX_REASON]


def _drop_partial_metric(replies: list[Message], name: str) -> None:
    """Remove metric ``name`` from every reply when only some carry it.

    A site sends its training loss only where its evaluation is exact (the loss is a
    statistic of its patients); Flower's strategies refuse replies whose metric records
    differ, so a mixed federation aggregates without it.
    """
    carrying = [r for r in replies if name in r.content[keys.REC_METRICS]]
    if carrying and len(carrying) < len(replies):
        for reply in carrying:
            del reply.content[keys.REC_METRICS][name]


def _release_noise(info: ConfigRecord | None) -> float:
    """The σ of an evaluation's noisy release as its reply states it; 0 for an exact one (or
    a reply that states no mode: its histograms must then be exact counts).

    Raises
    ------
    ValueError
        A noisy evaluation that does not state a positive finite σ.
    """
    if info is None or info.get(keys.S_EVALUATION) != keys.EVAL_DP:
        return 0.0
    sigma = info.get(keys.S_NOISE_MULTIPLIER)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError("a noisy evaluation that does not state its noise multiplier")
    if not (math.isfinite(float(sigma)) and float(sigma) > 0):
        raise ValueError(f"a noisy evaluation with noise multiplier {sigma!r}")
    return float(sigma)


def _evaluation_report(
    info: ConfigRecord | None,
) -> tuple[EvaluationMode | None, float | None, float | None, float | None]:
    """What an evaluation reply states about its release: the evaluation mode, ε, the run's
    ε and δ (``None`` each where it did not say). A private evaluation is charged too, so the
    recorder keeps the later ε (:meth:`~fedcare.server.recorder.RunRecorder.evaluated`);
    values that are not finite non-negative numbers (δ: not in (0, 1)) are left out (the
    train reply's checks name a bad site)."""
    if info is None:
        return None, None, None, None
    mode = info.get(keys.S_EVALUATION)
    evaluation = _evaluation_mode(mode) if isinstance(mode, str) else None

    def epsilon(wire: str) -> float | None:
        value = info.get(wire)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value) if math.isfinite(float(value)) and value >= 0 else None

    delta = info.get(keys.S_DELTA)
    valid_delta = delta if isinstance(delta, float) and 0 < delta < 1 else None
    return evaluation, epsilon(keys.S_EPSILON), epsilon(keys.S_RUN_EPSILON), valid_delta
