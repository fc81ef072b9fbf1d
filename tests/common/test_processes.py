"""The process supervisor behind ``fedcare server start`` and ``fedcare site start``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedcare.common.processes import Child, supervise_group

PY = sys.executable


def _wait_for(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_restartable_child_is_started_again_and_the_other_ends_the_group(
    tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    # The worker records each start and dies at once; the main child waits for two starts.
    worker = Child(
        "worker",
        [PY, "-c", f"open({str(starts)!r}, 'a').write('x\\n'); raise SystemExit(3)"],
        restart=True,
    )
    main = Child(
        "main",
        [
            PY,
            "-c",
            textwrap.dedent(
                f"""
                import os, time
                p = {str(starts)!r}
                while not (os.path.exists(p) and len(open(p).read().split()) >= 2):
                    time.sleep(0.05)
                raise SystemExit(7)
                """
            ),
        ],
    )
    code = supervise_group([main, worker], env=dict(os.environ), grace_s=5)
    assert code == 7
    assert len(starts.read_text().split()) >= 2


def test_sigterm_stops_every_child_and_what_it_spawned(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # A child that spawns a grandchild in a session of its own, records both pids, waits.
    child_code = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             start_new_session=True)
        open({str(pids)!r}, "a").write(f"{{os.getpid()}} {{g.pid}}\\n")
        time.sleep(600)
        """
    )
    runner = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from fedcare.common.processes import Child, supervise_group
        children = [Child("a", [sys.executable, "-c", {child_code!r}]),
                    Child("b", [sys.executable, "-c", {child_code!r}], restart=True)]
        raise SystemExit(supervise_group(children, env=dict(os.environ), grace_s=5))
        """
    )
    proc = subprocess.Popen([PY, "-c", runner], start_new_session=True)
    try:
        _wait_for(lambda: pids.exists() and len(pids.read_text().splitlines()) == 2)
        spawned = [int(x) for line in pids.read_text().splitlines() for x in line.split()]
        assert all(_alive(p) for p in spawned)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        _wait_for(lambda: not any(_alive(p) for p in spawned))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_child_that_cannot_start_ends_the_group_instead_of_restarting_forever() -> None:
    # A gateway whose port is taken dies at once, every time: restarting it for ever would
    # hide that the centre is unreachable.
    broken = Child("broken", [PY, "-c", "raise SystemExit(4)"], restart=True)
    waiting = Child("main", [PY, "-c", "import time; time.sleep(600)"])
    code = supervise_group([waiting, broken], env=dict(os.environ), grace_s=5, first_restart_s=0.05)
    assert code == 4
