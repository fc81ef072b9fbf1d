"""The global model and the run's record, checkpointed atomically after every round.

A checkpoint is one file written to a temporary name and renamed into place, so a crash
leaves either the previous round's checkpoint or this one, never a torn file. A restarted
server resumes from the last completed round. The run folder is private (mode 0700,
tightened if it was wider) and the checkpoint file mode 0600, whatever the umask.

A checkpoint that cannot be read all the same (cut short when copied, or damaged on disk)
is a :class:`CheckpointError` naming the file and the fix, never half-used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError
from common.files import atomic_private, private_dir

__all__ = ["Checkpoint", "CheckpointError", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class Checkpoint:
    """State after ``round`` completed rounds (0 = the initial model)."""

    run_id: str
    round: int
    arrays: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``<run_dir>/checkpoint.pt`` (mode 0600) atomically; return its path."""
    path = private_dir(run_dir, tighten=False) / CHECKPOINT_NAME
    payload = {
        "run_id": checkpoint.run_id,
        "round": checkpoint.round,
        "arrays": {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.arrays.items()
        },
        "record": checkpoint.record,
    }
    with atomic_private(path) as f:
        torch.save(payload, f)
    return path


class CheckpointError(ConfigError):
    """A run's checkpoint exists but cannot be read (``path``: the file; ``reason``: why)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"{path}: cannot read the run's checkpoint: {reason}. Fix: put back a good copy "
            "of it to resume the run, or start a new run (without --resume, or in another "
            "--out); keep the file if it is evidence"
        )
        self.path = path
        self.reason = reason


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir``; ``None`` when there is none.

    Raises
    ------
    CheckpointError
        The file is there but truncated, damaged or not a fedcare checkpoint.
    """
    path = Path(run_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as e:  # torch reports a torn file as OSError, RuntimeError, EOFError...
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            path,
            f"it is truncated or damaged ({size} bytes; torch: {_first_sentence(e)})",
        ) from e
    try:
        return Checkpoint(
            run_id=str(payload["run_id"]),
            round=int(payload["round"]),
            arrays={k: v.numpy() for k, v in payload["arrays"].items()},
            record=dict(payload["record"]),
        )
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(path, f"it is not a fedcare checkpoint ({e!r})") from e


def _first_sentence(error: BaseException) -> str:
    """The first line and sentence of an error's text (torch's run to a paragraph)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    sentence, dot, _ = text.partition(". ")
    return (sentence + dot.strip())[:200] or type(error).__name__
