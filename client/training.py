"""The one training loop, for every task and modality, private or not.

Batches are tuples of tensors ``(*inputs, y)``; a model maps ``inputs`` to one logit per
patient. Algorithm-specific behaviour (FedProx's proximal term, or a later correction such as
SCAFFOLD's) plugs in as a :class:`StepHook` run after each optimizer step, so there is no
second loop per algorithm.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcare.client import recipe
from fedcare.client.dpsgd import finite_per_sample_grads
from fedcare.common.errors import ConfigError

__all__ = [
    "TrainConfig",
    "TrainStats",
    "StepHook",
    "ProximalTerm",
    "resolve_device",
    "make_optimizer",
    "fit",
    "predict",
]


class TrainConfig(BaseModel):
    """Local training hyper-parameters. Frozen; unknown keys are errors.

    ``optimizer`` ``"auto"``, ``batch_size`` 0 and ``lr`` 0 mean "the recipe's"
    (:mod:`fedcare.client.recipe`): a site fills them in with :meth:`for_site`, from whether the run
    is private, its number of training patients and the model, before it trains.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = None
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=64, ge=0)
    lr: float = Field(default=1e-3, ge=0)
    optimizer: Literal["auto", "adam", "sgd"] = "adam"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    proximal_mu: float = Field(default=0.0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = Field(default=512, ge=1)

    def for_site(self, *, n_train: int, model: str, private: bool) -> TrainConfig:
        """This config with the recipe's optimizer, batch size and learning rate where it
        leaves them to the recipe, for a site with ``n_train`` training patients training
        ``model``, privately or not."""
        update: dict[str, float | int | str] = {}
        optimizer: str = self.optimizer
        if optimizer == "auto":
            optimizer = update["optimizer"] = recipe.optimizer_for(private=private)
        if self.batch_size == recipe.AUTO:
            update["batch_size"] = recipe.batch_size_for(n_train, private=private)
        if self.lr == recipe.AUTO:
            update["lr"] = recipe.learning_rate_for(optimizer)
        return self.model_copy(update=update) if update else self

    @property
    def resolved(self) -> bool:
        """Whether optimizer, batch size and learning rate are set (no recipe value left)."""
        return (
            self.optimizer != "auto" and self.batch_size != recipe.AUTO and self.lr != recipe.AUTO
        )


@dataclass(frozen=True)
class TrainStats:
    steps: int
    samples: int
    mean_loss: float


class StepHook(Protocol):
    """Called after every optimizer step with the (unwrapped) model."""

    def after_step(self, model: nn.Module, *, lr: float) -> None: ...


class ProximalTerm:
    """FedProx's proximal term ``mu/2 ||w - w_global||^2`` as a decoupled update.

    The term does not depend on any patient, so it is applied as an exact proximal step after
    the (clipped, noised) optimizer step rather than inside the per-sample loss: DP guarantees
    are untouched and every grad-sample mode (ghost clipping included) stays valid.
    """

    def __init__(self, *, mu: float, global_params: Mapping[str, torch.Tensor]) -> None:
        self.mu = mu
        self.global_params = {k: v.detach().clone() for k, v in global_params.items()}

    def after_step(self, model: nn.Module, *, lr: float) -> None:
        # The exact proximal step w <- argmin_v ||v - w||^2 / (2 lr) + mu/2 ||v - w_global||^2,
        # i.e. (w + lr mu w_global) / (1 + lr mu): stable for any lr * mu (a plain gradient
        # step on the term diverges once lr * mu > 2).
        shrink = lr * self.mu
        with torch.no_grad():
            for name, param in model.named_parameters():
                anchor = self.global_params[name].to(param.device)
                param.add_(anchor, alpha=shrink).div_(1.0 + shrink)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for absent CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda'")
    return torch.device(name)


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if not cfg.resolved:
        raise ConfigError(
            "the training config still leaves its batch size or learning rate to the recipe; "
            "call TrainConfig.for_site(n_train=..., model=..., private=...) first"
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)


def fit(
    model: nn.Module,
    loader: Iterable[Sequence[torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    epochs: int,
    device: torch.device,
    hooks: Sequence[StepHook] = (),
    clip_norm: float | None = None,
) -> TrainStats:
    """Train ``epochs`` passes over ``loader``; returns steps taken and the mean loss.

    ``criterion`` may be Opacus's ghost-clipping loss wrapper: ``loss.backward()`` then runs
    both backward passes. Empty Poisson batches are still stepped (the optimizer adds noise
    only), as the privacy analysis assumes.

    ``clip_norm`` clips each step's (batch) gradient to that L2 norm: what keeps the recipe's
    large learning rate stable *without* DP (DP-SGD clips every patient's gradient already,
    so a private run passes ``None``).
    """
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    steps = samples = 0
    loss_sum = 0.0
    for _ in range(epochs):
        for batch in loader:
            *inputs, y = (t.to(device, non_blocking=True) for t in batch)
            optimizer.zero_grad(set_to_none=True)
            logits = model(*inputs)
            loss = criterion(logits, y)
            loss.backward()
            finite_per_sample_grads(model)
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            for hook in hooks:
                hook.after_step(_unwrap(model), lr=lr)
            n = int(y.shape[0])
            if n:
                loss_sum += float(loss.item()) * n
            samples += n
            steps += 1
    return TrainStats(steps=steps, samples=samples, mean_loss=loss_sum / max(samples, 1))


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset, *, device: torch.device, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities for every patient of ``dataset``, in order."""
    module = _unwrap(model)
    was_training = module.training
    module.eval()
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        *inputs, y = (t.to(device) for t in batch)
        ps.append(torch.sigmoid(module(*inputs)).float().cpu().numpy())
        ys.append(y.float().cpu().numpy())
    module.train(was_training)
    if not ys:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
    return np.concatenate(ys), np.concatenate(ps)
