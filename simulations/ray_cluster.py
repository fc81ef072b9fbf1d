"""One local Ray cluster that every simulated run of a SuperLink joins, started once.

Flower 1.42's simulation runtime (``flwr-simulation``, one per run) calls ``ray.init()``;
without ``RAY_ADDRESS`` that starts a fresh Ray cluster (GCS, raylet, agents) per run and
shuts it down at the run's end: seconds of every run, and of every value of a sweep.
With ``RAY_ADDRESS`` naming a running cluster, ``ray.init()`` joins it instead (a fraction
of a second). :func:`local_ray_cluster` starts that cluster beside the SuperLink, so it
starts while the SuperLink does and the runner checks its sites, and every run of the
SuperLink joins it.

The cluster is started exactly as Flower's runtime starts one (``ray.init()`` with the
dashboard off, in the environment of :func:`fedcare.common.processes.flower_env`: every Ray
service on 127.0.0.1 only), by a small process that holds it (``python -m
fedcare.simulations.ray_cluster``) until it is stopped. Its GCS port is chosen here and
passed as ``RAY_GCS_SERVER_PORT``, so the address is known before the cluster is up and the
SuperLink can be started with it at once.

Each run is still its own Ray job: Ray gives each job its own worker processes (a run's
ClientApp actors import fedcare afresh, and nothing one run loaded is seen by the next), and
kills a job's actors when its driver (the run's ``flwr-simulation``) exits or is killed.

A run's ``flwr-simulation`` also checks the cluster when it joins it: Ray calls
:func:`wait_until_ready` (named by ``RAY_RUNTIME_ENV_HOOK`` in the environment
:meth:`RayCluster.driver_env` gives) at the start of that ``ray.init()``, before it connects,
and the hook returns once the holder has written its ready mark. The runner still waits for
the cluster before it submits a run (:mod:`fedcare.simulations.flower_driver`): submitting
earlier, with only this hook waiting, once showed a second raylet under load.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcare.common.errors import FedcareError
from fedcare.common.leash import leash_command
from fedcare.common.processes import free_port, module_command, stop_family
from fedcare.common.stopping import Stopped

__all__ = ["RayCluster", "RayClusterError", "local_ray_cluster", "main", "wait_until_ready"]

#: Written by the holder once ``ray.init()`` has returned: the cluster takes drivers.
READY_NAME = "ray-ready"
#: Ray's variable naming a function it calls at the start of every ``ray.init()``.
RUNTIME_ENV_HOOK_VAR = "RAY_RUNTIME_ENV_HOOK"
#: The variables that tell :func:`wait_until_ready` what to wait for.
READY_FILE_VAR = "FEDCARE_RAY_READY_FILE"
HOLDER_PID_VAR = "FEDCARE_RAY_HOLDER_PID"
READY_TIMEOUT_VAR = "FEDCARE_RAY_READY_TIMEOUT_S"
#: The holder's log (Ray's own logs are in its session folder under /tmp/ray).
LOG_NAME = "ray.log"
#: Seconds each process of the cluster gets between SIGTERM and SIGKILL on stop. Nothing in
#: a Ray cluster is durable: a run's sites wrote their ledgers before replying.
_STOP_GRACE_S = 0.5


class RayClusterError(FedcareError, RuntimeError):
    """The local Ray cluster did not start in time, or its holder exited."""


class RayCluster:
    """A local Ray cluster being started or running; made by :func:`local_ray_cluster`.

    Attributes
    ----------
    address : str
        ``127.0.0.1:PORT`` of its GCS: the ``RAY_ADDRESS`` of every process that joins.
    pid : int
        The process that holds it (it leads the session of the cluster's processes).
    log : pathlib.Path
        The holder's log.
    """

    def __init__(self, proc: subprocess.Popen[bytes], *, address: str, work_dir: Path) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.address = address
        self.log = work_dir / LOG_NAME
        self._ready_file = work_dir / READY_NAME
        self._ready = False

    def driver_env(self, *, timeout_s: float = 120.0) -> dict[str, str]:
        """What a driver's environment needs to join this cluster, waiting for it there.

        ``RAY_ADDRESS``, and the hook (:func:`wait_until_ready`) by which the driver's
        ``ray.init()`` waits up to ``timeout_s`` for the cluster to take drivers."""
        return {
            "RAY_ADDRESS": self.address,
            RUNTIME_ENV_HOOK_VAR: f"{__name__}.wait_until_ready",
            # Under `uv run` Ray would use its own uv hook instead of this one.
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            READY_FILE_VAR: str(self._ready_file),
            HOLDER_PID_VAR: str(self.pid),
            READY_TIMEOUT_VAR: f"{timeout_s:g}",
        }

    def ready(self, *, timeout_s: float = 120.0) -> None:
        """Return once the cluster takes drivers (at once after the first success).

        Raises
        ------
        RayClusterError
            The holder exited, or the cluster was not up within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not self._ready:
            if self._ready_file.is_file():
                self._ready = True
                break
            if self._proc.poll() is not None:
                raise RayClusterError(
                    f"the local Ray cluster exited with code {self._proc.returncode} while "
                    f"starting; see {self.log}"
                )
            if time.monotonic() > deadline:
                raise RayClusterError(
                    f"the local Ray cluster was not up after {timeout_s:g} s; see {self.log}, "
                    "or retry on a less loaded machine"
                )
            time.sleep(0.05)


@contextlib.contextmanager
def local_ray_cluster(*, work_dir: Path, env: Mapping[str, str]) -> Iterator[RayCluster]:
    """Start a local Ray cluster (not waiting for it); stop it and all its processes on exit.

    Parameters
    ----------
    work_dir : pathlib.Path
        Created if missing; holds the holder's log (``ray.log``) and its ready mark.
    env : mapping of str to str
        The cluster's environment (:func:`fedcare.common.processes.flower_env`); a
        ``RAY_ADDRESS`` in it is dropped (the holder starts a cluster, it joins none).

    Yields
    ------
    RayCluster
        Its ``address`` at once; :meth:`RayCluster.ready` waits until it takes drivers.

    Notes
    -----
    The holder leads a new session and runs on a leash (:mod:`fedcare.common.leash`): if this
    process is SIGKILLed, the cluster stops too. On exit the holder gets SIGTERM and shuts
    Ray down; then every process of its session, or of a session it spawned, gets SIGTERM
    and, after 0.5 s, SIGKILL.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    ready = work_dir / READY_NAME
    ready.unlink(missing_ok=True)
    port = free_port()
    holder_env = {  # the holder starts a cluster: it neither joins one nor waits for one
        k: v for k, v in env.items() if k not in ("RAY_ADDRESS", RUNTIME_ENV_HOOK_VAR)
    }
    holder_env["RAY_GCS_SERVER_PORT"] = str(port)
    command = [*module_command("fedcare.simulations.ray_cluster"), "--ready-file", str(ready)]
    with open(work_dir / LOG_NAME, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our interpreter, our module
            leash_command(command, parent=os.getpid(), grace_s=_STOP_GRACE_S),
            cwd=work_dir,
            env=holder_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    sessions = {proc.pid}
    try:
        yield RayCluster(proc, address=f"127.0.0.1:{port}", work_dir=work_dir)
    finally:
        try:
            stop_family(proc, sessions, grace_s=_STOP_GRACE_S)
        except (KeyboardInterrupt, Stopped):  # a second stop during the cleanup: kill now
            stop_family(proc, sessions, grace_s=0)
            raise
        ready.unlink(missing_ok=True)


def wait_until_ready(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """Ray's ``RAY_RUNTIME_ENV_HOOK`` in a run's driver: return once the cluster is up.

    Ray calls it at the start of ``ray.init()``, before it connects to the cluster; it waits
    for the ready mark named by ``FEDCARE_RAY_READY_FILE`` (written once the holder's own
    ``ray.init()`` returned), and returns the runtime environment unchanged.

    Raises
    ------
    RayClusterError
        The holder (``FEDCARE_RAY_HOLDER_PID``) exited first, or the cluster was not up within
        ``FEDCARE_RAY_READY_TIMEOUT_S`` seconds; the driver's ``ray.init()`` fails with it,
        and so does the run, with this message in its status.
    """
    ready = Path(os.environ[READY_FILE_VAR])
    holder = int(os.environ[HOLDER_PID_VAR])
    timeout_s = float(os.environ.get(READY_TIMEOUT_VAR, "120"))
    deadline = time.monotonic() + timeout_s
    while not ready.is_file():
        if not _alive(holder):
            raise RayClusterError(
                "the local Ray cluster exited before it took this run; see "
                f"{ready.parent / LOG_NAME}"
            )
        if time.monotonic() > deadline:
            raise RayClusterError(
                f"the local Ray cluster was not up after {timeout_s:g} s; see "
                f"{ready.parent / LOG_NAME}, or retry on a less loaded machine"
            )
        time.sleep(0.05)
    return runtime_env


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def main(argv: Sequence[str] | None = None) -> int:
    """Hold a local Ray cluster until SIGTERM or SIGINT (``python -m ...ray_cluster``)."""
    parser = argparse.ArgumentParser(prog="python -m fedcare.simulations.ray_cluster")
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    import ray  # only the holder imports Ray

    # As Flower's Ray backend starts a cluster (flwr/server/superlink/fleet/vce/backend/
    # raybackend.py); the GCS port comes from RAY_GCS_SERVER_PORT. The raylet would start a
    # Python worker per CPU for the first driver (this one, which runs nothing): seconds of
    # CPU for workers no run could use (a run's actors get workers of their own job).
    ray.init(
        # "local": always a new cluster. Without an address, Ray would join the cluster a
        # `ray start` on this machine recorded in /tmp/ray/ray_current_cluster, anyone's.
        address="local",
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        _system_config={"prestart_worker_first_driver": False},
    )
    partial = args.ready_file.with_name(args.ready_file.name + ".tmp")
    partial.write_text(str(ray.get_runtime_context().gcs_address), encoding="utf-8")
    partial.replace(args.ready_file)
    while not stop.wait(1.0):
        pass
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
