"""What the training recipe and the validation-chosen threshold tell a curious centre: nothing
beyond what a site's reply already carries (threat model, "Curious and malicious centre")."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from client import recipe
from client.privacy import sampling
from client.training import TrainConfig
from models.evaluation import release, releases_from_wire, threshold_from_release


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


@settings(max_examples=200)
@given(st.integers(min_value=1, max_value=50_000))
def test_the_recipe_s_sampling_rate_depends_on_the_train_count_only(n: int) -> None:
    """A private site's batch size comes from its training-set size alone, so the sample rate
    its reply reports says nothing the reply's ``num-examples`` (that size) does not."""
    cfg = TrainConfig(optimizer="auto", batch_size=0, lr=0)
    a = cfg.for_site(n_train=n, model="ehr_mlp", private=True)
    b = cfg.for_site(n_train=n, model="fusion", private=True)
    assert a.batch_size == b.batch_size == recipe.batch_size_for(n, private=True)
    # ... and the rate reported (1 / batches per epoch) is a step function of n
    q, _ = sampling(n, batch_size=a.batch_size, epochs=1)
    assert 0 < q <= 1 and q == 1 / -(-n // a.batch_size)
