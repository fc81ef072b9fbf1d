"""A site's own audit log: what the site did with its data in every round, signed by it.

The log is ``<state dir>/audit.jsonl`` (the state dir holds the privacy ledger: see
:func:`site_state_dir`), signed with the site's Ed25519 key ``<state dir>/audit-key.pem``
(created on first use; its fingerprint goes to the server in every reply, which logs it).
The state dir is private to the site's user (mode 0700, tightened if it was wider), the log
and key files mode 0600, whatever the umask (:mod:`fedcare.common.files`). Entries (format:
:mod:`fedcare.common.audit`), all with the run id:

``run-start`` (once per run id, server key, config and dataset)
    ``code_sha256``, ``config_sha256`` (the resolved run config), ``dataset_fingerprint``
    (the privacy ledger's key for the dataset), ``server_key``, ``versions``.
``train``
    ``round``, ``dataset_fingerprint``, ``received_sha256`` (the global model that came in),
    ``sent_sha256`` (the update that leaves), ``num_examples``, ``steps``, ``dp``,
    ``mechanism`` (``noise_multiplier``, ``sample_rate``, ``steps``, or null), ``epsilon``
    and ``delta`` (the dataset's cumulative ε after this round, as the ledger charged it),
    ``accountant``, ``replayed`` (an earlier release sent again, charged nothing), and
    ``server_head`` / ``server_key`` (the head of the server's audit log and its key
    fingerprint, as the request carried them: they tie the entry to one server log).
``evaluate``
    ``round``, ``dataset_fingerprint``, ``received_sha256``, ``evaluation`` (``dp`` or
    ``exact``), ``mechanism`` (the Gaussian release charged, or null; ``steps``: one release
    of the splits, one per group attribute of the task (:mod:`fedcare.models.fairness`), one
    more when the site's personalized model was released too), ``epsilon`` and ``delta``
    (the dataset's cumulative ε after it), ``accountant``, ``replayed``, ``personal`` (whether the
    personalized model's metrics were released), ``server_head``, ``server_key``.
``personalize`` (before the final ``evaluate`` of a run with ``personalization =
"finetune"``)
    ``round``, ``dataset_fingerprint``, ``received_sha256`` (the global model fine-tuned),
    ``mechanism`` (the fine-tune's DP-SGD charge, or null without DP), ``epsilon``,
    ``delta``, ``run_epsilon``, ``accountant``, ``replayed`` (the fine-tune had already run:
    nothing charged again), ``server_head``, ``server_key``.

``dataset_fingerprint`` is the privacy ledger's key for the site's cohort
(:meth:`fedcare.client.ledger.PrivacyLedger.cohort_key`). ``train`` entries also carry ``noise``
(``os-entropy``, or ``reproducible`` where a simulated site's own ``site.toml`` asked for it)
and ``run_epsilon`` (what this run has added).
``refused``
    ``round``, ``phase`` (train/evaluate), ``code``, ``reason``, ``received_sha256``,
    ``server_head``, ``server_key``.

``recovery`` (written by :mod:`fedcare.common.audit` itself, run id null)
    ``offset``, ``length``, ``sha256`` of an incomplete last line (a crash or a full disk in
    mid-write) that the next append cut.

Every kind and its fields are declared in :mod:`fedcare.common.audit_kinds`
(:data:`~fedcare.common.audit_kinds.SITE_ENTRIES`); each entry is checked against it.

A ``train`` entry is written after training and before the update leaves: an update that
cannot be logged is withheld (the round becomes a refusal, whose reason names the log, the
cause and the fix); its ledger charge, written before training, stays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message

from fedcare.client.accounting import Mechanism
from fedcare.client.data.site import SiteData
from fedcare.client.local import EvaluationResult, PersonalizeResult, RoundResult, SiteTrainer
from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import (
    AuditLog,
    LogHead,
    config_hash,
    hash_arrays,
    load_or_create_signing_key,
    private_audit_dir,
    read_entries,
    running_code_hash,
    versions,
)
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import unpack_record
from fedcare.common.run_files import SITE_AUDIT_KEY, SITE_AUDIT_LOG, SITE_STATE_DIR

__all__ = [
    "AUDIT_LOG_NAME",
    "AUDIT_KEY_NAME",
    "CHARGED_ENTRY_KINDS",
    "MAX_REASON",
    "SiteAudit",
    "site_state_dir",
    "open_site_audit",
    "audited_charges",
    "record_sha256",
]

AUDIT_LOG_NAME = SITE_AUDIT_LOG
#: The entry kinds that record a ledger charge (when they carry a mechanism, not replayed).
CHARGED_ENTRY_KINDS = kinds.SITE_CHARGED_KINDS
AUDIT_KEY_NAME = SITE_AUDIT_KEY
MAX_REASON = 1000


def site_state_dir(cfg: FederationConfig, site: SiteData) -> Path:
    """Where a site keeps its durable state (ledger, releases, audit log and key).

    ``<state-root>/<site-id>`` when the run config sets ``state-root``, else
    ``<site folder>/.fedcare``. Create it with :func:`fedcare.common.files.private_dir` (mode 0700).
    """
    if cfg.state_root:
        return Path(cfg.state_root) / site.spec.site_id
    return site.root / SITE_STATE_DIR


def record_sha256(arrays: ArrayRecord) -> str:
    """:func:`~fedcare.common.audit.hash_arrays` of a Flower ``ArrayRecord`` (as sent or
    received)."""
    try:
        named = unpack_record(arrays)
    except Exception:  # noqa: BLE001 - malformed bytes are refused by the ClientApp, named
        # The audit entry of that refusal still records what arrived: the SHA-256 of the
        # raw serialized arrays (names and bytes), which needs no parsing.
        digest = hashlib.sha256(b"fedcare-raw-arrays-v1\n")
        for name in sorted(arrays):
            digest.update(name.encode("utf-8", "replace") + b"\0" + bytes(arrays[name].data))
        return digest.hexdigest()
    return hash_arrays(named)


class SiteAudit:
    """Writes one site's audit entries (see the module docstring).

    Parameters
    ----------
    log:
        The site's audit log (writer = site id).
    dataset_fingerprint:
        The fingerprint of the dataset the site trains on.
    """

    def __init__(self, log: AuditLog, *, dataset_fingerprint: str) -> None:
        self.log = log
        self.dataset_fingerprint = dataset_fingerprint

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        site_id: str,
        dataset_fingerprint: str,
        clock: Callable[[], datetime] | None = None,
    ) -> SiteAudit:
        """The audit log in ``state_dir``, its key created there on first use.

        ``state_dir`` is made private (mode 0700) first, created if missing.
        """
        private_audit_dir(Path(state_dir))
        key = load_or_create_signing_key(Path(state_dir) / AUDIT_KEY_NAME)
        extra: dict[str, Any] = {} if clock is None else {"clock": clock}
        log = AuditLog(Path(state_dir) / AUDIT_LOG_NAME, writer=site_id, key=key, **extra)
        return cls(log, dataset_fingerprint=dataset_fingerprint)

    @property
    def key_fingerprint(self) -> str:
        return self.log.key_fingerprint

    # ------------------------------------------------------------------ entries

    def _append(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        run_id: str | None,
        once_per: tuple[str, ...] | None = None,
    ) -> LogHead | None:
        """Append one entry, checked against its declaration (``fedcare.common.audit_kinds``)."""
        kinds.SITE_ENTRIES.check(kind, data)
        return self.log.append(kind, data, run_id=run_id, once_per=once_per)

    def _logged(self, kind: str, data: dict[str, Any], *, run_id: str | None) -> LogHead:
        """:meth:`_append` of an entry that is always written; the log's new head."""
        head = self._append(kind, data, run_id=run_id)
        if head is None:  # AuditLog.append skips an entry only under ``once_per``
            raise AssertionError(f"the audit log did not write a {kind!r} entry")
        return head

    def start_run(self, msg: Message, *, run_config: Mapping[str, Any]) -> None:
        """Log ``run-start`` unless the log holds one for this run id, server key, config and
        dataset; checks the log's tail either way."""
        run_id, _, _, server_key = _tag(msg)
        data = {
            "code_sha256": running_code_hash(),
            "config_sha256": config_hash(run_config),
            "dataset_fingerprint": self.dataset_fingerprint,
            "server_key": server_key,
            "versions": versions(),
        }
        once = ("server_key", "config_sha256", "dataset_fingerprint")
        self._append(kinds.RUN_START, data, run_id=run_id, once_per=once)

    def train(
        self, msg: Message, result: RoundResult, *, sent_sha256: str, accountant: str
    ) -> LogHead:
        """Log a completed (or replayed) training round; returns the log's new head."""
        run_id, rnd, server_head, server_key = _tag(msg)
        mechanism = result.mechanism
        data = {
            "round": rnd,
            "dataset_fingerprint": self.dataset_fingerprint,
            "received_sha256": _received(msg),
            "sent_sha256": sent_sha256,
            "num_examples": int(result.n_train),
            "steps": int(result.steps),
            "dp": mechanism is not None,
            "mechanism": _mechanism_record(mechanism),
            "epsilon": None if result.epsilon is None else float(result.epsilon),
            "delta": None if result.delta is None else float(result.delta),
            "accountant": accountant if mechanism is not None else None,
            "replayed": bool(result.replayed),
            "noise": result.noise,
            "run_epsilon": None if result.run_epsilon is None else float(result.run_epsilon),
            "server_head": server_head,
            "server_key": server_key,
        }
        return self._logged(kinds.TRAIN, data, run_id=run_id)

    def evaluate(
        self,
        msg: Message,
        result: EvaluationResult,
        *,
        delta: float,
        accountant: str,
        round: int | None = None,
    ) -> LogHead:
        """Log an evaluation of the global model received and what its release cost
        (``round``: the round evaluated, where a train message carried the evaluation of the
        round before its own; the message's round by default)."""
        run_id, rnd, server_head, server_key = _tag(msg, round)
        mechanism = result.mechanism
        data = {
            "round": rnd,
            "dataset_fingerprint": self.dataset_fingerprint,
            "received_sha256": _received(msg),
            "evaluation": result.mode,
            "mechanism": _mechanism_record(mechanism),
            "epsilon": None if result.epsilon is None else float(result.epsilon),
            "delta": float(delta) if mechanism is not None else None,
            "accountant": accountant if mechanism is not None else None,
            "replayed": bool(result.replayed),
            "personal": any(keys.is_personal_metric(k) for k in result.metrics),
            "server_head": server_head,
            "server_key": server_key,
        }
        return self._logged(kinds.EVALUATE, data, run_id=run_id)

    def personalize(
        self,
        msg: Message,
        result: PersonalizeResult,
        *,
        delta: float,
        accountant: str,
        round: int | None = None,
    ) -> LogHead:
        """Log the fine-tune of the site's personal model and what it was charged
        (``round``: as :meth:`evaluate`'s)."""
        run_id, rnd, server_head, server_key = _tag(msg, round)
        mechanism = result.mechanism
        data = {
            "round": rnd,
            "dataset_fingerprint": self.dataset_fingerprint,
            "received_sha256": _received(msg),
            "mechanism": _mechanism_record(mechanism),
            "epsilon": None if result.epsilon is None else float(result.epsilon),
            "delta": float(delta) if mechanism is not None else None,
            "run_epsilon": None if result.run_epsilon is None else float(result.run_epsilon),
            "accountant": accountant if mechanism is not None else None,
            "replayed": bool(result.replayed),
            "server_head": server_head,
            "server_key": server_key,
        }
        return self._logged(kinds.PERSONALIZE, data, run_id=run_id)

    def refused(
        self, msg: Message, *, phase: str, code: int, reason: str, round: int | None = None
    ) -> LogHead:
        """Log a refusal and its reason (cut to :data:`MAX_REASON` characters; ``round``: as
        :meth:`evaluate`'s)."""
        run_id, rnd, server_head, server_key = _tag(msg, round)
        data = {
            "round": rnd,
            "phase": phase,
            "code": int(code),
            "reason": reason[:MAX_REASON],
            "received_sha256": _received(msg),
            "server_head": server_head,
            "server_key": server_key,
        }
        return self._logged(kinds.REFUSED, data, run_id=run_id)


def open_site_audit(
    trainer: SiteTrainer, state_dir: Path, msg: Message, *, run_config: Mapping[str, Any]
) -> SiteAudit:
    """The site's audit log in ``state_dir``, with this run's ``run-start`` logged.

    ``state_dir`` is the folder holding the site's ledger (:func:`site_state_dir` in
    simulation); ``run_config`` the resolved run config as the server sent it.
    """
    audit = SiteAudit.open(
        state_dir, site_id=trainer.site_id, dataset_fingerprint=trainer.dataset_key
    )
    audit.start_run(msg, run_config=run_config)
    return audit


def _mechanism_record(mechanism: Mechanism | None) -> dict[str, float | int] | None:
    """A charged mechanism as an audit entry holds it (``None``: nothing was charged)."""
    if mechanism is None:
        return None
    return {
        "noise_multiplier": float(mechanism.noise_multiplier),
        "sample_rate": float(mechanism.sample_rate),
        "steps": int(mechanism.steps),
    }


def audited_charges(state_dir: Path) -> int:
    """How many ledger charges the site's own audit log proves were made: its DP ``train``,
    ``evaluate`` and ``personalize`` entries that were not replays (0 when there is no log
    yet).

    A ledger holding fewer charges than this was replaced, emptied or rolled back: the
    site must refuse to train rather than start again from a smaller ε.
    """
    path = Path(state_dir) / AUDIT_LOG_NAME
    if not path.is_file():
        return 0
    count = 0
    for entry in read_entries(path):
        data = entry["data"]
        if entry["kind"] not in CHARGED_ENTRY_KINDS or data.get("replayed"):
            continue
        if data.get("mechanism") is not None:
            count += 1
    return count


def _tag(msg: Message, round: int | None = None) -> tuple[str | None, int | None, str, str]:
    """(run id, round, server log head, server key fingerprint) a request carries (``round``
    in place of the request's own where given)."""
    config = msg.content.config_records.get(keys.REC_CONFIG)
    if config is None:
        return None, round, "", ""
    run_id = config.get(keys.RC_RUN_ID)
    rnd = config.get(keys.CFG_FEDCARE_ROUND) if round is None else round
    return (
        None if run_id is None else str(run_id),
        None if rnd is None else int(rnd),  # type: ignore[arg-type]
        str(config.get(keys.CFG_AUDIT_HEAD, "")),
        str(config.get(keys.CFG_AUDIT_KEY, "")),
    )


def _received(msg: Message) -> str | None:
    arrays = msg.content.array_records.get(keys.REC_ARRAYS)
    return None if arrays is None else record_sha256(arrays)
