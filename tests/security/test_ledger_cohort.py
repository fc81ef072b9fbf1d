"""Attacks on the privacy ledger's cohort keys and on its file; each one must fail.

* (a) Re-exporting the same patients (rows reordered, ``97.0`` written as ``97.00``) changes
  every byte-level fingerprint but not the cohort key: the re-export inherits the spent ε
  and cannot buy a fresh budget.
* (b) A dataset that shares a single patient with a charged cohort sees that cohort's ε and
  is refused when its history plus the new mechanism exceeds the budget.
* (c) A 0-byte ledger and a non-SQLite ledger are refused, never re-created empty.
* (d) A new ledger file is 0600 (and a folder it creates 0700) under umask 022 or 000.
* (e) No raw patient id reaches any byte of the ledger's files.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedcare.client.accounting import Mechanism, epsilon
from fedcare.client.data.loaders import load_site
from fedcare.client.ledger import PrivacyLedger
from fedcare.common.errors import ConfigError, PrivacyBudgetExceeded
from tests.client.data._builders import build_site, edit_csv

DELTA = 1e-5
M = Mechanism


def _charge(ledger: PrivacyLedger, key: str, mechanism: Mechanism, *, budget: float, run: str):
    return ledger.charge(
        fingerprint=key,
        budget_epsilon=budget,
        delta=DELTA,
        accountant="prv",
        mechanism=mechanism,
        run_id=run,
        round=0,
    )


@pytest.fixture()
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "state" / "ledger.sqlite")


# ------------------------------------------------------------ (a) re-export, same key


def _reexport(frame: pd.DataFrame) -> pd.DataFrame:
    """The same patients, written differently: rows reversed, ages with two decimals."""
    frame = frame.iloc[::-1].copy()
    frame["age"] = frame["age"].map(lambda v: f"{float(v):.2f}" if v else v)
    return frame


def test_reexported_patients_keep_their_key_and_spent_epsilon(
    ledger: PrivacyLedger, tmp_path: Path
) -> None:
    built = build_site(tmp_path / "site-0")
    first = load_site(built.root)
    key = ledger.cohort_key(first.patient_ids)
    mechanism = M(1.0, 0.05, 200)
    budget = epsilon([mechanism], delta=DELTA) + 0.5  # room for one such run, not two
    _charge(ledger, key, mechanism, budget=budget, run="before-export")

    edit_csv(built.root / "ehr.csv", _reexport)
    again = load_site(built.root)
    assert again.fingerprint != first.fingerprint  # the v1 key would have been fresh
    assert sorted(again.patient_ids) == sorted(first.patient_ids)
    # Order, duplicates and file bytes play no part in the key.
    assert ledger.cohort_key(again.patient_ids) == key
    assert ledger.cohort_key([*reversed(again.patient_ids), again.patient_ids[0]]) == key
    assert ledger.spent(key, delta=DELTA) == pytest.approx(epsilon([mechanism], delta=DELTA))
    with pytest.raises(PrivacyBudgetExceeded):
        _charge(ledger, ledger.cohort_key(again.patient_ids), mechanism, budget=budget, run="x")
    assert ledger.count_charges() == 1


# ------------------------------------------------------- (b) one shared patient composes


def test_one_shared_patient_brings_the_cohorts_epsilon_along(ledger: PrivacyLedger) -> None:
    charged = ledger.cohort_key([f"a-{i}" for i in range(50)])
    earlier = M(1.0, 0.05, 300)
    _charge(ledger, charged, earlier, budget=10.0, run="earlier")

    newcomers = [f"b-{i}" for i in range(50)]
    sharing = ledger.cohort_key([*newcomers, "a-17"])  # one patient of the charged cohort
    disjoint = ledger.cohort_key(newcomers)
    assert ledger.history(sharing) == [earlier]
    assert ledger.history(disjoint) == []
    planned = M(1.0, 0.05, 300)
    alone = epsilon([planned], delta=DELTA)
    together = epsilon([earlier, planned], delta=DELTA)
    budget = (alone + together) / 2  # the plan fits on its own, not on top of "earlier"
    assert ledger.spent(sharing, delta=DELTA) == pytest.approx(epsilon([earlier], delta=DELTA))
    with pytest.raises(PrivacyBudgetExceeded, match="overlapping"):
        _charge(ledger, sharing, planned, budget=budget, run="new")
    assert ledger.charges(sharing) == [] and ledger.count_charges() == 1
    # The same plan on patients nobody charged before fits: the refusal was the overlap.
    assert _charge(ledger, disjoint, planned, budget=budget, run="new").epsilon_before == 0.0


# ----------------------------------------------------- (c) no silent empty ledger


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"patient_id,age\n0001,97.0\n" * 40)


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _truncated_real_ledger(path: Path) -> None:
    ledger = PrivacyLedger(path)
    _charge(ledger, ledger.cohort_key(["p1"]), M(1.0, 0.05, 10), budget=10.0, run="r")
    with open(path, "r+b") as f:
        f.truncate(0)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.parametrize("damage", [_zero_bytes, _not_sqlite, _truncated_real_ledger])
@pytest.mark.parametrize("create", [True, False])
def test_a_damaged_ledger_is_refused_not_recreated(
    tmp_path: Path, damage: Callable[[Path], None], create: bool
) -> None:
    path = tmp_path / "ledger.sqlite"
    damage(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        PrivacyLedger(path, create=create)
    message = str(info.value)
    assert str(path) in message and "backup" in message and "\n" not in message
    assert path.read_bytes() == before  # left exactly as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]


# ------------------------------------------------------------- (d) private file modes


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def test_a_new_ledger_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "state" / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # SQLite gives the WAL and shared-memory files the database file's mode.
    reader = sqlite3.connect(path)
    try:
        reader.execute("SELECT COUNT(*) FROM charges").fetchone()  # holds the WAL open
        _charge(ledger, ledger.cohort_key(["p1"]), M(1.0, 0.05, 10), budget=10.0, run="r")
        siblings = [Path(f"{path}{s}") for s in ("-wal", "-shm")]
        assert all(p.exists() for p in siblings)
        assert {stat.S_IMODE(p.stat().st_mode) for p in siblings} == {0o600}
    finally:
        reader.close()
    # The ledger keeps its connection (and so the WAL) open until it is closed; then
    # nothing else is left beside it (the ledger is built under a scratch name first).
    ledger.close()
    assert {p.name for p in path.parent.iterdir()} == {"ledger.sqlite"}


# ------------------------------------------------------ (e) no raw patient id on disk


def test_no_raw_patient_id_reaches_the_ledger_files(tmp_path: Path) -> None:
    ids = [f"MRN-{n:07d}-ZQX" for n in (4471, 90210, 1234567)]
    path = tmp_path / "state" / "ledger.sqlite"
    ledger = PrivacyLedger(path)
    reader = sqlite3.connect(path)  # keeps the WAL on disk, so its bytes are searched too
    try:
        reader.execute("SELECT COUNT(*) FROM members").fetchone()
        key = ledger.cohort_key(ids)
        overlapping = ledger.cohort_key(ids[:1] + ["MRN-0000001-ZQX"])
        receipt = _charge(ledger, key, M(1.0, 0.05, 10), budget=10.0, run="r")
        ledger.mark_completed(receipt.charge_id, metrics={"loss": 0.5})
        _charge(ledger, overlapping, M(1.0, 0.05, 10), budget=10.0, run="r")
        files = sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name))
        assert {p.name for p in files} >= {"ledger.sqlite", "ledger.sqlite-wal"}
        for pid in [*ids, "MRN-0000001-ZQX"]:
            for needle in (pid.encode("utf-8"), pid.encode("utf-16-le")):
                for file in files:
                    assert needle not in file.read_bytes(), (pid, file.name)
    finally:
        reader.close()
    # What is stored instead: 64-hex HMACs, one per member of each cohort.
    with sqlite3.connect(path) as conn:
        members = [r[0] for r in conn.execute("SELECT member FROM members")]
    assert len(members) == 5 and len(set(members)) == 4  # ids[0] is in both cohorts
    assert all(len(m) == 64 and int(m, 16) >= 0 for m in members)
