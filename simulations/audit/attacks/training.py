"""Train a model the way a site trained in a run: the project's own loop, DP-SGD or not.

Reference models and the canary run are trained here, with :func:`fedcare.client.training.fit` and,
for DP, :func:`fedcare.client.dpsgd.make_private` (Opacus, Poisson sampling): no second training
loop. A :class:`SiteMechanism` is what one site did in one run, round by round: the local
training settings and, with DP, the ``(σ, q, steps)`` of each round (``summary.json``).
Every round starts a fresh optimizer from the previous round's weights, as the federation
does; without the other sites' updates in between, this is the site's mechanism alone, the
strongest position for an auditor (aggregation is post-processing and only hides more).

With DP the batch size is chosen so that Opacus's Poisson rate ``1 / ceil(n / batch)`` equals
the run's ``q`` *exactly* on the (possibly larger, canaries added) training set, and each
round takes exactly the run's number of steps: the mechanism, and so the claimed ε, is the
run's.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.client.dpsgd import DPPlan, make_private, resolve_grad_sample_mode
from fedcare.client.training import TrainConfig, fit, make_optimizer
from fedcare.common.errors import ConfigError
from fedcare.models.tasks import TaskKind

__all__ = [
    "ModelFactory",
    "SiteMechanism",
    "batch_size_for_rate",
    "train_site_model",
    "derived_seed",
]

ModelFactory = Callable[[torch.Generator], nn.Module]
"""Builds a fresh model of the run's architecture, initial weights from the generator."""


@dataclass(frozen=True)
class SiteMechanism:
    """How one site trained in a run.

    Attributes
    ----------
    train:
        Local training settings (``epochs`` = local epochs per round).
    rounds:
        Rounds the site trained.
    plans:
        One DP-SGD plan per round, or ``None`` for non-private training.
    model_name:
        The registered model (picks the Opacus grad-sample mode).
    """

    train: TrainConfig
    rounds: int
    plans: tuple[DPPlan, ...] | None
    model_name: str

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"a site mechanism needs at least one round, got {self.rounds}")
        if self.plans is not None and len(self.plans) != self.rounds:
            raise ConfigError(
                f"{len(self.plans)} DP plans for {self.rounds} rounds; give one plan per round"
            )

    @property
    def private(self) -> bool:
        """Whether the site trained with DP-SGD."""
        return self.plans is not None

    def non_private(self) -> SiteMechanism:
        """The same training without DP (same rounds, epochs, optimizer and batch size)."""
        return replace(self, plans=None)


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose, from the user's seed and a label.

    >>> derived_seed(0, "ref", 1) == derived_seed(0, "ref", 1) != derived_seed(0, "ref", 2)
    True
    """
    text = "|".join(str(p) for p in (seed, *parts))
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def batch_size_for_rate(n: int, sample_rate: float) -> int:
    """A batch size ``b`` with ``1 / ceil(n / b) == sample_rate`` (Opacus's Poisson rate).

    Raises
    ------
    ConfigError
        ``1 / sample_rate`` is not a whole number of batches, or no batch size gives it.

    Examples
    --------
    >>> batch_size_for_rate(148, 1 / 3), batch_size_for_rate(650, 1 / 3)
    (50, 217)
    """
    batches = round(1.0 / sample_rate)
    if batches < 1 or not math.isclose(1.0 / batches, sample_rate, rel_tol=1e-9):
        raise ConfigError(
            f"sample rate {sample_rate} is not 1/(whole number of batches); the mechanism "
            "cannot be replayed with Opacus's loader (was summary.json edited?)"
        )
    if n < batches:
        raise ConfigError(
            f"{n} training examples cannot form {batches} batches for sample rate "
            f"{sample_rate:.4g}; audit a site with more patients"
        )
    size = math.ceil(n / batches)
    while math.ceil(n / size) != batches:  # only for n barely above a multiple of batches
        size -= 1
        if size < 1 or math.ceil(n / size) > batches:
            raise ConfigError(
                f"no batch size splits {n} examples into exactly {batches} batches; "
                "audit with another number of canaries"
            )
    return size


def train_site_model(
    *,
    build: ModelFactory,
    dataset: Dataset[Any],
    mechanism: SiteMechanism,
    kind: TaskKind,
    device: torch.device,
    seed: int,
) -> nn.Module:
    """Train a fresh model on ``dataset`` as ``mechanism`` prescribes; returns it (unwrapped).

    Parameters
    ----------
    build:
        Fresh-model factory; the initial weights come from a generator seeded by ``seed``.
    dataset:
        The training set (items ``(*inputs, y)``).
    mechanism:
        The rounds, local settings and (with DP) the per-round ``(σ, q, steps)``.
    kind:
        The task kind (its loss is the criterion).
    device:
        Where to train.
    seed:
        Seeds initialisation, batch sampling and DP noise.

    Raises
    ------
    ConfigError
        A round's steps are not whole epochs of its sampling rate, or the rate cannot be
        reproduced on ``len(dataset)`` examples.
    """
    n = len(dataset)  # type: ignore[arg-type]
    cfg = mechanism.train
    state = build(torch.Generator().manual_seed(derived_seed(seed, "init"))).state_dict()
    for rnd in range(mechanism.rounds):
        model = build(torch.Generator().manual_seed(0))
        model.load_state_dict(state)
        model.to(device)
        optimizer = make_optimizer(model.parameters(), cfg)
        criterion = kind.make_loss()
        sampler = torch.Generator().manual_seed(derived_seed(seed, "sample", rnd))
        if mechanism.plans is None:
            loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=sampler)
            fit(
                model,
                loader,
                optimizer=optimizer,
                criterion=criterion,
                epochs=cfg.epochs,
                device=device,
            )
            trained = model
        else:
            plan = mechanism.plans[rnd]
            batches = round(1.0 / plan.sample_rate)
            if plan.steps % batches:
                raise ConfigError(
                    f"round {rnd + 1}: {plan.steps} steps are not whole epochs of "
                    f"{batches} batches (q = {plan.sample_rate:.4g}); cannot replay it"
                )
            private = make_private(
                model=model,
                optimizer=optimizer,
                criterion=criterion,
                dataset=dataset,
                batch_size=batch_size_for_rate(n, plan.sample_rate),
                plan=plan,
                grad_sample_mode=resolve_grad_sample_mode(
                    "auto", mechanism.model_name, model=model
                ),
                sampling_generator=sampler,
                noise_generator=torch.Generator(device=device).manual_seed(
                    derived_seed(seed, "noise", rnd)
                ),
            )
            stats = fit(
                private.model,
                private.loader,
                optimizer=private.optimizer,
                criterion=private.criterion,
                epochs=plan.steps // batches,
                device=device,
            )
            if stats.steps != plan.steps:
                raise RuntimeError(
                    f"DP-SGD ran {stats.steps} steps where the run took {plan.steps}; the "
                    "replayed mechanism would not be the run's"
                )
            trained = private.unwrapped()
        state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    final = build(torch.Generator().manual_seed(0))
    final.load_state_dict(state)
    return final.to(device)
