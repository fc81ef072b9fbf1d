"""Run a simulated federation's Flower apps in this process, with Flower's ``run_simulation``.

:func:`fedcare.simulate` with ``in_process=True`` hands :class:`InProcessFlower` to
:func:`fedcare.simulations.runner.run_experiment` where a sweep hands it a shared SuperLink.
Everything the runner does around the Flower run is therefore the same (the sites, the run
directory and its lock, the resolved ``config.toml``, the baselines, ``summary.json``,
``metrics.csv``, the plots); only the run itself differs: instead of submitting the thin app
to a local SuperLink with ``flwr run``, :meth:`InProcessHandle.wait` calls Flower's own
:func:`flwr.simulation.run_simulation` with fedcare's ServerApp and ClientApp
(``fedcare.server.app:app`` and ``fedcare.client.app:app``). The ServerApp runs in a thread
of this process, so a debugger's breakpoints in it work; the sites' ClientApps run in Ray
actors, as under ``flwr run``, and write the same ledgers, stored releases and audit logs.

``run_simulation`` takes no run config: both apps would see an empty one. Each is therefore
called through a thin app (:func:`centre_app`, :func:`site_app`) that first puts on its
``Context`` the run config ``flwr run`` would give it: the thin app's
``[tool.flwr.app.config]`` defaults fused with the run's values by Flower's own
``get_fused_config_from_dir``, an unknown key refused as Flower refuses it.

Where the two ways differ, it is said here, and refused where it would be silent:

* no deadline: ``run_simulation`` cannot be stopped from outside, so the runner's
  ``timeout_s`` does not apply (the run's own ``round-timeout`` and ``connect-timeout`` bound
  it); :func:`fedcare.simulate` refuses a ``timeout_s`` together with ``in_process``;
* progress events (``on_progress``) all arrive when the run has ended;
* Flower reads ``FLWR_TELEMETRY_ENABLED`` once, when it is imported: a process that imported
  it with telemetry on is refused (fedcare keeps Flower's telemetry off everywhere);
* Flower 1.42 logs that ``run_simulation`` is deprecated in favour of ``flwr run``.

While the run goes, this process's environment is the one fedcare gives every Flower process
(:func:`fedcare.common.processes.flower_env`: Ray on 127.0.0.1 only, one OpenMP thread per
site, ``RAY_ADDRESS=local``: a new cluster, never one a ``ray start`` recorded), so the Ray
cluster and its actors inherit it; it is put back afterwards, with the ``PYTHONPATH`` that
Flower's Ray backend rewrites. A mark in it names the run's Ray processes, and
:meth:`InProcessHandle.wait` returns only once they are gone.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.config import get_fused_config_from_dir
from flwr.serverapp import Grid, ServerApp

from fedcare.common.errors import ConfigError
from fedcare.common.flower_app import ConfigValue
from fedcare.common.processes import flower_env, live_processes
from fedcare.simulations.flower_driver import (
    FlowerRunError,
    RunStatus,
)

__all__ = ["InProcessFlower", "InProcessHandle", "centre_app", "site_app", "check_telemetry_off"]


def check_telemetry_off() -> None:
    """Refuse to run Flower in this process when its telemetry is on.

    Raises
    ------
    ConfigError
        Flower was imported while ``FLWR_TELEMETRY_ENABLED`` was not ``0``.
    """
    from flwr.supercore import telemetry

    if telemetry.FLWR_TELEMETRY_ENABLED != "0":
        raise ConfigError(
            "Flower's telemetry is on in this process (FLWR_TELEMETRY_ENABLED was not 0 when "
            "flwr was imported) and fedcare keeps it off everywhere. Fix: set "
            "os.environ['FLWR_TELEMETRY_ENABLED'] = '0' before importing fedcare (the first "
            "cell of a notebook), or run with in_process=False"
        )


def _with_run_config(context: Context, run_config: Mapping[str, Any]) -> Context:
    """``context`` as the app sees it under ``flwr run``: with the run's config.

    A new ``Context`` sharing the node config and the state: Flower refuses a context whose
    ``run_config`` was changed in place when it takes it back after the message.
    """
    return Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=context.node_config,
        state=context.state,
        run_config=dict(run_config),
        series_id=context.series_id,
    )


def _run_fedcare_server(grid: Grid, context: Context, *, run_config: Mapping[str, Any]) -> None:
    # Imported where it runs: a site's process never needs the server's modules.
    from fedcare.server.app import app as fedcare_server_app

    fedcare_server_app(grid, _with_run_config(context, run_config))


def _run_fedcare_site(
    message: Message, context: Context, *, run_config: Mapping[str, Any]
) -> Message:
    # Imported in the Ray actor that answers the message (the engine pickles this app).
    from fedcare.client.app import app as fedcare_client_app

    return fedcare_client_app(message, _with_run_config(context, run_config))


def centre_app(run_config: Mapping[str, Any]) -> ServerApp:
    """fedcare's ServerApp (``fedcare.server.app:app``), run with ``run_config`` on its
    ``Context``."""
    app = ServerApp()
    app.main()(functools.partial(_run_fedcare_server, run_config=dict(run_config)))
    return app


def site_app(run_config: Mapping[str, Any]) -> ClientApp:
    """fedcare's ClientApp (``fedcare.client.app:app``), run with ``run_config`` on its
    ``Context``; it answers the messages fedcare's ClientApp answers (train, evaluate, and
    secure aggregation's ``query.secagg`` stages)."""
    app = ClientApp()
    handler = functools.partial(_run_fedcare_site, run_config=dict(run_config))
    app.train()(handler)
    app.evaluate()(handler)
    app.query("secagg")(handler)
    return app


@contextlib.contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment is ``env`` inside the block, and as it was after it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


#: The variable whose value marks the processes of one in-process run (Ray's services and
#: actors inherit this process's environment).
_RUN_MARKER = "FEDCARE_IN_PROCESS_RUN"
#: Seconds Ray's actors get to exit on their own once Flower has shut Ray down.
_STOP_GRACE_S = 10.0


def _marked(token: str) -> list[int]:
    """The live processes, other than this one, whose environment carries the run's mark."""
    mark = f"{_RUN_MARKER}={token}".encode()
    found = []
    for process in live_processes():
        if process.pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read: not one of the run's
            continue
        if mark in environ.split(b"\0"):
            found.append(process.pid)
    return found


def _stop_marked(token: str, *, grace_s: float) -> None:
    """Wait for the run's Ray processes to be gone; SIGKILL what is left after ``grace_s``.

    Flower's Ray backend shuts Ray down before ``run_simulation`` returns, but the actors
    exit on their own a moment later, after their raylet: without this wait, a script that
    ends at once would leave them running.
    """
    deadline = time.monotonic() + grace_s
    while (left := _marked(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while _marked(token) and time.monotonic() < deadline:
        time.sleep(0.1)


@dataclass(frozen=True)
class _Submission:
    """A run :meth:`InProcessHandle.submit` accepted, for :meth:`InProcessHandle.wait`."""

    run_config: dict[str, Any]
    num_supernodes: int
    cpus_per_client: float
    gpus_per_client: float


class InProcessHandle:
    """What the runner submits to and waits on, running each run in this process.

    It keeps the three methods :func:`~fedcare.simulations.runner.run_experiment` calls on a
    SuperLink's handle (:meth:`submit`, :meth:`wait`, :meth:`end_run`); there is no
    SuperLink, port or Control API behind it.

    Parameters
    ----------
    work_dir:
        The run's Flower folder (``<out>/.flower``).
    """

    def __init__(self, *, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self._runs: dict[int, _Submission] = {}

    def close(self) -> None:
        """Nothing to close: no connection to a SuperLink."""

    def submit(
        self,
        app_dir: Path,
        *,
        run_config: Mapping[str, ConfigValue],
        num_supernodes: int,
        cpus_per_client: float = 1,
        gpus_per_client: float = 0,
    ) -> int:
        """Accept a run of the thin app in ``app_dir``; it runs in :meth:`wait`.

        Raises
        ------
        ConfigError
            A key of ``run_config`` is not in the app's ``[tool.flwr.app.config]``, or there
            is no site.
        """
        if num_supernodes < 1:
            raise ConfigError(f"num_supernodes must be at least 1, got {num_supernodes}")
        try:
            fused = get_fused_config_from_dir(Path(app_dir), dict(run_config))
        except ValueError as e:  # Flower's fuse_dicts: an override the app does not declare
            raise ConfigError(
                f"run config: {e}; give only keys of the app's [tool.flwr.app.config] "
                "(fedcare.common.federation.FederationConfig)"
            ) from e
        run_id = len(self._runs) + 1
        self._runs[run_id] = _Submission(
            dict(fused), num_supernodes, float(cpus_per_client), float(gpus_per_client)
        )
        return run_id

    def wait(
        self,
        run_id: int,
        *,
        timeout_s: float,
        poll_s: float = 0.25,
        on_poll: Callable[[], None] | None = None,
        done: Callable[[], bool] | None = None,
    ) -> RunStatus:
        """Run the submitted run to its end with :func:`flwr.simulation.run_simulation`.

        ``timeout_s`` and ``poll_s`` do not apply (see the module docstring); ``on_poll`` is
        called once, after the run.

        Raises
        ------
        ConfigError
            Flower's telemetry is on in this process.
        FedcareError
            The ServerApp raised it (e.g. too few sites connected): the same error, here.
        FlowerRunError
            The simulation returned without the app's final output (``done`` false).
        """
        from flwr.simulation import run_simulation

        check_telemetry_off()
        submission = self._runs[run_id]
        started = time.monotonic()
        token = secrets.token_hex(8)  # marks every process the run's Ray cluster starts
        try:
            with _environment({**flower_env(), _RUN_MARKER: token}):
                run_simulation(
                    server_app=centre_app(submission.run_config),
                    client_app=site_app(submission.run_config),
                    num_supernodes=submission.num_supernodes,
                    backend_config={
                        "client_resources": {
                            "num_cpus": submission.cpus_per_client,
                            "num_gpus": submission.gpus_per_client,
                        }
                    },
                )
        finally:
            _stop_marked(token, grace_s=_STOP_GRACE_S)
        if on_poll is not None:
            on_poll()
        if done is not None and not done():
            raise FlowerRunError(
                f"the in-process simulation of run {run_id} ended without the ServerApp's "
                "final output in its run directory (server_record.json and summary.json); "
                "Flower's log above says why"
            )
        return RunStatus(run_id, "finished:completed", "N/A", time.monotonic() - started)

    def end_run(self, run_id: int, *, timeout_s: float = 30.0) -> None:
        """Nothing to end: :meth:`wait` returns (or raises) once the simulation is over."""
        self._runs.pop(run_id, None)


class InProcessFlower:
    """Stands for a SuperLink in :func:`~fedcare.simulations.runner.run_experiment`: its
    runs go through :class:`InProcessHandle`, in this process.

    Parameters
    ----------
    work_dir:
        The run's Flower folder (``<out>/.flower``).
    """

    def __init__(self, *, work_dir: Path) -> None:
        self._in_process = InProcessHandle(work_dir=work_dir)

    def handle(self) -> InProcessHandle:
        """The in-process handle (nothing is started)."""
        return self._in_process
