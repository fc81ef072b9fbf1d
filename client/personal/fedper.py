"""FedPer / FedRep-style personalization: a shared body and a head of the site's own.

Every model in :mod:`models` names its output layer ``head``. Each round the site trains
the received global body together with **its own head** (the global head in its first
round), with DP-SGD exactly as a plain round (same mechanism, same charge: nothing is
added to the plan). The body goes back to the federation; the head stays: the update that
leaves carries the *received* head unchanged, so the centre never sees the site's head,
and the trained head is kept in the site's state folder.

The personal model is the current global body with the site's head; its metrics are
released beside the global model's after every evaluation once the site has a head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcare.client.personal.base import HEAD_PREFIX, Personalization, State, TrainCopy, register

__all__ = ["FedPer"]


def _with_head(state: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]) -> State:
    out = dict(state)
    out.update({k: v for k, v in head.items() if k.startswith(HEAD_PREFIX)})
    return out


@register
class FedPer(Personalization):
    """``fedper``: global body, the site's own head."""

    name = "fedper"

    def releases_personal(self, *, round: int, rounds_planned: int) -> bool:
        return round >= 1  # after the site's first training round it has a head

    def start(self, received: Mapping[str, torch.Tensor], kept: State | None) -> State:
        return dict(received) if kept is None else _with_head(received, kept)

    def outgoing(self, trained: State, received: Mapping[str, torch.Tensor]) -> State:
        return _with_head(trained, received)  # the site's head never leaves

    def personal_round(
        self,
        *,
        trained: State,
        received: Mapping[str, torch.Tensor],
        kept: State | None,
        train_copy: TrainCopy,
    ) -> State | None:
        return {k: v for k, v in trained.items() if k.startswith(HEAD_PREFIX)}

    def personal_model(
        self, global_state: Mapping[str, torch.Tensor], kept: State | None
    ) -> State | None:
        return None if kept is None else _with_head(global_state, kept)
