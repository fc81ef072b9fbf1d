"""The global model and the run's record, checkpointed atomically after every round.

A checkpoint is one file written to a temporary name and renamed into place, so a crash
leaves either the previous round's checkpoint or this one, never a torn file. A restarted
server resumes from the last completed round. The run folder is private (mode 0700,
tightened if it was wider) and the checkpoint file mode 0600, whatever the umask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.files import atomic_private, private_dir

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "CHECKPOINT_NAME"]

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


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    return Checkpoint(
        run_id=payload["run_id"],
        round=int(payload["round"]),
        arrays={k: v.numpy() for k, v in payload["arrays"].items()},
        record=payload["record"],
    )
