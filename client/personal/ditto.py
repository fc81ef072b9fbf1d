"""Ditto (Li et al. 2021): a personal model pulled toward the global one.

The site keeps a personal model ``v`` (initially the first global model it received). Each
round, after the usual DP-SGD training of the global copy, it trains ``v`` with DP-SGD for
the same local epochs, with the proximal pull ``lambda/2 ||v - w_global||^2`` toward the
weights it received (:class:`fedcare.client.training.ProximalTerm` with ``mu = ditto-lambda``: an
exact proximal step after each noisy step, independent of any patient, so DP holds).

Both trainings use the same noise multiplier and Poisson rate, so the round is one
mechanism with twice the steps (the composition of identical subsampled Gaussian steps is
exactly that): :meth:`Ditto.copies_per_round` is 2, the round's single charge covers both,
and the run's noise is calibrated for the doubled steps. Only the global copy leaves.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcare.client.personal.base import Personalization, State, TrainCopy, register
from fedcare.client.training import ProximalTerm

__all__ = ["Ditto"]


@register
class Ditto(Personalization):
    """``ditto``: a personal model trained beside the global one, pulled toward it."""

    name = "ditto"

    def copies_per_round(self) -> int:
        return 2

    def releases_personal(self, *, round: int, rounds_planned: int) -> bool:
        return round >= 1

    def personal_round(
        self,
        *,
        trained: State,
        received: Mapping[str, torch.Tensor],
        kept: State | None,
        train_copy: TrainCopy,
    ) -> State | None:
        start = dict(received) if kept is None else kept
        pull = ProximalTerm(mu=self.settings.ditto_lambda, global_params=received)
        return train_copy(start, [pull])

    def personal_model(
        self, global_state: Mapping[str, torch.Tensor], kept: State | None
    ) -> State | None:
        return kept
