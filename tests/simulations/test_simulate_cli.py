"""`fedcare simulate` rejects bad configuration with one clear line and exit 2, before any run;
it shows each run's id, both ε per site, and says when noise or evaluation was weakened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import fedcare.simulations.simulate_cli as simulate_cli
from fedcare.cli import main
from fedcare.common.summary import RunSummary
from fedcare.simulations.runner import RunOutcome
from fedcare.simulations.scenario import SCENARIO_DIR, Scenario, Sweep, load_scenario


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return int(info.value.code or 0), err


def test_bundled_scenarios_are_valid() -> None:
    names = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
    assert "demo" in names
    for name in names:
        assert load_scenario(name).federation_config().num_server_rounds >= 1


@pytest.mark.parametrize(
    ("files", "argv", "needle"),
    [
        ({}, ["--config", "no-such-scenario"], "no such scenario file"),
        (
            {"s.toml": "sites = 3\ncolour = 'red'\n"},
            ["--config", "{d}/s.toml"],
            "colour: unknown key",
        ),
        (
            {"s.toml": "[federation]\nrounds = 3\n"},
            ["--config", "{d}/s.toml"],
            "rounds: unknown key",
        ),
        ({"s.toml": "sites = [\n"}, ["--config", "{d}/s.toml"], "not valid TOML"),
        ({}, ["--sweep", "target-epsilon"], "write KEY=V1,V2"),
        ({}, ["--strategy", "fedsgd"], "strategy"),
        ({}, ["--data-root", "{d}/missing"], "no such folder"),
        ({"empty/x.txt": "x"}, ["--data-root", "{d}/empty"], "no folder inside holds a site.toml"),
    ],
)
def test_config_errors_exit_2_with_the_cause(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict, argv: list[str], needle: str
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    args = [a.replace("{d}", str(tmp_path)) for a in argv]
    code, err = _run(["simulate", "--out", str(tmp_path / "run"), *args], capsys)
    assert code == 2
    assert needle in err


def test_sweep_values_become_run_config_overrides() -> None:
    eps = Sweep(key="target-epsilon", values=("0.5", "inf"))
    assert eps.overrides("0.5") == {"target-epsilon": 0.5}
    assert eps.overrides("inf") == {"dp": False}  # infinite ε means no DP at all
    rounds = Sweep(key="num-server-rounds", values=("2",))
    assert rounds.overrides("2") == {"num-server-rounds": 2}
    strategy = Sweep(key="strategy", values=("fedprox",))
    assert strategy.overrides("fedprox") == {"strategy": "fedprox"}


# ---------------------------------------------------------------- nothing runs on a bad request


@pytest.fixture()
def runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every run the command starts (none really starts: each returns a canned outcome)."""
    started: list[dict[str, Any]] = []

    def fake_run(scenario: Scenario, out: Path, **kwargs: Any) -> RunOutcome:
        started.append({"out": out, **kwargs})
        return RunOutcome(out, _summary(run_id=f"run-{len(started)}"))

    monkeypatch.setattr(simulate_cli, "run_with_progress", fake_run)
    return started


@pytest.mark.parametrize(
    ("sweep", "needles"),
    [
        (
            "target-epsilon=2,-1,0,4",
            [
                "sweep target-epsilon=-1: field target-epsilon: Input should be greater than 0",
                "sweep target-epsilon=0: field target-epsilon",
            ],
        ),
        ("colour=1,2", ["sweep colour=1: field colour: unknown key"]),
        ("strategy=fedavg,fedsgd", ["sweep strategy=fedsgd: field strategy"]),
        ("target-epsilon=1,2,1", ["value(s) 1 appear more than once"]),
    ],
)
def test_every_sweep_value_is_validated_before_the_first_one_runs(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    runs: list[dict[str, Any]],
    sweep: str,
    needles: list[str],
) -> None:
    code, err = _run(["simulate", "--out", str(tmp_path), "--sweep", sweep], capsys)
    assert code == 2
    for needle in needles:
        assert needle in err
    assert runs == []


def test_a_valid_sweep_runs_each_value_in_its_own_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: list[dict[str, Any]]
) -> None:
    main(["simulate", "--out", str(tmp_path), "--sweep", "target-epsilon=1,inf"])
    assert [r["out"].name for r in runs] == ["target-epsilon=1", "target-epsilon=inf"]
    assert all(r["out"].parent == tmp_path for r in runs)
    assert [r["overrides"] for r in runs] == [{"target-epsilon": 1.0}, {"dp": False}]
    out = capsys.readouterr().out
    assert "max run ε" in out and "max lifetime ε" in out
    assert "run-1" in out and "run-2" in out  # each value's own run id
    assert "target-epsilon = 1: noise = reproducible at site-a" in out


def test_resume_on_a_folder_with_no_earlier_run_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: list[dict[str, Any]]
) -> None:
    code, err = _run(["simulate", "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2
    assert "no earlier run to resume" in err and len(err.strip().splitlines()) == 1
    assert runs == []


def test_resume_says_which_run_it_continues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: list[dict[str, Any]]
) -> None:
    run_id = "default-20250101T000000Z-ab12cd34"
    (tmp_path / "config.toml").write_text(f'[federation]\nrun-id = "{run_id}"\n')
    main(["simulate", "--out", str(tmp_path), "--resume"])
    out = capsys.readouterr().out
    assert f"resuming run {run_id}" in out
    assert runs[0]["resume"] is True


def test_resume_of_a_sweep_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: list[dict[str, Any]]
) -> None:
    code, err = _run(
        ["simulate", "--out", str(tmp_path), "--sweep", "target-epsilon=1,2", "--resume"], capsys
    )
    assert code == 2 and "--resume continues one run, not a sweep" in err
    assert runs == []


def test_the_results_show_both_epsilons_and_say_when_noise_or_evaluation_was_weakened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], runs: list[dict[str, Any]]
) -> None:
    main(["simulate", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "run ε" in out and "lifetime ε (δ)" in out
    assert "noise = reproducible at site-a" in out
    assert "evaluation = exact at site-a" in out
    assert "site-b" in out and "reproducible at site-a, site-b" not in out


def _summary(run_id: str) -> RunSummary:
    def privacy(noise: str, evaluation: str) -> dict[str, Any]:
        return {
            "enabled": True, "epsilon": 6.5, "run_epsilon": 2.5, "delta": 1e-5,
            "accountant": "prv", "noise": noise, "evaluation": evaluation,
            "mechanisms": [{"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 4}],
        }  # fmt: skip

    return RunSummary.model_validate(
        {
            "run_id": run_id,
            "fedcare_version": "0",
            "flwr_version": "1.42.0",
            "task": "readmission",
            "strategy": "fedavg",
            "rounds_planned": 1,
            "rounds_completed": 1,
            "sites": [
                {
                    "site_id": "site-a",
                    "n_train": 40,
                    "n_test": 20,
                    "status": "completed",
                    "privacy": privacy("reproducible", "exact"),
                    "metrics": {"test.auroc": 0.7},
                },
                {
                    "site_id": "site-b",
                    "n_train": 40,
                    "n_test": 20,
                    "status": "completed",
                    "privacy": privacy("os-entropy", "dp"),
                },
            ],
            "global": {"final": {"test.auroc": 0.7}},
        }
    )


def test_the_demo_shows_both_epsilons_and_the_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedcare.demo as demo

    monkeypatch.setattr(demo, "synthesize", lambda *a, **k: [])
    monkeypatch.setattr(demo, "data_check", lambda *a, **k: None)
    monkeypatch.setattr(
        demo, "run_with_progress", lambda scenario, out, **k: RunOutcome(out, _summary("demo-1"))
    )
    main(["demo", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "run demo-1" in out and "run ε" in out and "lifetime ε (δ)" in out
    assert "noise = reproducible at site-a" in out and "evaluation = exact at site-a" in out


def test_with_personal_models_each_site_shows_global_personal_and_local_only_side_by_side(
    tmp_path: Path,
) -> None:
    from rich.console import Console

    plain = _summary("r-plain")
    personal = plain.model_copy(
        update={
            "personalization": "ditto",
            "sites": (
                plain.sites[0].model_copy(update={"personal_metrics": {"test.auroc": 0.81}}),
                plain.sites[1],
            ),
            "baselines": plain.baselines.model_copy(
                update={"local_only": {"site-a": {"test.auroc": 0.64}}}
            ),
        }
    )

    def render(summary: RunSummary) -> str:
        console = Console(width=300, record=True)
        console.print(simulate_cli.results_table(RunOutcome(tmp_path, summary)))
        return console.export_text()

    assert "personal" not in render(plain)
    text = render(personal)
    assert "personal (ditto) test.auroc" in text and "local-only test.auroc" in text
    row = next(line for line in text.splitlines() if "site-a" in line)
    assert row.index("0.700") < row.index("0.810") < row.index("0.640")  # global, personal, local
