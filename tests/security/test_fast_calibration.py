"""The fast noise calibration against a centre that picks the plan (threat model, "Curious
and malicious centre").

The centre chooses what a site's noise is calibrated for: the target ε, the number of rounds
(steps), the batch size (the sample rate ``q``), and when, after which other runs. The
calibration places its ``σ`` with cheap stand-ins (an RDP bound, the PRV on a coarse grid, a
false-position solver in ``(log σ, log ε)``) and reads ε off the grid from its ``t >= 0``
cells only; none of that may let a plan train with less noise than its target allows. The
check is Google's ``dp_accounting`` PLD accountant, which shares no code with Opacus or
fedcare's accountant: an upper bound on the true ε, at most ``PLD_DISCRETIZATION`` above it.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    calibrate_noise,
    epsilon,
    independent_epsilon,
)

DELTA = 1e-5
M = Mechanism

#: Plans a centre may ask for: (target ε, q, planned steps, the site's history).
PLANS = {
    # batch size 1 at a site of 500 training patients, 10 epochs: the least q, many steps
    "batch-1": (4.0, 1 / 500, 5000, []),
    # every patient in every step, 10 rounds (the Gaussian mechanism, unsubsampled)
    "full-batch": (8.0, 1.0, 10, []),
    # a target just above what the site's evaluations already spent
    "edge-of-budget": (2.6, 0.05, 100, [M(5.0, 1.0, 5)]),
    # after two earlier runs and their evaluations, at another noise and rate
    "after-other-runs": (8.0, 0.25, 12, [M(2.0, 0.05, 60), M(1.5, 0.02, 100), M(5.0, 1.0, 8)]),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_no_plan_gets_noise_whose_independent_epsilon_exceeds_its_target(name: str) -> None:
    target, q, steps, history = PLANS[name]
    with np.errstate(divide="ignore"):  # q = 1: Opacus's cdf takes log(1 - q) = -inf
        sigma = calibrate_noise(
            target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps, history=history
        )
        run = [*history, M(sigma, q, steps)]
        reported = epsilon(run, delta=DELTA)
    # The ε the site will charge meets the target ...
    assert reported <= target
    # ... and so does an accountant that shares no code with it (up to its own grid step).
    assert independent_epsilon(run, delta=DELTA) <= target + PLD_DISCRETIZATION
    # The check has teeth: 10 % less noise would break the target.
    with np.errstate(divide="ignore"):
        assert epsilon([*history, M(0.9 * sigma, q, steps)], delta=DELTA) > target
