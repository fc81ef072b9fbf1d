"""A site training the timeline model sends nothing per patient: a planted event (a value
and a time no other event has) is searched for in every reply and every log, raw and as
the site encodes it, with exact and with DP evaluation.

The timeline's encoding constants come from the shared schema, so the centre learns
nothing from them either; what leaves is the model's weights (DP-SGD) and the metrics
every task sends (exact only where the simulated site opted in).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import handle_evaluate, handle_train
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.simulations.synth import SynthConfig, synthesize
from fedcare.simulations.synth.timeline import TIMELINE_TASK, timeline_schema
from tests._flower import model_of, server_message, task_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

PLANTED_VALUE = 187.6543  # a heart rate no other event has
PLANTED_TIME = 613.2468  # hours; no other event has it


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=4):
        yield


def _sites(root: Path, *, simulated: bool) -> Path:
    config = SynthConfig(
        patients_per_site=120,
        n_genes=12,
        image_size=16,
        image_format="npy",
        table_format="csv",
        temporal_signal=True,
        simulated=simulated,
    )
    folders = synthesize(root, n_sites=1, seed=2, config=config)
    events = pd.read_csv(folders[0] / "events.csv", dtype=str)
    row = int(np.flatnonzero(events["code"].to_numpy() == "HR")[0])
    events.loc[row, "value"] = repr(PLANTED_VALUE)
    events.loc[row, "time"] = repr(PLANTED_TIME)
    events.to_csv(folders[0] / "events.csv", index=False)
    return root


def _context(sites: Path, state: Path) -> Context:
    cfg = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": TIMELINE_TASK,
        "num-server-rounds": 1,
        "evaluate-every": 1,
    }
    return Context(
        run_id=4,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=FederationConfig.from_run_config(cfg).to_run_config(),
    )


def _forms() -> list[float]:
    """The planted event as the reply could carry it: raw, and as the site encodes it."""
    hr = next(c for c in timeline_schema().codes if c.code == "HR")
    return [PLANTED_VALUE, PLANTED_TIME, (PLANTED_VALUE - hr.center) / hr.scale]


def _numbers(reply: Message) -> np.ndarray:
    out: list[float] = []
    for record in (*reply.content.metric_records.values(), *reply.content.config_records.values()):
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            out += [float(v) for v in values if isinstance(v, (int, float))]
    return np.array(out)


def _assert_nothing_per_patient(reply: Message, state: Path) -> None:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.keys()) <= {keys.REC_ARRAYS, keys.REC_METRICS, keys.REC_SITE}
    for name in content.metric_records[keys.REC_METRICS]:
        assert keys.is_allowed_metric(name), f"metric {name!r} is not whitelisted"
    numbers = _numbers(reply)
    for planted in _forms():
        assert not np.any(np.isclose(numbers, planted, rtol=0, atol=1e-3)), (planted, numbers)
    texts = [str(v) for r in content.config_records.values() for v in r.values()]
    texts += [p.read_text(errors="replace") for p in state.rglob("*.jsonl")]
    for text in texts:
        for planted in _forms():
            assert f"{planted:.3f}" not in text and repr(planted) not in text


@pytest.mark.parametrize("simulated", [True, False], ids=["exact", "dp"])
def test_timeline_replies_carry_no_patients_event(tmp_path: Path, simulated: bool) -> None:
    sites = _sites(tmp_path / "sites", simulated=simulated)
    state = tmp_path / "state"
    msg = server_message(sites / "site-0", kind="train", task=TIMELINE_TASK)
    sent = model_of(msg.content[keys.REC_ARRAYS])
    assert any("relative" in k for k in sent), "the centre sent the timeline model"
    reply = handle_train(msg, _context(sites, state))
    _assert_nothing_per_patient(reply, state)
    arrays = model_of(reply.content[keys.REC_ARRAYS])
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in sent.items()}
    assert any(not torch.equal(arrays[k], sent[k]) for k in sent)
    assert all(math.isfinite(float(v.abs().sum())) for v in arrays.values())

    evaluate = server_message(sites / "site-0", kind="evaluate", task=TIMELINE_TASK)
    reply = handle_evaluate(evaluate, _context(sites, state))
    _assert_nothing_per_patient(reply, state)
    assert reply.content[keys.REC_METRICS], "the evaluation sent its (aggregate) metrics"
