"""Local fine-tuning after federation: the final global model, tuned on the site's data.

When the site receives the run's final evaluation request (round = rounds planned), it
fine-tunes the global model it received with DP-SGD for ``personal-epochs`` epochs, with
the run's noise multiplier and Poisson rate, and keeps the result. That fine-tune is a
mechanism of its own: it is charged to the ledger (kind ``personalize``) before it runs,
under the run's ceiling, and it is planned into the run's noise from the first training
round (like the planned evaluations), so the run still lands on its target ε. A second
request for the final evaluation gets the stored release, and a fine-tune whose charge
completed is never run again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcare.client.personal.base import Personalization, State, register

__all__ = ["FineTune"]


@register
class FineTune(Personalization):
    """``finetune``: the final global model fine-tuned locally."""

    name = "finetune"

    def finetune_epochs(self) -> int:
        return self.settings.personal_epochs

    def releases_personal(self, *, round: int, rounds_planned: int) -> bool:
        return round == rounds_planned

    def personal_model(
        self, global_state: Mapping[str, torch.Tensor], kept: State | None
    ) -> State | None:
        return kept
