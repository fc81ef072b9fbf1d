"""What the privacy ledger reads and writes per round, and that reading less changed no ε.

A charge reads the composed history merged in SQL (one row per ``(σ, q)``, steps summed)
instead of every earlier charge whole; a completion settles its charge in one ``UPDATE`` and
reads it back (no ``RETURNING``: SQLite 3.34 lacks it); a site reads its run's charges once
per round, by the run's key. These tests
check that the ε a charge records is still the ε of the whole history (the same float as
the unmerged history's, and within the dp_accounting band), that the reads return what they
name, and that a round does not read more than that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    epsilon,
    independent_epsilon,
    prv_eps_error,
)
from fedcare.client.data.site import SiteData
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import SiteTrainer
from fedcare.common.errors import ConfigError
from tests.client.test_ledger_connections import _traced
from tests.client.test_local import FAST_POLICY, _request, site  # noqa: F401  (site: fixture)

DELTA = 1e-5
M = Mechanism


def _charge(ledger: PrivacyLedger, key: str, m: Mechanism, run: str, rnd: int, **kw: Any) -> Any:
    return ledger.charge(
        fingerprint=key,
        budget_epsilon=50.0,
        delta=DELTA,
        accountant="prv",
        mechanism=m,
        run_id=run,
        round=rnd,
        **kw,
    )


def test_a_charge_records_the_epsilon_of_the_whole_unmerged_history(tmp_path: Path) -> None:
    # Two overlapping cohorts and one of unknown membership, repeated (σ, q) blocks across
    # runs and kinds: the merged read must count every step of every composed charge.
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    a = ledger.cohort_key(["p1", "p2", "p3"])
    b = ledger.cohort_key(["p3", "p4"])
    c = ledger.cohort_key(["p9"])  # disjoint from a: never composed with it
    unknown = "ab" * 32  # a key without members composes with every dataset
    plan = [
        (a, M(1.1, 0.25, 4), "r1", 1, "train"),
        (a, M(5.0, 1.0, 1), "r1", 1, "evaluate"),
        (b, M(1.1, 0.25, 4), "r2", 1, "train"),
        (c, M(0.7, 0.5, 9), "r3", 1, "train"),
        (a, M(1.1, 0.25, 4), "r1", 2, "train"),
        (unknown, M(2.0, 0.1, 3), "r4", 1, "train"),
        (a, M(5.0, 1.0, 1), "r1", 2, "evaluate"),
    ]
    composed_into_a: list[Mechanism] = []
    for key, m, run, rnd, kind in plan:
        receipt = _charge(ledger, key, m, run, rnd, kind=kind)
        if key != c:
            composed_into_a.append(m)
        if key == a:
            # The very float of the history as the ledger lists it, row by row.
            history = ledger.history(a)
            assert sorted(map(repr, history)) == sorted(map(repr, composed_into_a))
            assert receipt.epsilon_after == epsilon(history, delta=DELTA)
    # And against an accountant that shares no code with it.
    pld = independent_epsilon(composed_into_a, delta=DELTA)
    e = prv_eps_error(composed_into_a, delta=DELTA)
    spent = ledger.spent(a, delta=DELTA)
    assert pld - PLD_DISCRETIZATION <= spent <= pld + 2 * e + PLD_DISCRETIZATION
    # Dropping any one charge from the history would show: ε moves by more than the band.
    assert epsilon(composed_into_a[:-1], delta=DELTA) < pld - PLD_DISCRETIZATION


def test_the_charges_of_one_run(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    key = ledger.cohort_key(["p1", "p2"])
    for run, rnd in (("run-a", 1), ("run-b", 1), ("run-a", 2), ("run-b", 2), ("run-a", 3)):
        _charge(ledger, key, M(1.0, 0.05, 10), run, rnd)
    assert [(c.run_id, c.round) for c in ledger.charges(key, run_id="run-a")] == [
        ("run-a", 1),
        ("run-a", 2),
        ("run-a", 3),
    ]
    assert ledger.charges(key, run_id="run-c") == []
    assert len(ledger.charges(key)) == 5
    with pytest.raises(ConfigError, match="run_id"):
        ledger.charges(key, run_id="")


def test_a_charge_reads_earlier_charges_merged_and_a_completion_is_one_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements = _traced(monkeypatch)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    key = ledger.cohort_key(["p1", "p2"])
    for rnd in range(1, 6):
        ledger.mark_completed(_charge(ledger, key, M(1.0, 0.05, 10), "run", rnd).charge_id)
    statements.clear()
    receipt = _charge(ledger, key, M(1.0, 0.05, 10), "run", 6)
    # Only the retried key's own row is read whole; earlier charges come merged by (σ, q).
    whole_rows = [s for s in statements if s.startswith("SELECT") and "metrics" in s]
    assert len(whole_rows) == 1 and "run_id = 'run' AND round = 6" in whole_rows[0]
    assert any("GROUP BY noise_multiplier, sample_rate" in s for s in statements)
    statements.clear()
    done = ledger.mark_completed(receipt.charge_id)
    assert done.status == "completed" and done.charge_id == receipt.charge_id
    assert [s.split()[0] for s in statements] == ["PRAGMA", "BEGIN", "UPDATE", "SELECT", "COMMIT"]
    assert "RETURNING" not in statements[2]  # SQLite 3.35+ only


def test_a_dp_round_reads_its_run_s_charges_once(
    site: SiteData,  # noqa: F811  (the fixture imported above)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    first = trainer.train_round(_request(round=1, rounds_planned=2))
    calls: dict[str, int] = {}
    for name in ("charges", "has_charge", "charges_affecting", "history"):
        real = getattr(ledger, name)

        def counted(*args: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kw)

        monkeypatch.setattr(ledger, name, counted)
    second = trainer.train_round(_request(round=2, rounds_planned=2))
    assert calls == {"charges": 1}
    # It still planned from what it read: the run's noise, and the run's ε on top of round 1.
    assert second.mechanism == first.mechanism
    assert second.epsilon is not None and first.epsilon is not None
    assert second.epsilon > first.epsilon
    # And a request for a round already released is answered from what the read found.
    calls.clear()
    again = trainer.train_round(_request(round=2, rounds_planned=2))
    assert calls == {"charges": 1}
    assert again.epsilon == second.epsilon
