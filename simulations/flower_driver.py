"""Run a Flower app with ``flwr run`` on a local simulation SuperLink that fedcare owns.

Flower 1.42's supported way to simulate is a SuperLink started with ``--simulation`` and a run
submitted with ``flwr run``. Its default ``local`` connection starts a detached SuperLink that
nothing stops, so fedcare starts its own instead: on a free loopback port, with a private
``FLWR_HOME``, telemetry and run-time dependency installation off, and on exit stops it *and*
every process it spawned (the SuperExec's process group holds ``flwr-simulation`` and the Ray
cluster, which outlive the SuperLink when a run is still going).

The SuperLink runs ``--insecure`` (plain text) because it listens on 127.0.0.1 only, for a
simulation on this machine; deployments use TLS (see ``deploy/``).

``flwr run`` returns 0 even for a failed run, so success is read from its JSON and the run's
final status from ``flwr ls``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from common.errors import ConfigError, FedcareError

__all__ = [
    "FlowerRunError",
    "RunStatus",
    "SuperLinkHandle",
    "local_superlink",
    "write_app_dir",
    "flower_env",
]

CONNECTION = "fedcare-sim"


class FlowerRunError(FedcareError):
    """A Flower run failed, was stopped, or did not finish in time."""


@dataclass(frozen=True)
class RunStatus:
    run_id: int
    status: str
    details: str
    elapsed: float


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no run-time installs."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; psutil is not a dependency)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class SuperLinkHandle:
    """A running local SuperLink: submit runs, wait for them."""

    def __init__(self, *, env: dict[str, str], work_dir: Path, port: int) -> None:
        self.env = env
        self.work_dir = work_dir
        self.port = port

    def _flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_bin("flwr"), *args],
            cwd=self.work_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def submit(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, bool | int | float | str],
        num_supernodes: int,
        cpus_per_client: float = 1.0,
        gpus_per_client: float = 0.0,
    ) -> int:
        """Submit a run; returns its id. A rejected run raises with Flower's message."""
        overrides = self.work_dir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        federation = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client:g}"
        )
        if gpus_per_client > 0:
            federation += f" client-resources-num-gpus={gpus_per_client:g}"
        result = self._flwr(
            "run",
            str(app_dir),
            CONNECTION,
            "--format",
            "json",
            "--federation-config",
            federation,
            "--run-config",
            str(overrides),
        )
        try:
            reply = json.loads(result.stdout)
        except json.JSONDecodeError as e:
            raise FlowerRunError(
                f"flwr run gave no JSON (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            ) from e
        if not reply.get("success"):
            message = reply.get("error-message", "no reason given")
            if "Invalid run configuration" in message:
                raise ConfigError(
                    f"Flower rejected the run config ({message}); every key must be one of "
                    "[tool.flwr.app.config] (see common/federation.py)"
                )
            raise FlowerRunError(f"flwr run failed: {message}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> dict[str, object]:
        result = self._flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            return dict(json.loads(result.stdout)["runs"][0])
        except (json.JSONDecodeError, KeyError, IndexError) as e:
            raise FlowerRunError(f"flwr ls gave no status for run {run_id}: {result.stderr}") from e

    def logs(self, run_id: int) -> str:
        return self._flwr("log", str(run_id), CONNECTION, "--show").stdout

    def wait(
        self,
        run_id: int,
        *,
        timeout_s: float,
        poll_s: float = 1.0,
        on_poll: Callable[[], None] | None = None,
    ) -> RunStatus:
        """Poll until the run finishes; a failed, stopped or timed-out run raises."""
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.status(run_id)
            status = str(row.get("status", ""))
            if on_poll is not None:
                on_poll()
            if status.startswith("finished"):
                break
            if time.monotonic() > deadline:
                self._flwr("stop", str(run_id), CONNECTION)
                raise FlowerRunError(f"run {run_id} did not finish within {timeout_s:g} s; stopped")
            time.sleep(poll_s)
        details = str(row.get("status-details", ""))
        if status != "finished:completed":
            tail = "\n".join(self.logs(run_id).splitlines()[-40:])
            raise FlowerRunError(f"run {run_id} {status}: {details}\n{tail}")
        return RunStatus(run_id, status, details, float(row.get("elapsed", 0) or 0))


@contextlib.contextmanager
def local_superlink(*, work_dir: Path, startup_timeout: float = 60.0) -> Iterator[SuperLinkHandle]:
    """A simulation SuperLink on a free 127.0.0.1 port, stopped with all it spawned on exit."""
    work_dir.mkdir(parents=True, exist_ok=True)
    home = work_dir / "home"
    home.mkdir(exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {
                "superlink": {
                    "default": CONNECTION,
                    CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
                }
            }
        ),
        encoding="utf-8",
    )
    env = flower_env(home)
    log = open(work_dir / "superlink.log", "w", encoding="utf-8")  # noqa: SIM115
    link = subprocess.Popen(
        [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if link.poll() is not None:
                raise FlowerRunError(
                    f"flower-superlink exited with {link.returncode}; see {work_dir}/superlink.log"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise FlowerRunError(f"flower-superlink not ready after {startup_timeout:g} s")
            time.sleep(0.2)
        yield SuperLinkHandle(env=env, work_dir=work_dir, port=port)
    finally:
        spawned = _children(link.pid)
        link.terminate()
        try:
            link.wait(10)
        except subprocess.TimeoutExpired:
            _killpg(link.pid, signal.SIGKILL)
            link.wait()
        for group in spawned:
            _killpg(group, signal.SIGTERM)
        if spawned:
            time.sleep(2)
        for group in spawned:
            _killpg(group, signal.SIGKILL)
        log.close()


def write_app_dir(
    dest: Path,
    *,
    config_defaults: Mapping[str, bool | int | float | str],
    serverapp: str,
    clientapp: str,
    publisher: str = "fedcare",
    name: str = "fedcare-run",
) -> Path:
    """A code-free Flower app (only ``pyproject.toml``): the installed packages are the app."""
    dest.mkdir(parents=True, exist_ok=True)
    doc = {
        "project": {"name": name, "version": "1.0.0"},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": publisher,
                    "components": {"serverapp": serverapp, "clientapp": clientapp},
                    "config": dict(config_defaults),
                }
            }
        },
    }
    (dest / "pyproject.toml").write_text(tomli_w.dumps(doc), encoding="utf-8")
    return dest
