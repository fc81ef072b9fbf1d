"""Attacks of a curious or malicious coordinating centre on what a site decides alone.

Each test is an attack that worked before the site owned these decisions (issue 10):

* noise removal: DP-SGD's noise and Poisson sampling were seeded from the run config's
  ``seed``, run id and round, so the centre could regenerate the noise and subtract it;
* split choice: the run config's ``seed`` decided which patients were in validation/test;
* replay: a stored update was re-sent to any request naming a released run and round,
  whatever model it carried, at no cost;
* budget burning: a run could take a dataset's whole lifetime budget, and a run over
  budget trained pure noise (σ at the calibration's upper bracket) instead of being refused.

The site is real (no ``[simulation]`` table in its ``site.toml``); accounting is RDP here
(milliseconds per ε), the same code path as PRV.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig
from fedcare.common import keys
from fedcare.common.errors import PolicyViolation, PrivacyBudgetExceeded, RoundFailed
from tests.security.conftest import TASK

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

POLICY = SitePolicy(accountant="rdp", epsilon_budget=10.0, max_run_epsilon=10.0)
FIXED_NOISE = DPConfig(target_epsilon=None, noise_multiplier=1.0, accountant="rdp")


def _request(**changes: Any) -> RoundRequest:
    base: dict[str, Any] = {
        "run_id": "run-a",
        "round": 1,
        "rounds_planned": 2,
        "task": TASK,
        "train": TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        "dp": FIXED_NOISE,
        "evaluation_rounds": (),
        "received_sha256": "model-0",
        "config_sha256": "config-0",
    }
    base.update(changes)
    return RoundRequest(**base)


def _trainer(site: SiteData, folder: Path, policy: SitePolicy = POLICY) -> SiteTrainer:
    return SiteTrainer(site=site, policy=policy, ledger=PrivacyLedger(folder / "ledger.sqlite"))


def _initial(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.build_model(TASK).state_dict().items()}


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in state.values()])


# ---------------------------------------------------------------------------- noise removal


def test_everything_the_centre_sends_does_not_determine_the_noise(
    real_site: SiteData, tmp_path: Path
) -> None:
    """The same request (run id, round, seed, weights) at the same real site, twice, on fresh
    ledgers: the releases differ, so nothing the centre knows regenerates the noise."""
    a = _trainer(real_site, tmp_path / "a")
    b = _trainer(real_site, tmp_path / "b")
    start = _initial(a)
    out_a = a.train_round(_request(), start)
    out_b = b.train_round(_request(), start)
    assert out_a.noise == out_b.noise == keys.NOISE_OS_ENTROPY
    gap = (_flat(out_a.state) - _flat(out_b.state)).norm().item()
    assert gap > 1e-3, "two trainings from the same request gave the same update"


def test_only_a_simulated_sites_own_config_makes_noise_reproducible(
    synthetic_site: SiteData, tmp_path: Path
) -> None:
    """The control of the test above: where the site's own site.toml sets a noise seed,
    the same request gives the same update (and the result says the noise was
    reproducible), so the test above can tell determinism apart."""
    assert synthetic_site.spec.simulation is not None
    assert synthetic_site.spec.simulation.noise_seed is not None
    a = _trainer(synthetic_site, tmp_path / "a")
    b = _trainer(synthetic_site, tmp_path / "b")
    start = _initial(a)
    out_a = a.train_round(_request(), start)
    out_b = b.train_round(_request(), start)
    assert out_a.noise == keys.NOISE_REPRODUCIBLE
    assert torch.equal(_flat(out_a.state), _flat(out_b.state))


def test_the_split_is_the_sites_not_the_run_configs(real_site: SiteData) -> None:
    """The run config's ``seed`` reaches SiteTrainer as ``seed``; it must not move a patient
    between train, validation and test."""
    one = SiteTrainer(site=real_site, policy=POLICY, ledger=None, seed=1).task_data(TASK)
    two = SiteTrainer(site=real_site, policy=POLICY, ledger=None, seed=2).task_data(TASK)
    assert one.patient_ids == two.patient_ids


# ---------------------------------------------------------------------------- replay


def test_a_release_is_resent_only_to_the_request_that_earned_it(
    real_site: SiteData, tmp_path: Path
) -> None:
    trainer = _trainer(real_site, tmp_path)
    start = _initial(trainer)
    first = trainer.train_round(_request(), start)
    charges = trainer.ledger.count_charges()  # type: ignore[union-attr]

    again = trainer.train_round(_request(), start)  # a resumed centre: same request
    assert again.replayed and torch.equal(_flat(again.state), _flat(first.state))

    for change in ({"received_sha256": "crafted-model"}, {"config_sha256": "other-config"}):
        with pytest.raises(PolicyViolation, match="only to the request that earned it"):
            trainer.train_round(_request(**change), start)
    assert trainer.ledger.count_charges() == charges  # type: ignore[union-attr]

    other_run = trainer.train_round(_request(run_id="run-b"), start)
    assert not other_run.replayed
    assert not torch.equal(_flat(other_run.state), _flat(first.state))


# ---------------------------------------------------------------------------- budgets


def _target(eps: float) -> DPConfig:
    return DPConfig(target_epsilon=eps, accountant="rdp")


def test_a_run_adds_its_target_to_the_lifetime_epsilon(real_site: SiteData, tmp_path: Path) -> None:
    trainer = _trainer(real_site, tmp_path)
    start = _initial(trainer)
    first = None
    for rnd in (1, 2):
        first = trainer.train_round(_request(round=rnd, dp=_target(3.0)), start)
    assert first is not None and first.epsilon is not None
    assert 0.95 * 3.0 <= first.epsilon <= 3.0 + 1e-6
    second = None
    for rnd in (1, 2):
        second = trainer.train_round(_request(run_id="run-b", round=rnd, dp=_target(3.0)), start)
    assert second is not None and second.epsilon is not None and second.run_epsilon is not None
    # The second run added its own target on top of the first's spend, not min(target, ...).
    assert second.epsilon > first.epsilon + 2.0
    assert second.run_epsilon == pytest.approx(second.epsilon - first.epsilon)


def test_a_run_that_does_not_fit_is_refused_before_any_charge(
    real_site: SiteData, tmp_path: Path
) -> None:
    trainer = _trainer(real_site, tmp_path)
    start = _initial(trainer)
    for rnd in (1, 2):
        trainer.train_round(_request(round=rnd, dp=_target(8.0)), start)
    ledger = trainer.ledger
    assert ledger is not None
    charges = ledger.count_charges()
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        trainer.train_round(_request(run_id="burn", dp=_target(8.0)), start)
    message = str(refused.value)
    assert real_site.spec.site_id in message and "remain" in message and "Fix" in message
    assert ledger.count_charges() == charges, "a refused run left a charge behind"


def test_site_caps_bound_every_run(real_site: SiteData, tmp_path: Path) -> None:
    strict = SitePolicy(accountant="rdp", max_run_epsilon=2.0, max_rounds=3, max_evaluations=2)
    trainer = _trainer(real_site, tmp_path, strict)
    start = _initial(trainer)
    with pytest.raises(PolicyViolation, match="at most epsilon=2"):
        trainer.train_round(_request(dp=_target(5.0)), start)
    with pytest.raises(PolicyViolation, match="at most 3 rounds"):
        trainer.train_round(_request(rounds_planned=10), start)
    with pytest.raises(PolicyViolation, match="at most 2 evaluations"):
        trainer.train_round(_request(evaluation_rounds=(0, 1, 2)), start)
    assert trainer.ledger.count_charges() == 0  # type: ignore[union-attr]


def test_a_run_cannot_outgrow_its_plan(real_site: SiteData, tmp_path: Path) -> None:
    """A centre that calibrated for 2 rounds and then asks for more: a round past the plan is
    refused, and re-planning the same run id for more rounds hits the run's ceiling."""
    trainer = _trainer(real_site, tmp_path)
    start = _initial(trainer)
    for rnd in (1, 2):
        trainer.train_round(_request(round=rnd, dp=_target(3.0)), start)
    with pytest.raises(PolicyViolation, match="outside its plan"):
        trainer.train_round(_request(round=3, dp=_target(3.0)), start)
    ledger = trainer.ledger
    assert ledger is not None
    charges = ledger.count_charges()
    with pytest.raises(PrivacyBudgetExceeded):
        trainer.train_round(_request(round=3, rounds_planned=10, dp=_target(3.0)), start)
    assert ledger.count_charges() == charges


# ---------------------------------------------------------------------------- failure oracle


def _overflowing(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights that overflow to inf/NaN on patients (crafted to make the site fail)."""
    return {k: v * 1e30 if v.is_floating_point() else v for k, v in state.items()}


def test_overflowing_weights_do_not_make_evaluation_fail(
    real_site: SiteData, tmp_path: Path
) -> None:
    """A failure would tell the sender which patients overflow; the release goes out."""
    trainer = _trainer(real_site, tmp_path)
    crafted = _overflowing(_initial(trainer))
    result = trainer.evaluate_round(_request(round=0, evaluation_rounds=(0,)), crafted)
    assert result.mode == keys.EVAL_DP and result.mechanism is not None
    assert all(isinstance(v, float) and v == v for v in result.metrics.values())


def test_overflowing_weights_do_not_make_hooks_training_fail(
    real_site: SiteData, tmp_path: Path
) -> None:
    """Per-sample gradients that overflow are zeroed before clipping, patient by patient."""
    trainer = _trainer(real_site, tmp_path)
    crafted = _overflowing(_initial(trainer))
    dp = DPConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", grad_sample_mode="hooks"
    )
    result = trainer.train_round(_request(dp=dp), crafted)
    assert all(torch.isfinite(t).all() for t in result.state.values() if t.is_floating_point())


def test_a_round_that_failed_after_its_charge_is_not_retried_for_free(
    real_site: SiteData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a round fails can depend on the patients: the failed key is spent."""
    import fedcare.client.local as local_module

    trainer = _trainer(real_site, tmp_path)
    start = _initial(trainer)

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise FloatingPointError("overflow on one patient")

    monkeypatch.setattr(local_module, "fit", crash)
    with pytest.raises(RoundFailed, match="marked failed"):
        trainer.train_round(_request(), start)
    monkeypatch.undo()
    with pytest.raises(PolicyViolation, match="not retried under the same charge"):
        trainer.train_round(_request(received_sha256="another-model"), start)
    assert trainer.ledger.count_charges() == 1  # type: ignore[union-attr]
