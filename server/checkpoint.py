"""The global model and the run's record, checkpointed atomically after every round.

A checkpoint is one file written to a temporary name and renamed into place, so a crash
leaves either the previous round's checkpoint or this one, never a torn file. A restarted
server resumes from the last completed round. The run folder is private (mode 0700,
tightened if it was wider) and the checkpoint file mode 0600, whatever the umask.

A checkpoint that cannot be read all the same (cut short when copied, or damaged on disk)
is a :class:`CheckpointError` naming the file and the fix, never half-used.

The checkpoint also carries the server optimizer's state (:class:`OptimizerState`): the
moments ``m_t``/``v_t`` of Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad), in the same
file and the same atomic write as the model, so a resumed run continues the same
optimisation instead of restarting Adam from zero moments (``server/strategies.py`` takes
the state from a strategy and puts it back). A stateless strategy (FedAvg, ...) saves none.
A checkpoint of an older fedcare (:data:`CHECKPOINT_FORMAT` 1, no optimizer state) still
loads; its run resumes with fresh moments. Optimizer state whose arrays do not match the
checkpoint's model (names, shapes) or are not finite is a :class:`CheckpointError`.

On disk (``torch.save``, read back with ``weights_only=True``)::

    {"format": 2, "run_id": str, "round": int, "arrays": {name: tensor},
     "record": {...},
     "optimizer": None | {"strategy": "FedAdam", "moments": {"m_t": {name: tensor}, ...}}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcare.common.errors import ConfigError
from fedcare.common.files import atomic_private, private_dir
from fedcare.common.run_files import CHECKPOINT_NAME

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "OptimizerState",
    "save_checkpoint",
    "load_checkpoint",
    "optimizer_mismatch",
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
]

#: 1: model arrays and run record (fedcare before the optimizer state); 2: + ``optimizer``.
CHECKPOINT_FORMAT = 2


@dataclass(frozen=True)
class OptimizerState:
    """A server optimizer's state between rounds.

    Parameters
    ----------
    strategy:
        Class name of the strategy that holds it (``"FedAdam"``, ``"FedYogi"``, ...).
    moments:
        Attribute name (``"m_t"``, ``"v_t"``) -> one array per model array, by the model
        array's name. A moment the strategy has not started yet (before its first
        aggregation) is absent.
    """

    strategy: str
    moments: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Checkpoint:
    """State after ``round`` completed rounds (0 = the initial model).

    ``optimizer`` is the server optimizer's state (``None``: the strategy keeps none);
    ``format`` is :data:`CHECKPOINT_FORMAT` for a checkpoint written now, 1 for one written
    by an older fedcare, which saved no optimizer state.
    """

    run_id: str
    round: int
    arrays: dict[str, np.ndarray]
    record: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerState | None = None
    format: int = CHECKPOINT_FORMAT


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``<run_dir>/checkpoint.pt`` (mode 0600) atomically; return its path.

    The model, the run record and the optimizer state go into one file in one atomic write:
    a crash leaves the previous round's three or this round's, never a mix.
    """
    path = private_dir(run_dir, tighten=False) / CHECKPOINT_NAME
    optimizer = checkpoint.optimizer
    payload = {
        "format": CHECKPOINT_FORMAT,
        "run_id": checkpoint.run_id,
        "round": checkpoint.round,
        "arrays": _tensors(checkpoint.arrays),
        "record": checkpoint.record,
        "optimizer": (
            None
            if optimizer is None
            else {
                "strategy": optimizer.strategy,
                "moments": {name: _tensors(m) for name, m in optimizer.moments.items()},
            }
        ),
    }
    with atomic_private(path) as f:
        torch.save(payload, f)
    return path


class CheckpointError(ConfigError):
    """A run's checkpoint exists but cannot be read (``path``: the file; ``reason``: why)."""

    def __init__(self, path: Path, reason: str, *, fix: str | None = None) -> None:
        super().__init__(
            f"{path}: cannot read the run's checkpoint: {reason}. Fix: "
            + (
                fix
                or "put back a good copy of it to resume the run, or start a new run "
                "(without --resume, or in another --out); keep the file if it is evidence"
            )
        )
        self.path = path
        self.reason = reason


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir``; ``None`` when there is none.

    Raises
    ------
    CheckpointError
        The file is there but truncated, damaged or not a fedcare checkpoint, written by a
        newer fedcare, or its optimizer state does not match its model.
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
        fmt = payload.get("format", 1)
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise ValueError(f"format {fmt!r} is not a checkpoint format")
        checkpoint = Checkpoint(
            run_id=str(payload["run_id"]),
            round=int(payload["round"]),
            arrays={k: v.numpy() for k, v in payload["arrays"].items()},
            record=dict(payload["record"]),
            optimizer=_optimizer_from_payload(payload.get("optimizer")),
            format=fmt,
        )
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(path, f"it is not a fedcare checkpoint ({e!r})") from e
    if checkpoint.format > CHECKPOINT_FORMAT:
        raise CheckpointError(
            path,
            f"it was written by a newer fedcare (checkpoint format {checkpoint.format}; this "
            f"one reads up to {CHECKPOINT_FORMAT})",
            fix="resume the run with the fedcare version that wrote it, or start a new run "
            "(without --resume, or in another --out)",
        )
    if checkpoint.optimizer is not None:
        problem = optimizer_mismatch(checkpoint.optimizer, checkpoint.arrays)
        if problem is not None:
            raise CheckpointError(
                path,
                f"its optimizer state does not match its own model: {problem}",
            )
    return checkpoint


def _optimizer_from_payload(raw: Any) -> OptimizerState | None:
    """The optimizer state as saved (``None``: none saved); TypeError/KeyError otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw["strategy"], str):
        raise TypeError("its optimizer state is not a {strategy, moments} record")
    return OptimizerState(
        strategy=raw["strategy"],
        moments={
            str(name): {str(k): v.numpy() for k, v in moment.items()}
            for name, moment in raw["moments"].items()
        },
    )


def optimizer_mismatch(state: OptimizerState, model: Mapping[str, np.ndarray]) -> str | None:
    """Why ``state`` cannot drive ``model`` (first problem found); ``None`` when it can.

    Each moment must hold exactly one finite array per model array, of the same shape.

    Examples
    --------
    >>> w = {"w": np.zeros((2, 2))}
    >>> optimizer_mismatch(OptimizerState("FedAdam", {"m_t": w}), w) is None
    True
    >>> optimizer_mismatch(OptimizerState("FedAdam", {"m_t": w}), {"w": np.zeros(3)})
    "FedAdam's m_t['w'] has shape (2, 2), the model's 'w' has shape (3,)"
    """
    for name, moment in state.moments.items():
        missing = sorted(set(model) - set(moment))
        extra = sorted(set(moment) - set(model))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks the model's {_names(missing)}")
            if extra:
                parts.append(f"has {_names(extra)}, which the model lacks")
            return f"{state.strategy}'s {name} " + " and ".join(parts)
        for key, array in moment.items():
            shape, expected = tuple(np.shape(array)), tuple(np.shape(model[key]))
            if shape != expected:
                return (
                    f"{state.strategy}'s {name}[{key!r}] has shape {shape}, "
                    f"the model's {key!r} has shape {expected}"
                )
            if not np.all(np.isfinite(array)):
                return f"{state.strategy}'s {name}[{key!r}] holds a NaN or an infinity"
    return None


def _names(names: list[str], most: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return f"array{'s' if len(names) > 1 else ''} {shown}{more}"


def _first_sentence(error: BaseException) -> str:
    """The first line and sentence of an error's text (torch's run to a paragraph)."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    sentence, dot, _ = text.partition(". ")
    return (sentence + dot.strip())[:200] or type(error).__name__
