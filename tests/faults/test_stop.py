"""Stop means stop: a signal to ``fedcare simulate`` ends every process it started.

Before, SIGTERM or SIGKILL of ``fedcare simulate`` mid-run left the simulation SuperLink,
its SuperExec and the Ray cluster running, and the orphaned run kept training to its last
round, charging the sites' ledgers. Each test starts the real command (Flower, Ray),
waits for round 1, sends a real signal, and then waits until no process that belongs to
the run is left (every Flower and Ray process carries the run's folder in its environment).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from tests.integration._deployment import processes_under

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BIN = Path(sys.executable).parent


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(
        tomli_w.dumps(
            {
                "sites": 2,
                "baselines": False,
                "synth": {"patients_per_site": 60, "image_size": 16, "n_genes": 10},
                "federation": {"num-server-rounds": 30, "task": "readmission"},
            }
        )
    )
    out = tmp_path / "run"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    proc = subprocess.Popen(
        [str(BIN / "fedcare"), "simulate", "--config", str(scenario), "--out", str(out)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a signal reaches only fedcare, as from systemd or kill
    )
    progress = out / "progress.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if progress.is_file() and progress.read_text().strip():  # round 0 done, 1 under way
            return proc, out
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the run did not start")


def _nothing_left(root: Path, timeout: float = 90) -> list[str]:
    deadline = time.monotonic() + timeout
    left = processes_under(root)
    while left and time.monotonic() < deadline:
        time.sleep(0.3)
        left = processes_under(root)
    return left


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """``(pid, local address)`` of every TCP socket the processes ``pids`` listen on."""
    by_inode: dict[str, str] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            if v6:
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                ip = str(ipaddress.IPv6Address(b"".join(words)))
            else:
                ip = str(ipaddress.IPv4Address(raw[::-1]))
            by_inode[fields[9]] = f"{ip}:{int(port, 16)}"
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[len("socket:[") : -1]
                if inode in by_inode:
                    found.append((pid, by_inode[inode]))
    return found


def _loopback(address: str) -> bool:
    ip = address.rsplit(":", 1)[0]
    parsed = ipaddress.ip_address(ip)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return bool(parsed.is_loopback or (mapped is not None and mapped.is_loopback))


def _rounds(out: Path) -> int:
    return len((out / "progress.jsonl").read_text().splitlines())


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_each_stop_signal_becomes_a_clean_stop(sig: signal.Signals) -> None:
    """SIGTERM and SIGHUP raise :class:`fedcare.common.stopping.Stopped` (so every ``finally`` that
    owns a process runs), as SIGINT raises KeyboardInterrupt; a second one is ignored."""
    code = f"""
import os, signal, time
from fedcare.common import stopping
# A child of a background job inherits SIGINT ignored (Python then installs no handler):
# put back the one a terminal's Python has.
signal.signal(signal.SIGINT, signal.default_int_handler)
stopping.install()
try:
    os.kill(os.getpid(), {int(sig)})
    # The handler may run on another thread's time slice under load: wait for it (the
    # exception it raises ends the sleep at once; 60 s only bounds a broken handler).
    time.sleep(60)
except (stopping.Stopped, KeyboardInterrupt) as e:
    print(type(e).__name__, getattr(e, "signum", 2))
    if isinstance(e, stopping.Stopped):
        os.kill(os.getpid(), {int(sig)})  # a second one, during the cleanup: ignored
        print("cleanup finished")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    if sig == signal.SIGINT:
        assert out.stdout.split() == ["KeyboardInterrupt", "2"]
    else:
        assert out.stdout.split() == ["Stopped", str(int(sig)), "cleanup", "finished"]


def test_sigterm_stops_every_process_and_says_how_to_resume(tmp_path: Path) -> None:
    sig = signal.SIGTERM
    proc, out = _start(tmp_path)
    # While it runs: Flower and Ray listen on the loopback interface only.
    pids = {int(line.split(":")[0]) for line in processes_under(tmp_path)}
    sockets = _listening(pids)
    assert sockets, "no listening socket found (the check would pass vacuously)"
    assert [s for s in sockets if not _loopback(s[1])] == [], sockets
    try:
        proc.send_signal(sig)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + sig, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"fedcare: stopped by {sig.name}") and "--resume" in last, text[-2000:]
    assert "Traceback" not in text
    assert _nothing_left(tmp_path) == []
    rounds = _rounds(out)
    assert rounds < 31, "the run went on to its last round"


def test_sigkill_of_fedcare_stops_the_simulation_too(tmp_path: Path) -> None:
    proc, out = _start(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _nothing_left(tmp_path) == [], "Flower or Ray outlived a SIGKILLed fedcare"
    rounds = _rounds(out)
    # Nothing is left to train: the progress log no longer grows.
    assert _rounds(out) == rounds and rounds < 31
