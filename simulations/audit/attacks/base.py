"""What every membership-inference attack gets, and the registry of attacks by name.

An attack scores one site's candidates against the run's final global model: the site's
training patients (members) and its held-out val and test patients (non-members), split
exactly as training split them. A new attack is a :class:`MembershipAttack` subclass in a new
file, decorated with :func:`register_attack`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from fedcare.common.errors import ConfigError
from fedcare.models.tasks import TaskKind
from fedcare.simulations.audit.attacks.training import ModelFactory, SiteMechanism

__all__ = [
    "AttackTarget",
    "AttackOptions",
    "MembershipAttack",
    "register_attack",
    "attack_names",
    "get_attack",
]


@dataclass(frozen=True)
class AttackTarget:
    """One site's candidates, the model under attack, and what an attacker may also use.

    Attributes
    ----------
    site_id:
        The site.
    members, nonmembers:
        The site's training patients, and its held-out (val + test) patients.
    member_losses, nonmember_losses:
        Each candidate's loss under the attacked model, in dataset order.
    population:
        Patients from the same federation who are *not* candidates (the other sites'
        patients), for reference models; ``None`` when there are none (a one-site run).
    build_model:
        Fresh model of the attacked architecture, initial weights from the generator.
    kind:
        The task kind (its loss defines every attack's signal).
    mechanism:
        How the site trained in the run (rounds, local settings, DP plans).
    device:
        Where to train and evaluate.
    """

    site_id: str
    members: Dataset[Any]
    nonmembers: Dataset[Any]
    member_losses: np.ndarray
    nonmember_losses: np.ndarray
    population: Dataset[Any] | None
    build_model: ModelFactory
    kind: TaskKind
    mechanism: SiteMechanism
    device: torch.device


@dataclass(frozen=True)
class AttackOptions:
    """Knobs shared by the attacks.

    Attributes
    ----------
    reference_models:
        Reference models a calibrated attack trains (on random halves of the population).
    offline_a:
        RMIA's offline scaling ``a`` (Zarifzadeh et al. 2024): ``Pr(x)`` is estimated from
        models that never saw ``x`` as ``((1 + a) Pr_out(x) + 1 - a) / 2``.
    seed:
        Seeds the reference models' halves, initialisation and batches.
    """

    reference_models: int = 4
    offline_a: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reference_models < 1:
            raise ConfigError(
                f"reference_models = {self.reference_models}; a calibrated attack needs at "
                "least 1 (default 4)"
            )
        if not 0.0 <= self.offline_a <= 1.0:
            raise ConfigError(f"offline_a = {self.offline_a} is not in [0, 1]; use e.g. 0.3")


class MembershipAttack(ABC):
    """A membership-inference attack. Subclass, set :attr:`name`, and register it."""

    name: ClassVar[str]

    def applicable(self, target: AttackTarget) -> str | None:
        """``None`` when the attack can run on ``target``, else why it cannot."""
        return None

    @abstractmethod
    def scores(self, target: AttackTarget, options: AttackOptions) -> tuple[np.ndarray, np.ndarray]:
        """Membership scores (higher = member) of ``target.members`` and ``target.nonmembers``."""


A = TypeVar("A", bound=type[MembershipAttack])

_ATTACKS: dict[str, type[MembershipAttack]] = {}


def register_attack(cls: A) -> A:
    """Class decorator: register a :class:`MembershipAttack` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name`")
    if name in _ATTACKS:
        raise ConfigError(f"an attack named {name!r} is already registered; pick another name")
    _ATTACKS[name] = cls
    return cls


def attack_names() -> tuple[str, ...]:
    """Registered attack names, in registration order."""
    return tuple(_ATTACKS)


def get_attack(name: str) -> MembershipAttack:
    """A new instance of the attack ``name``; :class:`ConfigError` if unknown."""
    try:
        return _ATTACKS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown attack {name!r}; choose from: {', '.join(attack_names())}"
        ) from None
