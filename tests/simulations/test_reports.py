"""metrics.csv round trip and validation; plots are real PNGs with the expected lines."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from fedcare.common.errors import DataError
from fedcare.simulations.reports import (
    COLUMNS,
    OWN_METRIC,
    POOLED_SITE,
    MetricRow,
    SweepPoint,
    baseline_rows,
    local_only_site,
    personal_rows,
    personal_site,
    plot_metric_per_round,
    plot_privacy_utility,
    plot_site_models,
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


def personalized_rows() -> list[MetricRow]:
    """:func:`federation_rows` (round 3: site-a 0.80, site-b 0.79, site-c 0.78) with personal
    models and baselines. site-a keeps its own model (0.90; at round 2 it had kept the global
    one); site-b's validation kept the global model (own = 0, its value repeated); site-c has
    neither a personalized model nor a local-only baseline."""
    return (
        federation_rows()
        + personal_rows({"site-a": {"test.auroc": 0.6, "val.auroc": 0.5, "own": 0.0}}, round=2)
        + personal_rows(
            {
                "site-a": {"test.auroc": 0.9, "val.auroc": 0.85, "own": 1.0},
                "site-b": {"test.auroc": 0.79, "val.auroc": 0.7, "own": 0.0},
            },
            round=3,
        )
        + baseline_rows(
            local_only={"site-a": {"test.auroc": 0.7}, "site-b": {"test.auroc": 0.65}},
            pooled={"test.auroc": 0.85},
            round=3,
        )
    )


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


def test_personal_rows_name_the_model_in_site_and_keep_own_under_val() -> None:
    rows = personal_rows(
        {
            "site-b": {"test.auroc": 0.7, "test.ece": math.nan, "own": 0.0, "note": 1.0},
            "site-a": {"val.auroc": 0.8, "own": 1.0},
        },
        round=4,
    )
    assert rows == [
        MetricRow(4, "personal:site-a", "val", "own", 1.0),
        MetricRow(4, "personal:site-a", "val", "auroc", 0.8),
        MetricRow(4, "personal:site-b", "val", "own", 0.0),
        MetricRow(4, "personal:site-b", "test", "auroc", 0.7),  # NaN and split-less names left out
    ]
    assert OWN_METRIC == "own" and personal_site("site-a") == "personal:site-a"
    # Never a name a site, the aggregate or a baseline can take (``:`` is in no site id).
    assert ":" in personal_site("global") and not personal_site("x").startswith("baseline:")
    assert personal_rows({}, round=1) == []


def test_personal_rows_round_trip_through_metrics_csv(tmp_path: Path) -> None:
    rows = personalized_rows()
    write_metrics_csv(rows, tmp_path / "metrics.csv")
    frame = read_metrics_csv(tmp_path / "metrics.csv")
    got = {
        (r.round, r.site, r.split, r.metric): r.value
        for r in frame.itertuples()
        if r.site.startswith("personal:")
    }
    assert got == {
        (2, "personal:site-a", "test", "auroc"): 0.6,
        (2, "personal:site-a", "val", "auroc"): 0.5,
        (2, "personal:site-a", "val", "own"): 0.0,
        (3, "personal:site-a", "test", "auroc"): 0.9,
        (3, "personal:site-a", "val", "auroc"): 0.85,
        (3, "personal:site-a", "val", "own"): 1.0,
        (3, "personal:site-b", "test", "auroc"): 0.79,
        (3, "personal:site-b", "val", "auroc"): 0.7,
        (3, "personal:site-b", "val", "own"): 0.0,
    }
    assert len(frame) == len(rows)


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


def test_per_round_plot_leaves_the_personalized_models_out(tmp_path: Path) -> None:
    fig = plot_metric_per_round(frame_of(personalized_rows()), "auroc", tmp_path / "p.png")
    labels = {str(line.get_label()) for line in fig.axes[0].get_lines()}
    assert labels == {
        *SITES,
        "global (weighted)",
        "pooled, non-private",
        "local-only (each site alone)",
    }


def bars(fig: Figure) -> dict[str, BarContainer]:
    (ax,) = fig.axes
    return {str(c.get_label()): c for c in ax.containers if isinstance(c, BarContainer)}


def test_site_models_plot_has_global_personal_and_local_only_bars_per_site(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plots" / "test_auroc_per_site.png"
    fig = plot_site_models(frame_of(personalized_rows()), path)
    assert_png(path)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SITES)
    drawn = bars(fig)
    assert set(drawn) == {"global model", "personalized", "local-only (each site alone)"}

    def heights(label: str) -> list[float]:
        return [round(p.get_height(), 12) for p in drawn[label].patches]

    def centers(label: str) -> list[float]:
        return [round(p.get_x() + p.get_width() / 2) for p in drawn[label].patches]

    # Each site's last evaluation: round 3 (site-a's round-2 personal 0.6 is not drawn).
    assert heights("global model") == [0.8, 0.79, 0.78]
    assert heights("personalized") == [0.9, 0.79]
    assert heights("local-only (each site alone)") == [0.7, 0.65]
    # site-c has no personalized model and no baseline: no bar, not a zero-height one.
    assert centers("personalized") == [0, 1] and centers("local-only (each site alone)") == [0, 1]
    # Grouped: global left of personalized left of local-only, within each site.
    for i in (0, 1):
        xs_ = [drawn[k].patches[i].get_x() for k in drawn]
        assert sorted(xs_) == [drawn[k].patches[i].get_x() for k in drawn]
    # Hatched where the site's validation kept the global model (own = 0 at that round).
    hatches = [p.get_hatch() for p in drawn["personalized"].patches]
    assert not hatches[0] and hatches[1] == "//"
    assert not any(p.get_hatch() for p in drawn["global model"].patches)
    pooled = next(line for line in ax.get_lines() if line.get_label() == "pooled, non-private")
    assert list(ys(pooled)) == [0.85, 0.85]
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert "personalized: global model kept (own = 0)" in labels
    assert "pooled, non-private" in labels


def test_site_models_plot_without_a_kept_global_model_has_no_hatch(tmp_path: Path) -> None:
    rows = federation_rows() + personal_rows({"site-a": {"test.auroc": 0.9, "own": 1.0}}, round=3)
    fig = plot_site_models(frame_of(rows), tmp_path / "p.png")
    drawn = bars(fig)
    assert set(drawn) == {"global model", "personalized"}  # no baselines in this run
    assert not any(p.get_hatch() for c in drawn.values() for p in c.patches)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not [label for label in labels if "own = 0" in label]


def test_site_models_plot_without_personalized_models_says_so(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no test/auroc rows of a personalized model"):
        plot_site_models(frame_of(federation_rows()), tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


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
    plot_site_models(frame_of(personalized_rows()), tmp_path / "c.png")
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


def test_write_run_plots_adds_the_per_site_chart_when_sites_kept_personal_models(
    tmp_path: Path,
) -> None:
    write_metrics_csv(personalized_rows(), tmp_path / "metrics.csv")
    written = write_run_plots(tmp_path)
    assert [p.name for p in written] == [
        "test_auroc.png",
        "test_brier.png",
        "train_train-loss.png",
        "test_auroc_per_site.png",
    ]
    for p in written:
        assert_png(p)


def test_write_run_plots_needs_a_valid_metrics_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="metrics.csv"):
        write_run_plots(tmp_path)
