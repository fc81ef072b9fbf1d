"""Run a Flower app with ``flwr run`` on a local simulation SuperLink that fedcare owns.

Flower 1.42 simulates with a SuperLink started with ``--simulation``; ``flwr run`` submits a
run to it. Flower's default ``local`` connection starts a detached SuperLink that no command
stops, so fedcare starts its own (:func:`local_superlink`): on a free port on 127.0.0.1, with
a private ``FLWR_HOME``, telemetry and run-time dependency installation off. On exit it stops
the SuperLink *and* everything it spawned. The SuperLink's SuperExec has its own session,
and ``flwr-simulation`` and the Ray cluster (``gcs_server``, ``raylet``, actors) live in it.
They outlive the SuperLink when a run is still going, so they are stopped by session.

``flwr run --format json`` exits 0 even when it rejects a run, and a run's outcome is only
known from ``flwr ls``. So :meth:`SuperLinkHandle.submit` reads the JSON ``success`` field,
and :meth:`SuperLinkHandle.wait` polls the run's status.

An app can be *thin* (:func:`write_app_dir`): a folder that holds only ``pyproject.toml``.
Its components name installed modules (``server.app:app``), so the FAB ships no code and the
simulation imports the installed packages. Components that are not installed (a test's
helper app) need their import root on ``pythonpath`` of :func:`local_superlink`.

Examples
--------
>>> from pathlib import Path
>>> import tempfile
>>> app = write_app_dir(
...     Path(tempfile.mkdtemp()) / "app",
...     config_defaults={"num-server-rounds": 3},
...     serverapp="server.app:app",
...     clientapp="client.app:app",
... )
>>> sorted(p.name for p in app.iterdir())
['pyproject.toml']
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import ConfigError, FedcareError
from common.flower_app import ConfigValue, check_values, write_app_dir
from common.leash import leash_command
from common.processes import flower_env, free_port, stop_family, venv_bin
from common.stopping import Stopped

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "FlowerRunError",
    "RunStatus",
    "SuperLinkHandle",
    "local_superlink",
    "write_app_dir",
]

#: Name of the SuperLink connection written to the private ``FLWR_HOME/config.toml``.
CONNECTION = "fedcare-sim"


#: Seconds each process of the SuperLink's family gets to exit after SIGTERM.
_STOP_GRACE_S = 5.0
#: Seconds a single ``flwr`` command may take.
_FLWR_TIMEOUT_S = 120.0


class FlowerRunError(FedcareError, RuntimeError):
    """A Flower run or the local SuperLink failed, was stopped, or did not finish in time."""


@dataclass(frozen=True)
class RunStatus:
    """The final state of a finished run, as ``flwr ls`` reports it.

    Attributes
    ----------
    run_id : int
        The run's id on the SuperLink.
    status : str
        ``"finished:completed"`` (a failed or stopped run raises instead).
    details : str
        Flower's ``status-details`` (``"N/A"`` for a completed run in 1.42).
    elapsed : float
        Seconds the run took on the SuperLink, from start to finish.
    """

    run_id: int
    status: str
    details: str
    elapsed: float


class SuperLinkHandle:
    """A running local simulation SuperLink: submit runs and wait for them.

    Made by :func:`local_superlink`; valid only inside its ``with`` block.

    Parameters
    ----------
    env : dict of str to str
        The environment of every Flower process (private ``FLWR_HOME`` and the rest).
    work_dir : pathlib.Path
        Folder for run-config files and logs; ``flwr`` runs with it as working directory.
    port : int
        The SuperLink's port on 127.0.0.1.
    pid : int
        The SuperLink's process id (it leads its own session).
    """

    def __init__(self, *, env: Mapping[str, str], work_dir: Path, port: int, pid: int) -> None:
        self._env = dict(env)
        self.work_dir = work_dir
        self.port = port
        self.pid = pid
        self._submitted = 0

    @property
    def flwr_home(self) -> Path:
        """The private ``FLWR_HOME`` (config.toml, installed FABs)."""
        return Path(self._env["FLWR_HOME"])

    def submit(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue],
        num_supernodes: int,
        cpus_per_client: float = 1,
        gpus_per_client: float = 0,
    ) -> int:
        """Submit a run of the app in ``app_dir``; returns at once with the run's id.

        Parameters
        ----------
        app_dir : pathlib.Path
            A Flower app folder (``pyproject.toml`` with ``[tool.flwr.app]``). Every file
            Flower ships (``*.py``, ``*.toml``, ...) goes into the run's FAB.
        run_config : mapping of str to bool, int, float or str
            Overrides of the app's ``[tool.flwr.app.config]``. Every key must already be
            there (Flower rejects others); nested keys are dotted (``"sites.p0"``).
        num_supernodes : int
            Number of simulated SuperNodes (sites).
        cpus_per_client : float, default 1
            CPUs Ray reserves for each ClientApp. Flower 1.42 takes a whole number
            (its ``client_resources_num_cpus`` is an unsigned integer).
        gpus_per_client : float, default 0
            GPUs Ray reserves for each ClientApp; fractions (``0.25``) share a GPU.

        Returns
        -------
        int
            The run id, for :meth:`wait`.

        Raises
        ------
        ConfigError
            A key of ``run_config`` is not in the app's config, a value or resource is
            invalid, or Flower rejected the run configuration.
        FlowerRunError
            ``flwr run`` failed for another reason (Flower's message is quoted).
        """
        app_dir = Path(app_dir).resolve()
        _check_outside(self.flwr_home, app_dir)
        _check_run_config(app_dir, run_config)
        federation = _federation_config(num_supernodes, cpus_per_client, gpus_per_client)
        self._submitted += 1
        overrides = self.work_dir / f"run-config-{self._submitted}.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        args += ["--federation-config", federation, "--run-config", str(overrides)]
        reply = self._flwr_json(*args)
        if not reply.get("success"):
            message = str(reply.get("error-message") or "no reason given")
            if "Invalid run configuration" in message:
                raise ConfigError(
                    f"Flower rejected the run config of {app_dir} ({message.strip()}): "
                    "every --run-config key must be one of its [tool.flwr.app.config] keys; "
                    f"the overrides are in {overrides}"
                )
            raise FlowerRunError(f"flwr run {app_dir} failed: {message.strip()}")
        return int(reply["run-id"])

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's row of ``flwr ls --run-id RUN_ID --format json``.

        Keys include ``status`` (``pending``, ``starting``, ``running``,
        ``finished:completed|failed|stopped``), ``status-details`` and ``elapsed``.
        """
        reply = self._flwr_json("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        runs = reply.get("runs")
        if not reply.get("success", True) or not runs:
            raise FlowerRunError(
                f"flwr ls has no run {run_id} on 127.0.0.1:{self.port}: "
                f"{reply.get('error-message', reply)}"
            )
        return dict(runs[0])

    def logs(self, run_id: int) -> str:
        """The run's whole log so far (``flwr log RUN_ID --show``)."""
        result = self._flwr("log", str(run_id), CONNECTION, "--show")
        return result.stdout + result.stderr

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop the run (``flwr stop``); does not wait for it."""
        self._flwr("stop", str(run_id), CONNECTION)

    def wait(
        self,
        run_id: int,
        *,
        timeout_s: float,
        poll_s: float = 0.5,
        on_poll: Callable[[], None] | None = None,
    ) -> RunStatus:
        """Poll ``flwr ls`` until the run finishes.

        Parameters
        ----------
        run_id : int
            From :meth:`submit`.
        timeout_s : float
            Seconds to wait; then the run is stopped and :class:`FlowerRunError` raised.
        poll_s : float, default 0.5
            Seconds between polls.
        on_poll : callable, optional
            Called once per poll (e.g. to advance a progress bar from files the run writes).

        Returns
        -------
        RunStatus
            For a run that finished with ``finished:completed``.

        Raises
        ------
        FlowerRunError
            The run failed (with Flower's status details in one line, and the run's whole
            log written to ``work_dir/run-<id>.log``), was stopped, or did not finish
            within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            row = self.run_info(run_id)
            status = str(row.get("status", ""))
            if on_poll is not None:
                on_poll()
            if status.startswith("finished"):
                break
            if time.monotonic() > deadline:
                self.stop(run_id)
                raise FlowerRunError(
                    f"run {run_id} did not finish within {timeout_s:g} s (last status "
                    f"{status!r}) and was stopped; raise the timeout or shrink the run"
                )
            time.sleep(poll_s)
        details = str(row.get("status-details") or "")
        if status != "finished:completed":
            # One line for the user (a fedcare error in the ServerApp is its own message);
            # the ServerApp's whole log goes to a file the line names.
            log = self.work_dir / f"run-{run_id}.log"
            log.write_text(self.logs(run_id), encoding="utf-8")
            cause = details.removeprefix("ServerApp failed with exception: ").strip()
            raise FlowerRunError(
                f"run {run_id} ended {status}: {cause or 'no details'} (the ServerApp's log: {log})"
            )
        return RunStatus(run_id, status, details, float(row.get("elapsed") or 0.0))

    def _flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [venv_bin("flwr"), *args],
            cwd=self.work_dir,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=_FLWR_TIMEOUT_S,
            check=False,
        )

    def _flwr_json(self, *args: str) -> dict[str, Any]:
        result = self._flwr(*args)
        try:
            reply = json.loads(result.stdout)
        except json.JSONDecodeError as e:
            out = (result.stdout + result.stderr).strip()[-2000:]
            raise FlowerRunError(
                f"`flwr {args[0]}` gave no JSON (exit {result.returncode}): {out}"
            ) from e
        if not isinstance(reply, dict):
            raise FlowerRunError(f"`flwr {args[0]}` gave unexpected JSON: {reply!r}")
        return reply


@contextlib.contextmanager
def local_superlink(
    *,
    work_dir: Path,
    startup_timeout: float = 60,
    pythonpath: Sequence[Path] = (),
) -> Iterator[SuperLinkHandle]:
    """Start a simulation SuperLink on a free 127.0.0.1 port; stop it and its family on exit.

    The SuperLink runs ``--insecure`` (plain text, no TLS): it listens on the loopback
    interface only and serves a simulation on this machine. Real deployments use TLS
    (see ``deploy/``).

    Parameters
    ----------
    work_dir : pathlib.Path
        Created if missing. Holds ``home/`` (the private ``FLWR_HOME``: connection config and
        installed FABs), ``superlink.log`` (the log of the SuperLink and its simulations)
        and the run-config files. The SuperLink runs with it as its working directory. Keep
        app folders outside ``work_dir/home``.
    startup_timeout : float, default 60
        Seconds to wait for the SuperLink's ``/health`` endpoint.
    pythonpath : sequence of pathlib.Path, default ()
        Folders put in front of ``PYTHONPATH`` of the SuperLink and so of the simulation and
        Ray workers, for app components that are not installed (a test helper module).
        fedcare's own packages are installed and need none.

    Yields
    ------
    SuperLinkHandle
        To submit runs and wait for them.

    Raises
    ------
    FlowerRunError
        The SuperLink exited or was not healthy within ``startup_timeout``.

    Notes
    -----
    The environment of the SuperLink is this process's, with ``FLWR_HOME`` private,
    ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``, no
    ``RAY_ADDRESS`` (Ray would join that cluster) and 127.0.0.1 in ``NO_PROXY``.
    Only the SuperLink is bound to 127.0.0.1: Ray, inside each simulation, starts its own
    services (GCS, raylet) on the machine's address, as ``ray.init()`` always does.
    The SuperLink leads a new session, so Ctrl-C in a terminal reaches only this process.
    On exit (normal, exception, ``KeyboardInterrupt`` or :class:`common.stopping.Stopped`)
    the SuperLink gets SIGTERM; then every process in its session or in the session of
    anything it spawned gets SIGTERM and, after a grace period, SIGKILL. The SuperLink runs on
    a leash (:mod:`common.leash`): if *this* process is SIGKILLed, the leash stops the
    SuperLink and everything it spawned.
    """
    work_dir = Path(work_dir).resolve()
    home = work_dir / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}),
        encoding="utf-8",
    )
    env = flower_env(home=home, pythonpath=pythonpath)
    with open(work_dir / "superlink.log", "ab") as log:
        superlink = [venv_bin("flower-superlink"), "--insecure", "--simulation"]
        superlink += ["--host", "127.0.0.1", "--port", str(port)]
        # On a leash: if this process is SIGKILLed, the SuperLink and its simulation stop too.
        link = subprocess.Popen(  # noqa: S603 - our interpreter, Flower's SuperLink
            leash_command(superlink, parent=os.getpid(), grace_s=_STOP_GRACE_S),
            cwd=work_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_healthy(link, port, startup_timeout, work_dir / "superlink.log")
            yield SuperLinkHandle(env=env, work_dir=work_dir, port=port, pid=link.pid)
        finally:
            sessions = {link.pid}
            try:
                stop_family(link, sessions, grace_s=_STOP_GRACE_S)
            except (KeyboardInterrupt, Stopped):  # a second stop during the cleanup: kill now
                stop_family(link, sessions, grace_s=0)
                raise


# --- submission checks -----------------------------------------------------------------------


def _federation_config(num_supernodes: int, cpus: float, gpus: float) -> str:
    """The ``--federation-config`` string; Flower's proto has uint32 CPUs and float GPUs."""
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise ConfigError(f"num_supernodes must be an integer, got {num_supernodes!r}")
    if num_supernodes < 1:
        raise ConfigError(f"num_supernodes must be at least 1, got {num_supernodes}")
    if not (math.isfinite(cpus) and cpus >= 1 and float(cpus).is_integer()):
        raise ConfigError(
            f"cpus_per_client={cpus!r}: Flower 1.42 reserves a whole number of CPUs (>= 1) "
            "per simulated client; use 1, 2, ..."
        )
    if not (math.isfinite(gpus) and gpus >= 0):
        raise ConfigError(f"gpus_per_client={gpus!r}: must be a number >= 0 (e.g. 0.25)")
    return (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={int(cpus)} "
        f"client-resources-num-gpus={float(gpus)!r}"
    )


def _check_run_config(app_dir: Path, run_config: Mapping[str, object]) -> None:
    """Reject what Flower would reject, but name the offending keys."""
    check_values(run_config, what="run_config")
    pyproject = app_dir / "pyproject.toml"
    try:
        doc = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{app_dir} is not a Flower app: cannot read {pyproject}: {e}") from e
    known = set(_flatten(doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})))
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(
            f"run config key(s) {', '.join(unknown)} are not in [tool.flwr.app.config] of "
            f"{pyproject}, and Flower rejects overrides of keys the app does not declare; "
            "add them there with a default (for fedcare: common/federation.py) or drop them"
        )


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_outside(home: Path, app_dir: Path) -> None:
    if home.resolve().is_relative_to(app_dir):
        raise ConfigError(
            f"the app folder {app_dir} contains the SuperLink's FLWR_HOME {home}; Flower would "
            "ship its files in every FAB. Put the app folder beside work_dir/home, not above it"
        )


def _wait_healthy(link: subprocess.Popen[bytes], port: int, timeout: float, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if link.poll() is not None:
            raise FlowerRunError(
                f"flower-superlink exited with code {link.returncode} at start; see {log}"
            )
        url = f"http://127.0.0.1:{port}/health"
        with contextlib.suppress(OSError), opener.open(url, timeout=1) as reply:
            if reply.status == 200:
                return
        if time.monotonic() > deadline:
            raise FlowerRunError(
                f"flower-superlink was not healthy on 127.0.0.1:{port} after {timeout:g} s; "
                f"see {log}, or raise startup_timeout on a loaded machine"
            )
        time.sleep(0.2)
