"""metrics.csv round trip and validation; plots are real PNGs with the expected lines."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from common.errors import DataError
from simulations.reports import (
    COLUMNS,
    POOLED_SITE,
    MetricRow,
    SweepPoint,
    baseline_rows,
    local_only_site,
    plot_metric_per_round,
    plot_privacy_utility,
    read_metrics_csv,
    write_metrics_csv,
    write_run_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HEADER = "round,site,split,metric,value"
SITES = ("site-a", "site-b", "site-c")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width > 0 and height > 0
        image.verify()


def xs(line: Line2D) -> np.ndarray:
    return np.asarray(line.get_xdata(), dtype=float)


def ys(line: Line2D) -> np.ndarray:
    return np.asarray(line.get_ydata(), dtype=float)


def federation_rows() -> list[MetricRow]:
    """Three sites and the global aggregate over rounds 0..3, AUROC rising by 0.1 a round."""
    rows = []
    for rnd in range(4):
        for i, site in enumerate(SITES):
            rows.append(MetricRow(rnd, site, "test", "auroc", 0.5 + 0.1 * rnd - 0.01 * i))
            rows.append(MetricRow(rnd, site, "test", "n", 10.0 + i))
            if rnd > 0:
                rows.append(MetricRow(rnd, site, "train", "train-loss", 1.0 / rnd))
        rows.append(MetricRow(rnd, "global", "test", "auroc", 0.49 + 0.1 * rnd))
        rows.append(MetricRow(rnd, "global", "test", "brier", 0.25 - 0.01 * rnd))
    return rows


def frame_of(rows: list[MetricRow]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "round": [r.round for r in rows],
            "site": [r.site for r in rows],
            "split": [r.split for r in rows],
            "metric": [r.metric for r in rows],
            "value": [r.value for r in rows],
        }
    )


# ---------------------------------------------------------------- metrics.csv


def test_metrics_csv_round_trips_exactly(tmp_path: Path) -> None:
    rows = [
        MetricRow(2, "site-b", "val", "auroc", 0.1 + 0.2),  # not representable in short form
        MetricRow(0, "global", "test", "auroc", 0.5),
        MetricRow(1, "007", "train", "train-loss", 1e-300),  # an id that looks like a number
        MetricRow(1, "NA", "test", "n", 12.0),  # an id pandas would read as missing
        MetricRow(1, "site,comma", "test", "brier", -0.0),
    ]
    path = tmp_path / "run" / "metrics.csv"
    write_metrics_csv(rows, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == HEADER
    assert len(lines) == len(rows) + 1
    frame = read_metrics_csv(path)
    assert list(frame.columns) == list(COLUMNS)
    expected = sorted((r.round, r.site, r.split, r.metric, r.value) for r in rows)
    got = list(frame.itertuples(index=False, name=None))
    assert got == expected  # written sorted; values bit-exact
    assert frame["round"].dtype == np.int64 and frame["value"].dtype == np.float64


def test_an_empty_run_writes_a_header_only_file_that_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    write_metrics_csv([], path)
    assert path.read_text(encoding="utf-8").strip() == HEADER
    assert read_metrics_csv(path).empty


def test_a_missing_value_reads_back_as_nan(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(f"{HEADER}\n1,global,test,auroc,\n", encoding="utf-8")
    assert math.isnan(read_metrics_csv(path)["value"].iloc[0])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("round,site,split,metric\n1,a,test,auroc\n", "missing column(s) value"),
        ("round,site,metric,value\n1,a,auroc,0.5\n", "missing column(s) split"),
        (f"{HEADER},note\n1,a,test,auroc,0.5,x\n", "unknown column(s) note"),
        (f"{HEADER}\n1,a,test,auroc,0.5\n2,a,test,auroc,high\n", "column value: 'high' on line 3"),
        (f"{HEADER}\n1.5,a,test,auroc,0.5\n", "column round: '1.5' on line 2"),
        (f"{HEADER}\n-1,a,test,auroc,0.5\n", "column round: '-1' on line 2"),
        (f"{HEADER}\n,a,test,auroc,0.5\n", "column round"),
        (f"{HEADER}\n1,a,holdout,auroc,0.5\n", "column split: 'holdout' on line 2"),
        (f"{HEADER}\n1,,test,auroc,0.5\n", "column site: empty cell on line 2"),
        ("", "the file is empty"),
    ],
)
def test_a_bad_metrics_csv_names_file_and_column(tmp_path: Path, content: str, needle: str) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_metrics_csv(path)
    assert str(path) in str(err.value)
    assert needle in str(err.value)


def test_a_missing_metrics_csv_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_metrics_csv(tmp_path / "metrics.csv")


@pytest.mark.parametrize(
    "args",
    [
        (-1, "global", "test", "auroc", 0.5),
        (1.0, "global", "test", "auroc", 0.5),
        (1, "", "test", "auroc", 0.5),
        (1, "global", "holdout", "auroc", 0.5),
        (1, "global", "test", "", 0.5),
        (1, "global", "test", "auroc", "0.5"),
    ],
)
def test_a_metric_row_out_of_its_domain_is_refused(args: tuple) -> None:
    with pytest.raises(ValueError):
        MetricRow(*args)


def test_a_metric_row_is_frozen() -> None:
    row = MetricRow(1, "global", "test", "auroc", 0.5)
    with pytest.raises(AttributeError):
        row.value = 0.6  # type: ignore[misc]


# ---------------------------------------------------------------- plots


def test_per_round_plot_has_one_line_per_site_plus_global(tmp_path: Path) -> None:
    rows = federation_rows()
    path = tmp_path / "plots" / "test_auroc.png"
    fig = plot_metric_per_round(frame_of(rows), "auroc", path)
    assert isinstance(fig, Figure)
    assert_png(path)
    (ax,) = fig.axes
    lines = ax.get_lines()
    assert len(lines) == len(SITES) + 1
    by_label = {str(line.get_label()): line for line in lines}
    glob = next(line for label, line in by_label.items() if label.startswith("global"))
    np.testing.assert_array_equal(xs(glob), [0, 1, 2, 3])
    np.testing.assert_allclose(ys(glob), [0.49, 0.59, 0.69, 0.79])
    np.testing.assert_allclose(ys(by_label["site-c"]), [0.48, 0.58, 0.68, 0.78])
    assert glob.get_linewidth() > by_label["site-a"].get_linewidth()


def test_baseline_rows_carry_the_last_round_and_names_no_site_can_take() -> None:
    rows = baseline_rows(
        local_only={"site-b": {"test.auroc": 0.6, "val.n": 12.0}, "site-a": {"test.auroc": 0.7}},
        pooled={"test.auroc": 0.8, "test.ece": math.nan, "note": 1.0},
        round=3,
    )
    assert rows == [
        MetricRow(3, "baseline:local-only:site-a", "test", "auroc", 0.7),
        MetricRow(3, "baseline:local-only:site-b", "test", "auroc", 0.6),
        MetricRow(3, "baseline:local-only:site-b", "val", "n", 12.0),
        MetricRow(3, "baseline:pooled", "test", "auroc", 0.8),  # NaN and split-less names left out
    ]
    assert ":" in POOLED_SITE and local_only_site("site-a").endswith(":site-a")
    assert baseline_rows(local_only={}, pooled={}, round=1) == []


def test_per_round_plot_draws_baselines_as_references_not_site_lines(tmp_path: Path) -> None:
    rows = federation_rows() + baseline_rows(
        local_only={s: {"test.auroc": 0.6 + i / 100} for i, s in enumerate(SITES)},
        pooled={"test.auroc": 0.85},
        round=3,
    )
    fig = plot_metric_per_round(frame_of(rows), "auroc", tmp_path / "p.png")
    lines = {str(line.get_label()): line for line in fig.axes[0].get_lines()}
    references = {"global (weighted)", "pooled, non-private", "local-only (each site alone)"}
    assert set(lines) == {*SITES, *references}
    assert list(ys(lines["pooled, non-private"])) == [0.85, 0.85]
    local = lines["local-only (each site alone)"]
    assert list(xs(local)) == [3, 3, 3] and local.get_linestyle() == "None"
    np.testing.assert_allclose(sorted(ys(local)), [0.6, 0.61, 0.62])


def test_per_round_plot_draws_rows_in_round_order_whatever_the_input_order(
    tmp_path: Path,
) -> None:
    frame = frame_of(federation_rows()).sample(frac=1.0, random_state=0)
    fig = plot_metric_per_round(frame, "auroc", tmp_path / "p.png")
    for line in fig.axes[0].get_lines():
        assert list(xs(line)) == sorted(xs(line))


def test_per_round_plot_of_an_absent_metric_says_what_is_present(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no test/ece rows.*test/auroc"):
        plot_metric_per_round(frame_of(federation_rows()), "ece", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_privacy_utility_puts_non_private_at_the_right_end(tmp_path: Path) -> None:
    points: list[SweepPoint | tuple[float, ...]] = [
        SweepPoint(8.0, 0.74, error=0.02),
        (math.inf, 0.80),
        SweepPoint(1.0, 0.61, error=0.05),
        (4.0, 0.70),
    ]
    path = tmp_path / "sweep" / "privacy_utility.png"
    fig = plot_privacy_utility(points, path)
    assert_png(path)
    (ax,) = fig.axes
    ticks = list(ax.get_xticks())
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[-1] == "non-private"
    assert ticks[-1] > max(ticks[:-1]) and ticks[:-1] == [1.0, 4.0, 8.0]
    assert ax.get_xscale() == "log"
    # The DP curve goes through the finite points in ε order.
    curve = next(line for line in ax.get_lines() if len(xs(line)) == 3)
    np.testing.assert_allclose(xs(curve), [1.0, 4.0, 8.0])
    np.testing.assert_allclose(ys(curve), [0.61, 0.70, 0.74])
    # The non-private point sits at the last tick with its value.
    star = next(line for line in ax.get_lines() if line.get_marker() == "*")
    assert list(xs(star)) == [ticks[-1]] and list(ys(star)) == [0.80]
    # Error bars were drawn (one vertical segment per finite point).
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert any(len(c.get_segments()) == 3 for c in bars)


def test_privacy_utility_without_points_still_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    plot_privacy_utility([], path)
    assert_png(path)


@pytest.mark.parametrize("point", [(0.0, 0.5), (-1.0, 0.5), (1.0, math.nan), (1.0, 0.5, -0.1)])
def test_privacy_utility_refuses_impossible_points(tmp_path: Path, point: tuple) -> None:
    with pytest.raises(ValueError):
        plot_privacy_utility([point], tmp_path / "p.png")


def test_plots_leave_matplotlib_global_state_alone(tmp_path: Path) -> None:
    before = dict(matplotlib.rcParams)
    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    plot_metric_per_round(frame_of(federation_rows()), "auroc", tmp_path / "a.png")
    plot_privacy_utility([(1.0, 0.5), (math.inf, 0.6)], tmp_path / "b.png")
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert dict(matplotlib.rcParams) == before


def test_write_run_plots_draws_each_metric_present(tmp_path: Path) -> None:
    write_metrics_csv(federation_rows(), tmp_path / "metrics.csv")
    written = write_run_plots(tmp_path)
    # auroc and brier (test), train-loss (train); never the count n.
    assert {p.name for p in written} == {"test_auroc.png", "test_brier.png", "train_train-loss.png"}
    assert all(p.parent == tmp_path / "plots" for p in written)
    for p in written:
        assert_png(p)


def test_write_run_plots_needs_a_valid_metrics_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metrics.csv"):
        write_run_plots(tmp_path)
