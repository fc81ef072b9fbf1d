"""The run manifest (``synth.json``) and the rank-based AUROC it reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["rank_auroc", "write_manifest", "MANIFEST_FILENAME", "TRUTH_FILENAME"]

MANIFEST_FILENAME = "synth.json"
TRUTH_FILENAME = "synth_truth.csv"


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by the Mann-Whitney statistic, with mid-ranks for tied scores.

    Equals the probability that a random positive scores above a random negative,
    counting ties as one half.

    Parameters
    ----------
    scores:
        Real scores, one per example.
    labels:
        0/1 labels, same length; both classes must occur.

    Raises
    ------
    ValueError
        When the lengths differ or only one class occurs.

    Examples
    --------
    >>> rank_auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    >>> rank_auroc(np.array([1.0, 1.0]), np.array([0, 1]))
    0.5
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D of equal length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both a positive and a negative label")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=float)
    # mid-ranks: every run of equal scores gets the mean of its 1-based positions
    bounds = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(s)]])
    mid = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _rounded(obj: Any) -> Any:
    """Floats rounded to 6 decimals, recursively (stable, readable JSON)."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v) for v in obj]
    return obj


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest`` as sorted, indented JSON (byte-stable for equal content)."""
    text = json.dumps(_rounded(manifest), indent=2, sort_keys=True) + "\n"
    path.write_text(text, encoding="utf-8")
