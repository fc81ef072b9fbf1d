"""The centre's public port is the Fleet API only; its ServerApp executor runs only fedcare
(issue 11, the coordinating centre's side).

A real ``fedcare server start`` (certificates from ``fedcare certs init``) on 127.0.0.1:
the SuperLink on the loopback control port, the gateway on the public port, the executor.
An *outsider* holds only ``ca.crt`` and the public address; the *operator* works on the
centre's machine with the ``flwr`` CLI on the control port. Everything started here is
stopped, with its whole family, and checked gone.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest, StopRunRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.control.control_http_client import ControlHttpClient
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient

from fedcare.common.federation import RUN_CONFIG_DEFAULTS
from fedcare.common.flower_app import APP_COMPONENTS, fedcare_version, write_app_dir
from fedcare.common.processes import flower_env, free_port
from tests.integration._deployment import BIN, Process, fedcare, processes_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OPERATOR = "centre"  # the flwr CLI connection on the control port
OUTSIDER = "public"  # the same CLI pointed at the public port


@dataclass
class Centre:
    root: Path
    port: int
    control_port: int
    env: dict[str, str]
    server: Process

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.root,
        )

    def flwr_json(self, *args: str) -> dict[str, Any]:
        out = self.flwr(*args, "--format", "json")
        return dict(json.loads(out.stdout[out.stdout.index("{") :]))

    def wait_finished(self, run_id: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.flwr_json("ls", OPERATOR, "--run-id", run_id)["runs"]
            if str(runs[0]["status"]).startswith("finished"):
                return dict(runs[0])
            time.sleep(1)
        raise AssertionError(f"run {run_id} did not finish:\n{self.server.text()[-3000:]}")


def _healthy(ca: Path, port: int) -> bool:
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(ca)), trust_env=False) as c:
            return c.get(f"https://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def centre(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Centre]:
    root = tmp_path_factory.mktemp("centre")
    home = root / "flwr-home"
    home.mkdir()
    env = flower_env(home=home)
    out = fedcare("certs", "init", "--out", str(root / "certs"), "--host", "127.0.0.1", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    port, control_port = free_port(), free_port()
    ca = str(root / "certs" / "ca.crt")
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": OPERATOR,
                    OPERATOR: {"address": f"127.0.0.1:{control_port}", "root-certificates": ca},
                    OUTSIDER: {"address": f"127.0.0.1:{port}", "root-certificates": ca},
                }
            }
        )
    )
    log = root / "server.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [str(BIN / "fedcare"), "server", "start", "--certs", str(root / "certs")]
            + ["--host", "127.0.0.1", "--port", str(port), "--control-port", str(control_port)]
            + ["--database", str(root / "state" / "superlink.db")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Process("server", proc, log, {proc.pid})
    c = Centre(root, port, control_port, env, server)
    try:
        deadline = time.monotonic() + 60
        while not _healthy(c.ca, port):
            assert proc.poll() is None, f"server start exited:\n{server.text()[-3000:]}"
            assert time.monotonic() < deadline, f"not healthy:\n{server.text()[-3000:]}"
            time.sleep(0.3)
        yield c
    finally:
        server.stop()
        deadline = time.monotonic() + 15
        while processes_under(root) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not processes_under(root), "processes left behind"


def _outsider_control(c: Centre) -> ControlHttpClient:
    return ControlHttpClient.from_server_address(
        server_address=f"127.0.0.1:{c.port}",
        insecure=False,
        root_certificates=str(c.ca),
        interceptors=[],
    )


def _raw_status(c: Centre, target: str) -> int:
    """POST ``target`` exactly as written (no client normalises it) through the public port."""
    request = (
        f"POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    context = ssl.create_default_context(cafile=str(c.ca))
    with (
        socket.create_connection(("127.0.0.1", c.port), timeout=10) as tcp,
        context.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        head = tls.recv(4096)
    return int(head.split(b" ", 2)[1])


def test_the_control_and_runtime_apis_are_not_on_the_public_port(centre: Centre) -> None:
    """Flower's own Control client, with only ca.crt, gets 404 for every call; the same
    calls work on the loopback control port; the Runtime API is 404 too."""
    c = centre
    client = _outsider_control(c)
    try:
        for call, request in (
            (client.ListRuns, ListRunsRequest()),
            (client.StopRun, StopRunRequest(run_id=1)),
            (client.StartRun, StartRunRequest()),
        ):
            with pytest.raises(httpx.HTTPStatusError) as e:
                call(request)  # type: ignore[operator]
            assert e.value.response.status_code == 404, call
    finally:
        client.close()
    runtime = RuntimeHttpClient.from_server_address(
        server_address=f"127.0.0.1:{c.port}",
        insecure=False,
        root_certificates=str(c.ca),
        interceptors=[],
    )
    try:
        with pytest.raises(httpx.HTTPStatusError) as e:
            runtime.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
        assert e.value.response.status_code == 404
    finally:
        runtime.close()
    for target in (
        "/v1/control/list-runs",
        "/v1/control/stop-run",
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "//v1/control/list-runs",
    ):
        assert _raw_status(c, target) == 404, target
    # The Fleet API is there, and the SuperLink authenticates the node behind the gateway.
    assert _raw_status(c, "/v1/fleet/pull-messages") == 401

    # The flwr CLI: through the public port it fails, on the control port it works.
    outsider = c.flwr_json("ls", OUTSIDER)
    assert not outsider["success"] and "404" in outsider["error-message"], outsider
    stop = c.flwr("stop", "1", OUTSIDER)
    assert "404" in stop.stdout + stop.stderr, stop
    assert c.flwr_json("ls", OPERATOR)["success"]


def test_the_runtime_api_hands_no_task_without_the_secret(centre: Centre) -> None:
    """On the loopback port itself, AcquireTask without the SuperExec secret (or with
    another one) is refused before any task is looked at."""
    c = centre
    secret = c.root / "state" / "superlink.superexec-secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    for interceptors in (
        [],
        [
            SuperExecAuthHttpInterceptor(
                master_secret=b"guessed", protected_methods={"/flwr.proto.Runtime/AcquireTask"}
            )
        ],
    ):
        client = RuntimeHttpClient.from_server_address(
            server_address=f"127.0.0.1:{c.control_port}",
            insecure=False,
            root_certificates=str(c.ca),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        )
        try:
            with pytest.raises(httpx.HTTPStatusError) as e:
                client.AcquireTask(AcquireTaskRequest(supported_task_types=list(TaskType)))
            assert e.value.response.status_code == 401
        finally:
            client.close()


def test_a_run_whose_app_ships_code_is_refused_by_the_executor(centre: Centre) -> None:
    """Even a run submitted on the control port runs no code from its FAB: a FAB that
    ships a module (named as the ServerApp) is refused, the module never imported."""
    c = centre
    app = c.root / "evil-app"
    write_app_dir(app, config_defaults={}, **{**APP_COMPONENTS, "serverapp": "evilmod:app"})
    marker = c.root / "PWNED"
    (app / "evilmod.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from flwr.serverapp import ServerApp\napp = ServerApp()\n"
    )
    reply = c.flwr_json("run", str(app), OPERATOR)
    assert reply["success"], reply
    info = c.wait_finished(str(reply["run-id"]))
    assert info["status"] == "finished:failed", info
    assert "fedcare refused run" in info["status-details"], info
    assert "ships 'evilmod.py'" in info["status-details"], info
    assert not marker.exists()
    refusals = [x for x in c.server.text().splitlines() if "fedcare refused run" in x]
    assert len(refusals) == 1, refusals  # one line in the centre's log


def test_fedcare_s_thin_app_runs_the_installed_server_app(centre: Centre) -> None:
    """The thin app is accepted and the *installed* ServerApp runs with the run config
    fused from the FAB's defaults and the run's overrides (here it stops at once: the
    data-root it is given holds no site)."""
    c = centre
    app = write_app_dir(c.root / "thin-app", config_defaults=RUN_CONFIG_DEFAULTS, **APP_COMPONENTS)
    nowhere = c.root / "no-such-data"
    reply = c.flwr_json("run", str(app), OPERATOR, "--run-config", f'data-root="{nowhere}"')
    assert reply["success"] and reply["fab-version"] == fedcare_version(), reply
    info = c.wait_finished(str(reply["run-id"]), timeout=180)
    assert info["status"] == "finished:failed", info
    assert f"{nowhere}/site-0: no such file" in info["status-details"], info
    logs = c.flwr("log", str(reply["run-id"]), OPERATOR, "--show")
    assert "no such file" in logs.stdout, logs.stdout[-2000:]  # `flwr log` shows its output


def test_stopping_the_centre_stops_all_three(centre: Centre) -> None:
    """Runs last in this module: the three processes run, Flower's own executor does not;
    SIGTERM stops the SuperLink, the gateway, the executor."""
    c = centre
    families = [p for p in processes_under(c.root) if "server." in p or "superlink" in p]
    assert any("fedcare.server.gateway" in p for p in families), families
    assert any("fedcare.server.executor" in p for p in families), families
    assert any("flower-superlink" in p for p in families), families
    # Flower launches nothing itself (in `subprocess` isolation a flower-superexec would run).
    assert not [p for p in processes_under(c.root) if "flower-superexec" in p], families
    c.server.proc.send_signal(signal.SIGTERM)
    assert c.server.proc.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 15
    while processes_under(c.root) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not processes_under(c.root)
    assert not _healthy(c.ca, c.port)
