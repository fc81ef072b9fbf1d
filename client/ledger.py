"""The site's durable privacy-budget ledger: every DP mechanism its patients went through.

One SQLite file per site (stdlib :mod:`sqlite3`, WAL journal, schema versioned with
``PRAGMA user_version``). A ledger keeps its connections open between calls (closed by
:meth:`PrivacyLedger.close`, on garbage collection, and before the process forks).

**Datasets are keyed by cohort keys.** ``key = ledger.cohort_key(site.patient_ids)`` is an
HMAC-SHA256 over the sorted, de-duplicated patient ids, keyed by a random 32-byte salt the
ledger drew when it was created and keeps inside its own file. The key depends on *who* the
patients are, not on how their data files are written, so re-exporting the same patients
(``97.0`` written as ``97.00``, rows reordered) is the same dataset with the same history;
and it means nothing outside this ledger. ``cohort_key`` also registers the cohort's
members, each stored as ``HMAC(salt, "member:" + id)``: raw patient ids never reach the file.
Every other method takes the key as its ``fingerprint`` argument (the name is kept for
compatibility).

**Overlapping cohorts compose.** A patient's privacy loss is the composition of every
mechanism applied to any dataset that contains them. For a key ``K`` the ledger therefore
composes the charges of every dataset that shares at least one member with ``K``, plus every
dataset whose membership is unknown (below). For each patient of ``K``, the mechanisms that
touched them are a subset of these, and ε of a composition never decreases when mechanisms
are added, so the result is an **upper bound for every patient of K**: exact for a patient
who is in all of those datasets, loose for the others. :meth:`PrivacyLedger.history`,
:meth:`~PrivacyLedger.spent`, :meth:`~PrivacyLedger.charges_affecting` and the budget check
of :meth:`~PrivacyLedger.charge` all use this composition; :meth:`~PrivacyLedger.charges`
lists ``K``'s own charges only. Charging ``K`` adds a mechanism to ``K``'s patients only, and
each of them is covered by ``K``'s check, so no patient of any other dataset can be pushed
over the budget either.

**Unknown membership overlaps everything.** A dataset with no registered members (one
carried over from a v1 ledger, which keyed datasets by a fingerprint of their files, or any
key not made by :meth:`~PrivacyLedger.cohort_key`) may hold any patient: its charges count
towards every dataset, and its own history is every charge in the ledger. Migrating a v1
ledger therefore never loses budget.

**One δ, one accountant.** Each dataset is accounted at one δ with one accountant, fixed by
its first charge. A charge is refused when any dataset it composes with is accounted
differently: otherwise re-keying the same patients (add one patient, get a new key) at a
larger δ would report a smaller ε for them. Reads compose at the dataset's own δ (the stored
mechanisms do not depend on δ, so that is a sound computation).

The protocol a site follows for one round::

    key = ledger.cohort_key(site.patient_ids)
    receipt = ledger.charge(fingerprint=key, budget_epsilon=budget, delta=delta,
                            accountant="prv", mechanism=plan, run_id=run, round=r)
    ...train (DP-SGD with exactly ``plan``)...
    ledger.mark_completed(receipt.charge_id)   # BEFORE the update leaves the site
    ...reply with the update...

A noisy evaluation is charged the same way with ``kind="evaluate"`` and its Gaussian
mechanism, ``Mechanism(noise_multiplier=σ, sample_rate=1.0, steps=1)`` (``steps=2`` when it
also releases a personalized model's metrics). A site's post-federation fine-tune of its
personal model (``client/personal/finetune.py``) is charged with ``kind="personalize"`` and
its DP-SGD mechanism. Every kind counts towards ε.

:meth:`PrivacyLedger.charge` is atomic: under ``BEGIN IMMEDIATE`` (one writer at a time,
across processes; others wait up to ``busy_timeout_s``) it computes ε of the composed history
plus the new mechanism, refuses with :class:`~fedcare.common.errors.PrivacyBudgetExceeded` (writing
nothing) if that exceeds the budget, else inserts the charge and **commits before
returning**. The charge therefore exists before training starts, and a crash of the process
(SIGKILL included) can never under-count.

**Durability: one fsync per charge, before anything leaves.** The charge commits to the WAL
without an fsync of its own (``synchronous=NORMAL``): every process sees it at once, and it
survives any crash of the process, because it is in the operating system's hands. Its
completion (:meth:`~PrivacyLedger.mark_completed`) or failure
(:meth:`~PrivacyLedger.mark_failed`) commits with ``synchronous=FULL``: the WAL, the charge
with it, is on disk before the call returns, and a site calls it before the round's output
(or the report of its failure) leaves. So what a power cut can take is only a charge whose
round never released anything; what was released is always on disk. A caller that releases
anything computed under a charge must complete or fail it first. Every other write
(cohorts, migrations, creation) is fsynced when it commits.

**What a round reads and writes.** A charge reads the dataset's row, the key's own charge (a
retry), the datasets its cohort composes with (one members join) and their charges merged
in SQL, one row per ``(σ, q)`` with the steps summed (as
:func:`~fedcare.client.accounting.merge_mechanisms` merges them: the same ε), then inserts
itself; a completion or failure is one ``UPDATE`` of a charge still ``charged`` and a read
of it, in one transaction. Reads (``BEGIN DEFERRED``) set no synchronous level: they commit
nothing. A site reads its run's charges once per round (:meth:`PrivacyLedger.charges` with
``run_id``).

Charges, datasets, members and the salt are append-only (SQL triggers reject deleting them
or rewriting what they say); only a charge's status moves: ``charged`` -> ``completed`` or
``failed``. Neither changes ε.

Idempotency is per ``(key, run_id, round, kind)``: charging it again with the same mechanism
returns the existing receipt without paying twice, so a run that resumes after a crash can
retry its round. That is sound only while the earlier attempt released nothing; hence a
charge that is ``completed`` (its output may have left the site) cannot be charged again
(:class:`~fedcare.common.errors.PolicyViolation`): redoing it would be a second release. Mark a
round completed before its output leaves the site. A ``failed`` charge is final too: whether
a round fails can depend on the patients (weights crafted to overflow on one of them), so
retrying it for free would give the sender an oracle; only a charge left ``charged`` by a
process that died is retried.

**The file is never silently re-created.** ``PrivacyLedger(path)`` creates a ledger only when
``path`` does not exist (its folder, if it has to be created, is ``0o700``, the file
``0o600``, whatever the umask). A file that exists but is empty, is not SQLite, or holds no
ledger is refused with a :class:`~fedcare.common.errors.ConfigError`: a fresh ledger would draw a
new salt and forget every charge, i.e. give every patient a fresh budget. Restore it from
the site's backup. A ledger that was deleted outright cannot be told from a new site here;
the site compares :meth:`~PrivacyLedger.count_charges` with its own audit log for that.

A v1 ledger is migrated in one transaction when it is opened (every charge kept, with
``kind = 'train'``; its datasets become datasets of unknown membership). A v2 ledger is
migrated to v3 the same way: v3 only widens the ``kind`` column's check to admit
``'personalize'`` (SQLite cannot alter a check, so the charges table is rebuilt, every row,
id and append-only trigger kept).

WAL needs a local filesystem (not NFS/SMB): keep the ledger on the site's own disk.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, NoReturn, cast

from fedcare.client.accounting import (
    AccountantName,
    Mechanism,
    epsilon,
    load_accountant,
    validate_accountant,
    validate_delta,
)
from fedcare.common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded
from fedcare.common.files import fsync_dir, private_dir

__all__ = [
    "SCHEMA_VERSION",
    "CHARGE_KINDS",
    "ChargeKind",
    "ChargeStatus",
    "ChargeReceipt",
    "DatasetSummary",
    "PrivacyLedger",
]

SCHEMA_VERSION = 3
ChargeStatus = Literal["charged", "completed", "failed"]
ChargeKind = Literal["train", "evaluate", "personalize"]
CHARGE_KINDS: tuple[ChargeKind, ...] = ("train", "evaluate", "personalize")

_FINGERPRINT = re.compile(r"[0-9a-fA-F]{8,128}")
_SALT_BYTES = 32
_SALT_NAME = "salt"
_COHORT_TAG = b"fedcare-cohort:"
_MEMBER_TAG = b"member:"

_DATASETS: tuple[str, ...] = (
    """
    CREATE TABLE datasets (
        fingerprint    TEXT PRIMARY KEY,
        delta          REAL NOT NULL CHECK (delta > 0 AND delta < 1),
        accountant     TEXT NOT NULL,
        budget_epsilon REAL CHECK (budget_epsilon IS NULL OR budget_epsilon > 0),
        created_at     TEXT NOT NULL
    )
    """,
    """
    CREATE TRIGGER datasets_no_delete BEFORE DELETE ON datasets
    BEGIN SELECT RAISE(ABORT, 'privacy ledger datasets are append-only'); END
    """,
    """
    CREATE TRIGGER datasets_immutable BEFORE UPDATE OF fingerprint, delta, accountant
    ON datasets
    BEGIN SELECT RAISE(ABORT, 'a dataset''s delta and accountant are fixed'); END
    """,
)
# v3 charges (v2's with 'personalize' admitted); the target of the v1 and v2 migrations.
_CHARGES: tuple[str, ...] = (
    """
    CREATE TABLE charges (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint      TEXT NOT NULL REFERENCES datasets (fingerprint),
        run_id           TEXT NOT NULL,
        round            INTEGER NOT NULL CHECK (round >= 0),
        kind             TEXT NOT NULL CHECK (kind IN ('train', 'evaluate', 'personalize')),
        noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
        sample_rate      REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
        steps            INTEGER NOT NULL CHECK (steps >= 1),
        delta            REAL NOT NULL,
        accountant       TEXT NOT NULL,
        budget_epsilon   REAL NOT NULL,
        epsilon_before   REAL NOT NULL,
        epsilon_after    REAL NOT NULL,
        status           TEXT NOT NULL CHECK (status IN ('charged', 'completed', 'failed')),
        metrics          TEXT,
        created_at       TEXT NOT NULL,
        completed_at     TEXT,
        UNIQUE (fingerprint, run_id, round, kind)
    )
    """,
    "CREATE INDEX charges_by_dataset ON charges (fingerprint, id)",
    """
    CREATE TRIGGER charges_no_delete BEFORE DELETE ON charges
    BEGIN SELECT RAISE(ABORT, 'privacy ledger charges are append-only'); END
    """,
    """
    CREATE TRIGGER charges_immutable BEFORE UPDATE OF
        id, fingerprint, run_id, round, kind, noise_multiplier, sample_rate, steps, delta,
        accountant, budget_epsilon, epsilon_before, epsilon_after, created_at
    ON charges
    BEGIN SELECT RAISE(ABORT, 'a privacy ledger charge cannot be rewritten'); END
    """,
)
# New in v2: the salt (in meta) and the cohorts' members (HMACs of patient ids).
_META_AND_MEMBERS: tuple[str, ...] = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """
    CREATE TRIGGER meta_no_delete BEFORE DELETE ON meta
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger salt is fixed'); END
    """,
    """
    CREATE TRIGGER meta_immutable BEFORE UPDATE ON meta
    BEGIN SELECT RAISE(ABORT, 'the privacy ledger salt is fixed'); END
    """,
    """
    CREATE TABLE members (
        fingerprint TEXT NOT NULL,
        member      TEXT NOT NULL CHECK (length(member) = 64),
        PRIMARY KEY (fingerprint, member)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX members_by_member ON members (member, fingerprint)",
    """
    CREATE TRIGGER members_no_delete BEFORE DELETE ON members
    BEGIN SELECT RAISE(ABORT, 'privacy ledger cohort members are append-only'); END
    """,
    """
    CREATE TRIGGER members_immutable BEFORE UPDATE ON members
    BEGIN SELECT RAISE(ABORT, 'a privacy ledger cohort member cannot be rewritten'); END
    """,
)
_SCHEMA: tuple[str, ...] = (*_DATASETS, *_CHARGES, *_META_AND_MEMBERS)
_TABLES = frozenset({"datasets", "charges", "meta", "members"})
_TABLES_V1 = frozenset({"datasets", "charges"})
# The columns a v2 charge row has (v2 -> v3 copies every one).
_V2_CHARGE_COLUMNS = (
    "id, fingerprint, run_id, round, kind, noise_multiplier, sample_rate, steps, delta, "
    "accountant, budget_epsilon, epsilon_before, epsilon_after, status, metrics, "
    "created_at, completed_at"
)
# The columns a v1 charge row has; the migration copies exactly these.
_V1_CHARGE_COLUMNS = (
    "id, fingerprint, run_id, round, noise_multiplier, sample_rate, steps, delta, "
    "accountant, budget_epsilon, epsilon_before, epsilon_after, status, metrics, "
    "created_at, completed_at"
)

_RESTORE = (
    "restore it from the site's backup (with its -wal file, if any); never start a new "
    "ledger in its place: a new ledger draws a new salt and forgets every charge, which "
    "would give every patient a fresh privacy budget"
)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ChargeReceipt:
    """One charge as the ledger holds it.

    Attributes
    ----------
    charge_id:
        Row id; pass it to :meth:`PrivacyLedger.mark_completed`.
    fingerprint, run_id, round, kind:
        The idempotency key (``fingerprint`` is the dataset key, see
        :meth:`PrivacyLedger.cohort_key`; ``kind`` is ``"train"``, ``"evaluate"`` or
        ``"personalize"``).
    mechanism:
        What the round applies.
    delta, accountant:
        How the dataset is accounted.
    budget_epsilon:
        The budget the charge was checked against.
    epsilon_before, epsilon_after:
        ε of the dataset's composed history (its own charges and those of every
        overlapping dataset) just before and just after this charge.
    status:
        ``"charged"``, ``"completed"`` or ``"failed"`` (all count towards ε).
    created_at, completed_at:
        ISO-8601 UTC times; ``completed_at`` is set by completing or failing.
    metrics:
        Aggregate metrics recorded at completion, if any.
    """

    charge_id: int
    fingerprint: str
    run_id: str
    round: int
    kind: ChargeKind
    mechanism: Mechanism
    delta: float
    accountant: str
    budget_epsilon: float
    epsilon_before: float
    epsilon_after: float
    status: ChargeStatus
    created_at: str
    completed_at: str | None = None
    metrics: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the mechanism flattened)."""
        return {
            "charge_id": self.charge_id,
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "round": self.round,
            "kind": self.kind,
            "noise_multiplier": self.mechanism.noise_multiplier,
            "sample_rate": self.mechanism.sample_rate,
            "steps": self.mechanism.steps,
            "status": self.status,
            "budget_epsilon": self.budget_epsilon,
            "epsilon_before": self.epsilon_before,
            "epsilon_after": self.epsilon_after,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "metrics": dict(self.metrics) if self.metrics is not None else None,
        }


@dataclass(frozen=True)
class DatasetSummary:
    """A dataset's whole account.

    Attributes
    ----------
    fingerprint:
        The dataset key.
    epsilon:
        ε of :attr:`composed` at this dataset's δ: an upper bound for each of its patients.
    delta, accountant, budget_epsilon, created_at:
        How the dataset is accounted, its latest budget, when it was first charged.
    members:
        How many members its cohort registered; ``None`` when unknown (a v1 dataset, or a
        key not made by :meth:`PrivacyLedger.cohort_key`), which overlaps every dataset.
    charges:
        Its own charges, oldest first.
    composed:
        Every charge its ε composes (its own and every overlapping dataset's), oldest first.
    """

    fingerprint: str
    epsilon: float
    delta: float
    accountant: str
    budget_epsilon: float | None
    created_at: str
    members: int | None
    charges: tuple[ChargeReceipt, ...]
    composed: tuple[ChargeReceipt, ...]

    @property
    def mechanisms(self) -> tuple[Mechanism, ...]:
        """The composed history, in charge order (what :attr:`epsilon` is computed from)."""
        return tuple(c.mechanism for c in self.composed)

    @property
    def overlapping(self) -> tuple[str, ...]:
        """The other datasets whose charges :attr:`epsilon` composes, sorted."""
        return tuple(sorted({c.fingerprint for c in self.composed} - {self.fingerprint}))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "fingerprint": self.fingerprint,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "budget_epsilon": self.budget_epsilon,
            "created_at": self.created_at,
            "members": self.members,
            "overlapping_datasets": list(self.overlapping),
            "composed_charge_ids": [c.charge_id for c in self.composed],
            "total_steps": sum(c.mechanism.steps for c in self.charges),
            "charges": [c.to_dict() for c in self.charges],
        }


@dataclass(frozen=True)
class _Dataset:
    """A ``datasets`` row and how many members its cohort registered (0: unknown; 1 where
    only whether any is known was read, ``_DATASET_KNOWN_COLUMNS``)."""

    fingerprint: str
    delta: float
    accountant: str
    budget_epsilon: float | None
    created_at: str
    members: int


# Every dataset a key's history composes: those sharing a member with it, those of unknown
# membership (no registered member), and itself. Only for a key with registered members;
# a key without any composes with every dataset.
_AFFECTING = """
    WITH affecting (fingerprint) AS (
        SELECT other.fingerprint
        FROM members AS mine JOIN members AS other ON other.member = mine.member
        WHERE mine.fingerprint = :key
        UNION
        SELECT d.fingerprint FROM datasets AS d
        WHERE NOT EXISTS (SELECT 1 FROM members AS m WHERE m.fingerprint = d.fingerprint)
        UNION
        SELECT :key
    )
"""
_DATASET_COLUMNS = (
    "fingerprint, delta, accountant, budget_epsilon, created_at, "
    "(SELECT COUNT(*) FROM members AS m WHERE m.fingerprint = datasets.fingerprint)"
)
# The same row where only whether the membership is known matters (members 1 or 0): a
# charge's checks, without counting every cohort's members.
_DATASET_KNOWN_COLUMNS = (
    "fingerprint, delta, accountant, budget_epsilon, created_at, "
    "EXISTS (SELECT 1 FROM members AS m WHERE m.fingerprint = datasets.fingerprint)"
)


def _open_connection(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """A new autocommit connection to ``path`` with the ledger's pragmas (the synchronous
    level is set per transaction, :meth:`PrivacyLedger._transaction`)."""
    # mode=rw: a ledger file that is gone is an error, never a new empty database.
    conn = sqlite3.connect(
        f"{Path(path).absolute().as_uri()}?mode=rw",
        uri=True,
        timeout=busy_timeout_ms / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        conn.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of the file at ``path`` (through symlinks); ``None`` if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Connections:
    """The SQLite connections one :class:`PrivacyLedger` keeps open between its calls.

    Opening a connection for every call costs more than the call: SQLite reads the schema
    again, and closing the last connection to a WAL database checkpoints the WAL into the
    database and deletes it (several fsyncs and file creations per call). So a call takes an
    idle connection (or opens one), and gives it back when its transaction has ended; two
    threads never hold the same one at once.

    A ledger file replaced or deleted under a running site (same device and inode, checked
    at every take) is refused with a :class:`~fedcare.common.errors.ConfigError`: SQLite
    names its ``-wal`` and ``-shm`` files by path, so a restored backup opened beside the old
    ones would not be the backup, and a deleted one must never be re-created. Restore a
    ledger with the site stopped. A kept connection never crosses a ``fork()``: SQLite
    forbids using a connection in a child, and the child's copy of SQLite's per-file lock
    state would be wrong for the child's own connections. So every idle connection of every
    live ledger is closed just before the process forks (``os.register_at_fork``), and one
    that a child inherits anyway (given back by another thread during the fork) is left
    alone by the child, neither used nor closed.
    """

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self._idle: list[tuple[sqlite3.Connection, tuple[int, int] | None]] = []
        self._identity: dict[int, tuple[int, int] | None] = {}  # id(conn) -> its file
        self._inherited: list[sqlite3.Connection] = []  # a parent's, never touched here
        self._pid = os.getpid()
        self._file: tuple[int, int] | None = None  # the file the first connection opened
        _LIVE_CONNECTIONS.add(self)

    def _forked(self) -> None:
        """In a child: forget the parent's connections without closing them (lock held)."""
        if os.getpid() != self._pid:
            self._inherited.extend(conn for conn, _ in self._idle)
            self._idle.clear()
            self._identity.clear()
            self._pid = os.getpid()

    def take(self) -> sqlite3.Connection:
        """An idle connection to the file now at the path, or a new one."""
        identity = _file_identity(self._path)
        stale: list[sqlite3.Connection] = []
        found = None
        with self._lock:
            self._forked()
            if identity is None or (self._file is not None and identity != self._file):
                raise ConfigError(
                    f"privacy ledger {self._path} was "
                    f"{'deleted' if identity is None else 'replaced'} while this site was "
                    "running; nothing was charged. Fix: stop the site, put the ledger back "
                    f"from the site's backup, and start it again. {_RESTORE}"
                )
            while self._idle:
                conn, its = self._idle.pop()
                if its is not None and its == identity:
                    found = conn
                    break
                self._identity.pop(id(conn), None)
                stale.append(conn)
        for conn in stale:
            conn.close()
        if found is not None:
            return found
        conn = _open_connection(self._path, self._busy_timeout_ms)
        with self._lock:
            self._identity[id(conn)] = opened = _file_identity(self._path)
            if self._file is None:
                self._file = opened
        return conn

    def give(self, conn: sqlite3.Connection) -> None:
        """Keep ``conn`` for the next call; closed instead if it is still in a transaction
        (a rollback that did not finish) or the process has forked since it was taken."""
        with self._lock:
            if os.getpid() == self._pid and not conn.in_transaction:
                self._idle.append((conn, self._identity.get(id(conn))))
                return
            self._identity.pop(id(conn), None)
            forked = os.getpid() != self._pid
        if forked:
            self._inherited.append(conn)  # the parent's: closing it here could harm it
        else:
            conn.close()

    def discard(self, conn: sqlite3.Connection) -> None:
        """Close ``conn`` (after an SQLite error) instead of keeping it."""
        with self._lock:
            self._identity.pop(id(conn), None)
            forked = os.getpid() != self._pid
        if forked:
            self._inherited.append(conn)
        else:
            conn.close()

    def close(self, *, forget_file: bool = False) -> None:
        """Close every idle connection (in this process; a parent's are left alone); with
        ``forget_file``, the next connection may open whatever file is then at the path."""
        with self._lock:
            self._forked()
            if forget_file:
                self._file = None
            idle = [conn for conn, _ in self._idle]
            self._idle.clear()
            for conn in idle:
                self._identity.pop(id(conn), None)
        for conn in idle:
            conn.close()


_LIVE_CONNECTIONS: weakref.WeakSet[_Connections] = weakref.WeakSet()
"""Every :class:`_Connections` alive in this process, only so that their idle connections
are closed before a ``fork()`` (:func:`_close_before_fork`)."""


def _close_before_fork() -> None:
    for connections in list(_LIVE_CONNECTIONS):
        connections.close()


def _new_locks_in_child() -> None:
    """A lock another thread held during the fork stays held forever in the child."""
    for connections in list(_LIVE_CONNECTIONS):
        connections._lock = threading.Lock()


os.register_at_fork(before=_close_before_fork, after_in_child=_new_locks_in_child)


class PrivacyLedger:
    """A site's privacy-budget ledger in one SQLite file.

    Each call runs its own transaction on a connection the instance keeps open between
    calls (one per thread at a time, :class:`_Connections`), so one instance may be shared
    by threads, and every process (or thread) may hold its own instance on the same file.
    :meth:`close` (or ``with PrivacyLedger(path) as ledger``) closes them; so does garbage
    collection.

    Parameters
    ----------
    path:
        The ledger file. Created, with a fresh salt, only when nothing exists at ``path``
        and ``create``; its folder is created ``0o700`` if missing
        (:func:`fedcare.common.files.private_dir`), the file ``0o600``, whatever the umask. A v1
        ledger is migrated to v2 when opened.
    create:
        When ``False``, a missing file is a :class:`ConfigError` (read-only tools).
    busy_timeout_s:
        How long a writer waits for another writer's transaction (charges hold the lock
        while ε is computed, well under a second each) before failing.
    clock:
        Source of timestamps (UTC).

    Raises
    ------
    ConfigError
        If the file is missing (``create=False``); exists but is empty (0 bytes), is not a
        SQLite database, is an SQLite database without a ledger in it, or was written by a
        newer fedcare (an existing file is never re-initialised: restore it from backup).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        busy_timeout_s: float = 120.0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.path = Path(path)
        if busy_timeout_s <= 0:
            raise ConfigError(f"busy_timeout_s must be > 0, got {busy_timeout_s!r}")
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._clock = clock
        self._connections = _Connections(self.path, self._busy_timeout_ms)
        weakref.finalize(self, self._connections.close)
        if self.path.is_dir():
            raise ConfigError(
                f"privacy ledger path {self.path} is a folder; give the ledger file, "
                "e.g. <site>/privacy-ledger.sqlite"
            )
        if not (self.path.is_symlink() or self.path.exists()):
            if not create:
                raise ConfigError(
                    f"no privacy ledger at {self.path}; pass the path of the site's ledger "
                    "file (it is created by the site's first DP training round)"
                )
            self._create()
        self._open()

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    def _error(self, e: sqlite3.Error) -> ConfigError:
        text = str(e)
        if isinstance(e, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return ConfigError(
                f"privacy ledger {self.path} stayed locked by another process for more than "
                f"{self._busy_timeout_ms / 1000:g} s ({text}); check for a stuck fedcare "
                "process on this site, or raise busy_timeout_s"
            )
        if isinstance(e, sqlite3.DatabaseError) and (
            "not a database" in text or "malformed" in text or "encrypted" in text
        ):
            return ConfigError(
                f"{self.path} is not a readable fedcare privacy ledger (SQLite: {text}); "
                f"if the ledger path is right, the file is damaged: {_RESTORE}"
            )
        return ConfigError(f"privacy ledger {self.path}: SQLite error: {text}")

    @contextmanager
    def _connect(self, path: Path | None = None) -> Iterator[sqlite3.Connection]:
        """A connection to the ledger (kept open between calls, :class:`_Connections`), or a
        fresh one to ``path`` that is closed after (the scratch file of :meth:`_create`)."""
        if path is not None:
            try:
                conn = _open_connection(path, self._busy_timeout_ms)
            except sqlite3.Error as e:
                raise self._error(e) from e
            try:
                yield conn
            except sqlite3.Error as e:
                raise self._error(e) from e
            finally:
                conn.close()
            return
        try:
            conn = self._connections.take()
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            yield conn
        except sqlite3.Error as e:
            self._connections.discard(conn)
            raise self._error(e) from e
        except BaseException:
            self._connections.give(conn)
            raise
        self._connections.give(conn)

    @contextmanager
    def _transaction(
        self,
        kind: Literal["IMMEDIATE", "DEFERRED"],
        path: Path | None = None,
        *,
        sync: Literal["FULL", "NORMAL"] = "FULL",
    ) -> Iterator[sqlite3.Connection]:
        """One explicit transaction; committed on normal exit, rolled back on any error.

        ``sync`` applies to writing transactions (``IMMEDIATE``); a ``DEFERRED`` one only
        reads (a snapshot of several statements) and sets no level. ``sync="FULL"`` (the
        default) fsyncs the WAL before ``COMMIT`` returns: the
        transaction survives a power cut. ``"NORMAL"`` writes it to the WAL without an
        fsync: every process sees it at once and it survives any crash of this process
        (SIGKILL included), but only the next ``FULL`` commit (or checkpoint) puts it on
        disk; :meth:`charge` uses it (see its docstring), nothing else does.
        """
        with self._connect(path) as conn:
            if kind != "DEFERRED":  # a read commits nothing: its level would be moot
                conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute(f"BEGIN {kind}")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connections this ledger keeps open between calls.

        Optional: they are closed when the ledger is garbage-collected, and a ledger used
        again after ``close()`` opens a new one. A ledger can also be used as a context
        manager (``with PrivacyLedger(path) as ledger: ...``), which closes it on exit. A
        ledger file replaced while the ledger was open is refused until it is closed.
        """
        self._connections.close(forget_file=True)

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        """Create a new ledger at ``self.path``, which did not exist a moment ago.

        The ledger is built complete (schema, salt, WAL) in a private temporary file beside
        it and then hard-linked into place, which fails if ``self.path`` appeared meanwhile:
        another process then created it first, and its ledger is used. So no process ever
        sees a half-created ledger, and an empty file at ``self.path`` is always an error.
        """
        folder = self.path.parent
        scratch = folder / f".{self.path.name}.{secrets.token_hex(8)}.creating"
        try:
            private_dir(folder, tighten=False)  # 0700 if it has to be created
            fd = os.open(scratch, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)  # the umask may have removed bits; now exactly 0600
            finally:
                os.close(fd)
        except OSError as e:
            raise ConfigError(
                f"cannot create the privacy ledger {self.path} ({e}); check that its folder "
                "exists or can be created, and is writable by this user"
            ) from e
        try:
            with self._transaction("IMMEDIATE", scratch) as conn:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    (_SALT_NAME, secrets.token_bytes(_SALT_BYTES)),
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            with self._connect(scratch) as conn:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    f"privacy ledger {self.path} cannot use SQLite's WAL journal "
                    f"(got {mode!r}); keep the ledger on a local disk, not a network share"
                )
            try:
                os.link(scratch, self.path)
            except FileExistsError:
                return  # another process created the ledger first; ours was never used
            fsync_dir(folder)  # the ledger's name survives a power cut
        except OSError as e:
            raise ConfigError(
                f"cannot create the privacy ledger {self.path} ({e}); keep the ledger on a "
                "local disk that supports hard links, in a folder writable by this user"
            ) from e
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{scratch}{suffix}").unlink(missing_ok=True)

    @staticmethod
    def _inspect(conn: sqlite3.Connection) -> tuple[int, frozenset[str]]:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = frozenset(
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        )
        return version, tables

    def _not_a_ledger(self, version: int, tables: frozenset[str]) -> ConfigError:
        if version > SCHEMA_VERSION:
            return ConfigError(
                f"privacy ledger {self.path} has schema version {version}, newer than "
                f"this fedcare's {SCHEMA_VERSION}; upgrade fedcare at this site"
            )
        if version == 0 and not tables:
            return ConfigError(
                f"{self.path} is an empty SQLite database, not a privacy ledger; refusing to "
                f"initialise it. If it should be the site's ledger, {_RESTORE}"
            )
        return ConfigError(
            f"{self.path} is an SQLite database but not a fedcare privacy ledger "
            f"(user_version {version}, tables {sorted(tables)}); point the ledger path at the "
            f"site's ledger file or at a path where none exists yet. If it should be the "
            f"site's ledger, {_RESTORE}"
        )

    def _open(self) -> None:
        """Check that ``self.path`` holds a ledger; migrate it if it is a v1 ledger."""
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise ConfigError(
                f"cannot read the privacy ledger {self.path} ({e}); check the path and its "
                f"permissions. If the file is lost, {_RESTORE}"
            ) from e
        if size == 0:
            raise ConfigError(
                f"privacy ledger {self.path} is an empty (0-byte) file; refusing to "
                f"re-initialise it. Fix: {_RESTORE}. Only if this site never charged any "
                "privacy budget, delete the empty file and a new ledger is created"
            )
        with self._transaction("DEFERRED") as conn:
            version, tables = self._inspect(conn)
            if version == SCHEMA_VERSION and tables >= _TABLES:
                self._salt(conn)  # present and well-formed
                return
        if version == 1 and tables >= _TABLES_V1:
            self._migrate_v1()
            return
        if version == 2 and tables >= _TABLES:
            self._migrate_v2()
            return
        raise self._not_a_ledger(version, tables)

    def _migrate_v1(self) -> None:
        """Migrate a v1 ledger to v2 in one transaction; every charge is kept.

        The charges table is rebuilt with the ``kind`` column (v1 only had training
        charges) and the ``(fingerprint, run_id, round, kind)`` key, keeping every row, its
        id and the append-only triggers; the salt and the members table are added. v1
        datasets get no members: unknown membership, so they compose with every dataset.
        """
        with self._transaction("IMMEDIATE") as conn:
            version, tables = self._inspect(conn)  # another process may have migrated it
            if version == SCHEMA_VERSION and tables >= _TABLES:
                return
            if version != 1 or not tables >= _TABLES_V1:
                raise self._not_a_ledger(version, tables)
            count = self._rebuild_charges(
                conn, columns=f"{_V1_CHARGE_COLUMNS}, kind", select=f"{_V1_CHARGE_COLUMNS}, 'train'"
            )
            for statement in _META_AND_MEMBERS:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (name, value) VALUES (?, ?)",
                (_SALT_NAME, secrets.token_bytes(_SALT_BYTES)),
            )
            migrated = conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0]
            if migrated != count:
                raise ConfigError(
                    f"migrating privacy ledger {self.path} to schema v{SCHEMA_VERSION} kept "
                    f"{migrated} of its {count} charges; nothing was changed. Report this "
                    "as a fedcare bug and keep using the v1 file with the earlier fedcare"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _rebuild_charges(conn: sqlite3.Connection, *, columns: str, select: str) -> int:
        """Rebuild the charges table at the current schema inside a migration's transaction:
        every row copied with its id (``INSERT INTO charges (columns) SELECT select``), the
        id sequence kept (ids are never reused, even those of rolled-back charges), the
        index and the append-only triggers recreated. Returns the number of rows before."""
        count = int(conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0])
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'charges'").fetchone()
        conn.execute("DROP TRIGGER charges_no_delete")
        conn.execute("DROP TRIGGER charges_immutable")
        conn.execute("DROP INDEX charges_by_dataset")
        conn.execute("ALTER TABLE charges RENAME TO charges_old")
        for statement in _CHARGES:
            conn.execute(statement)
        conn.execute(
            f"INSERT INTO charges ({columns}) SELECT {select} FROM charges_old ORDER BY id"
        )
        conn.execute("DROP TABLE charges_old")
        if seq is not None:
            updated = conn.execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'charges'", (seq[0],)
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('charges', ?)", (seq[0],)
                )
        return count

    def _migrate_v2(self) -> None:
        """Migrate a v2 ledger to v3 in one transaction; every charge is kept as it was.

        v3 differs only in the ``kind`` check of the charges table (``'personalize'``
        admitted). SQLite cannot alter a check, so the table is rebuilt: every row with its
        id, the id sequence, the index and the append-only triggers. Datasets, members and
        the salt are untouched.
        """
        with self._transaction("IMMEDIATE") as conn:
            version, tables = self._inspect(conn)  # another process may have migrated it
            if version == SCHEMA_VERSION and tables >= _TABLES:
                return
            if version != 2 or not tables >= _TABLES:
                raise self._not_a_ledger(version, tables)
            count = self._rebuild_charges(
                conn, columns=_V2_CHARGE_COLUMNS, select=_V2_CHARGE_COLUMNS
            )
            migrated = conn.execute("SELECT COUNT(*) FROM charges").fetchone()[0]
            if migrated != count:
                raise ConfigError(
                    f"migrating privacy ledger {self.path} to schema v{SCHEMA_VERSION} kept "
                    f"{migrated} of its {count} charges; nothing was changed. Report this "
                    "as a fedcare bug and keep using the v2 file with the earlier fedcare"
                )
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _salt(self, conn: sqlite3.Connection) -> bytes:
        row = conn.execute("SELECT value FROM meta WHERE name = ?", (_SALT_NAME,)).fetchone()
        if row is None or not isinstance(row[0], bytes) or len(row[0]) != _SALT_BYTES:
            raise ConfigError(
                f"privacy ledger {self.path} has no valid cohort salt (meta table); the file "
                f"is damaged: {_RESTORE}"
            )
        return row[0]

    def _now(self) -> str:
        now = self._clock()
        if now.tzinfo is None:
            raise ConfigError("the ledger clock must return timezone-aware datetimes (UTC)")
        return now.astimezone(timezone.utc).isoformat(timespec="microseconds")

    # ------------------------------------------------------------------ cohorts

    def cohort_key(self, patient_ids: Iterable[str]) -> str:
        """The dataset key of a cohort of patients; registers its members.

        The key is the hex HMAC-SHA256, keyed by this ledger's salt, of the sorted,
        de-duplicated ids (each length-prefixed, so no two id sets encode alike): the same
        patients give the same key whatever the order, duplicates or file bytes they came
        from, and the key means nothing without this ledger. Each member is stored as the
        hex ``HMAC(salt, "member:" + id)``, never the id itself; registering is idempotent
        and happens in one transaction. Pass the key as ``fingerprint=`` to every other
        method.

        Parameters
        ----------
        patient_ids:
            The ids of every patient whose data the dataset holds (e.g.
            :attr:`fedcare.client.data.site.SiteData.patient_ids`); non-empty strings, at least one.

        Returns
        -------
        str
            64 lowercase hex digits.

        Raises
        ------
        ConfigError
            If ``patient_ids`` is a single string, is empty, or holds something other than
            non-empty strings.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ledger = PrivacyLedger(Path(tmp) / "ledger.sqlite")
        ...     ledger.cohort_key(["p2", "p1"]) == ledger.cohort_key(["p1", "p2", "p1"])
        True
        """
        if isinstance(patient_ids, (str, bytes)):
            raise ConfigError(
                "patient_ids must be an iterable of patient id strings, not one string; "
                "pass e.g. site.patient_ids"
            )
        encoded: set[bytes] = set()
        for pid in patient_ids:
            # The id itself is never put in a message: it is patient data.
            if not isinstance(pid, str) or not pid:
                raise ConfigError(
                    "every patient id must be a non-empty string, got "
                    f"{'an empty string' if pid == '' else type(pid).__name__}; convert ids "
                    "with str() when loading the site's data"
                )
            try:
                encoded.add(pid.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise ConfigError(
                    "a patient id is not valid Unicode text (it holds a lone surrogate); "
                    "fix the id column of the site's data"
                ) from e
        if not encoded:
            raise ConfigError(
                "a cohort needs at least one patient id, got none; check that the site's "
                "data loaded any patients"
            )
        ordered = sorted(encoded)
        with self._transaction("IMMEDIATE") as conn:
            salt = self._salt(conn)
            key = _cohort_digest(salt, ordered)
            conn.executemany(
                "INSERT OR IGNORE INTO members (fingerprint, member) VALUES (?, ?)",
                ((key, _member_digest(salt, raw)) for raw in ordered),
            )
        return key

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _receipt(row: sqlite3.Row | tuple[Any, ...]) -> ChargeReceipt:
        (
            charge_id,
            fingerprint,
            run_id,
            round_,
            kind,
            sigma,
            q,
            steps,
            delta,
            accountant,
            budget,
            before,
            after,
            status,
            metrics,
            created_at,
            completed_at,
        ) = row
        return ChargeReceipt(
            charge_id=charge_id,
            fingerprint=fingerprint,
            run_id=run_id,
            round=round_,
            kind=kind,
            mechanism=Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps),
            delta=delta,
            accountant=accountant,
            budget_epsilon=budget,
            epsilon_before=before,
            epsilon_after=after,
            status=status,
            created_at=created_at,
            completed_at=completed_at,
            metrics=json.loads(metrics) if metrics is not None else None,
        )

    _CHARGE_COLUMNS = (
        "id, fingerprint, run_id, round, kind, noise_multiplier, sample_rate, steps, delta, "
        "accountant, budget_epsilon, epsilon_before, epsilon_after, status, metrics, "
        "created_at, completed_at"
    )

    def _charges(
        self, conn: sqlite3.Connection, fingerprint: str, run_id: str | None = None
    ) -> list[ChargeReceipt]:
        if run_id is None:
            rows = conn.execute(
                f"SELECT {self._CHARGE_COLUMNS} FROM charges WHERE fingerprint = ? ORDER BY id",
                (fingerprint,),
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT {self._CHARGE_COLUMNS} FROM charges "
                "WHERE fingerprint = ? AND run_id = ? ORDER BY id",
                (fingerprint, run_id),
            ).fetchall()
        return [self._receipt(r) for r in rows]

    @staticmethod
    def _has_members(conn: sqlite3.Connection, fingerprint: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM members WHERE fingerprint = ? LIMIT 1", (fingerprint,)
        ).fetchone()
        return row is not None

    def _affecting(
        self, conn: sqlite3.Connection, fingerprint: str
    ) -> tuple[bool, str, tuple[str, ...]]:
        """``(has_members, where, params)``: whether ``fingerprint`` registered members, and
        the ``WHERE`` clause (with its parameters) that selects, in ``datasets`` or
        ``charges``, every dataset its history composes.

        The datasets sharing a member with it are found once (the members join is most of
        the cost); their rows and charges are then read by key."""
        if self._has_members(conn, fingerprint):
            keys = [
                r[0]
                for r in conn.execute(
                    f"{_AFFECTING} SELECT fingerprint FROM affecting", {"key": fingerprint}
                )
            ]
            where = "WHERE fingerprint IN (SELECT value FROM json_each(?))"
            return True, where, (json.dumps(keys),)
        return False, "", ()  # unknown membership: any patient may be in it

    def _composed(
        self, conn: sqlite3.Connection, fingerprint: str
    ) -> tuple[list[_Dataset], list[ChargeReceipt]]:
        """The datasets ``fingerprint``'s history composes, and all their charges by id."""
        _, where, params = self._affecting(conn, fingerprint)
        datasets = conn.execute(
            f"SELECT {_DATASET_COLUMNS} FROM datasets {where} ORDER BY created_at, fingerprint",
            params,
        ).fetchall()
        charges = conn.execute(
            f"SELECT {self._CHARGE_COLUMNS} FROM charges {where} ORDER BY id", params
        ).fetchall()
        return [_Dataset(*d) for d in datasets], [self._receipt(r) for r in charges]

    @staticmethod
    def _composed_history(
        conn: sqlite3.Connection, where: str, params: tuple[str, ...]
    ) -> list[Mechanism]:
        """The composed history selected by ``where`` (:meth:`_affecting`), merged in SQL:
        one block per ``(σ, q)`` with its steps summed, as
        :func:`~fedcare.client.accounting.merge_mechanisms` merges (exact float equality,
        integer sums), so ε is the same. What a charge needs of every earlier charge,
        without reading each row whole."""
        rows = conn.execute(
            "SELECT noise_multiplier, sample_rate, SUM(steps) FROM charges "
            f"{where} GROUP BY noise_multiplier, sample_rate ORDER BY MIN(id)",
            params,
        ).fetchall()
        return [Mechanism(sigma, q, steps) for sigma, q, steps in rows]

    def _charge_by_key(
        self,
        conn: sqlite3.Connection,
        fingerprint: str,
        run_id: str,
        round_: int,
        kind: ChargeKind,
    ) -> ChargeReceipt | None:
        row = conn.execute(
            f"SELECT {self._CHARGE_COLUMNS} FROM charges "
            "WHERE fingerprint = ? AND run_id = ? AND round = ? AND kind = ?",
            (fingerprint, run_id, round_, kind),
        ).fetchone()
        return None if row is None else self._receipt(row)

    @staticmethod
    def _dataset(conn: sqlite3.Connection, fingerprint: str) -> _Dataset | None:
        row = conn.execute(
            f"SELECT {_DATASET_KNOWN_COLUMNS} FROM datasets WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()
        return None if row is None else _Dataset(*row)

    def _check_same_accounting(self, dataset: _Dataset, delta: float, accountant: str) -> None:
        if not _same_accounting(dataset, delta, accountant):
            raise ConfigError(
                f"dataset {dataset.fingerprint[:16]}... is accounted in {self.path} at "
                f"delta={dataset.delta:g} with the {dataset.accountant!r} accountant, but this "
                f"request uses delta={delta:g} with {accountant!r}; one dataset's history "
                "must be composed at one delta with one accountant. Fix: set the site's "
                f"delta to {dataset.delta:g} and accountant to {dataset.accountant!r}"
            )

    def _check_composable(
        self,
        fingerprint: str,
        has_members: bool,
        datasets: list[_Dataset],
        delta: float,
        accountant: str,
    ) -> None:
        """Refuse to compose with a dataset accounted at another δ or accountant.

        Charges of overlapping datasets bound the same patients; composing them at a δ of
        the caller's choosing would let a new key (the same patients plus one) at a larger
        δ report a smaller ε for them. Refusing is the safe choice.
        """
        for other in datasets:
            if other.fingerprint == fingerprint or _same_accounting(other, delta, accountant):
                continue
            if not has_members:
                why = (
                    f"has no registered members (a v1 dataset or a key not made by "
                    f"cohort_key), so it composes with every dataset, including "
                    f"{other.fingerprint[:16]}..."
                )
            elif not other.members:
                why = (
                    f"composes with dataset {other.fingerprint[:16]}..., whose membership "
                    "is unknown (a v1 dataset or a key not made by cohort_key: it may hold "
                    "any patient)"
                )
            else:
                why = f"shares patients with dataset {other.fingerprint[:16]}..."
            raise ConfigError(
                f"dataset {fingerprint[:16]}... {why}, which {self.path} accounts at "
                f"delta={other.delta:g} with the {other.accountant!r} accountant, but this "
                f"request uses delta={delta:g} with {accountant!r}; charges that bound the "
                "same patients must be composed at one delta with one accountant, or a new "
                "key at a larger delta would report a smaller epsilon for them. Fix: set the "
                f"site's delta to {other.delta:g} and accountant to {other.accountant!r}"
            )

    def history(self, fingerprint: str) -> list[Mechanism]:
        """The composed history of the dataset ``fingerprint``, oldest first.

        Every mechanism charged to it or to any dataset that shares a member with it or
        has unknown membership (see the module docstring: an upper bound for each of its
        patients). Every mechanism in the ledger when ``fingerprint`` has no registered
        members.

        Parameters
        ----------
        fingerprint:
            The dataset key (:meth:`cohort_key`).

        Returns
        -------
        list of Mechanism
            In charge order; empty when nothing it composes with was ever charged.
        """
        return [c.mechanism for c in self.charges_affecting(fingerprint)]

    def charges(self, fingerprint: str, *, run_id: str | None = None) -> list[ChargeReceipt]:
        """The dataset's own charges with their run, round and kind, oldest first.

        Only charges made with this key; its ε also counts those of overlapping datasets
        (:meth:`charges_affecting`). With ``run_id``, only that run's (read by the key's
        index: a site reads its run's charges once per round, whatever the ledger's age).
        """
        fingerprint = _check_fingerprint(fingerprint)
        if run_id is not None:
            run_id, _ = _check_key(run_id, 0)
        with self._transaction("DEFERRED") as conn:
            return self._charges(conn, fingerprint, run_id)

    def charges_affecting(self, fingerprint: str) -> list[ChargeReceipt]:
        """Every charge the dataset's ε composes, oldest first.

        Its own, those of every dataset that shares at least one member with it, and
        those of every dataset of unknown membership; every charge in the ledger when
        ``fingerprint`` itself has no registered members.

        Parameters
        ----------
        fingerprint:
            The dataset key (:meth:`cohort_key`).
        """
        fingerprint = _check_fingerprint(fingerprint)
        with self._transaction("DEFERRED") as conn:
            return self._composed(conn, fingerprint)[1]

    def spent(self, fingerprint: str, *, delta: float, accountant: AccountantName = "prv") -> float:
        """ε of the dataset's composed history (:meth:`history`): an upper bound per patient.

        ``0.0`` when nothing it composes with was ever charged.

        Raises
        ------
        ConfigError
            If the ledger accounts this dataset at another δ or with another accountant.
        """
        fingerprint = _check_fingerprint(fingerprint)
        delta = validate_delta(delta)
        validate_accountant(accountant)
        with self._transaction("DEFERRED") as conn:
            dataset = self._dataset(conn, fingerprint)
            if dataset is not None:
                self._check_same_accounting(dataset, delta, accountant)
            mechanisms = self._composed_history(conn, *self._affecting(conn, fingerprint)[1:])
        return epsilon(mechanisms, delta=delta, accountant=accountant)

    def has_charge(
        self, fingerprint: str, run_id: str, round: int, *, kind: ChargeKind = "train"
    ) -> ChargeReceipt | None:
        """The charge of ``(fingerprint, run_id, round, kind)``, or ``None`` if never charged."""
        fingerprint = _check_fingerprint(fingerprint)
        run_id, round = _check_key(run_id, round)
        kind = _check_kind(kind)
        with self._transaction("DEFERRED") as conn:
            return self._charge_by_key(conn, fingerprint, run_id, round, kind)

    def count_charges(self, kind: ChargeKind | None = None) -> int:
        """How many charges the ledger holds, over every dataset (of ``kind``, if given).

        A site compares it with the charges its own audit log recorded: fewer here means
        the ledger was replaced by an older or new one (restore it from backup).
        """
        with self._transaction("DEFERRED") as conn:
            if kind is None:
                row = conn.execute("SELECT COUNT(*) FROM charges").fetchone()
            else:
                row = conn.execute(
                    "SELECT COUNT(*) FROM charges WHERE kind = ?", (_check_kind(kind),)
                ).fetchone()
        return int(row[0])

    def summary(self) -> list[DatasetSummary]:
        """Every dataset's account (ε of its composed history), oldest dataset first."""
        with self._transaction("DEFERRED") as conn:
            datasets = [
                _Dataset(*d)
                for d in conn.execute(
                    f"SELECT {_DATASET_COLUMNS} FROM datasets ORDER BY created_at, fingerprint"
                )
            ]
            every = [
                self._receipt(r)
                for r in conn.execute(f"SELECT {self._CHARGE_COLUMNS} FROM charges ORDER BY id")
            ]
            unknown = {d.fingerprint for d in datasets if not d.members}
            affecting: dict[str, set[str] | None] = {}
            for d in datasets:
                if not d.members:
                    affecting[d.fingerprint] = None
                    continue
                rows = conn.execute(
                    "SELECT DISTINCT other.fingerprint FROM members AS mine "
                    "JOIN members AS other ON other.member = mine.member "
                    "WHERE mine.fingerprint = ?",
                    (d.fingerprint,),
                )
                affecting[d.fingerprint] = {r[0] for r in rows} | unknown | {d.fingerprint}
        summaries = []
        for d in datasets:
            within = affecting[d.fingerprint]
            composed = tuple(c for c in every if within is None or c.fingerprint in within)
            summaries.append(
                DatasetSummary(
                    fingerprint=d.fingerprint,
                    epsilon=epsilon(
                        [c.mechanism for c in composed],
                        delta=d.delta,
                        accountant=cast(AccountantName, d.accountant),
                    ),
                    delta=d.delta,
                    accountant=d.accountant,
                    budget_epsilon=d.budget_epsilon,
                    created_at=d.created_at,
                    members=d.members or None,
                    charges=tuple(c for c in every if c.fingerprint == d.fingerprint),
                    composed=composed,
                )
            )
        return summaries

    # ------------------------------------------------------------------ writing

    def charge(
        self,
        *,
        fingerprint: str,
        budget_epsilon: float,
        delta: float,
        accountant: AccountantName,
        mechanism: Mechanism,
        run_id: str,
        round: int,
        kind: ChargeKind = "train",
        ceiling_epsilon: float | None = None,
    ) -> ChargeReceipt:
        """Charge ``mechanism`` to the dataset, atomically, if it fits in the budget.

        Under ``BEGIN IMMEDIATE`` (writers from every process serialise here): compute ε of
        the composed history (:meth:`history`: this dataset's charges and those of every
        dataset sharing a patient with it or of unknown membership) plus ``mechanism``;
        over ``budget_epsilon`` -> raise and write nothing; else insert the charge and
        commit before returning (to the WAL, without an fsync: :meth:`mark_completed` or
        :meth:`mark_failed`, called before anything computed under the charge leaves the
        site, fsyncs it; see "Durability" in the module docstring). Idempotent per
        ``(fingerprint, run_id, round, kind)``: a key already charged (and not completed)
        with the same mechanism returns its existing receipt and pays nothing.

        Parameters
        ----------
        fingerprint:
            The dataset key (:meth:`cohort_key`). A key without registered members is
            composed with every dataset in the ledger (safe, but loose).
        budget_epsilon:
            The site's budget: the most ε any patient of this dataset may reach.
        delta, accountant:
            How the dataset is accounted; fixed by its first charge, and the same as every
            dataset it composes with.
        mechanism:
            What this round will apply: DP-SGD's (σ, q, local steps) for ``"train"``;
            ``Mechanism(noise_multiplier=σ, sample_rate=1.0, steps=1)`` for one Gaussian
            evaluation release.
        run_id, round:
            Which run and round this is.
        kind:
            ``"train"`` (default), ``"evaluate"`` or ``"personalize"`` (a personal model's
            fine-tune); every kind counts towards ε.
        ceiling_epsilon:
            The most ε this charge may bring the dataset to for the run it belongs to (the
            ε before the run plus what the run may add); ``None``: only the budget counts.
            Checked in the same transaction as the budget.

        Returns
        -------
        ChargeReceipt
            With ``epsilon_before`` / ``epsilon_after`` and the ``charge_id``.

        Raises
        ------
        PrivacyBudgetExceeded
            If ε(composed history + mechanism) > ``budget_epsilon`` or ``ceiling_epsilon``;
            nothing is written.
        PolicyViolation
            If the key's charge is already completed (a second release of that round).
        ConfigError
            On a δ/accountant mismatch with this dataset or any dataset it composes with,
            a different mechanism for an existing key, or invalid arguments.
        """
        fingerprint = _check_fingerprint(fingerprint)
        run_id, round = _check_key(run_id, round)
        kind = _check_kind(kind)
        if (
            isinstance(budget_epsilon, bool)
            or not isinstance(budget_epsilon, (int, float))
            or not (math.isfinite(budget_epsilon) and budget_epsilon > 0)
        ):
            raise ConfigError(
                f"budget epsilon must be a finite number > 0, got {budget_epsilon!r}; "
                "set the site's privacy budget in its policy"
            )
        budget_epsilon = float(budget_epsilon)
        delta = validate_delta(delta)
        validate_accountant(accountant)
        if not isinstance(mechanism, Mechanism):
            raise ConfigError(f"expected a Mechanism, got {type(mechanism).__name__}")

        load_accountant(accountant)  # its imports, before the lock that others wait on
        # NORMAL: committed to the WAL (every process sees it, a SIGKILL cannot undo it)
        # without an fsync of its own; the completion or failure of this charge (FULL),
        # which comes before anything computed under it leaves the site, fsyncs it.
        with self._transaction("IMMEDIATE", sync="NORMAL") as conn:
            now = self._now()
            dataset = self._dataset(conn, fingerprint)
            if dataset is not None:
                self._check_same_accounting(dataset, delta, accountant)
                existing = self._charge_by_key(conn, fingerprint, run_id, round, kind)
                if existing is not None:
                    return self._retry(existing, mechanism)
            has_members, where, params = self._affecting(conn, fingerprint)
            datasets = [
                _Dataset(*d)
                for d in conn.execute(
                    f"SELECT {_DATASET_KNOWN_COLUMNS} FROM datasets {where} "
                    "ORDER BY created_at, fingerprint",
                    params,
                )
            ]
            self._check_composable(fingerprint, has_members, datasets, delta, accountant)
            history = self._composed_history(conn, where, params)
            before = epsilon(history, delta=delta, accountant=accountant)
            after = epsilon([*history, mechanism], delta=delta, accountant=accountant)
            if not after <= budget_epsilon:  # NaN is over budget too
                others = len({d.fingerprint for d in datasets} - {fingerprint})
                raise PrivacyBudgetExceeded(
                    f"refusing {kind} charge of run {run_id!r} round {round}: "
                    f"{mechanism.steps} steps (noise {mechanism.noise_multiplier:.4g}, sample "
                    f"rate {mechanism.sample_rate:.4g}) would take dataset "
                    f"{fingerprint[:16]}... from epsilon={before:.4g} to {after:.4g} "
                    f"(delta={delta:g}, {accountant}; composed with {others} overlapping "
                    f"dataset(s)), over the site budget epsilon={budget_epsilon:g}; nothing "
                    "was charged. Fix: plan fewer rounds or steps, or more noise; or raise "
                    "the site's budget (a policy decision); or use patients no earlier "
                    "dataset held"
                )
            if ceiling_epsilon is not None and not after <= ceiling_epsilon:
                raise PrivacyBudgetExceeded(
                    f"refusing {kind} charge of run {run_id!r} round {round}: it would take "
                    f"dataset {fingerprint[:16]}... from epsilon={before:.4g} to {after:.4g}, "
                    f"past the epsilon={ceiling_epsilon:.4g} this run may reach (its start "
                    "plus the epsilon it asked to add); nothing was charged. Fix: start a new "
                    "run with a plan that fits"
                )
            if dataset is None:
                conn.execute(
                    "INSERT INTO datasets (fingerprint, delta, accountant, budget_epsilon, "
                    "created_at) VALUES (?, ?, ?, ?, ?)",
                    (fingerprint, delta, accountant, budget_epsilon, now),
                )
            cursor = conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, kind, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'charged', ?)",
                (
                    fingerprint,
                    run_id,
                    round,
                    kind,
                    mechanism.noise_multiplier,
                    mechanism.sample_rate,
                    mechanism.steps,
                    delta,
                    accountant,
                    budget_epsilon,
                    before,
                    after,
                    now,
                ),
            )
            if dataset is not None and dataset.budget_epsilon != budget_epsilon:
                conn.execute(
                    "UPDATE datasets SET budget_epsilon = ? WHERE fingerprint = ?",
                    (budget_epsilon, fingerprint),
                )
            charge_id = cast(int, cursor.lastrowid)  # set by every INSERT
        # The transaction has committed: every process sees the charge, and no crash of
        # this one can undo it; its completion or failure puts it on disk (fsync).
        return ChargeReceipt(
            charge_id=charge_id,
            fingerprint=fingerprint,
            run_id=run_id,
            round=round,
            kind=kind,
            mechanism=mechanism,
            delta=delta,
            accountant=accountant,
            budget_epsilon=budget_epsilon,
            epsilon_before=before,
            epsilon_after=after,
            status="charged",
            created_at=now,
        )

    def _retry(self, existing: ChargeReceipt, mechanism: Mechanism) -> ChargeReceipt:
        """The receipt a retried key gets back, or the reason it cannot be retried."""
        key = f"{existing.kind} charge of run {existing.run_id!r} round {existing.round}"
        if existing.mechanism != mechanism:
            raise ConfigError(
                f"the {key} of dataset {existing.fingerprint[:16]}... was charged as "
                f"{existing.mechanism} (charge #{existing.charge_id}) but is now requested as "
                f"{mechanism}; a retried round must apply the same mechanism. Fix: retry "
                "with the original plan, or start a new run id"
            )
        if existing.status == "failed":
            raise PolicyViolation(
                f"the {key} of dataset {existing.fingerprint[:16]}... failed after it had "
                f"touched the data (charge #{existing.charge_id}); whether it failed can "
                "depend on the patients (weights crafted to overflow on one patient), so the "
                "key is spent and is not retried under the same charge. Fix: continue with "
                "the next round, or start a new run id"
            )
        if existing.status == "completed":
            redo = {"train": "training", "evaluate": "evaluating"}.get(existing.kind, "fine-tuning")
            raise PolicyViolation(
                f"the {key} of dataset {existing.fingerprint[:16]}... already completed "
                f"(charge #{existing.charge_id}) and its output may have left the site; "
                f"{redo} it again would release a second output under the same charge. "
                "Fix: continue with the next round, or start a new run id"
            )
        return existing

    def _set_status(
        self, charge_id: int, status: ChargeStatus, metrics: Mapping[str, Any] | None
    ) -> ChargeReceipt:
        if isinstance(charge_id, bool) or not isinstance(charge_id, int):
            raise ConfigError(f"charge_id must be an int, got {charge_id!r}")
        metrics_json = None
        if metrics is not None:
            try:
                metrics_json = json.dumps(dict(metrics), allow_nan=False, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise ConfigError(
                    f"metrics of charge #{charge_id} must be JSON numbers/strings, finite: {e}"
                ) from e
        with self._transaction("IMMEDIATE") as conn:
            # Settle a charge that is still "charged", then read it back in the same
            # transaction (no UPDATE ... RETURNING: that needs SQLite 3.35, and RHEL 9's
            # Python links 3.34).
            updated = conn.execute(
                "UPDATE charges SET status = ?, completed_at = ?, metrics = ? "
                "WHERE id = ? AND status = 'charged'",
                (status, self._now(), metrics_json, charge_id),
            ).rowcount
            if updated != 1:
                self._unsettleable(conn, charge_id, status)
            row = conn.execute(
                f"SELECT {self._CHARGE_COLUMNS} FROM charges WHERE id = ?", (charge_id,)
            ).fetchone()
        return self._receipt(row)

    def _unsettleable(
        self, conn: sqlite3.Connection, charge_id: int, status: ChargeStatus
    ) -> NoReturn:
        """Raise why charge ``charge_id`` could not move to ``status``: it does not exist, or
        it was settled already (it is not ``"charged"``)."""
        row = conn.execute(
            f"SELECT {self._CHARGE_COLUMNS} FROM charges WHERE id = ?", (charge_id,)
        ).fetchone()
        if row is None:
            raise ConfigError(
                f"privacy ledger {self.path} has no charge #{charge_id}; use the "
                "charge_id of the receipt that charge() returned"
            )
        current = self._receipt(row)
        if current.status == status:
            # Settled already: by another process that took over the same key as a
            # retry while this one still ran (charge() cannot tell a live process from
            # a dead one), or by an earlier call. Its output may have left the site, so
            # this caller's must not: one release per charge.
            raise PolicyViolation(
                f"charge #{charge_id} ({current.kind} of run {current.run_id!r} round "
                f"{current.round}) is already {status!r}: another attempt at the same "
                "round settled it and its output may have left the site; this attempt's "
                "output is withheld. Fix: run one site worker per site"
            )
        # "failed" is final: whether a round failed can depend on the patients, so a
        # failed key is never retried into a release (see _retry).
        raise PolicyViolation(
            f"charge #{charge_id} is already {current.status!r}; it cannot become "
            f"{status!r} (another attempt at the round settled it)"
        )

    def mark_completed(
        self, charge_id: int, *, metrics: Mapping[str, Any] | None = None
    ) -> ChargeReceipt:
        """Mark a charge's round as trained (status only; the charge still counts).

        Call it before the round's update leaves the site: when it returns, the charge and
        its completion are on disk (the commit fsyncs the WAL). A charge is settled once:
        completing one already completed raises
        :class:`~fedcare.common.errors.PolicyViolation` (two attempts at one round, one
        release).
        """
        return self._set_status(charge_id, "completed", metrics)

    def mark_failed(
        self, charge_id: int, *, metrics: Mapping[str, Any] | None = None
    ) -> ChargeReceipt:
        """Mark a charge's round as failed before any release (the charge still counts).

        A failed key is final: :meth:`charge` refuses to retry it (whether a round failed
        can depend on the patients). A key left ``charged`` by a process that died is
        retried without paying again. When it returns, the charge and its failure are on
        disk (the commit fsyncs the WAL), so the failure may be reported.
        """
        return self._set_status(charge_id, "failed", metrics)


def _check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ConfigError(
            f"dataset key (fingerprint) must be a hex string (8-128 digits), got "
            f"{fingerprint!r}; use PrivacyLedger.cohort_key(patient_ids)"
        )
    return fingerprint.lower()


def _check_key(run_id: str, round_: int) -> tuple[str, int]:
    if not isinstance(run_id, str) or not run_id.strip():
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ConfigError(f"round must be an integer >= 0, got {round_!r}")
    return run_id, round_


def _check_kind(kind: str) -> ChargeKind:
    if kind not in CHARGE_KINDS:
        raise ConfigError(
            f"charge kind must be one of {list(CHARGE_KINDS)}, got {kind!r}; use 'train' for "
            "a DP-SGD round, 'evaluate' for a noisy evaluation release and 'personalize' for "
            "a personal model's fine-tune"
        )
    return cast(ChargeKind, kind)


def _same_accounting(dataset: _Dataset, delta: float, accountant: str) -> bool:
    return math.isclose(dataset.delta, delta, rel_tol=1e-12) and dataset.accountant == accountant


def _cohort_digest(salt: bytes, ordered: list[bytes]) -> str:
    """HMAC-SHA256 over a count, then each id length-prefixed: an injective encoding."""
    mac = hmac.new(salt, _COHORT_TAG, hashlib.sha256)
    mac.update(len(ordered).to_bytes(8, "big"))
    for raw in ordered:
        mac.update(len(raw).to_bytes(8, "big"))
        mac.update(raw)
    return mac.hexdigest()


def _member_digest(salt: bytes, raw_id: bytes) -> str:
    return hmac.new(salt, _MEMBER_TAG + raw_id, hashlib.sha256).hexdigest()
