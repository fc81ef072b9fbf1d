"""How the audit report prints a number, the same way in every section.

ε, differences, AUC, rates, metrics and norms with three decimals (``7.983``; differences
signed, ``+0.004``), δ and tolerances with ``:g`` (``1e-05``), an infinite value as ``∞``, a
missing one as ``—``.
"""

from __future__ import annotations

import math

__all__ = ["fmt_num", "fmt_g"]


def fmt_num(value: float | None, digits: int = 3, *, signed: bool = False) -> str:
    """A number as the page prints it.

    Examples
    --------
    >>> fmt_num(7.983397385911686)
    '7.983'
    >>> fmt_num(0.0042, signed=True)
    '+0.004'
    >>> fmt_num(float("inf")), fmt_num(None)
    ('∞', '—')
    """
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return ("+∞" if signed else "∞") if value > 0 else "−∞"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def fmt_g(value: float | None) -> str:
    """δ or a tolerance as the page prints it.

    Examples
    --------
    >>> fmt_g(1e-05), fmt_g(None)
    ('1e-05', '—')
    """
    return "—" if value is None else f"{value:g}"
