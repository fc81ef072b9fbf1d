"""A curious or malicious centre against the sites' personal models (client/personal/).

The adversary (docs/threat-model.md, "Personal models") may choose the run's
personalization settings, send any number of evaluation requests, and read every reply. It
must neither make a site spend more than the run's signed target ε through personalization,
nor read a personal model: a personal model leaves the site only as its evaluation metrics,
a charged DP release.

* every reply is searched for the personal weights the site keeps (FedPer's head, Ditto's
  model, the fine-tuned model): none appears;
* the final evaluation asked twice, or asked again with other weights, gets the stored
  release or a refusal, never a second fine-tune or a second charge; the site's audit log
  proves every charge the ledger holds, and the independent recomputation of ε from that log
  (simulations/audit/epsilon.py) includes the fine-tune and flags nothing;
* switching personalization on after the noise was calibrated without it hits the run's
  ceiling; changing a signed personalization setting voids the run's signature.

The sites are real (no ``[simulation]`` table): DP training and DP evaluation releases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import handle_evaluate, handle_train
from fedcare.client.audit import AUDIT_LOG_NAME, audited_charges
from fedcare.client.data.site import SiteData
from fedcare.client.dpsgd import DPConfig
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RUN_CEILING_TOLERANCE, RoundRequest, SiteTrainer
from fedcare.client.personal import HEAD_PREFIX, PersonalSettings
from fedcare.client.policy import SitePolicy
from fedcare.client.training import TrainConfig
from fedcare.common import keys
from fedcare.common.audit import public_key_raw, read_entries
from fedcare.common.errors import PolicyViolation, PrivacyBudgetExceeded
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record
from fedcare.common.run_signing import RUN_SIGNATURE_KEY, sign_run, verify_run
from fedcare.simulations.audit.epsilon import audit_charges, site_log_charges
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import model_of, server_message, task_identity
from tests.security.conftest import TASK

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

ROUNDS = 2


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("personal-sites")
    config = SynthConfig(patients_per_site=200, size_skew=0.0, n_genes=12, simulated=False)
    synthesize(root, n_sites=1, seed=5, config=config)
    return root


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _context(sites: Path, state: Path, **run_config: Any) -> Context:
    cfg = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": TASK,
        "num-server-rounds": ROUNDS,
        "local-epochs": 1,
        "batch-size": 32,
        "target-epsilon": 4.0,
        "site-epsilon-budget": 10.0,
        **run_config,
    }
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=FederationConfig.from_run_config(cfg).to_run_config(),
    )


def _message(sites: Path, kind: str, rnd: int, state: dict[str, torch.Tensor] | None) -> Message:
    msg = server_message(sites / "site-0", kind=kind, rnd=rnd, task=TASK)
    if state is not None:
        msg.content[keys.REC_ARRAYS] = pack_record(state)
    return msg


def _arrays(reply: Message) -> dict[str, torch.Tensor]:
    assert not reply.has_error(), reply.error.reason
    return model_of(reply.content[keys.REC_ARRAYS])


def _run(sites: Path, ctx: Context) -> tuple[list[Message], list[dict[str, torch.Tensor]]]:
    """Train every round and evaluate after the last; returns the replies and the global
    models the centre sent for training."""
    replies: list[Message] = []
    sent: list[dict[str, torch.Tensor]] = []
    state = None
    for rnd in range(1, ROUNDS + 1):
        msg = _message(sites, "train", rnd, state)
        sent.append(model_of(msg.content[keys.REC_ARRAYS]))
        replies.append(handle_train(msg, ctx))
        state = _arrays(replies[-1])
    replies.append(handle_evaluate(_message(sites, "evaluate", ROUNDS, state), ctx))
    assert not replies[-1].has_error(), replies[-1].error.reason
    return replies, sent


def _kept(state: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted((state / "site-0" / "personal").glob("*.pt"))
    return [dict(torch.load(f, weights_only=True)["state"]) for f in files]


@pytest.mark.parametrize("strategy", ["fedper", "ditto", "finetune"])
def test_no_reply_carries_a_personal_model(strategy: str, sites: Path, tmp_path: Path) -> None:
    replies, sent = _run(sites, _context(sites, tmp_path, personalization=strategy))
    (kept,) = _kept(tmp_path)
    secret = [t for t in kept.values() if t.is_floating_point() and t.numel() > 1]
    assert secret
    for reply in replies:
        content = reply.content
        assert set(content.keys()) <= {keys.REC_ARRAYS, keys.REC_METRICS, keys.REC_SITE}
        assert all(keys.is_allowed_metric(k) for k in content[keys.REC_METRICS])
        if keys.REC_ARRAYS not in content:
            continue
        for array in model_of(content[keys.REC_ARRAYS]).values():
            assert not any(a.shape == array.shape and torch.equal(a, array) for a in secret)
    assert keys.REC_ARRAYS not in replies[-1].content
    # The personal model left only as metrics: a second Gaussian release under the one
    # evaluation charge (its small noisy splits may be withheld whole, like any release).
    ledger = PrivacyLedger(tmp_path / "site-0" / "ledger.sqlite", create=False)
    (evaluation,) = [c for s in ledger.summary() for c in s.charges if c.kind == "evaluate"]
    assert evaluation.mechanism.steps == 2
    if strategy == "fedper":  # the head that leaves is the head that came in
        for reply, received in zip(replies[:ROUNDS], sent, strict=True):
            out = _arrays(reply)
            assert all(torch.equal(out[k], received[k]) for k in out if k.startswith(HEAD_PREFIX))


def test_the_final_evaluation_asked_again_costs_nothing_and_is_audited(
    sites: Path, tmp_path: Path
) -> None:
    ctx = _context(sites, tmp_path, personalization="finetune", **{"personal-epochs": 2})
    replies, _ = _run(sites, ctx)
    ledger = PrivacyLedger(tmp_path / "site-0" / "ledger.sqlite", create=False)
    kinds = [c.kind for s in ledger.summary() for c in s.charges]
    assert kinds == ["train", "train", "personalize", "evaluate"]

    # The same request again (a resumed centre): the stored release, no new charge.
    last_model = _arrays(replies[ROUNDS - 1])
    again = handle_evaluate(_message(sites, "evaluate", ROUNDS, last_model), ctx)
    assert not again.has_error()
    assert dict(again.content[keys.REC_METRICS]) == dict(replies[-1].content[keys.REC_METRICS])
    # Other weights for the same final round: refused, nothing fine-tuned or charged.
    crafted = {k: torch.zeros_like(v) for k, v in last_model.items()}
    refused = handle_evaluate(_message(sites, "evaluate", ROUNDS, crafted), ctx)
    assert refused.has_error() and refused.error.code == keys.ERR_POLICY
    assert ledger.count_charges() == 4 and ledger.count_charges("personalize") == 1

    # The site's own log proves every charge, and the independent accountant agrees.
    state = tmp_path / "site-0"
    assert audited_charges(state) == ledger.count_charges()
    charges = site_log_charges(read_entries(state / AUDIT_LOG_NAME))
    assert [c.kind for c in charges] == kinds
    rows = audit_charges(charges)
    assert [r.kind for r in rows] == ["train", "train", "personalize"]
    assert not any(r.flagged for r in rows)
    site = replies[-1].content[keys.REC_SITE]
    assert site[keys.S_RUN_EPSILON] <= 4.0 + RUN_CEILING_TOLERANCE


def test_personalization_switched_on_after_calibration_hits_the_runs_ceiling(
    sites: Path, tmp_path: Path
) -> None:
    """A centre that let the site calibrate its noise for plain training, then asks for
    Ditto's second copy (twice the steps): the charge would pass the run's target, so it is
    refused before anything trains."""
    from fedcare.client.data.loaders import load_site

    site: SiteData = load_site(sites / "site-0")
    trainer = SiteTrainer(
        site=site,
        policy=SitePolicy(accountant="rdp"),
        ledger=PrivacyLedger(tmp_path / "ledger.sqlite"),
    )

    def request(rnd: int, strategy: str) -> RoundRequest:
        return RoundRequest(
            run_id="run-switch",
            round=rnd,
            rounds_planned=2,
            task=TASK,
            train=TrainConfig(epochs=1, batch_size=32, lr=1e-2, device="cpu"),
            dp=DPConfig(target_epsilon=2.0, accountant="rdp"),
            personal=PersonalSettings(strategy=strategy),
        )

    start = {k: v.clone() for k, v in trainer.build_model(TASK).state_dict().items()}
    trainer.train_round(request(1, "none"), start)
    assert trainer.ledger is not None
    spent = trainer.ledger.count_charges()
    with pytest.raises(PrivacyBudgetExceeded, match="this run may reach"):
        trainer.train_round(request(2, "ditto"), start)
    assert trainer.ledger.count_charges() == spent


def test_the_personalization_settings_are_part_of_the_signed_run() -> None:
    key = Ed25519PrivateKey.generate()
    config = FederationConfig(personalization="finetune", personal_epochs=1).to_run_config()
    signed = {**config, RUN_SIGNATURE_KEY: sign_run(config, key)}
    verify_run(signed, public_key_raw(key), site_id="st-mary")
    for change in (
        {"personal-epochs": 5},
        {"personalization": "ditto"},
        {"ditto-lambda": 1e-9},
    ):
        with pytest.raises(PolicyViolation, match="signature"):
            verify_run({**signed, **change}, public_key_raw(key), site_id="st-mary")


def test_a_fine_tune_s_charge_is_audited_even_when_the_evaluation_after_it_fails(
    sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fine-tune is its own charge: the site logs it before the evaluation runs, so a
    refused or failed evaluation cannot leave a completed charge the audit log does not prove
    (which would blind the site's ledger-rollback check to it)."""
    from fedcare.client.local import SiteTrainer
    from fedcare.common.errors import RoundFailed

    ctx = _context(sites, tmp_path, personalization="finetune")
    state = None
    for rnd in range(1, ROUNDS + 1):
        state = _arrays(handle_train(_message(sites, "train", rnd, state), ctx))

    def broken(self: SiteTrainer, *args: Any, **kwargs: Any) -> Any:
        raise RoundFailed("the evaluation failed after the fine-tune")

    monkeypatch.setattr(SiteTrainer, "evaluate_round", broken)
    reply = handle_evaluate(_message(sites, "evaluate", ROUNDS, state), ctx)
    assert reply.has_error()
    ledger = PrivacyLedger(tmp_path / "site-0" / "ledger.sqlite", create=False)
    assert ledger.count_charges("personalize") == 1
    assert audited_charges(tmp_path / "site-0") == ledger.count_charges()
