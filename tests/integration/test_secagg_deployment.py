"""Secure aggregation in a real deployment: a centre (gateway + SuperLink, TLS, registered
nodes) and three hospitals (SuperNode + fedcare's site worker) as real processes on this
machine, the session's one (tests/integration/conftest.py: the hospitals' peers files are
written before they start); a signed run with ``secure-aggregation = true``. Slow: real
processes."""

from __future__ import annotations

import json

import pytest

from fedcare.common import audit_kinds as kinds
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.verify import verify_paths
from tests.integration._deployment import DEPLOYMENT_GROUP, DEPLOYMENT_TIMEOUT_S, Deployment

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.xdist_group(DEPLOYMENT_GROUP),
    # The first test to ask also starts the session's deployment (a centre, three hospitals)
    # within its time; on two loaded cores that and a three-round run pass 300 s.
    pytest.mark.timeout(DEPLOYMENT_TIMEOUT_S),
]


def test_a_deployed_secure_round_sums_three_hospitals(deployment: Deployment) -> None:
    dep = deployment
    run = "secure-deployed"
    config = {
        "num-server-rounds": 1,
        "num-sites": 3,
        "round-timeout": 120.0,
        "secure-aggregation": True,
        "max-update-norm": 10.0,
    }
    info = dep.wait(dep.submit(run, **config))
    assert info["status"] == "finished:completed", info
    summary = load_summary(dep.run_dir(run) / "summary.json")
    assert summary.rounds_completed == 1
    assert [s.status for s in summary.sites] == ["completed"] * 3, summary.sites
    server_log = dep.run_dir(run) / "audit" / "server.jsonl"
    entries = [json.loads(line) for line in server_log.open()]
    secure = [e["data"] for e in entries if e["kind"] == kinds.SECAGG]
    assert len(secure) == 1 and secure[0]["outcome"] == "ok", secure
    assert sorted(secure[0]["unmasked"]) == ["site-0", "site-1", "site-2"]
    site_logs = [site / "state" / "audit.jsonl" for site in dep.sites]
    result = verify_paths([server_log, *site_logs])
    assert result.ok, result.cross_check_problems
