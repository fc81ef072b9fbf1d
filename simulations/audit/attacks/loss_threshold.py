"""The loss-threshold attack (Yeom, Giacomelli, Fredrikson and Jha, CSF 2018).

A model fits its training patients better than unseen ones, so a low loss suggests
membership: the score is ``-loss`` under the attacked model. It needs nothing but the model
and the candidates, and is the baseline every calibrated attack should beat.
"""

from __future__ import annotations

import numpy as np

from fedcare.simulations.audit.attacks.base import (
    AttackOptions,
    AttackTarget,
    MembershipAttack,
    register_attack,
)

__all__ = ["LossThreshold", "loss_scores"]


def loss_scores(losses: np.ndarray) -> np.ndarray:
    """Membership scores of the loss-threshold attack: ``-loss``.

    >>> loss_scores(np.array([0.1, 2.0])).tolist()
    [-0.1, -2.0]
    """
    return -np.asarray(losses, dtype=np.float64)


@register_attack
class LossThreshold(MembershipAttack):
    """Score = ``-loss`` of the final global model (Yeom et al. 2018)."""

    name = "loss-threshold"

    def scores(self, target: AttackTarget, options: AttackOptions) -> tuple[np.ndarray, np.ndarray]:
        return loss_scores(target.member_losses), loss_scores(target.nonmember_losses)
