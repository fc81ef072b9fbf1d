"""DP-SGD at a site with Opacus: the plan (noise for the whole run) and the wrapping.

The noise multiplier is calibrated once for the *whole planned run* (rounds x local steps)
against the site's durable history in the privacy ledger, never per round: a fresh
``PrivacyEngine`` each round would forget the earlier rounds. Opacus's own accountant is
therefore not consulted; the ledger (``fedcare.client.ledger``) is the accountant of record.

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

__all__ = [
    "DPConfig",
    "DPPlan",
    "PrivateTraining",
    "sampling",
    "site_generators",
    "make_private",
]

GradSampleMode = Literal["auto", "ghost", "hooks", "functorch"]


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


@dataclass
class PrivateTraining:
    """What :func:`make_private` hands back to the training loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: Any
    loader: DataLoader
    grad_sample_mode: str

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

    ``grad_sample_mode`` must already be resolved (``"ghost"``, ``"hooks"`` or
    ``"functorch"``). ``sampling_generator`` (CPU) draws the Poisson batches and
    ``noise_generator`` (on the model's device) the Gaussian noise; at a real site both come
    from :func:`site_generators`.
    """
    from opacus import PrivacyEngine  # imported when used: an evaluation never needs it

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
        grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        dp_model, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        dp_model, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    expected_q = 1.0 / len(loader)
    if not math.isclose(expected_q, plan.sample_rate, rel_tol=1e-9):
        raise ConfigError(
            f"DP plan sample rate {plan.sample_rate} differs from the loader's {expected_q}; "
            "plan with fedcare.client.privacy.sampling() using the same batch size"
        )
    return PrivateTraining(dp_model, dp_optimizer, dp_criterion, dp_loader, grad_sample_mode)
