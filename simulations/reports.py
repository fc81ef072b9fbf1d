"""A run's ``metrics.csv`` and its plots.

``metrics.csv`` is long format, one value a row, with exactly the columns of
:data:`COLUMNS`::

    round,site,split,metric,value
    1,global,test,auroc,0.81
    1,site-0,test,auroc,0.78
    1,site-0,train,train-loss,0.52

``round`` is an integer >= 0 (0: the initial model); ``site`` is a site id, ``global``
(:data:`GLOBAL_SITE`) for the federation's patient-weighted aggregate, or a baseline:
``baseline:pooled`` (:data:`POOLED_SITE`) and ``baseline:local-only:<site id>``
(:func:`local_only_site`), whose rows carry the run's last planned round, since a baseline
trains for the whole run's budget (``:`` never occurs in a site id), or a site's
personalized model, ``personal:<site id>`` (:func:`personal_site`, :func:`personal_rows`),
evaluated on that site's splits after each round it reported one; ``split`` is one of
:data:`SPLITS`; ``metric`` a bare metric name (``auroc``, not ``test.auroc``); ``value`` a
float (an empty cell reads back as NaN). Rows are written sorted by round, site, split,
metric. A site's ``train`` rows include ``epsilon`` (its dataset's lifetime ε after the
round) and ``run-epsilon`` (what this run added so far). A personalized model's ``val`` rows
include ``own`` (:data:`OWN_METRIC`): 1 where the site kept its own model, 0 where its
validation split found the global model at least as good and the site kept that (its
metrics then repeat the global model's). So the ``site`` column always names the model,
``split`` the data, as for the baselines::

    2,site-0,test,auroc,0.70
    2,personal:site-0,test,auroc,0.74
    2,personal:site-0,val,own,1.0
    2,baseline:local-only:site-0,test,auroc,0.64

Where a results table has no value for a site's metric, :func:`missing_reason` says why
(``withheld`` by small-count suppression, ``undefined`` on that split, or ``not evaluated``)
and :func:`missing_metric_notes` writes the lines that explain it under the table.

Plots use matplotlib's object API (:class:`matplotlib.figure.Figure` with an Agg canvas): no
pyplot, no backend switch, no global state. Each plotting function saves a PNG and returns its
``Figure`` so callers and tests can inspect the axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullLocator

from fedcare.common import keys
from fedcare.common.errors import DataError
from fedcare.common.files import write_private_atomic
from fedcare.common.run_files import (
    CONFIG_NAME,
    METRICS_NAME,
    PLOTS_DIR,
    SITES_MANIFEST_NAME,
    SUMMARY_NAME,
)
from fedcare.common.summary import SurvivalCurves, load_summary

__all__ = [
    "COLUMNS",
    "SPLITS",
    "GLOBAL_SITE",
    "BASELINE_PREFIX",
    "POOLED_SITE",
    "local_only_site",
    "baseline_rows",
    "PERSONAL_SITE_PREFIX",
    "OWN_METRIC",
    "personal_site",
    "personal_rows",
    "Split",
    "MetricRow",
    "SweepPoint",
    "write_metrics_csv",
    "read_metrics_csv",
    "plot_metric_per_round",
    "plot_privacy_utility",
    "plot_site_models",
    "SITE_MODELS_METRIC",
    "write_run_plots",
    "run_plot_specs",
    "SURVIVAL_CURVES_NAME",
    "plot_survival_curves",
    "write_survival_curves",
    "RELEASED_SURVIVAL_NAME",
    "plot_released_survival",
    "write_released_survival",
    "MissingReason",
    "MissingMetric",
    "missing_reason",
    "missing_cell",
    "missing_metric_notes",
]

#: The columns of ``metrics.csv``, in order.
COLUMNS = ("round", "site", "split", "metric", "value")
Split = Literal["train", "val", "test"]
#: The splits a row may belong to.
SPLITS: tuple[str, ...] = get_args(Split)
#: The ``site`` of the federation's aggregate rows.
GLOBAL_SITE = "global"
#: The start of every baseline row's ``site`` (``:`` never occurs in a site id).
BASELINE_PREFIX = "baseline:"
#: The ``site`` of the pooled, non-private baseline's rows.
POOLED_SITE = f"{BASELINE_PREFIX}pooled"
_LOCAL_ONLY = f"{BASELINE_PREFIX}local-only:"
#: The start of every personalized model's ``site``: ``personal:<site id>``.
PERSONAL_SITE_PREFIX = "personal:"
#: The personalized model's metric (``val`` split) saying whether the site kept it: 1, or 0
#: where its validation split kept the global model (``fedcare.common.keys.M_PERSONAL_OWN``).
OWN_METRIC = keys.M_PERSONAL_OWN.removeprefix(keys.PERSONAL_PREFIX)
_OWN_SPLIT: Split = "val"
#: The metric :func:`write_run_plots` draws per site under every model a site could use.
SITE_MODELS_METRIC = "auroc"
#: Metrics of the ``train`` split that :func:`write_run_plots` draws when present.
TRAIN_PLOTTED = (keys.M_TRAIN_LOSS, keys.S_EPSILON, keys.S_RUN_EPSILON)
#: Label of an ε = inf sweep point.
NON_PRIVATE = "non-private"

_DPI = 110
_STRING_COLUMNS = ("site", "split", "metric")


@dataclass(frozen=True)
class MetricRow:
    """One row of ``metrics.csv``.

    Parameters
    ----------
    round:
        Round number, >= 0 (0: the initial model).
    site:
        Site id, or :data:`GLOBAL_SITE` for the federation's aggregate.
    split:
        ``train``, ``val`` or ``test``.
    metric:
        Bare metric name (``auroc``, ``train-loss``).
    value:
        The value.

    Raises
    ------
    ValueError
        A field is out of its domain (a programming error in the caller).
    """

    round: int
    site: str
    split: Split
    metric: str
    value: float

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise ValueError(f"MetricRow.round must be an int >= 0, got {self.round!r}")
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"MetricRow.site must be a non-empty str, got {self.site!r}")
        if self.split not in SPLITS:
            raise ValueError(f"MetricRow.split must be one of {SPLITS}, got {self.split!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"MetricRow.metric must be a non-empty str, got {self.metric!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise ValueError(f"MetricRow.value must be a number, got {self.value!r}")


def local_only_site(site_id: str) -> str:
    """The ``site`` of the local-only baseline's rows for ``site_id``.

    >>> local_only_site("site-0")
    'baseline:local-only:site-0'
    """
    return f"{_LOCAL_ONLY}{site_id}"


def baseline_rows(
    *,
    local_only: Mapping[str, Mapping[str, float]],
    pooled: Mapping[str, float],
    round: int,
) -> list[MetricRow]:
    """The rows of the baselines' metrics (``<split>.<metric>`` names), all at ``round``.

    Parameters
    ----------
    local_only:
        Site id -> metrics of the model trained on that site alone.
    pooled:
        Metrics of the pooled, non-private model.
    round:
        The run's planned number of rounds: a baseline trains for the whole run's budget.

    Returns
    -------
    list[MetricRow]
        One row per finite value whose split is one of :data:`SPLITS`.

    Examples
    --------
    >>> baseline_rows(local_only={"a": {"test.auroc": 0.7}}, pooled={}, round=3)
    [MetricRow(round=3, site='baseline:local-only:a', split='test', metric='auroc', value=0.7)]
    """
    sources = [(local_only_site(s), m) for s, m in sorted(local_only.items())]
    sources.append((POOLED_SITE, pooled))
    rows = []
    for site, metrics in sources:
        for name, value in sorted(metrics.items()):
            split, _, metric = name.partition(".")
            if split in SPLITS and metric and math.isfinite(float(value)):
                rows.append(MetricRow(round, site, cast(Split, split), metric, float(value)))
    return rows


def personal_site(site_id: str) -> str:
    """The ``site`` of the rows of ``site_id``'s personalized model.

    >>> personal_site("site-0")
    'personal:site-0'
    """
    return f"{PERSONAL_SITE_PREFIX}{site_id}"


def personal_rows(personal: Mapping[str, Mapping[str, float]], *, round: int) -> list[MetricRow]:
    """The rows of the sites' personalized models after ``round``.

    Parameters
    ----------
    personal:
        Site id -> its personalized model's metrics as the server records them
        (``entry["personal"]``: ``<split>.<metric>`` names, and :data:`OWN_METRIC`).
    round:
        The round after which the sites evaluated them.

    Returns
    -------
    list[MetricRow]
        Site :func:`personal_site`; one row per finite value whose split is one of
        :data:`SPLITS`, and :data:`OWN_METRIC` under ``val``, the split that chose.

    Examples
    --------
    >>> for row in personal_rows({"a": {"test.auroc": 0.7, "own": 0.0}}, round=2):
    ...     print(row.site, row.split, row.metric, row.value)
    personal:a val own 0.0
    personal:a test auroc 0.7
    """
    rows = []
    for site_id, metrics in sorted(personal.items()):
        site = personal_site(site_id)
        for name, value in sorted(metrics.items()):
            if not math.isfinite(float(value)):
                continue
            split, _, metric = name.partition(".")
            if name == OWN_METRIC:
                rows.append(MetricRow(round, site, _OWN_SPLIT, OWN_METRIC, float(value)))
            elif split in SPLITS and metric:
                rows.append(MetricRow(round, site, cast(Split, split), metric, float(value)))
    return rows


def write_metrics_csv(rows: Iterable[MetricRow], path: Path) -> None:
    """Write ``metrics.csv`` atomically, rows sorted by round, site, split, metric.

    Parameters
    ----------
    rows:
        The rows; floats are written at full precision, so they read back exactly.
    path:
        Destination; its folder is created if missing.
    """
    path = Path(path)
    frame = pd.DataFrame([astuple(r) for r in rows], columns=list(COLUMNS))
    frame = frame.astype({"round": "int64", "value": "float64"})
    frame = frame.sort_values(["round", "site", "split", "metric"], kind="stable")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each value as its shortest exact decimal (repr): pandas 2's own float formatting
    # drops the last digit of e.g. 0.1 + 0.2, and the file must read back exactly.
    exact = frame.assign(value=frame["value"].map(repr))
    write_private_atomic(path, exact.to_csv(index=False, lineterminator="\n").encode("utf-8"))


def read_metrics_csv(path: Path) -> pd.DataFrame:
    """Read and validate a ``metrics.csv``.

    Parameters
    ----------
    path:
        The file.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`COLUMNS`; ``round`` int64, ``value`` float64, the others str.

    Raises
    ------
    DataError
        The file is missing or unreadable, a column is missing or unknown, or a cell is not
        of its column's type; the message names the file, the column and the first bad line.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file; a finished run writes metrics.csv") from e
    except pd.errors.EmptyDataError as e:
        raise DataError(
            f"{path}: the file is empty; it needs the header {','.join(COLUMNS)}"
        ) from e
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read it as CSV ({e}); rewrite it or rerun") from e
    return _validated(raw, source=str(path))


def _exact_float(text: str) -> float:
    """``text`` as the nearest float, NaN when it is not a number (flagged by the caller)."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def _bad_line(mask: pd.Series) -> int:
    """The file line (header = 1) of the first row where ``mask`` holds."""
    return int(mask.to_numpy().nonzero()[0][0]) + 2


def _validated(raw: pd.DataFrame, *, source: str) -> pd.DataFrame:
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {', '.join(missing)}; the header must be "
            f"{','.join(COLUMNS)}"
        )
    unknown = [str(c) for c in raw.columns if c not in COLUMNS]
    if unknown:
        raise DataError(
            f"{source}: unknown column(s) {', '.join(unknown)}; the header must be "
            f"{','.join(COLUMNS)}"
        )
    frame = raw.loc[:, list(COLUMNS)].copy()
    for column in _STRING_COLUMNS:
        empty = frame[column].str.strip() == ""
        if empty.any():
            raise DataError(f"{source}: column {column}: empty cell on line {_bad_line(empty)}")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        value = frame["split"][bad_split].iloc[0]
        raise DataError(
            f"{source}: column split: {value!r} on line {_bad_line(bad_split)} is not one of "
            f"{', '.join(SPLITS)}"
        )
    rounds = pd.to_numeric(frame["round"], errors="coerce")
    bad_round = rounds.isna() | (rounds < 0) | (rounds != rounds.round())
    if bad_round.any():
        value = frame["round"][bad_round].iloc[0]
        raise DataError(
            f"{source}: column round: {value!r} on line {_bad_line(bad_round)} is not a "
            "whole number >= 0"
        )
    text = frame["value"].str.strip()
    blank = text.isin(["", "nan", "NaN"])
    # Python's float() parses every decimal exactly; pandas 2's to_numeric may not.
    values = text.where(~blank, "nan").map(_exact_float).astype("float64")
    bad_value = values.isna() & ~blank
    if bad_value.any():
        value = frame["value"][bad_value].iloc[0]
        raise DataError(
            f"{source}: column value: {value!r} on line {_bad_line(bad_value)} is not a number"
        )
    frame["round"] = rounds.astype("int64")
    frame["value"] = values.astype("float64")
    return frame


def _check_frame(frame: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"metrics frame: missing column(s) {', '.join(missing)}; build it with "
            "read_metrics_csv or with the columns of reports.COLUMNS"
        )


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=_DPI)


def plot_metric_per_round(
    frame: pd.DataFrame, metric: str, path: Path, *, split: Split = "test"
) -> Figure:
    """Draw ``split``/``metric`` per round: one line per site, a bold one for ``global``.

    Baseline rows, when present, are references rather than series: the pooled model is a
    dashed horizontal line, the local-only models one set of ``x`` markers at their round.
    Personalized models' rows (:func:`personal_site`) are left out: :func:`plot_site_models`
    draws them beside each site's global model.

    Parameters
    ----------
    frame:
        Long-format metrics (:func:`read_metrics_csv`).
    metric:
        Bare metric name (``auroc``).
    path:
        The PNG to write; its folder is created if missing.
    split:
        Which split's values to draw.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, one axes, one line per site present plus one for ``global`` if present
        (plus the baselines' references, when present).

    Raises
    ------
    DataError
        ``frame`` lacks a column, or has no row for this split and metric.
    """
    _check_frame(frame)
    frame = _without_personal(frame)
    rows = frame[(frame["metric"] == metric) & (frame["split"] == split)]
    if rows.empty:
        present = sorted(
            f"{s}/{m}" for s, m in frame[["split", "metric"]].drop_duplicates().itertuples(False)
        )
        raise DataError(
            f"no {split}/{metric} rows to plot; the metrics present are: "
            f"{', '.join(present) or 'none'}"
        )
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    baseline = rows["site"].str.startswith(BASELINE_PREFIX)
    references, rows = rows[baseline], rows[~baseline]
    sites = sorted(s for s in rows["site"].unique() if s != GLOBAL_SITE)
    for site in sites:
        _plot_series(ax, rows[rows["site"] == site], label=str(site), linewidth=1.0)
    if (rows["site"] == GLOBAL_SITE).any():
        _plot_series(
            ax,
            rows[rows["site"] == GLOBAL_SITE],
            label="global (weighted)",
            linewidth=2.5,
            color="black",
            zorder=3,
        )
    _plot_baselines(ax, references)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"{split} {metric}")
    ax.set_title(f"{split} {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, Path(path))
    return fig


def _is_personal(frame: pd.DataFrame) -> pd.Series:
    return frame["site"].str.startswith(PERSONAL_SITE_PREFIX)


def _without_personal(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` without the personalized models' rows: the federation's and the baselines'."""
    return frame[~_is_personal(frame)]


def _plot_series(ax: Axes, rows: pd.DataFrame, *, label: str, **style: Any) -> None:
    rows = rows.sort_values("round")
    ax.plot(rows["round"], rows["value"], marker="o", markersize=4, label=label, **style)


def _plot_baselines(ax: Axes, rows: pd.DataFrame) -> None:
    """The pooled model as a dashed line; the local-only models as ``x`` markers."""
    pooled = rows[rows["site"] == POOLED_SITE]
    if not pooled.empty:
        ax.axhline(
            float(pooled["value"].iloc[0]),
            linestyle="--",
            color="grey",
            linewidth=1.0,
            label="pooled, non-private",
        )
    local = rows[rows["site"].str.startswith(_LOCAL_ONLY)]
    if not local.empty:
        ax.plot(
            local["round"],
            local["value"],
            marker="x",
            linestyle="none",
            color="grey",
            label="local-only (each site alone)",
        )


@dataclass(frozen=True)
class SweepPoint:
    """One value of a privacy sweep: the utility reached at a privacy level.

    Parameters
    ----------
    epsilon:
        ε, > 0; ``math.inf`` for the non-private run.
    value:
        The utility metric (mean over repeats, if any).
    error:
        Optional half-width of an error bar (a standard deviation or CI half-width), >= 0.

    Raises
    ------
    ValueError
        A field is out of its domain.
    """

    epsilon: float
    value: float
    error: float | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.epsilon) or self.epsilon <= 0:
            raise ValueError(
                f"SweepPoint.epsilon must be > 0 (inf: non-private), got {self.epsilon}"
            )
        if not math.isfinite(self.value):
            raise ValueError(f"SweepPoint.value must be finite, got {self.value}")
        if self.error is not None and not (math.isfinite(self.error) and self.error >= 0):
            raise ValueError(f"SweepPoint.error must be finite and >= 0, got {self.error}")


def _as_point(p: SweepPoint | tuple[float, ...]) -> SweepPoint:
    return p if isinstance(p, SweepPoint) else SweepPoint(*(float(x) for x in p))


def plot_privacy_utility(
    points: Sequence[SweepPoint | tuple[float, ...]],
    path: Path,
    *,
    metric: str = "test AUROC",
    x_label: str = "ε per site (δ fixed)",
) -> Figure:
    """Draw utility against ε for a sweep; the non-private point (ε = inf) sits at the right.

    Finite ε lie on a log axis, ticked at each sweep value; every ε = inf point is drawn at
    one extra tick labelled ``non-private`` to the right of them, with a dotted reference
    line at its value.

    Parameters
    ----------
    points:
        One per sweep value: :class:`SweepPoint`, or a tuple ``(epsilon, value[, error])``.
    path:
        The PNG to write; its folder is created if missing.
    metric:
        The y-axis label.
    x_label:
        The x-axis label.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (one axes). With no point at all it still writes a PNG saying so.

    Raises
    ------
    ValueError
        A point is out of its domain (see :class:`SweepPoint`).
    """
    pts = [_as_point(p) for p in points]
    finite = sorted((p for p in pts if math.isfinite(p.epsilon)), key=lambda p: p.epsilon)
    private = [p for p in pts if not math.isfinite(p.epsilon)]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ticks: list[float] = []
    labels: list[str] = []
    if finite:
        xs = [p.epsilon for p in finite]
        ax.errorbar(
            xs,
            [p.value for p in finite],
            yerr=[p.error or 0.0 for p in finite] if any(p.error for p in finite) else None,
            marker="o",
            capsize=3,
            label="DP-SGD",
        )
        ax.set_xscale("log")
        ticks += xs
        labels += [f"{x:g}" for x in xs]
    if private:
        x_inf = max(ticks) * 4 if ticks else 1.0
        ax.errorbar(
            [x_inf] * len(private),
            [p.value for p in private],
            yerr=[p.error or 0.0 for p in private] if any(p.error for p in private) else None,
            marker="*",
            markersize=12,
            linestyle="none",
            color="black",
            capsize=3,
            label=NON_PRIVATE,
        )
        ax.axhline(private[0].value, linestyle=":", color="grey", linewidth=1.0)
        ticks.append(x_inf)
        labels.append(NON_PRIVATE)
    if ticks:
        ax.set_xticks(ticks, labels=labels)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize="small")
    else:
        ax.text(
            0.5, 0.5, "no sweep point reported this metric", ha="center", transform=ax.transAxes
        )
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric)
    ax.set_title("privacy-utility trade-off")
    ax.grid(alpha=0.3)
    _save(fig, Path(path))
    return fig


def plot_site_models(
    frame: pd.DataFrame, path: Path, *, metric: str = SITE_MODELS_METRIC, split: Split = "test"
) -> Figure:
    """Draw each site's ``split``/``metric`` under every model it could use, as grouped bars.

    Per site, the value of its last evaluation of: the global model (the site's own rows);
    its personalized model (:func:`personal_site` rows), hatched where :data:`OWN_METRIC` is
    0 — its validation split kept the global model, whose value the bar then repeats; and its
    local-only baseline. The pooled, non-private baseline is a dashed horizontal line. A value
    a site lacks (withheld, undefined, not evaluated) has no bar.

    Parameters
    ----------
    frame:
        Long-format metrics (:func:`read_metrics_csv`).
    path:
        The PNG to write; its folder is created if missing.
    metric:
        Bare metric name.
    split:
        Which split's values to draw.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, one axes; per model with a value at some site, one bar container
        labelled ``global model``, ``personalized`` or ``local-only (each site alone)``,
        one bar per site with a value (x: the site's index among the x tick labels).

    Raises
    ------
    DataError
        ``frame`` lacks a column, or has no personalized model's row for this split and
        metric.
    """
    _check_frame(frame)
    rows = frame[(frame["split"] == split) & (frame["metric"] == metric)]
    personal = rows[_is_personal(rows)]
    if personal.empty:
        raise DataError(
            f"no {split}/{metric} rows of a personalized model ({PERSONAL_SITE_PREFIX}<site id>) "
            "to plot; only a run with personalization other than none has them"
        )
    plain = rows[
        ~_is_personal(rows)
        & ~rows["site"].str.startswith(BASELINE_PREFIX)
        & (rows["site"] != GLOBAL_SITE)
    ]
    sites = sorted(
        {s.removeprefix(PERSONAL_SITE_PREFIX) for s in personal["site"]} | set(plain["site"])
    )
    own = frame[(frame["split"] == _OWN_SPLIT) & (frame["metric"] == OWN_METRIC)]
    fig = Figure(figsize=(max(6.0, 1.1 * len(sites) + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.27
    models = (
        ("global model", lambda s: s, -width, "tab:blue"),
        ("personalized", personal_site, 0.0, "tab:orange"),
        ("local-only (each site alone)", local_only_site, width, "tab:grey"),
    )
    kept_global = False
    for label, site_of, offset, color in models:
        bars = [(i, _last_value(rows, site_of(s))) for i, s in enumerate(sites)]
        present = [(i, last) for i, last in bars if last is not None]
        if not present:
            continue
        drawn = ax.bar(
            [i + offset for i, _ in present],
            [value for _, (_, value) in present],
            width,
            label=label,
            color=color,
        )
        ax.bar_label(drawn, fmt="%.2f", fontsize="x-small")
        if site_of is not personal_site:
            continue
        for patch, (i, (rnd, _)) in zip(drawn.patches, present, strict=True):
            flag = own[(own["site"] == personal_site(sites[i])) & (own["round"] == rnd)]
            if not flag.empty and float(flag["value"].iloc[0]) == 0.0:
                patch.set_hatch("//")
                patch.set_edgecolor("black")
                kept_global = True
    pooled = rows[rows["site"] == POOLED_SITE]
    if not pooled.empty:
        ax.axhline(
            float(pooled["value"].iloc[0]),
            linestyle="--",
            color="black",
            linewidth=1.0,
            label="pooled, non-private",
        )
    handles, _ = ax.get_legend_handles_labels()
    if kept_global:
        handles.append(
            Patch(
                facecolor="tab:orange",
                edgecolor="black",
                hatch="//",
                label="personalized: global model kept (own = 0)",
            )
        )
    ax.set_xticks(range(len(sites)), labels=sites)
    ax.set_xlim(-0.5, len(sites) - 0.5)  # every site's slot, whichever bars it has
    ax.set_ylabel(f"{split} {metric}")
    ax.set_title(f"{split} {metric} per site: global, personalized, local-only")
    ax.grid(alpha=0.3, axis="y")
    fig.legend(handles=handles, fontsize="small", loc="outside lower center", ncols=2)
    _save(fig, Path(path))
    return fig


def _last_value(rows: pd.DataFrame, site: str) -> tuple[int, float] | None:
    """``(round, value)`` of ``site``'s last row in ``rows`` with a value; ``None`` if none."""
    mine = rows[(rows["site"] == site) & rows["value"].notna()]
    if mine.empty:
        return None
    last = mine.sort_values("round", kind="stable").iloc[-1]
    return int(last["round"]), float(last["value"])


def run_plot_specs(
    frame: pd.DataFrame, *, splits: Sequence[Split] = ("test",)
) -> list[tuple[Split, str]]:
    """The ``(split, metric)`` pairs :func:`write_run_plots` draws for this frame.

    Every task metric of :data:`fedcare.common.keys.TASK_METRICS` (but the count ``n``) present in
    one of ``splits``, then the training metrics of :data:`TRAIN_PLOTTED` that are present
    (the personalized models' rows aside: :func:`plot_site_models` draws those).
    """
    federation = _without_personal(frame)
    present = set(
        federation[["split", "metric"]].drop_duplicates().itertuples(index=False, name=None)
    )
    specs: list[tuple[Split, str]] = [
        (split, metric)
        for split in splits
        for metric in keys.TASK_METRICS
        if metric != "n" and (split, metric) in present
    ]
    specs += [("train", m) for m in TRAIN_PLOTTED if ("train", m) in present]
    return specs


def write_run_plots(run_dir: Path, *, splits: Sequence[Split] = ("test",)) -> list[Path]:
    """Plot every metric present in ``run_dir/metrics.csv`` into ``run_dir/plots``.

    Parameters
    ----------
    run_dir:
        A run directory holding ``metrics.csv``.
    splits:
        Which evaluation splits to draw the task metrics of.

    Returns
    -------
    list[pathlib.Path]
        The PNGs written, ``plots/<split>_<metric>.png``, in :func:`run_plot_specs` order;
        then, where the run kept personalized models, ``plots/<split>_auroc_per_site.png``
        per split (:func:`plot_site_models`, :data:`SITE_MODELS_METRIC`); for a simulated
        survival task, ``plots/survival_curves.png`` (:func:`write_survival_curves`); for a
        run whose summary holds survival curves (any survival run, deployed too),
        ``plots/survival_predicted.png`` (:func:`write_released_survival`).

    Raises
    ------
    DataError
        ``metrics.csv`` is missing or invalid.
    """
    run_dir = Path(run_dir)
    frame = read_metrics_csv(run_dir / METRICS_NAME)
    written = []
    for split, metric in run_plot_specs(frame, splits=splits):
        path = run_dir / PLOTS_DIR / f"{split}_{metric}.png"
        plot_metric_per_round(frame, metric, path, split=split)
        written.append(path)
    personal = frame[_is_personal(frame) & (frame["metric"] == SITE_MODELS_METRIC)]
    for split in (s for s in splits if (personal["split"] == s).any()):
        path = run_dir / PLOTS_DIR / f"{split}_{SITE_MODELS_METRIC}_per_site.png"
        plot_site_models(frame, path, metric=SITE_MODELS_METRIC, split=split)
        written.append(path)
    written += write_survival_curves(run_dir)
    written += write_released_survival(run_dir)
    return written


# ----------------------------------------------------- survival curves per site

SURVIVAL_CURVES_NAME = "survival_curves.png"


def plot_survival_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    cuts: Sequence[float] = (),
    time_unit: str | None = None,
) -> Figure:
    """Draw one Kaplan-Meier step curve per site (``site -> (event, time)``), with the
    survival label's cut points as dotted vertical lines.

    The curves are the experimenter's view of *simulated* sites, whose files are on this
    machine: a Kaplan-Meier curve is a patient-level release (every step is a patient's
    time), so nothing of it is ever asked of a deployed site.
    """
    from fedcare.models.survival_metrics import kaplan_meier  # imports torch: only when used

    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for site, (event, time) in sorted(curves.items()):
        steps_t, steps_s = kaplan_meier(event, time)
        n = len(time)
        ax.step([0.0, *steps_t], [1.0, *steps_s], where="post", label=f"{site} (n={n})")
    for cut in cuts:
        ax.axvline(cut, color="0.8", linestyle=":", linewidth=0.8)
    ax.set_xlabel(f"time ({time_unit})" if time_unit else "time")
    ax.set_ylabel("survival (Kaplan-Meier)")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize="small")
    ax.set_title("survival per site")
    _save(fig, path)
    return fig


def write_survival_curves(run_dir: Path) -> list[Path]:
    """``plots/survival_curves.png`` for a simulated run of a survival task: each site's
    Kaplan-Meier curve from its own files (``sites.json``); ``[]`` for any other run.

    Whether the task's label is a survival label is read from the first site's
    ``site.toml`` alone (milliseconds); only a survival run loads the sites' files."""
    from fedcare.client.data.loaders import load_site  # the sites' files: simulations only
    from fedcare.client.data.survival_labels import time_column
    from fedcare.common.spec import SPEC_FILENAME, load_site_spec
    from fedcare.common.tomlcompat import tomllib

    run_dir = Path(run_dir)
    manifest, config = run_dir / SITES_MANIFEST_NAME, run_dir / CONFIG_NAME
    if not manifest.is_file() or not config.is_file():
        return []
    task = tomllib.loads(config.read_text(encoding="utf-8")).get("federation", {}).get("task")
    folders = json.loads(manifest.read_text(encoding="utf-8"))
    if folders:
        spec = load_site_spec(Path(folders[0]) / SPEC_FILENAME)
        if spec.label(spec.task(str(task)).label).kind != "survival":
            return []
    curves: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
    cuts: Sequence[float] = ()
    unit = None
    for folder in folders:
        site = load_site(folder)
        label = site.spec.label(site.spec.task(str(task)).label)
        if label.kind != "survival":
            return []
        event = site.labels[label.name].to_numpy(dtype=float)
        time = site.labels[time_column(label.name)].to_numpy(dtype=float)
        known = ~(pd.isna(event) | pd.isna(time))
        curves[site.spec.site_id] = (event[known], time[known])
        cuts, unit = label.cuts or (), label.time_unit
    if not curves:
        return []
    path = run_dir / PLOTS_DIR / SURVIVAL_CURVES_NAME
    plot_survival_curves(curves, path, cuts=cuts, time_unit=unit)
    return [path]


RELEASED_SURVIVAL_NAME = "survival_predicted.png"


def plot_released_survival(curves: SurvivalCurves, path: Path) -> Figure:
    """Draw the released survival curves of a run (``summary.json``'s ``survival``): the
    pooled observed (Kaplan-Meier) curve against the final model's mean predicted survival,
    and each site's observed curve, at the label's cuts (each curve starts at 1 at time 0).

    Everything drawn is what the sites released (noisy, k-suppressed;
    :mod:`fedcare.models.survival_curves`), so it serves deployed runs as well.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    cuts = [0.0, *curves.cuts]
    observed = [1.0, *curves.observed]
    ax.step(cuts[: len(observed)], observed, where="post", color="C0", linewidth=2,
            label="observed (Kaplan-Meier, pooled)")  # fmt: skip
    predicted = [1.0, *curves.predicted]
    ax.plot(cuts[: len(predicted)], predicted, color="C1", linestyle="--", marker="o",
            label="predicted (mean, global model)")  # fmt: skip
    for i, (site, own) in enumerate(sorted(curves.sites.items())):
        values = [1.0, *own.observed]
        ax.step(cuts[: len(values)], values, where="post", color=f"C{i + 2}", linestyle=":",
                linewidth=1, label=f"{site} observed")  # fmt: skip
    ax.set_xlabel(f"time ({curves.time_unit})" if curves.time_unit else "time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize="small")
    ax.set_title(f"observed and predicted survival (test, round {curves.round})")
    _save(fig, path)
    return fig


def write_released_survival(run_dir: Path) -> list[Path]:
    """``plots/survival_predicted.png`` from the run's ``summary.json`` where it holds
    survival curves; ``[]`` otherwise (no summary, or not a survival run).

    Raises
    ------
    ConfigError
        ``summary.json`` exists but is invalid (:func:`fedcare.common.summary.load_summary`).
    """
    summary_path = Path(run_dir) / SUMMARY_NAME
    if not summary_path.is_file():
        return []
    curves = load_summary(summary_path).survival
    if curves is None:
        return []
    path = Path(run_dir) / PLOTS_DIR / RELEASED_SURVIVAL_NAME
    plot_released_survival(curves, path)
    return [path]


# ----------------------------------------------------- why a table has no value


MissingReason = Literal["withheld", "undefined", "not evaluated"]
"""Why a site's metric has no value: see :func:`missing_reason`."""


def missing_reason(
    metrics: Mapping[str, float], name: str, *, evaluated: bool
) -> MissingReason | None:
    """Why ``metrics`` (a site's ``<split>.<metric>`` values) has no ``name``; ``None`` if it has.

    ``"undefined"``
        The split was reported (another metric of it, e.g. ``<split>.n``, is there) but this
        metric is not defined on it: AUROC, AUPRC and balanced accuracy need patients of both
        classes.
    ``"withheld"``
        The site answered an evaluation (``evaluated``, or it reported some other split) but
        released nothing of this split: small-count suppression withholds a split whose
        patient count (with DP evaluation, its noisy count) is below the site's minimum count
        whole.
    ``"not evaluated"``
        The site answered no evaluation (it dropped out, refused, or its evaluation failed).

    Examples
    --------
    >>> missing_reason({"test.n": 40.0, "test.auroc": 0.7}, "test.auroc", evaluated=True)
    >>> missing_reason({"test.n": 40.0, "test.brier": 0.2}, "test.auroc", evaluated=True)
    'undefined'
    >>> missing_reason({"val.n": 30.0}, "test.auroc", evaluated=False)
    'withheld'
    >>> missing_reason({}, "test.auroc", evaluated=True)
    'withheld'
    >>> missing_reason({}, "test.auroc", evaluated=False)
    'not evaluated'
    """
    if name in metrics:
        return None
    split = name.split(".", 1)[0]
    if any(k.startswith(f"{split}.") for k in metrics):
        return "undefined"
    if evaluated or metrics:
        return "withheld"
    return "not evaluated"


def missing_cell(reason: MissingReason | None, *, min_count: int | None) -> str:
    """The table cell of a missing value: ``withheld (n<10)``, ``undefined``, ``not evaluated``.

    ``min_count``: the sites' minimum count when known (a simulation's ``site-min-count``).

    >>> missing_cell("withheld", min_count=10), missing_cell("withheld", min_count=None)
    ('withheld (n<10)', 'withheld')
    >>> missing_cell(None, min_count=10)
    '-'
    """
    if reason is None:
        return "-"
    if reason == "withheld" and min_count is not None:
        return f"withheld (n<{min_count})"
    return reason


@dataclass(frozen=True)
class MissingMetric:
    """One split of one table row that shows a :data:`MissingReason` instead of values.

    Parameters
    ----------
    site:
        The site id.
    split:
        The split (``test``).
    reason:
        Why it has no values.
    baseline:
        Whether it is the site's local-only baseline rather than its federated evaluation.
    detail:
        For ``not evaluated``: why, in words (the site's status reason, or its failed
        evaluation's cause).
    """

    site: str
    split: str
    reason: MissingReason
    baseline: bool = False
    detail: str = ""


def _places(missing: Sequence[MissingMetric]) -> str:
    """``site-2 (test), site-3 (test, local-only test)``: the sites and splits, in order."""
    parts: dict[str, list[str]] = {}
    for m in missing:
        part = f"local-only {m.split}" if m.baseline else m.split
        if part not in parts.setdefault(m.site, []):
            parts[m.site].append(part)
    return ", ".join(f"{site} ({', '.join(p)})" for site, p in parts.items())


def missing_metric_notes(missing: Iterable[MissingMetric], *, min_count: int | None) -> list[str]:
    """The lines under a results table that say why some cells have no value.

    One line for all withheld splits (which, why, and how to get them), one for the undefined
    ones, and one per site that was not evaluated; empty when nothing is missing.

    Parameters
    ----------
    missing:
        Every row and split the table shows without values (duplicates are merged).
    min_count:
        The sites' minimum count ``k`` when known (a simulation's ``site-min-count``).

    Examples
    --------
    >>> notes = missing_metric_notes([MissingMetric("site-3", "test", "withheld")], min_count=10)
    >>> notes[0].startswith("withheld (n<10) at site-3 (test): fewer than 10 patients in")
    True
    """
    items = list(dict.fromkeys(missing))
    notes = []
    withheld = [m for m in items if m.reason == "withheld"]
    if withheld:
        if min_count is None:
            fewer, k = "fewer patients than the site's minimum count k", "k"
            fix = "a lower site-min-count"
        else:
            fewer, k = f"fewer than {min_count} patients", f"k = {min_count}"
            fix = f"a site-min-count below {min_count}"
        notes.append(
            f"{missing_cell('withheld', min_count=min_count)} at {_places(withheld)}: {fewer} "
            "in that split (with DP evaluation, a noisy count), and small-count suppression "
            f"keeps every metric computed on fewer than {k} patients at the site. To see them: "
            f"more patients in the split, or, in a simulation, {fix} (--set site-min-count=N)"
        )
    undefined = [m for m in items if m.reason == "undefined"]
    if undefined:
        notes.append(
            f"undefined at {_places(undefined)}: the split's patients are all of one class, "
            "and AUROC, AUPRC and balanced accuracy need both"
        )
    for site in dict.fromkeys(m.site for m in items if m.reason == "not evaluated"):
        details = [m.detail for m in items if m.site == site and m.reason == "not evaluated"]
        detail = next((d for d in details if d), "it answered no evaluation request")
        notes.append(f"not evaluated at {site}: {detail}")
    return notes
