"""Offline RMIA: the relative membership-inference attack with reference models.

Zarifzadeh, Liu, Ng and Shokri, "Low-Cost High-Power Membership Inference Attacks"
(ICML 2024). The loss-threshold attack cannot tell a patient the model fits because it
*saw* them from one who is simply easy; RMIA divides the attacked model's probability of the
patient's true label by how likely that label is under models that never saw the patient:

    LR(x) = Pr(x | θ) / Pr(x),    Pr(x) ≈ ((1 + a) · mean_j Pr(x | θ_j) + 1 - a) / 2

with ``Pr(x | θ) = exp(-loss)`` and ``θ_j`` the reference models. Here the attack is
*offline*: every reference model is trained without any candidate, on a random half of the
**population**, the federation's other sites' patients (each encoded by its own site's
encoders, as in training). The paper's scaling ``a`` (default 0.3) corrects for ``Pr(x)``
being estimated from OUT models only.

RMIA's score compares ``x`` with population samples ``z``: ``Pr_z[LR(x) / LR(z) ≥ γ]``. For
one fixed set ``Z`` that is a non-decreasing function of ``LR(x)``, so it orders the
candidates as ``LR(x)`` does (``γ`` only places the decision threshold) and the ROC curve,
AUC and TPR at any FPR are those of ``LR(x)`` itself, with ties broken finer. The attack
therefore scores candidates by ``log LR(x)``.

Reference models are trained **without DP**, with the run's model, optimizer, learning rate,
batch size, local epochs and rounds: non-private models are cheaper (no per-sample gradients)
and give the sharpest estimate of how hard each patient is, which is what the calibration
needs; they are the attacker's own, so no privacy promise covers them.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from torch.utils.data import Subset

from fedcare.simulations.audit.attacks.base import (
    AttackOptions,
    AttackTarget,
    MembershipAttack,
    register_attack,
)
from fedcare.simulations.audit.attacks.signals import example_losses
from fedcare.simulations.audit.attacks.training import derived_seed, train_site_model

__all__ = ["RMIA", "rmia_log_ratio", "MIN_POPULATION"]

MIN_POPULATION = 10
"""Fewest non-candidate patients that reference models are trained on (halves of it)."""


def rmia_log_ratio(
    target_losses: ArrayLike, reference_losses: ArrayLike, *, offline_a: float = 0.3
) -> np.ndarray:
    """``log LR(x) = log Pr(x | θ) - log Pr(x)`` of offline RMIA, per candidate.

    Parameters
    ----------
    target_losses:
        ``(n,)`` losses under the attacked model.
    reference_losses:
        ``(k, n)`` losses under ``k`` reference models that never saw the candidates.
    offline_a:
        The offline scaling ``a`` in ``Pr(x) = ((1 + a) mean_j Pr(x | θ_j) + 1 - a) / 2``;
        ``a = 1`` is the plain ratio to the reference models' mean.

    Examples
    --------
    >>> lr = rmia_log_ratio([0.1, 0.1], [[0.1, 2.0]], offline_a=1.0)
    >>> round(float(lr[0]), 6), round(float(lr[1]), 6)
    (0.0, 1.9)
    """
    target = np.asarray(target_losses, dtype=np.float64)
    refs = np.atleast_2d(np.asarray(reference_losses, dtype=np.float64))
    if refs.shape[1] != target.shape[0]:
        raise ValueError(
            f"reference losses cover {refs.shape[1]} candidates, the target {target.shape[0]}"
        )
    p_out = np.exp(-refs).mean(axis=0)
    p_x = ((1.0 + offline_a) * p_out + (1.0 - offline_a)) / 2.0
    return -target - np.log(p_x)


@register_attack
class RMIA(MembershipAttack):
    """Offline RMIA with reference models on random halves of the other sites' patients."""

    name = "rmia"

    def applicable(self, target: AttackTarget) -> str | None:
        n = 0 if target.population is None else len(target.population)  # type: ignore[arg-type]
        if n < MIN_POPULATION:
            return (
                f"only {n} patients outside site {target.site_id} to train reference models on "
                f"(at least {MIN_POPULATION} needed); run it on a federation of several sites"
            )
        return None

    def scores(self, target: AttackTarget, options: AttackOptions) -> tuple[np.ndarray, np.ndarray]:
        reason = self.applicable(target)
        if reason is not None:
            raise ValueError(reason)
        assert target.population is not None
        population = target.population
        n_pop = len(population)  # type: ignore[arg-type]
        rng = np.random.default_rng(derived_seed(options.seed, "rmia-halves", target.site_id))
        mechanism = target.mechanism.non_private()
        member_refs: list[np.ndarray] = []
        nonmember_refs: list[np.ndarray] = []
        for j in range(options.reference_models):
            half = rng.permutation(n_pop)[: n_pop // 2]
            model = train_site_model(
                build=target.build_model,
                dataset=Subset(population, half.tolist()),
                mechanism=mechanism,
                kind=target.kind,
                device=target.device,
                seed=derived_seed(options.seed, "rmia-ref", target.site_id, j),
            )
            for refs, data in ((member_refs, target.members), (nonmember_refs, target.nonmembers)):
                refs.append(example_losses(model, data, kind=target.kind, device=target.device))
        return (
            rmia_log_ratio(target.member_losses, member_refs, offline_a=options.offline_a),
            rmia_log_ratio(target.nonmember_losses, nonmember_refs, offline_a=options.offline_a),
        )
