"""The coordinating server's audit log: what it sent, received, rejected and aggregated.

The log is ``<run-dir>/audit/server.jsonl`` (writer ``"server"``; format:
:mod:`fedcare.common.audit`), signed with the key the run config's ``audit-key`` names (default
``<run-dir>/audit/server-key.pem``, created with mode 0600; in a deployment keep it outside
the run directory, readable only by the server). The ``audit`` folder is mode 0700 and the
log 0600, whatever the umask (:mod:`fedcare.common.files`). A resumed run appends to the same log.
Entries (round numbers are the run's absolute rounds; every entry carries the run id):

``run-start`` / ``run-resume``
    ``code_sha256``, ``config_sha256`` and ``config`` (the resolved run config),
    ``versions``, ``model``, ``task``, ``strategy``, ``rounds_planned``; ``model_sha256``
    (the initial model, or the checkpoint's); ``run-resume`` adds ``after_round``.
``round-start``
    ``round``, ``model_sha256`` (the global model sent for training). Every message to the
    sites carries the log's head and key fingerprint, and the sites log both.
``update`` / ``rejected``
    ``round``, ``site_id``, ``node_id``, ``sha256`` (the update as received), ``norm``
    (its distance from the global model; ``rejected`` has ``reason`` instead, and ``sha256``
    null when the arrays were unreadable), ``num_examples``, ``site`` (what the site
    reported: ``dp``, ``epsilon``, ``delta``, ``accountant``, ``noise_multiplier``,
    ``sample_rate``, ``steps``, ``replayed``, ``key_fingerprint``, ``audit_head``).
``refused`` / ``failed`` / ``diverged`` / ``dropped`` / ``round-skipped`` / ``evaluate-failed``
    ``round``, ``site_id`` (``"*"`` for the whole round), ``reason``.
``aggregate``
    ``round``, ``model_sha256`` (the new global model; the old one when the round was
    skipped), ``updates`` (how many were aggregated).
``run-end``
    ``rounds_completed``, ``model_sha256`` (the final model).
``recovery`` (written by :mod:`fedcare.common.audit` itself, run id null)
    ``offset``, ``length``, ``sha256``: an incomplete last line (a crash or a full disk in
    mid-write) that the next append cut; so a resumed run appends to a log that verifies.

Every kind and its fields are declared in :mod:`fedcare.common.audit_kinds`
(:data:`~fedcare.common.audit_kinds.SERVER_ENTRIES`); each entry is checked against it.

A write that fails (a full disk) leaves the log at its last whole entry and stops the run
with an :class:`~fedcare.common.audit.AuditLogError` naming the file and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord

from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import (
    AuditLog,
    LogHead,
    config_hash,
    hash_arrays,
    load_or_create_signing_key,
    private_audit_dir,
    running_code_hash,
    versions,
)
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import unpack_record
from fedcare.common.run_files import SERVER_AUDIT_KEY, SERVER_AUDIT_LOG

__all__ = [
    "SERVER_WRITER",
    "SERVER_LOG",
    "SERVER_KEY",
    "MAX_REASON",
    "ServerAudit",
    "server_log_path",
    "server_key_path",
    "record_sha256",
    "site_report",
]

SERVER_WRITER = kinds.SERVER_WRITER
SERVER_LOG = SERVER_AUDIT_LOG
SERVER_KEY = SERVER_AUDIT_KEY
MAX_REASON = 1000

_REPORT_KEYS: tuple[tuple[str, str, type], ...] = (
    (keys.S_DP, "dp", bool),
    (keys.S_EPSILON, "epsilon", float),
    (keys.S_DELTA, "delta", float),
    (keys.S_ACCOUNTANT, "accountant", str),
    (keys.S_NOISE_MULTIPLIER, "noise_multiplier", float),
    (keys.S_SAMPLE_RATE, "sample_rate", float),
    (keys.S_STEPS, "steps", int),
    (keys.S_REPLAYED, "replayed", bool),
    (keys.S_RUN_EPSILON, "run_epsilon", float),
    (keys.S_NOISE, "noise", str),
    (keys.S_EVALUATION, "evaluation", str),
    (keys.S_AUDIT_KEY, "key_fingerprint", str),
    (keys.S_AUDIT_HEAD, "audit_head", str),
)


def server_log_path(run_dir: Path) -> Path:
    """``<run_dir>/audit/server.jsonl``."""
    return Path(run_dir) / SERVER_LOG


def server_key_path(run_dir: Path, cfg: FederationConfig) -> Path:
    """The run config's ``audit-key``, else ``<run_dir>/audit/server-key.pem``."""
    return Path(cfg.audit_key) if cfg.audit_key else Path(run_dir) / SERVER_KEY


def record_sha256(arrays: ArrayRecord) -> str:
    """:func:`~fedcare.common.audit.hash_arrays` of a Flower ``ArrayRecord``."""
    return hash_arrays(unpack_record(arrays))


#: Characters kept of any text value a site reports about itself.
_MAX_REPORTED = 256


def site_report(info: ConfigRecord | None) -> dict[str, Any]:
    """What a site reported about itself in its reply's ``site`` record, typed and renamed.

    Only the known keys are kept; a value of the wrong type is kept as its string.
    """
    out: dict[str, Any] = {}
    if info is None:
        return out
    for wire, name, kind in _REPORT_KEYS:
        if wire not in info:
            continue
        value = info[wire]
        if kind is bool:
            out[name] = value if isinstance(value, bool) else str(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = kind(value)
        else:
            out[name] = str(value)[:_MAX_REPORTED]  # a site's text, bounded before it is logged
    return out


class ServerAudit:
    """Writes the server's audit entries for one run (see the module docstring).

    Parameters
    ----------
    log:
        The server's audit log.
    run_id:
        The run every entry belongs to.
    """

    def __init__(self, log: AuditLog, *, run_id: str) -> None:
        self.log = log
        self.run_id = run_id
        self._head: LogHead | None = log.head()

    @classmethod
    def open(
        cls,
        run_dir: Path,
        cfg: FederationConfig,
        *,
        run_id: str,
        clock: Callable[[], datetime] | None = None,
    ) -> ServerAudit:
        """The run's audit log, its key loaded (or created) from the run config's path.

        The log's folder (``<run_dir>/audit``) is made private (mode 0700) first.
        """
        private_audit_dir(server_log_path(run_dir).parent)
        key = load_or_create_signing_key(server_key_path(run_dir, cfg))
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        log = AuditLog(server_log_path(run_dir), writer=SERVER_WRITER, key=key, **extra)
        return cls(log, run_id=run_id)

    @property
    def key_fingerprint(self) -> str:
        """SHA-256 of the server's audit public key (sent to the sites, which log it)."""
        return self.log.key_fingerprint

    @property
    def head(self) -> str:
        """``"<seq>:<sha256>"`` of the last entry written ("" before the first)."""
        return "" if self._head is None else str(self._head)

    def _append(self, kind: str, data: Mapping[str, Any]) -> None:
        kinds.SERVER_ENTRIES.check(kind, data)
        head = self.log.append(kind, data, run_id=self.run_id)
        if head is not None:
            self._head = head

    def _start_data(
        self, cfg: FederationConfig, *, model: str, model_sha256: str
    ) -> dict[str, Any]:
        config = cfg.to_run_config()
        return {
            "code_sha256": running_code_hash(),
            "config_sha256": config_hash(config),
            "config": config,
            "versions": versions(),
            "model": model,
            "task": cfg.task,
            "strategy": cfg.strategy,
            "rounds_planned": cfg.num_server_rounds,
            "model_sha256": model_sha256,
        }

    # ------------------------------------------------------------------ entries

    def run_start(self, cfg: FederationConfig, *, model: str, model_sha256: str) -> None:
        data = self._start_data(cfg, model=model, model_sha256=model_sha256)
        self._append(kinds.RUN_START, data)

    def run_resume(
        self, cfg: FederationConfig, *, model: str, model_sha256: str, after_round: int
    ) -> None:
        data = self._start_data(cfg, model=model, model_sha256=model_sha256)
        self._append(kinds.RUN_RESUME, {**data, "after_round": after_round})

    def round_start(self, rnd: int, *, model_sha256: str) -> None:
        self._append(kinds.ROUND_START, {"round": rnd, "model_sha256": model_sha256})

    def update(
        self,
        rnd: int,
        *,
        site_id: str,
        node_id: int,
        sha256: str,
        norm: float,
        num_examples: int,
        info: ConfigRecord | None,
    ) -> None:
        """An update that passed validation and goes to aggregation."""
        self._append(
            kinds.UPDATE,
            {
                "round": rnd,
                "site_id": site_id,
                "node_id": str(node_id),
                "sha256": sha256,
                "norm": float(norm),
                "num_examples": int(num_examples),
                "site": site_report(info),
            },
        )

    def rejected(
        self,
        rnd: int,
        *,
        site_id: str,
        node_id: int,
        sha256: str | None,
        reason: str,
        info: ConfigRecord | None,
    ) -> None:
        """An update that failed validation (it is not aggregated)."""
        self._append(
            kinds.REJECTED,
            {
                "round": rnd,
                "site_id": site_id,
                "node_id": str(node_id),
                "sha256": sha256,
                "reason": reason[:MAX_REASON],
                "site": site_report(info),
            },
        )

    def event(self, rnd: int, *, kind: str, site_id: str, reason: str) -> None:
        """A refusal, failure, drop-out, skipped round or failed evaluation: one of
        :data:`fedcare.common.audit_kinds.SERVER_EVENT_KINDS`."""
        if kind not in kinds.SERVER_EVENT_KINDS:
            raise ValueError(f"{kind!r} is not a server event kind ({kinds.SERVER_EVENT_KINDS})")
        self._append(kind, {"round": rnd, "site_id": site_id, "reason": reason[:MAX_REASON]})

    def aggregate(self, rnd: int, *, model_sha256: str, updates: int) -> None:
        data = {"round": rnd, "model_sha256": model_sha256, "updates": updates}
        self._append(kinds.AGGREGATE, data)

    def run_end(self, *, rounds_completed: int, model_sha256: str) -> None:
        data = {"rounds_completed": rounds_completed, "model_sha256": model_sha256}
        self._append(kinds.RUN_END, data)

    def secagg(self, rnd: int, *, data: Mapping[str, Any]) -> None:
        """A secure-aggregation round: the sites that answered each stage, the outcome
        (``server/secagg.py``)."""
        self._append(kinds.SECAGG, {"round": rnd, **data})
