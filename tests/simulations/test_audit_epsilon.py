"""Independent ε recomputation from the audit logs, against dp-accounting's PLD directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedcare.client.accounting import PLD_DISCRETIZATION, Mechanism, independent_epsilon
from fedcare.simulations.audit.epsilon import (
    audit_charges,
    recompute_epsilon,
    server_log_charges,
    site_log_charges,
)
from tests._flower import task_identity
from tests.simulations.test_audit_verify import DELTA, MECH_A, MECH_B, make_sites, run_federation


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=7):
        yield


def test_site_logs_give_the_whole_history_and_an_under_reporter_is_flagged(
    tmp_path: Path,
) -> None:
    sites = make_sites(
        tmp_path / "sites",
        ("site-a", MECH_A),
        ("site-b", MECH_B),
        options={"site-b": {"under_report": 0.05}},
    )
    run_federation(tmp_path / "earlier", sites, run_id="r0", rounds=1)  # an earlier run
    run_dir = run_federation(tmp_path / "run", sites, run_id="r1", rounds=2)
    audit = recompute_epsilon(run_dir)
    assert [(r.site_id, r.round) for r in audit.rows] == [
        ("site-a", 1),
        ("site-a", 2),
        ("site-b", 1),
        ("site-b", 2),
    ]
    for row in audit.rows:
        mechanism = MECH_A if row.site_id == "site-a" else MECH_B
        history = [mechanism] * (1 + row.round)  # the earlier run's round, then this run's
        expected = independent_epsilon(history, delta=DELTA)
        assert row.recomputed_epsilon == pytest.approx(expected, abs=1e-6)
        assert row.difference == pytest.approx(row.recomputed_epsilon - row.reported_epsilon)
        assert row.delta == DELTA
        assert row.flagged == (row.site_id == "site-b"), row
    assert not audit.ok
    assert audit.tolerance == PLD_DISCRETIZATION
    assert audit.reported_accountant == "prv"
    assert audit.independent_accountant.startswith("pld")


def test_without_site_logs_the_servers_per_round_reports_are_used(tmp_path: Path) -> None:
    sites = make_sites(
        tmp_path / "sites",
        ("site-a", MECH_A),
        ("site-b", MECH_B),
        options={"site-b": {"under_report": 0.05}},
    )
    run_dir = run_federation(tmp_path / "run", sites, run_id="r1", rounds=2)
    (run_dir / "sites.json").unlink()  # the server's run directory alone
    audit = recompute_epsilon(run_dir)
    assert len(audit.rows) == 4
    for row in audit.rows:
        mechanism = MECH_A if row.site_id == "site-a" else MECH_B
        expected = independent_epsilon([mechanism] * row.round, delta=DELTA)
        assert row.recomputed_epsilon == pytest.approx(expected, abs=1e-6)
        assert row.flagged == (row.site_id == "site-b")


def _train(
    run: str, rnd: int, *, fp: str = "fp", eps: float = 1.0, dp: bool = True, **mech: Any
) -> dict[str, Any]:
    mechanism = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, **mech}
    return {
        "kind": "train",
        "writer": "site-x",
        "run_id": run,
        "data": {
            "round": rnd,
            "dataset_fingerprint": fp,
            "dp": dp,
            "mechanism": mechanism if dp else None,
            "epsilon": eps if dp else None,
            "delta": DELTA if dp else None,
            "accountant": "prv" if dp else None,
            "replayed": False,
        },
    }


def test_a_round_counts_once_per_dataset_and_datasets_keep_separate_histories() -> None:
    replay = _train("r", 1)
    replay["data"]["replayed"] = True
    entries = [
        _train("r", 1),
        replay,  # the same release sent again
        _train("r", 1),  # a retried round: the ledger charged it once
        _train("r", 2, steps=20),
        _train("r", 3, fp="other"),  # new data: a fresh history
        _train("r", 4, dp=False),
    ]
    charges = site_log_charges(entries)
    assert [(c.dataset, c.round, c.mechanism.steps) for c in charges] == [
        ("fp", 1, 10),
        ("fp", 2, 20),
        ("other", 3, 10),
    ]
    rows = audit_charges(charges, run_ids={"r"})
    one = Mechanism(1.0, 0.1, 10)
    assert rows[1].recomputed_epsilon == pytest.approx(
        independent_epsilon([one, Mechanism(1.0, 0.1, 20)], delta=DELTA), abs=1e-6
    )
    assert rows[2].recomputed_epsilon == pytest.approx(
        independent_epsilon([one], delta=DELTA), abs=1e-6
    )
    assert audit_charges(charges, run_ids={"another-run"}) == []


def test_the_tolerance_is_the_pld_discretisation_and_no_further() -> None:
    exact = independent_epsilon([Mechanism(1.0, 0.1, 10)], delta=DELTA)
    for reported, flagged in (
        (exact, False),
        (exact - 0.9 * PLD_DISCRETIZATION, False),
        (exact - 1.1 * PLD_DISCRETIZATION, True),
        (exact + 5.0, False),  # over-reporting is never a privacy problem
    ):
        (row,) = audit_charges(site_log_charges([_train("r", 1, eps=reported)]))
        assert row.flagged is flagged, (reported, exact)


def test_server_reports_ignore_non_dp_sites_and_refusals() -> None:
    def update(site: str, rnd: int, report: dict[str, Any], kind: str = "update") -> dict:
        return {
            "kind": kind,
            "run_id": "r",
            "data": {"round": rnd, "site_id": site, "site": report},
        }

    dp = {
        "dp": True,
        "epsilon": 1.0,
        "delta": DELTA,
        "accountant": "prv",
        "noise_multiplier": 1.0,
        "sample_rate": 0.1,
        "steps": 10,
    }
    entries = [
        update("a", 1, dp),
        update("a", 1, {**dp, "replayed": True}),  # the server asked again after a resume
        update("b", 1, {"dp": False}),
        update("c", 1, dp, kind="rejected"),  # trained and released, though not aggregated
        {"kind": "refused", "run_id": "r", "data": {"round": 2, "site_id": "a", "reason": "x"}},
    ]
    assert [(c.site_id, c.round) for c in server_log_charges(entries)] == [("a", 1), ("c", 1)]
