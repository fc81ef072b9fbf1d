"""The ε lower bound of a one-run canary audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run" (arXiv:2305.08846). Setting: ``m`` canaries,
each included in the training set independently with probability 1/2 (``S ∈ {-1, +1}^m``
uniform); after one training run the auditor, looking only at the output (and the canaries),
guesses "in" or "out" for ``r`` of them and abstains on the rest; ``W`` counts the correct
guesses.

Their main theorem. Let ``p = e^ε / (1 + e^ε)`` and ``f(v) = P[Binomial(r, p) ≥ v]``.

* If the training algorithm is ε-DP, ``W`` is stochastically dominated by
  ``Binomial(r, p)``: ``P[W ≥ v] ≤ f(v)`` for every ``v`` (each guess is no better than
  ε-DP randomized response, even given the other guesses).
* If it is (ε, δ)-DP, ``P[W ≥ v] ≤ f(v) + 2 m δ · max_{1 ≤ i ≤ m} (f(v - i) - f(v)) / i``.

So having observed ``v`` correct guesses, the hypothesis "the algorithm is (ε, δ)-DP" has the
p-value :func:`canary_p_value`, and :func:`epsilon_lower_bound` reports the smallest ε that
the observation does *not* reject at level β: with probability at least ``1 - β`` over the
canaries' coin flips the true ε is at least that (for the δ given). The p-value is increasing
in ε for δ = 0 (a binomial tail grows with its success probability); the δ term, at most
``2mδ``, is not monotone, so the first crossing of β is located on a fine grid before
bisection, never an arbitrary crossing.

The number of guesses must be fixed before looking at the result: reporting the best of
several choices of ``r`` would need a multiple-testing correction (:func:`bonferroni_beta`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["canary_p_value", "epsilon_lower_bound", "bonferroni_beta"]

_GRID = 400
_BISECTIONS = 60
_EPS_CAP = 200.0


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def canary_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """``P[W ≥ v]`` bound for an (ε, δ)-DP algorithm: the audit's p-value.

    Parameters
    ----------
    m:
        Canaries (each included with probability 1/2).
    r:
        Guesses made (abstentions excluded).
    v:
        Correct guesses.
    epsilon, delta:
        The privacy hypothesis tested.

    Examples
    --------
    >>> round(canary_p_value(m=10, r=10, v=10, epsilon=0.0), 6) == round(0.5 ** 10, 6)
    True
    >>> canary_p_value(m=10, r=4, v=0, epsilon=1.0)
    1.0
    """
    _check_counts(m, r, v)
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]; got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, p))  # f(v) = P[Bin(r, p) >= v]
    if delta == 0.0:
        return min(1.0, tail)
    # f(v - i) - f(v) = P[v - i <= Bin < v] = cdf(v - 1) - cdf(v - i - 1), i = 1..v; for
    # i > v the difference stays at its i = v value while the divisor grows, so i <= v suffices.
    i = np.arange(1, v + 1)
    cdf = binom.cdf(v - 1 - i, r, p)
    gaps = float(binom.cdf(v - 1, r, p)) - cdf
    slope = float(np.max(gaps / i))
    return min(1.0, tail + 2.0 * m * delta * slope)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """The smallest ε that ``v`` correct out of ``r`` guesses does not reject at level β.

    With probability at least ``1 - β`` over the canaries' inclusion coins, an (ε, δ)-DP
    algorithm has ε at least this value. 0 when even ε = 0 is not rejected.

    Examples
    --------
    All 20 guesses right, δ = 0: the bound solves ``p**20 = 0.05``.

    >>> p = 0.05 ** (1 / 20)
    >>> abs(epsilon_lower_bound(m=100, r=20, v=20) - math.log(p / (1 - p))) < 1e-6
    True
    >>> epsilon_lower_bound(m=100, r=20, v=10)
    0.0
    """
    _check_counts(m, r, v)
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta = {beta} is not in (0, 1); use e.g. 0.05 for 95% confidence")

    def rejected(eps: float) -> bool:
        return canary_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) <= beta

    if not rejected(0.0):
        return 0.0
    hi = 1.0
    while rejected(hi):
        hi *= 2.0
        if hi > _EPS_CAP:  # pragma: no cover - p-value tends to 1 as ε grows
            return _EPS_CAP
    grid = np.linspace(0.0, hi, _GRID + 1)
    lo = 0.0
    for eps in grid[1:]:
        if not rejected(float(eps)):
            hi = float(eps)
            break
        lo = float(eps)
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2.0
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def bonferroni_beta(beta: float, choices: int) -> float:
    """The level each of ``choices`` audits must use for their best to hold at ``beta``.

    >>> bonferroni_beta(0.05, 5)
    0.01
    """
    if choices < 1:
        raise ValueError(f"choices must be >= 1, got {choices}")
    return beta / choices
