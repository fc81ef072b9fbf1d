"""A simulated federation with secure aggregation, end to end: fedcare.simulate in process
(Flower's simulation engine, the sites in Ray actors), then its audit logs verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedcare
from fedcare.common import audit_kinds as kinds
from fedcare.simulations.audit.verify import verify_paths

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_three_sites_two_secure_rounds_in_process(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    fedcare.synthesize(
        sites,
        n_sites=3,
        seed=5,
        config=fedcare.SynthConfig(
            patients_per_site=60, n_genes=20, image_size=16, image_format="npy"
        ),
    )
    out = tmp_path / "run"
    fedcare.simulate(
        out=out,
        sites=sites,
        in_process=True,
        baselines=False,
        settings={
            "num-server-rounds": 2,
            "task": "readmission",
            "secure-aggregation": True,
            "max-update-norm": 10.0,
            "round-timeout": 120,
        },
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert [s["status"] for s in summary["sites"]] == ["completed"] * 3
    assert not summary.get("events")  # no drop-out, refusal, rejection or skipped round
    server_log = [json.loads(line) for line in (out / "audit" / "server.jsonl").open()]
    secure = [e["data"] for e in server_log if e["kind"] == kinds.SECAGG]
    assert [e["round"] for e in secure] == [1, 2]
    assert all(e["outcome"] == "ok" and len(e["unmasked"]) == 3 for e in secure)
    for site in ("site-0", "site-1", "site-2"):
        site_log = out / "state" / site / "audit.jsonl"
        entries = [json.loads(line) for line in site_log.open()]
        assert [e["data"]["round"] for e in entries if e["kind"] == kinds.SECAGG] == [1, 2]
    result = verify_paths(
        [out / "audit" / "server.jsonl", *sorted((out / "state").glob("*/audit.jsonl"))]
    )
    assert result.ok, result.cross_check_problems
