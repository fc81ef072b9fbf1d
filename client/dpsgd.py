"""DP-SGD at a site with Opacus: the mechanism's parameters, its randomness, the wrapping.

This module holds the DP-SGD mechanism itself: :class:`DPConfig` (how a site applies it),
:class:`DPPlan` (the noise multiplier, Poisson rate, steps and clipping norm one round
applies), :func:`sampling` (the rate and step count Opacus will run),
:func:`site_generators` (the site's own randomness), :func:`resolve_grad_sample_mode`
(one-backward bookkeeping, :mod:`fedcare.client.bookkeeping`, or per-sample-gradient hooks:
from the built model's layers, or by name from the model registry's ``ghost_norm_only``
flag, :mod:`fedcare.models.registry`),
:func:`make_private` (Opacus's ``make_private`` with Poisson sampling, Gaussian noise and
per-sample clipping) and :func:`finite_per_sample_grads` (the one step of the training loop
that is about DP).

The path of one DP-SGD round through fedcare:

1. :meth:`fedcare.client.local.SiteTrainer.train_round` plans the round: :func:`sampling`
   gives ``q`` and the steps; the noise multiplier is calibrated once for the whole run
   by :func:`fedcare.client.accounting.calibrate_noise` against the dataset's history;
2. the mechanism ``(sigma, q, steps)`` is charged to the durable privacy ledger
   (:mod:`fedcare.client.ledger`) *before* any training;
3. :func:`site_generators` draws the Poisson-sampling and noise generators from the site's
   OS entropy; :func:`resolve_grad_sample_mode` picks bookkeeping or hooks;
4. :func:`make_private` wraps model, optimizer, criterion and a Poisson loader with Opacus;
5. each step of the one training loop (:func:`fedcare.client.training.fit`) runs the
   forward pass and ``loss.backward()`` (with bookkeeping one backward pass gives each
   patient's gradient norm and the clipped sum; with ghost clipping Opacus's loss wrapper
   runs two backward passes and clips there; with hooks each patient's gradient is kept),
   :func:`finite_per_sample_grads`, then Opacus's optimizer step: each patient's gradient
   clipped to ``max_grad_norm``, Gaussian noise of standard deviation
   ``sigma * max_grad_norm`` from the noise generator added, the sum divided by the
   expected batch size;
6. the step count is checked against the charge and the weights leave
   (``fedcare.client.local``); ε is reported by :mod:`fedcare.client.accounting` over the
   ledger's whole history.

The noise multiplier is calibrated once for the *whole planned run* (rounds x local steps)
against the site's durable history in the privacy ledger, never per round: a fresh
``PrivacyEngine`` each round would forget the earlier rounds. Opacus's own accountant is
therefore not consulted; the ledger (:mod:`fedcare.client.ledger`) is the accountant of record.

Sampling is Poisson with rate ``q = 1 / ceil(n / batch_size)``, exactly the rate Opacus derives
from the wrapped loader, and one epoch is ``ceil(n / batch_size)`` steps.

The randomness that protects patients (the Poisson batches and the Gaussian noise) is the
site's: :func:`site_generators` seeds both generators from the operating system's entropy
(``secrets``), never from a value the coordinating centre sends, so the centre cannot
regenerate the noise and subtract it. Only a simulated site whose own ``site.toml`` sets
``[simulation] noise_seed`` gets reproducible generators. Opacus's ``secure_mode`` (a CSPRNG
for every draw) needs ``torchcsprng``, which has no build for current torch, so it is not
offered: the generators are torch's own, seeded with 63 bits of OS entropy per round.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.common.errors import ConfigError
from fedcare.models import model_info

__all__ = [
    "DPConfig",
    "DPPlan",
    "PrivateTraining",
    "sampling",
    "site_generators",
    "resolve_grad_sample_mode",
    "make_private",
    "finite_per_sample_grads",
]

GradSampleMode = Literal["auto", "bookkeeping", "ghost", "hooks", "functorch"]


class DPConfig(BaseModel):
    """How a site applies DP-SGD. Frozen; unknown keys are errors.

    ``target_epsilon`` is the cumulative ε the dataset may reach at the end of this run,
    history included (the site's own budget caps it); give ``noise_multiplier`` instead to
    fix the noise and let the ledger report the resulting ε.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    target_epsilon: float | None = Field(default=8.0, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: GradSampleMode = "auto"

    @model_validator(mode="after")
    def _one_noise_source(self) -> DPConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of target_epsilon and noise_multiplier when DP is enabled"
            )
        return self


@dataclass(frozen=True)
class DPPlan:
    """The mechanism one round applies: Gaussian noise ``sigma`` on Poisson(q) batches."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


def sampling(n_train: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """Poisson rate and step count of ``epochs`` local epochs, as Opacus will run them.

    >>> sampling(1000, batch_size=256, epochs=2)
    (0.25, 8)
    """
    if n_train < 1:
        raise ConfigError("cannot plan DP-SGD on an empty training split")
    if batch_size < 1 or epochs < 1:
        raise ConfigError(f"batch_size ({batch_size}) and epochs ({epochs}) must be >= 1")
    batches = math.ceil(n_train / batch_size)
    return 1.0 / batches, epochs * batches


def site_generators(
    *, device: torch.device | str, reproducible_seed: str | None = None
) -> tuple[torch.Generator, torch.Generator]:
    """``(sampling, noise)`` generators for one round of DP-SGD at a site.

    Each is seeded with 63 bits from the operating system's entropy, unless
    ``reproducible_seed`` is given (a simulated site's own ``noise_seed`` with the round):
    then the seeds are derived from it, so the same simulated round draws the same
    batches and noise. The sampling generator is on the CPU (the loader's), the noise
    generator on ``device`` (the model's).
    """

    def seed(purpose: str) -> int:
        if reproducible_seed is None:
            return secrets.randbits(63)
        digest = hashlib.sha256(f"{reproducible_seed}|{purpose}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF

    sampling_gen = torch.Generator().manual_seed(seed("sample"))
    noise_gen = torch.Generator(device=device).manual_seed(seed("noise"))
    return sampling_gen, noise_gen


def resolve_grad_sample_mode(
    requested: str, model_name: str, *, model: nn.Module | None = None
) -> str:
    """``auto``: one-backward bookkeeping where the model's layers allow it, else hooks.

    ``"bookkeeping"`` (:mod:`fedcare.client.bookkeeping`) forms each patient's gradient norm
    and the clipped sum in one backward pass, without Opacus's hooks; it handles models
    whose every trainable layer is an ``nn.Linear``, ``nn.Conv2d`` or ``nn.GroupNorm``
    (:func:`fedcare.client.bookkeeping.check_supported`). Given the built ``model``, a model
    the registry declares fit for it (``ghost_norm_only`` or ``bookkeeping``, a promise that
    every layer runs once per forward pass on the patients' rows, which only the first step
    could check, after the round's charge) gets it where that check accepts the model;
    without the model, the registry's ``ghost_norm_only`` flag decides (an all-Linear model:
    ``tests/client/test_bookkeeping.py`` checks that each such model passes).
    Measured on this CPU (benchmarks/dp_overhead.py, README "dp_overhead") bookkeeping
    beats ghost clipping (two backward passes) and per-sample hooks on every bundled
    model; hooks remain the fallback for layers bookkeeping does not handle.
    """
    if requested != "auto":
        return requested
    info = model_info(model_name)
    if model is not None:
        from fedcare.client.bookkeeping import BOOKKEEPING, is_supported

        declared = info.ghost_norm_only or info.bookkeeping
        return BOOKKEEPING if declared and is_supported(model) else "hooks"
    return "bookkeeping" if info.ghost_norm_only else "hooks"


@dataclass
class PrivateTraining:
    """What :func:`make_private` hands back to the training loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Any
    loader: DataLoader
    grad_sample_mode: str
    accountant: Any = None  #: Opacus's accountant (each step it records sigma and q)

    def unwrapped(self) -> nn.Module:
        """The user's module (Opacus wraps it; weights go out without ``_module.``)."""
        return getattr(self.model, "_module", self.model)


def make_private(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    dataset: Dataset,
    batch_size: int,
    plan: DPPlan,
    grad_sample_mode: str,
    sampling_generator: torch.Generator,
    noise_generator: torch.Generator,
) -> PrivateTraining:
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling.

    ``grad_sample_mode`` must already be resolved (``"bookkeeping"``, ``"ghost"``,
    ``"hooks"`` or ``"functorch"``). ``sampling_generator`` (CPU) draws the Poisson batches
    and ``noise_generator`` (on the model's device) the Gaussian noise; at a real site both
    come from :func:`site_generators`.

    ``"bookkeeping"`` is Opacus's ghost-clipping set-up (module validation, Poisson loader,
    noise, accountant hook) with the second backward pass replaced:
    :func:`fedcare.client.bookkeeping.wrap_bookkeeping` removes Opacus's norm hooks and
    forms the clipped sum from the one backward pass.
    """
    from opacus import PrivacyEngine  # imported when used: an evaluation never needs it

    from fedcare.client.bookkeeping import BOOKKEEPING, check_supported, wrap_bookkeeping

    if grad_sample_mode == BOOKKEEPING:
        check_supported(model)  # before Opacus wraps anything
    engine = PrivacyEngine(accountant="prv")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=sampling_generator)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        noise_generator=noise_generator,
        grad_sample_mode="ghost" if grad_sample_mode == BOOKKEEPING else grad_sample_mode,
    )
    dp_criterion: Any  # the task's loss, or Opacus's / bookkeeping's wrapper of it
    if grad_sample_mode == BOOKKEEPING:
        dp_model, ghost_optimizer, _, dp_loader = wrapped
        dp_model.remove_hooks()  # Opacus's two-pass norm hooks; bookkeeping has its own
        dp_optimizer, dp_criterion = wrap_bookkeeping(
            module=dp_model._module,
            optimizer=ghost_optimizer,
            criterion=criterion,
            max_grad_norm=plan.max_grad_norm,
        )
    elif grad_sample_mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        dp_model, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    expected_q = 1.0 / len(loader)
    if not math.isclose(expected_q, plan.sample_rate, rel_tol=1e-9):
        raise ConfigError(
            f"DP plan sample rate {plan.sample_rate} differs from the loader's {expected_q}; "
            "plan with fedcare.client.dpsgd.sampling() using the same batch size"
        )
    return PrivateTraining(
        dp_model, dp_optimizer, dp_criterion, dp_loader, grad_sample_mode, engine.accountant
    )


@torch.no_grad()
def finite_per_sample_grads(model: nn.Module) -> None:
    """Zero the non-finite entries of Opacus's per-sample gradients, in place.

    Weights crafted to overflow on one patient would otherwise turn that patient's gradient
    into NaN, and through clipping the whole step: a failure that tells the sender which
    patients exist. Each per-sample gradient depends on its own patient only, so sanitising
    it before clipping keeps DP-SGD's sensitivity bound. (Bookkeeping keeps no per-sample
    gradients either; it gives a patient whose gradient norm is not finite clip factor 0,
    :mod:`fedcare.client.bookkeeping`. Ghost clipping keeps none and sanitises nothing;
    there a non-finite step still fails the round, which spends the round's charge: see
    ``fedcare.client.ledger``.)
    """
    for param in model.parameters():
        grad_sample = getattr(param, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            torch.nan_to_num_(grad_sample, nan=0.0, posinf=0.0, neginf=0.0)
