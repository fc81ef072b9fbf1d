"""Feature attributions of a model, released by a site as a noisy sum, aggregated by the server.

Why a model flags a patient is asked per feature (which EHR columns, which genes) and per
modality (which of EHR, imaging and genomics drove a fusion model). A site answers from its
own patients only, and nothing per patient leaves it:

Attributions (:func:`integrated_gradients`)
    Integrated gradients (Sundararajan et al., 2017) of the model's logit, computed with
    Captum's ``IntegratedGradients`` against an all-zero baseline in the encoded input space
    (for standardized numeric columns the train split's mean patient; for one-hot columns "no
    category"; for images the normalised mean intensity). By completeness, a patient's
    signed attributions sum to ``logit(x) - logit(baseline)`` up to the integral's
    approximation error (``steps`` points of Gauss-Legendre quadrature).

What one patient contributes (:func:`contributions`)
    The patient's *absolute* attributions summed per named group (a schema feature, whose
    one-hot or missing-flag columns are summed; a whole image; a gene), giving an importance
    row ``a`` of ``F`` non-negative numbers. The row is clipped to L2 norm ``C`` and scaled by
    ``1/C``, so it has norm at most 1, and a count coordinate 1 is appended: over the release
    one patient's contribution vector has L2 norm at most :data:`SENSITIVITY` ``= sqrt(2)``.

The mechanism (:func:`release`)
    The exact sums plus independent ``N(0, (σ Δ)^2)`` noise on every coordinate, rounded to
    :data:`fedcare.models.evaluation.NOISE_GRID`: under add/remove-one-patient adjacency the
    Gaussian mechanism with noise multiplier ``σ``, i.e. the ledger's
    ``Mechanism(noise_multiplier=σ, sample_rate=1.0, steps=1)``, which the site charges before
    it releases. Everything below is post-processing of noisy sums.

Importances (:func:`importances_from_release`)
    A feature's importance is ``C * sum / n``: the mean absolute attribution of the clipped
    rows, in logit units. A release whose noisy ``n`` is below the site's ``min_count`` is
    withheld whole. The server sums the sites' releases coordinate-wise
    (:func:`sum_releases`) and derives the global importances with the same function, so per
    site and global numbers are always the same computation. A modality's share
    (:func:`modality_shares`) is the sum of its features' importances over all features'.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedcare.common.encoding import (
    encoded_names,
    task_ehr_features,
    task_timeline,
    timeline_width,
)
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.spec import MODALITIES, FeatureSchema, TaskSpec
from fedcare.models.evaluation import Generator, check_release_noise, gaussian_on_grid

__all__ = [
    "SENSITIVITY",
    "DEFAULT_CLIP",
    "DEFAULT_STEPS",
    "InputPart",
    "task_parts",
    "task_features",
    "AttributionRelease",
    "integrated_gradients",
    "contributions",
    "release",
    "sum_releases",
    "importances_from_release",
    "modality_shares",
]

#: L2 bound of one patient's contribution vector: a clipped row of norm <= 1 and a count 1.
SENSITIVITY = math.sqrt(2.0)
#: Default clipping bound ``C`` of a patient's importance row, in logit units.
DEFAULT_CLIP = 2.0
#: Default number of steps of the integral's Riemann sum (Gauss-Legendre in Captum).
DEFAULT_STEPS = 32


@dataclass(frozen=True)
class InputPart:
    """What one model input holds, for naming its attributions.

    ``modality`` is ``"ehr"``, ``"imaging"`` or ``"genomics"``. ``groups`` names the feature
    of each of the input's columns in order (``(B, d)`` inputs; several columns may share a
    feature, e.g. ``sex=F`` and ``sex=M`` both belong to ``sex``); ``None`` makes the whole
    input one group named after the modality (an image). An input that is not a patient's
    data (a fusion model's modality mask) is passed as ``None`` instead of a part.
    """

    modality: str
    groups: tuple[str, ...] | None = None

    def names(self) -> tuple[str, ...]:
        """The part's feature names, in first-seen order."""
        if self.groups is None:
            return (self.modality,)
        return tuple(dict.fromkeys(self.groups))


def _ehr_groups(schema: FeatureSchema, task: TaskSpec) -> tuple[str, ...]:
    groups = [f.name for f in task_ehr_features(schema, task) for _ in encoded_names(f)]
    timeline = task_timeline(schema, task)
    if timeline is not None:  # appended to the EHR vector: one feature for the whole sequence
        groups += [f"timeline {timeline.name}"] * timeline_width(timeline)
    return tuple(groups)


def task_parts(schema: FeatureSchema, task: TaskSpec) -> tuple[InputPart, ...]:
    """The parts of ``task``'s model inputs that are patient data, in
    :data:`~fedcare.common.spec.MODALITIES` order, named from the shared schema alone (so a
    site and the server name the same features): an EHR feature's one-hot and missing-flag
    columns belong to it, a timeline is one feature, a gene is one, an image is one."""
    parts: list[InputPart] = []
    for modality in MODALITIES:
        if modality not in task.modalities:
            continue
        if modality == "ehr":
            parts.append(InputPart("ehr", _ehr_groups(schema, task)))
        elif modality == "genomics":
            if schema.genomics is None:
                raise ConfigError(f"task {task.name!r} reads genomics but the schema has none")
            parts.append(InputPart("genomics", tuple(schema.genomics.features)))
        else:
            parts.append(InputPart(modality, None))
    return tuple(parts)


def task_features(schema: FeatureSchema, task: TaskSpec) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(features, modalities)`` of ``task``'s attributions, as :func:`integrated_gradients`
    and :func:`release` name them."""
    features, modalities = _feature_layout(task_parts(schema, task))
    return tuple(features), tuple(modalities)


@dataclass(frozen=True)
class AttributionRelease:
    """Noisy sums of the clipped importance rows (``sums``, one per feature) and the noisy
    patient count ``n``, with the feature names, modalities and the clip bound ``C``."""

    features: tuple[str, ...]
    modalities: tuple[str, ...]
    sums: tuple[float, ...]
    n: float
    clip: float

    def __post_init__(self) -> None:
        if not (len(self.features) == len(self.modalities) == len(self.sums)):
            raise DataError(
                f"an attribution release needs one sum and one modality per feature: "
                f"{len(self.features)} features, {len(self.modalities)} modalities, "
                f"{len(self.sums)} sums"
            )
        if not all(math.isfinite(v) for v in (*self.sums, self.n, self.clip)) or self.clip <= 0:
            raise DataError("an attribution release holds only finite sums and a clip > 0")


def _feature_layout(parts: Sequence[InputPart | None]) -> tuple[list[str], list[str]]:
    features: list[str] = []
    modalities: list[str] = []
    for part in parts:
        if part is None:
            continue
        for name in part.names():
            label = f"{part.modality}:{name}"
            if label in features:
                raise ConfigError(f"feature {label!r} is named by two model inputs")
            features.append(label)
            modalities.append(part.modality)
    return features, modalities


def integrated_gradients(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    parts: Sequence[InputPart | None],
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Per-patient absolute attributions per named feature: ``(rows (n, F), features,
    modalities)``.

    ``inputs`` are the model's inputs for ``n`` patients (as a dataset item's tensors
    stacked, without the label); ``parts[i]`` names input ``i`` (``None``: not attributed,
    passed through unchanged, e.g. a modality mask). A feature is named
    ``"<modality>:<name>"``. The model is evaluated in ``eval()`` mode, its mode restored.
    """
    from captum.attr import IntegratedGradients  # imported where used: ~0.5 s

    if len(inputs) != len(parts):
        raise ConfigError(f"{len(inputs)} model inputs but {len(parts)} input descriptions")
    if steps < 2:
        raise ConfigError(f"integrated gradients need at least 2 steps, got {steps}")
    attributed = [i for i, p in enumerate(parts) if p is not None]
    if not attributed:
        raise ConfigError("no model input is a patient's data: nothing to attribute")
    for i in attributed:
        part = parts[i]
        assert part is not None
        width = int(inputs[i][0].numel()) if inputs[i].shape[0] else 0
        if part.groups is not None and inputs[i].dim() == 2 and len(part.groups) != width:
            raise ConfigError(
                f"input {i} ({part.modality}) has {width} columns but {len(part.groups)} names"
            )
    features, modalities = _feature_layout(parts)
    n = int(inputs[0].shape[0])
    rows = np.zeros((n, len(features)), dtype=np.float64)
    if n == 0:
        return rows, tuple(features), tuple(modalities)
    passed = [i for i in range(len(parts)) if parts[i] is None]
    order = attributed + passed  # the wrapper's argument order -> the model's

    def logits(*xs: torch.Tensor) -> torch.Tensor:
        # Captum passes the attributed inputs first and the others (expanded to its
        # n_steps-fold batch) as additional arguments; the model takes them in its order.
        full: list[torch.Tensor | None] = [None] * len(parts)
        for position, x in zip(order, xs, strict=True):
            full[position] = x
        return model(*full)

    ig = IntegratedGradients(logits)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            batch = [t[start : start + batch_size] for t in inputs]
            chosen = tuple(batch[i].float() for i in attributed)
            attrs = ig.attribute(
                chosen,
                baselines=tuple(torch.zeros_like(x) for x in chosen),
                additional_forward_args=tuple(batch[i] for i in passed) or None,
                n_steps=steps,
            )
            col = 0
            for i, a in zip(attributed, attrs, strict=True):
                part = parts[i]
                assert part is not None
                flat = a.detach().abs().reshape(a.shape[0], -1).double().numpy()
                if part.groups is None:
                    rows[start : start + len(flat), col] = flat.sum(axis=1)
                    col += 1
                    continue
                names = part.names()
                index = {name: j for j, name in enumerate(names)}
                for c, group in enumerate(part.groups):
                    rows[start : start + len(flat), col + index[group]] += flat[:, c]
                col += len(names)
    finally:
        model.train(was_training)
    return rows, tuple(features), tuple(modalities)


def contributions(rows: np.ndarray, *, clip: float = DEFAULT_CLIP) -> np.ndarray:
    """Each patient's contribution vector: the row clipped to norm ``clip`` and divided by
    it, then a count 1 (L2 norm <= :data:`SENSITIVITY`).

    >>> contributions(np.array([[3.0, 4.0], [0.3, 0.4]]), clip=1.0).round(2).tolist()
    [[0.6, 0.8, 1.0], [0.3, 0.4, 1.0]]
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"the attribution clip must be a finite number > 0, got {clip!r}")
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or not np.isfinite(rows).all() or (rows < 0).any():
        raise DataError("importance rows must be a 2-D array of finite values >= 0")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scale = 1.0 / np.maximum(norms, clip)  # norm <= clip: 1/clip; larger: onto norm 1
    return np.hstack([rows * scale, np.ones((rows.shape[0], 1))])


def release(
    rows: np.ndarray,
    features: Sequence[str],
    modalities: Sequence[str],
    *,
    noise_multiplier: float,
    generator: Generator | None,
    clip: float = DEFAULT_CLIP,
) -> AttributionRelease:
    """The site's release: the contributions' sums plus ``N(0, (σ Δ)^2)`` per coordinate.

    ``σ = 0`` is the exact mode (no noise), as for the evaluation release; a site charges
    ``Mechanism(σ, 1.0, 1)`` to its ledger before calling this with ``σ > 0``.
    """
    check_release_noise(noise_multiplier, generator, what="attribution")
    exact = contributions(rows, clip=clip).sum(axis=0)
    if noise_multiplier > 0:
        assert generator is not None
        exact = gaussian_on_grid(exact, std=noise_multiplier * SENSITIVITY, generator=generator)
    return AttributionRelease(
        features=tuple(features),
        modalities=tuple(modalities),
        sums=tuple(float(v) for v in exact[:-1]),
        n=float(exact[-1]),
        clip=float(clip),
    )


def sum_releases(releases: Sequence[AttributionRelease]) -> AttributionRelease | None:
    """The coordinate-wise sum of the sites' releases (same features and clip), or None."""
    if not releases:
        return None
    first = releases[0]
    for other in releases[1:]:
        if other.features != first.features or other.clip != first.clip:
            raise DataError(
                "attribution releases of different features or clip bounds cannot be summed"
            )
    return AttributionRelease(
        features=first.features,
        modalities=first.modalities,
        sums=tuple(float(sum(r.sums[j] for r in releases)) for j in range(len(first.sums))),
        n=float(sum(r.n for r in releases)),
        clip=first.clip,
    )


def importances_from_release(rel: AttributionRelease, *, min_count: int) -> dict[str, float] | None:
    """Mean clipped absolute attribution per feature (``C * sum / n``, negative noisy sums
    clipped to 0), or None when the noisy ``n`` is below ``min_count`` (withheld whole).

    >>> r = AttributionRelease(("ehr:age", "ehr:bmi"), ("ehr", "ehr"), (5.0, 2.5), 10.0, 2.0)
    >>> importances_from_release(r, min_count=5)
    {'ehr:age': 1.0, 'ehr:bmi': 0.5}
    >>> importances_from_release(r, min_count=11) is None
    True
    """
    if rel.n < max(min_count, 1):
        return None
    return {f: rel.clip * max(s, 0.0) / rel.n for f, s in zip(rel.features, rel.sums, strict=True)}


def modality_shares(
    importances: Mapping[str, float], modalities: Mapping[str, str]
) -> dict[str, float]:
    """Each modality's share of the total importance (shares sum to 1; all 0 if none).

    >>> modality_shares({"ehr:age": 3.0, "genomics:g1": 1.0},
    ...                 {"ehr:age": "ehr", "genomics:g1": "genomics"})
    {'ehr': 0.75, 'genomics': 0.25}
    """
    totals: dict[str, float] = {}
    for feature, value in importances.items():
        totals[modalities[feature]] = totals.get(modalities[feature], 0.0) + value
    whole = sum(totals.values())
    return {m: (v / whole if whole > 0 else 0.0) for m, v in totals.items()}
