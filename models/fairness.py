"""Fairness across patient groups: per-group metrics as a private, summable release.

A task may name group attributes (``[[tasks]] groups``, defined federation-wide by
``[[schema.groups]]``: sex, an age band, any category). Every evaluation of the task then
releases, per split and per group of each attribute, the same noisy sums a split's release
holds (:class:`fedcare.models.evaluation.SplitSums`: score-bin x label histogram, bin
offsets, clipped loss and Brier sums) and the metrics derived from them
(:data:`fedcare.common.keys.GROUP_METRICS`): ``n``, ``auroc``, ``tpr`` and ``fpr`` at the
evaluation's decision threshold, ``ece``, ``brier``, ``mean_predicted``, ``observed`` and
``calibration_error`` (mean predicted minus observed), plus the largest difference across
the released groups (``gap``, :data:`fedcare.common.keys.GAP_METRICS`; the ``unknown`` group
of patients without a value is released but not compared).

Privacy
    A patient is in one split and in exactly one group of an attribute (a missing value is
    the ``unknown`` group), so one attribute's release over every split and group moves by at
    most one patient's contribution vector, of L2 norm at most
    :data:`~fedcare.models.evaluation.SENSITIVITY`. With the evaluation's noise ``σ Δ`` on
    every coordinate it is one more Gaussian mechanism of multiplier ``σ``: an evaluation of
    a task with ``G`` attributes is charged ``G`` more steps (:func:`release_steps`),
    planned into the run's ε from its first round. Everything derived (metrics, gaps,
    suppression, the server's pooled metrics) is post-processing.

Small-count suppression that subtraction cannot undo
    A group whose (noisy) count is below the site's ``min_count`` is withheld; and since the
    groups partition the split, whose own sums are released, the withheld groups together
    could be recovered by subtracting the released ones from the split. So while the
    withheld groups' counts add up to more than 0 but less than ``min_count``, the smallest
    released group is withheld too (complementary suppression, :func:`suppressed_groups`):
    whatever subtraction recovers is an aggregate of at least ``min_count`` patients, or of
    none. A split that is itself withheld releases no group.

Global metrics
    The server adds the sites' group releases up, group by group (coarsened to a common
    number of bins where sites differ, :func:`coarsen`), and derives the same metrics at the
    pooled decision threshold (:func:`global_fairness_metrics`); it also derives the global
    calibration curve of the test split (:func:`global_calibration`), which the run record
    keeps beside the global metrics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcare.common import keys
from fedcare.common.spec import FeatureSchema, GroupAttribute
from fedcare.models.evaluation import (
    MAX_RELEASE_VALUE,
    OFFSET_WEIGHT,
    SENSITIVITY,
    Generator,
    MalformedRelease,
    SplitSums,
    add_noise,
    exact_sums,
    threshold_from_release,
)

__all__ = [
    "UNKNOWN",
    "CALIBRATION_BINS",
    "declared_groups",
    "group_codes",
    "release_steps",
    "suppressed_groups",
    "group_metrics_from_release",
    "gaps",
    "release_groups",
    "group_releases_from_wire",
    "coarsen",
    "calibration_curve",
    "global_calibration",
    "global_fairness_metrics",
]

UNKNOWN = "unknown"
"""The last group of every attribute: patients whose value is missing."""

CALIBRATION_BINS = 10
"""Bins of the global calibration curve (a release with more is coarsened to these)."""

#: Where each group metric lives: ``calibration_error`` in [-1, 1], ``n`` >= 0, others [0, 1].
_RANGES = {"n": (0.0, math.inf), "calibration_error": (-1.0, 1.0)}
_GAP_RANGES = {"calibration_error": (0.0, 2.0)}


def declared_groups(schema: FeatureSchema, names: Sequence[str] | None = None) -> dict[str, int]:
    """Attribute -> its number of groups on the wire (the ``unknown`` group included).

    ``names``: only these attributes (a task's ``groups``), in that order; default: all.

    Examples
    --------
    >>> from fedcare.common.spec import Feature
    >>> s = FeatureSchema(ehr=(Feature(name="age", kind="numeric"),),
    ...                   groups=(GroupAttribute(name="age_band", column="age", cuts=(50,)),))
    >>> declared_groups(s)
    {'age_band': 3}
    """
    chosen = [g.name for g in schema.groups] if names is None else list(names)
    return {name: len(schema.group_labels(name)) for name in chosen}


def group_codes(schema: FeatureSchema, attribute: str, values: Sequence[Any]) -> np.ndarray:
    """Each patient's group index of ``attribute`` from their raw column values.

    Categorical: the category's position; binary: the value (0 or 1); numeric: the band
    (``cuts[i-1] <= v < cuts[i]``). A missing value (``None``/NaN) or one outside the
    schema's categories is the last group, ``unknown``.

    Examples
    --------
    >>> from fedcare.common.spec import Feature
    >>> s = FeatureSchema(ehr=(Feature(name="age", kind="numeric"),),
    ...                   groups=(GroupAttribute(name="band", column="age", cuts=(50, 70)),))
    >>> group_codes(s, "band", [20, 50, 69.9, 70, float("nan")]).tolist()
    [0, 1, 1, 2, 3]
    """
    g: GroupAttribute = schema.group(attribute)
    unknown = len(schema.group_labels(attribute)) - 1
    feature = next(f for f in schema.ehr if f.name == g.column)
    raw = list(values)
    out = np.full(len(raw), unknown, dtype=np.int64)
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if g.cuts is not None:
            out[i] = int(np.searchsorted(np.asarray(g.cuts), float(v), side="right"))
        elif feature.kind == "categorical":
            text = str(v)
            if feature.categories is not None and text in feature.categories:
                out[i] = feature.categories.index(text)
        elif float(v) in (0.0, 1.0):
            out[i] = int(float(v))
    return out


def release_steps(n_attributes: int) -> int:
    """Gaussian steps the group releases of ``n_attributes`` attributes add to an evaluation."""
    return int(n_attributes)


def suppressed_groups(counts: Sequence[float], *, min_count: float) -> set[int]:
    """The groups to withhold, given each group's (noisy) count.

    Primary: every group below ``max(min_count, 1)``. Complementary: while the withheld
    groups' counts (negative noisy counts as 0) add up to more than 0 and less than
    ``min_count``, the smallest released group is withheld too, so subtracting the released
    groups from the split recovers at least ``min_count`` patients or none.

    Examples
    --------
    >>> sorted(suppressed_groups([3, 50, 40], min_count=10))  # 3 alone: take the 40 too
    [0, 2]
    >>> sorted(suppressed_groups([30, 50, 0], min_count=10))  # an empty group hides nobody
    [2]
    >>> sorted(suppressed_groups([30, 50, 12], min_count=10))
    []
    """
    floor = max(float(min_count), 1.0)
    hidden = {g for g, n in enumerate(counts) if not n >= floor}
    shown = sorted((g for g in range(len(counts)) if g not in hidden), key=lambda g: counts[g])
    while shown and 0.0 < sum(max(float(counts[g]), 0.0) for g in hidden) < floor:
        hidden.add(shown.pop(0))
    return hidden


def group_metrics_from_release(sums: SplitSums, *, threshold: float) -> dict[str, float]:
    """The metrics of one group's release (:data:`fedcare.common.keys.GROUP_METRICS`).

    ``n`` (rounded noisy count), ``ece``, ``brier``, ``mean_predicted``, ``observed`` and
    ``calibration_error`` always (for a count of at least 1); ``tpr`` with at least one
    positive, ``fpr`` with at least one negative, ``auroc`` with both; all as
    :func:`fedcare.models.evaluation.metrics_from_release` computes them (negative noisy
    counts clipped to 0, each bin's mean prediction from its noisy position sum).

    Examples
    --------
    >>> s = exact_sums([0, 0, 1, 1], [0.1, 0.6, 0.35, 0.8], bins=10)
    >>> m = group_metrics_from_release(s, threshold=0.5)
    >>> m["tpr"], m["fpr"], m["auroc"], m["observed"]
    (0.5, 0.5, 0.75, 0.5)
    """
    from fedcare.models.evaluation import metrics_from_release

    n = float(sums.counts.sum())
    if not n >= 1.0:
        return {}
    base = metrics_from_release(sums, min_count=1.0, threshold=threshold)
    bins = sums.bins
    cut = round(float(threshold) * bins)
    c = np.clip(sums.counts, 0.0, None)
    neg, pos = c[:, 0], c[:, 1]
    per_bin = neg + pos
    total = float(per_bin.sum())
    mean_p = _bin_means(sums)
    mean_predicted = float(np.clip((per_bin * mean_p).sum() / total, 0.0, 1.0))
    observed = float(pos.sum() / total)
    out = {
        "n": base["n"],
        "ece": base["ece"],
        "brier": base["brier"],
        "mean_predicted": mean_predicted,
        "observed": observed,
        "calibration_error": mean_predicted - observed,
    }
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos >= 1.0:
        out["tpr"] = float(pos[cut:].sum() / n_pos)
    if n_neg >= 1.0:
        out["fpr"] = float(neg[cut:].sum() / n_neg)
    if "auroc" in base:
        out["auroc"] = base["auroc"]
    return out


def _bin_means(sums: SplitSums) -> np.ndarray:
    """Each bin's mean prediction from its (noisy) position sum, clipped into the bin (as
    :func:`fedcare.models.evaluation.metrics_from_release` computes the ECE)."""
    per_bin = np.clip(sums.counts, 0.0, None).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        position = np.where(per_bin > 0, sums.offsets / per_bin, OFFSET_WEIGHT / 2)
    return (
        np.arange(sums.bins) + np.clip(position, 0.0, OFFSET_WEIGHT) / OFFSET_WEIGHT
    ) / sums.bins


def gaps(per_group: Mapping[int, Mapping[str, float]], *, unknown: int) -> dict[str, float]:
    """The largest difference (max - min) of each gap metric across the groups that have it
    (at least two; the ``unknown`` group, index ``unknown``, left out).

    Examples
    --------
    >>> gaps({0: {"auroc": 0.8}, 1: {"auroc": 0.65}, 2: {"auroc": 0.1}}, unknown=2)
    {'auroc': 0.15000000000000002}
    """
    out: dict[str, float] = {}
    for metric in keys.GAP_METRICS:
        values = [m[metric] for g, m in per_group.items() if g != unknown and metric in m]
        if len(values) >= 2:
            out[metric] = float(max(values) - min(values))
    return out


def release_groups(
    y_by_split: Mapping[str, Any],
    p_by_split: Mapping[str, Any],
    codes: Mapping[str, Mapping[str, np.ndarray]],
    n_groups: Mapping[str, int],
    *,
    noise_multiplier: float,
    generator: Generator | None,
    min_count: float,
    threshold: float,
    bins: int,
) -> dict[str, float]:
    """The group releases of one evaluation, as the metrics to send.

    Parameters
    ----------
    y_by_split, p_by_split:
        The released splits' labels and predicted probabilities (a split the evaluation
        withheld is not given: its groups are withheld with it).
    codes:
        Attribute -> split -> each patient's group index (:func:`group_codes`).
    n_groups:
        Attribute -> its number of groups (``unknown`` included), in release order.
    noise_multiplier:
        ``σ`` of the evaluation (0: exact, a simulated site's opt-in).
    generator:
        The evaluation's noise generator (fresh draws continue from it).
    min_count:
        The site's small-count threshold (:func:`suppressed_groups`).
    threshold:
        The evaluation's decision threshold (a bin edge), for ``tpr`` and ``fpr``.
    bins:
        ``B`` of the release, as the splits'.

    Returns
    -------
    dict
        Per released group ``<split>.group.<a>.<g>.<metric>`` and its sums, per attribute
        and split ``<split>.gap.<a>.<metric>``. The caller charges
        :func:`release_steps` (``len(n_groups)``) Gaussian steps more for it.
    """
    std = float(noise_multiplier) * SENSITIVITY
    out: dict[str, float] = {}
    for attribute, count in n_groups.items():
        for split in (s for s in keys.EVAL_SPLITS if s in y_by_split):
            y = np.asarray(y_by_split[split], dtype=np.float64)
            p = np.asarray(p_by_split[split], dtype=np.float64)
            g_of = np.asarray(codes[attribute][split])
            released: list[SplitSums] = []
            for g in range(count):
                sums = exact_sums(y[g_of == g], p[g_of == g], bins=bins)
                if std > 0:
                    if generator is None:
                        raise MalformedRelease("a DP group release needs a noise generator")
                    sums = add_noise(sums, std=std, generator=generator)
                released.append(sums)
            counts = [float(s.counts.sum()) for s in released]
            hidden = suppressed_groups(counts, min_count=min_count)
            per_group: dict[int, dict[str, float]] = {}
            for g, sums in enumerate(released):
                if g in hidden:
                    continue
                prefix = keys.group_prefix(split, attribute, g)
                derived = group_metrics_from_release(sums, threshold=threshold)
                per_group[g] = derived
                out.update(sums.to_wire(prefix))
                out.update({f"{prefix}.{k}": v for k, v in derived.items()})
            for metric, value in gaps(per_group, unknown=count - 1).items():
                out[keys.gap_key(split, attribute, metric)] = value
    return out


# ----------------------------------------------------------------- the server's side


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MalformedRelease(f"{name} is {type(value).__name__}, not a number")
    v = float(value)
    if not math.isfinite(v) or abs(v) > MAX_RELEASE_VALUE:
        raise MalformedRelease(f"{name} = {value!r} is not finite or exceeds {MAX_RELEASE_VALUE:g}")
    return v


def _parts(name: str) -> tuple[str, str, int | None, str]:
    """``(split, attribute, group or None for a gap, rest)`` of a per-group key."""
    split, kind, attribute, rest = name.split(".", 3)
    if kind == keys.R_GAP:
        return split, attribute, None, rest
    g, _, tail = rest.partition(".")
    return split, attribute, int(g), tail


def group_releases_from_wire(
    metrics: Mapping[str, Any], declared: Mapping[str, int]
) -> dict[tuple[str, str, int], SplitSums]:
    """Validate a reply's per-group keys; return each released group's sums.

    Parameters
    ----------
    metrics:
        The reply's metrics (other keys are ignored).
    declared:
        The federation's group attributes and their group counts (:func:`declared_groups`).

    Returns
    -------
    dict
        ``(split, attribute, group) -> SplitSums``.

    Raises
    ------
    MalformedRelease
        A key names an attribute the schema does not declare or a group it does not have; a
        group's release is incomplete or not a ``B``-bin one; a derived metric comes without
        its group's release or lies outside its range; a value is not a finite number.
    """
    names = [k for k in metrics if keys.is_group_metric(k)]
    by_group: dict[tuple[str, str, int], list[str]] = {}
    for name in names:
        split, attribute, g, rest = _parts(name)
        if attribute not in declared:
            known = ", ".join(declared) or "none"
            raise MalformedRelease(
                f"{name}: group attribute {attribute!r} is not in the federation's schema "
                f"(declared: {known})"
            )
        value = _finite(name, metrics[name])
        if g is None:
            lo, hi = _GAP_RANGES.get(rest, (0.0, 1.0))
            if not lo <= value <= hi:
                raise MalformedRelease(f"{name} = {value:g} is outside [{lo:g}, {hi:g}]")
            continue
        if g >= declared[attribute]:
            raise MalformedRelease(
                f"{name}: attribute {attribute!r} has groups 0..{declared[attribute] - 1}"
            )
        by_group.setdefault((split, attribute, g), []).append(name)
    out: dict[tuple[str, str, int], SplitSums] = {}
    for (split, attribute, g), group_names in by_group.items():
        prefix = keys.group_prefix(split, attribute, g)
        sums_names = [k for k in group_names if keys.is_group_release_metric(k)]
        if not sums_names:
            raise MalformedRelease(f"{prefix}: metrics without the group's release")
        tails = [k.removeprefix(prefix + ".") for k in sums_names]
        bins = 1 + max((int(t.split(".")[1]) for t in tails if t.count(".") >= 1), default=-1)
        if bins < 2 or bins % 2 or bins > keys.HIST_MAX_BINS:
            raise MalformedRelease(f"{prefix}: a release needs an even number of bins >= 2")
        template = SplitSums.from_vector(np.zeros(3 * bins + 2), bins=bins).to_wire(prefix)
        if set(sums_names) != set(template):
            raise MalformedRelease(
                f"{prefix}: the release's keys are not those of a {bins}-bin release"
            )
        vector = np.array([_finite(k, metrics[k]) for k in template])
        out[(split, attribute, g)] = SplitSums.from_vector(vector, bins=bins)
        for k in group_names:
            if k in template:
                continue
            metric = k.removeprefix(prefix + ".")
            lo, hi = _RANGES.get(metric, (0.0, 1.0))
            value = _finite(k, metrics[k])
            if not lo <= value <= hi:
                raise MalformedRelease(f"{k} = {value:g} is outside [{lo:g}, {hi:g}]")
    return out


def coarsen(sums: SplitSums, bins: int) -> SplitSums:
    """The release ``sums`` would have been with ``bins`` score bins (``bins`` divides its).

    Counts add up; a fine bin ``f``'s position sum ``O_f`` becomes, in coarse bin
    ``c = f // r`` (``r = B_fine / bins``), ``O_f / r + w n_f (f / r - c)``: linear, so a
    noisy release coarsens exactly as the exact one would, noise included.

    Examples
    --------
    >>> fine = exact_sums([0, 1, 1], [0.05, 0.42, 0.97], bins=100)
    >>> coarse = exact_sums([0, 1, 1], [0.05, 0.42, 0.97], bins=10)
    >>> bool(np.allclose(coarsen(fine, 10).vector(), coarse.vector()))
    True
    """
    if sums.bins == bins:
        return sums
    if bins < 2 or sums.bins % bins:
        raise MalformedRelease(f"cannot coarsen a {sums.bins}-bin release to {bins} bins")
    r = sums.bins // bins
    fine = np.arange(sums.bins)
    coarse = fine // r
    counts = np.zeros((bins, 2))
    np.add.at(counts, coarse, sums.counts)
    n_f = sums.counts.sum(axis=1)
    moved = sums.offsets / r + OFFSET_WEIGHT * n_f * (fine / r - coarse)
    offsets = np.zeros(bins)
    np.add.at(offsets, coarse, moved)
    return SplitSums(counts, offsets, sums.loss_sum, sums.brier_sum)


def _common_bins(releases: Sequence[SplitSums]) -> int | None:
    """The fewest bins every release coarsens to (``None`` when one does not divide)."""
    least = min(s.bins for s in releases)
    return least if all(s.bins % least == 0 for s in releases) else None


def _pooled(releases: Sequence[SplitSums], bins: int | None = None) -> SplitSums | None:
    if not releases:
        return None
    target = _common_bins(releases) if bins is None else bins
    if target is None or any(s.bins % target for s in releases):
        return None
    parts = [coarsen(s, target) for s in releases]
    return sum(parts[1:], start=parts[0])


def global_calibration(
    releases: Mapping[str, Mapping[str, SplitSums]],
    *,
    split: str = "test",
    min_count: int = 1,
) -> list[tuple[int, float, float, float]]:
    """The calibration curve of the sites' summed ``split`` releases
    (:func:`calibration_curve`, coarsened to :data:`CALIBRATION_BINS` where they divide),
    without bins of fewer than ``min_count`` (noisy) patients, whose observed rate would
    describe a handful of patients in the run's summary and card; empty when no site
    released the split or their bins cannot be pooled."""
    total = _pooled([s[split] for s in releases.values() if split in s])
    if total is None:
        return []
    bins = CALIBRATION_BINS if total.bins % CALIBRATION_BINS == 0 else total.bins
    return [
        (b, m, o, float(round(n)))
        for b, m, o, n in calibration_curve(coarsen(total, bins))
        if n >= min_count
    ]


def calibration_curve(sums: SplitSums) -> list[tuple[int, float, float, float]]:
    """``(bin, mean predicted, observed rate, n)`` of every bin with a (noisy) count of at
    least 1 (negative noisy counts clipped to 0; rates clipped to [0, 1]).

    Examples
    --------
    >>> calibration_curve(exact_sums([0, 1, 1, 0], [0.12, 0.14, 0.93, 0.95], bins=10))
    [(1, 0.13, 0.5, 2.0), (9, 0.94, 0.5, 2.0)]
    """
    c = np.clip(sums.counts, 0.0, None)
    per_bin = c.sum(axis=1)
    means = _bin_means(sums)
    return [
        (
            b,
            round(float(means[b]), 12),
            float(np.clip(c[b, 1] / per_bin[b], 0.0, 1.0)),
            float(per_bin[b]),
        )
        for b in range(sums.bins)
        if per_bin[b] >= 1.0
    ]


def _edge_or(threshold: float | None, val: SplitSums | None, total: SplitSums) -> float:
    """``threshold`` where it is an edge of ``total``'s bins, else the one the pooled
    validation release supports on them (0.5 without one)."""
    if threshold is not None and abs(round(threshold * total.bins) - threshold * total.bins) < 1e-9:
        return threshold
    usable = val is not None and val.bins % total.bins == 0
    return threshold_from_release(coarsen(val, total.bins) if usable and val else None)


def global_fairness_metrics(
    releases: Mapping[str, Mapping[str, SplitSums]],
    group_releases: Mapping[str, Mapping[tuple[str, str, int], SplitSums]],
    declared: Mapping[str, int],
    *,
    threshold: float | None,
) -> dict[str, float]:
    """The global per-group metrics and gaps of one evaluation.

    Parameters
    ----------
    releases:
        Site -> split -> its validated release (the global metrics' input).
    group_releases:
        Site -> ``(split, attribute, group)`` -> its validated group release.
    declared:
        The federation's attributes and their group counts.
    threshold:
        The global decision threshold (``test.threshold`` of the global metrics); where it
        is not an edge of the pooled groups' bins, the pooled validation release's.

    Returns
    -------
    dict
        ``<split>.group.<a>.<g>.<metric>`` of each group some site released (the sum of the
        sites that released it) and ``<split>.gap.<a>.<metric>``.
    """
    out: dict[str, float] = {}
    val = _pooled([s["val"] for s in releases.values() if "val" in s])
    for attribute, count in declared.items():
        for split in keys.EVAL_SPLITS:
            per_group: dict[int, dict[str, float]] = {}
            for g in range(count):
                key = (split, attribute, g)
                total = _pooled([r[key] for r in group_releases.values() if key in r])
                if total is None:
                    continue
                derived = group_metrics_from_release(
                    total, threshold=_edge_or(threshold, val, total)
                )
                if derived:
                    per_group[g] = derived
                    prefix = keys.group_prefix(split, attribute, g)
                    out.update({f"{prefix}.{k}": v for k, v in derived.items()})
            for metric, value in gaps(per_group, unknown=count - 1).items():
                out[keys.gap_key(split, attribute, metric)] = value
    return out
