"""The ClientApp's handlers, called with real Flower messages: what leaves a site.

Every message a site sends is inspected: only model arrays, whitelisted aggregate metrics and
the site record cross the wire; refusals are error replies naming the site.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

from fedcare.client.app import handle_evaluate, handle_train
from fedcare.client.ledger import PrivacyLedger
from fedcare.common import keys
from fedcare.common.audit import read_entries
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.common.spec import load_site_spec
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import model_of, server_message, task_identity

ROOT_SITES = 2


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=ROOT_SITES, seed=5, config=SynthConfig(patients_per_site=120))
    return root


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _context(sites: Path, state: Path, pid: int = 0, **run_config: object) -> Context:
    cfg = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": "readmission",
        "num-server-rounds": 2,
        "local-epochs": 1,
        **run_config,
    }
    rc = FederationConfig.from_run_config(cfg).to_run_config()
    return Context(
        run_id=3,
        node_id=100 + pid,
        node_config={"partition-id": pid, "num-partitions": 2},
        state=RecordDict(),
        run_config=rc,
    )


def _message(sites: Path, kind: str, rnd: int = 1, task: str = "readmission") -> Message:
    return server_message(sites / "site-0", kind=kind, rnd=rnd, task=task)


def _assert_only_aggregates(reply: Message) -> None:
    content = reply.content
    assert set(content.keys()) <= {keys.REC_ARRAYS, keys.REC_METRICS, keys.REC_SITE}
    for name in content.metric_records[keys.REC_METRICS]:
        assert keys.is_allowed_metric(name), f"metric {name!r} is not whitelisted"
    assert set(content.config_records[keys.REC_SITE]) <= keys.SITE_INFO_KEYS


def test_train_reply_holds_only_arrays_aggregates_and_site_record(
    sites: Path, tmp_path: Path
) -> None:
    msg = _message(sites, "train")
    sent = model_of(msg.content[keys.REC_ARRAYS])
    reply = handle_train(msg, _context(sites, tmp_path))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    _assert_only_aggregates(reply)
    arrays = model_of(reply.content[keys.REC_ARRAYS])
    assert set(arrays) == set(sent)  # the model's own parameter names, no "_module." prefix
    assert all(arrays[k].shape == sent[k].shape for k in sent)
    assert any(not torch.equal(arrays[k], sent[k]) for k in sent)
    site = reply.content[keys.REC_SITE]
    assert site[keys.S_SITE_ID] == "site-0" and site[keys.S_DP] is True
    assert 0 < site[keys.S_EPSILON] <= 8.0
    assert reply.content[keys.REC_METRICS][keys.M_NUM_EXAMPLES] > 0
    assert (tmp_path / "site-0" / "ledger.sqlite").is_file()


def test_evaluate_reply_holds_only_whitelisted_metrics(sites: Path, tmp_path: Path) -> None:
    reply = handle_evaluate(_message(sites, "evaluate"), _context(sites, tmp_path))
    assert not reply.has_error()
    _assert_only_aggregates(reply)
    metrics = reply.content[keys.REC_METRICS]
    assert keys.REC_ARRAYS not in reply.content
    assert "test.auroc" in metrics and metrics["test.n"] >= 10


def test_small_splits_are_withheld(sites: Path, tmp_path: Path) -> None:
    reply = handle_evaluate(
        _message(sites, "evaluate"), _context(sites, tmp_path, **{"site-min-count": 10_000})
    )
    names = set(reply.content[keys.REC_METRICS])
    assert names == {keys.M_NUM_EXAMPLES}


def test_spent_budget_is_a_refusal_naming_the_site(sites: Path, tmp_path: Path) -> None:
    ctx = _context(sites, tmp_path, **{"site-epsilon-budget": 0.5, "noise-multiplier": 0.6})
    reply = handle_train(_message(sites, "train"), ctx)
    assert reply.has_error()
    assert reply.error.code == keys.ERR_BUDGET, reply.error.reason
    assert not (tmp_path / "site-0" / "releases").exists()  # nothing trained, nothing released
    assert reply.error.reason.startswith("site-0: ")


def test_schema_mismatch_and_unknown_task_are_refusals(sites: Path, tmp_path: Path) -> None:
    msg = _message(sites, "train")
    msg.content[keys.REC_CONFIG][keys.CFG_SCHEMA_FINGERPRINT] = "0" * 64
    reply = handle_train(msg, _context(sites, tmp_path))
    assert reply.has_error() and "schema" in reply.error.reason
    reply = handle_train(_message(sites, "train"), _context(sites, tmp_path, task="no-such-task"))
    assert reply.has_error() and "no-such-task" in reply.error.reason


def test_a_schema_mismatch_names_the_features_that_differ(sites: Path, tmp_path: Path) -> None:
    spec = load_site_spec(sites / "site-0")
    ehr = spec.feature_schema.ehr
    assert ehr
    dropped = ehr[0].name
    theirs = spec.feature_schema.model_copy(update={"ehr": ehr[1:]})
    msg = _message(sites, "train")
    msg.content[keys.REC_CONFIG][keys.CFG_SCHEMA_FINGERPRINT] = theirs.fingerprint()
    msg.content[keys.REC_CONFIG][keys.CFG_SCHEMA] = theirs.model_dump_json()
    reply = handle_train(msg, _context(sites, tmp_path))
    assert reply.has_error() and dropped in reply.error.reason, reply.error.reason


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (lambda state: pack_record({f"x.{k}": v for k, v in state.items()}), "does not fit"),
        (lambda state: pack_record({k: v[..., :1] for k, v in state.items()}), "does not fit"),
        (lambda state: _undecodable(pack_record(state)), "malformed"),
    ],
)
def test_a_model_the_site_cannot_read_is_a_refusal_with_an_audit_entry(
    sites: Path, tmp_path: Path, arrays: Any, reason: str
) -> None:
    """Whatever model bytes the centre sends, the site answers with a refusal naming why,
    logs it, and charges nothing; it never raises."""
    msg = _message(sites, "train")
    msg.content[keys.REC_ARRAYS] = arrays(model_of(msg.content[keys.REC_ARRAYS]))
    reply = handle_train(msg, _context(sites, tmp_path))
    assert reply.has_error() and reason in reply.error.reason, reply.error.reason
    kinds = [e["kind"] for e in read_entries(tmp_path / "site-0" / "audit.jsonl")]
    assert kinds[-1] == "refused"
    ledger = tmp_path / "site-0" / "ledger.sqlite"
    assert not ledger.exists() or PrivacyLedger(ledger, create=False).count_charges() == 0


def _undecodable(record: ArrayRecord) -> ArrayRecord:
    for array in record.values():
        array.data = b"\x93NUMPY not an array"
    return record


def test_a_data_error_never_sends_or_logs_patient_values(sites: Path, tmp_path: Path) -> None:
    """A broken data file is refused, but its details (values, patient ids) stay at the site."""
    copied = tmp_path / "sites"
    shutil.copytree(sites, copied)
    ehr = copied / "site-0" / "ehr.csv"
    lines = ehr.read_text().splitlines()
    header = lines[1].split(",")
    patient = header[0]
    header[1] = "SECRET-AGE-4711"  # a non-numeric age: validation quotes the bad cell
    lines[1] = ",".join(header)
    ehr.write_text("\n".join(lines) + "\n")
    state = tmp_path / "state"
    reply = handle_train(_message(copied, "train"), _context(copied, state))
    assert reply.has_error() and reply.error.code == keys.ERR_DATA, reply.error
    assert "data failed validation" in reply.error.reason
    assert "fedcare data check" in reply.error.reason
    for text in [reply.error.reason, *(p.read_text() for p in state.rglob("*.jsonl"))]:
        assert "SECRET-AGE-4711" not in text
        assert patient not in text


def test_a_bare_data_path_node_config_is_refused(sites: Path, tmp_path: Path) -> None:
    """Budget and policy must come from the site's own site-config, never the run config."""
    ctx = _context(sites, tmp_path)
    ctx.node_config.clear()
    ctx.node_config[keys.NC_DATA_PATH] = str(sites / "site-0")
    reply = handle_train(_message(sites, "train"), ctx)
    assert reply.has_error() and "site-config.toml" in reply.error.reason
    assert not any(tmp_path.rglob("ledger.sqlite"))


def test_a_state_folder_that_cannot_be_written_is_one_refusal_naming_the_site(
    sites: Path, tmp_path: Path
) -> None:
    # A file where the state folder should be (works as root too, unlike chmod).
    blocked = tmp_path / "state-is-a-file"
    blocked.write_text("x")
    reply = handle_train(_message(sites, "train"), _context(sites, blocked))
    assert reply.has_error() and reply.error.reason.startswith("site-0: ")
    assert "state folder" in reply.error.reason
    # A ledger path the site cannot open as a database (a folder in its place).
    state = tmp_path / "state"
    (state / "site-0" / "ledger.sqlite").mkdir(parents=True)
    reply = handle_train(_message(sites, "train"), _context(sites, state))
    assert reply.has_error() and reply.error.reason.startswith("site-0: ")
    assert "ledger" in reply.error.reason and "Traceback" not in reply.error.reason


def test_a_site_that_cannot_be_loaded_is_named_by_its_site_toml(
    sites: Path, tmp_path: Path
) -> None:
    copied = tmp_path / "sites"
    shutil.copytree(sites, copied)
    (copied / "site-0" / "ehr.csv").unlink()
    reply = handle_train(_message(sites, "train"), _context(copied, tmp_path / "state"))
    assert reply.has_error() and reply.error.reason.startswith("site-0: "), reply.error.reason


def test_divergence_is_its_own_error_and_keeps_the_charge(sites: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # Adam's first step is the learning rate over (1 - beta1) = 10x its size: past float32's
    # 3.4e38 at once. (At 1e37 the one-backward mode gives every patient whose gradient
    # overflowed clip factor 0, so noise alone walks the weights and they stay finite.)
    context = _context(sites, state, **{"learning-rate": 1e38, "local-epochs": 3})
    reply = handle_train(_message(sites, "train"), context)
    assert reply.has_error(), "training at learning-rate 1e38 did not diverge"
    assert reply.error.code == keys.ERR_DIVERGED, reply.error.reason
    assert "diverged" in reply.error.reason and "learning-rate 1e+38" in reply.error.reason
    ledger = PrivacyLedger(state / "site-0" / "ledger.sqlite")
    assert ledger.count_charges() == 1  # the round was charged; the charge stands


def test_a_refusal_after_the_site_was_loaded_reports_its_ledger_epsilon(
    sites: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    context = _context(sites, state)
    assert not handle_train(_message(sites, "train"), context).has_error()
    # The same run asks for a round past its plan: refused, with the ε its ledger holds.
    reply = handle_train(_message(sites, "train", rnd=9), context)
    assert reply.has_error(), "round 9 of a 2-round run was not refused"
    _, epsilon, delta = keys.ledger_epsilon(reply.error.reason)
    ledger = PrivacyLedger(state / "site-0" / "ledger.sqlite")
    (summary,) = ledger.summary()
    assert epsilon is not None and epsilon > 0 and delta == 1e-5
    spent = ledger.spent(summary.fingerprint, delta=1e-5, accountant="prv")
    assert epsilon == pytest.approx(spent, rel=1e-5)


def test_a_train_message_that_carries_the_evaluation_before_it_answers_both(
    sites: Path, tmp_path: Path
) -> None:
    """Round 1's evaluation inside round 2's train message is the evaluation a separate
    evaluate message of round 1 with the same model gets (exact here, so equal), logged under
    round 1 before the training of round 2."""
    msg = _message(sites, "train", rnd=2)
    msg.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = 1
    separate = _message(sites, "evaluate", rnd=1)
    separate.content[keys.REC_ARRAYS] = msg.content[keys.REC_ARRAYS]
    reference = handle_evaluate(separate, _context(sites, tmp_path / "separate"))
    assert not reference.has_error(), reference.error.reason

    reply = handle_train(msg, _context(sites, tmp_path / "folded"))
    assert not reply.has_error(), reply.error.reason
    content = reply.content
    assert set(content) == {
        keys.REC_ARRAYS,
        keys.REC_METRICS,
        keys.REC_SITE,
        keys.REC_EVAL_METRICS,
        keys.REC_EVAL_SITE,
    }
    assert dict(content[keys.REC_EVAL_METRICS]) == dict(reference.content[keys.REC_METRICS])
    info = dict(content[keys.REC_EVAL_SITE])
    assert set(info) <= keys.SITE_INFO_KEYS and info.pop(keys.S_EVALUATED_ROUND) == 1
    other = dict(reference.content[keys.REC_SITE])
    assert {k: v for k, v in info.items() if k != keys.S_AUDIT_KEY} == {
        k: v for k, v in other.items() if k != keys.S_AUDIT_KEY
    }
    entries = read_entries(tmp_path / "folded" / "site-0" / "audit.jsonl")
    assert [(e["kind"], e["data"].get("round")) for e in entries if "round" in e["data"]] == [
        ("evaluate", 1),
        ("train", 2),
    ]


def test_a_folded_evaluation_the_site_refuses_leaves_the_training_done(
    sites: Path, tmp_path: Path
) -> None:
    """Only the round before the message's own may be asked for; the refusal is logged
    and reported in its own record, and the site still trains. A malformed request is a
    refusal of the whole message."""
    msg = _message(sites, "train", rnd=2)
    msg.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = 0
    reply = handle_train(msg, _context(sites, tmp_path))
    assert not reply.has_error(), reply.error.reason
    refusal = reply.content[keys.REC_EVAL_REFUSAL]
    assert refusal[keys.F_CODE] == keys.ERR_POLICY
    assert str(refusal[keys.F_REASON]).startswith("site-0: ")
    assert "only the evaluation of the round before" in str(refusal[keys.F_REASON])
    assert keys.REC_ARRAYS in reply.content and keys.REC_EVAL_METRICS not in reply.content
    entries = read_entries(tmp_path / "site-0" / "audit.jsonl")
    assert [(e["kind"], e["data"].get("round")) for e in entries if "round" in e["data"]] == [
        ("refused", 0),
        ("train", 2),
    ]
    bad = _message(sites, "train", rnd=2)
    bad.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = "one"
    reply = handle_train(bad, _context(sites, tmp_path / "2"))
    assert reply.has_error() and keys.CFG_EVALUATE_ROUND in reply.error.reason


@pytest.mark.parametrize("value", [math.inf, math.nan, 2.5])
def test_a_round_number_that_is_not_an_integer_is_a_refusal_not_a_crash(
    sites: Path, tmp_path: Path, value: float
) -> None:
    """``int(inf)`` raises OverflowError: the site must refuse (audited), not crash."""
    with task_identity(run_id=1):
        msg = _message(sites, "train", rnd=2)
        msg.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = value
        reply = handle_train(msg, _context(sites, tmp_path))
    assert reply.has_error() and reply.error.code == keys.ERR_CONFIG
    assert keys.CFG_EVALUATE_ROUND in reply.error.reason
