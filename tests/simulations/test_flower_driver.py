"""fedcare.simulations.flower_driver: real ``flwr run`` on a SuperLink we start, and nothing left
behind.

The two integration tests start Flower and Ray (15-40 s each). The SuperLink's family is
watched from /proc by this file's own scan (not the driver's): every process that descends
from the SuperLink during a run, with its start time, so a survivor is found even after it
was re-parented, and a recycled pid is not mistaken for one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import parse_config_args
from flwr.supercore.utils import simulation_config_from_json

from fedcare.common.errors import ConfigError
from fedcare.simulations import flower_driver
from fedcare.simulations.flower_driver import (
    FlowerRunError,
    SuperLinkHandle,
    _federation_config,
    local_superlink,
    write_app_dir,
)
from tests.simulations import _tiny_flower_app as tiny

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- /proc watcher (independent of the driver's own scan) ----------------------------------


@dataclass(frozen=True)
class _Stat:
    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot: with pid, identifies one process


def _proc_table() -> dict[int, _Stat]:
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = _Stat(
            int(entry.name), rest[0], int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19])
        )
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class FamilyWatch:
    """Everything seen descending from the root pids, and the sessions they used."""

    root: int
    also: tuple[int, ...] = ()
    seen: dict[tuple[int, int], str] = field(default_factory=dict)
    sessions: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, link: SuperLinkHandle) -> FamilyWatch:
        """The SuperLink's family and the shared Ray cluster's (where it has one)."""
        return cls(link.pid, also=() if link.ray_pid is None else (link.ray_pid,))

    def snapshot(self) -> None:
        table = _proc_table()
        family = {self.root, *self.also}
        grew = True
        while grew:
            new = {p.pid for p in table.values() if p.ppid in family} - family
            family |= new
            grew = bool(new)
        for pid in family & set(table):
            stat = table[pid]
            self.seen.setdefault((pid, stat.start), _cmdline(pid))
            self.sessions.add(stat.sid)

    def commands(self) -> str:
        return "\n".join(self.seen.values())

    def survivors(self) -> list[str]:
        """Live (non-zombie) processes that were seen, or that sit in a session seen."""
        left = []
        for p in _proc_table().values():
            if p.state in ("Z", "X"):
                continue
            if (p.pid, p.start) in self.seen or p.sid in self.sessions:
                left.append(f"{p.pid} sid={p.sid} {_cmdline(p.pid)[:100]}")
        return left


def _app(tmp_path: Path) -> Path:
    return write_app_dir(tmp_path / "app", config_defaults=tiny.CONFIG_DEFAULTS, **tiny.COMPONENTS)


def _fedavg_reference(rounds: int, nodes: int, lr: float) -> np.ndarray:
    """Each client steps lr towards its target; FedAvg weighs by num-examples."""
    w = np.zeros(3)
    weights = np.array([tiny.num_examples(p) for p in range(nodes)], dtype=float)
    for _ in range(rounds):
        local = np.stack([w + lr * (tiny.target(p) - w) for p in range(nodes)])
        w = np.average(local, axis=0, weights=weights)
    return w


# --- fast checks: nothing is started --------------------------------------------------------


def test_write_app_dir_is_a_thin_flower_app(tmp_path: Path) -> None:
    app = _app(tmp_path)
    assert [p.name for p in app.iterdir()] == ["pyproject.toml"]
    doc = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    assert {"name", "version"} <= set(doc["project"])
    flwr_app = doc["tool"]["flwr"]["app"]
    assert flwr_app["publisher"] == "fedcare"
    assert flwr_app["components"] == tiny.COMPONENTS
    assert flwr_app["config"] == tiny.CONFIG_DEFAULTS
    assert "federations" not in doc["tool"]["flwr"]  # legacy in 1.42: flwr rewrites the file

    (app / "stale.py").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="stale.py"):
        _app(tmp_path)
    with pytest.raises(ConfigError, match="module:attribute"):
        write_app_dir(
            tmp_path / "x", config_defaults={}, serverapp="fedcare.server.app", clientapp="c:a"
        )
    with pytest.raises(ConfigError, match="'rates'"):
        write_app_dir(
            tmp_path / "y",
            config_defaults={"rates": [1, 2]},  # type: ignore[dict-item]
            serverapp="s:a",
            clientapp="c:a",
        )


def test_federation_config_is_what_flower_parses(tmp_path: Path) -> None:
    # Flower's own parser of --federation-config, as `flwr run` applies it.
    parsed = parse_config_args([_federation_config(4, 2.0, 0.25)])
    sim = simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})
    assert sim.num_supernodes == 4
    assert sim.client_resources_num_cpus == 2
    assert sim.client_resources_num_gpus == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="whole number"):
        _federation_config(3, 0.5, 0)
    with pytest.raises(ConfigError, match="num_supernodes"):
        _federation_config(0, 1, 0)
    with pytest.raises(ConfigError, match="gpus_per_client"):
        _federation_config(3, 1, -1)


def test_submit_names_run_config_keys_the_app_lacks(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    handle = SuperLinkHandle(env={"FLWR_HOME": str(work / "home")}, work_dir=work, port=1, pid=1)
    with pytest.raises(ConfigError, match="learning-rate, zzz"):
        handle.submit(
            _app(tmp_path), run_config={"zzz": 1, "learning-rate": 0.1, "lr": 0.2}, num_supernodes=3
        )
    with pytest.raises(ConfigError, match="FLWR_HOME"):
        handle.submit(tmp_path, run_config={}, num_supernodes=3)
    with pytest.raises(ConfigError, match="not a Flower app"):
        handle.submit(tmp_path / "nowhere", run_config={}, num_supernodes=3)


# --- real runs --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_run_completes_and_leaves_no_process(tmp_path: Path) -> None:
    result = tmp_path / "out" / "result.json"
    result.parent.mkdir()
    work = tmp_path / "flower"
    with local_superlink(work_dir=work, pythonpath=[REPO_ROOT]) as link:
        watch = FamilyWatch.of(link)
        polls: list[float] = []

        def on_poll() -> None:
            polls.append(time.monotonic())
            watch.snapshot()

        run_id = link.submit(
            _app(tmp_path),
            run_config={"result-path": str(result), "num-server-rounds": 2, "lr": 0.5},
            num_supernodes=3,
        )
        status = link.wait(run_id, timeout_s=240, poll_s=0.5, on_poll=on_poll)
        watch.snapshot()
    assert status.run_id == run_id
    assert status.status == "finished:completed"
    assert status.elapsed > 0
    assert len(polls) >= 2
    record = json.loads(result.read_text(encoding="utf-8"))
    assert record["num_nodes"] == 3
    assert record["train_rounds"] == [1, 2]
    np.testing.assert_allclose(record["final"], _fedavg_reference(2, 3, 0.5), rtol=1e-12)
    # The SuperLink ran what we think, in its own sessions, with the private FLWR_HOME.
    assert "flower-superexec" in watch.commands()
    assert "flwr-simulation" in watch.commands()
    assert (work / "home" / "config.toml").is_file()
    assert [p.name for p in (tmp_path / "app").iterdir()] == ["pyproject.toml"]
    assert watch.survivors() == []


@pytest.mark.slow
@pytest.mark.integration
def test_failed_stopped_and_interrupted_runs_are_cleaned_up(tmp_path: Path) -> None:
    app = _app(tmp_path)
    result = tmp_path / "result.json"
    held = Path(f"{result}.held")
    watch: FamilyWatch | None = None
    interrupted = math.inf

    class Held(Exception):
        pass

    def until_held(snapshot: Callable[[], None]) -> Callable[[], None]:
        def on_poll() -> None:
            snapshot()
            if held.exists():
                raise Held

        return on_poll

    with (
        pytest.raises(KeyboardInterrupt),
        local_superlink(work_dir=tmp_path / "flower", pythonpath=[REPO_ROOT]) as link,
    ):
        watch = FamilyWatch.of(link)
        # 1. The ServerApp raises: one line quotes Flower's status and names the run's log.
        run_id = link.submit(app, run_config={"fail": True}, num_supernodes=3)
        with pytest.raises(FlowerRunError) as failed:
            link.wait(run_id, timeout_s=240, on_poll=watch.snapshot)
        message = str(failed.value)
        assert "finished:failed" in message
        assert tiny.FAILURE in message
        assert "\n" not in message
        log = Path(message.rsplit("(the ServerApp's log: ", 1)[1].rstrip(")"))
        assert "RuntimeError" in log.read_text()  # the whole log, kept beside the run
        # 2. A run that outlives its timeout is stopped.
        run_id = link.submit(
            app,
            run_config={"result-path": str(result), "num-server-rounds": 1, "hold-s": 600.0},
            num_supernodes=3,
        )
        with pytest.raises(Held):
            link.wait(run_id, timeout_s=240, on_poll=until_held(watch.snapshot))
        with pytest.raises(FlowerRunError, match="did not finish within 0 s"):
            link.wait(run_id, timeout_s=0)
        deadline = time.monotonic() + 60
        while link.run_info(run_id)["status"] != "finished:stopped":
            assert time.monotonic() < deadline, "flwr stop did not stop the run"
            time.sleep(0.5)
        watch.snapshot()
        # 3. Ctrl-C while the stopped run's simulation and Ray are still up (Flower 1.42
        # marks the run stopped but leaves them running: the hard case for cleanup).
        alive = "\n".join(watch.survivors())
        assert "flwr-simulation" in alive
        assert "raylet" in alive
        interrupted = time.monotonic()
        raise KeyboardInterrupt
    assert watch is not None
    assert watch.survivors() == []
    assert time.monotonic() - interrupted < 60


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_ended_at_its_output_frees_the_superlink_for_the_next(tmp_path: Path) -> None:
    """``wait(done=...)`` returns once the app's output is there; ``end_run`` kills that run's
    simulation and Ray at once, and the same SuperLink runs the next run to the exact end."""
    app = _app(tmp_path)
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    held = Path(f"{first}.held")
    with local_superlink(work_dir=tmp_path / "flower", pythonpath=[REPO_ROOT]) as link:
        watch = FamilyWatch.of(link)
        # The ServerApp writes its result, then would hold the run (and Ray) for 600 s.
        run_1 = link.submit(
            app,
            run_config={"result-path": str(first), "num-server-rounds": 1, "hold-s": 600.0},
            num_supernodes=3,
        )
        status = link.wait(run_1, timeout_s=240, on_poll=watch.snapshot, done=held.exists)
        watch.snapshot()
        assert status.status == "running"  # Flower had not finished it: the wait did not wait
        assert "ray::ClientAppActor" in "\n".join(watch.survivors())
        link.end_run(run_1)
        alive = "\n".join(watch.survivors())
        assert "flwr-simulation" not in alive and "ray::ClientAppActor" not in alive
        # The SuperLink, its SuperExec and the Ray cluster its runs join stay up.
        assert "flower-superexec" in alive and "raylet" in alive
        assert link.run_info(run_1)["status"] == "finished:stopped"
        assert json.loads(first.read_text(encoding="utf-8"))["train_rounds"] == [1]
        # The next run on the same SuperLink: its own simulation, to the exact FedAvg result.
        run_2 = link.submit(
            app,
            run_config={"result-path": str(second), "num-server-rounds": 2, "lr": 0.5},
            num_supernodes=3,
        )
        assert run_2 != run_1
        assert link.wait(run_2, timeout_s=240, on_poll=watch.snapshot).status == (
            "finished:completed"
        )
    record = json.loads(second.read_text(encoding="utf-8"))
    np.testing.assert_allclose(record["final"], _fedavg_reference(2, 3, 0.5), rtol=1e-12)
    assert watch.survivors() == []
    # Both runs joined one Ray cluster: one raylet and one GCS were ever started.
    programs = [c.split(" ", 1)[0] for c in watch.seen.values()]
    assert sum(p.endswith("/raylet") for p in programs) == 1
    assert sum(p.endswith("/gcs_server") for p in programs) == 1


def test_end_run_refuses_while_another_run_may_be_going(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_kill(root: int, *, timeout_s: float) -> None:
        pytest.fail("end_run went on to kill simulations although it had to refuse")

    # pid 1 is no SuperLink: were the refusal to regress, nothing on the machine is killed.
    monkeypatch.setattr(flower_driver, "_kill_simulations", must_not_kill)
    handle = SuperLinkHandle(
        env={"FLWR_HOME": str(tmp_path / "home")}, work_dir=tmp_path, port=1, pid=1
    )
    handle._open_runs |= {3, 4}  # submitted, neither seen finished
    with pytest.raises(FlowerRunError, match=r"cannot end run 3 early while run\(s\) \[4\]"):
        handle.end_run(3)
