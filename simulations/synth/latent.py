r"""The latent patient model behind every synthetic hospital.

Everything below is exact: the constants named here are the module constants, and the
label logits are computed by :mod:`fedcare.simulations.synth.tasks` from the *clean observable*
values listed there, so the Bayes-optimal predictor of each label is known.

Notation: ``N(m, s)`` is a normal draw with mean ``m`` and sd ``s``; ``z`` is a fresh
``N(0, 1)`` per patient and per line; ``sigmoid(x) = 1 / (1 + exp(-x))``; ``[c]`` is 1
when ``c`` holds. Site ``s`` has a covariate-shift vector ``c_s`` whose entries are
independent ``N(0, covariate_shift)`` draws (one entry for frailty, age, BMI and each lab).

Patient (one site, all independent across patients)
---------------------------------------------------
frailty          ``F = c_s.frailty + z``                         (latent, never written)
age              ``round(62 + 13 * c_s.age + 5 * F + 12 * z)``, clipped to [18, 100];
                 its standard score is ``age_z = (age - 62) / 13``
sex              ``"F"`` or ``"M"``, probability 1/2 each
smoking          ``never / former / current`` with probabilities 0.5 / 0.3 / 0.2
admission_type   softmax over ``(elective, urgent, emergency)`` of logits
                 ``(0, 0.2 + 0.5 F, 0.1 + 1.0 F)``
comorbidity k    ``Bernoulli(sigmoid(a_k + b_k F + c_k age_z + d_k [former] + e_k [current]))``
                 with ``(a, b, c, d, e)`` from :data:`COMORBIDITIES` (diabetes,
                 hypertension, ckd, copd, chf)
n_medications    ``Poisson(1 + 1.3 * n_comorbidities + 0.5 * max(F, 0))``
anticoagulant    ``Bernoulli(sigmoid(-2 + 1.5 chf + 0.5 age_z))``
bmi              ``27 + 1.5 diabetes + 4.5 * (c_s.bmi + z)``, clipped to [14, 60]
spo2             ``97 - 1.0 max(F, 0) - 2 copd + 1.2 z``, clipped to [70, 100]
lab l            on its scale (log for creatinine, wbc, crp):
                 ``mu_l + effects_l + sd_l * (c_s.l + z)`` with ``mu_l``, ``sd_l`` and the
                 effects from :data:`LABS`, then clipped to the schema range
vital baselines  ``hr_base = 78 + 5 F + 8 z``; ``sbp_base = 128 - 4 F + 14 z``;
                 ``temp_base = 36.9 + 0.25 max(F, 0) + 0.3 z``
length of stay   ``los_hours = 24 * exp(0.8 + 0.3 F + 0.4 z)``, clipped to [12, 720]

Longitudinal events (:mod:`fedcare.simulations.synth.ehr`)
--------------------------------------------------
``n_vitals = 2 + Poisson(2 + 4 sigmoid(F))`` vital-sign rounds at sorted times
``Uniform(0, los_hours)``; each round records ``HR = hr_base + N(0, 7)``,
``SBP = sbp_base + N(0, 10)`` and ``TEMP = temp_base + N(0, 0.35)`` (rounded to 0.1).
The event features are exact aggregates of these rows: ``hr_mean``, ``hr_max``,
``n_hr`` (count), ``sbp_last``, ``sbp_min``, ``temp_max``.

Tumour (imaging, :mod:`fedcare.simulations.synth.imaging`)
--------------------------------------------------
tumour load      ``T = 0.45 age_z + 0.3 [former] + 0.6 [current] + z``
lesion present   ``[T > 0.3]``
lesion radius    ``r32 = clip(1.6 + 1.2 (T - 0.3) + 0.5 z, 1.2, 6)`` pixels of a 32-pixel
                 image (``r32 * image_size / 32`` pixels on the real grid); 0 when absent
lesion contrast  ``Uniform(0.22, 0.38)`` (nuisance: carries no label signal)
The lesion is a bright soft-edged disc inside a body ellipse; the site's scanner then
blurs, scales, offsets and adds noise (see :mod:`fedcare.simulations.synth.imaging`).

Gene expression (:mod:`fedcare.simulations.synth.genomics`)
---------------------------------------------------
Clean log-expression ``x_g = mu_g + L_g . f + sigma_g z`` with federation-wide
``mu_g``, loadings ``L_g`` (5 factors) and ``sigma_g``, and patient factors ``f ~ N(0, I)``.
Six *driver* genes ``d_0..d_5`` have standard scores ``u_j = (x_dj - mu_dj) / sd_dj``,
``sd_dj = sqrt(|L_dj|^2 + sigma_dj^2)`` (exact population sd). The file holds the
site-batched values ``mu_g + shift_sg + scale_sg (x_g - mu_g)``.

Labels (:mod:`fedcare.simulations.synth.tasks`)
---------------------------------------
Each label is ``Bernoulli(sigmoid(eta))`` where ``eta`` adds the site's intercept shift
``delta_{s,task} ~ N(0, prevalence_skew)`` to a function of clean observables only:
readmission (EHR), malignancy (lesion presence and radius), drug_response (driver genes)
and multimodal_outcome (one score per modality). The Bayes-optimal probability is
``sigmoid(eta)``; with missing EHR cells, scanner noise and batch effects a model sees
a noisier version, so the manifest's Bayes AUROC is an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "COMORBIDITIES",
    "LABS",
    "SMOKING",
    "ADMISSION",
    "SEXES",
    "SiteShift",
    "rng_for",
    "draw_site_shift",
    "draw_patients",
    "sigmoid",
]

SEXES: tuple[str, ...] = ("F", "M")
SMOKING: tuple[str, ...] = ("never", "former", "current")
SMOKING_P: tuple[float, ...] = (0.5, 0.3, 0.2)
ADMISSION: tuple[str, ...] = ("elective", "urgent", "emergency")

#: name -> (a, b, c, d, e): logit a + b F + c age_z + d [former smoker] + e [current smoker]
COMORBIDITIES: dict[str, tuple[float, float, float, float, float]] = {
    "diabetes": (-1.4, 0.5, 0.3, 0.0, 0.0),
    "hypertension": (-0.4, 0.4, 0.7, 0.0, 0.0),
    "ckd": (-2.0, 0.7, 0.5, 0.0, 0.0),
    "copd": (-2.6, 0.5, 0.3, 0.6, 1.2),
    "chf": (-2.2, 0.8, 0.5, 0.0, 0.0),
}


@dataclass(frozen=True)
class Lab:
    """One lab: ``value = mu + effects + sd * (site shift + z)`` on its (log) scale."""

    mu: float
    sd: float
    log: bool
    frailty: float = 0.0
    ckd: float = 0.0
    diabetes: float = 0.0
    female: float = 0.0
    lo: float = 0.0
    hi: float = 1e9
    unit: str = ""
    decimals: int = 2


#: The labs, their scale and effects (frailty F, ckd, diabetes, female sex), schema range.
LABS: dict[str, Lab] = {
    "creatinine": Lab(
        np.log(0.95), 0.18, True, frailty=0.12, ckd=0.6, lo=0.1, hi=20.0, unit="mg/dL"
    ),
    "hemoglobin": Lab(
        13.5,
        1.3,
        False,
        frailty=-0.6,
        ckd=-0.8,
        female=-0.6,
        lo=3.0,
        hi=22.0,
        unit="g/dL",
        decimals=1,
    ),
    "wbc": Lab(np.log(7.5), 0.3, True, frailty=0.15, lo=0.1, hi=100.0, unit="10^9/L", decimals=1),
    "sodium": Lab(139.0, 3.0, False, frailty=-0.8, lo=100.0, hi=180.0, unit="mmol/L", decimals=0),
    "albumin": Lab(3.9, 0.4, False, frailty=-0.3, lo=0.5, hi=6.5, unit="g/dL", decimals=1),
    "crp": Lab(np.log(8.0), 0.9, True, frailty=0.5, lo=0.1, hi=500.0, unit="mg/L", decimals=1),
    "glucose": Lab(
        105.0, 15.0, False, frailty=5.0, diabetes=40.0, lo=20.0, hi=1000.0, unit="mg/dL", decimals=0
    ),
}

# Independent random streams: changing one concept's draws never perturbs another's.
_STREAMS: dict[str, int] = {
    "sizes": 11,
    "biology": 12,
    "site": 21,
    "patients": 22,
    "events": 23,
    "missing": 24,
    "modality": 25,
    "images": 26,
    "scanner": 27,
    "genes": 28,
    "batch": 29,
    "labels": 30,
    "timeline": 31,
    "timeline_labels": 32,
    "survival": 33,
}


def rng_for(seed: int, stream: str, site: int | None = None) -> np.random.Generator:
    """The generator for one named stream, federation-wide or of one site.

    Parameters
    ----------
    seed:
        The run's seed (non-negative).
    stream:
        A stream name (``"patients"``, ``"images"``, ...); unknown names raise ``KeyError``.
    site:
        The site index, or ``None`` for a federation-wide stream.

    Examples
    --------
    >>> a = rng_for(0, "patients", 1).random()
    >>> b = rng_for(0, "patients", 1).random()
    >>> a == b, a == rng_for(0, "patients", 2).random()
    (True, False)
    """
    words = [seed, _STREAMS[stream]] if site is None else [seed, _STREAMS[stream], 1, site]
    return np.random.default_rng(np.random.SeedSequence(words))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, elementwise."""
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class SiteShift:
    """A site's covariate shift (sd units) and its per-task label intercept shifts."""

    frailty: float
    age: float
    bmi: float
    labs: dict[str, float]
    intercepts: dict[str, float]


def draw_site_shift(
    rng: np.random.Generator,
    *,
    covariate_shift: float,
    prevalence_skew: float,
    tasks: tuple[str, ...],
) -> SiteShift:
    """Draw one site's shift vector ``c_s`` and its intercept shifts ``delta_{s,task}``."""
    cov = rng.normal(0.0, 1.0, size=3 + len(LABS)) * covariate_shift
    delta = rng.normal(0.0, 1.0, size=len(tasks)) * prevalence_skew
    return SiteShift(
        frailty=float(cov[0]),
        age=float(cov[1]),
        bmi=float(cov[2]),
        labs={name: float(v) for name, v in zip(LABS, cov[3:], strict=True)},
        intercepts={t: float(d) for t, d in zip(tasks, delta, strict=True)},
    )


def _categorical(rng: np.random.Generator, logits: np.ndarray) -> np.ndarray:
    """Index draws from row-wise softmax(``logits``) (shape n x k)."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random(len(p))[:, None]
    return np.minimum((u > np.cumsum(p, axis=1)).sum(axis=1), p.shape[1] - 1)


def draw_patients(rng: np.random.Generator, *, n: int, shift: SiteShift) -> pd.DataFrame:
    """Draw ``n`` patients' latent variables and clean (complete) observables.

    Returns
    -------
    pandas.DataFrame
        One row per patient: ``frailty``, ``age``, ``age_z``, ``sex``, ``smoking``,
        ``admission_type``, the comorbidities, ``n_medications``, ``anticoagulant``,
        ``bmi``, ``spo2``, the labs (natural units), ``hr_base``, ``sbp_base``,
        ``temp_base``, ``los_hours``, ``tumour``, ``lesion``, ``lesion_r32``,
        ``lesion_contrast``.
    """
    z = lambda: rng.standard_normal(n)  # noqa: E731 - a fresh N(0, 1) per patient
    frailty = shift.frailty + z()
    age = np.clip(np.round(62.0 + 13.0 * shift.age + 5.0 * frailty + 12.0 * z()), 18, 100)
    age_z = (age - 62.0) / 13.0
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    smoke_idx = rng.choice(len(SMOKING), size=n, p=SMOKING_P)
    former = (smoke_idx == 1).astype(float)
    current = (smoke_idx == 2).astype(float)
    adm_logits = np.stack([np.zeros(n), 0.2 + 0.5 * frailty, 0.1 + 1.0 * frailty], axis=1)
    adm_idx = _categorical(rng, adm_logits)
    out: dict[str, np.ndarray] = {
        "frailty": frailty,
        "age": age.astype(int),
        "age_z": age_z,
        "sex": sex,
        "smoking": np.asarray(SMOKING, dtype=object)[smoke_idx],
        "admission_type": np.asarray(ADMISSION, dtype=object)[adm_idx],
    }
    n_comorb = np.zeros(n)
    for name, (a, b, c, d, e) in COMORBIDITIES.items():
        logit = a + b * frailty + c * age_z + d * former + e * current
        has = (rng.random(n) < sigmoid(logit)).astype(int)
        out[name] = has
        n_comorb += has
    out["n_medications"] = rng.poisson(1.0 + 1.3 * n_comorb + 0.5 * np.maximum(frailty, 0.0))
    out["anticoagulant"] = (rng.random(n) < sigmoid(-2.0 + 1.5 * out["chf"] + 0.5 * age_z)).astype(
        int
    )
    out["bmi"] = np.clip(27.0 + 1.5 * out["diabetes"] + 4.5 * (shift.bmi + z()), 14.0, 60.0)
    out["spo2"] = np.clip(
        97.0 - 1.0 * np.maximum(frailty, 0.0) - 2.0 * out["copd"] + 1.2 * z(), 70.0, 100.0
    )
    female = (sex == "F").astype(float)
    for name, lab in LABS.items():
        value = (
            lab.mu
            + lab.frailty * frailty
            + lab.ckd * out["ckd"]
            + lab.diabetes * out["diabetes"]
            + lab.female * female
            + lab.sd * (shift.labs[name] + z())
        )
        if lab.log:
            value = np.exp(value)
        out[name] = np.clip(value, lab.lo, lab.hi)
    out["hr_base"] = 78.0 + 5.0 * frailty + 8.0 * z()
    out["sbp_base"] = 128.0 - 4.0 * frailty + 14.0 * z()
    out["temp_base"] = 36.9 + 0.25 * np.maximum(frailty, 0.0) + 0.3 * z()
    out["los_hours"] = np.clip(24.0 * np.exp(0.8 + 0.3 * frailty + 0.4 * z()), 12.0, 720.0)
    tumour = 0.45 * age_z + 0.3 * former + 0.6 * current + z()
    lesion = (tumour > 0.3).astype(int)
    r32 = np.clip(1.6 + 1.2 * (tumour - 0.3) + 0.5 * z(), 1.2, 6.0)
    out["tumour"] = tumour
    out["lesion"] = lesion
    out["lesion_r32"] = np.where(lesion == 1, r32, 0.0)
    out["lesion_contrast"] = rng.uniform(0.22, 0.38, size=n)
    return pd.DataFrame(out)
