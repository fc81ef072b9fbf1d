"""One process per run directory and per site state folder, and a clear word naming it.

Before, two ``fedcare simulate`` on one ``--out`` both ran: the first died with "Run ID not
found", the second resumed the first's checkpoint, and both appended to one audit log. Now
the folder's lock (``<folder>/.lock``, ``fcntl.flock``) is taken before anything in it is
read or changed, and a second process is refused at once with the holder's pid and command.
The holders here are real processes; the kernel lets go of a lock when its holder is
SIGKILLed, which these tests check too (no stale lock to clean up by hand).
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedcare.client.deploy_cli as deploy_cli
import fedcare.simulations.runner as runner
from fedcare.cli import main
from fedcare.common.errors import FedcareError
from fedcare.common.locks import LOCK_NAME, FolderInUse, FolderLock
from fedcare.common.run_signing import RUN_PUBLIC_KEY_NAME, write_public_key
from fedcare.simulations.runner import CONFIG_NAME, recorded_run_id, run_experiment
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import SynthConfig, synthesize

#: Takes the lock of argv[1] as `fedcare simulate` would, says so, and holds it until
#: its stdin closes or it is killed.
HOLDER = """
import sys
from pathlib import Path
from fedcare.common.locks import FolderLock
FolderLock(Path(sys.argv[1]), command="fedcare simulate --out " + sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""

#: A real `run_experiment` into argv[1], with Flower replaced by a SuperLink that says the
#: run was submitted and then holds (as a run in progress does) until stdin closes.
RUNNER = """
import contextlib, sys
from pathlib import Path
import fedcare.simulations.runner as runner
from fedcare.simulations.scenario import Scenario

class Link:
    def submit(self, app_dir, **_):
        print("submitted", flush=True)
        sys.stdin.read()
        raise SystemExit(0)

@contextlib.contextmanager
def superlink(*, work_dir):
    yield Link()

runner.local_superlink = superlink
runner.prepare_sites = lambda scenario, out, reuse=False: [out / "site-a", out / "site-b"]
runner.load_sites = lambda folders, **_: [object() for _ in folders]
runner.run_experiment(Scenario(name="first", federation={"task": "readmission"}), Path(sys.argv[1]))
"""


@pytest.fixture
def start() -> Iterator[Callable[[str, Path, str], subprocess.Popen[str]]]:
    """Start a Python process running ``code`` on ``folder`` and wait until it prints
    ``ready``; every process started is killed and reaped at the end."""
    started: list[subprocess.Popen[str]] = []

    def run(code: str, folder: Path, ready: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the process is ready (or has died)
        if line.strip() != ready:
            proc.kill()
            _, err = proc.communicate(timeout=60)
            pytest.fail(f"the holder did not start: {line!r} {err}")
        return proc

    yield run
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.communicate(timeout=60)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL: no handler, no cleanup in the holder
    proc.communicate(timeout=60)


# ------------------------------------------------------------------ the lock itself


def test_a_second_process_is_refused_naming_the_first_until_it_is_killed(
    tmp_path: Path, start: Callable[[str, Path, str], subprocess.Popen[str]]
) -> None:
    holder = start(HOLDER, tmp_path, "locked")
    lock_file = tmp_path / LOCK_NAME
    assert stat.S_IMODE(lock_file.stat().st_mode) == 0o600

    with pytest.raises(FolderInUse) as info:
        FolderLock(tmp_path, what="--out").acquire()
    message = str(info.value)
    assert isinstance(info.value, FedcareError) and "\n" not in message
    assert message.startswith(f"{tmp_path} is in use by pid {holder.pid} (")
    assert f"fedcare simulate --out {tmp_path}, started " in message
    assert "wait for it to finish or stop it, or choose another --out" in message
    assert info.value.holder is not None and info.value.holder.pid == holder.pid

    # A third, separate process gets the same answer.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from fedcare.common.locks import FolderLock; "
            "FolderLock(Path(sys.argv[1])).acquire()",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert other.returncode != 0 and f"in use by pid {holder.pid}" in other.stderr

    _kill(holder)
    with FolderLock(tmp_path) as lock:  # the kernel let go of the dead holder's lock
        assert lock.held
        assert f'"pid": {os.getpid()}' in lock_file.read_text()
    with FolderLock(tmp_path):  # and a released lock can be taken again
        pass


def test_a_locked_folder_is_locked_within_one_process_too(tmp_path: Path) -> None:
    with FolderLock(tmp_path, command="first"), pytest.raises(FolderInUse, match="first"):
        FolderLock(tmp_path).acquire()


def test_a_folder_that_cannot_hold_a_lock_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FedcareError, match="no such folder"):
        FolderLock(tmp_path / "missing").acquire()
    (tmp_path / LOCK_NAME).mkdir()  # something in the lock file's place
    with pytest.raises(FedcareError, match="cannot lock") as info:
        FolderLock(tmp_path).acquire()
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ fedcare simulate


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The run configs this process hands to a (fake) Flower, which stops every run."""
    calls: list[dict[str, Any]] = []

    class Link:
        def submit(self, app_dir: Path, *, run_config: dict[str, Any], **_: Any) -> str:
            calls.append(dict(run_config))
            raise _Submitted

    @contextlib.contextmanager
    def fake_superlink(*, work_dir: Path) -> Iterator[Link]:
        yield Link()

    monkeypatch.setattr(runner, "local_superlink", fake_superlink)
    monkeypatch.setattr(
        runner, "prepare_sites", lambda scenario, out, reuse=False: [out / "site-a", out / "site-b"]
    )
    monkeypatch.setattr(runner, "load_sites", lambda folders, **_: [object() for _ in folders])
    return calls


class _Submitted(Exception):
    """The fake SuperLink got the run: nothing trains."""


def _scenario() -> Scenario:
    return Scenario(name="second", federation={"task": "readmission"})


def test_a_second_run_on_one_out_is_refused_before_it_touches_anything(
    tmp_path: Path,
    start: Callable[[str, Path, str], subprocess.Popen[str]],
    submitted: list[dict[str, Any]],
) -> None:
    out = tmp_path / "run"
    first = start(RUNNER, out, "submitted")  # a run in progress
    first_id = recorded_run_id(out)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    for resume in (False, True):
        with pytest.raises(FolderInUse, match=f"in use by pid {first.pid} ") as info:
            run_experiment(_scenario(), out, resume=resume)
        assert "choose another --out" in str(info.value)
    assert submitted == []
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert recorded_run_id(out) == first_id

    _kill(first)  # its lock goes with it
    with pytest.raises(_Submitted):
        run_experiment(_scenario(), out, resume=True)
    assert submitted[0]["run-id"] == first_id  # --resume continues the first run...
    with pytest.raises(_Submitted):
        run_experiment(_scenario(), out)
    assert submitted[1]["run-id"] != first_id  # ...and a plain start is a new run
    assert (out / CONFIG_NAME).is_file()


def test_the_simulate_command_refuses_in_one_line_without_starting_flower(
    tmp_path: Path, start: Callable[[str, Path, str], subprocess.Popen[str]]
) -> None:
    out = tmp_path / "run"
    first = start(RUNNER, out, "submitted")
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "simulate", "--out", str(out), "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is in use by pid {first.pid} " in lines[0], done.stderr
    assert not (out / "sites").exists()  # refused before the sites were synthesized


# ------------------------------------------------------------------ fedcare site start


@pytest.fixture(scope="module")
def site_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hospital")
    config = SynthConfig(patients_per_site=60, n_genes=12, image_size=16, simulated=False)
    synthesize(root / "data", n_sites=1, seed=3, config=config)
    write_public_key(Ed25519PrivateKey.generate(), root / RUN_PUBLIC_KEY_NAME)
    site = {
        "site_id": "site-0",
        "data": str(root / "data" / "site-0"),
        "state_dir": str(root / "state"),
        "device": "cpu",
        "privacy": {"epsilon": 10.0},
        "superlink": {
            "address": "127.0.0.1:9092",
            "insecure": True,
            "run_signing_key": str(root / RUN_PUBLIC_KEY_NAME),
        },
    }
    path = root / "site-config.toml"
    path.write_text(tomli_w.dumps(site), encoding="utf-8")
    return path


def test_two_site_starts_on_one_state_folder_the_second_is_refused(
    site_config: Path,
    start: Callable[[str, Path, str], subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = site_config.parent / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    supervised: list[bool] = []

    def supervise_group(children: object, **_: object) -> int:
        # While the site runs, its state folder is locked (even against this process).
        with pytest.raises(FolderInUse):
            FolderLock(state).acquire()
        supervised.append(True)
        return 0

    monkeypatch.setattr(deploy_cli, "supervise_group", supervise_group)
    first = start(HOLDER, state, "locked")  # another `site start` holds the state folder
    with pytest.raises(SystemExit) as code:
        main(["site", "start", str(site_config)])
    assert code.value.code == 2 and supervised == []
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{state} is in use by pid {first.pid} " in err[0]
    assert "choose another state_dir" in err[0]

    _kill(first)
    main(["site", "start", str(site_config)])  # exit 0: returns
    assert supervised == [True]
    with FolderLock(state):  # released when the command ended
        pass
