"""``audit attack`` on run directories: the report it saves, its tables, and its errors.

The run directories are built without Flower (``fake_run_dir``); a real simulation is
attacked in ``test_attacks_end_to_end.py`` (slow).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from click.testing import Result
from typer.testing import CliRunner

from fedcare.client.data.datasets import TaskData
from fedcare.common.errors import ConfigError
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.attack_cli import audit_attack
from fedcare.simulations.audit.attacks import CanaryOptions, audit_run, read_attack_report
from fedcare.simulations.audit.findings import ATTACKS_FILE, AttackReport
from tests.simulations.audit._attack_fixtures import DELTA, fake_run_dir, tiny_federation

FAST = ["--reference-models", "1", "--canaries", "40", "--device", "cpu"]


Sites = tuple[Path, dict[str, TaskData]]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Sites:
    root = tmp_path_factory.mktemp("attack-cli") / "sites"
    return root, tiny_federation(root, patients=120, seed=1)


@pytest.fixture(scope="module")
def dp_run(sites: Sites, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run_dir(tmp_path_factory.mktemp("dp-run") / "run", *sites, dp=True)


@pytest.fixture(scope="module")
def plain_run(sites: Sites, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake_run_dir(tmp_path_factory.mktemp("plain-run") / "run", *sites, dp=False)


def _invoke(*args: str) -> Result:
    app = typer.Typer()
    app.command()(audit_attack)
    app.command("other")(lambda: None)  # two commands: the first is named on the line
    return CliRunner().invoke(app, ["audit-attack", *args])


def test_dp_run_report_is_saved_and_printed(dp_run: Path) -> None:
    result = _invoke(str(dp_run), *FAST)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = read_attack_report(dp_run)
    raw = json.loads((dp_run / ATTACKS_FILE).read_text(encoding="utf-8"))
    assert AttackReport.model_validate(raw) == report
    assert report.run_id == "fake-0" and report.dp is True and report.delta == DELTA
    summary = load_summary(dp_run / "summary.json")
    site_ids = [s.site_id for s in summary.sites]
    assert sorted((a.site_id, a.attack) for a in report.attacks) == sorted(
        (s, a) for s in site_ids for a in ("loss-threshold", "rmia")
    )
    claimed = {s.site_id: s.privacy.epsilon for s in summary.sites}
    assert [c.site_id for c in report.canaries] == site_ids
    for c in report.canaries:
        assert (c.n_canaries, c.n_guesses, c.confidence) == (40, 8, 0.95)
        assert c.claimed_epsilon == claimed[c.site_id]
        assert c.claimed_epsilon is not None and c.below_claim is True
        assert c.epsilon_lower_bound < c.claimed_epsilon
    out = result.output
    for text in ("site site-0", "loss-threshold", "rmia", "TPR@0.1%FPR", "below the claim"):
        assert text in out
    assert f"saved {dp_run / ATTACKS_FILE}" in " ".join(out.split())


def test_one_site_of_a_non_private_run(plain_run: Path) -> None:
    result = _invoke(str(plain_run), *FAST, "--site", "site-1", "--confidence", "0.9")
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = read_attack_report(plain_run)
    assert report.dp is False
    assert {a.site_id for a in report.attacks} == {"site-1"}
    (audit,) = report.canaries
    assert audit.claimed_epsilon is None and audit.below_claim is None
    assert audit.confidence == pytest.approx(0.9)
    assert "no ε claimed" in result.output


def test_rmia_is_skipped_with_a_reason_in_a_one_site_run(sites: Sites, tmp_path: Path) -> None:
    run = fake_run_dir(tmp_path / "run", *sites, dp=False)
    first = json.loads((run / "sites.json").read_text())[:1]
    (run / "sites.json").write_text(json.dumps(first))
    skipped: list[tuple[str, str, str]] = []
    report = audit_run(
        run,
        canary_options=CanaryOptions(canaries=20),
        device="cpu",
        on_skip=lambda *why: skipped.append(why),
    )
    assert [a.attack for a in report.attacks] == ["loss-threshold"]
    assert skipped and skipped[0][:2] == ("site-0", "rmia") and "several sites" in skipped[0][2]


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(run, dest)
    return dest


def test_errors_name_the_path_and_the_fix(plain_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such run directory"):
        audit_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty: not a run directory \(no config.toml\)"):
        audit_run(tmp_path / "empty")

    run = _copy(plain_run, tmp_path)
    (run / "final_model.pt").unlink()
    with pytest.raises(ConfigError, match=r"final_model.pt: no final model.*--resume"):
        audit_run(run)

    run = _copy(plain_run, tmp_path / "b")
    gone = tmp_path / "moved-away" / "site-0"
    (run / "sites.json").write_text(json.dumps([str(gone)]))
    with pytest.raises(ConfigError, match=f"{gone}.*are gone.*Restore them"):
        audit_run(run)


def test_bad_options_are_config_errors(plain_run: Path) -> None:
    with pytest.raises(ConfigError, match="site-9 did not take part.*choose from: site-0"):
        audit_run(plain_run, sites=["site-9"], canary_options=None)
    with pytest.raises(ConfigError, match="unknown attack 'lira'"):
        audit_run(plain_run, attacks=["lira"])
    with pytest.raises(ConfigError, match="ask for at most"):
        audit_run(plain_run, sites=["site-0"], canary_options=CanaryOptions(canaries=100_000))
    result = _invoke(str(plain_run), "--site", "site-9")
    assert isinstance(result.exception, ConfigError)  # the fedcare entry point prints one line
