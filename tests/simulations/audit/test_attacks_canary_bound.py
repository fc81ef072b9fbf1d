"""The one-run audit's ε lower bound (Steinke, Nasr and Jagielski 2023): closed forms,
monotonicity, an independent exact p-value, and exact coverage under randomized response."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fedcare.simulations.audit.attacks.canary import guess
from fedcare.simulations.audit.attacks.canary_bound import (
    bonferroni_beta,
    canary_p_value,
    epsilon_lower_bound,
)


def exact_tail(r: int, p: float, v: int) -> float:
    """P[Binomial(r, p) >= v] by summing exact binomial terms (no scipy)."""
    if v <= 0:
        return 1.0
    pf = Fraction(p)
    return float(sum(math.comb(r, j) * pf**j * (1 - pf) ** (r - j) for j in range(v, r + 1)))


def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The theorem's bound f(v) + 2 m δ max_i (f(v - i) - f(v)) / i, written out directly."""
    p = math.exp(eps) / (1 + math.exp(eps))
    f_v = exact_tail(r, p, v)
    slope = max((exact_tail(r, p, v - i) - f_v) / i for i in range(1, m + 1))
    return min(1.0, f_v + 2 * m * delta * slope)


@pytest.mark.parametrize("r", [1, 10, 50, 200])
def test_all_guesses_right_pure_dp_has_the_closed_form(r: int) -> None:
    # P[Bin(r, p) >= r] = p^r = β  =>  ε = log(p / (1 - p)) with p = β^(1/r).
    p = 0.05 ** (1 / r)
    expected = max(0.0, math.log(p / (1 - p)))  # one right guess proves nothing at 95%
    assert epsilon_lower_bound(m=2 * r, r=r, v=r) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (20, 10, 8, 0.5, 0.0),
        (20, 10, 8, 0.5, 1e-3),
        (40, 30, 25, 1.3, 1e-4),
        (60, 20, 20, 2.0, 1e-2),
        (30, 16, 5, 0.2, 1e-3),
    ],
)
def test_p_value_matches_the_theorem_written_out(
    m: int, r: int, v: int, eps: float, delta: float
) -> None:
    ours = canary_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)
    assert ours == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_chance_accuracy_bounds_nothing() -> None:
    assert epsilon_lower_bound(m=1000, r=200, v=100, delta=1e-5) == 0.0
    assert epsilon_lower_bound(m=1000, r=200, v=60, delta=1e-5) == 0.0
    # Just above chance is not significant at 95% either (one-sided z ≈ 1.41).
    assert epsilon_lower_bound(m=1000, r=200, v=110, delta=1e-5) == 0.0


def test_bound_grows_with_correct_guesses_and_shrinks_with_delta_and_confidence() -> None:
    bounds = [epsilon_lower_bound(m=500, r=100, v=v) for v in range(0, 101, 5)]
    assert bounds == sorted(bounds) and bounds[-1] > bounds[-2] > 0
    for v in (70, 85, 100):
        pure = epsilon_lower_bound(m=500, r=100, v=v)
        approx = epsilon_lower_bound(m=500, r=100, v=v, delta=1e-4)
        assert approx <= pure + 1e-9
        assert epsilon_lower_bound(m=500, r=100, v=v, beta=0.01) <= pure + 1e-9


def test_bound_is_where_the_p_value_crosses_beta() -> None:
    m, r, v, delta = 1000, 200, 160, 1e-5
    eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta)
    assert canary_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) <= 0.05
    assert canary_p_value(m=m, r=r, v=v, epsilon=eps + 1e-3, delta=delta) > 0.05


@pytest.mark.parametrize("eps0", [0.0, 0.7, 2.0])
def test_coverage_under_randomized_response(eps0: float) -> None:
    """An ε0-DP auditee (randomized response: each guess right w.p. e^ε0 / (1 + e^ε0)) yields
    a bound above ε0 with probability at most β, computed exactly over V ~ Bin(r, p0)."""
    r, beta = 60, 0.05
    p0 = math.exp(eps0) / (1 + math.exp(eps0))
    above = [v for v in range(r + 1) if epsilon_lower_bound(m=r, r=r, v=v, beta=beta) > eps0]
    assert above, "some outcome must refute ε0"
    v_star = min(above)
    assert above == list(range(v_star, r + 1))  # monotone in v
    assert exact_tail(r, p0, v_star) <= beta
    # and the bound is not needlessly loose: one fewer correct guess would exceed β.
    assert exact_tail(r, p0, v_star - 1) > beta


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="correct"):
        epsilon_lower_bound(m=10, r=5, v=6)
    with pytest.raises(ValueError, match="beta"):
        epsilon_lower_bound(m=10, r=5, v=5, beta=1.5)
    assert bonferroni_beta(0.05, 4) == pytest.approx(0.0125)


def test_guesses_take_the_extremes_and_break_ties_by_position() -> None:
    scores = np.array([0.0, 3.0, 3.0, -1.0, 0.0, -1.0])
    g = guess(scores, 2)
    assert g.tolist() == [0, 1, 1, -1, 0, -1]
    g = guess(np.zeros(6), 2)  # all tied: the first two "in", the last two "out"
    assert g.tolist() == [1, 1, 0, 0, -1, -1]
