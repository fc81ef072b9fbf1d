"""What an audit finds, as data: the contract between verification, accounting, attacks
and the HTML report.

Each audit step returns one of these frozen pydantic models; ``fedcare audit attack`` saves
its :class:`AttackReport` as ``<run>/audit/attacks.json``; the report reads all of them.
Unknown keys are errors, so a file written by another version is refused, not misread.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedcare.common.run_files import ATTACKS_NAME

__all__ = [
    "LogCheck",
    "VerifyResult",
    "EpsilonRow",
    "EpsilonAudit",
    "RocCurve",
    "AttackResult",
    "CanaryAudit",
    "AttackReport",
    "ATTACKS_FILE",
]

ATTACKS_FILE = ATTACKS_NAME


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LogCheck(_Frozen):
    """The verification of one audit log (one writer: the server or one site)."""

    path: str
    writer: str  # "server" or the site id
    key_fingerprint: str  # SHA-256 of the writer's raw Ed25519 public key, hex
    entries: int = Field(ge=0)
    ok: bool
    first_bad_line: int | None = None  # 1-based line number of the first broken/forged entry
    problem: str | None = None  # what is wrong with that entry, and what it means
    notices: list[str] = []  # not errors: e.g. a torn last line the writer cut and recorded


class VerifyResult(_Frozen):
    """Every log of a run (or one log), plus the cross-checks between them."""

    ok: bool
    logs: list[LogCheck]
    cross_check_problems: list[str] = []  # e.g. a site's sent-update hash the server never logged


class EpsilonRow(_Frozen):
    """One site's ε after one round: as the site reported it and as the audit recomputes it."""

    site_id: str
    round: int = Field(ge=1)
    delta: float
    reported_epsilon: float
    recomputed_epsilon: float  # PLD accountant (Google dp-accounting) over the logged history
    difference: float  # recomputed - reported
    flagged: bool  # reported below recomputed beyond the accountants' tolerance
    kind: Literal["train", "personalize"] = "train"  # after a round, or a personal fine-tune


class EpsilonAudit(_Frozen):
    """Independent ε recomputation for every site of a run."""

    reported_accountant: str  # what the sites used, e.g. "prv"
    independent_accountant: str  # e.g. "pld (dp-accounting)"
    tolerance: float
    rows: list[EpsilonRow]
    ok: bool  # no row flagged


class RocCurve(_Frozen):
    """An ROC curve, downsampled to at most a few hundred points, fpr increasing."""

    fpr: list[float]
    tpr: list[float]


class AttackResult(_Frozen):
    """One membership-inference attack on one site's training vs held-out patients."""

    attack: str  # "loss-threshold", "rmia", "lira"
    site_id: str
    n_members: int
    n_nonmembers: int
    auc: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float
    roc: RocCurve


class CanaryAudit(_Frozen):
    """One-run canary audit (Steinke, Nasr and Jagielski 2023) of one site's mechanism."""

    site_id: str
    n_canaries: int
    n_guesses: int
    n_correct: int
    confidence: float  # e.g. 0.95
    epsilon_lower_bound: float  # empirical lower bound on ε at that confidence
    claimed_epsilon: float | None  # None for a non-private run
    below_claim: bool | None  # lower bound < claimed ε (None when nothing is claimed)


class AttackReport(_Frozen):
    """What ``fedcare audit attack`` found for a run."""

    run_id: str
    dp: bool
    delta: float | None
    attacks: list[AttackResult]
    canaries: list[CanaryAudit]
