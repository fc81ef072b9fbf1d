"""The global model and the run's record, checkpointed atomically after every round.

A checkpoint is one file written to a temporary name and renamed into place, so a crash
leaves either the previous round's checkpoint or this one, never a torn file. A restarted
server resumes from the last completed round.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".checkpoint-", suffix=".tmp")
    os.close(fd)
    payload = {
        "run_id": checkpoint.run_id,
        "round": checkpoint.round,
        "arrays": {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.arrays.items()
        },
        "record": checkpoint.record,
    }
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
