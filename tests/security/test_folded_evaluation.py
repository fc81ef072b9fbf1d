"""A centre that asks for evaluations inside train messages (docs/threat-model.md,
"Evaluation inside a train message").

The server folds round r's evaluation into round r + 1's train message
(``keys.CFG_EVALUATE_ROUND``). A curious or malicious centre may put that request into any
train message, for any round, with any model, as often as it likes. The site must release no
more evaluations than its own plan allows: only rounds the signed run evaluates after, each
once (asked again: the stored release for the same request, a refusal for any other), each
charged and logged as a separate evaluate message's would be. The sites are real (no
``[simulation]`` table): DP training and DP evaluation releases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import handle_evaluate, handle_train
from fedcare.client.audit import AUDIT_LOG_NAME, audited_charges
from fedcare.client.ledger import PrivacyLedger
from fedcare.common import keys
from fedcare.common.audit import read_entries
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.simulations.audit.epsilon import audit_charges, site_log_charges
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import model_of, server_message, task_identity
from tests.security.conftest import TASK

pytestmark = [
    pytest.mark.slow,  # three DP-SGD rounds and two DP evaluations of a real site
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folded-sites")
    config = SynthConfig(patients_per_site=200, size_skew=0.0, n_genes=12, simulated=False)
    synthesize(root, n_sites=1, seed=5, config=config)
    return root


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _context(sites: Path, state: Path) -> Context:
    cfg: dict[str, Any] = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": TASK,
        "num-server-rounds": 3,
        "evaluate-every": 2,  # the run evaluates after rounds 0, 2 and 3
        "local-epochs": 1,
        "batch-size": 32,
        "target-epsilon": 4.0,
        "site-epsilon-budget": 10.0,
    }
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=FederationConfig.from_run_config(cfg).to_run_config(),
    )


def _train(
    sites: Path, rnd: int, state: dict[str, torch.Tensor] | None, evaluate: int | None
) -> Message:
    msg = server_message(sites / "site-0", kind="train", rnd=rnd, task=TASK)
    if state is not None:
        msg.content[keys.REC_ARRAYS] = pack_record(state)
    if evaluate is not None:
        msg.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = evaluate
    return msg


def _model(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error.reason
    assert keys.REC_TRAIN_REFUSAL not in reply.content, reply.content[keys.REC_TRAIN_REFUSAL]
    return model_of(reply.content[keys.REC_ARRAYS])


def _evaluation_refusal(reply: Message) -> str:
    assert not reply.has_error(), reply.error.reason
    record = reply.content[keys.REC_EVAL_REFUSAL]
    assert record[keys.F_CODE] == keys.ERR_POLICY
    return str(record[keys.F_REASON])


def test_evaluations_asked_inside_train_messages_stay_within_the_sites_plan(
    sites: Path, tmp_path: Path
) -> None:
    ctx = _context(sites, tmp_path)
    ledger = PrivacyLedger(tmp_path / "site-0" / "ledger.sqlite")

    def charged() -> list[tuple[str, int]]:
        return [(c.kind, c.round) for s in ledger.summary() for c in s.charges]

    first = _model(handle_train(_train(sites, 1, None, None), ctx))
    # Round 1 is not a round the signed run evaluates after: refused, the training goes on.
    reply = handle_train(_train(sites, 2, first, 1), ctx)
    assert "outside its plan" in _evaluation_refusal(reply)
    second = _model(reply)
    assert charged() == [("train", 1), ("train", 2)]

    # The honest request: round 2's evaluation with round 3's model, charged once.
    asked = _train(sites, 3, second, 2)
    reply = handle_train(asked, ctx)
    third = _model(reply)
    released = dict(reply.content[keys.REC_EVAL_METRICS])
    assert reply.content[keys.REC_EVAL_SITE][keys.S_EVALUATED_ROUND] == 2
    assert charged() == [("train", 1), ("train", 2), ("evaluate", 2), ("train", 3)]

    # Asked again (a resumed centre): the stored releases, nothing charged.
    again = handle_train(_train(sites, 3, second, 2), ctx)
    assert dict(again.content[keys.REC_EVAL_METRICS]) == released
    assert all(torch.equal(_model(again)[k], v) for k, v in third.items())
    # Asked with other weights: both refused (each was released for another model), and the
    # refusals still leave in one reply; asked for another round: refused.
    crafted = {k: torch.zeros_like(v) for k, v in second.items()}
    reply = handle_train(_train(sites, 3, crafted, 2), ctx)
    assert "for another received model" in _evaluation_refusal(reply)
    refusal = reply.content[keys.REC_TRAIN_REFUSAL]
    assert refusal[keys.F_CODE] == keys.ERR_POLICY and keys.REC_ARRAYS not in reply.content
    reply = handle_train(_train(sites, 3, second, 0), ctx)
    assert "only the evaluation of the round before" in _evaluation_refusal(reply)
    # A separate evaluate message for the same round is the same once-per-round release.
    separate = server_message(sites / "site-0", kind="evaluate", rnd=2, task=TASK)
    separate.content[keys.REC_ARRAYS] = pack_record(second)
    reply = handle_evaluate(separate, ctx)
    assert not reply.has_error() and dict(reply.content[keys.REC_METRICS]) == released
    assert charged() == [("train", 1), ("train", 2), ("evaluate", 2), ("train", 3)]

    # The last round's evaluation (its own message) is the run's second and last.
    final = server_message(sites / "site-0", kind="evaluate", rnd=3, task=TASK)
    final.content[keys.REC_ARRAYS] = pack_record(third)
    assert not handle_evaluate(final, ctx).has_error()
    kinds = [kind for kind, _ in charged()]
    assert [r for k, r in charged() if k == "evaluate"] == [2, 3]

    # The site's own log proves every charge under the round it released, and the
    # independent recomputation of epsilon from that log flags nothing.
    state = tmp_path / "site-0"
    assert audited_charges(state) == ledger.count_charges() == 5
    logged = site_log_charges(read_entries(state / AUDIT_LOG_NAME))
    assert [(c.kind, c.round) for c in logged] == charged()
    assert [c.kind for c in logged] == kinds
    assert not any(row.flagged for row in audit_charges(logged))
