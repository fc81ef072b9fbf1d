"""Test helpers for Flower's Message API."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.encoding import input_dims
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.common.spec import load_site_spec
from fedcare.models import build_model, default_model_for


@contextlib.contextmanager
def task_identity(*, run_id: int, node_id: int = 1, task_id: int = 1) -> Iterator[None]:
    """Play a running task's identity (Flower stamps every new message with it), and give
    back whatever identity was there before."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def server_message(
    site: Path, *, kind: str = "train", run_id: str = "run-a", rnd: int = 1,
    task: str = "readmission",
) -> Message:  # fmt: skip
    """What the server sends a site for round ``rnd``: a fresh model for ``task`` sized from
    the site's schema, and the round's config (run id, schema fingerprint)."""
    spec = load_site_spec(site)
    task_spec = spec.task(task)
    model = build_model(
        default_model_for(task_spec.modalities, timeline=task_spec.timeline is not None),
        input_dims=input_dims(spec.feature_schema, task_spec),
    )
    config = ConfigRecord(
        {
            keys.CFG_FEDCARE_ROUND: rnd,
            keys.RC_RUN_ID: run_id,
            keys.CFG_SCHEMA_FINGERPRINT: spec.feature_schema.fingerprint(),
        }
    )
    TaskIdentity.node_id = 1  # the server's side
    msg = Message(
        RecordDict({keys.REC_ARRAYS: pack_record(model.state_dict()), keys.REC_CONFIG: config}),
        dst_node_id=100,
        message_type=kind,
    )
    TaskIdentity.node_id = 100  # the site's side, for its reply
    return msg


def model_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The named tensors a message's model arrays carry (packed on the wire, as fedcare's
    server and sites send them; plain named arrays pass through)."""
    return {name: torch.from_numpy(value) for name, value in unpack_record(arrays).items()}
