"""Feature attributions and their DP release, against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from fedcare.common.errors import ConfigError, DataError
from fedcare.models.explain import (
    SENSITIVITY,
    AttributionRelease,
    InputPart,
    contributions,
    importances_from_release,
    integrated_gradients,
    modality_shares,
    release,
    sum_releases,
)


def _reference_ig(model: nn.Module, x: torch.Tensor, steps: int = 400) -> torch.Tensor:
    """Integrated gradients by a midpoint Riemann sum with plain autograd (no Captum)."""
    total = torch.zeros_like(x)
    for k in range(steps):
        alpha = (k + 0.5) / steps
        point = (alpha * x).detach().requires_grad_(True)
        model(point).sum().backward()
        assert point.grad is not None
        total += point.grad
    return x * total / steps


def test_a_linear_model_s_attributions_are_weight_times_input_summed_per_feature() -> None:
    lin = nn.Linear(4, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
        lin.bias.fill_(0.7)
    model = nn.Sequential(lin, nn.Flatten(0))
    x = torch.tensor([[1.0, 1.0, 2.0, 0.0], [-1.0, 0.5, 0.0, 1.0]])
    part = InputPart("ehr", ("age", "sex", "sex", "bmi"))  # two one-hot columns of "sex"
    rows, features, modalities = integrated_gradients(model, [x], [part])
    assert features == ("ehr:age", "ehr:sex", "ehr:bmi")
    assert modalities == ("ehr", "ehr", "ehr")
    wx = (lin.weight[0] * x).abs().detach().numpy()
    expected = np.stack([wx[:, 0], wx[:, 1] + wx[:, 2], wx[:, 3]], axis=1)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)


def test_a_nonlinear_model_matches_a_riemann_sum_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))
    x = torch.randn(7, 5)
    rows, _, _ = integrated_gradients(model, [x], [InputPart("genomics", None)], steps=64)
    ref = _reference_ig(model, x).abs().sum(dim=1).detach().numpy()
    np.testing.assert_allclose(rows[:, 0], ref, rtol=1e-3, atol=1e-5)
    # completeness, on the signed reference: the sum is logit(x) - logit(0)
    signed = _reference_ig(model, x).sum(dim=1)
    gap = (model(x) - model(torch.zeros_like(x))).detach()
    torch.testing.assert_close(signed, gap, rtol=1e-3, atol=1e-4)


class _TwoInputs(nn.Module):
    """A fusion-like model: (ehr, mask, genomics); the mask gates the genomics branch."""

    def __init__(self) -> None:
        super().__init__()
        self.ehr = nn.Linear(2, 1, bias=False)
        self.gen = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.ehr.weight.copy_(torch.tensor([[2.0, -1.0]]))
            self.gen.weight.copy_(torch.tensor([[1.0, 1.0, -4.0]]))

    def forward(self, x_ehr: torch.Tensor, mask: torch.Tensor, x_gen: torch.Tensor) -> torch.Tensor:
        return (self.ehr(x_ehr) + mask[:, :1] * self.gen(x_gen)).squeeze(-1)


def test_inputs_that_are_not_data_pass_through_in_the_model_s_order() -> None:
    model = _TwoInputs()
    x_ehr = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0], [0.0], [1.0]])
    x_gen = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    parts = [InputPart("ehr", ("a", "b")), None, InputPart("genomics", ("g1", "g2", "g3"))]
    rows, features, _ = integrated_gradients(model, [x_ehr, mask, x_gen], parts, batch_size=2)
    assert features == ("ehr:a", "ehr:b", "genomics:g1", "genomics:g2", "genomics:g3")
    w_gen = model.gen.weight[0].detach()
    expected_gen = (mask[:, :1] * w_gen * x_gen).abs()
    expected_ehr = (model.ehr.weight[0].detach() * x_ehr).abs()
    np.testing.assert_allclose(rows[:, :2], expected_ehr.numpy(), atol=1e-6)
    np.testing.assert_allclose(rows[:, 2:], expected_gen.numpy(), atol=1e-6)
    shares = modality_shares(
        dict(zip(features, rows.mean(axis=0), strict=True)),
        {f: f.split(":")[0] for f in features},
    )
    assert math.isclose(sum(shares.values()), 1.0)


def test_bad_descriptions_are_refused_with_the_input_named() -> None:
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    x = torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="3 columns but 2 names"):
        integrated_gradients(model, [x], [InputPart("ehr", ("a", "b"))])
    with pytest.raises(ConfigError, match="nothing to attribute"):
        integrated_gradients(model, [x], [None])
    with pytest.raises(ConfigError, match="named by two"):
        integrated_gradients(model, [x, x], [InputPart("ehr", None), InputPart("ehr", None)])


finite_rows = arrays(
    np.float64,
    st.tuples(st.integers(1, 6), st.integers(1, 5)),
    elements=st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=60, deadline=None)
@given(rows=finite_rows, clip=st.floats(1e-3, 1e3))
def test_one_patient_moves_the_exact_sums_by_at_most_the_sensitivity(
    rows: np.ndarray, clip: float
) -> None:
    """Add/remove one patient: the exact release vector moves by <= sqrt(2) in L2."""
    with_all = contributions(rows, clip=clip).sum(axis=0)
    without_last = contributions(rows[:-1], clip=clip).sum(axis=0)
    assert np.linalg.norm(with_all - without_last) <= SENSITIVITY * (1 + 1e-9)


def test_rows_within_the_clip_keep_their_direction_and_scale() -> None:
    c = contributions(np.array([[0.5, 0.0], [30.0, 40.0]]), clip=1.0)
    np.testing.assert_allclose(c, [[0.5, 0.0, 1.0], [0.6, 0.8, 1.0]])
    with pytest.raises(DataError):
        contributions(np.array([[-1.0, 0.0]]))
    with pytest.raises(ConfigError):
        contributions(np.array([[1.0]]), clip=0.0)


def test_the_noise_has_the_mechanism_s_standard_deviation() -> None:
    rows = np.zeros((10, 3))
    gen = np.random.default_rng(12345)
    draws = np.array(
        [
            [*r.sums, r.n]
            for r in (
                release(rows, ["a", "b", "c"], ["ehr"] * 3, noise_multiplier=2.0, generator=gen)
                for _ in range(3000)
            )
        ]
    )
    std = draws.std(axis=0)
    np.testing.assert_allclose(std, 2.0 * math.sqrt(2.0), rtol=0.06)
    np.testing.assert_allclose(draws.mean(axis=0), [0, 0, 0, 10], atol=0.25)
    with pytest.raises(ConfigError, match="OS entropy"):
        release(rows, ["a", "b", "c"], ["ehr"] * 3, noise_multiplier=1.0, generator=None)


def test_summed_site_releases_equal_the_pooled_release_and_small_ones_are_withheld() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 3, (12, 2)), rng.uniform(0, 3, (9, 2))
    names, mods = ["ehr:x", "genomics:g"], ["ehr", "genomics"]
    site_a = release(a, names, mods, noise_multiplier=0.0, generator=None)
    site_b = release(b, names, mods, noise_multiplier=0.0, generator=None)
    pooled = release(np.vstack([a, b]), names, mods, noise_multiplier=0.0, generator=None)
    total = sum_releases([site_a, site_b])
    assert total is not None
    np.testing.assert_allclose(total.sums, pooled.sums)
    assert total.n == pooled.n == 21
    got = importances_from_release(total, min_count=5)
    assert got is not None
    clipped = contributions(np.vstack([a, b]))[:, :2] * 2.0  # clip 2: back to logit units
    np.testing.assert_allclose([got["ehr:x"], got["genomics:g"]], clipped.mean(axis=0))
    assert importances_from_release(site_b, min_count=10) is None
    with pytest.raises(DataError):
        sum_releases([site_a, AttributionRelease(("other",), ("ehr",), (1.0,), 1.0, 2.0)])
