"""Update validation: each malformed kind is caught with its reason; the norm matches numpy."""

from __future__ import annotations

import numpy as np
import pytest

from fedcare.common.errors import UpdateRejected
from fedcare.server.update_checks import update_norm, validate_update

REF = {"w": np.zeros((3, 2), dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def good() -> dict[str, np.ndarray]:
    return {"w": np.ones((3, 2), dtype=np.float32), "b": np.full(2, 2.0, dtype=np.float32)}


def test_valid_update_returns_its_norm_against_numpy() -> None:
    upd = good()
    expected = np.linalg.norm(np.concatenate([(upd[k] - REF[k]).ravel() for k in REF]))
    assert validate_update(upd, REF) == pytest.approx(expected)
    assert update_norm(upd, REF) == pytest.approx(np.sqrt(6 * 1 + 2 * 4))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda u: u.pop("b"), "missing: ['b']"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), "unexpected: ['extra']"),
        (lambda u: u.update(w=np.zeros((2, 3), np.float32)), "shape (2, 3)"),
        (lambda u: u.update(w=np.zeros((3, 2), np.float64)), "dtype float64"),
        (lambda u: u["w"].__setitem__((0, 0), np.nan), "NaN or infinite"),
        (lambda u: u["b"].__setitem__(1, np.inf), "NaN or infinite"),
    ],
)
def test_malformed_updates_are_rejected_with_the_reason(mutate, needle: str) -> None:
    upd = good()
    mutate(upd)
    with pytest.raises(UpdateRejected, match=None) as info:
        validate_update(upd, REF)
    assert needle in str(info.value)


def test_norm_bound() -> None:
    with pytest.raises(UpdateRejected, match="exceeds the bound"):
        validate_update(good(), REF, max_norm=1.0)
    assert validate_update(good(), REF, max_norm=10.0) < 10.0
