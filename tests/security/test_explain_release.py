"""Feature attributions (run config ``explain``) against a curious or malicious centre.

* the explanation is charged: one more Gaussian step in the last evaluation only, planned
  into the run's noise from its first round, so the run still lands within its target ε,
  checked against Google's dp_accounting (not fedcare's accountant);
* a centre cannot get an explanation of any other round's model (asking with ``explain`` at
  round 1 of 2 releases nothing and charges nothing more);
* what leaves the site is the noisy sums only: each release's numbers differ from the exact
  clipped sums by noise of the mechanism's scale, and no number equals a patient's own
  attribution row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from fedcare.client.accounting import Mechanism
from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import DPConfig
from fedcare.client.explain import site_attributions
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig
from fedcare.common import keys
from fedcare.simulations.synth import SynthConfig, synthesize

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TASK = "readmission"
_OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _request(**changes: object) -> RoundRequest:
    base: dict[str, object] = {
        "run_id": "run-x",
        "round": 1,
        "rounds_planned": 2,
        "task": TASK,
        "train": TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        "dp": DPConfig(target_epsilon=3.0, accountant="rdp"),
        "evaluation_rounds": (0, 1, 2),
        "received_sha256": "model-0",
        "config_sha256": "config-0",
        "explain": True,
    }
    base.update(changes)
    return RoundRequest(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explain-sites")
    config = SynthConfig(
        patients_per_site=240, size_skew=0.0, n_genes=12, image_size=16, image_format="npy"
    )
    synthesize(root, n_sites=1, seed=5, config=config)
    return root / "site-0"


def test_only_the_last_evaluation_explains_and_the_run_stays_within_its_target(
    site_folder: Path, tmp_path: Path
) -> None:
    synthetic = load_site(site_folder)
    real = dataclasses.replace(
        synthetic, spec=synthetic.spec.model_copy(update={"simulation": None})
    )  # a deployed site: DP evaluation
    policy = SitePolicy(accountant="rdp", epsilon_budget=10.0, max_run_epsilon=10.0)
    trainer = SiteTrainer(site=real, policy=policy, ledger=PrivacyLedger(tmp_path / "l.sqlite"))
    state = trainer.build_model(TASK).state_dict()
    history: list[Mechanism] = []
    for rnd in (1, 2):
        trained = trainer.train_round(_request(round=rnd), state)
        state = trained.state
        assert trained.mechanism is not None
        history.append(trained.mechanism)
        evaluated = trainer.evaluate_round(_request(round=rnd), state)
        assert evaluated.mechanism is not None
        history.append(evaluated.mechanism)
        sent = [k for k in evaluated.metrics if keys.is_explain_metric(k)]
        sigma = policy.evaluation_noise_multiplier
        if rnd == 1:  # not the last round: no explanation, no extra step
            assert sent == [] and evaluated.mechanism == Mechanism(sigma, 1.0, 1)
        else:
            assert keys.EXPLAIN_N in sent and evaluated.mechanism == Mechanism(sigma, 1.0, 2)
            final = evaluated
    reference = dp_accounting.rdp.RdpAccountant(_OPACUS_ORDERS)
    for m in history:
        event = dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
        )
        reference.compose(dp_accounting.SelfComposedDpEvent(event, m.steps))
    assert final.epsilon == pytest.approx(reference.get_epsilon(policy.delta), rel=1e-3)
    # The first round's calibration planned the explanation's step: the target holds.
    assert final.run_epsilon is not None and final.run_epsilon <= 3.0 + 0.02

    # What left the site: noisy sums, not the exact clipped sums, and no patient's row.
    data = trainer.task_data(TASK)
    net = trainer.build_model(TASK)
    net.load_state_dict(state)
    rows, features, _ = site_attributions(net, real.spec.feature_schema, data)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    exact = (rows / np.maximum(norms, 2.0)).sum(axis=0)
    noisy = np.array([final.metrics[keys.explain_key(j)] for j in range(len(features))])
    std = policy.evaluation_noise_multiplier * np.sqrt(2.0)
    assert np.all(np.abs(noisy - exact) < 6 * std)  # within the mechanism's noise...
    assert np.mean(np.abs(noisy - exact)) > 0.1 * std  # ...and really noised
    for row in rows:
        assert not np.any(np.isclose(noisy[:, None], row[None, :], rtol=0, atol=1e-9))


def test_weights_crafted_to_overflow_cannot_make_the_explanation_fail(
    site_folder: Path, tmp_path: Path
) -> None:
    """A failure only when some patient overflows would be a noise-free answer about that
    patient: a non-finite attribution counts as 0 for everyone, and the release goes out."""
    synthetic = load_site(site_folder)
    real = dataclasses.replace(
        synthetic, spec=synthetic.spec.model_copy(update={"simulation": None})
    )
    policy = SitePolicy(accountant="rdp", epsilon_budget=10.0, max_run_epsilon=10.0)
    trainer = SiteTrainer(site=real, policy=policy, ledger=PrivacyLedger(tmp_path / "l.sqlite"))
    crafted = {k: v * 1e30 if v.is_floating_point() else v
               for k, v in trainer.build_model(TASK).state_dict().items()}  # fmt: skip
    request = _request(round=1, rounds_planned=1, evaluation_rounds=(0, 1))
    result = trainer.evaluate_round(request, crafted)
    sent = {k: v for k, v in result.metrics.items() if keys.is_explain_metric(k)}
    assert keys.EXPLAIN_N in sent
    assert all(np.isfinite(v) for v in sent.values())
