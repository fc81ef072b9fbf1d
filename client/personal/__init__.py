"""Personal models at a site: one strategy per file, chosen by the run config's
``personalization`` key (``none``, ``finetune``, ``fedper``, ``ditto``).

:mod:`fedcare.client.personal.base` holds the settings, the base class, the registry and the
site's store of personal state; :class:`fedcare.client.local.SiteTrainer` plans, charges and runs
them. A new strategy is a new file with a :func:`~fedcare.client.personal.base.register`-ed
subclass, imported here.
"""

from fedcare.client.personal import ditto, fedper, finetune  # noqa: F401  (registration)
from fedcare.client.personal.base import (
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
from fedcare.client.personal.ditto import Ditto
from fedcare.client.personal.fedper import FedPer
from fedcare.client.personal.finetune import FineTune

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
