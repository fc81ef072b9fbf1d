"""The timeline model end to end: a simulated federation (fedcare.simulate in process,
Flower's simulation engine) trains the ``infection_timeline`` task under DP-SGD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedcare

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_two_sites_train_the_timeline_model_under_dp(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    fedcare.synthesize(
        sites,
        n_sites=2,
        seed=3,
        config=fedcare.SynthConfig(
            patients_per_site=80,
            n_genes=12,
            image_size=16,
            image_format="npy",
            temporal_signal=True,
        ),
    )
    out = tmp_path / "run"
    result = fedcare.simulate(
        out=out,
        sites=sites,
        in_process=True,
        baselines=False,
        settings={
            "task": "infection_timeline",
            "num-server-rounds": 1,
            "target-epsilon": 4.0,
            "round-timeout": 120,
        },
    )
    record = json.loads(result.record_path.read_text())
    assert record["model"] == "timeline"  # the default for an EHR task reading a timeline
    assert [s.status for s in result.summary.sites] == ["completed"] * 2
    assert max(result.round_metrics) == 1  # round 0: the initial model's evaluation
    spent = list(result.epsilon_spent.values())
    assert all(eps is not None and 0 < eps <= 4.0 + 1e-6 for eps in spent), spent
    assert fedcare.verify_run(result.run_dir).ok
