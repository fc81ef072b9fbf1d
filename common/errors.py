"""Typed exceptions. A user error prints one clear line: the cause and the fix.

Every error fedcare raises for bad input (a data file, a config, a CLI argument, a model
update) derives from :class:`FedcareError`; the CLI turns it into one message and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "FedcareError",
    "ConfigError",
    "DataError",
    "DataValidationError",
    "PrivacyBudgetExceeded",
    "PolicyViolation",
    "UpdateRejected",
    "RoundFailed",
    "TrainingDiverged",
]


class FedcareError(Exception):
    """Base class of every error that is the user's to fix."""


class ConfigError(FedcareError):
    """A configuration file or argument is invalid."""


class DataError(FedcareError):
    """A site's data files cannot be read."""


class DataValidationError(DataError):
    """A site's data failed validation; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class PrivacyBudgetExceeded(FedcareError):
    """Training would take the site's privacy loss over its own budget."""


class PolicyViolation(FedcareError):
    """The request is not allowed by the site's policy."""


class UpdateRejected(FedcareError):
    """A model update failed server-side validation."""


class RoundFailed(FedcareError):
    """A site's round failed after its privacy charge was written (the charge is kept,
    marked failed): a failure at the site, reported as such, never as a drop-out."""


class TrainingDiverged(RoundFailed):
    """Local training diverged (non-finite weights): a setting to fix (usually the learning
    rate), not a refusal; the round's charge is kept."""
