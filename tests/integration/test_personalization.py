"""A real simulation with personal models: fine-tuning after federation, end to end.

fedcare's ServerApp and ClientApp under Flower's simulation engine (the session's simulation
SuperLink), two synthetic hospitals, one round, ``personalization = "finetune"``: each site
fine-tunes the final global model with DP when the final evaluation arrives (a
``personalize`` ledger charge), and ``summary.json`` reports its personalized metrics beside
the global ones; the audit trail verifies and the independent recomputation of ε covers the
fine-tune.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.client.ledger import PrivacyLedger
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.epsilon import recompute_epsilon
from fedcare.simulations.audit.verify import verify_paths
from fedcare.simulations.flower_driver import SharedSuperLink
from fedcare.simulations.runner import run_experiment
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import SynthConfig, synthesize
from tests.conftest import SHARED_SUPERLINK_GROUP

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.xdist_group(SHARED_SUPERLINK_GROUP),
]


def test_finetune_end_to_end_charges_reports_and_audits(
    tmp_path: Path, simulation_superlink: SharedSuperLink
) -> None:
    sites = tmp_path / "sites"
    synthesize(sites, n_sites=2, seed=3, config=SynthConfig(patients_per_site=150))
    scenario = Scenario(
        name="personal",
        sites=2,
        data_root=str(sites),
        baselines=False,
        federation={
            "task": "readmission",
            "num-server-rounds": 1,
            "local-epochs": 1,
            "target-epsilon": 4.0,
            "personalization": "finetune",
            "personal-epochs": 2,
        },
    )
    out = tmp_path / "run"
    run_experiment(scenario, out, superlink=simulation_superlink)
    summary = load_summary(out / "summary.json")
    assert summary.personalization == "finetune"
    assert [s.status for s in summary.sites] == ["completed"] * 2
    for site in summary.sites:
        assert "test.auroc" in site.personal_metrics, site.site_id
        # The fine-tune was planned from round 1: the run, fine-tune included, lands on its
        # target (the site reports the fine-tune's ε even where its evaluation is exact).
        run_epsilon = site.privacy.run_epsilon
        assert run_epsilon is not None and 0.99 * 4.0 <= run_epsilon <= 4.0 + 0.02
    assert not any(k.startswith("personal") for k in summary.global_.final)

    ledgers = sorted(out.rglob("ledger.sqlite"))
    assert len(ledgers) == 2
    for path in ledgers:
        kinds = [c.kind for s in PrivacyLedger(path, create=False).summary() for c in s.charges]
        assert kinds.count("personalize") == 1 and kinds.count("train") == 1

    assert verify_paths([out]).ok
    audit = recompute_epsilon(out)
    assert audit.ok
    assert sorted(r.kind for r in audit.rows) == ["personalize", "personalize", "train", "train"]
