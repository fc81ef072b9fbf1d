"""DP-SGD at ε = 8 learns every synthetic task (slow): AUROC against the generator's truth.

One synthetic hospital of 1,000 patients (about 700 train, 300 held out) is written once;
each task is trained through :class:`client.local.SiteTrainer` exactly as a site would
(policy, ledger, PRV accountant, noise calibrated for the whole run at ε = 8, δ = 1e-5) with
the settings in :data:`SETTINGS`, then scored on the held-out patients.

Threshold. The generator knows each task's Bayes AUROC (``synth.json``: the AUROC of the
true probabilities, an upper bound for any model). A model must recover a fraction ``k`` of
the signal above chance::

    held-out AUROC >= 0.5 + k * (bayes_auroc - 0.5)

``k`` per task comes from measurements with these exact settings on synthetic seeds other
than the one used here (see :data:`MIN_FRACTION`); it sits well below the worst seed
measured, because the held-out set is ~300 patients (AUROC standard error about 0.03).
The held-out set is val + test: the settings were fixed on other seeds, so neither split
selected anything here, and pooling halves the variance of the estimate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data.loaders import load_site
from client.data.site import SiteData
from client.ledger import PrivacyLedger
from client.local import RoundRequest, SiteTrainer
from client.policy import SitePolicy
from client.privacy import DPConfig
from client.training import TrainConfig, predict
from models import binary_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

EPSILON = 8.0
DELTA = 1e-5
PATIENTS = 1000
SYNTH_SEED = 2  # not one of the seeds the settings were tuned on

#: task -> (local training, rounds). Tuned at ε = 8 on 1,000-patient synthetic sites.
SETTINGS: dict[str, tuple[TrainConfig, int]] = {}

#: task -> k, the fraction of (Bayes AUROC - 0.5) the DP model must recover.
MIN_FRACTION: dict[str, float] = {}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteData, dict[str, float]]:
    """The site and each task's Bayes AUROC from the generator's manifest."""
    from simulations.synth import MANIFEST_FILENAME, SynthConfig, synthesize

    root = tmp_path_factory.mktemp("utility")
    config = SynthConfig(
        patients_per_site=PATIENTS, size_skew=0.0, image_format="npy", table_format="parquet"
    )
    synthesize(root, n_sites=1, seed=SYNTH_SEED, config=config)
    manifest = json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    bayes = {name: float(task["bayes_auroc"]) for name, task in manifest["tasks"].items()}
    return load_site(root / "site-0"), bayes


def test_every_synthetic_task_is_covered() -> None:
    from simulations.synth import TASKS

    assert set(SETTINGS) == set(TASKS) == set(MIN_FRACTION)


@pytest.mark.parametrize("task", sorted(SETTINGS))
def test_dp_training_at_epsilon_8_recovers_most_of_the_signal(
    task: str, synthetic: tuple[SiteData, dict[str, float]], tmp_path: Path
) -> None:
    site, bayes = synthetic
    train, rounds = SETTINGS[task]
    policy = SitePolicy(epsilon_budget=EPSILON, delta=DELTA, max_local_epochs=train.epochs)
    trainer = SiteTrainer(
        site=site, policy=policy, ledger=PrivacyLedger(tmp_path / "ledger.sqlite"), seed=0
    )
    dp = DPConfig(target_epsilon=EPSILON, delta=DELTA)
    state = None
    for r in range(1, rounds + 1):
        request = RoundRequest(
            run_id=f"utility-{task}", round=r, rounds_planned=rounds, task=task, train=train, dp=dp
        )
        result = trainer.train_round(request, state)
        state = result.state
    assert result.epsilon is not None and result.epsilon <= EPSILON

    data = trainer.task_data(task)
    model = trainer.build_model(task)
    model.load_state_dict(state)
    held_out = [
        predict(model, data.dataset(s), device=torch.device("cpu")) for s in ("val", "test")
    ]
    y = np.concatenate([h[0] for h in held_out])
    p = np.concatenate([h[1] for h in held_out])
    auroc = binary_metrics(y, p)["auroc"]
    floor = 0.5 + MIN_FRACTION[task] * (bayes[task] - 0.5)
    assert math.isfinite(auroc)
    assert auroc >= floor, (
        f"{task}: held-out AUROC {auroc:.3f} < {floor:.3f} "
        f"(Bayes {bayes[task]:.3f}, k = {MIN_FRACTION[task]})"
    )
