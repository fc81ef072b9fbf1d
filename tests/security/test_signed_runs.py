"""A deployed site trains only for runs its pinned centre key signed (issue 11, part).

An outsider who reaches the centre's port can submit fedcare's own app with any settings
(Flower 1.42's Control API is unauthenticated). The ClientApp of a deployed site checks the
run's signature against the key its site-config pins *before* it reads its data or opens
its ledger: an unsigned run, one signed by another key, or a signed run whose settings
were changed afterwards is refused and charges nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict

from fedcare.client.app import handle_train
from fedcare.client.audit import AUDIT_LOG_NAME
from fedcare.common import keys
from fedcare.common.audit import check_log, read_entries
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.run_signing import (
    RUN_PUBLIC_KEY_NAME,
    RUN_SIGNATURE_KEY,
    sign_run,
    write_public_key,
)
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import server_message, task_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

CENTRE = Ed25519PrivateKey.generate()


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deployed hospital: its data (no [simulation] table), its site-config pinning the
    centre's run-signing key."""
    root = tmp_path_factory.mktemp("hospital")
    config = SynthConfig(patients_per_site=120, simulated=False)
    synthesize(root / "data", n_sites=1, seed=3, config=config)
    write_public_key(CENTRE, root / RUN_PUBLIC_KEY_NAME)
    site_config = {
        "site_id": "site-0",
        "data": str(root / "data" / "site-0"),
        "state_dir": str(root / "state"),
        "device": "cpu",
        "privacy": {"epsilon": 10.0},
        "superlink": {
            "address": "127.0.0.1:9092",
            "insecure": True,
            "run_signing_key": str(root / RUN_PUBLIC_KEY_NAME),
        },
    }
    (root / "site-config.toml").write_text(tomli_w.dumps(site_config), encoding="utf-8")
    return root


def _run_config(signer: Ed25519PrivateKey | None, **changes: Any) -> dict[str, Any]:
    settings = {"run-id": "run-a", "task": "readmission", "local-epochs": 1, "target-epsilon": 4.0}
    resolved = FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, **settings})
    config = resolved.to_run_config()
    if signer is not None:
        config[RUN_SIGNATURE_KEY] = sign_run(config, signer)
    config.update(changes)  # after signing: what an attacker changes in transit
    return config


def _train(hospital: Path, run_config: dict[str, Any]) -> Message:
    msg = server_message(hospital / "data" / "site-0", run_id=str(run_config["run-id"]))
    context = Context(
        run_id=3,
        node_id=100,
        node_config={keys.NC_SITE_CONFIG: str(hospital / "site-config.toml")},
        state=RecordDict(),
        run_config=run_config,
    )
    return handle_train(msg, context)


@pytest.mark.parametrize(
    "signer,changes,why",
    [
        (None, {}, "not signed"),
        (Ed25519PrivateKey.generate(), {}, "does not match"),
        (CENTRE, {"target-epsilon": 10.0}, "does not match"),
    ],
    ids=["unsigned", "outsider-key", "changed-after-signing"],
)
def test_a_run_the_centre_did_not_sign_charges_nothing(
    hospital: Path, signer: Ed25519PrivateKey | None, changes: dict[str, Any], why: str
) -> None:
    log = hospital / "state" / AUDIT_LOG_NAME
    before = len(read_entries(log)) if log.exists() else 0
    reply = _train(hospital, _run_config(signer, **changes))
    assert reply.has_error() and reply.error.code == keys.ERR_POLICY
    assert reply.error.reason.startswith("site-0: ") and why in reply.error.reason
    assert not (hospital / "state" / "ledger.sqlite").exists(), "the ledger was opened"
    # The refusal is in the site's own signed audit log, with its reason.
    entries = read_entries(log)[before:]
    refused = [e for e in entries if e["kind"] == "refused"]
    assert len(refused) == 1 and why in refused[0]["data"]["reason"]
    assert check_log(log).ok


def test_a_run_the_centre_signed_trains(hospital: Path) -> None:
    reply = _train(hospital, _run_config(CENTRE))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert (hospital / "state" / "ledger.sqlite").exists()
