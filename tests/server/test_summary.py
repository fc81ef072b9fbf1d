"""``server/summary.py``: the run's ``summary.json`` built from the server's run record.

The record is written by hand here (the shape ``fedcare.server.guard.new_record`` starts and
the guard fills), deliberately out of order, and every expected value is read off it by
hand: rounds and sites sorted, mechanisms in round order without their round, the last
round's metrics as the final ones.
"""

from __future__ import annotations

import copy
from importlib import metadata
from typing import Any

import flwr
import pytest

from fedcare.common.summary import SCHEMA_VERSION
from fedcare.server import summary as summary_module
from fedcare.server.summary import build_summary, fedcare_version


def _privacy(mechanism_rounds: list[int]) -> dict[str, Any]:
    return {
        "enabled": True,
        "epsilon": 3.5,
        "run_epsilon": 1.25,
        "delta": 1e-5,
        "accountant": "prv",
        "noise": "os-entropy",
        "evaluation": "dp",
        "mechanisms": [
            {"round": r, "noise_multiplier": 1.0 + r / 10, "sample_rate": 0.01 * r, "steps": 10 * r}
            for r in mechanism_rounds
        ],
    }


def _site(site_id: str, **more: Any) -> dict[str, Any]:
    site = {
        "site_id": site_id,
        "n_train": 120,
        "n_test": 30,
        "status": "completed",
        "reason": None,
        "rounds_participated": [1, 2, 3],
        "privacy": _privacy([2, 1, 3]),  # out of order, as a resumed run may leave them
        "metrics": {"test.auroc": 0.7},
        "personal_metrics": {},
    }
    site.update(more)
    return site


def _record() -> dict[str, Any]:
    return {
        "run_id": "run-42",
        "task": "readmission",
        "model": "ehr_mlp",
        "strategy": "fedyogi",
        "personalization": "finetune",
        "rounds_planned": 4,
        "rounds_completed": 3,
        "config": {"num-server-rounds": 4},
        "resumed_from": None,
        "nodes": {"101": "site-b", "102": "site-a"},
        "rounds": [
            {"round": 3, "metrics": {"test.auroc": 0.81}, "sites": {"site-a": {}}},
            {"round": 0, "metrics": {"test.auroc": 0.5}, "sites": {}},
            {"round": 1, "metrics": {"test.auroc": 0.62, "test.brier": 0.2}, "sites": {}},
        ],
        "sites": {
            "site-b": _site("site-b", status="refused", reason="budget spent"),
            "site-a": _site("site-a", privacy=_privacy([1])),
        },
        "events": [
            {"round": 2, "site_id": "site-b", "kind": "refused", "detail": "budget spent"},
            {"round": 1, "site_id": "*", "kind": "round-skipped", "detail": "too few"},
        ],
    }


def test_rounds_and_sites_are_sorted_and_the_last_round_is_final() -> None:
    s = build_summary(_record())
    assert [r.round for r in s.global_.rounds] == [0, 1, 3]
    assert [r.metrics for r in s.global_.rounds] == [
        {"test.auroc": 0.5},
        {"test.auroc": 0.62, "test.brier": 0.2},
        {"test.auroc": 0.81},
    ]
    assert s.global_.final == {"test.auroc": 0.81}  # round 3's, not the record's last entry
    assert [site.site_id for site in s.sites] == ["site-a", "site-b"]


def test_run_fields_are_copied_and_versions_are_those_installed() -> None:
    s = build_summary(_record())
    assert (s.run_id, s.task, s.strategy, s.personalization) == (
        "run-42",
        "readmission",
        "fedyogi",
        "finetune",
    )
    assert (s.rounds_planned, s.rounds_completed) == (4, 3)
    assert s.schema_version == SCHEMA_VERSION
    assert s.flwr_version == flwr.__version__
    assert s.fedcare_version == metadata.version("fedcare")


def test_mechanisms_are_in_round_order_without_their_round() -> None:
    s = build_summary(_record())
    b = next(site for site in s.sites if site.site_id == "site-b")
    # Rounds 2, 1, 3 in the record: σ = 1 + r/10, q = 0.01 r, steps = 10 r, by round.
    assert [(m.noise_multiplier, m.sample_rate, m.steps) for m in b.privacy.mechanisms] == [
        (1.1, 0.01, 10),
        (1.2, 0.02, 20),
        (1.3, 0.03, 30),
    ]
    assert "round" not in b.privacy.mechanisms[0].model_dump()
    assert (b.privacy.epsilon, b.privacy.run_epsilon, b.privacy.delta) == (3.5, 1.25, 1e-5)
    assert (b.status, b.reason) == ("refused", "budget spent")
    a = next(site for site in s.sites if site.site_id == "site-a")
    assert [m.steps for m in a.privacy.mechanisms] == [10]


def test_events_keep_their_order() -> None:
    s = build_summary(_record())
    assert [(e.round, e.site_id, e.kind) for e in s.events] == [
        (2, "site-b", "refused"),
        (1, "*", "round-skipped"),
    ]


def test_baselines_are_empty_unless_given() -> None:
    assert build_summary(_record()).baselines.model_dump() == {"local_only": {}, "pooled": {}}
    given = {"local_only": {"site-a": {"test.auroc": 0.6}}, "pooled": {"test.auroc": 0.85}}
    assert build_summary(_record(), given).baselines.model_dump() == given


def test_a_run_without_evaluated_rounds_has_no_final_metrics() -> None:
    record = _record()
    record["rounds"] = []
    s = build_summary(record)
    assert s.global_.rounds == () and s.global_.final == {}


def test_an_older_record_without_personalization_reads_as_none() -> None:
    record = _record()
    del record["personalization"]
    assert build_summary(record).personalization == "none"


def test_building_the_summary_leaves_the_record_as_it_was() -> None:
    """The ServerApp writes the record as well, and a simulation rebuilds the summary from
    it with its baselines: building one must not reorder or strip the other."""
    record = _record()
    before = copy.deepcopy(record)
    build_summary(record)
    assert record == before


def test_the_version_of_a_source_tree_that_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(summary_module.metadata, "version", not_installed)
    assert fedcare_version() == "0.0.0+unknown"
    assert build_summary(_record()).fedcare_version == "0.0.0+unknown"
