"""A run's ``metrics.csv`` and its plots.

``metrics.csv`` is long format, one value a row: ``round, site, split, metric, value`` (site
``global`` is the federation's patient-weighted aggregate; split ``val``, ``test`` or
``train``). Plots use matplotlib's object API (no pyplot global state) and are written as PNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.errors import DataError

__all__ = [
    "MetricRow",
    "COLUMNS",
    "write_metrics_csv",
    "read_metrics_csv",
    "plot_metric_per_round",
    "plot_privacy_utility",
    "write_run_plots",
]

COLUMNS = ("round", "site", "split", "metric", "value")
PLOTTED = ("auroc", "auprc", "brier", "loss", "ece")


@dataclass(frozen=True)
class MetricRow:
    round: int
    site: str
    split: str
    metric: str
    value: float


def write_metrics_csv(rows: Iterable[MetricRow], path: Path) -> None:
    frame = pd.DataFrame([astuple(r) for r in rows], columns=list(COLUMNS))
    frame = frame.sort_values(["round", "site", "split", "metric"], kind="stable")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


def read_metrics_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: cannot read metrics ({e})") from e
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {COLUMNS}")
    return frame


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_metric_per_round(
    frame: pd.DataFrame, metric: str, path: Path, *, split: str = "test"
) -> Figure:
    """One line per site (and a bold one for the global model) of ``split.metric`` per round."""
    rows = frame[(frame["metric"] == metric) & (frame["split"] == split)]
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for site, group in rows.groupby("site", sort=True):
        group = group.sort_values("round")
        bold = site == "global"
        ax.plot(
            group["round"],
            group["value"],
            marker="o",
            label=str(site),
            linewidth=2.5 if bold else 1.0,
            color="black" if bold else None,
        )
    ax.set_xlabel("round")
    ax.set_ylabel(f"{split} {metric}")
    ax.set_title(f"{split} {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def plot_privacy_utility(
    points: Sequence[tuple[float, float]], path: Path, *, metric: str = "test AUROC"
) -> Figure:
    """Utility against ε; a non-private point (ε = inf) sits at the right, labelled."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    finite = sorted((e, v) for e, v in points if math.isfinite(e))
    if finite:
        ax.plot([e for e, _ in finite], [v for _, v in finite], marker="o", label="DP-SGD")
        ax.set_xscale("log")
    for e, v in points:
        if not math.isfinite(e):
            x = max((p for p, _ in finite), default=1.0) * 2
            ax.scatter([x], [v], marker="*", s=120, color="black", label="non-private")
            ax.annotate("non-private", (x, v), textcoords="offset points", xytext=(-20, 8))
    ax.set_xlabel("ε per site (δ fixed)")
    ax.set_ylabel(metric)
    ax.set_title("privacy-utility trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def write_run_plots(run_dir: Path) -> list[Path]:
    """Plots of every task metric present in ``run_dir/metrics.csv`` into ``run_dir/plots``."""
    frame = read_metrics_csv(run_dir / "metrics.csv")
    written = []
    for metric in PLOTTED:
        if ((frame["metric"] == metric) & (frame["split"] == "test")).any():
            path = run_dir / "plots" / f"test_{metric}.png"
            plot_metric_per_round(frame, metric, path)
            written.append(path)
    return written
