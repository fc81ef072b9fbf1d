"""client.ledger: ε against an independent accountant, atomic refusal, crash safety, races.

ε reported by the ledger is compared with Google's ``dp_accounting`` PLD accountant run on
the ledger's own mechanism list (tolerance explained in ``test_accounting.py``:
``pld - 1e-3 <= prv <= pld + 2 * eps_error + 1e-3``). Multi-process tests run a real child
process against the same file: 'fork' children (fast; the parent has already imported
Opacus) always, fresh interpreters ('spawn' / ``python -c``) under the ``slow`` marker.
"""

from __future__ import annotations

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

from client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    epsilon,
    independent_epsilon,
    prv_eps_error,
)
from client.budget_cli import budget_show
from client.ledger import PrivacyLedger
from common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded

DELTA = 1e-5
FP = "0123456789abcdef" * 4
OTHER_FP = "fedcba9876543210" * 4
M = Mechanism
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "site" / "privacy-ledger.sqlite"


@pytest.fixture()
def ledger(ledger_path: Path) -> PrivacyLedger:
    return PrivacyLedger(ledger_path)


def charge(
    ledger: PrivacyLedger,
    mechanism: Mechanism,
    *,
    run_id: str = "run-a",
    round: int = 0,
    budget: float = 10.0,
    fingerprint: str = FP,
    accountant: str = "prv",
    delta: float = DELTA,
):
    return ledger.charge(
        fingerprint=fingerprint,
        budget_epsilon=budget,
        delta=delta,
        accountant=accountant,
        mechanism=mechanism,
        run_id=run_id,
        round=round,  # type: ignore[arg-type]
    )


def raw_count(path: Path, table: str = "charges") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def assert_matches_pld(mechanisms: list[Mechanism], reported: float) -> None:
    pld = independent_epsilon(mechanisms, delta=DELTA)
    e = prv_eps_error(mechanisms, delta=DELTA)
    assert pld - PLD_DISCRETIZATION <= reported <= pld + 2 * e + PLD_DISCRETIZATION, (reported, pld)


# ----------------------------------------------------------------------- accounting


def test_ledger_epsilon_is_the_composition_of_every_run(ledger: PrivacyLedger) -> None:
    plan = [
        ("run-a", 0, M(1.1, 0.02, 100)),
        ("run-a", 1, M(1.1, 0.02, 100)),
        ("run-b", 0, M(1.5, 0.05, 150)),
        ("run-c", 0, M(0.9, 0.01, 80)),
    ]
    receipts = [charge(ledger, m, run_id=r, round=k) for r, k, m in plan]
    history = ledger.history(FP)
    assert history == [m for _, _, m in plan]
    spent = ledger.spent(FP, delta=DELTA, accountant="prv")
    assert_matches_pld(history, spent)
    # Receipts chain: each charge starts where the previous one ended.
    assert receipts[0].epsilon_before == 0.0
    for earlier, later in zip(receipts, receipts[1:], strict=False):
        assert later.epsilon_before == pytest.approx(earlier.epsilon_after)
        assert later.epsilon_after > earlier.epsilon_after
    assert receipts[-1].epsilon_after == pytest.approx(spent)
    # The summary reports the same composition, per dataset.
    (summary,) = ledger.summary()
    assert summary.fingerprint == FP and summary.delta == DELTA
    assert summary.accountant == "prv" and summary.budget_epsilon == 10.0
    assert list(summary.mechanisms) == history
    assert summary.epsilon == pytest.approx(spent)


def test_history_survives_reopening_and_datasets_are_separate(ledger_path: Path) -> None:
    charge(PrivacyLedger(ledger_path), M(1.0, 0.02, 50))
    charge(PrivacyLedger(ledger_path), M(2.0, 0.1, 30), fingerprint=OTHER_FP)
    reopened = PrivacyLedger(ledger_path)
    assert reopened.history(FP) == [M(1.0, 0.02, 50)]
    assert reopened.history(OTHER_FP) == [M(2.0, 0.1, 30)]
    assert reopened.history("ab" * 32) == []
    assert reopened.spent("ab" * 32, delta=DELTA, accountant="prv") == 0.0
    assert_matches_pld([M(2.0, 0.1, 30)], reopened.spent(OTHER_FP, delta=DELTA))
    assert {s.fingerprint for s in reopened.summary()} == {FP, OTHER_FP}


def test_file_uses_wal_and_a_schema_version(ledger: PrivacyLedger) -> None:
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


# ------------------------------------------------------------------------- refusal


def test_over_budget_refusal_writes_nothing(ledger: PrivacyLedger) -> None:
    first = charge(ledger, M(1.0, 0.02, 100), budget=5.0)
    big = M(1.0, 0.02, 400)
    needed = epsilon([M(1.0, 0.02, 100), big], delta=DELTA)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        charge(ledger, big, round=1, budget=needed - 0.05)
    message = str(info.value)
    assert f"{first.epsilon_after:.4g}" in message and f"{needed:.4g}" in message
    assert "nothing was charged" in message and "\n" not in message
    assert raw_count(ledger.path) == 1
    assert ledger.history(FP) == [M(1.0, 0.02, 100)]
    assert ledger.has_charge(FP, "run-a", 1) is None
    # The same charge fits a budget just above what it needs.
    assert charge(ledger, big, round=1, budget=needed + 0.05).epsilon_after == pytest.approx(needed)


def test_refused_first_charge_leaves_no_dataset(ledger: PrivacyLedger) -> None:
    with pytest.raises(PrivacyBudgetExceeded):
        charge(ledger, M(0.8, 0.1, 50), budget=1.0)
    assert raw_count(ledger.path, "datasets") == 0
    assert ledger.summary() == []


def test_charges_are_append_only_in_sql(ledger: PrivacyLedger) -> None:
    charge(ledger, M(1.0, 0.02, 50))
    with sqlite3.connect(ledger.path) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM charges")
        with pytest.raises(sqlite3.IntegrityError, match="rewritten"):
            conn.execute("UPDATE charges SET noise_multiplier = 50")
        with pytest.raises(sqlite3.IntegrityError, match="fixed"):
            conn.execute("UPDATE datasets SET delta = 0.5")
    assert ledger.history(FP) == [M(1.0, 0.02, 50)]


# --------------------------------------------------------------- idempotency, status


def test_retrying_a_charged_round_does_not_pay_twice(ledger: PrivacyLedger) -> None:
    m = M(1.0, 0.02, 50)
    first = charge(ledger, m, run_id="run-x", round=3)
    assert ledger.has_charge(FP, "run-x", 3) == first
    assert ledger.has_charge(FP, "run-x", 4) is None
    assert ledger.has_charge(FP, "run-y", 3) is None
    again = charge(ledger, m, run_id="run-x", round=3)
    assert again == first
    assert raw_count(ledger.path) == 1
    assert ledger.spent(FP, delta=DELTA) == pytest.approx(first.epsilon_after)


def test_retry_with_another_mechanism_is_an_error(ledger: PrivacyLedger) -> None:
    charge(ledger, M(1.0, 0.02, 50))
    with pytest.raises(ConfigError, match="same mechanism"):
        charge(ledger, M(1.0, 0.02, 60))
    assert raw_count(ledger.path) == 1


def test_completed_round_cannot_be_charged_again(ledger: PrivacyLedger) -> None:
    m = M(1.0, 0.02, 50)
    receipt = charge(ledger, m)
    spent = ledger.spent(FP, delta=DELTA)
    done = ledger.mark_completed(receipt.charge_id, metrics={"loss": 0.25, "n": 120})
    assert done.status == "completed" and done.metrics == {"loss": 0.25, "n": 120}
    assert done.completed_at is not None
    assert ledger.mark_completed(receipt.charge_id) == done  # idempotent
    with pytest.raises(PolicyViolation, match="second output"):
        charge(ledger, m)
    # Completing changes the status only: the charge still counts in full.
    assert ledger.history(FP) == [m]
    assert ledger.spent(FP, delta=DELTA) == pytest.approx(spent)


def test_failed_round_still_counts_and_may_be_retried(ledger: PrivacyLedger) -> None:
    m = M(1.0, 0.02, 50)
    receipt = charge(ledger, m)
    failed = ledger.mark_failed(receipt.charge_id)
    assert failed.status == "failed"
    assert charge(ledger, m).charge_id == receipt.charge_id
    assert ledger.history(FP) == [m]
    # The retry trains and releases under the same, single charge.
    assert ledger.mark_completed(receipt.charge_id).status == "completed"
    assert ledger.history(FP) == [m]
    with pytest.raises(ConfigError, match="already 'completed'"):
        ledger.mark_failed(receipt.charge_id)


def test_unknown_charge_id_is_a_clear_error(ledger: PrivacyLedger) -> None:
    with pytest.raises(ConfigError, match="no charge #99"):
        ledger.mark_completed(99)


def test_timestamps_come_from_the_injected_clock(ledger_path: Path) -> None:
    start = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    ticks = iter(start + timedelta(seconds=i) for i in range(10))
    ledger = PrivacyLedger(ledger_path, clock=lambda: next(ticks))
    receipt = charge(ledger, M(1.0, 0.02, 20), accountant="rdp")
    assert receipt.created_at.startswith("2030-01-02T03:04:05")
    assert ledger.mark_completed(receipt.charge_id).completed_at.startswith("2030-01-02T03:04:06")


# ------------------------------------------------------------------ configuration


def test_delta_mismatch_is_refused_with_the_fix(ledger: PrivacyLedger) -> None:
    charge(ledger, M(1.0, 0.02, 50))
    with pytest.raises(ConfigError) as info:
        charge(ledger, M(1.0, 0.02, 50), round=1, delta=1e-6)
    message = str(info.value)
    assert "delta=1e-05" in message and "delta=1e-06" in message and "Fix" in message
    with pytest.raises(ConfigError, match="'rdp'"):
        charge(ledger, M(1.0, 0.02, 50), round=1, accountant="rdp")
    with pytest.raises(ConfigError, match="one delta"):
        ledger.spent(FP, delta=1e-6, accountant="prv")
    assert raw_count(ledger.path) == 1


def test_not_a_sqlite_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not SQLite, just text that happens to be long enough" * 20)
    with pytest.raises(ConfigError, match="ledger.sqlite") as info:
        PrivacyLedger(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes().startswith(b"this is not SQLite")  # left untouched


def test_foreign_database_and_newer_schema_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE patients (id TEXT)")
    with pytest.raises(ConfigError, match="not a fedcare privacy ledger"):
        PrivacyLedger(foreign)
    newer = tmp_path / "newer.sqlite"
    PrivacyLedger(newer)
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 7")
    with pytest.raises(ConfigError, match="schema version 7"):
        PrivacyLedger(newer)


def test_missing_file_is_an_error_only_when_not_creating(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no privacy ledger"):
        PrivacyLedger(tmp_path / "absent.sqlite", create=False)
    assert not (tmp_path / "absent.sqlite").exists()


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
    ],
)
def test_charge_validates_arguments(ledger: PrivacyLedger, overrides: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        charge(ledger, M(1.0, 0.02, 10), **overrides)
    assert raw_count(ledger.path) == 0


# ------------------------------------------------------------------ crash safety


def _charge_then_train(path: str, conn: Any) -> None:
    """Child: charge, tell the parent the receipt, then 'train' until killed."""
    import time

    receipt = PrivacyLedger(path).charge(
        fingerprint=FP,
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
    from client.accounting import Mechanism
    from client.ledger import PrivacyLedger
    receipt = PrivacyLedger(sys.argv[1]).charge(
        fingerprint=sys.argv[2], budget_epsilon=10.0, delta=1e-5, accountant="prv",
        mechanism=Mechanism(1.0, 0.02, 50), run_id="run-k", round=0)
    print(receipt.charge_id, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.parametrize("how", ["fork", pytest.param("python -c", marks=pytest.mark.slow)])
def test_sigkill_during_training_keeps_the_charge(ledger_path: Path, how: str) -> None:
    PrivacyLedger(ledger_path)
    if how == "fork":
        if "fork" not in multiprocessing.get_all_start_methods():
            pytest.skip("no fork on this platform")
        parent_end, child_end = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=_charge_then_train, args=(str(ledger_path), child_end)
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
            [sys.executable, "-c", _SUBPROCESS_CHILD, str(ledger_path), FP],
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
    receipt = ledger.has_charge(FP, "run-k", 0)
    assert receipt is not None and receipt.charge_id == charge_id
    assert receipt.status == "charged"
    assert ledger.history(FP) == [M(1.0, 0.02, 50)]
    assert ledger.spent(FP, delta=DELTA) > 0
    # The resumed run retries the round without paying twice.
    assert charge(ledger, M(1.0, 0.02, 50), run_id="run-k").charge_id == charge_id
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


def _racer(path: str, index: int, budget: float, barrier: Any, results: Any) -> None:
    ledger = PrivacyLedger(path)
    barrier.wait(60)
    try:
        receipt = ledger.charge(
            fingerprint=FP,
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


@pytest.mark.parametrize("how", ["thread", "fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_concurrent_charges_never_overspend(ledger_path: Path, how: str) -> None:
    PrivacyLedger(ledger_path)
    budget = _race_budget()
    if how == "thread":
        import queue

        results: Any = queue.Queue()
        barrier: Any = threading.Barrier(RACERS)
        workers: list[Any] = [
            threading.Thread(target=_racer, args=(str(ledger_path), i, budget, barrier, results))
            for i in range(RACERS)
        ]
    else:
        if how not in multiprocessing.get_all_start_methods():
            pytest.skip(f"no {how} on this platform")
        ctx = multiprocessing.get_context(how)
        results, barrier = ctx.Queue(), ctx.Barrier(RACERS)
        workers = [
            ctx.Process(target=_racer, args=(str(ledger_path), i, budget, barrier, results))
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
    assert ledger.history(FP) == [RACE_MECHANISM] * ALLOWED
    spent = ledger.spent(FP, delta=DELTA)
    assert spent <= budget
    assert_matches_pld(ledger.history(FP), spent)


# ------------------------------------------------------------------------- the CLI


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(budget_show)
    return app


def test_budget_show_text_and_json(ledger: PrivacyLedger) -> None:
    charge(ledger, M(1.1, 0.02, 100), run_id="run-a", round=0, budget=6.0)
    done = charge(ledger, M(1.5, 0.05, 150), run_id="run-b", round=0, budget=6.0)
    ledger.mark_completed(done.charge_id)
    spent = ledger.spent(FP, delta=DELTA)
    runner = CliRunner()

    text = runner.invoke(_cli(), ["--db", str(ledger.path)])
    assert text.exit_code == 0, text.output
    assert FP in text.output
    assert f"{spent:.4g}" in text.output and "1e-05" in text.output and "prv" in text.output
    for word in ("run-a", "run-b", "100", "150", "completed", "charged", "of budget 6"):
        assert word in text.output

    out = runner.invoke(_cli(), ["--db", str(ledger.path), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    (dataset,) = payload["datasets"]
    assert dataset["fingerprint"] == FP and dataset["accountant"] == "prv"
    assert dataset["delta"] == DELTA and dataset["budget_epsilon"] == 6.0
    mechanisms = [
        M(c["noise_multiplier"], c["sample_rate"], c["steps"]) for c in dataset["charges"]
    ]
    assert mechanisms == [M(1.1, 0.02, 100), M(1.5, 0.05, 150)]
    assert [c["status"] for c in dataset["charges"]] == ["charged", "completed"]
    assert_matches_pld(mechanisms, dataset["epsilon"])


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
