"""A centre that runs Flower as it comes, and an app that ships code: no hospital runs it.

fedcare's own centre (``fedcare server start``) refuses a foreign app before any message
leaves it. A hospital must not rely on that: here the coordinating centre is a plain
``flower-superlink`` (Flower's own executor, which installs and runs whatever app is
submitted), and the submitted app ships a ServerApp that sends ``train`` messages to every
hospital and a ClientApp that writes a marker file the moment it is imported. Two real
hospitals (``fedcare site start``: TLS, node authentication, fedcare's site worker) answer
with a refusal naming the site and the reason; the marker never appears; each refusal is in
the hospital's own signed audit log; no ledger is opened.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedcare.client.audit import AUDIT_LOG_NAME
from fedcare.common.audit import check_log, read_entries
from fedcare.common.processes import venv_bin
from tests.integration._deployment import Deployment, processes_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVER_APP = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    nodes = []
    while len(nodes) < {n_sites} and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [
        Message(RecordDict({{"config": ConfigRecord({{"x": 1}})}}), dst_node_id=n,
                message_type="train")
        for n in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=120))
    out = [r.error.reason if r.has_error() else "answered" for r in replies]
    Path({answers!r}).write_text(json.dumps(out))
"""

CLIENT_APP = """
from pathlib import Path

Path({marker!r}).write_text("the outsider's code ran at a hospital")

from flwr.clientapp import ClientApp

app = ClientApp()
"""


def _foreign_app(root: Path, *, n_sites: int) -> tuple[Path, Path, Path]:
    app, marker, answers = root / "foreign-app", root / "marker", root / "answers.json"
    app.mkdir()
    (app / "outsider_server.py").write_text(
        SERVER_APP.format(n_sites=n_sites, answers=str(answers))
    )
    (app / "outsider_client.py").write_text(CLIENT_APP.format(marker=str(marker)))
    (app / "pyproject.toml").write_text(
        tomli_w.dumps(
            {
                "project": {"name": "helpful-model", "version": "1.0.0"},
                "tool": {
                    "flwr": {
                        "app": {
                            "publisher": "outsider",
                            "components": {
                                "serverapp": "outsider_server:app",
                                "clientapp": "outsider_client:app",
                            },
                        }
                    }
                },
            }
        )
    )
    return app, marker, answers


@pytest.fixture(scope="module")
def plain_flower_centre(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Two fedcare hospitals whose centre is a plain ``flower-superlink`` (Flower's executor,
    Control and Fleet API on one port)."""
    dep = Deployment.create(tmp_path_factory.mktemp("plain-centre"), n_sites=2, patients=80)
    certs = dep.certs
    home = dep.flwr_home
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": "plain",
                    "plain": {
                        "address": f"127.0.0.1:{dep.port}",
                        "root-certificates": str(certs / "ca.crt"),
                    },
                }
            }
        )
    )
    log = dep.root / "logs" / "plain-superlink.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [
                venv_bin("flower-superlink"),
                "--ssl-ca-certfile", str(certs / "ca.crt"),
                "--ssl-certfile", str(certs / "server.crt"),
                "--ssl-keyfile", str(certs / "server.key"),
                "--enable-supernode-auth",
                "--host", "127.0.0.1",
                "--port", str(dep.port),
                "--database", str(dep.root / "centre" / "plain.db"),
            ],
            env=dep.env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    from tests.integration._deployment import Process

    dep.processes["superlink"] = Process("superlink", proc, log, {proc.pid})
    try:
        deadline = time.monotonic() + 60
        while not dep.healthy() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        for i in range(len(dep.sites)):
            out = dep.flwr(
                "supernode",
                "register",
                str(dep.root / f"hospital-{i}" / "keys" / "supernode.pub"),
                "plain",
            )
            assert out.returncode == 0, out.stdout + out.stderr
            dep.start_site(i)
        yield dep
    finally:
        dep.stop_all()
        deadline = time.monotonic() + 15
        while processes_under(dep.root) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_under(dep.root), "processes left behind"


def test_an_app_that_ships_code_never_runs_at_a_hospital(plain_flower_centre: Deployment) -> None:
    dep = plain_flower_centre
    app, marker, answers = _foreign_app(dep.root, n_sites=len(dep.sites))
    out = dep.flwr("run", str(app), "plain", "--format", "json")
    assert '"success": true' in out.stdout, out.stdout + out.stderr
    deadline = time.monotonic() + 300
    while not answers.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert answers.exists(), dep.processes["superlink"].text()[-3000:]
    reasons = sorted(json.loads(answers.read_text()))
    assert len(reasons) == len(dep.sites), reasons
    for i, reason in enumerate(reasons):
        assert reason.startswith(f"site-{i}: "), reasons
        assert "outsider/helpful-model" in reason or "pyproject.toml" in reason, reason
    assert not marker.exists(), "a hospital ran the outsider's code"
    for i in range(len(dep.sites)):
        state = dep.root / f"hospital-{i}" / "state"
        assert not (state / "ledger.sqlite").exists()
        log = state / AUDIT_LOG_NAME
        assert check_log(log).ok
        refused = [e for e in read_entries(log) if e["kind"] == "refused"]
        assert len(refused) == 1 and refused[0]["data"]["reason"] in reasons[i]
        assert "refused" in dep.processes[f"site-{i}"].text()
