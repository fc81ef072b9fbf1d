"""``server/checkpoint.py``: what the other suites leave out.

Truncated and foreign files are in ``tests/faults/test_files_whole.py``, modes in
``tests/security/test_file_modes.py``, optimizer state that does not fit and resuming in
``test_optimizer_resume.py``. Here: an exact round trip of every part, payloads that are
torch files but not fedcare checkpoints, and how a mismatch is worded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcare.server.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    OptimizerState,
    load_checkpoint,
    optimizer_mismatch,
    save_checkpoint,
)


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.normal(size=(3, 5)).astype(np.float32).T,  # not contiguous: saved all the same
        "steps": np.arange(4, dtype=np.int64),
        "scale": np.array(2.5, dtype=np.float64),
    }


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None
    assert load_checkpoint(tmp_path / "not-yet-made") is None


def test_a_checkpoint_reads_back_exactly(tmp_path: Path) -> None:
    arrays = _arrays()
    record = {"sites": {"a": {"status": "completed"}}, "rounds": [{"round": 2}], "events": []}
    moments = {
        "m_t": {k: np.full(v.shape, 0.25) for k, v in arrays.items()},
        "v_t": {k: np.full(v.shape, 1e-8) for k, v in arrays.items()},
    }
    path = save_checkpoint(
        tmp_path, Checkpoint("run-9", 2, arrays, record, OptimizerState("FedAdam", moments))
    )
    assert path == tmp_path / CHECKPOINT_NAME
    got = load_checkpoint(tmp_path)
    assert got is not None
    assert (got.run_id, got.round, got.format, got.record) == (
        "run-9",
        2,
        CHECKPOINT_FORMAT,
        record,
    )
    assert got.arrays.keys() == arrays.keys()
    for k, v in arrays.items():
        assert got.arrays[k].dtype == v.dtype
        np.testing.assert_array_equal(got.arrays[k], v)
    assert got.optimizer is not None and got.optimizer.strategy == "FedAdam"
    for name, moment in moments.items():
        for k, v in moment.items():
            np.testing.assert_array_equal(got.optimizer.moments[name][k], v)


def test_a_stateless_checkpoint_reads_back_without_optimizer_state(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint("r", 1, _arrays()))
    got = load_checkpoint(tmp_path)
    assert got is not None and got.optimizer is None and got.record == {}


def _payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "format": 2,
        "run_id": "r",
        "round": 1,
        "arrays": {"w": torch.zeros(2)},
        "record": {},
        "optimizer": None,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_payload(arrays=_DROP), id="no-arrays"),
        pytest.param(_payload(run_id=_DROP), id="no-run-id"),
        pytest.param(_payload(format=True), id="format-bool"),
        pytest.param(_payload(format=0), id="format-0"),
        pytest.param(_payload(format="2"), id="format-str"),
        pytest.param(_payload(round="two"), id="round-not-a-number"),
        pytest.param(_payload(optimizer=["FedAdam"]), id="optimizer-not-a-record"),
        pytest.param(_payload(optimizer={"strategy": 3, "moments": {}}), id="optimizer-unnamed"),
        pytest.param(_payload(arrays={"w": [1.0, 2.0]}), id="arrays-not-tensors"),
        pytest.param(torch.zeros(3), id="a-bare-tensor"),
        pytest.param([1, 2, 3], id="a-list"),
    ],
)
def test_a_torch_file_that_is_not_a_fedcare_checkpoint_is_refused(
    tmp_path: Path, payload: Any
) -> None:
    path = tmp_path / CHECKPOINT_NAME
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: cannot read the run's checkpoint")
    assert "not a fedcare checkpoint" in message
    assert "Fix: put back a good copy of it to resume the run, or start a new run" in message
    assert info.value.path == path


def test_an_old_format_1_checkpoint_still_reads(tmp_path: Path) -> None:
    torch.save(_payload(format=_DROP, optimizer=_DROP), tmp_path / CHECKPOINT_NAME)
    got = load_checkpoint(tmp_path)
    assert got is not None and got.format == 1 and got.optimizer is None


@pytest.mark.parametrize(
    "moment, model, words",
    [
        ({"a": 0}, {"a": 0, "b": 0}, "FedAdam's m_t lacks the model's array 'b'"),
        (
            {"x": 0},
            {k: 0 for k in "abcde"},
            "lacks the model's arrays 'a', 'b', 'c' and 2 more and has array 'x', which the "
            "model lacks",
        ),
        (
            {"a": np.zeros(2)},
            {"a": np.zeros((2, 1))},
            "m_t['a'] has shape (2,), the model's 'a' has shape (2, 1)",
        ),
        ({"a": np.array([1.0, np.inf])}, {"a": np.zeros(2)}, "m_t['a'] holds a NaN or an infinity"),
    ],
)
def test_a_mismatch_is_named_by_moment_and_array(
    moment: dict[str, Any], model: dict[str, Any], words: str
) -> None:
    as_arrays = {k: np.asarray(v, dtype=np.float64) for k, v in moment.items()}
    model_arrays = {k: np.asarray(v, dtype=np.float64) for k, v in model.items()}
    problem = optimizer_mismatch(OptimizerState("FedAdam", {"m_t": as_arrays}), model_arrays)
    assert problem is not None and words in problem
