"""Personal models at a site: one strategy per file, chosen by the run config's
``personalization`` key (``none``, ``finetune``, ``fedper``, ``ditto``).

:mod:`client.personal.base` holds the settings, the base class, the registry and the
site's store of personal state; :class:`client.local.SiteTrainer` plans, charges and runs
them. A new strategy is a new file with a :func:`~client.personal.base.register`-ed
subclass, imported here.
"""

from client.personal import ditto, fedper, finetune  # noqa: F401  (registration)
from client.personal.base import (
    HEAD_PREFIX,
    REGISTRY,
    NoPersonalization,
    Personalization,
    PersonalRound,
    PersonalSettings,
    PersonalStore,
    State,
    TrainCopy,
    personal_settings,
    personalization,
    register,
)
from client.personal.ditto import Ditto
from client.personal.fedper import FedPer
from client.personal.finetune import FineTune

__all__ = [
    "HEAD_PREFIX",
    "REGISTRY",
    "Ditto",
    "FedPer",
    "FineTune",
    "NoPersonalization",
    "Personalization",
    "PersonalRound",
    "PersonalSettings",
    "PersonalStore",
    "State",
    "TrainCopy",
    "personal_settings",
    "personalization",
    "register",
]
