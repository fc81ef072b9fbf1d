"""Every user error of ``fedcare simulate`` is one line, early: before Flower or Ray start.

Each case below used to start Flower and Ray, or print a traceback, or be silently ignored.
The command runs in-process (``fedcare.cli.main``); none of these cases gets far enough to
start a process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w

import fedcare.simulations.simulate_cli as simulate_cli
from fedcare.cli import main


def _fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and lines[0].startswith("error: "), err
    return err


def _scenario(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(tomli_w.dumps(fields))
    return path


@pytest.fixture()
def no_run(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the scenario simulate would run, without running it."""
    seen: list[Any] = []

    def record(scenario: Any, out: Path, **_: Any) -> None:
        seen.append(scenario)
        raise SystemExit(0)

    monkeypatch.setattr(simulate_cli, "run_with_progress", record)
    return seen


def test_out_that_is_a_file_or_below_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in _fails(capsys, "simulate", "--out", str(f))
    assert f"below the file {f}" in _fails(capsys, "simulate", "--out", str(f / "run"))


def test_a_scenario_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "Hôpital"\n'.encode("latin-1"))
    err = _fails(capsys, "simulate", "--config", str(path), "--out", str(tmp_path / "o"))
    assert "not UTF-8" in err and str(path) in err


def test_infinite_epsilon_with_dp_on_says_how_to_turn_dp_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _scenario(tmp_path, federation={"dp": True, "target-epsilon": float("inf")})
    err = _fails(capsys, "simulate", "--config", str(path), "--out", str(tmp_path / "o"))
    assert "target-epsilon" in err and "dp = false" in err


def test_fedprox_mu_can_be_set_and_its_absence_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_run: list[Any]
) -> None:
    out = str(tmp_path / "o")
    assert "--set proximal-mu" in _fails(capsys, "simulate", "--strategy", "fedprox", "--out", out)
    with pytest.raises(SystemExit) as ok:
        main(["simulate", "--strategy", "fedprox", "--set", "proximal-mu=0.05", "--out", out])
    assert ok.value.code == 0
    assert no_run[-1].federation_config().proximal_mu == 0.05
    assert "unknown key" in _fails(capsys, "simulate", "--set", "proximal_muu=1", "--out", out)


def test_the_scenarios_baselines_setting_is_kept_unless_the_command_line_says_otherwise(
    tmp_path: Path, no_run: list[Any]
) -> None:
    path = _scenario(tmp_path, baselines=False)
    for args, expected in (([], False), (["--baselines"], True)):
        with pytest.raises(SystemExit):
            main(["simulate", "--config", str(path), "--out", str(tmp_path / "o"), *args])
        assert no_run[-1].baselines is expected


def test_an_unknown_task_is_refused_before_flower_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _scenario(tmp_path, sites=2, synth={"patients_per_site": 40})
    out = tmp_path / "o"
    err = _fails(capsys, "simulate", "--config", str(path), "--task", "nosuch", "--out", str(out))
    assert "no task 'nosuch'" in err and "readmission" in err
    assert not (out / ".flower").exists(), "Flower was started"


def test_every_wrong_scenario_field_is_reported_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('sites = 0\nseed = "x"\n[federation]\nlearning-rate = -1\nlocal-epochs = 0\n')
    err = _fails(capsys, "simulate", "--config", str(path), "--out", str(tmp_path / "o"))
    for field in ("sites", "seed", "learning-rate", "local-epochs"):
        assert field in err, field


def test_a_bad_sweep_value_is_found_before_the_first_value_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_run: list[Any]
) -> None:
    out = str(tmp_path / "o")
    err = _fails(capsys, "simulate", "--sweep", "task=readmission,nosuch", "--out", out)
    assert "'nosuch'" in err and "readmission" in err
    assert no_run == [], "a value ran before the bad one was found"
