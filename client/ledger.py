"""The site's durable privacy-budget ledger: every DP-SGD mechanism a dataset went through.

One SQLite file per site (stdlib :mod:`sqlite3`, WAL journal, ``synchronous=FULL``,
schema versioned with ``PRAGMA user_version``). Datasets are keyed by the fingerprint of
their files (:attr:`client.data.site.SiteData.fingerprint`); each dataset is accounted at
one δ with one accountant, and its ε is always the composition of its **whole** history
(:func:`client.accounting.epsilon`), across runs.

The protocol a site follows for one round::

    receipt = ledger.charge(fingerprint=fp, budget_epsilon=budget, delta=delta,
                            accountant="prv", mechanism=plan, run_id=run, round=r)
    ...train (DP-SGD with exactly ``plan``)...
    ledger.mark_completed(receipt.charge_id)   # BEFORE the update leaves the site
    ...reply with the update...

:meth:`PrivacyLedger.charge` is atomic: under ``BEGIN IMMEDIATE`` (one writer at a time,
across processes; others wait up to ``busy_timeout_s``) it computes ε of history + the
new mechanism, refuses with :class:`~common.errors.PrivacyBudgetExceeded` (writing nothing)
if that exceeds the budget, else inserts the charge and **commits before returning**. The
charge therefore exists before training starts, and a crash can never under-count.

Charges are append-only (SQL triggers reject deleting a charge or rewriting its mechanism);
only the status moves: ``charged`` -> ``completed`` or ``failed``. Neither changes ε.

Idempotency is per ``(fingerprint, run_id, round)``: charging a key again with the same
mechanism returns the existing receipt without paying twice, so a run that resumes after a
crash can retry its round. That is sound only while the earlier attempt released nothing;
hence a key whose charge is ``completed`` (its update may have left the site) cannot be
charged again (:class:`~common.errors.PolicyViolation`): retraining it would be a second
release. Mark a round completed before its update leaves the site.

WAL needs a local filesystem (not NFS/SMB): keep the ledger on the site's own disk.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

from client.accounting import (
    AccountantName,
    Mechanism,
    epsilon,
    validate_accountant,
    validate_delta,
)
from common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded

__all__ = [
    "SCHEMA_VERSION",
    "ChargeStatus",
    "ChargeReceipt",
    "DatasetSummary",
    "PrivacyLedger",
]

SCHEMA_VERSION = 1
ChargeStatus = Literal["charged", "completed", "failed"]

_FINGERPRINT = re.compile(r"[0-9a-fA-F]{8,128}")

_SCHEMA: tuple[str, ...] = (
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
    CREATE TABLE charges (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint      TEXT NOT NULL REFERENCES datasets (fingerprint),
        run_id           TEXT NOT NULL,
        round            INTEGER NOT NULL CHECK (round >= 0),
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
        UNIQUE (fingerprint, run_id, round)
    )
    """,
    "CREATE INDEX charges_by_dataset ON charges (fingerprint, id)",
    """
    CREATE TRIGGER charges_no_delete BEFORE DELETE ON charges
    BEGIN SELECT RAISE(ABORT, 'privacy ledger charges are append-only'); END
    """,
    """
    CREATE TRIGGER charges_immutable BEFORE UPDATE OF
        id, fingerprint, run_id, round, noise_multiplier, sample_rate, steps, delta,
        accountant, budget_epsilon, epsilon_before, epsilon_after, created_at
    ON charges
    BEGIN SELECT RAISE(ABORT, 'a privacy ledger charge cannot be rewritten'); END
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
_TABLES = frozenset({"datasets", "charges"})


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ChargeReceipt:
    """One charge as the ledger holds it.

    Attributes
    ----------
    charge_id:
        Row id; pass it to :meth:`PrivacyLedger.mark_completed`.
    fingerprint, run_id, round:
        The idempotency key.
    mechanism:
        What the round applies.
    delta, accountant:
        How the dataset is accounted.
    budget_epsilon:
        The budget the charge was checked against.
    epsilon_before, epsilon_after:
        ε of the dataset's history just before and just after this charge.
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
            "run_id": self.run_id,
            "round": self.round,
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
    """A dataset's whole account: ε of its history and every charge, oldest first."""

    fingerprint: str
    epsilon: float
    delta: float
    accountant: str
    budget_epsilon: float | None
    created_at: str
    charges: tuple[ChargeReceipt, ...]

    @property
    def mechanisms(self) -> tuple[Mechanism, ...]:
        """The history, in charge order."""
        return tuple(c.mechanism for c in self.charges)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "fingerprint": self.fingerprint,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "budget_epsilon": self.budget_epsilon,
            "created_at": self.created_at,
            "total_steps": sum(m.steps for m in self.mechanisms),
            "charges": [c.to_dict() for c in self.charges],
        }


class PrivacyLedger:
    """A site's privacy-budget ledger in one SQLite file.

    Each method opens its own short-lived connection, so one instance may be shared by
    threads, and every process (or thread) may hold its own instance on the same file.

    Parameters
    ----------
    path:
        The ledger file; created (with its parent folders) when missing and ``create``.
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
        If the file is missing (``create=False``), is not a SQLite database, is another
        program's database, or was written by a newer fedcare.
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
        if self.path.is_dir():
            raise ConfigError(
                f"privacy ledger path {self.path} is a folder; give the ledger file, "
                "e.g. <site>/privacy-ledger.sqlite"
            )
        if not self.path.exists():
            if not create:
                raise ConfigError(
                    f"no privacy ledger at {self.path}; pass the path of the site's ledger "
                    "file (it is created by the site's first DP training round)"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._initialise(create=create)

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
                "point the ledger path at the site's ledger file. Never delete a real ledger: "
                "it is the only record of the privacy already spent"
            )
        return ConfigError(f"privacy ledger {self.path}: SQLite error: {text}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None
            )
        except sqlite3.Error as e:
            raise self._error(e) from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        except sqlite3.Error as e:
            raise self._error(e) from e
        finally:
            conn.close()

    @contextmanager
    def _transaction(self, kind: Literal["IMMEDIATE", "DEFERRED"]) -> Iterator[sqlite3.Connection]:
        """One explicit transaction; committed on normal exit, rolled back on any error."""
        with self._connect() as conn:
            conn.execute(f"BEGIN {kind}")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _initialise(self, *, create: bool) -> None:
        with self._connect() as conn:
            if create:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigError(
                        f"privacy ledger {self.path} cannot use SQLite's WAL journal "
                        f"(got {mode!r}); keep the ledger on a local disk, not a network share"
                    )
            conn.execute("BEGIN IMMEDIATE" if create else "BEGIN DEFERRED")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {
                    r[0]
                    for r in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%'"
                    )
                }
                if version == 0 and not tables and create:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                elif version == 0 and not tables:
                    raise ConfigError(
                        f"{self.path} is an empty database, not a privacy ledger; pass the "
                        "path of the site's ledger file"
                    )
                elif version > SCHEMA_VERSION:
                    raise ConfigError(
                        f"privacy ledger {self.path} has schema version {version}, newer than "
                        f"this fedcare's {SCHEMA_VERSION}; upgrade fedcare at this site"
                    )
                elif version != SCHEMA_VERSION or not tables >= _TABLES:
                    raise ConfigError(
                        f"{self.path} is an SQLite database but not a fedcare privacy ledger "
                        f"(user_version {version}, tables {sorted(tables)}); point the ledger "
                        "path at the site's ledger file or at a new file"
                    )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _now(self) -> str:
        now = self._clock()
        if now.tzinfo is None:
            raise ConfigError("the ledger clock must return timezone-aware datetimes (UTC)")
        return now.astimezone(timezone.utc).isoformat(timespec="microseconds")

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _receipt(row: sqlite3.Row | tuple[Any, ...]) -> ChargeReceipt:
        (
            charge_id,
            fingerprint,
            run_id,
            round_,
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
        "id, fingerprint, run_id, round, noise_multiplier, sample_rate, steps, delta, "
        "accountant, budget_epsilon, epsilon_before, epsilon_after, status, metrics, "
        "created_at, completed_at"
    )

    def _charges(self, conn: sqlite3.Connection, fingerprint: str) -> list[ChargeReceipt]:
        rows = conn.execute(
            f"SELECT {self._CHARGE_COLUMNS} FROM charges WHERE fingerprint = ? ORDER BY id",
            (fingerprint,),
        ).fetchall()
        return [self._receipt(r) for r in rows]

    def _charge_by_key(
        self, conn: sqlite3.Connection, fingerprint: str, run_id: str, round_: int
    ) -> ChargeReceipt | None:
        row = conn.execute(
            f"SELECT {self._CHARGE_COLUMNS} FROM charges "
            "WHERE fingerprint = ? AND run_id = ? AND round = ?",
            (fingerprint, run_id, round_),
        ).fetchone()
        return None if row is None else self._receipt(row)

    @staticmethod
    def _dataset(conn: sqlite3.Connection, fingerprint: str) -> tuple[Any, ...] | None:
        return conn.execute(
            "SELECT fingerprint, delta, accountant, budget_epsilon, created_at "
            "FROM datasets WHERE fingerprint = ?",
            (fingerprint,),
        ).fetchone()

    def _check_same_accounting(
        self, dataset: tuple[Any, ...], delta: float, accountant: str
    ) -> None:
        fingerprint, ledger_delta, ledger_accountant = dataset[0], dataset[1], dataset[2]
        if not math.isclose(ledger_delta, delta, rel_tol=1e-12) or ledger_accountant != accountant:
            raise ConfigError(
                f"dataset {fingerprint[:16]}... is accounted in {self.path} at "
                f"delta={ledger_delta:g} with the {ledger_accountant!r} accountant, but this "
                f"request uses delta={delta:g} with {accountant!r}; one dataset's history "
                "must be composed at one delta with one accountant. Fix: set the site's "
                f"delta to {ledger_delta:g} and accountant to {ledger_accountant!r}"
            )

    def history(self, fingerprint: str) -> list[Mechanism]:
        """Every mechanism charged to ``fingerprint``, oldest first (empty if unknown)."""
        fingerprint = _check_fingerprint(fingerprint)
        with self._transaction("DEFERRED") as conn:
            return [c.mechanism for c in self._charges(conn, fingerprint)]

    def charges(self, fingerprint: str) -> list[ChargeReceipt]:
        """Every charge of ``fingerprint`` with its run and round, oldest first."""
        fingerprint = _check_fingerprint(fingerprint)
        with self._transaction("DEFERRED") as conn:
            return self._charges(conn, fingerprint)

    def spent(self, fingerprint: str, *, delta: float, accountant: AccountantName = "prv") -> float:
        """ε of the dataset's whole history (0.0 for an unknown dataset).

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
            if dataset is None:
                return 0.0
            self._check_same_accounting(dataset, delta, accountant)
            mechanisms = [c.mechanism for c in self._charges(conn, fingerprint)]
        return epsilon(mechanisms, delta=delta, accountant=accountant)

    def has_charge(self, fingerprint: str, run_id: str, round: int) -> ChargeReceipt | None:
        """The charge of ``(fingerprint, run_id, round)``, or ``None`` if never charged."""
        fingerprint = _check_fingerprint(fingerprint)
        run_id, round = _check_key(run_id, round)
        with self._transaction("DEFERRED") as conn:
            return self._charge_by_key(conn, fingerprint, run_id, round)

    def summary(self) -> list[DatasetSummary]:
        """Every dataset's account (ε of its whole history), oldest dataset first."""
        with self._transaction("DEFERRED") as conn:
            datasets = conn.execute(
                "SELECT fingerprint, delta, accountant, budget_epsilon, created_at "
                "FROM datasets ORDER BY created_at, fingerprint"
            ).fetchall()
            charges = {d[0]: self._charges(conn, d[0]) for d in datasets}
        summaries = []
        for fingerprint, delta, accountant, budget, created_at in datasets:
            mine = tuple(charges[fingerprint])
            summaries.append(
                DatasetSummary(
                    fingerprint=fingerprint,
                    epsilon=epsilon(
                        [c.mechanism for c in mine], delta=delta, accountant=accountant
                    ),
                    delta=delta,
                    accountant=accountant,
                    budget_epsilon=budget,
                    created_at=created_at,
                    charges=mine,
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
    ) -> ChargeReceipt:
        """Charge ``mechanism`` to the dataset, atomically, if it fits in the budget.

        Under ``BEGIN IMMEDIATE`` (writers from every process serialise here): compute ε of
        the history plus ``mechanism``; over ``budget_epsilon`` -> raise and write nothing;
        else insert the charge and commit before returning. Idempotent per
        ``(fingerprint, run_id, round)``: a key already charged (and not completed) with
        the same mechanism returns its existing receipt and pays nothing.

        Parameters
        ----------
        fingerprint:
            The dataset's fingerprint (hex).
        budget_epsilon:
            The site's budget for this dataset: the most ε its whole history may reach.
        delta, accountant:
            How the dataset is accounted; fixed by its first charge.
        mechanism:
            What this round will apply (σ, q, local steps of the round).
        run_id, round:
            Which run and round this is.

        Returns
        -------
        ChargeReceipt
            With ``epsilon_before`` / ``epsilon_after`` and the ``charge_id``.

        Raises
        ------
        PrivacyBudgetExceeded
            If ε(history + mechanism) > ``budget_epsilon``; nothing is written.
        PolicyViolation
            If the key's charge is already completed (a second release of that round).
        ConfigError
            On a δ/accountant mismatch with the ledger, a different mechanism for an
            existing key, or invalid arguments.
        """
        fingerprint = _check_fingerprint(fingerprint)
        run_id, round = _check_key(run_id, round)
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

        with self._transaction("IMMEDIATE") as conn:
            now = self._now()
            dataset = self._dataset(conn, fingerprint)
            if dataset is None:
                conn.execute(
                    "INSERT INTO datasets (fingerprint, delta, accountant, budget_epsilon, "
                    "created_at) VALUES (?, ?, ?, ?, ?)",
                    (fingerprint, delta, accountant, budget_epsilon, now),
                )
            else:
                self._check_same_accounting(dataset, delta, accountant)
                existing = self._charge_by_key(conn, fingerprint, run_id, round)
                if existing is not None:
                    return self._retry(existing, mechanism)
            history = [c.mechanism for c in self._charges(conn, fingerprint)]
            before = epsilon(history, delta=delta, accountant=accountant)
            after = epsilon([*history, mechanism], delta=delta, accountant=accountant)
            if after > budget_epsilon:
                raise PrivacyBudgetExceeded(
                    f"refusing run {run_id!r} round {round}: {mechanism.steps} DP-SGD steps "
                    f"(noise {mechanism.noise_multiplier:.4g}, sample rate "
                    f"{mechanism.sample_rate:.4g}) would take dataset {fingerprint[:16]}... "
                    f"from epsilon={before:.4g} to {after:.4g} (delta={delta:g}, {accountant}), "
                    f"over the site budget epsilon={budget_epsilon:g}; nothing was charged. "
                    "Fix: plan fewer rounds or steps, or more noise; or raise the site's "
                    "budget (a policy decision); or use a new dataset"
                )
            cursor = conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'charged', ?)",
                (
                    fingerprint,
                    run_id,
                    round,
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
            conn.execute(
                "UPDATE datasets SET budget_epsilon = ? WHERE fingerprint = ?",
                (budget_epsilon, fingerprint),
            )
            charge_id = cast(int, cursor.lastrowid)  # set by every INSERT
        # The transaction has committed: the charge is durable before training starts.
        return ChargeReceipt(
            charge_id=charge_id,
            fingerprint=fingerprint,
            run_id=run_id,
            round=round,
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
        key = f"run {existing.run_id!r} round {existing.round}"
        if existing.mechanism != mechanism:
            raise ConfigError(
                f"{key} of dataset {existing.fingerprint[:16]}... was charged as "
                f"{existing.mechanism} (charge #{existing.charge_id}) but is now requested as "
                f"{mechanism}; a retried round must apply the same mechanism. Fix: retry "
                "with the original plan, or start a new run id"
            )
        if existing.status == "completed":
            raise PolicyViolation(
                f"{key} of dataset {existing.fingerprint[:16]}... already completed "
                f"(charge #{existing.charge_id}) and its update may have left the site; "
                "training it again would release a second output under the same charge. "
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
                return current
            retried = current.status == "failed" and status == "completed"
            if current.status != "charged" and not retried:
                raise ConfigError(
                    f"charge #{charge_id} is already {current.status!r}; it cannot become "
                    f"{status!r}"
                )
            now = self._now()
            conn.execute(
                "UPDATE charges SET status = ?, completed_at = ?, metrics = ? WHERE id = ?",
                (status, now, metrics_json, charge_id),
            )
            row = conn.execute(
                f"SELECT {self._CHARGE_COLUMNS} FROM charges WHERE id = ?", (charge_id,)
            ).fetchone()
        return self._receipt(row)

    def mark_completed(
        self, charge_id: int, *, metrics: Mapping[str, Any] | None = None
    ) -> ChargeReceipt:
        """Mark a charge's round as trained (status only; the charge still counts).

        Call it before the round's update leaves the site. Completing an already completed
        charge returns it unchanged.
        """
        return self._set_status(charge_id, "completed", metrics)

    def mark_failed(
        self, charge_id: int, *, metrics: Mapping[str, Any] | None = None
    ) -> ChargeReceipt:
        """Mark a charge's round as failed before any release (the charge still counts).

        A failed key may be retried with :meth:`charge` without paying again.
        """
        return self._set_status(charge_id, "failed", metrics)


def _check_fingerprint(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ConfigError(
            f"dataset fingerprint must be a hex string (8-128 digits), got {fingerprint!r}; "
            "use SiteData.fingerprint"
        )
    return fingerprint.lower()


def _check_key(run_id: str, round_: int) -> tuple[str, int]:
    if not isinstance(run_id, str) or not run_id.strip():
        raise ConfigError(f"run_id must be a non-empty string, got {run_id!r}")
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise ConfigError(f"round must be an integer >= 0, got {round_!r}")
    return run_id, round_
