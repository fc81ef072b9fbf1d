"""Every kind of audit-log entry, and the fields its data carries: declared once.

The writers (:mod:`fedcare.common.audit` for the log's own entries,
:mod:`fedcare.server.audit` for the server's, :mod:`fedcare.client.audit` for a site's) and
the readers (``fedcare audit verify``, the ε recomputation, the audit report) spell a kind
only through the constants here. A writer checks each entry's data against its declaration
(:meth:`EntryKinds.check`), so an entry never carries a field a reader does not know of, nor
lacks one it expects.

Two writers share some spellings with different data: ``run-start`` and ``refused`` are
entries of both the server's log and a site's (:data:`SERVER_ENTRIES`, :data:`SITE_ENTRIES`).
The server's refusal, failure, divergence, drop-out, skipped-round and failed-evaluation
entries (:data:`SERVER_EVENT_KINDS`) share their spelling with the run record's event kinds
(:data:`fedcare.common.summary.EVENT_KINDS`), of which they are the audited ones.

Examples
--------
>>> SERVER_ENTRIES[AGGREGATE].fields
('round', 'model_sha256', 'updates')
>>> SERVER_ENTRIES.check(AGGREGATE, {"round": 1, "model_sha256": "ab", "updates": 2})
>>> SERVER_ENTRIES.check(AGGREGATE, {"round": 1})
Traceback (most recent call last):
    ...
ValueError: a server 'aggregate' audit entry lacks model_sha256, updates
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "SERVER_WRITER",
    "LOG_OPEN",
    "RECOVERY",
    "RUN_START",
    "RUN_RESUME",
    "ROUND_START",
    "UPDATE",
    "REJECTED",
    "AGGREGATE",
    "RUN_END",
    "REFUSED",
    "FAILED",
    "DIVERGED",
    "DROPPED",
    "ROUND_SKIPPED",
    "EVALUATE_FAILED",
    "TRAIN",
    "EVALUATE",
    "PERSONALIZE",
    "SECAGG",
    "SERVER_START_KINDS",
    "SERVER_UPDATE_KINDS",
    "SERVER_EVENT_KINDS",
    "SITE_CHARGED_KINDS",
    "MECHANISM_FIELDS",
    "SITE_REPORT_FIELDS",
    "EntrySpec",
    "EntryKinds",
    "LOG_ENTRIES",
    "SERVER_ENTRIES",
    "SITE_ENTRIES",
]

SERVER_WRITER: Final = "server"
"""The ``writer`` of the server's log (a site's log is written by its site id)."""

# ------------------------------------------------------------------ the log's own entries
LOG_OPEN: Final = "log-open"
"""The first entry of every log: the writer's public key."""
RECOVERY: Final = "recovery"
"""An incomplete last line the next append cut (run id null)."""

# ------------------------------------------------------------------ the server's entries
RUN_START: Final = "run-start"
RUN_RESUME: Final = "run-resume"
ROUND_START: Final = "round-start"
UPDATE: Final = "update"
REJECTED: Final = "rejected"
AGGREGATE: Final = "aggregate"
RUN_END: Final = "run-end"
REFUSED: Final = "refused"
FAILED: Final = "failed"
DIVERGED: Final = "diverged"
DROPPED: Final = "dropped"
ROUND_SKIPPED: Final = "round-skipped"
EVALUATE_FAILED: Final = "evaluate-failed"

# ------------------------------------------------------------------ a site's entries
TRAIN: Final = "train"
EVALUATE: Final = "evaluate"
PERSONALIZE: Final = "personalize"
# a site also writes RUN_START and REFUSED, with data of its own (SITE_ENTRIES)
SECAGG: Final = "secagg"
"""A secure-aggregation round (both logs, data of their own): the server's lists the sites
that answered each stage and the outcome; a site's, the survivors and drop-outs it revealed
shares for (server/secagg.py, client/secagg.py)."""

SERVER_START_KINDS: Final = (RUN_START, RUN_RESUME)
"""A start of the run in the server's log (each carries the run config and code hash)."""
SERVER_UPDATE_KINDS: Final = (UPDATE, REJECTED)
"""An update the server received: aggregated, or rejected by its checks."""
SERVER_EVENT_KINDS: Final = (REFUSED, FAILED, DIVERGED, DROPPED, ROUND_SKIPPED, EVALUATE_FAILED)
"""What went wrong with a site (``site_id``) or a round (``site_id`` ``*``), with a reason."""
SITE_CHARGED_KINDS: Final = (TRAIN, EVALUATE, PERSONALIZE)
"""A site's entries that record a ledger charge, when they carry a mechanism and are not
replays."""

MECHANISM_FIELDS: Final = ("noise_multiplier", "sample_rate", "steps")
"""The fields of a charged mechanism (a site entry's ``mechanism``)."""
SITE_REPORT_FIELDS: Final = (
    "dp",
    "epsilon",
    "delta",
    "accountant",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "replayed",
    "run_epsilon",
    "noise",
    "evaluation",
    "key_fingerprint",
    "audit_head",
)
"""What a server ``update`` / ``rejected`` entry's ``site`` holds: what the site reported
about itself (each field only where the site reported it)."""


@dataclass(frozen=True)
class EntrySpec:
    """The data one kind of entry carries.

    Attributes
    ----------
    kind:
        The entry's ``kind``.
    fields:
        The keys of its ``data``, every one always present (a value may be null).
    """

    kind: str
    fields: tuple[str, ...]


@dataclass(frozen=True)
class EntryKinds:
    """The entries one writer writes, by kind.

    Attributes
    ----------
    writer:
        Who writes them (``server``, ``site``, or ``log`` for the log's own entries).
    specs:
        Kind -> its :class:`EntrySpec`.
    """

    writer: str
    specs: Mapping[str, EntrySpec]

    def __getitem__(self, kind: str) -> EntrySpec:
        return self.specs[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self.specs

    def check(self, kind: str, data: Mapping[str, Any]) -> None:
        """Refuse an entry whose kind or fields differ from its declaration.

        Raises
        ------
        ValueError
            ``kind`` is not declared, or ``data`` lacks a declared field or has another
            one: a writer out of step with this module (a bug, never a user's input).
        """
        spec = self.specs.get(kind)
        if spec is None:
            raise ValueError(f"{kind!r} is not a declared {self.writer} audit entry kind")
        missing = [f for f in spec.fields if f not in data]
        extra = sorted(set(data) - set(spec.fields))
        if missing or extra:
            parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has undeclared {', '.join(extra)}"] if extra else []
            )
            raise ValueError(f"a {self.writer} {kind!r} audit entry {' and '.join(parts)}")


def _specs(writer: str, *specs: EntrySpec) -> EntryKinds:
    return EntryKinds(writer, {s.kind: s for s in specs})


_START = (
    "code_sha256",
    "config_sha256",
    "config",
    "versions",
    "model",
    "task",
    "strategy",
    "rounds_planned",
    "model_sha256",
)
_SERVER_EVENT = ("round", "site_id", "reason")
_SITE_TAG = ("server_head", "server_key")

LOG_ENTRIES: Final = _specs(
    "log",
    EntrySpec(LOG_OPEN, ("format", "public_key", "key_fingerprint")),
    EntrySpec(RECOVERY, ("offset", "length", "sha256")),
)
"""The entries :class:`fedcare.common.audit.AuditLog` writes itself, in every log."""

SERVER_ENTRIES: Final = _specs(
    SERVER_WRITER,
    EntrySpec(RUN_START, _START),
    EntrySpec(RUN_RESUME, (*_START, "after_round")),
    EntrySpec(ROUND_START, ("round", "model_sha256")),
    EntrySpec(UPDATE, ("round", "site_id", "node_id", "sha256", "norm", "num_examples", "site")),
    EntrySpec(REJECTED, ("round", "site_id", "node_id", "sha256", "reason", "site")),
    *(EntrySpec(kind, _SERVER_EVENT) for kind in SERVER_EVENT_KINDS),
    EntrySpec(AGGREGATE, ("round", "model_sha256", "updates")),
    EntrySpec(RUN_END, ("rounds_completed", "model_sha256")),
    EntrySpec(
        SECAGG,
        (
            "round",
            "threshold",
            "advertised",
            "shared",
            "masked",
            "unmasked",
            "outcome",
            "bytes",
            "seconds",
        ),
    ),
)
"""The server's entries (``server/audit.py`` describes each field)."""

SITE_ENTRIES: Final = _specs(
    "site",
    EntrySpec(
        RUN_START,
        ("code_sha256", "config_sha256", "dataset_fingerprint", "server_key", "versions"),
    ),
    EntrySpec(
        TRAIN,
        (
            "round",
            "dataset_fingerprint",
            "received_sha256",
            "sent_sha256",
            "num_examples",
            "steps",
            "dp",
            "mechanism",
            "epsilon",
            "delta",
            "accountant",
            "replayed",
            "noise",
            "run_epsilon",
            *_SITE_TAG,
        ),
    ),
    EntrySpec(
        EVALUATE,
        (
            "round",
            "dataset_fingerprint",
            "received_sha256",
            "evaluation",
            "mechanism",
            "epsilon",
            "delta",
            "accountant",
            "replayed",
            "personal",
            *_SITE_TAG,
        ),
    ),
    EntrySpec(
        PERSONALIZE,
        (
            "round",
            "dataset_fingerprint",
            "received_sha256",
            "mechanism",
            "epsilon",
            "delta",
            "run_epsilon",
            "accountant",
            "replayed",
            *_SITE_TAG,
        ),
    ),
    EntrySpec(REFUSED, ("round", "phase", "code", "reason", "received_sha256", *_SITE_TAG)),
    EntrySpec(
        SECAGG,
        ("round", "node_id", "threshold", "survivors", "dropped", "weighting", *_SITE_TAG),
    ),
)
"""A site's entries (``client/audit.py`` describes each field)."""
