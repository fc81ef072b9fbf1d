"""Every run has its own run id: sites key charges and stored updates on it.

A site replays a stored update only to the request that earned it (same run, round, received
model and config). If two runs shared a run id, the second run's rounds would be answered with
the first run's updates (another ε, another task, another sweep value), so both would report
the same results. These tests check that a simulation never reuses a run id by accident: each
start draws a fresh one, each sweep value is its own run, and only ``--resume`` continues a
recorded run, under the id it recorded. Flower is replaced by a fake SuperLink that records the
run config it is handed and stops there.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import tomli_w

import fedcare.simulations.runner as runner
from fedcare.common.errors import ConfigError
from fedcare.server.checkpoint import Checkpoint, save_checkpoint
from fedcare.simulations.runner import new_run_id, recorded_run_id, run_experiment
from fedcare.simulations.scenario import Scenario, Sweep

RUN_ID = re.compile(r"^it-\d{8}T\d{6}Z-[0-9a-f]{8}$")


class _Submitted(Exception):
    """Raised by the fake SuperLink once the run is handed over: nothing trains."""


@pytest.fixture()
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The run configs handed to Flower, in order (the fake SuperLink stops every run)."""
    calls: list[dict[str, Any]] = []

    class Link:
        def submit(self, app_dir: Path, *, run_config: dict[str, Any], **_: Any) -> str:
            calls.append(dict(run_config))
            raise _Submitted

    @contextlib.contextmanager
    def fake_superlink(*, work_dir: Path) -> Iterator[Link]:
        yield Link()

    def fake_prepare(scenario: Scenario, out: Path, *, reuse: bool = False) -> list[Path]:
        return [out / "site-a", out / "site-b"]

    monkeypatch.setattr(runner, "local_superlink", fake_superlink)
    monkeypatch.setattr(runner, "prepare_sites", fake_prepare)
    monkeypatch.setattr(runner, "load_sites", lambda folders, **_: [object() for _ in folders])
    return calls


def _scenario(**federation: Any) -> Scenario:
    return Scenario(name="it", federation={"task": "readmission", **federation})


def _start(scenario: Scenario, out: Path, **kwargs: Any) -> None:
    with pytest.raises(_Submitted):
        run_experiment(scenario, out, **kwargs)


# ---------------------------------------------------------------- new_run_id


def test_a_run_id_names_the_scenario_the_utc_start_and_a_random_token() -> None:
    paris = timezone(timedelta(hours=2))
    now = datetime(2025, 6, 1, 14, 30, 0, tzinfo=paris)
    assert new_run_id("demo", now=now, token="0123abcd") == "demo-20250601T123000Z-0123abcd"
    assert RUN_ID.match(new_run_id("it"))


def test_run_ids_started_in_the_same_second_differ() -> None:
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    ids = {new_run_id("it", now=now) for _ in range(200)}
    assert len(ids) == 200


@pytest.mark.parametrize(
    ("name", "start"),
    [("my scenario/v2", "my-scenario-v2-"), ("../..", ".."), ("", "run-"), ("ε sweep", "sweep-")],
)
def test_a_scenario_name_cannot_put_odd_characters_into_a_run_id(name: str, start: str) -> None:
    run_id = new_run_id(name, token="00000000")
    assert run_id.startswith(start)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", run_id)


# ---------------------------------------------------------------- run_experiment


def test_every_start_gets_a_fresh_run_id_recorded_in_config_toml(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    out = tmp_path / "run"
    _start(_scenario(), out)
    _start(_scenario(**{"target-epsilon": 2.0}), out)  # another ε on the same sites
    _start(_scenario(), out)  # the very same command again
    ids = [c["run-id"] for c in submitted]
    assert all(RUN_ID.match(i) for i in ids), ids
    assert len(set(ids)) == 3
    assert recorded_run_id(out) == ids[-1]


def test_a_run_id_the_scenario_names_is_used_as_given(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    _start(_scenario(**{"run-id": "trial-42"}), tmp_path / "run")
    assert submitted[0]["run-id"] == "trial-42"


def test_a_new_run_clears_the_earlier_runs_results(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for name in ("summary.json", "metrics.csv", "checkpoint.pt", "progress.jsonl"):
        (out / name).write_text("from an earlier run")
    _start(_scenario(), out)
    assert not [n for n in ("summary.json", "metrics.csv", "checkpoint.pt") if (out / n).exists()]


def test_resume_continues_the_recorded_run_under_its_id(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    out = tmp_path / "run"
    _start(_scenario(), out)
    _start(_scenario(), out, resume=True)
    _start(_scenario(), out, resume=True)
    first, *resumed = (c["run-id"] for c in submitted)
    assert resumed == [first, first]


def test_resume_without_an_earlier_run_is_an_error_not_a_fresh_start(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    out = tmp_path / "never-ran"
    with pytest.raises(ConfigError, match="no earlier run to resume") as err:
        run_experiment(_scenario(), out, resume=True)
    assert "\n" not in str(err.value) and "without --resume" in str(err.value)
    assert submitted == [] and not out.exists()


def test_resume_with_another_configuration_is_refused_naming_what_changed(
    tmp_path: Path, submitted: list[dict[str, Any]]
) -> None:
    out = tmp_path / "run"
    _start(_scenario(**{"target-epsilon": 4.0}), out)
    with pytest.raises(ConfigError, match=r"target-epsilon = 4\.0 then, 8\.0 now"):
        run_experiment(_scenario(**{"target-epsilon": 8.0}), out, resume=True)
    with pytest.raises(ConfigError, match="holds run it-.*not run other"):
        run_experiment(_scenario(**{"target-epsilon": 4.0, "run-id": "other"}), out, resume=True)
    assert len(submitted) == 1


def test_resume_reads_the_checkpoint_when_config_toml_is_gone(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(run_id="it-from-checkpoint", round=2, arrays={}))
    assert recorded_run_id(tmp_path) == "it-from-checkpoint"
    (tmp_path / "config.toml").write_text(tomli_w.dumps({"federation": {"run-id": "it-other"}}))
    with pytest.raises(ConfigError, match="mixes two runs"):
        recorded_run_id(tmp_path)


@pytest.mark.parametrize(
    "text", ["[federation]\ntask = 'x'\n", "[federation\n", "[federation]\nrun-id = ''\n"]
)
def test_a_record_without_a_readable_run_id_is_no_run_to_resume(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match="without --resume"):
        recorded_run_id(tmp_path)


def test_a_torn_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(ConfigError, match="cannot read the earlier run's checkpoint"):
        recorded_run_id(tmp_path)


# ---------------------------------------------------------------- sweeps


def test_every_sweep_value_is_its_own_run(tmp_path: Path, submitted: list[dict[str, Any]]) -> None:
    scenario = _scenario().model_copy(
        update={"sweep": Sweep(key="target-epsilon", values=("1", "2", "inf"))}
    )
    for run in scenario.sweep_plan():
        assert "run-id" not in run.overrides  # each start draws its own
        _start(scenario, tmp_path / run.value, overrides=run.overrides)
    ids = [c["run-id"] for c in submitted]
    assert len(set(ids)) == 3 and all(RUN_ID.match(i) for i in ids)
    assert [c["dp"] for c in submitted] == [True, True, False]


def test_a_named_run_gets_one_distinct_id_per_sweep_value() -> None:
    scenario = _scenario(**{"run-id": "trial"}).model_copy(
        update={"sweep": Sweep(key="num-server-rounds", values=("1", "2"))}
    )
    ids = [run.config.run_id for run in scenario.sweep_plan()]
    assert ids == ["trial-num-server-rounds-1", "trial-num-server-rounds-2"]
    by_run_id = _scenario().model_copy(update={"sweep": Sweep(key="run-id", values=("a", "b"))})
    assert [run.config.run_id for run in by_run_id.sweep_plan()] == ["a", "b"]
