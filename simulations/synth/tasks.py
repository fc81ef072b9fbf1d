r"""The four binary tasks and their true logits (a registry: one entry per task).

Every logit below is a function of *clean observable* values only: the rounded EHR
table before cells are blanked, the event features aggregated from the events file, the
lesion's presence and radius (``r32``, pixels of a 32-pixel image) and the driver genes'
standard scores ``u_0..u_5`` before the batch effect. The site's intercept shift
``delta_{s,task}`` is added, and the label is ``Bernoulli(sigmoid(eta))``.

``readmission``  ``eta = -2.6 + delta + 1.0 * ehr_risk`` with
    ``ehr_risk = 0.5 age_z + 0.8 chf + 0.6 ckd + 0.5 copd + 0.3 diabetes
    + 0.12 (n_medications - 4) + 0.8 [emergency] + 0.4 [urgent]
    + 0.6 (ln creatinine - ln 0.95) / 0.3 - 0.5 (albumin - 3.9) / 0.45
    + 0.4 (hr_mean - 78) / 9 + 0.8 sigmoid((hr_max - 105) / 4) + 0.1 (n_hr - 6)``.
``malignancy``  ``eta = -3.0 + delta + lesion * (2.6 + 1.3 (r32 - 2.2))``.
``drug_response``  ``eta = -0.6 + delta + 1.5 u_0 + 1.2 u_1 - 1.2 u_2 + 0.9 u_0 u_3``.
``multimodal_outcome``  ``eta = -1.7 + delta + 1.25 (e + i + g)`` with
    ``e = 0.6 age_z + 0.8 chf + 0.5 (ln creatinine - ln 0.95) / 0.3 - 0.4``,
    ``i = lesion * (1.2 + 0.6 (r32 - 2.2)) - 0.5`` and
    ``g = 0.7 (u_3 + u_4 - u_5)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcare.common.spec import Modality
from fedcare.simulations.synth.latent import sigmoid

__all__ = ["TaskDef", "TASKS", "LABEL_TABLES", "true_logits", "shrink_in_group"]

#: Where a label column lives: the EHR table, or the outcomes table.
LABEL_TABLES: tuple[str, ...] = ("ehr", "outcomes")


@dataclass(frozen=True)
class TaskDef:
    """One task: its label column and table, modalities, and true logit (no site shift)."""

    name: str
    column: str
    table: str
    modalities: tuple[Modality, ...]
    description: str
    signal: str
    logit: Callable[[pd.DataFrame], np.ndarray]


def _z_creatinine(c: pd.DataFrame) -> np.ndarray:
    return (np.log(c["creatinine"].to_numpy(dtype=float)) - np.log(0.95)) / 0.3


def _readmission(c: pd.DataFrame) -> np.ndarray:
    adm = c["admission_type"].to_numpy()
    risk = (
        0.5 * c["age_z"]
        + 0.8 * c["chf"]
        + 0.6 * c["ckd"]
        + 0.5 * c["copd"]
        + 0.3 * c["diabetes"]
        + 0.12 * (c["n_medications"] - 4)
        + 0.8 * (adm == "emergency")
        + 0.4 * (adm == "urgent")
        + 0.6 * _z_creatinine(c)
        - 0.5 * (c["albumin"] - 3.9) / 0.45
        + 0.4 * (c["hr_mean"] - 78.0) / 9.0
        + 0.8 * sigmoid((c["hr_max"].to_numpy(dtype=float) - 105.0) / 4.0)
        + 0.1 * (c["n_hr"] - 6.0)
    )
    return -2.6 + 1.0 * np.asarray(risk, dtype=float)


def _malignancy(c: pd.DataFrame) -> np.ndarray:
    lesion = c["lesion"].to_numpy(dtype=float)
    r32 = c["lesion_r32"].to_numpy(dtype=float)
    return -3.0 + lesion * (2.6 + 1.3 * (r32 - 2.2))


def _drug_response(c: pd.DataFrame) -> np.ndarray:
    u = c[[f"u{j}" for j in range(6)]].to_numpy(dtype=float)
    return -0.6 + 1.5 * u[:, 0] + 1.2 * u[:, 1] - 1.2 * u[:, 2] + 0.9 * u[:, 0] * u[:, 3]


def _multimodal(c: pd.DataFrame) -> np.ndarray:
    e = 0.6 * c["age_z"].to_numpy() + 0.8 * c["chf"].to_numpy() + 0.5 * _z_creatinine(c) - 0.4
    lesion = c["lesion"].to_numpy(dtype=float)
    i = lesion * (1.2 + 0.6 * (c["lesion_r32"].to_numpy(dtype=float) - 2.2)) - 0.5
    g = 0.7 * (c["u3"].to_numpy() + c["u4"].to_numpy() - c["u5"].to_numpy())
    return -1.7 + 1.25 * e + 1.25 * i + 1.25 * g


#: task name -> definition; a new task is one function and one entry here.
TASKS: dict[str, TaskDef] = {
    t.name: t
    for t in (
        TaskDef(
            name="readmission",
            column="readmission_30d",
            table="ehr",
            modalities=("ehr",),
            description="unplanned readmission within 30 days of discharge",
            signal=(
                "EHR only: age, heart failure, CKD, COPD, admission type, creatinine, "
                "albumin, medication count and the heart-rate event features (a "
                "tachycardia threshold on hr_max) carry the signal."
            ),
            logit=_readmission,
        ),
        TaskDef(
            name="malignancy",
            column="malignancy",
            table="outcomes",
            modalities=("imaging",),
            description="biopsy-confirmed malignancy",
            signal=(
                "Imaging only: the presence of a bright lesion and its radius carry the "
                "signal; lesion contrast, texture and the site's scanner are nuisance."
            ),
            logit=_malignancy,
        ),
        TaskDef(
            name="drug_response",
            column="drug_response",
            table="outcomes",
            modalities=("genomics",),
            description="response to the study drug",
            signal=(
                "Genomics only: three driver genes (d0, d1 up; d2 down) and a d0 x d3 "
                "interaction carry the signal, under per-site batch effects."
            ),
            logit=_drug_response,
        ),
        TaskDef(
            name="multimodal_outcome",
            column="multimodal_outcome",
            table="outcomes",
            modalities=("ehr", "imaging", "genomics"),
            description="one-year adverse outcome",
            signal=(
                "All three modalities add up: an EHR score (age, heart failure, "
                "creatinine), the lesion (presence, radius) and drivers d3 + d4 - d5; "
                "no single modality reaches the joint AUROC."
            ),
            logit=_multimodal,
        ),
    )
}


def true_logits(clean: pd.DataFrame, intercepts: dict[str, float]) -> dict[str, np.ndarray]:
    """Each task's true logit ``eta`` for every row of ``clean`` (site shift included)."""
    return {name: task.logit(clean) + intercepts[name] for name, task in TASKS.items()}


def shrink_in_group(eta: np.ndarray, in_group: np.ndarray, strength: float) -> np.ndarray:
    """``eta`` with the logits of the rows ``in_group`` shrunk toward their mean by
    ``strength`` (a group-dependent shift: the label carries less signal in the group).

    Examples
    --------
    >>> shrink_in_group(np.array([-2.0, 2.0, -1.0, 3.0]), np.array([1, 1, 0, 0], bool), 0.75)
    array([-0.5,  0.5, -1. ,  3. ])
    """
    out = np.asarray(eta, dtype=float).copy()
    mask = np.asarray(in_group, dtype=bool)
    if strength > 0 and mask.any():
        mean = out[mask].mean()
        out[mask] = mean + (1.0 - strength) * (out[mask] - mean)
    return out
