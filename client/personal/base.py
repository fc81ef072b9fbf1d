"""What every personalization strategy shares: its settings, its base class, its registry
and the site's durable store of personal state.

A strategy says three things (:class:`Personalization`):

* **its privacy plan**, which :class:`fedcare.client.local.SiteTrainer` folds into the run's noise
  calibration from the first training round on: how many DP-SGD copies one training round
  runs under its single charge (:meth:`~Personalization.copies_per_round`), how many epochs
  the post-federation fine-tune takes (:meth:`~Personalization.finetune_epochs`), and after
  which rounds an evaluation also releases the personal model's metrics
  (:meth:`~Personalization.releases_personal`);
* **a training round**: the state the global copy trains from
  (:meth:`~Personalization.start`), what leaves the site (:meth:`~Personalization.outgoing`)
  and the personal state kept afterwards (:meth:`~Personalization.personal_round`);
* **the personal model** an evaluation measures (:meth:`~Personalization.personal_model`).

Personal state never leaves the site (only its evaluation metrics do, as a charged DP
release). It is kept per (dataset, run, strategy) in the site's state folder
(:class:`PersonalStore`, files mode 0600 written atomically), and written only **after** the
charge that produced it is marked completed: a round retried after a crash (its charge still
``charged``) starts again from the state before it, so no personal state ever carries the
noise of an attempt the ledger does not count.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcare.client.training import StepHook
from fedcare.common.errors import ConfigError
from fedcare.common.federation import PERSONALIZATIONS, FederationConfig
from fedcare.common.files import write_private_atomic

__all__ = [
    "HEAD_PREFIX",
    "PersonalSettings",
    "personal_settings",
    "State",
    "TrainCopy",
    "Personalization",
    "NoPersonalization",
    "REGISTRY",
    "register",
    "personalization",
    "PersonalStore",
    "PersonalRound",
]

HEAD_PREFIX = "head."
"""Every model in :mod:`models` names its output layer ``head`` (parameters ``head.*``)."""

State = dict[str, torch.Tensor]
#: Trains a copy of the model from ``state`` with the round's mechanism (DP-SGD under the
#: round's charge, or plain training in a non-private run) and these step hooks; returns
#: the trained weights on the CPU.
TrainCopy = Callable[[Mapping[str, torch.Tensor], Sequence[StepHook]], State]


class PersonalSettings(BaseModel):
    """A run's personalization: the strategy and its knobs. Frozen; unknown keys are errors.

    ``personal_epochs``: the epochs of ``finetune``'s post-federation fine-tune.
    ``ditto_lambda``: the strength of ``ditto``'s pull of the personal model toward the
    global one (the proximal ``mu`` of :class:`fedcare.client.training.ProximalTerm`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    strategy: Literal[PERSONALIZATIONS] = "none"  # type: ignore[valid-type]
    personal_epochs: int = Field(default=1, ge=1)
    ditto_lambda: float = Field(default=1.0, gt=0, allow_inf_nan=False)


def personal_settings(cfg: FederationConfig) -> PersonalSettings:
    """The personalization a run config asks for (part of the signed run config)."""
    return PersonalSettings(
        strategy=cfg.personalization,
        personal_epochs=cfg.personal_epochs,
        ditto_lambda=cfg.ditto_lambda,
    )


class Personalization:
    """One way a site keeps a personal model; the base class is "no personal model".

    Subclasses set :attr:`name`, register with :func:`register`, and override what differs.
    ``kept`` is always the strategy's stored personal state for this dataset and run
    (``None`` before it has any).
    """

    name: ClassVar[str] = "none"

    def __init__(self, settings: PersonalSettings) -> None:
        self.settings = settings

    # ---------------------------------------------------------------- the privacy plan

    def copies_per_round(self) -> int:
        """DP-SGD trainings one round runs with the same noise and sample rate, all under
        the round's one charge (its steps are this many times a copy's)."""
        return 1

    def finetune_epochs(self) -> int:
        """Epochs of the fine-tune run when the final evaluation arrives (0: none)."""
        return 0

    def releases_personal(self, *, round: int, rounds_planned: int) -> bool:
        """Whether the evaluation after ``round`` also releases the personal model's
        metrics (a second Gaussian release under the evaluation's charge)."""
        return False

    # ---------------------------------------------------------------- a training round

    def start(self, received: Mapping[str, torch.Tensor], kept: State | None) -> State:
        """The state the global copy trains from this round."""
        return dict(received)

    def outgoing(self, trained: State, received: Mapping[str, torch.Tensor]) -> State:
        """What leaves the site: the trained global copy, less anything personal."""
        return trained

    def personal_round(
        self,
        *,
        trained: State,
        received: Mapping[str, torch.Tensor],
        kept: State | None,
        train_copy: TrainCopy,
    ) -> State | None:
        """The personal state to keep after this round (``None``: nothing to keep)."""
        return None

    # ---------------------------------------------------------------- evaluation

    def personal_model(
        self, global_state: Mapping[str, torch.Tensor], kept: State | None
    ) -> State | None:
        """The personal model to evaluate beside ``global_state`` (``None``: none yet)."""
        return None


class NoPersonalization(Personalization):
    """``none``: the federation's global model only."""

    name = "none"


REGISTRY: dict[str, type[Personalization]] = {}
"""Strategy name -> class; the names are :data:`fedcare.common.federation.PERSONALIZATIONS`."""


def register(cls: type[Personalization]) -> type[Personalization]:
    """Class decorator: make ``cls`` the strategy its run-config name selects."""
    if cls.name not in PERSONALIZATIONS:
        raise ConfigError(
            f"personalization {cls.name!r} is not a run-config value; add it to "
            "fedcare.common.federation.PERSONALIZATIONS first"
        )
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ConfigError(f"personalization {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


register(NoPersonalization)


def personalization(settings: PersonalSettings) -> Personalization:
    """The strategy ``settings`` names."""
    try:
        cls = REGISTRY[settings.strategy]
    except KeyError as e:
        raise ConfigError(
            f"personalization {settings.strategy!r} has no implementation at this site "
            f"(known: {', '.join(sorted(REGISTRY))}); update fedcare at the site"
        ) from e
    return cls(settings)


class PersonalStore:
    """A site's personal states, one file per (dataset, run, strategy), in ``folder``.

    Files are mode 0600, written atomically (:func:`fedcare.common.files.write_private_atomic`), in
    the site's private state folder; their names are hashes, so they say nothing about the
    run. Each holds the round it was written after and the weights.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, *, dataset: str, run_id: str, strategy: str) -> Path:
        key = f"{dataset}|{run_id}|{strategy}"
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def load(self, *, dataset: str, run_id: str, strategy: str) -> tuple[int, State] | None:
        """``(round, state)`` kept for the key, or ``None`` when there is none."""
        path = self.path(dataset=dataset, run_id=run_id, strategy=strategy)
        if not path.is_file():
            return None
        try:
            payload: dict[str, Any] = torch.load(path, weights_only=True)
            return int(payload["round"]), dict(payload["state"])
        except Exception as e:  # a torn or foreign file: say which, never half-use it
            raise ConfigError(
                f"the site's personal model {path} is unreadable ({e}); delete it to start "
                "the personal model again from the global one (no privacy budget is lost)"
            ) from e

    def save(
        self, *, dataset: str, run_id: str, strategy: str, round: int, state: Mapping[str, Any]
    ) -> Path:
        """Keep ``state`` as the key's personal state after ``round``."""
        buffer = io.BytesIO()
        cpu = {k: v.detach().to("cpu").clone() for k, v in state.items()}
        torch.save({"round": int(round), "state": cpu}, buffer)
        path = self.path(dataset=dataset, run_id=run_id, strategy=strategy)
        return write_private_atomic(path, buffer.getvalue())


@dataclass
class PersonalRound:
    """One training round's personalization at a site.

    :meth:`open` it with the weights the round received; train the global copy from
    :attr:`start`; pass the trained weights through :meth:`finish` (which runs the
    strategy's personal training and returns what may leave the site); call :meth:`keep`
    once the round's charge is completed (never before: see the module docstring).
    """

    strategy: Personalization
    store: PersonalStore | None
    dataset: str
    run_id: str
    round: int
    received: State
    kept: State | None = None
    new: State | None = None

    @classmethod
    def open(
        cls,
        strategy: Personalization,
        store: PersonalStore | None,
        *,
        dataset: str,
        run_id: str,
        round: int,
        received: Mapping[str, torch.Tensor],
    ) -> PersonalRound:
        """The round, with the strategy's kept personal state loaded."""
        kept = None
        if not isinstance(strategy, NoPersonalization):
            if store is None:
                raise ConfigError(
                    f"personalization {strategy.name!r} keeps a personal model at the site, "
                    "which needs a state folder; give the site a privacy ledger (its folder "
                    "holds the personal models too)"
                )
            loaded = store.load(dataset=dataset, run_id=run_id, strategy=strategy.name)
            kept = None if loaded is None else loaded[1]
        return cls(strategy, store, dataset, run_id, round, dict(received), kept)

    @property
    def start(self) -> State:
        """The state the round's global copy trains from."""
        return self.strategy.start(self.received, self.kept)

    @property
    def copies(self) -> int:
        """DP-SGD copies the round's one charge covers."""
        return self.strategy.copies_per_round()

    def finish(self, trained: State, train_copy: TrainCopy) -> State:
        """Run the strategy's personal step on the trained global copy; return what may
        leave the site."""
        self.new = self.strategy.personal_round(
            trained=trained, received=self.received, kept=self.kept, train_copy=train_copy
        )
        return self.strategy.outgoing(trained, self.received)

    def keep(self) -> None:
        """Store the round's new personal state (call after its charge completed)."""
        if self.new is None or self.store is None:
            return
        self.store.save(
            dataset=self.dataset,
            run_id=self.run_id,
            strategy=self.strategy.name,
            round=self.round,
            state=self.new,
        )
