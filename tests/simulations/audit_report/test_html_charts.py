"""Inline-SVG charts: ticks are round and cover the data; points land where the axes say."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fedcare.simulations.audit.html_charts import (
    Axis,
    Bar,
    BarGroup,
    HLine,
    Series,
    bar_chart,
    legend,
    line_chart,
    log_ticks,
    nice_ticks,
)

_finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(_finite, _finite)
@example(0.0, 5e-324)  # a subnormal span: its step underflowed to 0 (math domain error)
@example(-0.006847433736937233, -0.006847433736937233)  # step 0.001 - 8e-19: mantissa 9.99...
def test_nice_ticks_cover_the_range_with_a_round_even_step(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi
    assert 2 <= len(ticks) <= 12
    steps = [b - a for a, b in itertools.pairwise(ticks)]
    step = steps[0]
    assert all(math.isclose(s, step, rel_tol=1e-6) for s in steps)
    # The step's decimal exponent, robust to float noise below it (0.001 - 8e-19 is 1e-3).
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1.0, 2.0, 2.5, 5.0))


def test_nice_ticks_reference_values() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 8.2) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert nice_ticks(0.3, 0.7) == [0.3, 0.4, 0.5, 0.6, 0.7]
    with pytest.raises(ValueError, match="finite"):
        nice_ticks(0.0, math.inf)


def test_log_ticks_are_the_covering_powers_of_ten() -> None:
    assert log_ticks(0.002, 0.5) == [0.001, 0.01, 0.1, 1.0]
    assert log_ticks(1e-4, 1.0) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    with pytest.raises(ValueError, match="positive"):
        log_ticks(0.0, 1.0)


def _plot_box(svg: str) -> tuple[float, float, float, float]:
    m = re.search(r'<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', svg)
    assert m is not None
    x, y, w, h = (float(v) for v in m.groups())
    return x, y, x + w, y + h  # left, top, right, bottom


def _points(svg: str, name: str) -> list[tuple[float, float]]:
    m = re.search(rf'<polyline class="series" data-name="{re.escape(name)}" points="([^"]+)"', svg)
    assert m is not None, f"no series {name!r}"
    return [tuple(float(v) for v in p.split(",")) for p in m.group(1).split()]  # type: ignore[misc]


def test_linear_points_land_on_the_plot_corners_and_middle() -> None:
    svg = line_chart(
        [Series("s", ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)), "#000")],
        x=Axis("x", lo=0.0, hi=1.0),
        y=Axis("y", lo=0.0, hi=1.0),
        title="t",
    )
    left, top, right, bottom = _plot_box(svg)
    (x0, y0), (xm, ym), (x1, y1) = _points(svg, "s")
    assert (x0, y0) == pytest.approx((left, bottom), abs=0.1)
    assert (x1, y1) == pytest.approx((right, top), abs=0.1)
    assert (xm, ym) == pytest.approx(((left + right) / 2, (top + bottom) / 2), abs=0.1)


def test_log_axis_spaces_decades_evenly_and_clamps_zero_to_the_floor() -> None:
    svg = line_chart(
        [Series("roc", ((0.0, 0.0), (0.01, 0.1), (1.0, 1.0)), "#000")],
        x=Axis("fpr", lo=1e-3, hi=1.0, log=True),
        y=Axis("tpr", lo=1e-3, hi=1.0, log=True),
        title="t",
        diagonal=True,
    )
    left, top, right, bottom = _plot_box(svg)
    (x0, y0), (x1, y1), _ = _points(svg, "roc")
    assert (x0, y0) == pytest.approx((left, bottom), abs=0.1)  # 0 drawn at 1e-3
    assert x1 == pytest.approx(left + (right - left) / 3, abs=0.1)  # 1e-2: one decade of three
    assert y1 == pytest.approx(bottom - 2 * (bottom - top) / 3, abs=0.1)  # 1e-1: two of three
    assert 'class="diagonal"' in svg


def test_non_finite_points_are_skipped_and_text_is_escaped() -> None:
    svg = line_chart(
        [Series('<b>"x"&', ((1.0, 1.0), (2.0, math.nan), (3.0, math.inf), (4.0, 2.0)), "#000")],
        x=Axis("<round>", integer=True),
        y=Axis("y"),
        title="<script>alert(1)</script>",
        hlines=[HLine(1.5, "bound <1.5>")],
    )
    assert "<script" not in svg and "<b>" not in svg
    assert "&lt;script&gt;" in svg and "&lt;round&gt;" in svg and "bound &lt;1.5&gt;" in svg
    assert len(_points(svg, "&lt;b&gt;&quot;x&quot;&amp;")) == 2
    assert "nan" not in svg.lower() and "inf" not in svg.lower()


def test_integer_axis_ticks_are_whole_rounds() -> None:
    svg = line_chart(
        [Series("s", tuple((float(r), 0.5) for r in range(1, 4)), "#000")],
        x=Axis("round", integer=True),
        y=Axis("y", lo=0.0, hi=1.0),
        title="t",
    )
    bottom_labels = re.findall(r'text-anchor="middle">([^<]+)</text>', svg)
    assert {"1", "2", "3"} <= set(bottom_labels)
    assert not any("." in label for label in bottom_labels if label not in ("round",))


def test_bar_widths_are_proportional_to_values() -> None:
    svg = bar_chart(
        [BarGroup("site-0", (Bar("lb", 2.0, "#111"), Bar("claim", 8.0, "#222")))],
        title="t",
        x_label="ε",
    )
    widths = [float(w) for w in re.findall(r'<rect x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg)]
    assert len(widths) == 2
    assert widths[0] / widths[1] == pytest.approx(0.25, rel=1e-2)
    assert "8.000" in svg and "2.000" in svg


def test_legend_escapes_names() -> None:
    html = legend([("<i>a</i>", "#000", ""), ("b", "#111", "4 4")])
    assert "&lt;i&gt;a&lt;/i&gt;" in html and "<i>" not in html
    assert 'stroke-dasharray="4 4"' in html
