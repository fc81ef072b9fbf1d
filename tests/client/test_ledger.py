"""fedcare.client.ledger: ε against an independent accountant, cohort composition, atomic refusal,
crash safety, races, schema migration.

ε reported by the ledger is compared with Google's ``dp_accounting`` PLD accountant run on
the ledger's own mechanism list (tolerance explained in ``test_accounting.py``:
``pld - 1e-3 <= prv <= pld + 2 * eps_error + 1e-3``). Cohort keys are recomputed here from
the salt stored in the file with :mod:`hmac`, following the documented encoding.
Multi-process tests run a real child process against the same file: 'fork' children (fast;
the parent has already imported Opacus) always, fresh interpreters ('spawn' /
``python -c``) under the ``slow`` marker. The v1 -> v2 migration starts from a file built by
the v1 schema's own DDL, copied below.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    epsilon,
    independent_epsilon,
    prv_eps_error,
)
from fedcare.client.budget_cli import budget_show
from fedcare.client.ledger import SCHEMA_VERSION, PrivacyLedger
from fedcare.common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded

DELTA = 1e-5
COHORT = tuple(f"p{i:03d}" for i in range(20))
OTHER_COHORT = tuple(f"q{i:03d}" for i in range(12))
LEGACY_FP = "0123456789abcdef" * 4  # a v1-style file fingerprint: no registered members
M = Mechanism
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "privacy-ledger.sqlite"


@pytest.fixture()
def ledger(ledger_path: Path) -> PrivacyLedger:
    return PrivacyLedger(ledger_path)


@pytest.fixture()
def key(ledger: PrivacyLedger) -> str:
    return ledger.cohort_key(COHORT)


@pytest.fixture()
def other_key(ledger: PrivacyLedger) -> str:
    return ledger.cohort_key(OTHER_COHORT)


def charge(
    ledger: PrivacyLedger,
    mechanism: Mechanism,
    *,
    fingerprint: str,
    run_id: str = "run-a",
    round: int = 0,
    budget: float = 10.0,
    accountant: str = "prv",
    delta: float = DELTA,
    kind: str = "train",
):
    return ledger.charge(
        fingerprint=fingerprint,
        budget_epsilon=budget,
        delta=delta,
        accountant=accountant,  # type: ignore[arg-type]
        mechanism=mechanism,
        run_id=run_id,
        round=round,  # type: ignore[arg-type]
        kind=kind,  # type: ignore[arg-type]
    )


def raw_count(path: Path, table: str = "charges") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def stored_salt(path: Path) -> bytes:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT value FROM meta WHERE name = 'salt'").fetchone()[0]


def reference_key(salt: bytes, ids: list[str]) -> str:
    """The documented encoding, written out independently of the module."""
    encoded = sorted({i.encode("utf-8") for i in ids})
    message = b"fedcare-cohort:" + len(encoded).to_bytes(8, "big")
    for raw in encoded:
        message += len(raw).to_bytes(8, "big") + raw
    return hmac.new(salt, message, hashlib.sha256).hexdigest()


def assert_matches_pld(mechanisms: list[Mechanism], reported: float) -> None:
    pld = independent_epsilon(mechanisms, delta=DELTA)
    e = prv_eps_error(mechanisms, delta=DELTA)
    assert pld - PLD_DISCRETIZATION <= reported <= pld + 2 * e + PLD_DISCRETIZATION, (reported, pld)


# ----------------------------------------------------------------------- accounting


def test_ledger_epsilon_is_the_composition_of_every_run(ledger: PrivacyLedger, key: str) -> None:
    plan = [
        ("run-a", 0, M(1.1, 0.02, 100)),
        ("run-a", 1, M(1.1, 0.02, 100)),
        ("run-b", 0, M(1.5, 0.05, 150)),
        ("run-c", 0, M(0.9, 0.01, 80)),
    ]
    receipts = [charge(ledger, m, fingerprint=key, run_id=r, round=k) for r, k, m in plan]
    history = ledger.history(key)
    assert history == [m for _, _, m in plan]
    spent = ledger.spent(key, delta=DELTA, accountant="prv")
    assert_matches_pld(history, spent)
    # Receipts chain: each charge starts where the previous one ended.
    assert receipts[0].epsilon_before == 0.0
    for earlier, later in zip(receipts, receipts[1:], strict=False):
        assert later.epsilon_before == pytest.approx(earlier.epsilon_after)
        assert later.epsilon_after > earlier.epsilon_after
    assert receipts[-1].epsilon_after == pytest.approx(spent)
    # The summary reports the same composition, per dataset.
    (summary,) = ledger.summary()
    assert summary.fingerprint == key and summary.delta == DELTA
    assert summary.accountant == "prv" and summary.budget_epsilon == 10.0
    assert summary.members == len(COHORT) and summary.overlapping == ()
    assert list(summary.mechanisms) == history
    assert summary.epsilon == pytest.approx(spent)


def test_history_survives_reopening_and_disjoint_cohorts_are_separate(
    ledger_path: Path,
) -> None:
    first = PrivacyLedger(ledger_path)
    key, other = first.cohort_key(COHORT), first.cohort_key(OTHER_COHORT)
    charge(first, M(1.0, 0.02, 50), fingerprint=key)
    charge(PrivacyLedger(ledger_path), M(2.0, 0.1, 30), fingerprint=other)
    reopened = PrivacyLedger(ledger_path)
    assert reopened.cohort_key(reversed(COHORT)) == key  # the salt travelled with the file
    assert reopened.history(key) == [M(1.0, 0.02, 50)]
    assert reopened.history(other) == [M(2.0, 0.1, 30)]
    untouched = reopened.cohort_key(["r-1", "r-2"])
    assert reopened.history(untouched) == []
    assert reopened.spent(untouched, delta=DELTA, accountant="prv") == 0.0
    assert_matches_pld([M(2.0, 0.1, 30)], reopened.spent(other, delta=DELTA))
    assert {s.fingerprint for s in reopened.summary()} == {key, other}


def test_file_uses_wal_and_a_schema_version(ledger: PrivacyLedger) -> None:
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


# ---------------------------------------------------------------------- cohort keys


def test_cohort_key_is_an_hmac_of_the_id_set_under_the_stored_salt(
    ledger: PrivacyLedger,
) -> None:
    ids = ["b-7", "a-1", "c-3", "a-1"]
    key = ledger.cohort_key(ids)
    salt = stored_salt(ledger.path)
    assert len(salt) == 32
    assert key == reference_key(salt, ids)
    assert len(key) == 64 and key == key.lower()
    # Members are HMAC(salt, "member:" + id), registered once however often the key is made.
    assert ledger.cohort_key(sorted(set(ids))) == key
    with sqlite3.connect(ledger.path) as conn:
        members = conn.execute("SELECT fingerprint, member FROM members").fetchall()
    expected = {
        (key, hmac.new(salt, b"member:" + i.encode(), hashlib.sha256).hexdigest()) for i in set(ids)
    }
    assert sorted(members) == sorted(expected)


def test_cohort_encoding_is_unambiguous(ledger: PrivacyLedger) -> None:
    # Concatenations that a naive join would confuse give different keys.
    keys = {
        ledger.cohort_key(["ab", "c"]),
        ledger.cohort_key(["a", "bc"]),
        ledger.cohort_key(["abc"]),
        ledger.cohort_key(["a,b", "c"]),
        ledger.cohort_key(["a", "b,c"]),
    }
    assert len(keys) == 5


def test_another_ledger_gives_the_same_cohort_another_key(tmp_path: Path) -> None:
    a = PrivacyLedger(tmp_path / "a.sqlite")
    b = PrivacyLedger(tmp_path / "b.sqlite")
    assert stored_salt(a.path) != stored_salt(b.path)
    assert a.cohort_key(COHORT) != b.cohort_key(COHORT)


@pytest.mark.parametrize(
    ("ids", "word"),
    [("p001", "not one string"), ([], "at least one"), (["p1", ""], "empty"), (["p1", 7], "int")],
)
def test_cohort_key_validates_ids(ledger: PrivacyLedger, ids: Any, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        ledger.cohort_key(ids)
    assert raw_count(ledger.path, "members") == 0


# ---------------------------------------------------------- overlapping cohorts compose


def test_overlapping_cohorts_compose_and_disjoint_ones_do_not(ledger: PrivacyLedger) -> None:
    a = ledger.cohort_key(["p1", "p2", "p3"])
    b = ledger.cohort_key(["p3", "p4"])  # shares p3 with a
    c = ledger.cohort_key(["p5"])  # disjoint from both
    d = ledger.cohort_key(["p4", "p6"])  # shares p4 with b, nothing with a
    ma, mb, mc = M(1.0, 0.02, 50), M(1.2, 0.05, 40), M(2.0, 0.1, 30)
    ra = charge(ledger, ma, fingerprint=a)
    charge(ledger, mc, fingerprint=c)
    assert ledger.charges(b) == []  # own charges only
    assert ledger.charges_affecting(b) == [ra]
    assert ledger.history(b) == [ma]
    assert ledger.spent(b, delta=DELTA) == pytest.approx(ra.epsilon_after)
    rb = charge(ledger, mb, fingerprint=b)
    assert rb.epsilon_before == pytest.approx(ra.epsilon_after)  # b started from a's ε
    assert ledger.history(a) == [ma, mb]
    assert ledger.history(b) == [ma, mb]
    assert ledger.history(c) == [mc]
    # Not transitive: d's patients were never in a, so a's charge is not theirs.
    assert ledger.history(d) == [mb]
    assert_matches_pld([ma, mb], ledger.spent(a, delta=DELTA))
    by_key = {s.fingerprint: s for s in ledger.summary()}
    assert by_key[a].overlapping == (b,) and by_key[b].overlapping == (a,)
    assert by_key[c].overlapping == ()
    assert [x.charge_id for x in by_key[a].charges] == [ra.charge_id]
    assert by_key[a].epsilon == pytest.approx(ledger.spent(a, delta=DELTA))


def test_a_key_without_members_composes_with_every_dataset(ledger: PrivacyLedger) -> None:
    a = ledger.cohort_key(["p1"])
    c = ledger.cohort_key(["p9"])
    ma, mu = M(1.0, 0.02, 50), M(1.5, 0.05, 60)
    charge(ledger, ma, fingerprint=a)
    # LEGACY_FP was never registered: its patients are unknown, so it may hold anyone.
    assert ledger.history(LEGACY_FP) == [ma]
    charge(ledger, mu, fingerprint=LEGACY_FP)
    assert ledger.history(a) == [ma, mu]
    assert ledger.history(c) == [mu]  # disjoint from a, but not from the unknown dataset
    (legacy,) = [s for s in ledger.summary() if s.fingerprint == LEGACY_FP]
    assert legacy.members is None and set(legacy.overlapping) == {a}


def test_composing_across_another_delta_is_refused(ledger: PrivacyLedger) -> None:
    a = ledger.cohort_key(["p1", "p2"])
    b = ledger.cohort_key(["p2", "p3"])
    c = ledger.cohort_key(["p7"])
    charge(ledger, M(1.0, 0.02, 50), fingerprint=a)
    with pytest.raises(ConfigError) as info:
        charge(ledger, M(1.0, 0.02, 50), fingerprint=b, delta=1e-3)
    message = str(info.value)
    assert "shares patients" in message and "delta=1e-05" in message and "Fix" in message
    with pytest.raises(ConfigError, match="'prv'"):
        charge(ledger, M(1.0, 0.02, 50), fingerprint=b, accountant="rdp")
    assert raw_count(ledger.path) == 1
    # A disjoint cohort may be accounted differently.
    charge(ledger, M(1.0, 0.02, 50), fingerprint=c, delta=1e-6, accountant="rdp")
    # A key of unknown membership composes with both, which disagree: refused either way.
    with pytest.raises(ConfigError, match="no registered members"):
        charge(ledger, M(1.0, 0.02, 50), fingerprint=LEGACY_FP)


def test_summary_and_spent_compose_at_the_datasets_own_delta(ledger: PrivacyLedger) -> None:
    a = ledger.cohort_key(["p1"])
    charge(ledger, M(1.0, 0.02, 50), fingerprint=a)
    # Reads are pure computations on the stored mechanisms: any δ is sound for them.
    b = ledger.cohort_key(["p1", "p2"])
    assert ledger.spent(b, delta=1e-3) == pytest.approx(epsilon([M(1.0, 0.02, 50)], delta=1e-3))


# ------------------------------------------------------------------------- refusal


def test_over_budget_refusal_writes_nothing(ledger: PrivacyLedger, key: str) -> None:
    first = charge(ledger, M(1.0, 0.02, 100), fingerprint=key, budget=5.0)
    big = M(1.0, 0.02, 400)
    needed = epsilon([M(1.0, 0.02, 100), big], delta=DELTA)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        charge(ledger, big, fingerprint=key, round=1, budget=needed - 0.05)
    message = str(info.value)
    assert f"{first.epsilon_after:.4g}" in message and f"{needed:.4g}" in message
    assert "nothing was charged" in message and "\n" not in message
    assert raw_count(ledger.path) == 1
    assert ledger.history(key) == [M(1.0, 0.02, 100)]
    assert ledger.has_charge(key, "run-a", 1) is None
    # The same charge fits a budget just above what it needs.
    receipt = charge(ledger, big, fingerprint=key, round=1, budget=needed + 0.05)
    assert receipt.epsilon_after == pytest.approx(needed)


def test_refused_first_charge_leaves_no_dataset(ledger: PrivacyLedger, key: str) -> None:
    with pytest.raises(PrivacyBudgetExceeded):
        charge(ledger, M(0.8, 0.1, 50), fingerprint=key, budget=1.0)
    assert raw_count(ledger.path, "datasets") == 0
    assert ledger.summary() == []
    assert raw_count(ledger.path, "members") == len(COHORT)  # the cohort stays registered


def test_ledger_rows_are_append_only_in_sql(ledger: PrivacyLedger, key: str) -> None:
    charge(ledger, M(1.0, 0.02, 50), fingerprint=key)
    with sqlite3.connect(ledger.path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM charges")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE charges SET noise_multiplier = 50")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE charges SET kind = 'evaluate'")
        with pytest.raises(sqlite3.IntegrityError, match="fixed"):
            conn.execute("UPDATE datasets SET delta = 0.5")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM datasets")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM members")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE members SET member = upper(member)")
        with pytest.raises(sqlite3.IntegrityError, match="salt is fixed"):
            conn.execute("UPDATE meta SET value = zeroblob(32)")
        with pytest.raises(sqlite3.IntegrityError, match="salt is fixed"):
            conn.execute("DELETE FROM meta")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, kind, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, created_at) VALUES "
                f"('{key}', 'r', 9, 'query', 1, 0.1, 1, 1e-5, 'prv', 1, 0, 0, 'charged', 'now')"
            )
    assert ledger.history(key) == [M(1.0, 0.02, 50)]


# --------------------------------------------------------------- idempotency, status


def test_retrying_a_charged_round_does_not_pay_twice(ledger: PrivacyLedger, key: str) -> None:
    m = M(1.0, 0.02, 50)
    first = charge(ledger, m, fingerprint=key, run_id="run-x", round=3)
    assert first.kind == "train"
    assert ledger.has_charge(key, "run-x", 3) == first
    assert ledger.has_charge(key, "run-x", 4) is None
    assert ledger.has_charge(key, "run-y", 3) is None
    assert ledger.has_charge(key, "run-x", 3, kind="evaluate") is None
    again = charge(ledger, m, fingerprint=key, run_id="run-x", round=3)
    assert again == first
    assert raw_count(ledger.path) == 1
    assert ledger.spent(key, delta=DELTA) == pytest.approx(first.epsilon_after)


def test_retry_with_another_mechanism_is_an_error(ledger: PrivacyLedger, key: str) -> None:
    charge(ledger, M(1.0, 0.02, 50), fingerprint=key)
    with pytest.raises(ConfigError, match="same mechanism"):
        charge(ledger, M(1.0, 0.02, 60), fingerprint=key)
    assert raw_count(ledger.path) == 1


def test_completed_round_cannot_be_charged_again(ledger: PrivacyLedger, key: str) -> None:
    m = M(1.0, 0.02, 50)
    receipt = charge(ledger, m, fingerprint=key)
    spent = ledger.spent(key, delta=DELTA)
    done = ledger.mark_completed(receipt.charge_id, metrics={"loss": 0.25, "n": 120})
    assert done.status == "completed" and done.metrics == {"loss": 0.25, "n": 120}
    assert done.completed_at is not None
    with pytest.raises(PolicyViolation, match="already 'completed'"):  # settled once
        ledger.mark_completed(receipt.charge_id)
    with pytest.raises(PolicyViolation, match="second output"):
        charge(ledger, m, fingerprint=key)
    # Completing changes the status only: the charge still counts in full.
    assert ledger.history(key) == [m]
    assert ledger.spent(key, delta=DELTA) == pytest.approx(spent)


def test_failed_round_still_counts_and_spends_its_key(ledger: PrivacyLedger, key: str) -> None:
    """Whether a round failed can depend on the patients (weights crafted to overflow on
    one of them), so a failed key is final: no retry, no release under its charge."""
    m = M(1.0, 0.02, 50)
    receipt = charge(ledger, m, fingerprint=key)
    failed = ledger.mark_failed(receipt.charge_id)
    assert failed.status == "failed"
    assert ledger.history(key) == [m]
    with pytest.raises(PolicyViolation, match="not retried under the same charge"):
        charge(ledger, m, fingerprint=key)
    with pytest.raises(PolicyViolation, match="already 'failed'"):
        ledger.mark_completed(receipt.charge_id)
    assert ledger.history(key) == [m] and ledger.count_charges() == 1


def test_train_and_evaluate_are_separate_charges_and_both_count(
    ledger: PrivacyLedger, key: str
) -> None:
    train, evaluation = M(1.0, 0.02, 50), M(8.0, 1.0, 1)
    t = charge(ledger, train, fingerprint=key, run_id="run-e", round=2)
    e = charge(ledger, evaluation, fingerprint=key, run_id="run-e", round=2, kind="evaluate")
    assert (t.kind, e.kind) == ("train", "evaluate") and t.charge_id != e.charge_id
    assert e.to_dict()["kind"] == "evaluate"
    assert e.epsilon_before == pytest.approx(t.epsilon_after)
    assert ledger.has_charge(key, "run-e", 2) == t
    assert ledger.has_charge(key, "run-e", 2, kind="evaluate") == e
    assert ledger.history(key) == [train, evaluation]
    assert_matches_pld([train, evaluation], ledger.spent(key, delta=DELTA))
    # Idempotency and the completed rule hold per kind.
    assert (
        charge(ledger, evaluation, fingerprint=key, run_id="run-e", round=2, kind="evaluate") == e
    )
    ledger.mark_completed(e.charge_id)
    with pytest.raises(PolicyViolation, match="evaluating it again"):
        charge(ledger, evaluation, fingerprint=key, run_id="run-e", round=2, kind="evaluate")
    assert charge(ledger, train, fingerprint=key, run_id="run-e", round=2) == t
    assert (ledger.count_charges(), ledger.count_charges("train")) == (2, 1)
    assert ledger.count_charges("evaluate") == 1
    with pytest.raises(ConfigError, match="kind"):
        ledger.count_charges("query")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kind"):
        ledger.has_charge(key, "run-e", 2, kind="query")  # type: ignore[arg-type]


def test_count_charges_covers_every_dataset(
    ledger: PrivacyLedger, key: str, other_key: str
) -> None:
    assert ledger.count_charges() == 0
    charge(ledger, M(1.0, 0.02, 50), fingerprint=key)
    charge(ledger, M(1.0, 0.02, 50), fingerprint=other_key)
    charge(ledger, M(9.0, 1.0, 1), fingerprint=other_key, kind="evaluate")
    assert ledger.count_charges() == 3 == raw_count(ledger.path)
    assert ledger.count_charges("train") == 2 and ledger.count_charges("evaluate") == 1


def test_unknown_charge_id_is_a_clear_error(ledger: PrivacyLedger) -> None:
    with pytest.raises(ConfigError, match="no charge #99"):
        ledger.mark_completed(99)


def test_timestamps_come_from_the_injected_clock(ledger_path: Path) -> None:
    start = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ticks = iter(start + timedelta(seconds=i) for i in range(10))
    ledger = PrivacyLedger(ledger_path, clock=lambda: next(ticks))
    key = ledger.cohort_key(COHORT)
    receipt = charge(ledger, M(1.0, 0.02, 20), fingerprint=key, accountant="rdp")
    assert receipt.created_at.startswith("2030-01-02T03:04:05")
    assert ledger.mark_completed(receipt.charge_id).completed_at.startswith("2030-01-02T03:04:06")


# ------------------------------------------------------------------ configuration


def test_delta_mismatch_is_refused_with_the_fix(ledger: PrivacyLedger, key: str) -> None:
    charge(ledger, M(1.0, 0.02, 50), fingerprint=key)
    with pytest.raises(ConfigError) as info:
        charge(ledger, M(1.0, 0.02, 50), fingerprint=key, round=1, delta=1e-6)
    message = str(info.value)
    assert "delta=1e-05" in message and "delta=1e-06" in message and "Fix" in message
    with pytest.raises(ConfigError, match="'rdp'"):
        charge(ledger, M(1.0, 0.02, 50), fingerprint=key, round=1, accountant="rdp")
    with pytest.raises(ConfigError, match="one delta"):
        ledger.spent(key, delta=1e-6, accountant="prv")
    assert raw_count(ledger.path) == 1


def test_not_a_sqlite_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not SQLite, just text that happens to be long enough" * 20)
    with pytest.raises(ConfigError, match="ledger.sqlite") as info:
        PrivacyLedger(path)
    assert "\n" not in str(info.value) and "backup" in str(info.value)
    assert path.read_bytes().startswith(b"this is not SQLite")  # left untouched


def test_foreign_empty_and_newer_databases_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE patients (id TEXT)")
    with pytest.raises(ConfigError, match="not a fedcare privacy ledger"):
        PrivacyLedger(foreign)
    # A valid SQLite file with no table at all: never initialised in place.
    empty = tmp_path / "empty.sqlite"
    with sqlite3.connect(empty) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("DROP TABLE t")
    before = empty.read_bytes()
    assert before
    with pytest.raises(ConfigError, match="empty SQLite database.*backup"):
        PrivacyLedger(empty)
    assert empty.read_bytes() == before
    newer = tmp_path / "newer.sqlite"
    PrivacyLedger(newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(ConfigError, match="schema version 7"):
        PrivacyLedger(newer)


def test_a_ledger_without_its_salt_is_refused(ledger: PrivacyLedger) -> None:
    with sqlite3.connect(ledger.path) as conn:
        conn.execute("DROP TRIGGER meta_no_delete")
        conn.execute("DELETE FROM meta")
    with pytest.raises(ConfigError, match="salt.*backup"):
        PrivacyLedger(ledger.path)


def test_missing_file_is_an_error_only_when_not_creating(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no privacy ledger"):
        PrivacyLedger(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()


def test_concurrent_creation_gives_one_ledger(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ledger.sqlite"
    barrier = threading.Barrier(6)
    keys: list[str] = []
    errors: list[BaseException] = []

    def create() -> None:
        barrier.wait(30)
        try:
            keys.append(PrivacyLedger(path).cohort_key(COHORT))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(keys) == 6
    assert len(set(keys)) == 1  # every thread saw the same salt
    assert sorted(p.name for p in path.parent.iterdir()) == ["ledger.sqlite"]


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"fingerprint": "not hex!"}, "fingerprint"),
        ({"budget": 0.0}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"round": -1}, "round"),
        ({"run_id": " "}, "run_id"),
        ({"delta": 1.5}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"kind": "query"}, "kind"),
    ],
)
def test_charge_validates_arguments(
    ledger: PrivacyLedger, key: str, overrides: dict, word: str
) -> None:
    with pytest.raises(ConfigError, match=word):
        charge(ledger, M(1.0, 0.02, 10), **{"fingerprint": key, **overrides})
    assert raw_count(ledger.path) == 0


# ---------------------------------------------------------------- v1 -> v2 migration

# The v1 schema, verbatim from the v1 module: the fixture files below are built by it.
V1_SCHEMA: tuple[str, ...] = (
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
V1_FP_A = "aa" * 32
V1_FP_B = "bb" * 32
V1_ROWS = [  # (fingerprint, run_id, round, mechanism, status, metrics)
    (V1_FP_A, "run-1", 0, M(1.0, 0.02, 50), "completed", '{"loss": 0.5}'),
    (V1_FP_A, "run-1", 1, M(1.0, 0.02, 50), "failed", None),
    (V1_FP_B, "run-2", 0, M(1.5, 0.05, 80), "charged", None),
]
V1_CHARGE_COLUMNS = (
    "id, fingerprint, run_id, round, noise_multiplier, sample_rate, steps, delta, accountant, "
    "budget_epsilon, epsilon_before, epsilon_after, status, metrics, created_at, completed_at"
)


def build_v1_ledger(path: Path, *, seq: int | None = None) -> list[tuple[Any, ...]]:
    """A v1 ledger file with ``V1_ROWS``; returns its charge rows as v1 stored them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        for fp in (V1_FP_A, V1_FP_B):
            conn.execute(
                "INSERT INTO datasets VALUES (?, ?, 'prv', 10.0, ?)",
                (fp, DELTA, f"2029-01-0{1 if fp == V1_FP_A else 2}T00:00:00+00:00"),
            )
        history: dict[str, list[Mechanism]] = {}
        for fp, run, rnd, m, status, metrics in V1_ROWS:
            before = epsilon(history.get(fp, []), delta=DELTA)
            history.setdefault(fp, []).append(m)
            conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, metrics, created_at, completed_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'prv', 10.0, ?, ?, ?, ?, ?, ?)",
                (
                    fp, run, rnd, m.noise_multiplier, m.sample_rate, m.steps, DELTA, before,
                    epsilon(history[fp], delta=DELTA), status, metrics,
                    "2029-01-03T00:00:00+00:00",
                    None if status == "charged" else "2029-01-03T01:00:00+00:00",
                ),
            )  # fmt: skip
        if seq is not None:
            conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'charges'", (seq,))
        conn.execute("COMMIT")
        return conn.execute(f"SELECT {V1_CHARGE_COLUMNS} FROM charges ORDER BY id").fetchall()
    finally:
        conn.close()


def test_v1_ledger_is_migrated_keeping_every_charge(ledger_path: Path) -> None:
    v1_rows = build_v1_ledger(ledger_path, seq=10)
    ledger = PrivacyLedger(ledger_path, create=False)
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        migrated = conn.execute(f"SELECT {V1_CHARGE_COLUMNS}, kind FROM charges ORDER BY id")
        assert [r[:-1] for r in migrated] == v1_rows  # every row, every column, same ids
        kinds = {r[0] for r in conn.execute("SELECT kind FROM charges")}
        assert kinds == {"train"}
        # The append-only guarantees survive the table rebuild.
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM charges WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE charges SET steps = 1")
    assert len(stored_salt(ledger_path)) == 32
    assert [c.status for c in ledger.charges(V1_FP_A)] == ["completed", "failed"]
    assert ledger.charges(V1_FP_A)[0].metrics == {"loss": 0.5}
    # The v1 datasets' patients are unknown, so every new cohort composes with all of
    # them: the migration loses no budget.
    everything = [m for *_, m, _, _ in V1_ROWS]
    new = ledger.cohort_key(COHORT)
    assert ledger.history(new) == everything
    assert ledger.history(V1_FP_A) == everything
    assert_matches_pld(everything, ledger.spent(new, delta=DELTA))
    assert all(s.members is None for s in ledger.summary())
    # The new key includes the kind, and ids continue after v1's sequence.
    e = charge(ledger, M(9.0, 1.0, 1), fingerprint=V1_FP_A, run_id="run-1", kind="evaluate")
    assert e.charge_id == 11
    assert e.epsilon_before == pytest.approx(epsilon(everything, delta=DELTA))
    with pytest.raises(PolicyViolation):
        charge(ledger, M(1.0, 0.02, 50), fingerprint=V1_FP_A, run_id="run-1")
    # Reopening a migrated ledger changes nothing.
    salt = stored_salt(ledger_path)
    assert PrivacyLedger(ledger_path).cohort_key(COHORT) == new
    assert stored_salt(ledger_path) == salt


def test_failed_migration_leaves_the_v1_file_as_it_was(ledger_path: Path) -> None:
    v1_rows = build_v1_ledger(ledger_path)
    with sqlite3.connect(ledger_path) as conn:  # makes the migration fail half-way
        conn.execute("CREATE TABLE members (x TEXT)")
    with pytest.raises(ConfigError, match="members"):
        PrivacyLedger(ledger_path)
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute(f"SELECT {V1_CHARGE_COLUMNS} FROM charges ORDER BY id").fetchall() == (
            v1_rows
        )
        columns = {r[1] for r in conn.execute("PRAGMA table_info(charges)")}
        assert "kind" not in columns
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "meta" not in tables and "charges_v1" not in tables
        triggers = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
        assert {"charges_no_delete", "charges_immutable"} <= triggers


# ---------------------------------------------------------------- v2 -> v3 migration


def build_v2_ledger(path: Path) -> list[tuple[Any, ...]]:
    """A v2 ledger (v3's schema without the 'personalize' kind) holding one train and one
    evaluate charge of a registered cohort; returns its charge rows."""
    from fedcare.client import ledger as ledger_module

    v3 = "'train', 'evaluate', 'personalize'"
    v2_schema = [st.replace(v3, "'train', 'evaluate'") for st in ledger_module._SCHEMA]
    assert sum(v3 in st for st in ledger_module._SCHEMA) == 1  # the only difference
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in v2_schema:
            conn.execute(statement)
        conn.execute("INSERT INTO meta (name, value) VALUES ('salt', ?)", (b"s" * 32,))
        conn.execute("PRAGMA user_version = 2")
        conn.execute(
            "INSERT INTO datasets VALUES (?, ?, 'prv', 10.0, '2029-01-01T00:00:00+00:00')",
            (V1_FP_A, DELTA),
        )
        conn.execute("INSERT INTO members VALUES (?, ?)", (V1_FP_A, "ab" * 32))
        history: list[Mechanism] = []
        for rnd, kind, m in ((1, "train", M(1.0, 0.02, 50)), (1, "evaluate", M(5.0, 1.0, 1))):
            before = epsilon(history, delta=DELTA)
            history.append(m)
            conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, kind, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, created_at) "
                "VALUES (?, 'run-1', ?, ?, ?, ?, ?, ?, 'prv', 10.0, ?, ?, 'completed', ?)",
                (
                    V1_FP_A, rnd, kind, m.noise_multiplier, m.sample_rate, m.steps, DELTA,
                    before, epsilon(history, delta=DELTA), "2029-01-03T00:00:00+00:00",
                ),
            )  # fmt: skip
        conn.execute("UPDATE sqlite_sequence SET seq = 7 WHERE name = 'charges'")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):  # v2 refuses the new kind
            conn.execute(
                "INSERT INTO charges (fingerprint, run_id, round, kind, noise_multiplier, "
                "sample_rate, steps, delta, accountant, budget_epsilon, epsilon_before, "
                "epsilon_after, status, created_at) VALUES (?, 'r', 9, 'personalize', 1.0, "
                "0.1, 1, ?, 'prv', 10.0, 0, 1, 'charged', 'x')",
                (V1_FP_A, DELTA),
            )
        conn.execute("COMMIT")
        return conn.execute("SELECT * FROM charges ORDER BY id").fetchall()
    finally:
        conn.close()


def test_v2_ledger_is_migrated_to_v3_keeping_every_charge_and_admits_personalize(
    ledger_path: Path,
) -> None:
    v2_rows = build_v2_ledger(ledger_path)
    ledger = PrivacyLedger(ledger_path, create=False)
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        assert conn.execute("SELECT * FROM charges ORDER BY id").fetchall() == v2_rows
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "charges_v2" not in tables
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM charges WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE charges SET steps = 1")
    assert stored_salt(ledger_path) == b"s" * 32  # the salt (and so every cohort key) kept
    history = [M(1.0, 0.02, 50), M(5.0, 1.0, 1)]
    assert ledger.history(V1_FP_A) == history
    # The new kind is a charge like any other: composed, keyed, counted.
    fine_tune = M(1.0, 0.02, 25)
    p = charge(ledger, fine_tune, fingerprint=V1_FP_A, run_id="run-1", round=1, kind="personalize")
    assert p.charge_id == 8  # ids continue after v2's sequence
    assert p.epsilon_before == pytest.approx(epsilon(history, delta=DELTA))
    assert_matches_pld([*history, fine_tune], ledger.spent(V1_FP_A, delta=DELTA))
    assert ledger.has_charge(V1_FP_A, "run-1", 1, kind="personalize") == p
    assert ledger.count_charges("personalize") == 1
    ledger.mark_completed(p.charge_id)
    with pytest.raises(PolicyViolation, match="fine-tuning it again"):
        charge(ledger, fine_tune, fingerprint=V1_FP_A, run_id="run-1", round=1, kind="personalize")
    with pytest.raises(ConfigError, match="personalize"):
        charge(ledger, fine_tune, fingerprint=V1_FP_A, kind="fine-tune")
    # Reopening changes nothing.
    assert PrivacyLedger(ledger_path).charges(V1_FP_A)[-1].kind == "personalize"


# ------------------------------------------------------------------ crash safety


def _charge_then_train(path: str, key: str, conn: Any) -> None:
    """Child: charge, tell the parent the receipt, then 'train' until killed."""
    import time

    receipt = PrivacyLedger(path).charge(
        fingerprint=key,
        budget_epsilon=10.0,
        delta=DELTA,
        accountant="prv",
        mechanism=M(1.0, 0.02, 50),
        run_id="run-k",
        round=0,
    )
    conn.send(receipt.charge_id)
    time.sleep(120)


_SUBPROCESS_CHILD = textwrap.dedent(
    """
    import sys, time
    from fedcare.client.accounting import Mechanism
    from fedcare.client.ledger import PrivacyLedger
    receipt = PrivacyLedger(sys.argv[1]).charge(
        fingerprint=sys.argv[2], budget_epsilon=10.0, delta=1e-5, accountant="prv",
        mechanism=Mechanism(1.0, 0.02, 50), run_id="run-k", round=0)
    print(receipt.charge_id, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("how", ["fork", pytest.param("python -c", marks=pytest.mark.slow)])
def test_sigkill_during_training_keeps_the_charge(ledger_path: Path, how: str) -> None:
    key = PrivacyLedger(ledger_path).cohort_key(COHORT)
    if how == "fork":
        if "fork" not in multiprocessing.get_all_start_methods():
            pytest.skip("no fork on this platform")
        parent_end, child_end = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=_charge_then_train, args=(str(ledger_path), key, child_end)
        )
        child.start()
        try:
            assert parent_end.poll(60), "child never charged"
            charge_id = parent_end.recv()
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(30)
        finally:
            if child.is_alive():
                child.kill()
        assert child.exitcode == -signal.SIGKILL
    else:
        proc = subprocess.Popen(
            [sys.executable, "-c", _SUBPROCESS_CHILD, str(ledger_path), key],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.strip(), "child never charged"
            charge_id = int(line)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    ledger = PrivacyLedger(ledger_path)
    receipt = ledger.has_charge(key, "run-k", 0)
    assert receipt is not None and receipt.charge_id == charge_id
    assert receipt.status == "charged"
    assert ledger.history(key) == [M(1.0, 0.02, 50)]
    assert ledger.spent(key, delta=DELTA) > 0
    # The resumed run retries the round without paying twice.
    assert charge(ledger, M(1.0, 0.02, 50), fingerprint=key, run_id="run-k").charge_id == charge_id
    assert raw_count(ledger_path) == 1


# -------------------------------------------------------------------- concurrency

RACE_MECHANISM = M(1.0, 0.02, 100)
RACERS, ALLOWED = 5, 3


def _race_budget() -> float:
    """A budget that fits exactly ALLOWED copies of RACE_MECHANISM."""
    fits = epsilon([RACE_MECHANISM] * ALLOWED, delta=DELTA)
    over = epsilon([RACE_MECHANISM] * (ALLOWED + 1), delta=DELTA)
    assert over - fits > 0.1  # far above the accountant's error
    return (fits + over) / 2


def _racer(path: str, index: int, key: str, budget: float, barrier: Any, results: Any) -> None:
    ledger = PrivacyLedger(path)
    barrier.wait(60)
    try:
        receipt = ledger.charge(
            fingerprint=key,
            budget_epsilon=budget,
            delta=DELTA,
            accountant="prv",
            mechanism=RACE_MECHANISM,
            run_id=f"racer-{index}",
            round=0,
        )
        results.put((index, "charged", receipt.epsilon_before, receipt.epsilon_after))
    except PrivacyBudgetExceeded:
        results.put((index, "refused", None, None))
    except Exception as e:  # reported to the parent, which fails the test with it
        results.put((index, f"error: {e!r}", None, None))


@pytest.mark.parametrize(
    ("how", "cohorts"),
    [
        ("thread", "same"),
        ("thread", "overlapping"),
        ("fork", "same"),
        ("fork", "overlapping"),
        pytest.param("spawn", "same", marks=pytest.mark.slow),
    ],
)
def test_concurrent_charges_never_overspend(ledger_path: Path, how: str, cohorts: str) -> None:
    """Racers charge one cohort, or two cohorts sharing one patient: either way the
    patients' composed ε stays within the budget."""
    first = PrivacyLedger(ledger_path)
    a = first.cohort_key(["p1", "p2", "p3"])
    b = first.cohort_key(["p3", "p4"]) if cohorts == "overlapping" else a
    keys = [a if i % 2 == 0 else b for i in range(RACERS)]
    budget = _race_budget()
    if how == "thread":
        import queue

        results: Any = queue.Queue()
        barrier: Any = threading.Barrier(RACERS)
        workers: list[Any] = [
            threading.Thread(
                target=_racer, args=(str(ledger_path), i, keys[i], budget, barrier, results)
            )
            for i in range(RACERS)
        ]
    else:
        if how not in multiprocessing.get_all_start_methods():
            pytest.skip(f"no {how} on this platform")
        ctx = multiprocessing.get_context(how)
        results, barrier = ctx.Queue(), ctx.Barrier(RACERS)
        workers = [
            ctx.Process(
                target=_racer, args=(str(ledger_path), i, keys[i], budget, barrier, results)
            )
            for i in range(RACERS)
        ]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=240) for _ in range(RACERS)]
    finally:
        for w in workers:
            w.join(60)
            if how != "thread" and w.is_alive():
                w.kill()
    if how != "thread":
        assert all(w.exitcode == 0 for w in workers)
    assert not [o for o in outcomes if o[1] not in ("charged", "refused")]
    charged = sorted((o for o in outcomes if o[1] == "charged"), key=lambda o: o[2])
    assert len(charged) == ALLOWED
    assert sum(o[1] == "refused" for o in outcomes) == RACERS - ALLOWED
    # Serialised: each charge saw the previous one (no two computed on the same history).
    assert charged[0][2] == 0.0
    for earlier, later in zip(charged, charged[1:], strict=False):
        assert later[2] == pytest.approx(earlier[3])
    ledger = PrivacyLedger(ledger_path)
    for key in {a, b}:
        assert ledger.history(key) == [RACE_MECHANISM] * ALLOWED
        spent = ledger.spent(key, delta=DELTA)
        assert spent <= budget
        assert_matches_pld(ledger.history(key), spent)


# ------------------------------------------------------------------------- the CLI


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(budget_show)
    return app


def test_budget_show_text_and_json(ledger: PrivacyLedger) -> None:
    key = ledger.cohort_key(["p1", "p2"])
    overlapping = ledger.cohort_key(["p2", "p3"])
    charge(ledger, M(1.1, 0.02, 100), fingerprint=key, run_id="run-a", round=0, budget=6.0)
    done = charge(ledger, M(1.5, 0.05, 150), fingerprint=key, run_id="run-b", budget=6.0)
    ledger.mark_completed(done.charge_id)
    charge(ledger, M(9.0, 1.0, 1), fingerprint=key, run_id="run-b", budget=6.0, kind="evaluate")
    charge(ledger, M(2.0, 0.1, 20), fingerprint=overlapping, run_id="run-c", budget=6.0)
    spent = ledger.spent(key, delta=DELTA)
    runner = CliRunner()

    text = runner.invoke(_cli(), ["--db", str(ledger.path)])
    assert text.exit_code == 0, text.output
    assert key in text.output and overlapping in text.output
    assert f"{spent:.4g}" in text.output and "1e-05" in text.output and "prv" in text.output
    for word in ("run-a", "run-b", "100", "150", "completed", "charged", "of budget 6"):
        assert word in text.output
    for word in ("evaluate", "train", "2 patients", "1 overlapping dataset"):
        assert word in text.output

    out = runner.invoke(_cli(), ["--db", str(ledger.path), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    dataset, other = payload["datasets"]
    assert dataset["fingerprint"] == key and dataset["accountant"] == "prv"
    assert dataset["delta"] == DELTA and dataset["budget_epsilon"] == 6.0
    assert dataset["members"] == 2 and dataset["overlapping_datasets"] == [overlapping]
    assert [c["kind"] for c in dataset["charges"]] == ["train", "train", "evaluate"]
    assert [c["status"] for c in dataset["charges"]] == ["charged", "completed", "charged"]
    own = [M(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in dataset["charges"]]
    assert own == [M(1.1, 0.02, 100), M(1.5, 0.05, 150), M(9.0, 1.0, 1)]
    assert len(dataset["composed_charge_ids"]) == 4
    # Its ε composes the overlapping dataset's charge as well.
    assert_matches_pld([*own, M(2.0, 0.1, 20)], dataset["epsilon"])
    assert other["overlapping_datasets"] == [key]


def test_budget_show_empty_ledger(ledger: PrivacyLedger) -> None:
    result = CliRunner().invoke(_cli(), ["--db", str(ledger.path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["datasets"] == []


def test_budget_show_missing_db_is_one_line_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(ConfigError) as info:
        budget_show(db=missing, json_out=False)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    assert not missing.exists()
