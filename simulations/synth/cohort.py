"""One synthetic site in memory: patients, tables, images and true label probabilities.

:func:`simulate_site` is pure (its randomness comes from ``rng_for(seed, ..., site)``
streams); :mod:`fedcare.simulations.synth.writer` turns its result into files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcare.simulations.synth.config import SynthConfig
from fedcare.simulations.synth.ehr import (
    aggregate_events,
    apply_missingness,
    clean_ehr_table,
    draw_events,
)
from fedcare.simulations.synth.genomics import (
    GeneBiology,
    apply_batch,
    draw_batch,
    draw_expression,
    driver_scores,
)
from fedcare.simulations.synth.imaging import Scanner, apply_scanner, draw_scanner, render_clean
from fedcare.simulations.synth.latent import (
    SiteShift,
    draw_patients,
    draw_site_shift,
    rng_for,
    sigmoid,
)
from fedcare.simulations.synth.survival import EVENT_COLUMN as SURVIVAL_EVENT
from fedcare.simulations.synth.survival import TASK as SURVIVAL_TASK
from fedcare.simulations.synth.survival import TIME_COLUMN as SURVIVAL_TIME
from fedcare.simulations.synth.survival import survival_outcome
from fedcare.simulations.synth.tasks import TASKS, shrink_in_group, true_logits
from fedcare.simulations.synth.timeline import (
    LABEL_COLUMN,
    draw_infection_events,
    temporal_labels,
)
from fedcare.simulations.synth.timeline import TASK as TEMPORAL_TASK

__all__ = ["SyntheticSite", "site_sizes", "simulate_site", "MIN_SITE_PATIENTS"]

MIN_SITE_PATIENTS = 10


@dataclass(frozen=True)
class SyntheticSite:
    """Everything one site holds, before it is written to disk.

    Attributes
    ----------
    ehr:
        ``patient_id``, the schema's EHR columns (with missing cells), ``readmission_30d``.
    events:
        ``patient_id``, ``time``, ``code``, ``value``.
    outcomes:
        ``patient_id`` and the labels kept outside the EHR table (0/1 ints).
    image_ids, images:
        Patients with an image, and their grey levels ``(n_img, S, S)`` float32.
    genomics:
        ``patient_id`` then one column per gene, for patients with genomics.
    truth:
        ``site_id``, ``patient_id``, ``p_<task>`` (true probability), ``y_<task>`` (label).
    """

    index: int
    site_id: str
    ehr: pd.DataFrame
    events: pd.DataFrame
    outcomes: pd.DataFrame
    image_ids: tuple[str, ...]
    images: np.ndarray
    genomics: pd.DataFrame
    truth: pd.DataFrame
    shift: SiteShift
    scanner: Scanner

    @property
    def n_patients(self) -> int:
        return len(self.ehr)


def site_sizes(*, seed: int, n_sites: int, config: SynthConfig) -> list[int]:
    """Patients per site: ``patients_per_site * w_s / mean(w)``, ``w_s = exp(N(0, skew))``.

    Examples
    --------
    >>> site_sizes(seed=0, n_sites=3, config=SynthConfig(size_skew=0.0))
    [300, 300, 300]
    """
    rng = rng_for(seed, "sizes")
    w = np.exp(rng.normal(0.0, 1.0, size=n_sites) * config.size_skew)
    sizes = np.round(config.patients_per_site * w / w.mean()).astype(int)
    return [max(MIN_SITE_PATIENTS, int(n)) for n in sizes]


def _modality_masks(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """(has_imaging, has_genomics): a ``rate`` fraction lacks imaging, genomics or both."""
    lacking = rng.random(n) < rate
    kind = rng.integers(0, 3, size=n)  # 0: no imaging, 1: no genomics, 2: neither
    has_img = ~(lacking & (kind != 1))
    has_gen = ~(lacking & (kind != 0))
    return has_img, has_gen


def simulate_site(
    *, seed: int, index: int, n: int, config: SynthConfig, biology: GeneBiology
) -> SyntheticSite:
    """Generate site ``index`` with ``n`` patients (see ``latent`` for the model)."""
    site_id = f"site-{index}"
    ids = [f"S{index}-{j:05d}" for j in range(n)]
    shift = draw_site_shift(
        rng_for(seed, "site", index),
        covariate_shift=config.covariate_shift,
        prevalence_skew=config.prevalence_skew,
        tasks=tuple(TASKS),
    )
    patients = draw_patients(rng_for(seed, "patients", index), n=n, shift=shift)
    events = draw_events(rng_for(seed, "events", index), patients, ids)
    event_feats = aggregate_events(events, ids)
    clean_ehr = clean_ehr_table(patients, ids)

    gene_clean = draw_expression(rng_for(seed, "genes", index), biology, n=n)
    u = driver_scores(biology, gene_clean)

    clean = clean_ehr.drop(columns=["patient_id"]).assign(
        age_z=(clean_ehr["age"].to_numpy(dtype=float) - 62.0) / 13.0,
        lesion=patients["lesion"].to_numpy(),
        lesion_r32=patients["lesion_r32"].to_numpy(),
        **{name: event_feats[name].to_numpy() for name in event_feats.columns},
        **{f"u{j}": u[:, j] for j in range(u.shape[1])},
    )
    logits = true_logits(clean, shift.intercepts)
    if config.group_shift > 0:  # the fairness report's planted gap: less signal for women
        female = clean_ehr["sex"].to_numpy() == "F"
        logits = {t: shrink_in_group(eta, female, config.group_shift) for t, eta in logits.items()}
    label_rng = rng_for(seed, "labels", index)
    probs = {t: sigmoid(eta) for t, eta in logits.items()}
    labels = {t: (label_rng.random(n) < p).astype(np.int64) for t, p in probs.items()}

    has_img, has_gen = _modality_masks(
        rng_for(seed, "modality", index), n, config.missing_modality_rate
    )

    ehr = apply_missingness(
        rng_for(seed, "missing", index), clean_ehr, rate=config.feature_missing_rate
    )
    outcomes = pd.DataFrame({"patient_id": ids})
    for name, task in TASKS.items():
        target = ehr if task.table == "ehr" else outcomes
        target[task.column] = labels[name]

    img_idx = np.flatnonzero(has_img)
    scanner = draw_scanner(rng_for(seed, "scanner", index), image_size=config.image_size)
    image_rng = rng_for(seed, "images", index)
    clean_images = render_clean(image_rng, patients.iloc[img_idx], image_size=config.image_size)
    images = apply_scanner(image_rng, clean_images, scanner)

    batch = draw_batch(rng_for(seed, "batch", index), n_genes=len(biology.names))
    gen_idx = np.flatnonzero(has_gen)
    observed = apply_batch(biology, batch, gene_clean[gen_idx])
    genomics = pd.concat(
        [
            pd.DataFrame({"patient_id": [ids[i] for i in gen_idx]}),
            pd.DataFrame(observed, columns=list(biology.names)),
        ],
        axis=1,
    )

    if config.temporal_signal:
        # Own streams: the default data (and every other label) is unchanged.
        extra, in_window = draw_infection_events(rng_for(seed, "timeline", index), patients, ids)
        events = pd.concat([events, extra], ignore_index=True)
        events = events.sort_values(["patient_id", "time"], kind="stable", ignore_index=True)
        temporal_rng = rng_for(seed, "timeline_labels", index)
        site_shift = float(temporal_rng.normal()) * config.prevalence_skew
        p_temporal, y_temporal = temporal_labels(temporal_rng, clean, in_window, shift=site_shift)
        outcomes[LABEL_COLUMN] = y_temporal
        probs[TEMPORAL_TASK], labels[TEMPORAL_TASK] = p_temporal, y_temporal

    truth = pd.DataFrame({"site_id": site_id, "patient_id": ids})
    if config.survival:  # own stream: the default data (and every other label) is unchanged
        rng = rng_for(seed, "survival", index)
        event, time, risk = survival_outcome(rng, logits["readmission"])
        outcomes[SURVIVAL_EVENT], outcomes[SURVIVAL_TIME] = event, time
        truth[f"{SURVIVAL_TASK}_risk"] = np.round(risk, 8)
    for t in probs:
        truth[f"p_{t}"] = np.round(probs[t], 8)
    for t in labels:
        truth[f"y_{t}"] = labels[t]
    return SyntheticSite(
        index=index,
        site_id=site_id,
        ehr=ehr,
        events=events,
        outcomes=outcomes,
        image_ids=tuple(ids[i] for i in img_idx),
        images=images,
        genomics=genomics,
        truth=truth,
        shift=shift,
        scanner=scanner,
    )
