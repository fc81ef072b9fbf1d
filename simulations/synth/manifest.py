"""The run manifest (``synth.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_manifest", "MANIFEST_FILENAME", "TRUTH_FILENAME"]

MANIFEST_FILENAME = "synth.json"
TRUTH_FILENAME = "synth_truth.csv"


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
