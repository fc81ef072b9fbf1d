"""Secure aggregation in a real deployment: a centre (gateway + SuperLink, TLS, registered
nodes) and three hospitals (SuperNode + fedcare's site worker) as real processes on this
machine; a signed run with ``secure-aggregation = true``. Slow: real processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import tomllib

from fedcare.client.audit import AUDIT_KEY_NAME
from fedcare.common import audit_kinds as kinds
from fedcare.common.audit import load_or_create_signing_key, public_key_raw
from fedcare.common.files import private_dir
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.verify import verify_paths
from tests.integration._deployment import Deployment, processes_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    dep = Deployment.create(tmp_path_factory.mktemp("secagg-deployment"), patients=80)
    pin_peers(dep.sites)
    try:
        dep.start_server()
        for i in range(len(dep.sites)):
            dep.register(i)
            dep.start_site(i)
        yield dep
    finally:
        dep.stop_all()
        deadline = time.monotonic() + 15
        while processes_under(dep.root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_under(dep.root), "processes left behind"


def pin_peers(sites: list[Path]) -> None:
    """What the hospitals exchange out of band: each one's audit public key, in a peers file
    its own site-config.toml names (``secagg_peers``)."""
    public = {}
    for site in sites:
        config = tomllib.loads((site / "site-config.toml").read_text(encoding="utf-8"))
        state = private_dir(Path(config["state_dir"]))
        key = load_or_create_signing_key(state / AUDIT_KEY_NAME)
        public[str(config["site_id"])] = public_key_raw(key).hex()
    for site in sites:
        path = site / "site-config.toml"
        config = tomllib.loads(path.read_text(encoding="utf-8"))
        others = {k: v for k, v in public.items() if k != config["site_id"]}
        (site / "peers.toml").write_text(tomli_w.dumps({"peers": others}), encoding="utf-8")
        path.write_text(tomli_w.dumps({**config, "secagg_peers": str(site / "peers.toml")}))


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
