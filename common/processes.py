"""Start and stop Flower's processes: their environment, free ports, and whole-family stops.

Flower's SuperLink and SuperNode spawn processes of their own (a SuperExec, and under it a
ServerApp, ClientApp or simulation process, possibly a Ray cluster). Some of them start new
sessions, and they outlive their parent when it dies mid-run. :func:`stop_family` stops a
process and every process it spawned, found by session and parentage in ``/proc`` (psutil is
not a dependency), first with SIGTERM and, after a grace period, SIGKILL.

Every Flower process fedcare starts gets :func:`flower_env`: telemetry off, run-time
dependency installation off, and this interpreter's ``bin/`` first on ``PATH`` (the
SuperLink and SuperNode start ``flower-superexec`` by name).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "module_command",
    "venv_bin",
    "flower_env",
    "free_port",
    "stop_family",
    "family_pids",
    "family_sessions",
    "supervise_group",
    "live_processes",
    "LiveProcess",
    "Child",
    "die_with_parent",
]


def module_command(module: str) -> list[str]:
    """``python -m MODULE`` with this interpreter, without the working folder on the path.

    ``-P`` (Python 3.11+) keeps a ``client/``, ``server/`` or ``torch/`` folder in the
    working directory from shadowing what is installed: a process that holds patient data
    or keys imports only installed code.
    """
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", module]


def venv_bin(name: str) -> str:
    """A console script of this interpreter's environment (not whatever PATH finds)."""
    return str(Path(sys.executable).parent / name)


#: Environment switches that open Flower 1.42's legacy gRPC APIs on 0.0.0.0.
_LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def flower_env(
    *,
    home: Path | None = None,
    pythonpath: Sequence[Path] = (),
    base: Mapping[str, str] | None = None,
    one_thread: bool = True,
) -> dict[str, str]:
    """The environment of a Flower process fedcare starts.

    Parameters
    ----------
    home : pathlib.Path, optional
        A private ``FLWR_HOME`` (connection config, installed FABs).
    pythonpath : sequence of pathlib.Path, default ()
        Folders put in front of ``PYTHONPATH``.
    base : mapping, optional
        The environment to start from (default: this process's).
    one_thread : bool, default True
        Set ``OMP_NUM_THREADS=1`` unless already set (many small trainings side by side).

    Ray services started under it (a simulation's) listen on 127.0.0.1 only, and
    ``RAY_ADDRESS`` is ``local``: a Ray started under it starts its own cluster. Inherited, or
    unset, Ray would join the cluster a ``ray start`` on this machine recorded in
    ``/tmp/ray/ray_current_cluster``, anyone's, and run the sites' ClientApps there. (The
    simulation's SuperLink overrides it with fedcare's own shared cluster,
    :mod:`fedcare.simulations.ray_cluster`.)
    """
    env = dict(os.environ if base is None else base)
    env["RAY_ADDRESS"] = "local"
    # Inherited, these would make a SuperLink start Flower's legacy gRPC Control and Fleet
    # APIs on all interfaces, beside the loopback-only HTTP port and the gateway.
    for legacy in _LEGACY_GRPC_SWITCHES:
        env.pop(legacy, None)
    no_proxy = ",".join(
        filter(None, [env.get("NO_PROXY"), env.get("no_proxy"), "127.0.0.1,localhost"])
    )
    path = [str(Path(p).resolve()) for p in pythonpath]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
    )
    # Ray (inside a simulation) binds its GCS, raylet and workers to all interfaces unless
    # it believes it runs a local-only cluster; this variable says so on Linux too, and every
    # Ray service then listens on 127.0.0.1 only.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # A SuperExec looks for new ClientApp/ServerApp tasks once a second by default; every
    # message waits for that poll. 0.2 s costs next to nothing while idle.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    if home is not None:
        env["FLWR_HOME"] = str(home)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    if one_thread:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class LiveProcess:
    """One process as ``/proc/PID/stat`` shows it; ``start`` (clock ticks after boot) tells
    a process from a later one that reuses its pid."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int


def live_processes() -> list[LiveProcess]:
    """Live processes from /proc; zombies are left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 2 (comm) may hold spaces and parentheses: split after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            continue
        found.append(
            LiveProcess(
                int(entry.name), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])
            )
        )
    return found


def _family(sessions: set[int], root: int | None = None) -> tuple[list[LiveProcess], set[int]]:
    """Members of ``sessions``, ``root`` and all their descendants, and all their sessions.

    Sessions tie the family together once the parent is gone: orphans are re-parented, but
    keep their session. ``root`` is only for a process not yet reaped (its pid is not reused
    while it lives).
    """
    sessions = set(sessions)
    own = os.getsid(0)
    while True:
        procs = live_processes()
        members = {p.pid: p for p in procs if p.sid in sessions or p.pid == root}
        grew = True
        while grew:
            grew = False
            for p in procs:
                if p.pid not in members and p.ppid in members:
                    members[p.pid] = p
                    grew = True
        found = {p.sid for p in members.values()} - {own}  # never our own session
        if found <= sessions:
            return [p for p in members.values() if p.sid != own], sessions
        sessions |= found


def family_pids(root: int) -> set[int]:
    """The pids of ``root`` (a session leader) and of everything it spawned, alive now."""
    members, _ = _family({root}, root=root)
    return {p.pid for p in members}


def family_sessions(root: int) -> set[int]:
    """The sessions of ``root`` (a session leader) and of everything it spawned, alive now.

    Known before a stop, they find the family even after ``root`` is gone.
    """
    return _family({root}, root=root)[1]


def _signal_family(members: Sequence[LiveProcess], sig: int) -> None:
    own = os.getpgrp()
    for pgid in sorted({p.pgid for p in members} - {own}):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for p in members:  # a member in a foreign process group
        if p.pgid == own:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p.pid, sig)


def stop_family(
    proc: subprocess.Popen[bytes], sessions: set[int] | None = None, *, grace_s: float
) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``), then everything it spawned.

    ``proc`` gets SIGTERM (its own clean shutdown) and up to ``grace_s`` to exit, then
    SIGKILL; then every process in its session, or in the session of anything it spawned,
    gets SIGTERM and, after ``grace_s``, SIGKILL. ``sessions`` (``{proc.pid}`` by default)
    grows in place with every session found, so a second call after an interrupted first
    one still knows them.
    """
    if sessions is None:
        sessions = {proc.pid}
    if proc.poll() is None:  # while it lives, its pid names it and its children
        sessions |= _family(sessions, root=proc.pid)[1]
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members, found = _family(sessions)
        sessions |= found
        if not members:
            return
        _signal_family(members, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            time.sleep(0.1)
            members, found = _family(sessions)
            sessions |= found
            if not members:
                return


@dataclass(frozen=True)
class Child:
    """One process of a supervised group.

    Attributes
    ----------
    name : str
        Its name in messages (``superlink``, ``gateway``, ``site-worker``).
    command : sequence of str
        Its command line.
    restart : bool, default False
        ``True``: when it exits on its own it is started again (after 1 s, doubling up to
        30 s while it keeps dying within a minute of its start; after 5 such deaths in a
        row it ends the group, since it cannot start); ``False``: its exit stops the whole
        group.
    """

    name: str
    command: Sequence[str]
    restart: bool = False


#: Restart back-off of a :class:`Child` with ``restart=True``: first delay, cap, and how long
#: it must have run for the delay to reset.
_RESTART_FIRST_S, _RESTART_MAX_S, _RESTART_STABLE_S = 1.0, 30.0, 60.0
#: Quick deaths in a row after which a restartable child ends the group: it cannot start
#: (a port taken, a broken configuration), and restarting it forever would hide that.
_RESTART_GIVE_UP = 5


@dataclass
class _Running:
    child: Child
    proc: subprocess.Popen[bytes]
    sessions: set[int]
    started: float
    delay: float = _RESTART_FIRST_S
    due: float | None = None  # when a dead restartable child is started again
    quick_deaths: int = 0  # in a row, each within _RESTART_STABLE_S of its start


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send this process ``sig`` when its parent dies (Linux; a no-op
    elsewhere). A supervisor that is SIGKILLed then still stops its children: each gets
    SIGTERM and runs its own clean stop."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _start(child: Child, env: Mapping[str, str], cwd: Path | None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own or Flower's executables, our arguments
        list(child.command),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,  # noqa: PLW1509 - only a prctl before exec
    )


def supervise_group(
    children: Sequence[Child],
    *,
    env: Mapping[str, str],
    grace_s: float = 10.0,
    cwd: Path | None = None,
    parent_pid: int | None = None,
    first_restart_s: float = _RESTART_FIRST_S,
) -> int:
    """Run ``children`` in the foreground until one that may not restart exits or this
    process is told to stop (or, with ``parent_pid``, that process is no longer its parent).

    Each child gets its own session. A child with ``restart=True`` that exits is started
    again (one line on stderr says so, with its exit code); a child with ``restart=False``
    that exits stops the group. SIGTERM, SIGINT and SIGHUP to this process stop every child
    *and everything they spawned* (:func:`stop_family`), in reverse order of start, so a
    ``systemctl stop`` or Ctrl-C leaves nothing behind. A restart waits ``first_restart_s``
    (1 s), doubling while the child keeps dying quickly. Each child also gets SIGTERM from
    the kernel if this process dies without a word (``PR_SET_PDEATHSIG``).

    Returns
    -------
    int
        The exit code of the child that ended the group, or 128 + the signal number when
        this process was told to stop.
    """
    stop_signal: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, _on_signal) for s in handled}
    running: list[_Running] = []
    ended: int | None = None
    try:
        for child in children:
            proc = _start(child, env, cwd)
            running.append(
                _Running(child, proc, {proc.pid}, time.monotonic(), delay=first_restart_s)
            )
        ticks = 0
        while ended is None and not stop_signal:
            with contextlib.suppress(subprocess.TimeoutExpired):
                running[0].proc.wait(0.5)
            ticks += 1
            if parent_pid is not None and os.getppid() != parent_pid:
                sys.stderr.write(f"fedcare: parent {parent_pid} is gone; stopping\n")
                stop_signal.append(signal.SIGTERM)
                break
            now = time.monotonic()
            for r in running:
                code = r.proc.poll()
                if code is None:
                    if ticks % 20 == 0:
                        # Keep the family's sessions known, in case the child dies first.
                        r.sessions |= _family(r.sessions, root=r.proc.pid)[1]
                    continue
                if not r.child.restart:
                    sys.stderr.write(f"fedcare: {r.child.name} exited with code {code}\n")
                    ended = code
                    break
                if r.due is None:
                    stop_family(r.proc, r.sessions, grace_s=grace_s)  # what it left behind
                    if now - r.started >= _RESTART_STABLE_S:
                        r.delay, r.quick_deaths = first_restart_s, 0
                    r.quick_deaths += 1
                    if r.quick_deaths >= _RESTART_GIVE_UP:
                        sys.stderr.write(
                            f"fedcare: {r.child.name} exited with code {code} "
                            f"{r.quick_deaths} times in a row, each within "
                            f"{_RESTART_STABLE_S:g} s of its start; stopping (see its "
                            "output above for why it cannot start)\n"
                        )
                        ended = code if code != 0 else 1
                        break
                    r.due = now + r.delay
                    sys.stderr.write(
                        f"fedcare: {r.child.name} exited with code {code}; starting it "
                        f"again in {r.delay:g} s\n"
                    )
                    r.delay = min(r.delay * 2, _RESTART_MAX_S)
                elif now >= r.due:
                    r.proc = _start(r.child, env, cwd)
                    r.sessions = {r.proc.pid}
                    r.started, r.due = now, None
            sys.stderr.flush()
    finally:
        for r in reversed(running):
            stop_family(r.proc, r.sessions, grace_s=grace_s)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stop_signal:
        return 128 + stop_signal[0]
    return int(ended if ended is not None else 0)
