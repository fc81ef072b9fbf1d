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
* after every round the global model, the run record and the server optimizer's state
  (FedAdam's and FedYogi's moments; ``server/strategies.py``) are checkpointed atomically,
  in one file, and a progress line is appended to ``progress.jsonl``;
* with a :class:`~fedcare.server.audit.ServerAudit`, each of these events also becomes a signed
  entry of the server's audit log (model hashes sent and aggregated, each update's hash,
  norm and the site's privacy report, refusals, rejections, drop-outs), and every message
  to the sites carries the log's head.

The run record is plain JSON-ready data (see :func:`new_record`), the source of the run's
``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedcare.common import keys
from fedcare.common.audit import hash_arrays
from fedcare.common.errors import UpdateRejected
from fedcare.common.federation import FederationConfig
from fedcare.models.evaluation import (
    SplitSums,
    metrics_from_release,
    releases_from_wire,
    threshold_from_release,
)
from fedcare.server.audit import ServerAudit, record_sha256
from fedcare.server.checkpoint import Checkpoint, save_checkpoint
from fedcare.server.strategies import optimizer_state
from fedcare.server.validation import validate_update

__all__ = ["GuardedStrategy", "new_record", "arrays_to_numpy"]

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
_AUDITED_EVENTS = frozenset(
    {"refused", "failed", "diverged", "dropped", "round-skipped", "evaluate-failed"}
)
#: A site's error reply after its charge: a failure or a divergence, not a refusal.
_STATUS_OF_CODE = {keys.ERR_FAILED: "failed", keys.ERR_DIVERGED: "diverged"}


def new_record() -> dict[str, Any]:
    """An empty run record: sites, rounds, events."""
    return {"sites": {}, "rounds": [], "events": [], "nodes": {}}


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord (copies)."""
    return {name: np.array(arr.numpy()) for name, arr in arrays.items()}


def with_model_dtypes(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` with every array in the dtype of the model the round sent.

    Flower's FedAdam/FedYogi/FedAdagrad multiply by a NumPy float64 scalar, which under
    NumPy 2 turns a float32 model into float64; the sites then train float32 weights, and
    every update of the next round would be rejected as the wrong dtype. The model's dtypes
    are the round's reference, so the aggregate is cast back to them (a no-op for FedAvg).
    """
    current = arrays_to_numpy(arrays)
    if all(name in reference and current[name].dtype == reference[name].dtype for name in current):
        return arrays
    cast = {
        name: value.astype(reference[name].dtype) if name in reference else value
        for name, value in current.items()
    }
    return ArrayRecord({name: Array(value) for name, value in cast.items()})


class GuardedStrategy(Strategy):
    """Wraps ``strategy``; see the module docstring.

    Parameters
    ----------
    strategy:
        The aggregation strategy (FedAvg, FedProx, ..., possibly DP-wrapped).
    cfg:
        The run's configuration.
    run_dir:
        Where checkpoints and progress go.
    run_id:
        The run's id (sites key their ledger charges on it).
    round_offset:
        Rounds completed before this start (resume); round ``r`` of Flower's loop is round
        ``round_offset + r`` of the run.
    record:
        The run record to extend (a checkpoint's, when resuming).
    schema_fingerprint:
        The federation's feature-schema fingerprint, sent to every site.
    schema_json:
        The federation's feature schema itself (JSON; no patient data), sent with it so a
        site whose schema differs can say which features differ.
    audit:
        The server's audit log for this run (none: no audit entries).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        cfg: FederationConfig,
        run_dir: Path,
        run_id: str,
        round_offset: int = 0,
        record: dict[str, Any] | None = None,
        schema_fingerprint: str = "",
        schema_json: str = "",
        audit: ServerAudit | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_id
        self.round_offset = round_offset
        self.record = record if record is not None else new_record()
        self.schema_fingerprint = schema_fingerprint
        self.schema_json = schema_json
        self.audit = audit
        self._reference: dict[str, np.ndarray] = {}
        self._expected: set[int] = set()
        self._skip_evaluation = False
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ helpers

    def absolute(self, server_round: int) -> int:
        return self.round_offset + server_round

    def _site_of(self, node_id: int) -> str:
        return self.record["nodes"].get(str(node_id), f"node-{node_id}")

    def _event(self, server_round: int, site_id: str, kind: str, detail: str) -> None:
        event = {
            "round": self.absolute(server_round),
            "site_id": site_id,
            "kind": kind,
            "detail": detail,
        }
        self.record["events"].append(event)
        log.warning("round %s: site %s %s: %s", event["round"], site_id, kind, detail)
        if self.audit is not None and kind in _AUDITED_EVENTS:
            rnd = self.absolute(server_round)
            self.audit.event(rnd, kind=kind, site_id=site_id, reason=detail)

    def _site(self, site_id: str) -> dict[str, Any]:
        return self.record["sites"].setdefault(
            site_id,
            {
                "site_id": site_id,
                "n_train": 0,
                "n_test": 0,
                "status": "completed",
                "reason": None,
                "rounds_participated": [],
                "privacy": {
                    "enabled": self.cfg.dp,
                    "epsilon": None,
                    "run_epsilon": None,
                    "delta": None,
                    "accountant": self.cfg.accountant if self.cfg.dp else None,
                    "noise": None,
                    "evaluation": None,
                    "mechanisms": [],
                },
                "metrics": {},
                "personal_metrics": {},
            },
        )

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
        if self.audit is not None:
            self.audit.round_start(
                self.absolute(server_round), model_sha256=hash_arrays(self._reference)
            )
        messages = list(
            self.strategy.configure_train(
                self.absolute(server_round), arrays, self._with_round(config, server_round), grid
            )
        )
        self._expected = {m.metadata.dst_node_id for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
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
            if reply.has_error():
                text, epsilon, delta = keys.ledger_epsilon(reply.error.reason or "")
                site_id, reason = _split_reason(text, self._site_of(node))
                self.record["nodes"][str(node)] = site_id
                site = self._site(site_id)
                status = _STATUS_OF_CODE.get(int(reply.error.code), "refused")
                site["status"], site["reason"] = status, reason
                if epsilon is not None and self.cfg.dp:  # the site's ledger, as it reports
                    site["privacy"].update({"enabled": True, "epsilon": epsilon, "delta": delta})
                self._event(server_round, site_id, status, reason)
                continue
            info = reply.content.config_records.get(keys.REC_SITE)
            site_id = _reported_site_id(info, self._site_of(node))
            self.record["nodes"][str(node)] = site_id
            site = self._site(site_id)
            sha256: str | None = None
            try:
                update = arrays_to_numpy(reply.content.array_records[keys.REC_ARRAYS])
                sha256 = hash_arrays(update)
                norm = validate_update(update, self._reference, max_norm=self.cfg.max_update_norm)
                report = _train_report(reply.content[keys.REC_METRICS], info)
            except UpdateRejected as e:
                self._reject(server_round, site, node, sha256, str(e), info)
                continue
            except (KeyError, TypeError, ValueError) as e:
                detail = f"malformed reply ({type(e).__name__}: {str(e)[:200]})"
                self._reject(server_round, site, node, sha256, detail, info)
                continue
            kept.append(reply)
            self._record_train(server_round, site, report, norm)
            if self.audit is not None and sha256 is not None:
                self.audit.update(
                    self.absolute(server_round),
                    site_id=site_id,
                    node_id=node,
                    sha256=sha256,
                    norm=norm,
                    num_examples=report["num_examples"],
                    info=info,
                )
        for node in sorted(self._expected - answered):
            site_id = self._site_of(node)
            site = self._site(site_id)
            site["status"], site["reason"] = (
                "dropped",
                f"went offline: {lost[node]}"
                if node in lost
                else f"no reply within round-timeout={self.cfg.round_timeout:g} s",
            )
            self._event(server_round, site_id, "dropped", site["reason"])
        if len(kept) < self.cfg.min_sites:
            self._event(
                server_round,
                "*",
                "round-skipped",
                f"only {len(kept)} valid update(s), fewer than min-sites={self.cfg.min_sites}; "
                "the global model is unchanged",
            )
            self._audit_aggregate(server_round, None, 0)
            return None, None
        _drop_partial_metric(kept, keys.M_TRAIN_LOSS)
        arrays, metrics = self.strategy.aggregate_train(self.absolute(server_round), kept)
        if arrays is not None:
            arrays = with_model_dtypes(arrays, self._reference)
        self._audit_aggregate(server_round, arrays, len(kept) if arrays is not None else 0)
        return arrays, metrics

    def _reject(
        self,
        server_round: int,
        site: dict[str, Any],
        node: int,
        sha256: str | None,
        detail: str,
        info: ConfigRecord | None,
    ) -> None:
        site["status"], site["reason"] = "rejected", detail
        self._event(server_round, site["site_id"], "rejected", detail)
        if self.audit is not None:
            self.audit.rejected(
                self.absolute(server_round),
                site_id=site["site_id"],
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

    def _record_train(
        self,
        server_round: int,
        site: dict[str, Any],
        report: dict[str, Any],
        norm: float,
    ) -> None:
        rnd = self.absolute(server_round)
        site["n_train"] = report["num_examples"]
        if rnd not in site["rounds_participated"]:
            site["rounds_participated"].append(rnd)
        if site["status"] != "refused":
            site["status"], site["reason"] = "completed", None
        entry = self._round_entry(rnd)
        numbers = {"update-norm": norm, "num-examples": report["num_examples"]}
        if report["train_loss"] is not None:
            numbers["train-loss"] = report["train_loss"]
        entry["sites"].setdefault(site["site_id"], {}).update(numbers)
        privacy = site["privacy"]
        if report["evaluation"] is not None:
            privacy["evaluation"] = report["evaluation"]
        if report["dp"]:
            privacy["enabled"] = True
            privacy["epsilon"] = report["epsilon"]
            privacy["run_epsilon"] = report["run_epsilon"]
            privacy["delta"] = report["delta"]
            privacy["accountant"] = report["accountant"]
            privacy["noise"] = report["noise"]
            mechanism = {
                "round": rnd,
                "noise_multiplier": report["noise_multiplier"],
                "sample_rate": report["sample_rate"],
                "steps": report["steps"],
            }
            if all(m["round"] != rnd for m in privacy["mechanisms"]):
                privacy["mechanisms"].append(mechanism)
            entry["sites"][site["site_id"]]["epsilon"] = privacy["epsilon"]
            if privacy["run_epsilon"] is not None:
                entry["sites"][site["site_id"]]["run-epsilon"] = privacy["run_epsilon"]

    def _round_entry(self, rnd: int) -> dict[str, Any]:
        for entry in self.record["rounds"]:
            if entry["round"] == rnd:
                return entry
        entry = {"round": rnd, "metrics": {}, "sites": {}}
        self.record["rounds"].append(entry)
        return entry

    # ------------------------------------------------------------------ evaluate

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.absolute(server_round)
        if rnd % self.cfg.evaluate_every and rnd != self.cfg.num_server_rounds:
            self._skip_evaluation = True
            return []  # evaluate-every: no evaluation message this round
        self._skip_evaluation = False
        return self.strategy.configure_evaluate(
            rnd, arrays, self._with_round(config, server_round), grid
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self.absolute(server_round)
        entry = self._round_entry(rnd)
        if self._skip_evaluation:
            self._skip_evaluation = False
            return None
        per_site: dict[str, dict[str, float]] = {}
        releases: dict[str, dict[str, SplitSums]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                text, _, _ = keys.ledger_epsilon(reply.error.reason or "")
                site_id, reason = _split_reason(text, self._site_of(node))
                self._event(server_round, site_id, "evaluate-failed", reason)
                continue
            info = reply.content.config_records.get(keys.REC_SITE)
            site_id = _reported_site_id(info, self._site_of(node))
            try:
                metrics = reply.content[keys.REC_METRICS]
                if not isinstance(metrics, MetricRecord):
                    raise TypeError("the reply has no metrics record")
                releases[site_id] = releases_from_wire(metrics)
            except (KeyError, TypeError, ValueError) as e:
                detail = f"malformed reply ({type(e).__name__}: {str(e)[:200]})"
                self._event(server_round, site_id, "evaluate-failed", detail)
                continue
            values = {  # the site's own metrics; its release's sums only feed the global ones
                k: float(v)
                for k, v in metrics.items()
                if keys.is_allowed_metric(k)
                and not keys.is_release_metric(k)
                and k != keys.M_NUM_EXAMPLES
                and isinstance(v, (int, float))
                and math.isfinite(float(v))
            }
            # A site's personalized model (client/personal/) is its own: reported per site,
            # never pooled into the global metrics.
            personal = _personal_metrics(values)
            values = {k: v for k, v in values.items() if not keys.is_personal_metric(k)}
            per_site[site_id] = values
            site = self._site(site_id)
            site["metrics"] = values
            if personal:
                site["personal_metrics"] = personal
                entry.setdefault("personal", {})[site_id] = personal
            _record_evaluation_privacy(site["privacy"], info)
            if "test.n" in values:
                site["n_test"] = int(values["test.n"])
            entry["sites"].setdefault(site_id, {}).update(values)
        global_metrics = global_evaluate_metrics(per_site, releases)
        entry["metrics"] = global_metrics
        return MetricRecord(dict(global_metrics)) if global_metrics else None

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Federated evaluation of the starting model, recorded as round 0."""
        messages = self.strategy.configure_evaluate(
            0, arrays, self._with_round(ConfigRecord(), 0), grid
        )
        replies = grid.send_and_receive(messages=messages, timeout=self.cfg.round_timeout)
        self.aggregate_evaluate(0, replies)

    # ------------------------------------------------------------------ after each round

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """``evaluate_fn`` hook: checkpoint and report progress (round 0 = start)."""
        rnd = self.absolute(server_round)
        if server_round == 0 and self.round_offset > 0:
            return None
        save_checkpoint(
            self.run_dir,
            Checkpoint(
                run_id=self.run_id,
                round=rnd,
                arrays=arrays_to_numpy(arrays),
                record=self.record,
                optimizer=optimizer_state(self.strategy),
            ),
        )
        progress: dict[str, Any] = {
            "round": rnd,
            "of": self.cfg.num_server_rounds,
            "elapsed_s": round(time.monotonic() - self._t0, 2),
            "metrics": next((e["metrics"] for e in self.record["rounds"] if e["round"] == rnd), {}),
            "events": [e for e in self.record["events"] if e["round"] == rnd],
        }
        with open(self.run_dir / "progress.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(progress) + "\n")
        return None

    def summary(self) -> None:
        self.strategy.summary()


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


def _train_report(metrics: Any, info: ConfigRecord | None) -> dict[str, Any]:
    """The numbers a training reply reports, checked before the update is accepted."""
    if not isinstance(metrics, MetricRecord):
        raise TypeError("the reply has no metrics record")
    report: dict[str, Any] = {
        "num_examples": _number(metrics, keys.M_NUM_EXAMPLES, int),
        # A site sends its training loss only where its evaluation is exact (a statistic of
        # its patients under weights the server chose): absent is normal, malformed is not.
        "train_loss": (
            _number(metrics, keys.M_TRAIN_LOSS, float) if keys.M_TRAIN_LOSS in metrics else None
        ),
        "dp": False,
        "evaluation": _choice(info, keys.S_EVALUATION, (keys.EVAL_DP, keys.EVAL_EXACT)),
    }
    if info is not None and info.get(keys.S_DP) is True:
        report["dp"] = True
        accountant = info[keys.S_ACCOUNTANT]
        if not isinstance(accountant, str) or len(accountant) > 32:
            raise TypeError("the site's accountant is not a short name")
        delta = _number(info, keys.S_DELTA, float)
        if not 0 < delta < 1:
            raise ValueError(f"{keys.S_DELTA} = {delta} is not in (0, 1)")
        report.update(
            {
                "epsilon": _epsilon(info, keys.S_EPSILON),
                "run_epsilon": (
                    _epsilon(info, keys.S_RUN_EPSILON) if keys.S_RUN_EPSILON in info else None
                ),
                "delta": delta,
                "accountant": accountant,
                "noise": _choice(
                    info, keys.S_NOISE, (keys.NOISE_OS_ENTROPY, keys.NOISE_REPRODUCIBLE)
                ),
                "noise_multiplier": _number(info, keys.S_NOISE_MULTIPLIER, float),
                "sample_rate": _number(info, keys.S_SAMPLE_RATE, float),
                "steps": _number(info, keys.S_STEPS, int),
            }
        )
    return report


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


def _reported_site_id(info: ConfigRecord | None, fallback: str) -> str:
    """The site id a reply reports, or ``fallback`` (``node-<id>``) when it is not a valid one.

    A reply's site record is the site's word; a malformed id must not reach the audit log.
    """
    if info is None or keys.S_SITE_ID not in info:
        return fallback
    value = info[keys.S_SITE_ID]
    if isinstance(value, str) and _SITE_ID.fullmatch(value):
        return value
    return fallback


def _split_reason(reason: str, fallback: str) -> tuple[str, str]:
    """Sites prefix an error reason with ``<site-id>: ``."""
    head, sep, rest = reason.partition(": ")
    if sep and _SITE_ID.fullmatch(head):
        return head, rest[:_MAX_REASON]
    return fallback, reason[:_MAX_REASON]


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


def _record_evaluation_privacy(privacy: dict[str, Any], info: ConfigRecord | None) -> None:
    """A private evaluation is charged too: keep the site's ε as its evaluation reply states
    it (the later of training's and evaluation's, both cumulative); values that are not
    finite non-negative numbers are ignored (the train reply's checks name a bad site)."""
    if info is None:
        return
    mode = info.get(keys.S_EVALUATION)
    if isinstance(mode, str) and mode in (keys.EVAL_DP, keys.EVAL_EXACT):
        privacy["evaluation"] = mode
    for wire, name in ((keys.S_EPSILON, "epsilon"), (keys.S_RUN_EPSILON, "run_epsilon")):
        value = info.get(wire)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)) and value >= 0:
            previous = privacy.get(name)
            privacy[name] = max(float(value), float(previous or 0.0))
    delta = info.get(keys.S_DELTA)
    unset = privacy.get("epsilon") is not None and privacy.get("delta") is None
    if unset and isinstance(delta, float) and 0 < delta < 1:
        privacy["delta"] = delta
