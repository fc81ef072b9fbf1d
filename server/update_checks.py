"""Server-side validation of a site's model update, before any aggregation.

Pure checks on plain numpy arrays; a failure raises :class:`~fedcare.common.errors.UpdateRejected`
whose message says what is wrong, so the guard can record it and drop just that update.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedcare.common.errors import UpdateRejected

__all__ = ["validate_update", "update_norm"]


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over every array."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def validate_update(
    update: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_norm: float = 0.0,
) -> float:
    """Check an update against the global model it was trained from; return its norm.

    Checks, in order: the same array names, each array's shape and dtype, every value
    finite, and (when ``max_norm > 0``) ``||update - reference||_2 <= max_norm``.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(
            f"array names differ from the global model (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'})"
        )
    for name, ref in reference.items():
        arr = np.asarray(update[name])
        if arr.shape != np.shape(ref):
            raise UpdateRejected(f"array {name!r} has shape {arr.shape}, expected {np.shape(ref)}")
        if arr.dtype != np.asarray(ref).dtype:
            raise UpdateRejected(
                f"array {name!r} has dtype {arr.dtype}, expected {np.asarray(ref).dtype}"
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise UpdateRejected(f"array {name!r} holds NaN or infinite values")
    norm = update_norm(update, reference)
    if max_norm > 0 and norm > max_norm:
        raise UpdateRejected(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return norm
