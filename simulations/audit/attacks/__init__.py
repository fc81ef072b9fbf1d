"""Empirical privacy attacks on a finished run: membership inference and a canary audit.

Importing the package registers the attacks (``loss-threshold``, ``rmia``). Entry point:
:func:`audit_run` (``fedcare audit attack RUNDIR``), which returns the
:class:`~fedcare.simulations.audit.findings.AttackReport` saved as ``<run>/audit/attacks.json``.

One file per piece: :mod:`.roc` (ROC, AUC, TPR at low FPR), :mod:`.signals` (per-patient
loss), :mod:`.training` (training as a site trained), :mod:`.loss_threshold`, :mod:`.rmia`,
:mod:`.canary` and :mod:`.canary_bound` (the one-run audit and its ε bound),
:mod:`.run_dir` (reading a run back) and :mod:`.run` (the whole audit).
"""

from __future__ import annotations

from fedcare.simulations.audit.attacks.base import (
    AttackOptions,
    AttackTarget,
    MembershipAttack,
    attack_names,
    get_attack,
    register_attack,
)
from fedcare.simulations.audit.attacks.canary import CanaryOptions, canary_audit, guess
from fedcare.simulations.audit.attacks.canary_bound import (
    bonferroni_beta,
    canary_p_value,
    epsilon_lower_bound,
)
from fedcare.simulations.audit.attacks.loss_threshold import LossThreshold
from fedcare.simulations.audit.attacks.rmia import RMIA, rmia_log_ratio
from fedcare.simulations.audit.attacks.roc import (
    attack_result,
    downsample_roc,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)
from fedcare.simulations.audit.attacks.run import audit_run, read_attack_report, write_attack_report
from fedcare.simulations.audit.attacks.run_dir import RunArtifacts, load_run
from fedcare.simulations.audit.attacks.signals import example_losses
from fedcare.simulations.audit.attacks.training import SiteMechanism, train_site_model

__all__ = [
    "AttackOptions",
    "AttackTarget",
    "MembershipAttack",
    "attack_names",
    "get_attack",
    "register_attack",
    "LossThreshold",
    "RMIA",
    "rmia_log_ratio",
    "CanaryOptions",
    "canary_audit",
    "guess",
    "canary_p_value",
    "epsilon_lower_bound",
    "bonferroni_beta",
    "roc_curve",
    "roc_auc",
    "tpr_at_fpr",
    "downsample_roc",
    "attack_result",
    "example_losses",
    "SiteMechanism",
    "train_site_model",
    "RunArtifacts",
    "load_run",
    "audit_run",
    "write_attack_report",
    "read_attack_report",
]
