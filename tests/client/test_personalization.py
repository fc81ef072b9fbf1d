"""Personal models at a site (client/personal/): what each strategy trains, keeps and charges.

One tiny hospital without exact evaluation (so evaluations are DP releases), its DP noise
seeded (``[simulation] noise_seed``, so that every assertion on a trained model holds for the
draw it gets), trained one epoch a round. The strategy tests fix the noise multiplier and
account with RDP (milliseconds per ε); the calibration tests use the default PRV accountant
and check that a run with personal models still lands on its target ε, against Google's
``dp_accounting`` PLD accountant
(tolerance as in ``test_accounting.py``: ``pld - 1e-3 <= prv <= pld + 2 * eps_error + 1e-3``).

``fedcare.client.local.fit`` is wrapped by a spy that records the weights each training starts from.
"""

from __future__ import annotations

import dataclasses
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
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.personal import HEAD_PREFIX, REGISTRY, PersonalSettings, personal_settings
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, TrainStats
from fedcare.common import keys
from fedcare.common.errors import PolicyViolation
from fedcare.common.federation import PERSONALIZATIONS, FederationConfig
from fedcare.common.spec import SimulationSpec
from fedcare.simulations.audit.epsilon import audit_charges, site_log_charges

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TASK = "readmission"
DELTA = 1e-5
BATCH = 32
#: Weak evaluation noise and no small-count suppression, so this small site's noisy splits
#: are never withheld by chance; a large budget, so its fixed-noise runs are never refused.
FAST_POLICY = SitePolicy(
    accountant="rdp",
    evaluation_noise_multiplier=0.5,
    min_count=1,
    epsilon_budget=200,
    max_run_epsilon=200,
)
FAST_DP = DPConfig(target_epsilon=None, noise_multiplier=1.0, accountant="rdp")
#: The site's DP noise seed (its ``[simulation] noise_seed``): see the ``site`` fixture.
NOISE_SEED = 1234
#: calibrate_noise stops within this relative slack below the target (its default rtol).
CALIBRATION_RTOL = 0.005

State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """One small hospital as a real site holds it (no exact evaluation: its evaluations are
    DP releases), except that its DP noise and Poisson sampling are drawn from generators
    seeded by ``[simulation] noise_seed`` rather than the OS's entropy: the assertions on
    trained models (a personal model differs from the global one by more than 1e-4, ...)
    then hold for the one draw the tests get, not merely with high probability."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("personal-site")
    config = SynthConfig(
        patients_per_site=160, size_skew=0.0, n_genes=12, image_size=16, simulated=False
    )
    synthesize(root, n_sites=1, seed=11, config=config)
    real = load_site(root / "site-0")
    seeded = real.spec.model_copy(update={"simulation": SimulationSpec(noise_seed=NOISE_SEED)})
    return dataclasses.replace(real, spec=seeded)


@pytest.fixture()
def ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(tmp_path / "ledger.sqlite")


class FitSpy:
    """Wraps ``fedcare.client.local.fit``: records the weights every training starts from."""

    def __init__(self, real: Callable[..., TrainStats]) -> None:
        self.real = real
        self.starts: list[State] = []
        self.on_call: Callable[[], None] | None = None

    def __call__(self, model: torch.nn.Module, *args: Any, **kwargs: Any) -> TrainStats:
        if self.on_call is not None:
            self.on_call()
        module = getattr(model, "_module", model)
        self.starts.append({k: v.detach().clone() for k, v in module.state_dict().items()})
        return self.real(model, *args, **kwargs)


@pytest.fixture()
def fit_spy(monkeypatch: pytest.MonkeyPatch) -> FitSpy:
    spy = FitSpy(local_module.fit)
    monkeypatch.setattr(local_module, "fit", spy)
    return spy


def _request(
    strategy: str,
    *,
    round: int = 1,
    rounds_planned: int = 2,
    dp: DPConfig = FAST_DP,
    evaluation_rounds: tuple[int, ...] = (0, 1, 2),
    run_id: str = "run-p",
    **personal: Any,
) -> RoundRequest:
    return RoundRequest(
        run_id=run_id,
        round=round,
        rounds_planned=rounds_planned,
        task=TASK,
        train=TrainConfig(epochs=1, batch_size=BATCH, lr=1e-2, device="cpu"),
        dp=dp,
        evaluation_rounds=evaluation_rounds,
        personal=PersonalSettings(strategy=strategy, **personal),
    )


def _expected(n_train: int, *, sigma: float, epochs: int = 1, copies: int = 1) -> Mechanism:
    """Poisson rate and steps worked out here rather than by the code."""
    batches = math.ceil(n_train / BATCH)
    return Mechanism(sigma, 1.0 / batches, copies * epochs * batches)


def _heads(state: State) -> State:
    return {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}


def _equal(a: State, b: State) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _distance(a: State, b: State) -> float:
    return math.sqrt(sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in a))


def _kept(trainer: SiteTrainer, strategy: str, run_id: str = "run-p") -> tuple[int, State]:
    assert trainer.personal_store is not None
    loaded = trainer.personal_store.load(
        dataset=trainer.dataset_key, run_id=run_id, strategy=strategy
    )
    assert loaded is not None, f"no personal state kept for {strategy}"
    return loaded


def _initial(trainer: SiteTrainer) -> State:
    return {k: v.clone() for k, v in trainer.build_model(TASK).state_dict().items()}


def _assert_matches_pld(history: list[Mechanism], reported: float) -> None:
    reference = independent_epsilon(history, delta=DELTA)
    error = prv_eps_error(history, delta=DELTA)
    assert reference - PLD_DISCRETIZATION <= reported <= reference + 2 * error + PLD_DISCRETIZATION


# ------------------------------------------------------------------ the registry


def test_every_run_config_value_has_a_strategy_and_the_run_config_reaches_it() -> None:
    assert set(REGISTRY) == set(PERSONALIZATIONS)
    cfg = FederationConfig.from_run_config(
        {"personalization": "ditto", "personal-epochs": 3, "ditto-lambda": 0.5}
    )
    assert personal_settings(cfg) == PersonalSettings(
        strategy="ditto", personal_epochs=3, ditto_lambda=0.5
    )
    assert personal_settings(FederationConfig()).strategy == "none"


# ------------------------------------------------------------------ fedper


def test_fedper_trains_its_own_head_keeps_it_and_never_sends_it(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    n_train = trainer.task_data(TASK).n["train"]
    g0 = _initial(trainer)
    r1 = trainer.train_round(_request("fedper", round=1), g0)
    assert _equal(fit_spy.starts[0], g0)  # first round: the global head
    assert _equal(_heads(r1.state), _heads(g0))  # the head that leaves is the received one
    body = [k for k in g0 if not k.startswith(HEAD_PREFIX)]
    assert any(not torch.equal(r1.state[k], g0[k]) for k in body)  # the body was trained
    round1, head1 = _kept(trainer, "fedper")
    assert round1 == 1 and set(head1) == set(_heads(g0)) and not _equal(head1, _heads(g0))

    # Round 2: a new global model; the site trains its body with its own head.
    g1 = {k: v + 0.01 for k, v in r1.state.items()}
    r2 = trainer.train_round(_request("fedper", round=2), g1)
    start = fit_spy.starts[1]
    assert _equal(_heads(start), head1)
    assert all(torch.equal(start[k], g1[k]) for k in body)
    assert _equal(_heads(r2.state), _heads(g1))
    round2, head2 = _kept(trainer, "fedper")
    assert round2 == 2 and not _equal(head2, head1)

    # Same training, same charge: one mechanism per round, nothing added.
    key = ledger.cohort_key(site.patient_ids)
    expected = _expected(n_train, sigma=1.0)
    assert [(c.kind, c.mechanism) for c in ledger.charges(key)] == [("train", expected)] * 2

    # The evaluation releases the personalized model (global body, own head) too, as a
    # second Gaussian release under the one evaluation charge.
    result = trainer.evaluate_round(_request("fedper", round=2), r2.state)
    assert result.mechanism == Mechanism(FAST_POLICY.evaluation_noise_multiplier, 1.0, 2)
    assert ledger.charges(key)[-1].mechanism == result.mechanism
    personal = {k for k in result.metrics if keys.is_personal_metric(k)}
    assert "personal.test.n" in personal and "test.n" in result.metrics
    assert all(keys.is_allowed_metric(k) for k in result.metrics)
    assert not any(keys.is_release_metric(k.removeprefix("personal.")) for k in personal)


# ------------------------------------------------------------------ ditto


def test_ditto_trains_a_personal_model_under_the_rounds_one_charge(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    n_train = trainer.task_data(TASK).n["train"]
    g0 = _initial(trainer)
    r1 = trainer.train_round(_request("ditto", round=1), g0)
    assert len(fit_spy.starts) == 2  # the global copy, then the personal model
    assert _equal(fit_spy.starts[0], g0) and _equal(fit_spy.starts[1], g0)  # v starts as g0
    assert r1.mechanism == _expected(n_train, sigma=1.0, copies=2)
    assert r1.steps == _expected(n_train, sigma=1.0).steps  # the global copy's own steps
    _, v1 = _kept(trainer, "ditto")
    assert _distance(v1, r1.state) > 1e-4  # the personal model is not the global one

    g1 = {k: v.clone() for k, v in r1.state.items()}
    r2 = trainer.train_round(_request("ditto", round=2), g1)
    assert _equal(fit_spy.starts[2], g1) and _equal(fit_spy.starts[3], v1)  # v carries on
    round2, v2 = _kept(trainer, "ditto")
    assert round2 == 2 and not _equal(v2, v1) and _distance(v2, r2.state) > 1e-4
    key = ledger.cohort_key(site.patient_ids)
    assert [c.mechanism for c in ledger.charges(key)] == [r1.mechanism, r2.mechanism]

    # A replayed round (a resumed server asking again) trains nothing, v included.
    assert trainer.personal_store is not None
    path = trainer.personal_store.path(
        dataset=trainer.dataset_key, run_id="run-p", strategy="ditto"
    )
    before = path.read_bytes()
    again = trainer.train_round(_request("ditto", round=2), g1)
    assert again.replayed and len(fit_spy.starts) == 4
    assert path.read_bytes() == before
    assert len(ledger.charges(key)) == 2


def test_dittos_lambda_pulls_the_personal_model_toward_the_global_one(
    site: SiteData, tmp_path: Path
) -> None:
    gaps = {}
    for lam in (1e-3, 1e3):
        trainer = SiteTrainer(
            site=site, policy=FAST_POLICY, ledger=PrivacyLedger(tmp_path / f"{lam}.sqlite")
        )
        g0 = _initial(trainer)
        trainer.train_round(_request("ditto", round=1, ditto_lambda=lam), g0)
        gaps[lam] = _distance(_kept(trainer, "ditto")[1], g0)
    assert gaps[1e3] < 0.1 * gaps[1e-3]


# ------------------------------------------------------------------ finetune


def test_finetune_is_charged_once_before_it_runs_and_reused_when_asked_again(
    site: SiteData, ledger: PrivacyLedger, fit_spy: FitSpy
) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    n_train = trainer.task_data(TASK).n["train"]
    key = ledger.cohort_key(site.patient_ids)
    state = _initial(trainer)
    for rnd in (1, 2):
        state = trainer.train_round(_request("finetune", round=rnd, personal_epochs=2), state).state
    # An evaluation before the last round has no personal model: one release.
    early = trainer.evaluate_round(_request("finetune", round=1, personal_epochs=2), state)
    assert early.mechanism is not None and early.mechanism.steps == 1
    assert not any(keys.is_personal_metric(k) for k in early.metrics)
    assert early.personalized is None

    seen: list[list[str]] = []
    fit_spy.on_call = lambda: seen.append([c.kind for c in ledger.charges(key)])
    final = trainer.evaluate_round(_request("finetune", round=2, personal_epochs=2), state)
    assert seen == [["train", "train", "evaluate", "personalize"]]  # charged before it ran
    tuned = final.personalized
    assert tuned is not None and not tuned.replayed
    assert tuned.mechanism == _expected(n_train, sigma=1.0, epochs=2)
    assert [c.kind for c in ledger.charges(key)][-2:] == ["personalize", "evaluate"]
    assert final.mechanism is not None and final.mechanism.steps == 2
    assert "personal.test.n" in final.metrics
    _, model = _kept(trainer, "finetune")
    assert _distance(model, state) > 1e-4

    # Asked again: the stored release, nothing trained or charged.
    charges = len(ledger.charges(key))
    again = trainer.evaluate_round(_request("finetune", round=2, personal_epochs=2), state)
    assert again.replayed and again.metrics == final.metrics
    assert len(ledger.charges(key)) == charges and len(seen) == 1


def test_an_exact_evaluation_site_still_charges_its_fine_tune_once(
    site: SiteData, tmp_path: Path, fit_spy: FitSpy
) -> None:
    """A simulated site that opted into exact metrics: no evaluation charge, but the fine-tune
    is DP training, charged once; a second final evaluation reuses the personal model."""
    simulation = SimulationSpec(noise_seed=NOISE_SEED, exact_evaluation=True)
    spec = site.spec.model_copy(update={"simulation": simulation})
    exact = dataclasses.replace(site, spec=spec)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    trainer = SiteTrainer(site=exact, policy=FAST_POLICY, ledger=ledger)
    state = trainer.train_round(_request("finetune", round=1, rounds_planned=1), _initial(trainer))
    first = trainer.evaluate_round(_request("finetune", round=1, rounds_planned=1), state.state)
    second = trainer.evaluate_round(_request("finetune", round=1, rounds_planned=1), state.state)
    assert first.mode == keys.EVAL_EXACT and first.mechanism is None
    assert first.personalized is not None and not first.personalized.replayed
    assert second.personalized is not None and second.personalized.replayed
    assert first.metrics["personal.test.auroc"] == second.metrics["personal.test.auroc"]
    kinds = [c.kind for c in ledger.charges(ledger.cohort_key(exact.patient_ids))]
    assert kinds == ["train", "personalize"]
    assert len(fit_spy.starts) == 2


def test_personal_epochs_beyond_the_sites_limit_are_refused_before_any_charge(
    site: SiteData, ledger: PrivacyLedger
) -> None:
    trainer = SiteTrainer(site=site, policy=FAST_POLICY, ledger=ledger)
    too_many = FAST_POLICY.max_local_epochs + 1
    with pytest.raises(PolicyViolation, match="personal-epochs"):
        trainer.train_round(_request("finetune", personal_epochs=too_many), _initial(trainer))
    assert ledger.charges(ledger.cohort_key(site.patient_ids)) == []


# ------------------------------------------------------------------ the run's ε


@pytest.mark.parametrize("strategy", ["ditto", "finetune"])
def test_a_run_with_personal_models_still_lands_on_its_target_epsilon(
    strategy: str, site: SiteData, ledger: PrivacyLedger
) -> None:
    """PRV: evaluations after rounds 0, 1, 2 (DP releases, the personalized model's too) and
    two training rounds (Ditto: two copies each) or a fine-tune after the last: the noise
    calibrated at round 1 plans for every one of them, and the run ends on its target."""
    target = 2.0
    dp = DPConfig(target_epsilon=target)
    trainer = SiteTrainer(site=site, policy=SitePolicy(), ledger=ledger)
    key = ledger.cohort_key(site.patient_ids)

    def request(rnd: int) -> RoundRequest:
        return _request(strategy, round=rnd, dp=dp, personal_epochs=2)

    state = _initial(trainer)
    trainer.evaluate_round(request(0), state)
    for rnd in (1, 2):
        state = trainer.train_round(request(rnd), state).state
        last = trainer.evaluate_round(request(rnd), state)
    charges = ledger.charges(key)
    kinds = [c.kind for c in charges]
    if strategy == "ditto":
        assert kinds == ["evaluate", "train", "evaluate", "train", "evaluate"]
        assert [c.mechanism.steps for c in charges if c.kind == "evaluate"] == [1, 2, 2]
    else:
        assert kinds == ["evaluate", "train", "evaluate", "train", "personalize", "evaluate"]
        assert [c.mechanism.steps for c in charges if c.kind == "evaluate"] == [1, 1, 2]
    assert last.epsilon is not None and last.run_epsilon is not None
    spent = ledger.spent(key, delta=DELTA)
    assert spent == pytest.approx(last.epsilon)
    assert (1 - CALIBRATION_RTOL) * target <= spent <= target
    _assert_matches_pld(ledger.history(key), spent)


def test_the_audit_recomputes_epsilon_with_the_fine_tune_in_the_history() -> None:
    """simulations/audit/epsilon.py: a ``personalize`` entry is a charge of its own, with a
    row of its own, recomputed over the whole history by the independent accountant."""

    def entry(kind: str, rnd: int, mechanism: Mechanism, eps: float) -> dict[str, Any]:
        data: dict[str, Any] = {
            "round": rnd,
            "dataset_fingerprint": "fp",
            "mechanism": dataclasses.asdict(mechanism),
            "epsilon": eps,
            "delta": DELTA,
            "accountant": "prv",
            "replayed": False,
        }
        if kind == "train":
            data["dp"] = True
        return {"kind": kind, "writer": "site-0", "run_id": "r", "data": data}

    train, release, tune = Mechanism(1.0, 0.1, 10), Mechanism(5.0, 1.0, 2), Mechanism(1.0, 0.1, 20)
    history = [train, train, release, tune]
    truth = independent_epsilon(history, delta=DELTA)
    entries = [
        entry("train", 1, train, 1.0),
        entry("train", 2, train, 1.5),
        entry("evaluate", 2, release, 1.6),
        entry("personalize", 2, tune, truth),
        entry("personalize", 2, tune, truth),  # logged twice (a replay): charged once
    ]
    rows = audit_charges(site_log_charges(entries), run_ids={"r"})
    assert [(r.round, r.kind) for r in rows] == [(1, "train"), (2, "train"), (2, "personalize")]
    assert rows[-1].recomputed_epsilon == pytest.approx(truth, abs=1e-9)
    assert not rows[-1].flagged
    under = site_log_charges([*entries[:3], entry("personalize", 2, tune, 1.6)])
    assert audit_charges(under)[-1].flagged  # a fine-tune left out of ε is caught


def test_a_site_reports_its_personal_model_only_where_validation_says_it_helps() -> None:
    """Personalization never serves a site a model its own validation patients found worse
    than the global one: the reported personal metrics are then the global model's, marked
    ``personal.own = 0`` (a choice among already-released numbers: no charge)."""
    from fedcare.client.local import keep_better_on_validation

    glob = {"val.auroc": 0.71, "test.auroc": 0.74, "test.n": 40.0, "test.hist.0.0": 3.0}
    better = {"personal.val.auroc": 0.75, "personal.test.auroc": 0.70}
    worse = {"personal.val.auroc": 0.69, "personal.test.auroc": 0.90}
    assert keep_better_on_validation(glob, better) == {**better, keys.M_PERSONAL_OWN: 1.0}
    fell_back = keep_better_on_validation(glob, worse)
    assert fell_back == {
        "personal.val.auroc": 0.71,
        "personal.test.auroc": 0.74,
        "personal.test.n": 40.0,
        keys.M_PERSONAL_OWN: 0.0,
    }
    # without a validation AUROC for both (withheld: small count), the global model stays
    assert keep_better_on_validation({"test.auroc": 0.7}, better)[keys.M_PERSONAL_OWN] == 0.0
    assert all(keys.is_allowed_metric(k) for k in fell_back)
