"""Small inline-SVG charts for self-contained HTML pages: no JavaScript, no external files.

A chart is a string of SVG markup that a page embeds as is. Every text that reaches the
markup (titles, labels, series names) is escaped here, so callers may pass raw strings.
Values that are not finite are left out of a line; values outside the axis range are drawn
on its edge.

Examples
--------
>>> svg = line_chart(
...     [Series(name="site-0", points=((1, 0.5), (2, 0.7)), color=PALETTE[0])],
...     x=Axis(label="round", integer=True),
...     y=Axis(label="AUROC", lo=0.0, hi=1.0),
...     title="Test AUROC",
... )
>>> svg.startswith("<svg")
True
>>> nice_ticks(0.0, 1.0)
[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PALETTE",
    "DASHES",
    "Axis",
    "Series",
    "HLine",
    "Bar",
    "BarGroup",
    "nice_ticks",
    "log_ticks",
    "line_chart",
    "bar_chart",
    "legend",
]

#: Colour-blind-safe colours (Okabe and Ito), cycled by series index.
PALETTE: tuple[str, ...] = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
)
#: Stroke dash patterns ("" = solid), cycled to tell apart a second dimension of series.
DASHES: tuple[str, ...] = ("", "6 3", "2 3", "8 3 2 3")

_FONT = 12
_MARGIN_LEFT = 62
_MARGIN_RIGHT = 16
_MARGIN_TOP = 28
_MARGIN_BOTTOM = 44


def _e(text: str) -> str:
    return html.escape(text, quote=True)


@dataclass(frozen=True)
class Axis:
    """One axis of a chart.

    Parameters
    ----------
    label:
        The axis title.
    lo, hi:
        The range; ``None`` takes it from the data (with a little room).
    log:
        Logarithmic (base 10) scale; values <= 0 are drawn at ``lo``.
    integer:
        Ticks only at integers (rounds).
    """

    label: str
    lo: float | None = None
    hi: float | None = None
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are ``(x, y)`` pairs, drawn in the given order."""

    name: str
    points: tuple[tuple[float, float], ...]
    color: str
    dash: str = ""
    markers: bool = True


@dataclass(frozen=True)
class HLine:
    """A horizontal reference line at ``y`` (a bound, a target), labelled on the right."""

    y: float
    label: str
    color: str = "#666666"


@dataclass(frozen=True)
class Bar:
    """One bar of a :class:`BarGroup`."""

    name: str
    value: float
    color: str


@dataclass(frozen=True)
class BarGroup:
    """Bars drawn together under one label (e.g. one site)."""

    label: str
    bars: tuple[Bar, ...]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` evenly spaced round numbers covering ``[lo, hi]``.

    The step is 1, 2, 2.5 or 5 times a power of ten; the first tick is <= ``lo`` and the
    last >= ``hi``.

    Examples
    --------
    >>> nice_ticks(0.0, 8.2)
    [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    >>> nice_ticks(3.0, 3.0)
    [2.0, 2.5, 3.0, 3.5, 4.0]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite; got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    # A range too narrow to show (a single value, or one a subnormal apart, whose step would
    # underflow to 0) is drawn around its value.
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi), 1.0):
        pad = abs(lo) * 0.25 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * power >= raw)
    ticks = [_clean(i * step) for i in range(math.floor(lo / step), math.ceil(hi / step) + 1)]
    while len(ticks) > 2 and ticks[1] <= lo:  # float noise gave one tick too many
        ticks.pop(0)
    while len(ticks) > 2 and ticks[-2] >= hi:
        ticks.pop()
    if ticks[0] > lo:  # rounding to 12 digits went past the data
        ticks.insert(0, _clean(ticks[0] - step))
    if ticks[-1] < hi:
        ticks.append(_clean(ticks[-1] + step))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """The powers of ten from the one <= ``lo`` to the one >= ``hi`` (both > 0).

    Examples
    --------
    >>> log_ticks(0.002, 0.5)
    [0.001, 0.01, 0.1, 1.0]
    """
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"a log axis needs a positive, finite range; got [{lo}, {hi}]")
    first = math.floor(math.log10(min(lo, hi)) + 1e-9)
    last = math.ceil(math.log10(max(lo, hi)) - 1e-9)
    if last == first:
        last += 1
    return [_clean(10.0**k) for k in range(first, last + 1)]


def _clean(value: float) -> float:
    """Drop the float noise of ``i * step`` (0.30000000000000004 -> 0.3)."""
    return float(f"{value:.12g}")


def _tick_label(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class _Scale:
    lo: float
    hi: float
    log: bool
    start: float  # pixel of lo
    end: float  # pixel of hi

    def __call__(self, value: float) -> float:
        if self.log:
            value = math.log10(max(value, self.lo))
            lo, hi = math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        value = min(max(value, lo), hi)
        return self.start + (value - lo) / (hi - lo) * (self.end - self.start)


def _domain(axis: Axis, values: Sequence[float]) -> tuple[float, float, list[float]]:
    """The axis range (data range unless fixed) and its ticks."""
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not axis.log)]
    if axis.log:
        lo = axis.lo if axis.lo is not None else (min(finite) if finite else 1e-3)
        hi = axis.hi if axis.hi is not None else (max(finite) if finite else 1.0)
        ticks = log_ticks(lo, hi)
        if axis.lo is None:
            lo = ticks[0]
        if axis.hi is None:
            hi = ticks[-1]
        return lo, hi, [t for t in ticks if lo <= t <= hi]
    lo = axis.lo if axis.lo is not None else (min(finite) if finite else 0.0)
    hi = axis.hi if axis.hi is not None else (max(finite) if finite else 1.0)
    if axis.integer:
        lo, hi = math.floor(lo), math.ceil(hi)
        if hi == lo:
            lo, hi = lo - 1, hi + 1
        step = max(1, math.ceil((hi - lo) / 8))
        return lo, hi, [float(t) for t in range(int(lo), int(hi) + 1, step)]
    if axis.hi is None and hi > lo:
        hi += 0.05 * (hi - lo)  # room above the highest point
    ticks = nice_ticks(lo, hi)
    if axis.lo is None:
        lo = ticks[0]
    if axis.hi is None:
        hi = ticks[-1]
    return lo, hi, [t for t in ticks if lo - 1e-12 <= t <= hi + 1e-12]


def line_chart(
    series: Sequence[Series],
    *,
    x: Axis,
    y: Axis,
    title: str,
    width: int = 640,
    height: int = 300,
    hlines: Sequence[HLine] = (),
    diagonal: bool = False,
) -> str:
    """An SVG line chart.

    Parameters
    ----------
    series:
        The lines; non-finite points are skipped.
    x, y:
        The axes.
    title:
        Shown above the plot and read by screen readers (``<title>``).
    width, height:
        Size in CSS pixels.
    hlines:
        Horizontal reference lines (included in the y range).
    diagonal:
        Draw the line y = x (chance level of an ROC curve).

    Returns
    -------
    str
        ``<svg>`` markup.
    """
    xs = [p[0] for s in series for p in s.points]
    ys = [p[1] for s in series for p in s.points] + [h.y for h in hlines]
    x_lo, x_hi, x_ticks = _domain(x, xs)
    y_lo, y_hi, y_ticks = _domain(y, ys)
    left, right = _MARGIN_LEFT, width - _MARGIN_RIGHT
    top, bottom = _MARGIN_TOP, height - _MARGIN_BOTTOM
    sx = _Scale(x_lo, x_hi, x.log, left, right)
    sy = _Scale(y_lo, y_hi, y.log, bottom, top)
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" font-size="{_FONT}">',
        f"<title>{_e(title)}</title>",
        f'<text x="{left}" y="16" font-weight="600">{_e(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" '
        'fill="#fafafa" stroke="#bbbbbb"/>',
    ]
    for t in x_ticks:
        px = sx(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e4e4e4"/>'
            f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">'
            f"{_e(_tick_label(t))}</text>"
        )
    for t in y_ticks:
        py = sy(t)
        out.append(
            f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e4e4e4"/>'
            f'<text x="{left - 6}" y="{py + 4:.1f}" text-anchor="end">'
            f"{_e(_tick_label(t))}</text>"
        )
    out.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"{_e(x.label)}</text>"
        f'<text transform="translate(14 {(top + bottom) / 2:.1f}) rotate(-90)" '
        f'text-anchor="middle">{_e(y.label)}</text>'
    )
    if diagonal:
        lo, hi = max(x_lo, y_lo), min(x_hi, y_hi)
        out.append(
            f'<line class="diagonal" x1="{sx(lo):.1f}" y1="{sy(lo):.1f}" x2="{sx(hi):.1f}" '
            f'y2="{sy(hi):.1f}" stroke="#999999" stroke-dasharray="4 4"/>'
        )
    for h in hlines:
        if not math.isfinite(h.y):
            continue
        py = sy(h.y)
        out.append(
            f'<line class="hline" x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" '
            f'stroke="{_e(h.color)}" stroke-dasharray="5 4"/>'
            f'<text x="{right - 4}" y="{py - 4:.1f}" text-anchor="end" fill="{_e(h.color)}">'
            f"{_e(h.label)}</text>"
        )
    for s in series:
        pts = [
            (sx(px), sy(py), px, py)
            for px, py in s.points
            if math.isfinite(px) and math.isfinite(py)
        ]
        if not pts:
            continue
        dash = f' stroke-dasharray="{_e(s.dash)}"' if s.dash else ""
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b, _, _ in pts)
        out.append(
            f'<polyline class="series" data-name="{_e(s.name)}" points="{coords}" fill="none" '
            f'stroke="{_e(s.color)}" stroke-width="2"{dash}/>'
        )
        if s.markers:
            for a, b, px, py in pts:
                out.append(
                    f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{_e(s.color)}">'
                    f"<title>{_e(s.name)}: ({px:g}, {py:.4g})</title></circle>"
                )
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    groups: Sequence[BarGroup],
    *,
    title: str,
    x_label: str,
    width: int = 640,
    bar_height: int = 14,
) -> str:
    """Horizontal grouped bars starting at 0 (values < 0 drawn as 0, non-finite skipped).

    Parameters
    ----------
    groups:
        One block of bars per label.
    title:
        Shown above the plot.
    x_label:
        The value axis title.
    width:
        Size in CSS pixels; the height follows from the number of bars.
    bar_height:
        Thickness of one bar.

    Returns
    -------
    str
        ``<svg>`` markup.
    """
    values = [b.value for g in groups for b in g.bars if math.isfinite(b.value)]
    _, x_hi, ticks = _domain(Axis(label=x_label, lo=0.0), values or [1.0])
    left, right = 110, width - _MARGIN_RIGHT - 40
    top = _MARGIN_TOP
    rows = sum(len(g.bars) for g in groups) * (bar_height + 2) + len(groups) * 10
    bottom = top + max(rows, bar_height)
    height = bottom + _MARGIN_BOTTOM
    sx = _Scale(0.0, x_hi, False, left, right)
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" font-size="{_FONT}">',
        f"<title>{_e(title)}</title>",
        f'<text x="{left}" y="16" font-weight="600">{_e(title)}</text>',
    ]
    for t in ticks:
        px = sx(t)
        out.append(
            f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom}" stroke="#e4e4e4"/>'
            f'<text x="{px:.1f}" y="{bottom + 16}" text-anchor="middle">'
            f"{_e(_tick_label(t))}</text>"
        )
    out.append(
        f'<text x="{(left + right) / 2:.1f}" y="{height - 8}" text-anchor="middle">'
        f"{_e(x_label)}</text>"
    )
    cursor = top + 5
    for g in groups:
        block = len(g.bars) * (bar_height + 2)
        out.append(
            f'<text x="{left - 8}" y="{cursor + block / 2 + 4:.1f}" text-anchor="end">'
            f"{_e(g.label)}</text>"
        )
        for b in g.bars:
            if math.isfinite(b.value):
                w = sx(max(b.value, 0.0)) - left
                out.append(
                    f'<rect x="{left}" y="{cursor}" width="{w:.1f}" height="{bar_height}" '
                    f'fill="{_e(b.color)}"><title>{_e(b.name)}: {b.value:.4g}</title></rect>'
                    f'<text x="{left + w + 4:.1f}" y="{cursor + bar_height - 3}">'
                    f"{b.value:.3f}</text>"
                )
            cursor += bar_height + 2
        cursor += 10
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888888"/></svg>')
    return "".join(out)


def legend(entries: Sequence[tuple[str, str, str]]) -> str:
    """An HTML legend: one ``(name, color, dash)`` per entry, a short line sample each."""
    items = []
    for name, color, dash in entries:
        dash_attr = f' stroke-dasharray="{_e(dash)}"' if dash else ""
        items.append(
            '<span class="legend-item"><svg width="28" height="10" aria-hidden="true">'
            f'<line x1="0" y1="5" x2="28" y2="5" stroke="{_e(color)}" stroke-width="2"'
            f"{dash_attr}/></svg>{_e(name)}</span>"
        )
    return f'<div class="legend">{"".join(items)}</div>'
