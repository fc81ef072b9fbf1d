"""The attacks on real models trained by the library: they separate members from held-out
patients on a deliberately overfit non-private model, and stay within what DP allows on a
private one.

The data: three synthetic hospitals, the ``drug_response`` task (genomics, 100 genes, about
84 training and 44 held-out patients at ``site-0``): many features for few patients, so a
model trained without DP memorises. Margins, from 6 runs (synthetic seeds 0-2 x model seeds
0-1, same settings): non-private loss-threshold AUC 0.67-0.75, RMIA AUC 0.72-0.80, canary
ε lower bound 1.2-2.0; at ε = 1 the AUCs were 0.41-0.60 and the canary bound 0-0.03. The
assertions below leave a margin of about two standard errors under the measured values.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
from torch.utils.data import ConcatDataset, Dataset

from fedcare.models.tasks import task_definition
from fedcare.simulations.audit.attacks import (
    AttackOptions,
    AttackTarget,
    CanaryOptions,
    SiteMechanism,
    attack_result,
    canary_audit,
    get_attack,
    train_site_model,
)
from fedcare.simulations.audit.findings import AttackResult, CanaryAudit
from tests.simulations.audit._attack_fixtures import (
    CPU,
    DELTA,
    MODEL,
    dp_mechanism,
    factory,
    hanley_mcneil_se,
    plain_mechanism,
    target_for,
    tiny_federation,
)

SITE = "site-0"
DP_EPSILON = 1.0
EPOCHS = 30
LR = 2e-3


@pytest.fixture(scope="module")
def datas(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return tiny_federation(tmp_path_factory.mktemp("attack-models") / "sites", seed=0)


def _attack_all(target: AttackTarget) -> dict[str, AttackResult]:
    out = {}
    for name in ("loss-threshold", "rmia"):
        members, nonmembers = get_attack(name).scores(target, AttackOptions(seed=0))
        out[name] = attack_result(
            attack=name, site_id=target.site_id, member_scores=members, nonmember_scores=nonmembers
        )
    return out


def _canaries(datas: dict, target: AttackTarget, claimed: float | None) -> CanaryAudit:
    others: list[Dataset[Any]] = [
        ConcatDataset([d.train, d.val, d.test]) for s, d in datas.items() if s != SITE
    ]
    return canary_audit(
        target,
        canary_pool=ConcatDataset([target.nonmembers, *others]),
        claimed_epsilon=claimed,
        delta=DELTA,
        options=CanaryOptions(seed=0),
    )


def _train(datas: dict, mechanism: SiteMechanism) -> AttackTarget:
    data = datas[SITE]
    kind = task_definition(data.task, model=MODEL).kind
    model = train_site_model(
        build=factory(data), dataset=data.train, mechanism=mechanism, kind=kind, device=CPU, seed=0
    )
    return target_for(datas, SITE, model, mechanism)


def test_attacks_separate_members_of_an_overfit_non_private_model(datas: dict) -> None:
    target = _train(datas, plain_mechanism(epochs=EPOCHS, lr=LR))
    assert target.member_losses.mean() < 0.2 * target.nonmember_losses.mean()  # it overfits
    results = _attack_all(target)
    lt, rmia = results["loss-threshold"], results["rmia"]
    assert lt.auc > 0.60, lt.auc
    assert rmia.auc > 0.65, rmia.auc
    for r in results.values():  # significant: two standard errors above chance
        assert r.auc - 2 * hanley_mcneil_se(r.auc, r.n_members, r.n_nonmembers) > 0.5
    audit = _canaries(datas, target, claimed=None)
    assert audit.claimed_epsilon is None and audit.below_claim is None
    assert audit.n_guesses == 2 * (audit.n_canaries // 10)
    assert audit.epsilon_lower_bound > 0.5, audit


def test_attacks_on_a_dp_model_stay_within_the_dp_bound(datas: dict) -> None:
    """ε-DP bounds every membership test: TPR <= e^ε FPR + δ, hence AUC <= e^ε / (1 + e^ε).

    The split of each patient into train or held-out is a fixed hash of their id, i.e. an
    independent coin per patient, so the attack's ROC over the site's patients is the DP
    membership game's, up to sampling error, which the margins allow for: three standard
    errors on the AUC (Hanley-McNeil), and for TPR at an empirical FPR of at most 1% the
    95% Clopper-Pearson upper end of the true FPR plus three binomial standard errors.
    """
    mechanism, claimed = dp_mechanism(
        len(datas[SITE].train), target_epsilon=DP_EPSILON, epochs=EPOCHS, lr=LR
    )
    assert claimed <= DP_EPSILON + 1e-6
    target = _train(datas, mechanism)
    ratio = math.exp(claimed)
    for r in _attack_all(target).values():
        auc_bound = ratio / (1 + ratio)
        assert r.auc <= auc_bound + 3 * hanley_mcneil_se(auc_bound, r.n_members, r.n_nonmembers)
        fpr_upper = 1 - 0.05 ** (1 / r.n_nonmembers)  # no false positive seen among n
        k_fp = math.floor(0.01 * r.n_nonmembers)
        assert k_fp == 0  # so the 1% point is a zero-false-positive threshold
        tpr_bound = min(1.0, ratio * fpr_upper + DELTA)
        sampling = 3 * math.sqrt(tpr_bound * (1 - tpr_bound) / r.n_members)
        assert r.tpr_at_1pct_fpr <= tpr_bound + sampling
        assert r.tpr_at_0_1pct_fpr <= tpr_bound + sampling
    audit = _canaries(datas, target, claimed=claimed)
    assert audit.claimed_epsilon == claimed
    assert audit.below_claim is True
    assert audit.epsilon_lower_bound < claimed


def test_canary_audit_refutes_a_mechanism_that_adds_too_little_noise(datas: dict) -> None:
    """A site that claims ε = 0.5 but trains with σ = 0.01 is caught by the canary audit.

    Measured on the 3 synthetic seeds: bounds 1.24-1.67 for this broken mechanism.
    """
    mechanism, claimed = dp_mechanism(
        len(datas[SITE].train), target_epsilon=0.5, epochs=EPOCHS, lr=1e-2
    )
    assert mechanism.plans is not None
    broken = replace(
        mechanism, plans=tuple(replace(p, noise_multiplier=0.01) for p in mechanism.plans)
    )
    audit = _canaries(datas, _train(datas, broken), claimed=claimed)
    assert audit.epsilon_lower_bound > claimed, audit
    assert audit.below_claim is False
