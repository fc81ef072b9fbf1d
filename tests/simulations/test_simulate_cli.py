"""`fedcare simulate` rejects bad configuration with one clear line and exit 2, before any run."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.cli import main
from simulations.scenario import SCENARIO_DIR, load_scenario


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
    from simulations.scenario import Sweep
    from simulations.simulate_cli import _sweep_overrides

    eps = Sweep(key="target-epsilon", values=("0.5", "inf"))
    assert _sweep_overrides(eps, "0.5") == {"target-epsilon": 0.5}
    assert _sweep_overrides(eps, "inf") == {"dp": False}  # infinite ε means no DP at all
    rounds = Sweep(key="num-server-rounds", values=("2",))
    assert _sweep_overrides(rounds, "2") == {"num-server-rounds": 2}
    strategy = Sweep(key="strategy", values=("fedprox",))
    assert _sweep_overrides(strategy, "fedprox") == {"strategy": "fedprox"}
