"""Real simulations: fedcare's ServerApp and ClientApp under `flwr run` on a local SuperLink.

Slow (each run starts Flower and Ray): CI runs them too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedcare.client.accounting import Mechanism, independent_epsilon
from fedcare.client.data.loaders import load_site
from fedcare.client.ledger import PrivacyLedger
from fedcare.common.summary import load_summary
from fedcare.simulations.reports import COLUMNS, read_metrics_csv
from fedcare.simulations.runner import run_experiment
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import SynthConfig, synthesize

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _processes_of(run_dir: Path) -> list[str]:
    """Live processes started for this run: their environment names its private FLWR_HOME."""
    marker = str(run_dir.resolve() / ".flower").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie: already dead, waiting for a parent to reap it
            if marker in (entry / "environ").read_bytes():
                found.append(
                    entry.name
                    + ": "
                    + (entry / "cmdline").read_bytes()[:100].decode(errors="replace")
                )
        except OSError:
            continue
    return found


def _gone(run_dir: Path, timeout_s: float = 30) -> list[str]:
    """The run's processes still alive once they are all gone or ``timeout_s`` has passed (a
    killed Ray worker may take a moment to exit)."""
    deadline = time.monotonic() + timeout_s
    while (left := _processes_of(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


def _scenario(sites: Path, **federation: object) -> Scenario:
    return Scenario(
        name="it",
        sites=3,
        data_root=str(sites),
        federation={"task": "readmission", "local-epochs": 2, "learning-rate": 0.01, **federation},
    )


@pytest.fixture()
def sites(tmp_path: Path) -> Path:
    root = tmp_path / "sites"
    config = SynthConfig(patients_per_site=220, image_format="npy")
    synthesize(root, n_sites=3, seed=11, config=config)
    return root


def test_three_sites_end_to_end_through_a_killed_server_and_its_resume(
    sites: Path, tmp_path: Path
) -> None:
    """Three hospitals, two rounds; the server is killed after round 1 and the run resumed.

    One real run serves both claims (each start of Flower and Ray costs a two-core machine
    tens of seconds): the resumed run completes round 2 without repeating round 1 or
    charging any site twice, and what it leaves is a whole run: the model learned, each
    site's ε matches an independent accountant, baselines, metrics.csv, plots and the final
    model are written, and no process of the run is left, after the kill or at the end.
    """
    out = tmp_path / "run"
    scenario = _scenario(sites, **{"num-server-rounds": 2})

    class Interrupt(Exception):
        pass

    def kill_after_round_1(event: dict) -> None:
        if event["round"] >= 1:
            raise Interrupt  # leaves the SuperLink context: server and sites are killed

    with pytest.raises(Interrupt):
        run_experiment(scenario, out, on_progress=kill_after_round_1)
    assert not (out / "summary.json").exists()
    assert _gone(out) == [], "Flower or Ray outlived the killed run"
    outcome = run_experiment(scenario, out, resume=True)
    summary = load_summary(out / "summary.json")
    assert summary == outcome.summary
    assert summary.rounds_completed == 2
    assert sorted(r.round for r in summary.global_.rounds if r.round > 0) == [1, 2]
    for folder in sorted(p for p in sites.iterdir() if (p / "site.toml").is_file()):
        site = load_site(folder)
        ledger = PrivacyLedger(out / "state" / site.spec.site_id / "ledger.sqlite", create=False)
        own = ledger.charges(ledger.cohort_key(site.patient_ids))
        charges = [c for c in own if c.run_id == summary.run_id and c.kind == "train"]
        assert sorted(c.round for c in charges) == [1, 2], folder.name

    assert [s.status for s in summary.sites] == ["completed"] * 3
    rounds = {r.round: r.metrics for r in summary.global_.rounds}
    assert set(rounds) == {0, 1, 2}
    assert rounds[2]["test.auroc"] > rounds[0]["test.auroc"] + 0.05
    # Each site's ε, recomputed independently (dp-accounting PLD) from the mechanisms listed.
    for site in summary.sites:
        p = site.privacy
        assert p.enabled and p.epsilon is not None and p.delta is not None
        assert len(p.mechanisms) == 2
        mechs = [Mechanism(m.noise_multiplier, m.sample_rate, m.steps) for m in p.mechanisms]
        pld = independent_epsilon(mechs, delta=p.delta)
        assert pld - 1e-3 <= p.epsilon <= pld + 0.02 + 1e-3, (site.site_id, p.epsilon, pld)
        assert p.epsilon <= 8.0 + 1e-9
    assert set(summary.baselines.local_only) == {"site-0", "site-1", "site-2"}
    assert summary.baselines.pooled["test.auroc"] > 0.6
    frame = read_metrics_csv(out / "metrics.csv")
    assert tuple(frame.columns) == COLUMNS and (frame["site"] == "global").any()
    assert (out / "final_model.pt").is_file() and list((out / "plots").glob("*.png"))
    assert _processes_of(out) == []
    assert os.environ.get("FLWR_TELEMETRY_ENABLED") == "0"
