"""A survival site's replies carry nothing per patient: a planted patient's time and id are
searched for in every reply and every log, in exact and in DP evaluation.

The planted patient has a time no other patient has (1234.5678 days) and an id no other
has; the centre crafts nothing here, it just reads what a site sends. Crafted weights are
covered by the release itself: one patient is one cell of a Gaussian histogram
(``tests/models/test_survival.py``), charged to the ledger like any evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import handle_evaluate, handle_train
from fedcare.client.ledger import PrivacyLedger
from fedcare.common import keys
from fedcare.common.encoding import input_dims
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.common.spec import load_site_spec
from fedcare.models import build_model
from fedcare.models.tasks import task_definition
from fedcare.simulations.realdata import dataset, write_real_sites
from fedcare.simulations.realdata.survival import TIME
from tests._flower import model_of, server_message, task_identity

PLANTED_TIME = 1234.5678
PLANTED_ID = "PLANTED-PATIENT-9137"
TASK = "recurrence"


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _sites(root: Path, *, simulated: bool) -> Path:
    folders = write_real_sites(dataset("gbsg2"), root, seed=1, simulated=simulated)
    table = pd.read_csv(folders[0] / "ehr.csv", dtype=str)
    table.loc[0, "patient_id"] = PLANTED_ID
    table.loc[0, TIME] = repr(PLANTED_TIME)
    table.to_csv(folders[0] / "ehr.csv", index=False)
    return root


def _context(sites: Path, state: Path) -> Context:
    cfg = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": TASK,
        "num-server-rounds": 1,
        "evaluate-every": 1,
    }
    rc = FederationConfig.from_run_config(cfg).to_run_config()
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=rc,
    )


def _message(sites: Path, kind: str) -> Message:
    """The server's message, carrying the survival model the centre builds from the schema."""
    msg = server_message(sites / "site-0", kind=kind, task=TASK)
    spec = load_site_spec(sites / "site-0")
    task = spec.task(TASK)
    definition = task_definition(task, label=spec.label(task.label))
    model = definition.kind.wrap(
        build_model(definition.model, input_dims=input_dims(spec.feature_schema, task))
    )
    msg.content[keys.REC_ARRAYS] = pack_record(model.state_dict())
    return msg


def _numbers(reply: Message) -> list[float]:
    out: list[float] = []
    for record in (*reply.content.metric_records.values(), *reply.content.config_records.values()):
        for value in record.values():
            values = value if isinstance(value, list) else [value]
            out += [float(v) for v in values if isinstance(v, (int, float))]
    return out


def _assert_nothing_per_patient(reply: Message, state: Path) -> None:
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    content = reply.content
    assert set(content.keys()) <= {keys.REC_ARRAYS, keys.REC_METRICS, keys.REC_SITE}
    for name in content.metric_records[keys.REC_METRICS]:
        assert keys.is_allowed_metric(name), f"metric {name!r} is not whitelisted"
    numbers = np.array(_numbers(reply))
    assert not np.any(np.isclose(numbers, PLANTED_TIME, rtol=0, atol=1e-3)), numbers
    texts = [str(v) for r in content.config_records.values() for v in r.values()]
    texts += [p.read_text(errors="replace") for p in state.rglob("*.jsonl")]
    for text in texts:
        assert PLANTED_ID not in text and "1234.5678" not in text


@pytest.mark.parametrize("simulated", [True, False], ids=["exact", "dp"])
def test_survival_replies_carry_no_patients_time_or_id(tmp_path: Path, simulated: bool) -> None:
    sites = _sites(tmp_path / "sites", simulated=simulated)
    state = tmp_path / "state"
    msg = _message(sites, "train")
    sent = model_of(msg.content[keys.REC_ARRAYS])
    reply = handle_train(msg, _context(sites, state))
    _assert_nothing_per_patient(reply, state)
    arrays = model_of(reply.content[keys.REC_ARRAYS])
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in sent.items()}
    assert any(not torch.equal(arrays[k], sent[k]) for k in sent)

    reply = handle_evaluate(_message(sites, "evaluate"), _context(sites, state))
    _assert_nothing_per_patient(reply, state)
    wire = reply.content[keys.REC_METRICS]
    # The last evaluation's survival curves: life-table counts and predicted-survival sums of
    # the test split, each for leading intervals only; none equals the planted time.
    curves = {k for k in wire if keys.is_curve_metric(k)}
    leading = {keys.curve_key(keys.CURVE_AT_RISK, 0), keys.curve_key(keys.CURVE_EVENTS, 0)}
    if simulated:  # exact: the curve is released
        assert leading <= curves
    else:  # DP: withheld whole when the first interval's noisy at-risk count is below k
        assert not curves or leading <= curves
    # Each released split's (risk bin, interval, event) histogram, for the pooled C-index:
    # counts only (exact where the site opted in, noisy under DP), searched above like all.
    hists = {k for k in wire if keys.is_surv_hist_metric(k)}
    assert {k.split(".", 1)[0] for k in hists} == {s for s in keys.EVAL_SPLITS if f"{s}.n" in wire}
    metrics = set(wire) - {keys.M_NUM_EXAMPLES} - curves - hists
    if simulated:  # exact: the site opted in
        assert {"test.c_index", "test.td_auc", "test.ibs"} <= metrics
    else:  # DP: the noisy histogram's metrics only (a split whose noisy n < k is withheld)
        assert {m.split(".", 1)[1] for m in metrics} <= {"n", "c_index", "td_auc"}
        ledger = PrivacyLedger(state / "gbsg2-0" / "ledger.sqlite")
        assert ledger.count_charges("train") == 1 and ledger.count_charges("evaluate") == 1
