r"""The synthetic time-to-event task: time to readmission or death, right-censored.

With ``SynthConfig(survival=True)`` every site's outcomes table gains ``survival_event``
(1: the event happened, 0: censored) and ``survival_time`` (days), and its ``site.toml``
the survival label ``survival`` and the EHR task ``survival``, drawn from their own random
stream (the default data is unchanged):

``T ~ Weibull(shape 1.3)`` with hazard ``h(t) = h_0(t) exp(0.8 (eta - mean_eta))``, where
``eta`` is the site's true readmission logit (EHR risk and the site's intercept shift, so the
sites differ in baseline risk) and the baseline median is two years. Censoring is
administrative, uniform between one and five years of follow-up; times are whole days (at
least 1). The hazard intervals (the label's ``cuts``) are yearly to five years: a fixed
clinical horizon of the federation's shared spec, not fitted to any site.
"""

from __future__ import annotations

import numpy as np

from fedcare.common.spec import LabelSpec, TaskSpec

__all__ = [
    "TASK",
    "EVENT_COLUMN",
    "TIME_COLUMN",
    "CUTS",
    "SHAPE",
    "BETA",
    "survival_outcome",
    "survival_tasks",
]

TASK = "survival"
EVENT_COLUMN = "survival_event"
TIME_COLUMN = "survival_time"
DAYS_PER_YEAR = 365.25
CUTS: tuple[float, ...] = tuple(round(k * DAYS_PER_YEAR, 2) for k in range(1, 6))
SHAPE = 1.3
BETA = 0.8
_MEDIAN_DAYS = 2 * DAYS_PER_YEAR
DESCRIPTION = "time to readmission or death (days): event (1) or censored (0)"
SIGNAL = (
    "EHR only: the readmission risk score (age, heart failure, CKD, COPD, labs, heart-rate "
    "events) sets a Weibull hazard; follow-up is censored between one and five years."
)


def survival_outcome(
    rng: np.random.Generator, eta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(event, time_days, risk)`` for patients with true logits ``eta``.

    ``risk`` is the true linear predictor ``BETA (eta - mean)`` (the truth file records it;
    a C-index of the truth is the best a model can reach).

    Examples
    --------
    >>> e, t, r = survival_outcome(np.random.default_rng(0), np.zeros(1000))
    >>> round(float(e.mean()), 2), int(t.min()) >= 1
    (0.63, True)
    """
    risk = BETA * (eta - float(np.mean(eta)))
    # Weibull with S(t) = exp(-(t / scale)^k exp(risk)); median at risk 0 is _MEDIAN_DAYS.
    scale = _MEDIAN_DAYS / np.log(2.0) ** (1.0 / SHAPE)
    u = rng.uniform(size=eta.shape)
    t = scale * (-np.log1p(-u) * np.exp(-risk)) ** (1.0 / SHAPE)
    censor = rng.uniform(1.0, 5.0, size=eta.shape) * DAYS_PER_YEAR
    event = (t <= censor).astype(np.int64)
    time = np.maximum(np.ceil(np.minimum(t, censor)), 1.0)
    return event, time, risk


def survival_tasks(
    outcomes_table: str, *, groups: tuple[str, ...] = ()
) -> tuple[tuple[LabelSpec, ...], tuple[TaskSpec, ...]]:
    """The survival label and its EHR task for ``site.toml``."""
    label = LabelSpec(
        name=TASK,
        table=outcomes_table,
        column=EVENT_COLUMN,
        positive=1,
        kind="survival",
        time_column=TIME_COLUMN,
        cuts=CUTS,
        time_unit="days",
        description=DESCRIPTION,
    )
    task = TaskSpec(name=TASK, label=TASK, modalities=("ehr",), description=SIGNAL, groups=groups)
    return (label,), (task,)
