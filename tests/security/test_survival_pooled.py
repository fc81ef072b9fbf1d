"""The survival histograms a site sends for the pooled C-index (models/survival_pooled.py),
against a curious or malicious centre.

* no extra charge is needed and none is taken: the histogram is the noisy output of the
  evaluation's first Gaussian step (its own metrics are computed from it), so the last
  evaluation's mechanism is the same number of steps as before, and the run lands within its
  target ε, checked against Google's dp_accounting (not fedcare's accountant);
* what leaves is noisy: every cell is on the noise grid, the counts per (interval, event)
  differ from the site's exact ones (numpy, from its own test split) by noise of the
  mechanism's scale, never by more than ten standard deviations;
* a planted patient's time and id appear in no reply (tests/security/test_survival_replies.py
  searches every number of the reply, the histogram's included);
* a split withheld for its small count sends no histogram, and the server refuses a reply
  whose histogram is malformed or oversized (tests/models/test_survival_pooled.py).
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
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig
from fedcare.common import keys
from fedcare.models.evaluation import NOISE_GRID
from fedcare.models.survival import interval_index
from fedcare.models.survival_pooled import histograms_from_wire
from fedcare.simulations.synth import SynthConfig, synthesize
from fedcare.simulations.synth.survival import CUTS, TASK

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

_OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
TARGET = 8.0


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pooled-sites")
    config = SynthConfig(
        patients_per_site=400, size_skew=0.0, n_genes=12, image_size=16, image_format="npy",
        survival=True,
    )  # fmt: skip
    synthesize(root, n_sites=1, seed=11, config=config)
    return root / "site-0"


def test_the_histogram_costs_no_extra_step_is_noisy_and_the_run_stays_within_target(
    site_folder: Path, tmp_path: Path
) -> None:
    site = load_site(site_folder)  # a real site: DP evaluation
    site = dataclasses.replace(site, spec=site.spec.model_copy(update={"simulation": None}))
    # σ 1.5 for the evaluation (5 by default): the test split's noisy count then clears
    # min_count on all but ~1e-5 of draws, so the noise checks below run (a withheld split
    # would be checked too: no histogram of it).
    policy = SitePolicy(
        accountant="rdp",
        epsilon_budget=10.0,
        max_run_epsilon=10.0,
        evaluation_noise_multiplier=1.5,
    )
    trainer = SiteTrainer(site=site, policy=policy, ledger=PrivacyLedger(tmp_path / "l.sqlite"))
    sigma = policy.evaluation_noise_multiplier
    request = RoundRequest(
        run_id="run-p", round=1, rounds_planned=1, task=TASK,
        train=TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        dp=DPConfig(target_epsilon=TARGET, accountant="rdp"), evaluation_rounds=(0, 1),
        received_sha256="model-0", config_sha256="config-0",
    )  # fmt: skip
    trained = trainer.train_round(request, trainer.build_model(TASK).state_dict())
    evaluated = trainer.evaluate_round(request, trained.state)
    assert trained.mechanism is not None and evaluated.mechanism is not None
    # The split histograms (1 step, the one the histograms are) and the last evaluation's
    # survival curves (1): no step for sending the histograms.
    assert evaluated.mechanism == Mechanism(sigma, 1.0, 2)
    reference = dp_accounting.rdp.RdpAccountant(_OPACUS_ORDERS)
    for m in (trained.mechanism, evaluated.mechanism):
        event = dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
        )
        reference.compose(dp_accounting.SelfComposedDpEvent(event, m.steps))
    assert evaluated.epsilon == pytest.approx(reference.get_epsilon(policy.delta), rel=1e-3)
    assert evaluated.run_epsilon is not None and evaluated.run_epsilon <= TARGET + 0.02

    hists = histograms_from_wire(
        evaluated.metrics,
        intervals=len(CUTS),
        noise_multiplier=evaluated.mechanism.noise_multiplier,
    )
    released = {s for s in keys.EVAL_SPLITS if f"{s}.n" in evaluated.metrics}
    assert set(hists) == released  # a histogram for every released split, and only those
    if "test" not in hists:  # withheld whole (noisy n below min_count): nothing of it left
        return
    hist = hists["test"]
    grid = hist.counts / NOISE_GRID
    np.testing.assert_array_equal(grid, np.round(grid))
    # The exact counts per (interval, event), straight from the site's test split (numpy).
    y = trainer.task_data(TASK).test.y.numpy()  # type: ignore[attr-defined]
    k, e = interval_index(y[:, 0], CUTS), (y[:, 1] > 0.5).astype(int)
    exact, _ = np.histogramdd(
        np.column_stack([k, e]), bins=(len(CUTS) + 1, 2), range=((0, len(CUTS) + 1), (0, 2))
    )
    noisy = hist.counts.sum(axis=0)  # each sums B noisy cells: sd sigma * sqrt(B)
    std = sigma * np.sqrt(hist.bins)
    assert np.all(np.abs(noisy - exact) < 10 * std)
    assert np.any(noisy != exact)  # really noised
    assert np.any(hist.counts != np.round(hist.counts))
    # The site's own metrics are those of this very histogram (post-processing of one step).
    assert evaluated.metrics["test.n"] == round(hist.n)
    if "test.c_index" in evaluated.metrics:
        assert evaluated.metrics["test.c_index"] == pytest.approx(hist.metrics()["c_index"])


def test_a_real_site_s_non_private_run_sends_no_exact_histogram(
    site_folder: Path, tmp_path: Path
) -> None:
    """A real site that allows non-private runs releases its exact survival metrics in one
    (its policy's choice), but never the exact (risk bin, interval, event) counts: at 100
    risk bins many cells are single patients. Only a simulated site that opted into exact
    evaluation sends them."""
    real = load_site(site_folder)
    real = dataclasses.replace(real, spec=real.spec.model_copy(update={"simulation": None}))
    policy = SitePolicy(require_dp=False, epsilon_budget=10.0, max_run_epsilon=10.0)
    request = RoundRequest(
        run_id="run-np", round=1, rounds_planned=1, task=TASK,
        train=TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        dp=DPConfig(enabled=False), evaluation_rounds=(0, 1),
        received_sha256="model-0", config_sha256="config-0",
    )  # fmt: skip
    for site, sends in ((real, False), (load_site(site_folder), True)):
        trainer = SiteTrainer(site=site, policy=policy, ledger=PrivacyLedger(tmp_path / "n.sqlite"))
        result = trainer.evaluate_round(request, trainer.build_model(TASK).state_dict())
        assert result.mode == keys.EVAL_EXACT and "test.c_index" in result.metrics
        assert any(keys.is_surv_hist_metric(k) for k in result.metrics) is sends
