"""A sweep runs all its values on one SuperLink: one start-up, each value its own run.

The fast test counts SuperLink starts of ``fedcare simulate --sweep`` with the runs faked;
the slow one runs two real values of fedcare's own app on one SuperLink and checks that each
is its own Flower run, with its own run directory, run id and ledgers, and that nothing is
left running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import simulations.simulate_cli as simulate_cli
from common.locks import FolderInUse, FolderLock
from common.summary import load_summary
from fedcare.cli import main
from simulations import flower_driver, runner
from simulations.flower_driver import SharedSuperLink
from simulations.runner import CONFIG_NAME, STATE_DIR_NAME, RunOutcome, run_experiment
from simulations.scenario import Scenario
from simulations.synth import SynthConfig
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
def test_two_values_on_one_superlink_are_two_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    outcomes = []
    with SharedSuperLink(work_dir=tmp_path / ".flower") as shared:
        watch = FamilyWatch(shared.handle().pid)
        for value in ("1", "4"):
            outcomes.append(
                run_experiment(
                    scenario,
                    tmp_path / f"target-epsilon={value}",
                    overrides={"target-epsilon": float(value)},
                    on_progress=lambda event: watch.snapshot(),
                    superlink=shared,
                )
            )
            watch.snapshot()
    assert len(starts) == 1 and shared.starts == 1
    ids = [o.summary.run_id for o in outcomes]
    assert len(set(ids)) == 2
    for outcome, value in zip(outcomes, ("1", "4"), strict=True):
        summary = load_summary(outcome.run_dir / "summary.json")
        assert summary.run_id == outcome.summary.run_id
        assert summary.rounds_completed == 1
        assert [s.status for s in summary.sites] == ["completed"] * 2
        config = tomllib.loads((outcome.run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
        assert config["federation"]["target-epsilon"] == float(value)
        assert list((outcome.run_dir / STATE_DIR_NAME).iterdir())  # its own ledgers
    assert watch.commands().count("flwr-simulation") >= 2  # one simulation per value
    assert watch.survivors() == []
    assert not (tmp_path / ".flower" / "home").exists()
