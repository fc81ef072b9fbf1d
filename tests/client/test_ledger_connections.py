"""The privacy ledger's kept connections and its one fsync per charge.

A :class:`~fedcare.client.ledger.PrivacyLedger` keeps its SQLite connection open between
calls, commits a charge to the WAL without an fsync, and fsyncs it with the charge's
completion or failure, before anything computed under it leaves the site. These tests check
what that must not cost: a charge on disk before its completion returns (seen in the
system calls), a file replaced or deleted under a running site never written in its old
place, connections that do not cross a fork, and nothing left beside the file once closed.
A crash of the process (SIGKILL) between the charge and its completion is
``tests/client/test_ledger.py::test_sigkill_during_training_keeps_the_charge``.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedcare.client import ledger as ledger_module
from fedcare.client.accounting import Mechanism
from fedcare.client.ledger import PrivacyLedger
from fedcare.common.errors import ConfigError, PolicyViolation

DELTA = 1e-5
M = Mechanism
REPO = Path(__file__).resolve().parents[2]


def _charge(ledger: PrivacyLedger, key: str, run: str = "run-a", round: int = 0) -> Any:
    return ledger.charge(
        fingerprint=key,
        budget_epsilon=50.0,
        delta=DELTA,
        accountant="prv",
        mechanism=M(1.0, 0.05, 10),
        run_id=run,
        round=round,
    )


def _traced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement the ledger's connections run from now on."""
    statements: list[str] = []
    real = ledger_module._open_connection

    def tracing(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
        conn = real(path, busy_timeout_ms)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(ledger_module, "_open_connection", tracing)
    return statements


def _transactions(statements: list[str]) -> list[tuple[str, str]]:
    """``(synchronous level, BEGIN statement)`` of each writing transaction (reads, ``BEGIN
    DEFERRED``, commit nothing and set no level)."""
    out = []
    level = ""
    for i, text in enumerate(statements):
        if text.startswith("PRAGMA synchronous"):
            level = text.rsplit("=", 1)[1].strip()
        elif text.startswith("BEGIN") and text != "BEGIN DEFERRED":
            out.append((level, text))
            assert level, f"transaction without a synchronous level: {statements[: i + 1]}"
    return out


def test_only_the_completion_and_failure_commit_with_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = _traced(monkeypatch)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    key = ledger.cohort_key(["p1", "p2"])
    assert {level for level, _ in _transactions(statements)} == {"FULL"}  # open, cohort
    for round_, settle in ((0, ledger.mark_completed), (1, ledger.mark_failed)):
        statements.clear()
        receipt = _charge(ledger, key, round=round_)
        assert [lvl for lvl, begin in _transactions(statements) if "IMMEDIATE" in begin] == [
            "NORMAL"
        ]
        statements.clear()
        settle(receipt.charge_id)
        assert _transactions(statements) == [("FULL", "BEGIN IMMEDIATE")]
        assert statements[-1] == "COMMIT"


_STRACED_CHILD = textwrap.dedent(
    """
    import os, sys
    from fedcare.client.accounting import Mechanism
    from fedcare.client.ledger import PrivacyLedger
    ledger = PrivacyLedger(sys.argv[1])
    key = ledger.cohort_key(["p1", "p2"])
    os.path.exists("/fedcare-marker-charge")
    receipt = ledger.charge(fingerprint=key, budget_epsilon=50.0, delta=1e-5,
        accountant="prv", mechanism=Mechanism(1.0, 0.05, 10), run_id="r", round=0)
    os.path.exists("/fedcare-marker-charged")
    ledger.mark_completed(receipt.charge_id)
    os.path.exists("/fedcare-marker-completed")
    """
)


def test_the_charge_is_on_disk_before_its_completion_returns(tmp_path: Path) -> None:
    # The system calls themselves: between the charge's return and the completion's, the
    # WAL holding both is fsynced (what a power cut cannot take is then on disk).
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path).close()
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        [
            strace,
            "-f",
            "--seccomp-bpf",
            "-y",
            "-e",
            "trace=fsync,fdatasync,stat,newfstatat",
            "-o",
            str(log),
        ]
        + [sys.executable, "-c", _STRACED_CHILD, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()

    def at(marker: str) -> int:
        (index,) = [i for i, line in enumerate(lines) if f'"/fedcare-marker-{marker}"' in line]
        return index

    wal_sync = re.compile(r"\b(fsync|fdatasync)\(\d+<[^>]*ledger\.sqlite-wal>\)")
    charging = lines[at("charge") : at("charged")]
    completing = lines[at("charged") : at("completed")]
    assert [line for line in completing if wal_sync.search(line)], completing
    # The saving: the charge itself waits for no fsync.
    assert not [line for line in charging if "fsync" in line or "fdatasync" in line], charging


def test_a_ledger_replaced_under_a_running_site_is_refused_until_reopened(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite"
    live = PrivacyLedger(path)
    key = live.cohort_key(["p1"])
    _charge(live, key)
    assert live.count_charges() == 1
    # A backup with two charges is restored over it (its WAL checkpointed into the file).
    backup = PrivacyLedger(tmp_path / "backup.sqlite")
    other = backup.cohort_key(["p9"])
    _charge(backup, other, run="x")
    _charge(backup, other, run="y")
    backup.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    os.replace(tmp_path / "backup.sqlite", path)
    # SQLite pairs a file with its -wal/-shm by path: a running site neither reads the
    # restored file beside the old ones nor writes to the old file; it refuses.
    with pytest.raises(ConfigError, match="replaced while this site was running"):
        live.count_charges()
    with pytest.raises(ConfigError, match="replaced while this site was running"):
        _charge(live, key, run="z")
    live.close()  # the site restarts: the restored file is the ledger
    assert live.count_charges() == 2
    _charge(live, live.cohort_key(["p1"]), run="z")
    live.close()
    assert PrivacyLedger(path).count_charges() == 3


def test_a_ledger_deleted_under_a_running_site_is_an_error_not_a_lost_charge(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.sqlite"
    live = PrivacyLedger(path)
    key = live.cohort_key(["p1"])
    _charge(live, key)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink()
    # A kept connection would still write to the deleted file; the next call must not, and
    # nothing may re-create an empty ledger at the path.
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        _charge(live, key, run="after")
    with pytest.raises(ConfigError, match="deleted while this site was running"):
        live.count_charges()
    assert not path.exists()


def test_two_attempts_at_one_round_release_once(tmp_path: Path) -> None:
    """Two processes answering the same round: charge() takes the second for a retry of a
    dead one (same receipt, nothing paid twice), so only one of them may settle it."""
    path = tmp_path / "ledger.sqlite"
    first, second = PrivacyLedger(path), PrivacyLedger(path)
    key = first.cohort_key(["p1"])
    a = _charge(first, key)
    b = _charge(second, key)
    assert a.charge_id == b.charge_id and second.count_charges() == 1
    second.mark_completed(b.charge_id)  # the faster attempt's output may leave
    with pytest.raises(PolicyViolation, match="already 'completed'"):
        first.mark_completed(a.charge_id)  # the slower one's must not
    with pytest.raises(PolicyViolation, match="cannot become 'failed'"):
        first.mark_failed(a.charge_id)
    assert second.charges(key)[0].status == "completed"


def test_closing_leaves_only_the_file_and_the_ledger_still_answers(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with PrivacyLedger(path) as ledger:
        key = ledger.cohort_key(["p1"])
        _charge(ledger, key)
        assert Path(f"{path}-wal").exists()  # kept open between calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]
    assert ledger.count_charges() == 1  # used again: opens a new connection
    ledger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.sqlite"]


def _child_charges(path: str, inherited: PrivacyLedger, key: str, conn: Any) -> None:
    """Child: charge through the ledger it inherited and through one of its own."""
    try:
        _charge(inherited, key, run="child-inherited")
        _charge(PrivacyLedger(path), key, run="child-own")
        conn.send(inherited.count_charges())
    except Exception as e:  # reported to the parent, which fails the test with it
        conn.send(repr(e))


def test_a_forked_child_never_uses_its_parent_s_connection(tmp_path: Path) -> None:
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    path = tmp_path / "ledger.sqlite"
    parent = PrivacyLedger(path)
    key = parent.cohort_key(["p1", "p2"])
    _charge(parent, key, run="parent-before")
    taken: list[sqlite3.Connection] = []
    real_take = parent._connections.take

    def take() -> sqlite3.Connection:
        taken.append(real_take())
        return taken[-1]

    parent._connections.take = take  # type: ignore[method-assign]
    assert parent.count_charges() == 1
    before_fork = taken[-1]
    parent_end, child_end = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(
        target=_child_charges, args=(str(path), parent, key, child_end)
    )
    child.start()
    try:
        assert parent_end.poll(120), "the child never answered"
        answer = parent_end.recv()
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    assert answer == 3, answer
    assert child.exitcode == 0
    # The parent closed its idle connection before forking, and goes on with a new one.
    with pytest.raises(sqlite3.ProgrammingError):
        before_fork.execute("SELECT 1")
    _charge(parent, key, run="parent-after")
    assert parent.count_charges() == 4
    assert taken[-1] is not before_fork
