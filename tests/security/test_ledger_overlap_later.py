"""A site's ledger composes every dataset that shares a patient with its cohort, including
those another process charged after the site's own charges.

The members join (:meth:`~fedcare.client.ledger.PrivacyLedger._affecting`) finds every
dataset sharing a patient with a cohort (and every dataset of unknown membership); it runs
in every call. Answering from an earlier call (a memo keyed on the tables' row counts was
tried, and taken back) would leave out a dataset registered since: an under-count. So each
attack here adds one *after* the site's own ledger instance has charged, from another ledger
instance on the same file (another worker or process of the site, or a run of a centre that
registered an overlapping cohort), and the site's next charge must compose the new
dataset's charges and be refused when they put it over the budget. Every ε is checked
against Google's ``dp_accounting`` on the composed history, never against the ledger's own
numbers.

* (a) A cohort that shares one patient with the site's, registered and charged
  later, is composed by the next charge.
* (b) A dataset of unknown membership (a key not made by ``cohort_key``: it may hold any
  patient) charged later is composed by the next charge.
* (c) Many charges of the site's cohort, with overlapping cohorts appearing between
  them, never record an ε below the independent one of the composed history.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    independent_epsilon,
    prv_eps_error,
)
from fedcare.client.ledger import ChargeReceipt, PrivacyLedger
from fedcare.common.errors import PrivacyBudgetExceeded

DELTA = 1e-5
M = Mechanism
PATIENTS = [f"patient-{i}" for i in range(50)]


def _charge(
    ledger: PrivacyLedger,
    key: str,
    mechanism: Mechanism,
    *,
    budget: float,
    run: str,
    round_: int = 0,
) -> ChargeReceipt:
    return ledger.charge(
        fingerprint=key,
        budget_epsilon=budget,
        delta=DELTA,
        accountant="prv",
        mechanism=mechanism,
        run_id=run,
        round=round_,
    )


def _within_reference(reported: float, history: list[Mechanism]) -> None:
    """``reported`` is the PRV upper estimate of ``history``'s ε: above the independent PLD
    value (less its discretisation), and at most the PRV's error interval over it."""
    pld = independent_epsilon(history, delta=DELTA)
    e = prv_eps_error(history, delta=DELTA)
    assert pld - PLD_DISCRETIZATION <= reported <= pld + 2 * e + PLD_DISCRETIZATION, (
        reported,
        pld,
    )


@pytest.fixture()
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.sqlite"


def _budget_between(without: list[Mechanism], with_other: list[Mechanism]) -> float:
    """A budget that ``without`` fits and ``with_other`` does not, by the independent
    accountant, with room for the PRV's error on either side."""
    low = independent_epsilon(without, delta=DELTA) + 2 * prv_eps_error(without, delta=DELTA)
    high = independent_epsilon(with_other, delta=DELTA) - PLD_DISCRETIZATION
    assert low + 0.2 < high, (low, high)  # the test decides something
    return (low + high) / 2


# ------------------------------------------------ (a) an overlapping cohort, registered later


def test_an_overlapping_cohort_registered_after_the_sites_charges_is_composed(path: Path) -> None:
    site = PrivacyLedger(path)
    other_worker = PrivacyLedger(path)  # another process of the site, the same file
    key = site.cohort_key(PATIENTS)
    round_mechanism, other_mechanism = M(1.2, 0.1, 20), M(0.9, 0.2, 40)
    budget = _budget_between(
        [round_mechanism] * 2, [round_mechanism, other_mechanism, round_mechanism]
    )
    first = _charge(site, key, round_mechanism, budget=budget, run="run")
    _within_reference(first.epsilon_after, [round_mechanism])
    assert site.spent(key, delta=DELTA) == first.epsilon_after  # and reads it again

    # One patient in common, registered and charged by the other worker only.
    overlapping = other_worker.cohort_key([PATIENTS[7], "someone-else"])
    charged = _charge(other_worker, overlapping, other_mechanism, budget=1e3, run="other")
    _within_reference(charged.epsilon_after, [round_mechanism, other_mechanism])

    composed = [round_mechanism, other_mechanism]
    _within_reference(site.spent(key, delta=DELTA), composed)
    with pytest.raises(PrivacyBudgetExceeded):
        _charge(site, key, round_mechanism, budget=budget, run="run", round_=1)
    assert [c.charge_id for c in site.charges_affecting(key)] == [
        first.charge_id,
        charged.charge_id,
    ]
    # A disjoint cohort registered later changes nothing for key (it shares no patient).
    disjoint = other_worker.cohort_key(["nobody-here"])
    _charge(other_worker, disjoint, M(0.5, 1.0, 50), budget=1e3, run="disjoint")
    _within_reference(site.spent(key, delta=DELTA), composed)


# ---------------------------------------------- (b) a dataset of unknown membership, later


def test_a_dataset_of_unknown_membership_charged_later_is_composed(path: Path) -> None:
    site = PrivacyLedger(path)
    other_worker = PrivacyLedger(path)
    key = site.cohort_key(PATIENTS)
    round_mechanism, unknown_mechanism = M(1.5, 0.05, 30), M(0.8, 0.25, 40)
    budget = _budget_between(
        [round_mechanism] * 2, [round_mechanism, unknown_mechanism, round_mechanism]
    )
    first = _charge(site, key, round_mechanism, budget=budget, run="run")
    # A key not made by cohort_key: no registered members, so it may hold any patient.
    unknown = "ab" * 32
    _charge(other_worker, unknown, unknown_mechanism, budget=1e3, run="legacy")

    _within_reference(site.spent(key, delta=DELTA), [round_mechanism, unknown_mechanism])
    with pytest.raises(PrivacyBudgetExceeded):
        _charge(site, key, round_mechanism, budget=budget, run="run", round_=1)
    assert len(site.charges_affecting(key)) == 2
    assert first.status == "charged"


# ------------------------------------ (c) rounds and overlapping cohorts, interleaved


def test_interleaved_overlaps_never_record_less_than_the_composed_history(path: Path) -> None:
    site = PrivacyLedger(path)
    other_worker = PrivacyLedger(path)
    key = site.cohort_key(PATIENTS)
    round_mechanism = M(2.0, 0.1, 10)
    composed: list[Mechanism] = []
    for r in range(4):
        receipt = _charge(site, key, round_mechanism, budget=1e3, run="run", round_=r)
        composed.append(round_mechanism)
        _within_reference(receipt.epsilon_after, composed)
        # Between rounds another cohort sharing patient r appears and is charged.
        other = other_worker.cohort_key([PATIENTS[r], f"outsider-{r}"])
        extra = M(1.0 + 0.5 * r, 0.2, 10)
        _charge(other_worker, other, extra, budget=1e3, run=f"other-{r}")
        composed.append(extra)
        _within_reference(site.spent(key, delta=DELTA), composed)
    assert len(site.charges_affecting(key)) == len(composed)
