"""What the training recipe and the validation-chosen threshold tell a curious centre: nothing
beyond what a site's reply already carries (threat model, "Curious and malicious centre")."""

from __future__ import annotations

import numpy as np

from fedcare.models.evaluation import release, releases_from_wire, threshold_from_release


def test_the_reported_threshold_is_a_function_of_the_released_validation_sums() -> None:
    """The decision threshold a site reports is recomputed exactly from the noisy validation
    sums it released: choosing it reads no patient beyond the (charged) release."""
    rng = np.random.default_rng(4)
    y = {s: (rng.random(80) < 0.3).astype(float) for s in ("val", "test")}
    p = {s: np.clip(0.2 + 0.3 * y[s] + rng.normal(0, 0.15, 80), 0, 1) for s in y}
    for _ in range(20):
        out = release(y, p, noise_multiplier=1.0, generator=rng, min_count=10, bins=20)
        if "val.n" not in out:
            continue
        parsed = releases_from_wire(out)
        assert out["test.threshold"] == threshold_from_release(parsed["val"])
