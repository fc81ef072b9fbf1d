"""Per-group metrics (``[[tasks]] groups``) against a curious or malicious centre.

* planted values: a patient with a unique age and the only missing ``sex`` is planted in a
  site's files; every reply that carries an evaluation (an evaluate reply, and a train reply
  that carries the previous round's evaluation) is searched for the patient's id, age and
  predicted probability, and for any number that would single them out (a group of one);
* the per-group releases are charged: one more Gaussian step per attribute, planned into the
  run's noise from its first round, so a run with groups still lands within its target ε,
  checked against an independent accountant;
* the groups are the site's: a centre that sends another group list (another schema) is
  refused before anything is computed or charged.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from fedcare.client.accounting import Mechanism
from fedcare.client.app import handle_evaluate, handle_train
from fedcare.client.data.loaders import load_site
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig, predict
from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.spec import GroupAttribute
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import model_of, server_message, task_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

TASK = "readmission"
PLANTED_AGE = 87.123456
_OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two synthetic hospitals with groups (sex, age band); in site-0 a planted test
    patient: a unique age and the site's only missing sex."""
    root = tmp_path_factory.mktemp("fair-sites")
    config = SynthConfig(
        patients_per_site=200, size_skew=0.0, n_genes=12, image_size=16,
        table_format="csv", image_format="npy", groups=True,
    )  # fmt: skip
    synthesize(root, n_sites=2, seed=9, config=config)
    site = load_site(root / "site-0")
    trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
    planted = trainer.task_data(TASK).patient_ids.test[0]
    ehr = pd.read_csv(root / "site-0" / "ehr.csv", dtype={"patient_id": str})
    ehr.loc[ehr["patient_id"] == planted, "age"] = PLANTED_AGE
    ehr.loc[ehr["patient_id"] == planted, "sex"] = np.nan
    ehr.to_csv(root / "site-0" / "ehr.csv", index=False, lineterminator="\n")
    return root, planted


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=5):
        yield


def _context(root: Path, state: Path, **run_config: object) -> Context:
    cfg = {
        "data-root": str(root),
        "state-root": str(state),
        "task": TASK,
        "num-server-rounds": 2,
        "local-epochs": 1,
        **run_config,
    }
    rc = FederationConfig.from_run_config(cfg).to_run_config()
    return Context(
        run_id=5,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=rc,
    )


def _numbers(reply: Message) -> dict[str, float]:
    """Every metric of every metric record of a reply (``<record>/<name>``)."""
    return {
        f"{record}/{name}": float(value)
        for record, metrics in reply.content.metric_records.items()
        for name, value in metrics.items()
    }


def test_no_reply_carrying_per_group_metrics_singles_out_a_patient(
    sites: tuple[Path, str], tmp_path: Path
) -> None:
    root, planted = sites
    evaluate = server_message(root / "site-0", kind="evaluate", rnd=1, task=TASK)
    folded = server_message(root / "site-0", kind="train", rnd=2, task=TASK)
    folded.content[keys.REC_CONFIG][keys.CFG_EVALUATE_ROUND] = 1
    replies = [
        handle_evaluate(evaluate, _context(root, tmp_path / "a")),
        handle_train(folded, _context(root, tmp_path / "b")),
    ]
    # The planted patient's own numbers: id, age, and the probability the sent model gives.
    site = load_site(root / "site-0")
    trainer = SiteTrainer(site=site, policy=SitePolicy(require_dp=False), ledger=None)
    data = trainer.task_data(TASK)
    net = trainer.build_model(TASK)
    net.load_state_dict(model_of(evaluate.content[keys.REC_ARRAYS]))
    _, p = predict(net, data.test, device=torch.device("cpu"))
    row = list(data.patient_ids.test).index(planted)
    planted_p = float(p[row])
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        numbers = _numbers(reply)
        groups = {k: v for k, v in numbers.items() if ".group." in k or ".gap." in k}
        assert groups, "the evaluation reports per-group metrics"
        assert all(keys.is_allowed_metric(k.split("/", 1)[1]) for k in numbers)
        text = repr(reply.content)
        assert planted not in text and str(PLANTED_AGE) not in text
        for name, value in numbers.items():
            assert abs(value - PLANTED_AGE) > 1e-9, name
            assert abs(value - planted_p) > 1e-12 or name.endswith((".n", ".threshold")), name
        # The planted patient is the only "unknown" sex: a group of one is never released,
        # and what subtraction from the split recovers holds 0 or at least k = 10 patients.
        unknown = [k for k in groups if ".group.sex.2." in k]
        assert unknown == []
        for split in ("val", "test"):
            total = next((v for k, v in numbers.items() if k.endswith(f"/{split}.n")), None)
            released = [
                v for k, v in groups.items() if f"/{split}.group.sex." in k and k.endswith(".n")
            ]
            if total is not None and released:
                rest = total - sum(released)
                assert rest == 0 or rest >= 10, (split, total, released)


def _request(**changes: object) -> RoundRequest:
    base: dict[str, object] = {
        "run_id": "run-g",
        "round": 1,
        "rounds_planned": 1,
        "task": TASK,
        "train": TrainConfig(epochs=1, batch_size=32, lr=0.05, optimizer="sgd", device="cpu"),
        "dp": DPConfig(target_epsilon=3.0, accountant="rdp"),
        "evaluation_rounds": (0, 1),
        "received_sha256": "model-0",
        "config_sha256": "config-0",
    }
    base.update(changes)
    return RoundRequest(**base)  # type: ignore[arg-type]


def test_group_releases_are_charged_and_planned_into_the_runs_target(
    sites: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = sites
    synthetic = load_site(root / "site-1")
    real = dataclasses.replace(
        synthetic, spec=synthetic.spec.model_copy(update={"simulation": None})
    )
    policy = SitePolicy(accountant="rdp", epsilon_budget=10.0, max_run_epsilon=10.0)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    trainer = SiteTrainer(site=real, policy=policy, ledger=ledger)
    start = trainer.build_model(TASK).state_dict()
    first = trainer.evaluate_round(_request(round=0), start)
    trained = trainer.train_round(_request(), start)  # calibrated for what remains, groups too
    final = trainer.evaluate_round(_request(round=1), trained.state)
    sigma = policy.evaluation_noise_multiplier
    # One Gaussian release of the splits and one per group attribute (sex, age band).
    assert first.mechanism == final.mechanism == Mechanism(sigma, 1.0, 3)
    # (Charged whether or not the noisy counts let a group through: the withholding is
    # decided on the noisy release.)
    history = [first.mechanism, trained.mechanism, final.mechanism]
    # ε of the three mechanisms, recomputed with dp_accounting's RDP accountant (Opacus's
    # orders), not with fedcare's.
    reference = dp_accounting.rdp.RdpAccountant(_OPACUS_ORDERS)
    for m in history:
        assert m is not None
        event = dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
        )
        reference.compose(dp_accounting.SelfComposedDpEvent(event, m.steps))
    assert final.epsilon == pytest.approx(reference.get_epsilon(policy.delta), rel=1e-3)
    # The calibration planned both evaluations' three steps: the run lands on its target.
    assert final.run_epsilon is not None and final.run_epsilon <= 3.0 + 0.02


def test_a_centre_cannot_choose_which_groups_a_site_reports(
    sites: tuple[Path, str], tmp_path: Path
) -> None:
    root, _ = sites
    spec = load_site(root / "site-0").spec
    schema = spec.feature_schema
    theirs = schema.model_copy(
        update={"groups": (*schema.groups, GroupAttribute(name="smoking", column="smoking"))}
    )
    msg = server_message(root / "site-0", kind="evaluate", rnd=1, task=TASK)
    msg.content[keys.REC_CONFIG][keys.CFG_SCHEMA_FINGERPRINT] = theirs.fingerprint()
    msg.content[keys.REC_CONFIG][keys.CFG_SCHEMA] = theirs.model_dump_json()
    state = tmp_path / "state"
    reply = handle_evaluate(msg, _context(root, state))
    assert reply.has_error() and reply.error.code == keys.ERR_CONFIG
    assert "group 'smoking' only in" in reply.error.reason
    ledgers = list(state.rglob("ledger.sqlite"))
    assert all(not PrivacyLedger(p).summary() for p in ledgers)
    shutil.rmtree(state, ignore_errors=True)
