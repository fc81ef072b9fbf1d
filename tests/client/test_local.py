"""fedcare.client.local.SiteTrainer: one site's round, checked against the ledger and references.

A tiny synthetic hospital (written once per session by ``fedcare.simulations.synth``, loaded with
the real loader) is trained for one epoch at a time. Most tests fix the noise multiplier and
account with RDP (milliseconds per ε); the calibration test uses the default PRV accountant
and checks ε against Google's ``dp_accounting`` PLD accountant (tolerance as in
``test_accounting.py``: ``pld - 1e-3 <= prv <= pld + 2 * eps_error + 1e-3``).

``fedcare.client.local.fit`` is replaced by a spy where a test must know whether, or when, training
ran: the spy sees the ledger exactly as training would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import fedcare.client.local as local_module
from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    independent_epsilon,
    prv_eps_error,
)
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig, GradSampleMode
from fedcare.client.ledger import ChargeReceipt, PrivacyLedger
from fedcare.client.local import RoundRequest, RoundResult, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, TrainStats
from fedcare.common import keys
from fedcare.common.errors import ConfigError, PolicyViolation, PrivacyBudgetExceeded, RoundFailed
from fedcare.models import build_model, default_model_for

pytestmark = [
    # Opacus's expected notices for seeded (non-secure) DP-SGD and for ghost clipping.
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TASK = "readmission"
DELTA = 1e-5
BATCH = 32
#: Fixed noise, RDP accounting: fast, and the mechanism is known in advance.
FAST_POLICY = SitePolicy(accountant="rdp")
FAST_DP = DPConfig(target_epsilon=None, noise_multiplier=1.0, accountant="rdp")
#: calibrate_noise stops within this relative slack below the target (its default rtol).
CALIBRATION_RTOL = 0.005


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """One small hospital (every modality, tiny images and gene panel), synthesized once."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("local-site")
    config = SynthConfig(patients_per_site=160, size_skew=0.0, n_genes=12, image_size=16)
    synthesize(root, n_sites=1, seed=11, config=config)
    return load_site(root / "site-0")


def _request(
    *,
    run_id: str = "run-a",
    round: int = 1,
    rounds_planned: int = 1,
    task: str = TASK,
    dp: DPConfig = FAST_DP,
    **train: Any,
) -> RoundRequest:
    settings: dict[str, Any] = {"epochs": 1, "batch_size": BATCH, "lr": 1e-2, "device": "cpu"}
    settings.update(train)
    return RoundRequest(
        run_id=run_id,
        round=round,
        rounds_planned=rounds_planned,
        task=task,
        train=TrainConfig(**settings),
        dp=dp,
    )


def _expected_mechanism(n_train: int, *, sigma: float, epochs: int = 1) -> Mechanism:
    """Poisson rate and steps of ``epochs`` epochs, worked out here rather than by the code."""
    batches = math.ceil(n_train / BATCH)
    return Mechanism(noise_multiplier=sigma, sample_rate=1.0 / batches, steps=epochs * batches)


class FitSpy:
    """Stands in for ``fedcare.client.local.fit``: records each call, then trains or raises."""

    def __init__(self, real: Callable[..., TrainStats], *, error: BaseException | None = None):
        self.real = real
        self.error = error
        self.calls = 0
        self.on_call: Callable[[], None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> TrainStats:
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        if self.error is not None:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.fixture
def fit_spy(monkeypatch: pytest.MonkeyPatch) -> FitSpy:
    spy = FitSpy(local_module.fit)
    monkeypatch.setattr(local_module, "fit", spy)
    return spy


@pytest.fixture
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.sqlite")


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))


def _released(release_dir: Path) -> list[Path]:
    return sorted(release_dir.glob("*.pt")) if release_dir.exists() else []


# ------------------------------------------------------------------ charge before training


def test_dp_round_is_charged_and_committed_before_training(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    seen_during_fit: list[list[ChargeReceipt]] = []
    # A second ledger object = a second SQLite connection: it sees only committed rows.
    observer = PrivacyLedger(ledger.path, create=False)
    key = ledger.cohort_key(site.patient_ids)
    fit_spy.on_call = lambda: seen_during_fit.append(observer.charges(key))
    fit_spy.error = RuntimeError("simulated crash in the middle of training")
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)

    with pytest.raises(RoundFailed, match="simulated crash"):
        trainer.train_round(_request())

    assert fit_spy.calls == 1
    ((during,),) = seen_during_fit
    assert during.status == "charged" and (during.run_id, during.round) == ("run-a", 1)
    (after,) = ledger.charges(ledger.cohort_key(site.patient_ids))
    assert after.status == "failed"
    n_train = trainer.task_data(TASK).n["train"]
    assert after.mechanism == _expected_mechanism(n_train, sigma=1.0)
    # A failed round still counts: the dataset's ε is that of the charged mechanism.
    spent = ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp")
    assert spent > 0
    assert spent == pytest.approx(after.epsilon_after)
    assert _released(trainer.release_dir or Path("-")) == []


def test_a_stop_during_training_leaves_the_charge_to_the_retry(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    """A signal (systemctl stop, Ctrl-C) mid-training released nothing and does not depend
    on the patients: the charge stays ``charged`` and the same request, asked again, reuses
    it instead of paying twice (a failure would be final)."""
    fit_spy.error = KeyboardInterrupt()
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_round(_request())
    (charge,) = ledger.charges(ledger.cohort_key(site.patient_ids))
    assert charge.status == "charged"
    fit_spy.error = None
    trainer.train_round(_request())
    (again,) = ledger.charges(ledger.cohort_key(site.patient_ids))
    assert again.charge_id == charge.charge_id and again.status == "completed"


def test_step_count_mismatch_withholds_the_update_and_keeps_the_charge(
    site: SiteData, ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fit = local_module.fit

    def short_fit(*args: Any, **kwargs: Any) -> TrainStats:
        stats = real_fit(*args, **kwargs)
        return TrainStats(steps=stats.steps - 1, samples=stats.samples, mean_loss=stats.mean_loss)

    monkeypatch.setattr(local_module, "fit", short_fit)
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    with pytest.raises(RoundFailed, match="steps"):
        trainer.train_round(_request())
    (charge,) = ledger.charges(ledger.cohort_key(site.patient_ids))
    assert charge.status == "failed"
    assert _released(trainer.release_dir or Path("-")) == []


# ------------------------------------------------------------------ budget


def test_over_budget_fixed_noise_is_refused_and_nothing_is_charged(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    policy = SitePolicy(accountant="rdp", epsilon_budget=0.05)
    trainer = SiteTrainer(site=site, policy=policy, ledger=ledger)
    with pytest.raises(PrivacyBudgetExceeded, match="nothing was charged"):
        trainer.train_round(_request())
    assert fit_spy.calls == 0
    assert ledger.charges(ledger.cohort_key(site.patient_ids)) == []
    assert ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp") == 0.0


def test_history_that_fills_a_lowered_budget_refuses_a_new_run(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger).train_round(_request())
    spent = ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp")
    assert fit_spy.calls == 1 and spent > 0.5

    # The site lowers its budget below what the dataset has already spent.
    lowered = SitePolicy(accountant="rdp", epsilon_budget=spent / 2)
    trainer = SiteTrainer(site=site, policy=lowered, ledger=ledger)
    calibrated = DPConfig(target_epsilon=8.0, accountant="rdp")
    with pytest.raises(PrivacyBudgetExceeded, match="has spent epsilon=.* so 0 remain"):
        trainer.train_round(_request(run_id="run-b", dp=calibrated))
    assert fit_spy.calls == 1
    assert len(ledger.charges(ledger.cohort_key(site.patient_ids))) == 1
    assert ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp") == spent


# ------------------------------------------------------------------ noise for the whole run


def test_noise_is_calibrated_once_for_the_whole_run_and_history(
    site: SiteData, ledger: PrivacyLedger
) -> None:
    """PRV (the default): run A targets ε=2 over 3 rounds; run B targets 8 under budget 3."""
    rounds, target_a, budget = 3, 2.0, 3.0
    policy = SitePolicy(epsilon_budget=budget)
    trainer = SiteTrainer(site=site, policy=policy, ledger=ledger)
    n_train = trainer.task_data(TASK).n["train"]
    state = None
    results: list[RoundResult] = []
    for r in range(1, rounds + 1):
        request = _request(round=r, rounds_planned=rounds, dp=DPConfig(target_epsilon=target_a))
        result = trainer.train_round(request, state)
        results.append(result)
        state = result.state

    sigma = results[0].mechanism.noise_multiplier if results[0].mechanism else math.nan
    expected = _expected_mechanism(n_train, sigma=sigma)
    assert [r.mechanism for r in results] == [expected] * rounds
    charges = ledger.charges(ledger.cohort_key(site.patient_ids))
    assert [c.mechanism for c in charges] == [expected] * rounds
    assert [c.status for c in charges] == ["completed"] * rounds
    eps = [r.epsilon for r in results]
    assert all(e is not None for e in eps)
    assert eps == sorted(eps)  # type: ignore[type-var]
    # The noise is for the run, not the round: round 1 alone is far below the target.
    assert eps[0] is not None and eps[0] < 0.8 * target_a
    final = eps[-1]
    assert final is not None and (1 - CALIBRATION_RTOL) * target_a <= final <= target_a

    # Run B asks to add more than the site's budget has left: refused, nothing charged.
    with pytest.raises(PrivacyBudgetExceeded, match="nothing was charged"):
        trainer.train_round(_request(run_id="run-b", dp=DPConfig(target_epsilon=8.0)))
    assert len(ledger.charges(ledger.cohort_key(site.patient_ids))) == rounds
    # Run B asking for what is left adds exactly that on top of the history.
    add = 0.9 * (budget - final)
    result_b = trainer.train_round(_request(run_id="run-b", dp=DPConfig(target_epsilon=add)))
    assert result_b.mechanism is not None and result_b.mechanism.noise_multiplier != sigma
    assert result_b.epsilon is not None and result_b.run_epsilon is not None
    assert (1 - CALIBRATION_RTOL) * (final + add) <= result_b.epsilon <= final + add
    assert result_b.run_epsilon == pytest.approx(result_b.epsilon - final)

    history = ledger.history(ledger.cohort_key(site.patient_ids))
    assert len(history) == rounds + 1
    spent = ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA)
    assert spent == pytest.approx(result_b.epsilon)
    reference = independent_epsilon(history, delta=DELTA)
    error = prv_eps_error(history, delta=DELTA)
    assert reference - PLD_DISCRETIZATION <= spent <= reference + 2 * error + PLD_DISCRETIZATION


# ------------------------------------------------------------------ replay


def test_replaying_a_released_round_sends_the_same_weights_and_costs_nothing(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    first = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger).train_round(_request())
    assert not first.replayed and fit_spy.calls == 1
    spent = ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp")

    # A restarted site process (new trainer, same ledger) is asked for the same round again.
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    again = trainer.train_round(_request())
    assert again.replayed
    assert fit_spy.calls == 1
    assert again.state.keys() == first.state.keys()
    assert all(torch.equal(again.state[k], first.state[k]) for k in first.state)
    assert (again.n_train, again.steps, again.mechanism, again.epsilon) == (
        first.n_train,
        first.steps,
        first.mechanism,
        first.epsilon,
    )
    assert len(ledger.charges(ledger.cohort_key(site.patient_ids))) == 1
    assert ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp") == spent

    assert trainer.release_dir is not None
    stored = _released(trainer.release_dir)
    assert len(stored) == 1
    stored[0].unlink()
    with pytest.raises(PolicyViolation, match="no stored copy"):
        trainer.train_round(_request())
    assert fit_spy.calls == 1
    assert ledger.spent(ledger.cohort_key(site.patient_ids), delta=DELTA, accountant="rdp") == spent


def test_two_attempts_at_one_round_keep_only_the_released_one_for_a_resumed_server(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    """Two processes answer one round (the second takes the charge for a retry of a dead
    one): the one that settles first releases, the other's output is withheld and never
    stored, so a resumed server is re-sent exactly what was released, nothing else."""
    slow = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    fast = SiteTrainer(site=site, policy=FAST_POLICY, ledger=PrivacyLedger(ledger.path))
    released: dict[str, RoundResult] = {}

    def the_other_attempt_finishes_first() -> None:
        if fit_spy.calls == 1:  # during the slow attempt's training
            released["fast"] = fast.train_round(_request())

    fit_spy.on_call = the_other_attempt_finishes_first
    with pytest.raises(PolicyViolation, match="already 'completed'"):
        slow.train_round(_request())
    assert fit_spy.calls == 2 and not released["fast"].replayed
    key = ledger.cohort_key(site.patient_ids)
    assert [c.status for c in ledger.charges(key)] == ["completed"]

    again = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger).train_round(_request())
    assert again.replayed and fit_spy.calls == 2
    assert all(torch.equal(again.state[k], released["fast"].state[k]) for k in again.state)


# ------------------------------------------------------------------ policy


REFUSALS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # name: (policy overrides, request overrides, message pattern)
    "task-not-allowed": ({"allowed_tasks": ("malignancy",)}, {}, "does not allow task"),
    "model-not-allowed": ({"allowed_models": ("fusion",)}, {}, "does not allow model"),
    "too-many-epochs": ({"max_local_epochs": 1}, {"epochs": 2}, "at most 1 local epochs"),
    "dp-required": ({}, {"dp": DPConfig(enabled=False)}, "requires differential privacy"),
    "noise-below-floor": ({"min_noise_multiplier": 5.0}, {}, r"noise multiplier >= 5"),
    "delta-mismatch": (
        {},
        {"dp": DPConfig(target_epsilon=None, noise_multiplier=1.0, accountant="rdp", delta=1e-6)},
        "delta",
    ),
    "accountant-mismatch": (
        {},
        {"dp": DPConfig(target_epsilon=None, noise_multiplier=1.0, accountant="prv")},
        "accountant",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_policy_refusals_train_nothing_and_charge_nothing(
    case: str, site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    policy_overrides, request_overrides, pattern = REFUSALS[case]
    policy = SitePolicy(**{"accountant": "rdp", **policy_overrides})
    trainer = SiteTrainer(site=site, policy=policy, ledger=ledger)
    with pytest.raises(PolicyViolation, match=pattern) as info:
        trainer.train_round(_request(**request_overrides))
    assert site.spec.site_id in str(info.value)
    assert fit_spy.calls == 0
    assert ledger.charges(ledger.cohort_key(site.patient_ids)) == []


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    ("task", "mode"),
    [
        (TASK, "bookkeeping"),
        (TASK, "ghost"),
        (TASK, "hooks"),
        ("malignancy", "auto"),
        ("multimodal_outcome", "auto"),
    ],
)
def test_released_weights_have_plain_keys_and_load_into_a_fresh_model(
    task: str, mode: GradSampleMode, site: SiteData, ledger: PrivacyLedger
) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    dp = DPConfig(
        target_epsilon=None, noise_multiplier=1.0, accountant="rdp", grad_sample_mode=mode
    )
    result = trainer.train_round(_request(task=task, dp=dp))
    data = trainer.task_data(task)
    fresh = build_model(default_model_for(data.modalities), input_dims=data.input_dims)
    reference = fresh.state_dict()
    assert not [k for k in result.state if k.startswith("_module.") or "._module." in k]
    assert result.state.keys() == reference.keys()
    for k, v in result.state.items():
        assert v.shape == reference[k].shape and v.dtype == reference[k].dtype
        assert v.device.type == "cpu" and bool(torch.isfinite(v).all())
    fresh.load_state_dict(result.state, strict=True)
    initial = trainer.build_model(task).state_dict()
    assert _distance(result.state, initial) > 0  # it was trained
    assert result.grad_sample_mode in ("bookkeeping", "ghost", "hooks")


# ------------------------------------------------------------------ non-private


@pytest.mark.parametrize("with_ledger", [True, False])
def test_non_private_round_trains_and_charges_nothing(
    with_ledger: bool, site: SiteData, tmp_path: Path, fit_spy: FitSpy
) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite") if with_ledger else None
    policy = SitePolicy(require_dp=False)
    trainer = SiteTrainer(site=site, policy=policy, ledger=ledger)
    result = trainer.train_round(_request(dp=DPConfig(enabled=False)))
    assert fit_spy.calls == 1
    assert (result.mechanism, result.epsilon, result.delta, result.grad_sample_mode) == (
        None,
        None,
        None,
        None,
    )
    assert result.n_train == trainer.task_data(TASK).n["train"]
    assert result.steps == math.ceil(result.n_train / BATCH)
    assert _distance(result.state, trainer.build_model(TASK).state_dict()) > 0
    if ledger is not None:
        assert ledger.summary() == []
        assert _released(tmp_path / "releases") == []


# ------------------------------------------------------------------ proximal term


def _trained_distance(site: SiteData, mu: float, *, lr: float) -> float:
    trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
    initial = trainer.build_model(TASK).state_dict()
    request = _request(dp=DPConfig(enabled=False), epochs=3, lr=lr, proximal_mu=mu)
    return _distance(trainer.train_round(request, initial).state, initial)


def test_a_strong_proximal_term_keeps_weights_near_the_global_model(site: SiteData) -> None:
    lr = 1e-2
    free = _trained_distance(site, 0.0, lr=lr)
    # lr * mu = 0.9: each step pulls 90 % of the way back to the global weights.
    anchored = _trained_distance(site, 90.0, lr=lr)
    assert free > 0
    assert anchored < 0.5 * free


def test_a_huge_proximal_term_keeps_weights_near_the_global_model(site: SiteData) -> None:
    lr = 1e-2
    free = _trained_distance(site, 0.0, lr=lr)
    huge = _trained_distance(site, 1e4, lr=lr)  # lr * mu = 100
    assert huge < 0.5 * free


# ------------------------------------------------------------------ evaluation


def test_evaluate_suppresses_small_splits_and_sends_only_allowed_metrics(
    site: SiteData,
) -> None:
    probe = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
    sizes = probe.task_data(TASK).n
    assert sizes["val"] != sizes["test"], "pick a site whose val and test sizes differ"
    small, large = sorted(("val", "test"), key=lambda s: sizes[s])

    # min_count between the two sizes: the smaller split is withheld whole.
    policy = SitePolicy(require_dp=False, min_count=sizes[large])
    metrics = SiteTrainer(site=site, policy=policy, ledger=None).evaluate(TASK, None)
    assert metrics, "the larger split must still be reported"
    assert not [k for k in metrics if k.startswith(f"{small}.")]
    assert metrics[f"{large}.n"] == sizes[large]
    assert {f"{large}.auroc", f"{large}.loss", f"{large}.brier"} <= metrics.keys()
    assert [k for k in metrics if not keys.is_allowed_metric(k)] == []
    assert all(math.isfinite(v) for v in metrics.values())

    # Default min_count (10): both splits are reported, every name on the allow-list.
    both = probe.evaluate(TASK, None)
    assert {k.split(".")[0] for k in both} == {"val", "test"}
    assert [k for k in both if not keys.is_allowed_metric(k)] == []

    # Above both sizes: nothing at all leaves the site.
    strict = SitePolicy(require_dp=False, min_count=sizes[large] + 1)
    assert SiteTrainer(site=site, policy=strict, ledger=None).evaluate(TASK, None) == {}


# ------------------------------------------ regressions (bugs found in review)


def test_a_failed_round_spends_its_key_and_a_crashed_one_is_retried_for_free(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    """A round that failed after touching the data is not retried under its charge (the
    failure itself may depend on a patient); a round whose process died before its charge
    was settled (status ``charged``) is retried without paying twice."""
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    fit_spy.error = RuntimeError("simulated failure")
    with pytest.raises(RoundFailed, match="marked failed"):
        trainer.train_round(_request())
    fit_spy.error = None
    with pytest.raises(PolicyViolation, match="not retried under the same charge"):
        trainer.train_round(_request())
    assert fit_spy.calls == 1

    # Round 2's charge is written, then the process dies (kill -9): the charge stays open.
    key = ledger.cohort_key(site.patient_ids)
    n_train = trainer.task_data(TASK).n["train"]
    ledger.charge(
        fingerprint=key,
        budget_epsilon=FAST_POLICY.epsilon_budget,
        delta=DELTA,
        accountant="rdp",
        mechanism=_expected_mechanism(n_train, sigma=1.0),
        run_id="run-a",
        round=2,
    )
    spent = ledger.spent(key, delta=DELTA, accountant="rdp")
    result = trainer.train_round(_request(round=2, rounds_planned=2))
    assert not result.replayed and fit_spy.calls == 2
    assert ledger.spent(key, delta=DELTA, accountant="rdp") == spent
    assert [c.status for c in ledger.charges(key)] == ["failed", "completed"]
    # Now released: asking again replays it rather than training a third time.
    assert trainer.train_round(_request(round=2, rounds_planned=2)).replayed
    assert fit_spy.calls == 2


def test_dp_without_a_ledger_is_a_config_error(site: SiteData) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=None)
    with pytest.raises(ConfigError, match="ledger"):
        trainer.train_round(_request())
