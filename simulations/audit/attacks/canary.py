"""One-run canary audit of a site's training mechanism (Steinke, Nasr and Jagielski 2023).

The audit, at one site:

1. **Canaries.** ``m`` patients who are *not* in the site's training split (its held-out
   patients and the other sites' patients, each encoded by its own site's encoders), copied
   with their label **flipped**: a model only predicts such a label if it memorised that very
   record, so the copies are strongly memorisable, and every modality has them.
2. **One training run.** Each canary joins the site's training split independently with
   probability 1/2 (coins from a seeded generator). One model is trained on that set with the
   site's mechanism from the run
   (:class:`~fedcare.simulations.audit.attacks.training.SiteMechanism`):
   for a DP run the same DP-SGD noise multiplier, sampling rate, steps per round, clipping
   norm, optimizer and learning rate; for a non-private run the same plain training (rounds x
   local epochs).
3. **Guesses.** Each canary is scored by ``-loss`` under the trained model; the ``k`` highest
   are guessed "in", the ``k`` lowest "out", the rest abstained on (ties broken by canary
   order, which does not depend on the coins). ``k`` is fixed in advance (default ``m // 10``),
   so no correction for choosing it is needed.
4. **Bound.** ``v`` correct out of ``r = 2k`` guesses gives, at confidence ``1 - β``, the ε
   lower bound of :func:`~fedcare.simulations.audit.attacks.canary_bound.epsilon_lower_bound`, with
   the site's δ (the theorem's approximate-DP form).

A lower bound above the claimed ε would prove the claim false (with probability ``1 - β``);
one below it is consistent with the claim. An input-space (black-box) audit like this one is
far from tight for DP-SGD; its job is to catch broken privacy, and to show that a model
trained without DP memorises individual records measurably.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from fedcare.common.errors import ConfigError
from fedcare.simulations.audit.attacks.base import AttackTarget
from fedcare.simulations.audit.attacks.canary_bound import epsilon_lower_bound
from fedcare.simulations.audit.attacks.signals import example_losses
from fedcare.simulations.audit.attacks.training import derived_seed, train_site_model
from fedcare.simulations.audit.findings import CanaryAudit

__all__ = [
    "CanaryOptions",
    "DEFAULT_CANARIES",
    "mislabeled_canaries",
    "guess",
    "canary_audit",
]

DEFAULT_CANARIES = 500
"""Canaries per audited site when not given (capped by the patients available)."""


@dataclass(frozen=True)
class CanaryOptions:
    """How the canary audit runs.

    Attributes
    ----------
    canaries:
        ``m``; ``None``: :data:`DEFAULT_CANARIES` or as many as there are patients to copy.
    guesses:
        ``k``, the guesses made on each side ("in" and "out"); ``None``: ``max(1, m // 10)``.
    beta:
        ``1 - confidence`` of the bound.
    seed:
        Seeds the canaries' choice, their coins, and the training run.
    """

    canaries: int | None = None
    guesses: int | None = None
    beta: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries is not None and self.canaries < 2:
            raise ConfigError(f"canaries = {self.canaries}; the audit needs at least 2")
        if self.guesses is not None and self.guesses < 1:
            raise ConfigError(f"guesses = {self.guesses}; make at least 1 guess per side")
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"beta = {self.beta} is not in (0, 1); use e.g. 0.05")

    def resolve(self, available: int) -> tuple[int, int]:
        """``(m, k)`` for ``available`` patients to copy; :class:`ConfigError` if too few."""
        if self.canaries is None:
            m = min(DEFAULT_CANARIES, available)
        elif self.canaries > available:
            raise ConfigError(
                f"{self.canaries} canaries asked for, but only {available} patients outside "
                f"this site's training split can be copied; ask for at most {available}"
            )
        else:
            m = self.canaries
        if m < 2:
            raise ConfigError(
                f"only {available} patient(s) to copy as canaries; the audit needs at least 2"
            )
        k = self.guesses if self.guesses is not None else max(1, m // 10)
        if 2 * k > m:
            raise ConfigError(
                f"{k} guesses per side is more than half of the {m} canaries; use at most {m // 2}"
            )
        return m, k


def _stack(dataset: Dataset[Any], indices: np.ndarray) -> list[torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return [torch.stack([item[j] for item in items]) for j in range(len(items[0]))]


def mislabeled_canaries(pool: Dataset[Any], *, m: int, rng: np.random.Generator) -> TensorDataset:
    """``m`` distinct patients of ``pool``, copied with their binary label flipped.

    Examples
    --------
    >>> import torch
    >>> pool = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0.0, 1.0, 1.0]))
    >>> c = mislabeled_canaries(pool, m=3, rng=np.random.default_rng(0))
    >>> sorted(zip(c.tensors[0][:, 0].tolist(), c.tensors[1].tolist()))
    [(0.0, 1.0), (2.0, 0.0), (4.0, 0.0)]
    """
    chosen = rng.choice(len(pool), size=m, replace=False)  # type: ignore[arg-type]
    *inputs, y = _stack(pool, chosen)
    return TensorDataset(*inputs, 1.0 - y)


def guess(scores: np.ndarray, k: int) -> np.ndarray:
    """``+1`` ("in") for the ``k`` highest scores, ``-1`` for the ``k`` lowest, else 0.

    Ties are broken by position (a stable sort), never by the hidden coins.

    >>> guess(np.array([0.3, 0.9, 0.1, 0.5]), 1).tolist()
    [0, 1, -1, 0]
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    out = np.zeros(len(order), dtype=np.int8)
    out[order[:k]] = 1
    out[order[len(order) - k :]] = -1
    return out


def canary_audit(
    target: AttackTarget,
    *,
    canary_pool: Dataset[Any],
    claimed_epsilon: float | None,
    delta: float,
    options: CanaryOptions,
) -> CanaryAudit:
    """Run the one-run canary audit of ``target``'s site (see the module docstring).

    Parameters
    ----------
    target:
        The site: its training split (``members``), model factory, task kind and mechanism.
    canary_pool:
        Patients outside the site's training split to copy as canaries.
    claimed_epsilon:
        The site's reported ε (``None`` for a non-private run).
    delta:
        δ of the bound (the site's δ).
    options:
        Number of canaries and guesses, β, seed.
    """
    m, k = options.resolve(len(canary_pool))  # type: ignore[arg-type]
    rng = np.random.default_rng(derived_seed(options.seed, "canaries", target.site_id))
    canaries = mislabeled_canaries(canary_pool, m=m, rng=rng)
    included = rng.random(m) < 0.5
    train: Dataset[Any] = ConcatDataset(
        [target.members, Subset(canaries, np.flatnonzero(included).tolist())]
    )
    model = train_site_model(
        build=target.build_model,
        dataset=train,
        mechanism=target.mechanism,
        kind=target.kind,
        device=target.device,
        seed=derived_seed(options.seed, "canary-run", target.site_id),
    )
    scores = -example_losses(model, canaries, kind=target.kind, device=target.device)
    guesses = guess(scores, k)
    truth = np.where(included, 1, -1)
    r = int(np.count_nonzero(guesses))
    v = int(np.count_nonzero(guesses == truth))
    bound = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, beta=options.beta)
    return CanaryAudit(
        site_id=target.site_id,
        n_canaries=m,
        n_guesses=r,
        n_correct=v,
        confidence=1.0 - options.beta,
        epsilon_lower_bound=bound,
        claimed_epsilon=claimed_epsilon,
        below_claim=None if claimed_epsilon is None else bound < claimed_epsilon,
    )
