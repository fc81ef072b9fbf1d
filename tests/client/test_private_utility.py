"""DP-SGD at ε = 8 learns every synthetic task (slow): AUROC against the generator's truth.

One synthetic hospital of 1,000 patients (about 700 train, 300 held out) is written once;
each task is trained through :class:`fedcare.client.local.SiteTrainer` exactly as a site would
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

from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, predict
from fedcare.models import binary_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

EPSILON = 8.0
DELTA = 1e-5
PATIENTS = 1000
SYNTH_SEED = 2  # not one of the seeds the settings were tuned on


def _adam(lr: float) -> TrainConfig:
    return TrainConfig(epochs=5, batch_size=256, lr=lr, optimizer="adam", device="cpu")


#: task -> (local training, rounds): Adam, 5 local epochs of Poisson batches of expected size
#: 256 (q = 1/3 at ~700 train patients), 2 rounds, the noise calibrated once for all 30 steps
#: (σ ≈ 1.36, C = 1). Tuned at ε = 8 on 1,000-patient sites of synthetic seeds 3-5 from the
#: models' default hyper-parameters; only the learning rate differs by task (the fusion model
#: needs a larger one: at 0.01-0.02 it stalls at AUROC 0.65).
SETTINGS: dict[str, tuple[TrainConfig, int]] = {
    "readmission": (_adam(0.02), 2),
    "malignancy": (_adam(0.02), 2),
    "drug_response": (_adam(0.01), 2),
    "multimodal_outcome": (_adam(0.05), 2),
}

#: task -> k, the fraction of (Bayes AUROC - 0.5) the DP model must recover. Measured k with
#: exactly this test's procedure on synthetic seeds 2 and 6-10 (this file uses seed 2), and
#: the worst of seeds 3-5 (tuning seeds):
#:
#: ==================  ===========  =========  ==========  ===================
#: task                k mean       k range    k, seed 2   k threshold (margin
#:                     (6 seeds)    (9 seeds)              at seed 2, AUROC)
#: ==================  ===========  =========  ==========  ===================
#: readmission         0.98         0.89-1.04  0.97        0.75 (0.08)
#: malignancy          0.97         0.86-1.02  1.00        0.75 (0.08)
#: drug_response       0.81         0.60-0.90  0.81        0.50 (0.13)
#: multimodal_outcome  0.68         0.45-0.74  0.55        0.40 (0.06)
#: ==================  ===========  =========  ==========  ===================
#:
#: Each threshold sits below the worst seed measured, so a different platform's arithmetic
#: (or a harmless change of random draws) does not flip the test, while a regression to the
#: old multimodal settings (k 0.24-0.46) or an untrained model (k ~ 0) fails it.
MIN_FRACTION: dict[str, float] = {
    "readmission": 0.75,
    "malignancy": 0.75,
    "drug_response": 0.50,
    "multimodal_outcome": 0.40,
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[SiteData, dict[str, float]]:
    """The site and each task's Bayes AUROC from the generator's manifest."""
    from fedcare.simulations.synth import MANIFEST_FILENAME, SynthConfig, synthesize

    root = tmp_path_factory.mktemp("utility")
    config = SynthConfig(
        patients_per_site=PATIENTS, size_skew=0.0, image_format="npy", table_format="parquet"
    )
    synthesize(root, n_sites=1, seed=SYNTH_SEED, config=config)
    manifest = json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    bayes = {name: float(task["bayes_auroc"]) for name, task in manifest["tasks"].items()}
    return load_site(root / "site-0"), bayes


def test_every_synthetic_task_is_covered() -> None:
    from fedcare.simulations.synth import TASKS

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
    assert state is not None and result.epsilon is not None
    assert (1 - 0.01) * EPSILON <= result.epsilon <= EPSILON

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
