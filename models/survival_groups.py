"""Per-group metrics of a survival task: C-index and time-dependent AUC per patient group.

The binary per-group release (:mod:`fedcare.models.fairness`) carries score histograms the
server pools; a survival task's groups are released like its splits
(:func:`fedcare.models.survival.survival_release`):

The mechanism (:func:`release_survival_groups`)
    Per group attribute, each group of each released split is a ``(risk bin, interval,
    event)`` histogram (:func:`fedcare.models.survival_metrics.histogram_contributions`) in
    which one patient is one cell: the groups partition the split and a patient is in one
    split, so one attribute's histograms together are a Gaussian mechanism of L2 sensitivity 1
    at the evaluation's ``σ``, one more step of the evaluation's charge per attribute (as the
    binary groups, :func:`fedcare.models.fairness.release_steps`). Only the metrics derived
    from the noisy counts leave (``n``, ``c_index``, ``td_auc``,
    :func:`~fedcare.models.survival_metrics.metrics_from_histogram`), never the counts. In the
    exact mode (a simulated site's opt-in, ``σ = 0``) the groups' exact metrics leave, as the
    split's do (:meth:`fedcare.models.survival.SurvivalTask.metrics`, without ``ibs``).

Suppression
    A group whose (noisy) count is below the site's ``min_count`` is withheld, and the
    smallest released ones too while the withheld groups together hold 1 to ``min_count - 1``
    patients (:func:`fedcare.models.fairness.suppressed_groups`), so the split's count minus
    the released groups' never isolates a small group. The largest gap of each metric across
    the released groups (``unknown`` left out) is ``<split>.gap.<a>.<metric>``.

Global numbers (:func:`global_survival_group_metrics`)
    As the global survival metrics are the patient-weighted mean of the sites' values, a
    group's global ``c_index`` and ``td_auc`` are the mean of the sites' values for that group
    weighted by the group's (noisy) count at each site; its ``n`` the sum; the gaps are taken
    again over the global groups.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcare.common import keys
from fedcare.common.errors import ConfigError, DataError
from fedcare.models.evaluation import Generator, gaussian_on_grid
from fedcare.models.fairness import suppressed_groups
from fedcare.models.survival import SurvivalTask, event_probability, interval_index
from fedcare.models.survival_metrics import histogram_contributions, metrics_from_histogram

__all__ = [
    "SURVIVAL_GROUP_METRICS",
    "SURVIVAL_GAP_METRICS",
    "release_survival_groups",
    "survival_gaps",
    "check_survival_group_metrics",
    "global_survival_group_metrics",
]

#: What a survival group reports (a subset of :data:`fedcare.common.keys.GROUP_METRICS`).
SURVIVAL_GROUP_METRICS = ("n", "c_index", "td_auc")
#: The metrics whose largest gap across groups is reported.
SURVIVAL_GAP_METRICS = ("c_index", "td_auc")


def survival_gaps(
    per_group: Mapping[int, Mapping[str, float]], *, unknown: int
) -> dict[str, float]:
    """The largest difference (max - min) of each survival gap metric across the groups that
    have it (at least two; the ``unknown`` group left out).

    >>> survival_gaps({0: {"c_index": 0.7}, 1: {"c_index": 0.6}, 2: {"c_index": 0.1}}, unknown=2)
    {'c_index': 0.09999999999999998}
    """
    out: dict[str, float] = {}
    for metric in SURVIVAL_GAP_METRICS:
        values = [m[metric] for g, m in per_group.items() if g != unknown and metric in m]
        if len(values) >= 2:
            out[metric] = float(max(values) - min(values))
    return out


def _exact_group(
    task: SurvivalTask, y: np.ndarray, hazards: np.ndarray, train: np.ndarray | None
) -> dict[str, float]:
    """A group's exact metrics (a metric the group cannot define is absent)."""
    derived = task.metrics(y, hazards, train=train)
    return {k: v for k, v in derived.items() if k in SURVIVAL_GROUP_METRICS}


def release_survival_groups(
    task: SurvivalTask,
    y_by_split: Mapping[str, Any],
    hazards_by_split: Mapping[str, Any],
    codes: Mapping[str, Mapping[str, np.ndarray]],
    n_groups: Mapping[str, int],
    *,
    noise_multiplier: float,
    generator: Generator | None,
    min_count: float,
    train: np.ndarray | None = None,
    bins: int = 10,
) -> dict[str, float]:
    """The survival group releases of one evaluation, as the metrics to send.

    Parameters
    ----------
    task:
        The survival task (its cuts).
    y_by_split, hazards_by_split:
        The released splits' ``(time, event)`` targets and interval hazards (a split the
        evaluation withheld is not given: its groups are withheld with it).
    codes:
        Attribute -> split -> each patient's group index
        (:func:`fedcare.models.fairness.group_codes`).
    n_groups:
        Attribute -> its number of groups (``unknown`` included).
    noise_multiplier:
        ``σ`` of the evaluation (0: exact, a simulated site's opt-in).
    generator:
        The evaluation's noise generator (fresh draws continue from it).
    min_count:
        The site's small-count threshold.
    train:
        The train split's targets (exact mode: the IPCW censoring distribution).
    bins:
        Risk bins of the histograms, as the split's release.

    Returns
    -------
    dict
        ``<split>.group.<a>.<g>.<metric>`` per released group and ``<split>.gap.<a>.<metric>``;
        the caller charges one Gaussian step per attribute for it.
    """
    if noise_multiplier > 0 and generator is None:
        raise ConfigError("a DP survival group release needs a generator for its noise")
    out: dict[str, float] = {}
    for attribute, count in n_groups.items():
        for split in (s for s in keys.EVAL_SPLITS if s in y_by_split):
            y = np.asarray(y_by_split[split], dtype=np.float64).reshape(-1, 2)
            hazards = np.asarray(hazards_by_split[split], dtype=np.float64)
            hazards = hazards.reshape(-1, task.intervals)
            g_of = np.asarray(codes[attribute][split])
            derived: list[dict[str, float]] = []
            for g in range(count):
                yg, hg = y[g_of == g], hazards[g_of == g]
                if noise_multiplier == 0:
                    derived.append(_exact_group(task, yg, hg, train) if yg.size else {"n": 0.0})
                    continue
                assert generator is not None
                cells = histogram_contributions(
                    yg[:, 1],
                    interval_index(yg[:, 0], task.cuts),
                    event_probability(hg) if yg.size else np.zeros(0),
                    intervals=task.intervals,
                    bins=bins,
                ).sum(axis=0)
                if cells.size == 0:
                    cells = np.zeros(bins * (task.intervals + 1) * 2)
                noisy = gaussian_on_grid(cells, std=noise_multiplier, generator=generator)
                counted = metrics_from_histogram(
                    noisy, intervals=task.intervals, bins=bins, min_count=1.0
                )
                derived.append(counted or {"n": float(noisy.sum())})
            hidden = suppressed_groups([d["n"] for d in derived], min_count=min_count)
            per_group = {g: d for g, d in enumerate(derived) if g not in hidden}
            for g, values in per_group.items():
                prefix = keys.group_prefix(split, attribute, g)
                out.update({f"{prefix}.{k}": float(v) for k, v in values.items()})
            for metric, value in survival_gaps(per_group, unknown=count - 1).items():
                out[keys.gap_key(split, attribute, metric)] = value
    return out


def check_survival_group_metrics(metrics: Mapping[str, Any], declared: Mapping[str, int]) -> None:
    """Validate a survival reply's per-group keys (the server's side): every attribute
    declared, every group index within its count, only :data:`SURVIVAL_GROUP_METRICS` and
    :data:`SURVIVAL_GAP_METRICS`, finite values (``n`` at least 0, the rest in [0, 1]).

    Raises
    ------
    DataError
        The first key that breaks a rule, named with the rule.
    """
    for name in (k for k in metrics if keys.is_group_metric(k)):
        parts = name.split(".")
        attribute, rest = parts[2], parts[-1]
        if attribute not in declared:
            raise DataError(f"{name}: group attribute {attribute!r} is not in the schema")
        is_gap = parts[1] == keys.R_GAP
        allowed = SURVIVAL_GAP_METRICS if is_gap else SURVIVAL_GROUP_METRICS
        if len(parts) != (4 if is_gap else 5) or rest not in allowed:
            raise DataError(f"{name}: a survival group reports only {', '.join(allowed)}")
        if not is_gap and int(parts[3]) >= declared[attribute]:
            raise DataError(
                f"{name}: attribute {attribute!r} has groups 0..{declared[attribute] - 1}"
            )
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise DataError(f"{name} is not a number")
        v = float(value)
        hi = math.inf if rest == "n" else 1.0
        if not (math.isfinite(v) and 0.0 <= v <= hi):
            raise DataError(f"{name} = {v!r} is outside [0, {hi:g}]")


def global_survival_group_metrics(
    per_site: Mapping[str, Mapping[str, float]], declared: Mapping[str, int]
) -> dict[str, float]:
    """The global per-group survival metrics: each group's ``c_index`` and ``td_auc`` the
    mean of the sites' values weighted by the group's count at each site, ``n`` the sum, and
    the gaps across the global groups.

    Examples
    --------
    >>> a = {"test.group.sex.0.n": 30.0, "test.group.sex.0.c_index": 0.7,
    ...      "test.group.sex.1.n": 20.0, "test.group.sex.1.c_index": 0.6}
    >>> b = {"test.group.sex.0.n": 10.0, "test.group.sex.0.c_index": 0.5}
    >>> out = global_survival_group_metrics({"a": a, "b": b}, {"sex": 3})
    >>> round(out["test.group.sex.0.c_index"], 3), out["test.group.sex.0.n"]
    (0.65, 40.0)
    >>> round(out["test.gap.sex.c_index"], 3)
    0.05
    """
    out: dict[str, float] = {}
    for attribute, count in declared.items():
        for split in keys.EVAL_SPLITS:
            per_group: dict[int, dict[str, float]] = {}
            for g in range(count):
                prefix = keys.group_prefix(split, attribute, g)
                having = [v for v in per_site.values() if f"{prefix}.n" in v]
                if not having:
                    continue
                values = {"n": float(sum(v[f"{prefix}.n"] for v in having))}
                for metric in SURVIVAL_GAP_METRICS:
                    pairs = [
                        (v[f"{prefix}.{metric}"], max(v[f"{prefix}.n"], 0.0))
                        for v in having
                        if f"{prefix}.{metric}" in v
                    ]
                    weights = np.array([w for _, w in pairs])
                    if pairs and weights.sum() > 0:
                        values[metric] = float(np.average([m for m, _ in pairs], weights=weights))
                per_group[g] = values
                out.update({f"{prefix}.{k}": v for k, v in values.items()})
            for metric, value in survival_gaps(per_group, unknown=count - 1).items():
                out[keys.gap_key(split, attribute, metric)] = value
    return out
