"""Run a Flower app with ``flwr run`` on a local simulation SuperLink that fedcare owns.

Flower 1.42 simulates with a SuperLink started with ``--simulation``; ``flwr run`` submits a
run to it. Flower's default ``local`` connection starts a detached SuperLink that no command
stops, so fedcare starts its own (:func:`local_superlink`): on a free port on 127.0.0.1, with
a private ``FLWR_HOME``, telemetry and run-time dependency installation off. On exit it stops
the SuperLink *and* everything it spawned. The SuperLink's SuperExec has its own session,
and ``flwr-simulation`` (with its own Ray cluster, ``gcs_server``, ``raylet`` and actors,
where a run starts one) lives in it. They outlive the SuperLink when a run is still going, so
they are stopped by session.

Every run's ``flwr-simulation`` joins one local Ray cluster that :func:`local_superlink`
starts beside the SuperLink (:mod:`fedcare.simulations.ray_cluster`), instead of starting and
stopping a Ray cluster of its own: Ray starts once per SuperLink, and so once per sweep.
:func:`local_superlink` returns as soon as both processes are started; the first request
(:meth:`SuperLinkHandle.ready`) waits until both are up, so the caller's own work (checking
the sites) overlaps their start. Each run's ``flwr-simulation`` also checks the cluster when
it joins it (:func:`fedcare.simulations.ray_cluster.wait_until_ready`).

:meth:`SuperLinkHandle.submit` sends what ``flwr run`` sends (the FAB built by Flower's own
builder, the run-config overrides, the simulation config) to the SuperLink's Control API from
this process, without a ``flwr`` CLI process (about a second each). A run's outcome is only
known from the Control API too (what ``flwr ls`` shows): :meth:`SuperLinkHandle.wait` asks
it in this process, with Flower's own client (:class:`flwr.supercore.control.ControlHttpClient`,
one HTTP request of a few milliseconds), not with a ``flwr`` CLI process per poll (about a
CPU second each, taken from the simulation). An app that writes its own final output can end
the wait as soon as that output is there (``wait(done=...)``), without the seconds Flower
takes to shut the simulation and Ray down.

An app can be *thin* (:func:`write_app_dir`): a folder that holds only ``pyproject.toml``.
Its components name installed modules (``fedcare.server.app:app``), so the FAB ships no code and the
simulation imports the installed packages. Components that are not installed (a test's
helper app) need their import root on ``pythonpath`` of :func:`local_superlink`.

Examples
--------
>>> from pathlib import Path
>>> import tempfile
>>> app = write_app_dir(
...     Path(tempfile.mkdtemp()) / "app",
...     config_defaults={"num-server-rounds": 3},
...     serverapp="fedcare.server.app:app",
...     clientapp="fedcare.client.app:app",
... )
>>> sorted(p.name for p in app.iterdir())
['pyproject.toml']
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import tomli_w
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate
from flwr.cli.run_utils import format_runs
from flwr.common.config import parse_config_args
from flwr.common.constant import FAB_CONFIG_FILE
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import ListRunsRequest, StartRunRequest, StopRunRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.utils import simulation_config_from_json

from fedcare.common.errors import ConfigError, FedcareError
from fedcare.common.flower_app import ConfigValue, check_values, write_app_dir
from fedcare.common.leash import leash_command
from fedcare.common.processes import flower_env, free_port, live_processes, stop_family, venv_bin
from fedcare.common.stopping import Stopped
from fedcare.common.tomlcompat import tomllib
from fedcare.simulations.ray_cluster import RayCluster, RayClusterError, local_ray_cluster

__all__ = [
    "FlowerRunError",
    "RunHandle",
    "RunSource",
    "RunStatus",
    "SharedSuperLink",
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
#: Seconds a single Control API request may take.
_CONTROL_TIMEOUT_S = 30.0


class FlowerRunError(FedcareError, RuntimeError):
    """A Flower run or the local SuperLink failed, was stopped, or did not finish in time."""


@dataclass(frozen=True)
class RunStatus:
    """The state of a run that :meth:`SuperLinkHandle.wait` saw end, as ``flwr ls`` reports it.

    Attributes
    ----------
    run_id : int
        The run's id on the SuperLink.
    status : str
        ``"finished:completed"``; or, where the wait's ``done`` reported the app's final
        output first, the status Flower had then (``"running"`` while it still shuts the
        simulation down). A failed or stopped run raises instead.
    details : str
        Flower's ``status-details`` (``"N/A"`` for a completed run in 1.42).
    elapsed : float
        Seconds the run took on the SuperLink, from start to finish.
    """

    run_id: int
    status: str
    details: str
    elapsed: float


class RunHandle(Protocol):
    """What :func:`fedcare.simulations.runner.run_experiment` asks of a SuperLink: submit a
    run of the thin app, wait for it, end it. :class:`SuperLinkHandle` is one; an
    in-process runner (``fedcare.inprocess``) is another."""

    def submit(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue],
        num_supernodes: int,
        cpus_per_client: float = 1,
        gpus_per_client: float = 0,
    ) -> int: ...

    def wait(
        self,
        run_id: int,
        *,
        timeout_s: float,
        poll_s: float = 0.25,
        on_poll: Callable[[], None] | None = None,
        done: Callable[[], bool] | None = None,
    ) -> RunStatus: ...

    def end_run(self, run_id: int, *, timeout_s: float = 30.0) -> None: ...


class RunSource(Protocol):
    """Where a run goes when it does not start its own SuperLink (:class:`SharedSuperLink`,
    or an in-process runner)."""

    def handle(self) -> RunHandle: ...


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
    wait_ready : callable, optional
        Returns once the SuperLink is up and the Ray cluster its runs join takes drivers,
        or raises; :meth:`ready` calls it once, before the first request.
    ray_address : str, optional
        ``127.0.0.1:PORT`` of the Ray cluster every run joins (None: each run starts its
        own, as Flower does).
    ray_pid : int, optional
        The process holding that cluster (the root of its processes).
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        work_dir: Path,
        port: int,
        pid: int,
        wait_ready: Callable[[], None] | None = None,
        ray_address: str | None = None,
        ray_pid: int | None = None,
    ) -> None:
        self._env = dict(env)
        self.work_dir = work_dir
        self.port = port
        self.pid = pid
        self.ray_address = ray_address
        self.ray_pid = ray_pid
        self._wait_ready = wait_ready
        self._submitted = 0
        self._control: ControlHttpClient | None = None
        self._open_runs: set[int] = set()  # submitted, not yet seen finished or ended

    def ready(self) -> None:
        """Return once the SuperLink answers and the Ray cluster takes drivers.

        Called by every request; only the first one waits.

        Raises
        ------
        FlowerRunError
            The SuperLink or the Ray cluster exited, or was not up in time.
        """
        if self._wait_ready is not None:
            self._wait_ready()
            self._wait_ready = None

    def close(self) -> None:
        """Close the connection to the Control API (:func:`local_superlink` does on exit)."""
        if self._control is not None:
            self._control.close()
            self._control = None

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
            The SuperLink refused the run for another reason (Flower's message is quoted),
            or could not be reached.
        """
        app_dir = Path(app_dir).resolve()
        _check_outside(self.flwr_home, app_dir)
        _check_run_config(app_dir, run_config)
        federation = _federation_config(num_supernodes, cpus_per_client, gpus_per_client)
        self._submitted += 1
        overrides = self.work_dir / f"run-config-{self._submitted}.toml"
        overrides.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        self.ready()
        try:
            run_id = self._start_run(app_dir, overrides, federation)
        except httpx.HTTPStatusError as e:
            message = e.response.text.strip()[:500] or f"HTTP {e.response.status_code}"
            if "Invalid run configuration" in message:
                raise ConfigError(
                    f"Flower rejected the run config of {app_dir} ({message}): "
                    "every --run-config key must be one of its [tool.flwr.app.config] keys; "
                    f"the overrides are in {overrides}"
                ) from e
            raise FlowerRunError(f"Flower refused to start a run of {app_dir}: {message}") from e
        except httpx.HTTPError as e:
            raise FlowerRunError(
                f"cannot submit a run of {app_dir} to the SuperLink on 127.0.0.1:{self.port}: "
                f"{e}; see {self.work_dir / 'superlink.log'}"
            ) from e
        self._open_runs.add(run_id)
        return run_id

    def _start_run(self, app_dir: Path, overrides: Path, federation: str) -> int:
        """What ``flwr run APP fedcare-sim --run-config OVERRIDES --federation-config
        FEDERATION`` sends (``flwr.cli.run.run``), sent from this process.

        The same FAB (built from ``app_dir`` by Flower's builder), run-config overrides and
        simulation config reach the SuperLink's Control API's ``StartRun``, without a
        ``flwr`` process (about a second of start-up and CPU per run).
        """
        try:
            config, _ = load_and_validate(app_dir / FAB_CONFIG_FILE)
        except ValueError as e:
            raise ConfigError(f"{app_dir} is not a Flower app Flower accepts: {e}") from e
        del config  # validated; the SuperLink reads the FAB's own pyproject.toml
        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        simulation = {k.replace("-", "_"): v for k, v in parse_config_args([federation]).items()}
        request = StartRunRequest(
            fab=fab_to_proto(fab),
            override_config=user_config_to_proto(parse_config_args([str(overrides)])),
            federation="",
            override_federation_config=simulation_config_from_json(simulation),
            app_spec="",
        )
        reply = self._control_api().StartRun(request)
        if not reply.HasField("run_id"):
            raise FlowerRunError(f"the SuperLink started no run of {app_dir} (no run id)")
        return int(reply.run_id)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """The run's row as ``flwr ls --run-id RUN_ID --format json`` shows it.

        Asked of the Control API in this process (a few milliseconds, no ``flwr`` process).
        Keys: ``run-id``, ``fab-id``, ``status`` (``pending``, ``starting``, ``running``,
        ``finished:completed|failed|stopped``), ``status-details``, ``elapsed`` (seconds)
        and ``pending-at``, ``starting-at``, ``running-at``, ``finished-at``.

        Raises
        ------
        FlowerRunError
            The SuperLink has no such run, or cannot be reached.
        """
        try:
            reply = self._control_api().ListRuns(ListRunsRequest(run_id=run_id))
        except httpx.HTTPStatusError as e:
            raise FlowerRunError(
                f"the SuperLink on 127.0.0.1:{self.port} has no run {run_id} "
                f"(HTTP {e.response.status_code}: {e.response.text.strip()[:200]})"
            ) from e
        except httpx.HTTPError as e:
            raise FlowerRunError(
                f"cannot ask the SuperLink on 127.0.0.1:{self.port} about run {run_id}: {e}; "
                f"see {self.work_dir / 'superlink.log'}"
            ) from e
        rows = format_runs([run_from_proto(p) for p in reply.run_dict.values()], reply.now)
        if not rows:
            raise FlowerRunError(f"the SuperLink on 127.0.0.1:{self.port} has no run {run_id}")
        row = rows[0]
        return {
            "run-id": row.run_id,
            "fab-id": row.fab_id,
            "status": row.status_text,
            "status-details": row.details,
            "elapsed": row.elapsed,
            "pending-at": row.pending_at,
            "starting-at": row.starting_at,
            "running-at": row.running_at,
            "finished-at": row.finished_at,
        }

    def logs(self, run_id: int) -> str:
        """The run's whole log so far (``flwr log RUN_ID --show``)."""
        result = self._flwr("log", str(run_id), CONNECTION, "--show")
        return result.stdout + result.stderr

    def stop(self, run_id: int) -> bool:
        """Ask the SuperLink to stop the run (what ``flwr stop`` asks); does not wait for it.

        Returns
        -------
        bool
            Whether the SuperLink marked the run stopped (False: it had already finished).
        """
        try:
            return bool(self._control_api().StopRun(StopRunRequest(run_id=run_id)).success)
        except httpx.HTTPStatusError:  # Flower answers an error for a finished run
            return False
        except httpx.HTTPError as e:
            raise FlowerRunError(
                f"cannot ask the SuperLink on 127.0.0.1:{self.port} to stop run {run_id}: {e}"
            ) from e

    def end_run(self, run_id: int, *, timeout_s: float = 30.0) -> None:
        """End a run whose app has written its final output, without Flower's shutdown.

        After ``wait(done=...)`` returned early, Flower still spends seconds shutting the
        run's simulation down (its Ray actors, then the Ray cluster), and only then takes
        the next run. This kills the run's ``flwr-simulation`` process and everything it
        spawned (its own Ray cluster, if it started one) and the run's ClientApp actors
        (in the shared Ray cluster, they are the cluster's, not the simulation's) with
        SIGKILL at once, then asks the SuperLink to mark the run stopped, so Flower's state
        also says it is over. The SuperLink, its SuperExec and the shared Ray cluster stay
        up for the next run.

        Safe only once the app's output is complete: each simulated site wrote its ledger
        charge before it replied, and the ServerApp wrote its output after the last reply,
        so nothing of the run is lost (Flower's own shutdown also kills the actors).

        Parameters
        ----------
        run_id : int
            A run of this handle whose wait has returned.
        timeout_s : float, default 30
            Seconds for the killed processes to be gone.

        Raises
        ------
        FlowerRunError
            Another run submitted through this handle may still be going (its simulation
            could not be told apart), or the processes did not go within ``timeout_s``.
        """
        others = sorted(self._open_runs - {run_id})
        if others:
            raise FlowerRunError(
                f"cannot end run {run_id} early while run(s) {others} may still be going on "
                f"127.0.0.1:{self.port}: wait for them first"
            )
        try:
            _kill_simulations(self.pid, timeout_s=timeout_s)
            if self.ray_pid is not None:  # the only run: every ClientApp actor is its
                _kill_below(self.ray_pid, _is_client_actor, timeout_s=timeout_s)
        finally:  # killed or not, this run no longer blocks ending the next one
            self._open_runs.discard(run_id)
        with contextlib.suppress(FlowerRunError):  # the SuperLink's view only
            self.stop(run_id)

    def wait(
        self,
        run_id: int,
        *,
        timeout_s: float,
        poll_s: float = 0.25,
        on_poll: Callable[[], None] | None = None,
        done: Callable[[], bool] | None = None,
    ) -> RunStatus:
        """Wait until the run finishes, or until ``done`` says its app's work is complete.

        Each poll asks the Control API in this process (:meth:`run_info`), so a short
        ``poll_s`` costs next to nothing.

        Parameters
        ----------
        run_id : int
            From :meth:`submit`.
        timeout_s : float
            Seconds to wait; then the run is stopped and :class:`FlowerRunError` raised.
        poll_s : float, default 0.25
            Seconds between polls.
        on_poll : callable, optional
            Called once per poll (e.g. to advance a progress bar from files the run writes).
        done : callable, optional
            Called once per poll, before the run's status is asked for; True means the app
            has written its final output (e.g. its ServerApp's last file is there). The wait
            then returns at once, unless Flower already reports the run failed or stopped,
            without waiting the seconds Flower takes to mark it finished (the simulation and
            its Ray cluster shut down first). The caller then stops what is left of the run
            (:func:`local_superlink` stops the whole family on exit).

        Returns
        -------
        RunStatus
            For a run that finished with ``finished:completed``, or whose ``done`` was true
            while Flower reported neither failure nor stop.

        Raises
        ------
        FlowerRunError
            The run failed (with Flower's status details in one line, and the run's whole
            log written to ``work_dir/run-<id>.log``), was stopped, or did not finish
            within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            app_done = done is not None and done()
            row = self.run_info(run_id)
            status = str(row.get("status", ""))
            if on_poll is not None:
                on_poll()
            if status.startswith("finished"):
                self._open_runs.discard(run_id)
                break
            if app_done:
                break
            if time.monotonic() > deadline:
                self.stop(run_id)
                raise FlowerRunError(
                    f"run {run_id} did not finish within {timeout_s:g} s (last status "
                    f"{status!r}) and was stopped; raise the timeout or shrink the run"
                )
            time.sleep(poll_s)
        details = str(row.get("status-details") or "")
        if status.startswith("finished") and status != "finished:completed":
            # One line for the user (a fedcare error in the ServerApp is its own message);
            # the ServerApp's whole log goes to a file the line names.
            log = self.work_dir / f"run-{run_id}.log"
            log.write_text(self.logs(run_id), encoding="utf-8")
            cause = details.removeprefix("ServerApp failed with exception: ").strip()
            raise FlowerRunError(
                f"run {run_id} ended {status}: {cause or 'no details'} (the ServerApp's log: {log})"
            )
        return RunStatus(run_id, status, details, float(row.get("elapsed") or 0.0))

    def _control_api(self) -> ControlHttpClient:
        self.ready()
        if self._control is None:
            self._control = _LoopbackControl(self.port, timeout=_CONTROL_TIMEOUT_S)
        return self._control

    def _flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.ready()
        return subprocess.run(
            [venv_bin("flwr"), *args],
            cwd=self.work_dir,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=_FLWR_TIMEOUT_S,
            check=False,
        )


class _LoopbackControl(ControlHttpClient):
    """Flower's Control API client for a SuperLink on 127.0.0.1, never through a proxy.

    Flower's client builds an ``httpx.Client`` that honours ``HTTP_PROXY`` and the like
    from this process's environment (the ``flwr`` CLI gets ``NO_PROXY`` from
    :func:`fedcare.common.processes.flower_env`); the loopback SuperLink is always reached directly.
    """

    def __init__(self, port: int, *, timeout: float) -> None:
        super().__init__(f"http://127.0.0.1:{port}", timeout=timeout)
        self._client.close()
        self._client = httpx.Client(timeout=timeout, trust_env=False)


@contextlib.contextmanager
def local_superlink(
    *,
    work_dir: Path,
    startup_timeout: float = 60,
    pythonpath: Sequence[Path] = (),
    shared_ray: bool = True,
) -> Iterator[SuperLinkHandle]:
    """Start a simulation SuperLink on a free 127.0.0.1 port; stop it and its family on exit.

    Returns as soon as the processes are started; the handle's first request waits until
    the SuperLink and the Ray cluster are up (:meth:`SuperLinkHandle.ready`).

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
    shared_ray : bool, default True
        Start one local Ray cluster beside the SuperLink (:mod:`fedcare.simulations.ray_cluster`)
        and let every run's simulation join it (``RAY_ADDRESS``, and ``RAY_RUNTIME_ENV_HOOK``
        by which its ``ray.init()`` first waits for the cluster to be up, at most
        ``max(startup_timeout, 120)`` s); stopped on exit with the rest. False: each run
        starts and stops its own Ray cluster, as Flower does.

    Yields
    ------
    SuperLinkHandle
        To submit runs and wait for them.

    Raises
    ------
    FlowerRunError
        From the first request: the SuperLink exited or was not healthy within
        ``startup_timeout``, or the Ray cluster exited or was not up in time.

    Notes
    -----
    The environment of the SuperLink is this process's, with ``FLWR_HOME`` private,
    ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``,
    ``RAY_ADDRESS`` the shared cluster's (or ``local``: a new cluster per run; an inherited
    address, or none at all, would make Ray join a cluster fedcare did not start, one that
    a ``ray start`` on this machine recorded in ``/tmp/ray/ray_current_cluster``) and
    127.0.0.1 in ``NO_PROXY``.
    The SuperLink binds 127.0.0.1, and so do Ray's services (GCS, raylet: the environment
    of :func:`fedcare.common.processes.flower_env`; ``tests/simulations/test_ray_cluster.py``
    checks the shared cluster's address).
    The SuperLink leads a new session, so Ctrl-C in a terminal reaches only this process.
    On exit (normal, exception, ``KeyboardInterrupt`` or :class:`fedcare.common.stopping.Stopped`)
    the SuperLink gets SIGTERM; then every process in its session or in the session of
    anything it spawned gets SIGTERM and, after a grace period, SIGKILL. The SuperLink runs on
    a leash (:mod:`fedcare.common.leash`): if *this* process is SIGKILLed, the leash stops the
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
    with contextlib.ExitStack() as stack:
        # Entered first, left last: the runs' simulations (the SuperLink's family) go before
        # the cluster they joined.
        ray: RayCluster | None = None
        if shared_ray:
            ray = stack.enter_context(local_ray_cluster(work_dir=work_dir, env=env))
            # Each run's simulation joins it, and waits for it there (ray_cluster).
            env.update(ray.driver_env(timeout_s=max(startup_timeout, 120.0)))
        else:  # a new cluster per run; without it, Ray joins one `ray start` recorded
            env["RAY_ADDRESS"] = "local"  # in /tmp/ray/ray_current_cluster, anyone's
        log = stack.enter_context(open(work_dir / "superlink.log", "ab"))
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

        def wait_ready() -> None:
            # The SuperLink, then the Ray cluster, before the first run is submitted. (A
            # run's simulation can also wait for the cluster itself when it joins it, the
            # RAY_RUNTIME_ENV_HOOK above, which would let Ray start while the simulation
            # does; with that alone a run once saw a second raylet under CI load, not yet
            # understood, so the first request still waits for the cluster.)
            _wait_healthy(link, port, startup_timeout, work_dir / "superlink.log")
            if ray is not None:
                try:
                    ray.ready(timeout_s=max(startup_timeout, 120.0))
                except RayClusterError as e:
                    raise FlowerRunError(str(e)) from e

        handle = SuperLinkHandle(
            env=env,
            work_dir=work_dir,
            port=port,
            pid=link.pid,
            wait_ready=wait_ready,
            ray_address=None if ray is None else ray.address,
            ray_pid=None if ray is None else ray.pid,
        )
        try:
            yield handle
        finally:
            handle.close()
            sessions = {link.pid}
            try:
                stop_family(link, sessions, grace_s=_STOP_GRACE_S)
            except (KeyboardInterrupt, Stopped):  # a second stop during the cleanup: kill now
                stop_family(link, sessions, grace_s=0)
                raise


class SharedSuperLink:
    """One local simulation SuperLink for several runs, started when the first run asks.

    A sweep submits all its values to one SuperLink, whose runs all join one Ray cluster:
    one start-up of both (and one FAB install folder) instead of one per value. Each value
    is still its own Flower run, with its own ``flwr-simulation`` process (Flower 1.42
    starts one per run) and its own Ray job, whose actors start afresh.

    Parameters
    ----------
    work_dir : pathlib.Path
        The SuperLink's work folder (see :func:`local_superlink`).
    pythonpath : sequence of pathlib.Path, default ()
        As for :func:`local_superlink`.
    shared_ray : bool, default True
        As for :func:`local_superlink`: every run joins one Ray cluster started with the
        SuperLink (False: each run starts its own, as Flower does).

    Examples
    --------
    >>> import tempfile
    >>> with SharedSuperLink(work_dir=Path(tempfile.mkdtemp())) as shared:
    ...     shared.starts  # nothing asked for it: nothing started
    0
    """

    def __init__(
        self, *, work_dir: Path, pythonpath: Sequence[Path] = (), shared_ray: bool = True
    ) -> None:
        self.work_dir = Path(work_dir)
        self.pythonpath = tuple(pythonpath)
        self.shared_ray = shared_ray
        self.starts = 0
        self._stack = contextlib.ExitStack()
        self._handle: SuperLinkHandle | None = None

    def handle(self) -> SuperLinkHandle:
        """The SuperLink, started on the first call (inside the ``with`` block only)."""
        if self._handle is None:
            link = local_superlink(
                work_dir=self.work_dir, pythonpath=self.pythonpath, shared_ray=self.shared_ray
            )
            self._handle = self._stack.enter_context(link)
            self.starts += 1
        return self._handle

    def __enter__(self) -> SharedSuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the SuperLink and everything it spawned, and drop its ``FLWR_HOME``."""
        self._handle = None
        try:
            self._stack.close()
        finally:
            if self.starts:
                shutil.rmtree(self.work_dir / "home", ignore_errors=True)


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


# --- ending a run's simulation ---------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, int]]:
    """``pid -> (ppid, start time)`` of every live process (zombies left out)."""
    return {p.pid: (p.ppid, p.start) for p in live_processes()}


def _is_simulation(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(a.decode(errors="replace")).name == "flwr-simulation" for a in argv[:2])


def _is_client_actor(pid: int) -> bool:
    """A Ray worker process that holds (or held) a Flower ClientApp actor: Ray names it
    ``ray::ClientAppActor`` (``...ClientAppActor.run`` while it answers a message)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.startswith(b"ray::ClientAppActor")


def _kill_simulations(root: int, *, timeout_s: float) -> None:
    """SIGKILL every ``flwr-simulation`` below ``root`` and all its descendants; wait."""
    _kill_below(root, _is_simulation, timeout_s=timeout_s)


def _kill_below(root: int, match: Callable[[int], bool], *, timeout_s: float) -> None:
    """SIGKILL every process below ``root`` that ``match`` names, and all its descendants;
    wait until they are gone.

    The descendants are found by parentage while they all live (Ray's processes stay in
    the SuperExec's session, so a session cannot tell them apart from the SuperExec); each
    is named by pid and start time, so a recycled pid is never waited on.
    """
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)

    def below(pid: int) -> list[int]:
        found, todo = [], list(children.get(pid, []))
        while todo:
            p = todo.pop()
            found.append(p)
            todo += children.get(p, [])
        return found

    doomed: set[int] = set()
    for pid in below(root):
        if pid not in doomed and match(pid):
            doomed |= {pid, *below(pid)}
    victims = {(pid, table[pid][1]) for pid in doomed}
    for pid, _ in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while True:
        now = _process_table()
        left = sorted(pid for pid, start in victims if now.get(pid, (0, -1))[1] == start)
        if not left:
            return
        if time.monotonic() > deadline:
            raise FlowerRunError(
                f"the processes {left} of the run were still there {timeout_s:g} s after "
                "SIGKILL; stop them by hand"
            )
        time.sleep(0.05)
