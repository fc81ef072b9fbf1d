"""A sweep runs all its values on one SuperLink and one Ray cluster: one start-up, each
value its own run.

The fast test counts SuperLink starts of ``fedcare simulate --sweep`` with the runs faked;
the slow one runs a real value of fedcare's own app on a shared SuperLink and checks that it
is its own Flower run, with its own run directory and ledgers, that the SuperLink and the
Ray cluster stay up and idle for the next value, and that nothing is left running at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fedcare.simulations.simulate_cli as simulate_cli
from fedcare.cli import main
from fedcare.common.locks import FolderInUse, FolderLock
from fedcare.common.summary import load_summary
from fedcare.simulations import flower_driver, runner
from fedcare.simulations.flower_driver import SharedSuperLink
from fedcare.simulations.runner import CONFIG_NAME, STATE_DIR_NAME, RunOutcome, run_experiment
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import SynthConfig
from tests.simulations.test_flower_driver import FamilyWatch
from tests.simulations.test_simulate_cli import _summary

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_every_value_of_a_cli_sweep_runs_on_one_superlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    handles: list[object] = []

    @contextlib.contextmanager
    def fake_superlink(**kwargs: Any) -> Iterator[object]:
        events.append(f"start {kwargs['work_dir']}")
        yield object()
        events.append("stop")

    def fake_run(scenario: Scenario, out: Path, **kwargs: Any) -> RunOutcome:
        superlink = kwargs["superlink"]
        assert isinstance(superlink, SharedSuperLink)
        handles.append(superlink.handle())  # what run_experiment submits to
        events.append(f"run {out.name}")
        with pytest.raises(FolderInUse):  # the sweep's folder (and FLWR_HOME) is held
            FolderLock(tmp_path).acquire()
        return RunOutcome(out, _summary(run_id=f"run-{len(handles)}"))

    monkeypatch.setattr(flower_driver, "local_superlink", fake_superlink)
    monkeypatch.setattr(simulate_cli, "run_experiment", fake_run)
    main(["simulate", "--out", str(tmp_path), "--sweep", "target-epsilon=1,4,inf"])
    assert events == [
        f"start {tmp_path / '.flower'}",
        "run target-epsilon=1",
        "run target-epsilon=4",
        "run target-epsilon=inf",
        "stop",
    ]
    assert len({id(h) for h in handles}) == 1


def test_a_shared_superlink_starts_only_when_a_run_asks(tmp_path: Path) -> None:
    with SharedSuperLink(work_dir=tmp_path / ".flower") as shared:
        pass
    assert shared.starts == 0
    assert not (tmp_path / ".flower").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_a_run_on_a_shared_superlink_leaves_it_up_and_idle_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fedcare's own app, run by the runner on a sweep's SuperLink: the run starts none of its
    own, has its own run directory, config and ledgers, and leaves the SuperLink healthy with
    nothing of its simulation running; leaving the sweep stops everything. (Two real runs
    one after the other on one SuperLink: ``test_flower_driver``'s
    ``test_a_run_ended_at_its_output_frees_the_superlink_for_the_next``.)"""
    starts: list[int] = []
    real = flower_driver.local_superlink

    @contextlib.contextmanager
    def counted(**kwargs: Any) -> Iterator[flower_driver.SuperLinkHandle]:
        with real(**kwargs) as link:
            starts.append(link.pid)
            yield link

    monkeypatch.setattr(flower_driver, "local_superlink", counted)
    monkeypatch.setattr(runner, "local_superlink", counted)  # a run's own: must not start
    scenario = Scenario(
        name="sweep",
        sites=2,
        baselines=False,
        synth=SynthConfig(patients_per_site=60, n_genes=12, image_size=16),
        federation={"task": "readmission", "num-server-rounds": 1},
    )
    with SharedSuperLink(work_dir=tmp_path / ".flower") as shared:
        link = shared.handle()
        watch = FamilyWatch.of(link)
        assert link.ray_address is not None  # the sweep's runs join one Ray cluster
        outcome = run_experiment(
            scenario,
            tmp_path / "target-epsilon=4",
            overrides={"target-epsilon": 4.0},
            on_progress=lambda event: watch.snapshot(),
            superlink=shared,
        )
        watch.snapshot()
        assert shared.handle() is link  # the same SuperLink, for the next value
        alive = "\n".join(watch.survivors())
        assert "flwr-simulation" not in alive and "ray::ClientAppActor" not in alive
        assert "flower-superexec" in alive and "raylet" in alive  # up for the next value
    assert len(starts) == 1 and shared.starts == 1
    summary = load_summary(outcome.run_dir / "summary.json")
    assert summary.run_id == outcome.summary.run_id
    assert summary.rounds_completed == 1
    assert [s.status for s in summary.sites] == ["completed"] * 2
    config = tomllib.loads((outcome.run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    assert config["federation"]["target-epsilon"] == 4.0
    assert list((outcome.run_dir / STATE_DIR_NAME).iterdir())  # its own ledgers
    assert "flwr-simulation" in watch.commands()
    assert watch.survivors() == []
    assert not (tmp_path / ".flower" / "home").exists()
