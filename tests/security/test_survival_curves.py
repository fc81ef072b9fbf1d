"""Survival curves (models/survival_curves.py) against a curious or malicious centre.

* the curves are charged: one more Gaussian step in the last evaluation only, planned into
  the run's noise from its first round, so the run still lands within its target ε, checked
  against Google's dp_accounting (not fedcare's accountant);
* a centre cannot get curves of any other round (round 1 of 2 releases none, charges none);
* what leaves is noisy: the released at-risk counts differ from the site's exact ones (numpy,
  from its own test split) by noise of the mechanism's scale;
* no survival value rests on fewer than ``min_count`` patients: checked on the site's exact
  release against numpy's at-risk counts of its test split (a late interval with a handful
  of patients at risk is withheld, and so is everything after it);
* per-group survival metrics (``models/survival_groups.py``): one step per attribute in
  every evaluation, derived metrics only, each released group's count the site's own;
* weights crafted to overflow cannot make the release fail (a failure would be a noise-free
  answer about the patients who overflow).
"""

from __future__ import annotations

import dataclasses
import math
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
from fedcare.models.survival import interval_index
from fedcare.models.survival_curves import SENSITIVITY, release_from_wire
from fedcare.simulations.synth import SynthConfig, synthesize
from fedcare.simulations.synth.survival import CUTS, TASK

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

_OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _request(**changes: object) -> RoundRequest:
    base: dict[str, object] = {
        "run_id": "run-s",
        "round": 1,
        "rounds_planned": 2,
        "task": TASK,
        "train": TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        "dp": DPConfig(target_epsilon=3.0, accountant="rdp"),
        "evaluation_rounds": (0, 1, 2),
        "received_sha256": "model-0",
        "config_sha256": "config-0",
    }
    base.update(changes)
    return RoundRequest(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("curve-sites")
    config = SynthConfig(
        patients_per_site=400,
        size_skew=0.0,
        n_genes=12,
        image_size=16,
        image_format="npy",
        survival=True,
        groups=True,  # sex and age_band on the survival task: per-group C-index releases
    )
    synthesize(root, n_sites=1, seed=7, config=config)
    return root / "site-0"


def _trainer(site_folder: Path, tmp_path: Path, *, deployed: bool) -> SiteTrainer:
    site = load_site(site_folder)
    if deployed:  # a real site: DP evaluation
        site = dataclasses.replace(site, spec=site.spec.model_copy(update={"simulation": None}))
    policy = SitePolicy(accountant="rdp", epsilon_budget=10.0, max_run_epsilon=10.0)
    return SiteTrainer(site=site, policy=policy, ledger=PrivacyLedger(tmp_path / "l.sqlite"))


def _test_split(trainer: SiteTrainer) -> tuple[np.ndarray, np.ndarray]:
    """``(interval, event)`` of the site's test patients, straight from its dataset."""
    y = trainer.task_data(TASK).test.y.numpy()  # type: ignore[attr-defined]
    k = interval_index(y[:, 0], CUTS)
    return k, ((y[:, 1] > 0.5) & (k < len(CUTS))).astype(int)


def test_only_the_last_evaluation_releases_curves_and_the_run_stays_within_its_target(
    site_folder: Path, tmp_path: Path
) -> None:
    trainer = _trainer(site_folder, tmp_path, deployed=True)
    policy = trainer.policy
    sigma = policy.evaluation_noise_multiplier
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
        sent = [k for k in evaluated.metrics if keys.is_curve_metric(k)]
        groups = {k for k in evaluated.metrics if keys.is_group_metric(k)}
        # Every evaluation: the split histograms (1 step) and one per group attribute (2),
        # charged whether or not a group's noisy count clears min_count.
        assert {k.rsplit(".", 1)[1] for k in groups} <= {"n", "c_index", "td_auc"}
        if rnd == 1:  # not the last round: no curves, no extra step
            assert sent == [] and evaluated.mechanism == Mechanism(sigma, 1.0, 3)
        else:  # the last round: the curves' step is charged whether or not they are sent
            # (sent unless withheld whole: the first interval's noisy count below min_count)
            assert evaluated.mechanism == Mechanism(sigma, 1.0, 4)
            final = evaluated
    reference = dp_accounting.rdp.RdpAccountant(_OPACUS_ORDERS)
    for m in history:
        event = dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
        )
        reference.compose(dp_accounting.SelfComposedDpEvent(event, m.steps))
    assert final.epsilon == pytest.approx(reference.get_epsilon(policy.delta), rel=1e-3)
    # The first round's calibration planned the curves' step: the target holds.
    assert final.run_epsilon is not None and final.run_epsilon <= 3.0 + 0.02

    # What left the site: noisy counts, not the exact ones. (Under DP the site withholds the
    # whole curve when the first interval's noisy at-risk count falls below min_count: a few
    # per cent of draws at this test split's size; then nothing of it left.)
    if not any(keys.is_curve_metric(k) for k in final.metrics):
        return
    rel = release_from_wire(final.metrics, cuts=CUTS)
    k, _ = _test_split(trainer)
    exact = np.array([(k >= j).sum() for j in range(len(rel.at_risk))], dtype=float)
    noisy = np.array(rel.at_risk)
    # r_j sums the noisy cells of intervals j..K (two each): sd sigma * sqrt(2) * sqrt(cells)
    cells = np.array([2 * (len(CUTS) + 1 - j) for j in range(len(rel.at_risk))])
    std = sigma * SENSITIVITY * np.sqrt(cells)
    assert np.all(np.abs(noisy - exact) < 6 * std)
    assert np.all(noisy != exact)  # really noised
    assert not np.any(np.isclose(noisy, np.round(noisy)) & (noisy == exact))


def test_no_survival_value_rests_on_fewer_than_min_count_patients_at_risk(
    site_folder: Path, tmp_path: Path
) -> None:
    trainer = _trainer(site_folder, tmp_path, deployed=False)  # exact: the counts are exact
    state = trainer.build_model(TASK).state_dict()
    request = _request(round=1, rounds_planned=1, evaluation_rounds=(0, 1))
    result = trainer.evaluate_round(request, state)
    assert result.mode == keys.EVAL_EXACT
    rel = release_from_wire(result.metrics, cuts=CUTS)
    k, event = _test_split(trainer)
    at_risk = np.array([(k >= j).sum() for j in range(len(CUTS))])
    min_count = trainer.policy.min_count
    released = len(rel.at_risk)
    np.testing.assert_array_equal(rel.at_risk, at_risk[:released])
    np.testing.assert_array_equal(rel.events, [(event[k == j]).sum() for j in range(released)])
    assert np.all(at_risk[:released] >= min_count)
    if released < len(CUTS):  # the first withheld interval has too few at risk
        assert at_risk[released] < min_count
    # Per-group (exact mode): each released sex group's count is the site's own count of its
    # test patients (pandas, from the EHR table), at least min_count.
    ehr = trainer.site.ehr
    assert ehr is not None
    test_ids = trainer.task_data(TASK).patient_ids["test"]
    labels = trainer.site.spec.feature_schema.group_labels("sex")
    sexes = ehr["sex"].reindex(test_ids)
    for g, label in enumerate(labels[:-1]):
        key = f"{keys.group_prefix('test', 'sex', g)}.n"
        if key in result.metrics:
            assert result.metrics[key] == (sexes == label).sum() >= min_count
    # Make the point on this very site: with a higher min-count the sparse late intervals
    # (a handful of patients followed that long) are withheld, and only they.
    higher = int(at_risk[-1]) + 1
    strict = SiteTrainer(
        site=trainer.site,
        policy=trainer.policy.model_copy(update={"min_count": higher}),
        ledger=PrivacyLedger(tmp_path / "strict.sqlite"),
    )
    shorter = release_from_wire(strict.evaluate_round(request, state).metrics, cuts=CUTS)
    assert len(shorter.at_risk) < len(CUTS)
    assert at_risk[len(shorter.at_risk)] < higher
    assert all(r >= higher for r in shorter.at_risk)


def test_weights_crafted_to_overflow_cannot_make_the_curve_release_fail(
    site_folder: Path, tmp_path: Path
) -> None:
    trainer = _trainer(site_folder, tmp_path, deployed=True)
    crafted = {k: v * 1e30 if v.is_floating_point() else v
               for k, v in trainer.build_model(TASK).state_dict().items()}  # fmt: skip
    request = _request(round=1, rounds_planned=1, evaluation_rounds=(0, 1))
    result = trainer.evaluate_round(request, crafted)
    assert result.mechanism is not None  # evaluated and charged, not failed
    # Everything released is finite. The curve may be withheld whole (its first interval's
    # noisy at-risk count below min_count: a few per cent of DP draws), never failed.
    assert all(math.isfinite(float(v)) for v in result.metrics.values())  # type: ignore[arg-type]
    if any(keys.is_curve_metric(k) for k in result.metrics):
        rel = release_from_wire(result.metrics, cuts=CUTS)
        values = [*rel.at_risk, *rel.events, *rel.predicted]
        assert all(math.isfinite(v) for v in values)
