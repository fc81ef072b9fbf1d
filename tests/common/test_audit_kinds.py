"""Audit entry kinds and their fields, declared once: what the writers write is what is
declared, and the spellings on disk (a log format) never change by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ConfigRecord

from fedcare.common import audit_kinds as kinds
from fedcare.common import keys
from fedcare.common.audit import read_entries
from fedcare.common.federation import FederationConfig
from fedcare.common.summary import EVENT_KINDS
from fedcare.server.audit import ServerAudit, server_log_path, site_report

CFG = FederationConfig.from_run_config({"num-server-rounds": 2})


def test_the_spellings_on_disk_are_those_of_every_existing_log() -> None:
    """Written out by hand: renaming a constant must not rename what old logs hold."""
    assert (kinds.LOG_OPEN, kinds.RECOVERY) == ("log-open", "recovery")
    assert set(kinds.SERVER_ENTRIES.specs) == {
        "run-start",
        "run-resume",
        "round-start",
        "update",
        "rejected",
        "refused",
        "failed",
        "diverged",
        "dropped",
        "round-skipped",
        "evaluate-failed",
        "aggregate",
        "run-end",
        "secagg",
    }
    assert set(kinds.SITE_ENTRIES.specs) == {
        "run-start",
        "train",
        "evaluate",
        "personalize",
        "refused",
        "secagg",
    }
    assert kinds.SERVER_WRITER == "server"


def test_the_run_records_event_kinds_are_the_servers_audited_ones_and_rejected() -> None:
    assert set(EVENT_KINDS) == {*kinds.SERVER_EVENT_KINDS, kinds.REJECTED}
    assert set(EVENT_KINDS) <= set(kinds.SERVER_ENTRIES.specs)


def test_every_server_entry_carries_exactly_its_declared_fields(tmp_path: Path) -> None:
    audit = ServerAudit.open(tmp_path, CFG, run_id="r1")
    sha = "ab" * 32
    audit.run_start(CFG, model="ehr_mlp", model_sha256=sha)
    audit.run_resume(CFG, model="ehr_mlp", model_sha256=sha, after_round=1)
    audit.round_start(2, model_sha256=sha)
    info = ConfigRecord({keys.S_DP: True, keys.S_EPSILON: 1.0})
    audit.update(2, site_id="a", node_id=7, sha256=sha, norm=0.5, num_examples=10, info=info)
    audit.rejected(2, site_id="b", node_id=8, sha256=None, reason="NaN", info=None)
    for kind in kinds.SERVER_EVENT_KINDS:
        audit.event(2, kind=kind, site_id="c", reason="why")
    audit.aggregate(2, model_sha256=sha, updates=1)
    stages = {"advertised": ["a"], "shared": ["a"], "masked": ["a"], "unmasked": ["a"]}
    audit.secagg(2, data={"threshold": 2, **stages, "outcome": "ok", "bytes": {}, "seconds": {}})
    audit.run_end(rounds_completed=2, model_sha256=sha)
    entries = read_entries(server_log_path(tmp_path))
    assert {e["kind"] for e in entries} == {kinds.LOG_OPEN, *kinds.SERVER_ENTRIES.specs}
    for entry in entries:
        table = kinds.LOG_ENTRIES if entry["kind"] == kinds.LOG_OPEN else kinds.SERVER_ENTRIES
        assert tuple(entry["data"]) == tuple(sorted(table[entry["kind"]].fields)), entry["kind"]


def test_a_sites_report_holds_only_the_declared_fields() -> None:
    wire = {
        keys.S_DP: True,
        keys.S_EPSILON: 1.0,
        keys.S_DELTA: 1e-5,
        keys.S_ACCOUNTANT: "prv",
        keys.S_NOISE_MULTIPLIER: 1.1,
        keys.S_SAMPLE_RATE: 0.1,
        keys.S_STEPS: 4,
        keys.S_REPLAYED: False,
        keys.S_RUN_EPSILON: 0.5,
        keys.S_NOISE: keys.NOISE_OS_ENTROPY,
        keys.S_EVALUATION: keys.EVAL_DP,
        keys.S_AUDIT_KEY: "cd" * 32,
        keys.S_AUDIT_HEAD: "3:" + "ef" * 32,
        "an-unknown-key": "dropped",
    }
    assert set(site_report(ConfigRecord(wire))) == set(kinds.SITE_REPORT_FIELDS)


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("update", {"round": 1}, "a server 'update' audit entry lacks site_id"),
        (
            "aggregate",
            {"round": 1, "model_sha256": "x", "updates": 1, "extra": 2},
            "has undeclared extra",
        ),
        ("train", {}, "'train' is not a declared server audit entry kind"),
    ],
)
def test_an_entry_out_of_step_with_its_declaration_is_refused(
    kind: str, data: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        kinds.SERVER_ENTRIES.check(kind, data)


def test_the_server_refuses_to_log_an_event_kind_it_does_not_declare(tmp_path: Path) -> None:
    audit = ServerAudit.open(tmp_path, CFG, run_id="r1")
    with pytest.raises(ValueError, match="not a server event kind"):
        audit.event(1, kind=kinds.UPDATE, site_id="a", reason="x")
    assert not server_log_path(tmp_path).exists()  # nothing was written
