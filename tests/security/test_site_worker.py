"""A hospital executes only the fedcare it installed (issue 11).

fedcare's site worker is the only executor of a deployed SuperNode. These tests call its
``answer`` step directly with what the SuperNode hands it (message, context, the run's FAB):
a FAB that ships code, names another app or another version is refused -- its code is
never imported, the refusal is in the site's audit log -- and fedcare's own thin app is
answered by the installed ClientApp, from data kept warm until it changes. The same worker
against real processes is in tests/integration/test_deployment.py.
"""

from __future__ import annotations

import io
import stat
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Array, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import get_fab_metadata
from flwr.common.constant import SubStatus

from fedcare.client.audit import AUDIT_LOG_NAME
from fedcare.client.deploy import supernode_command, write_secret
from fedcare.client.site_config import load_site_config
from fedcare.client.worker import SiteWorker
from fedcare.common import keys
from fedcare.common.audit import check_log, read_entries
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.flower_app import write_app_dir
from fedcare.common.run_signing import (
    RUN_PUBLIC_KEY_NAME,
    RUN_SIGNATURE_KEY,
    sign_run,
    write_public_key,
)
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import server_message, task_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

CENTRE = Ed25519PrivateKey.generate()
MARKER_MODULE = "outsider_payload"


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    config = SynthConfig(patients_per_site=120, simulated=False)
    synthesize(tmp_path / "data", n_sites=1, seed=3, config=config)
    write_public_key(CENTRE, tmp_path / RUN_PUBLIC_KEY_NAME)
    site_config = {
        "site_id": "site-0",
        "data": str(tmp_path / "data" / "site-0"),
        "state_dir": str(tmp_path / "state"),
        "device": "cpu",
        "privacy": {"epsilon": 10.0},
        "superlink": {
            "address": "127.0.0.1:9092",
            "insecure": True,
            "run_signing_key": str(tmp_path / RUN_PUBLIC_KEY_NAME),
        },
    }
    (tmp_path / "site-config.toml").write_text(tomli_w.dumps(site_config), encoding="utf-8")
    return tmp_path


@pytest.fixture()
def worker(hospital: Path) -> Iterator[SiteWorker]:
    # Nothing listens on this port: answer() never talks to the SuperNode.
    w = SiteWorker(
        config_path=hospital / "site-config.toml", runtime_address="127.0.0.1:9", secret=b"s"
    )
    yield w
    w.close()


def _fedcare_fab(tmp_path: Path) -> bytes:
    app = write_app_dir(
        tmp_path / "fedcare-app",
        config_defaults=RUN_CONFIG_DEFAULTS,
        serverapp="fedcare.server.app:app",
        clientapp="fedcare.client.app:app",
    )
    return build_fab_from_disk(app)


def _foreign_fab(tmp_path: Path, marker: Path) -> bytes:
    """fedcare's thin app with the outsider's ClientApp module beside it: importing the
    module writes ``marker``."""
    app = tmp_path / "foreign-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        (_app_pyproject(tmp_path)).replace(
            'clientapp = "fedcare.client.app:app"', f'clientapp = "{MARKER_MODULE}:app"'
        )
    )
    (app / f"{MARKER_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    return build_fab_from_disk(app)


def _app_pyproject(tmp_path: Path) -> str:
    app = write_app_dir(
        tmp_path / "template",
        config_defaults=RUN_CONFIG_DEFAULTS,
        serverapp="fedcare.server.app:app",
        clientapp="fedcare.client.app:app",
    )
    return (app / "pyproject.toml").read_text()


def _with_extra_file(fab: bytes) -> bytes:
    """The same FAB with one more file in it (code riding along)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr(f"{MARKER_MODULE}.py", "raise SystemExit('imported')\n")
    return out.getvalue()


def _signed_config() -> dict[str, Any]:
    settings = {"run-id": "run-w", "task": "readmission", "local-epochs": 1, "target-epsilon": 4.0}
    config = FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, **settings}).to_run_config()
    config[RUN_SIGNATURE_KEY] = sign_run(config, CENTRE)
    return config


def _message(hospital: Path, kind: str = "train") -> tuple[Message, Context]:
    msg = server_message(hospital / "data" / "site-0", kind=kind, run_id="run-w")
    # The node config the SuperNode hands over is ignored: the worker uses its own.
    context = Context(
        run_id=3,
        node_id=100,
        node_config={keys.NC_SITE_CONFIG: "/elsewhere/site-config.toml"},
        state=RecordDict(),
        run_config=_signed_config(),
    )
    return msg, context


def _answer(
    worker: SiteWorker, hospital: Path, fab: bytes, kind: str = "train"
) -> tuple[Message, str, str]:
    msg, context = _message(hospital, kind)
    fab_id, fab_version = get_fab_metadata(fab)
    return worker.answer(msg, context, fab_content=fab, fab_id=fab_id, fab_version=fab_version)


def _refusals(hospital: Path) -> list[dict[str, Any]]:
    log = hospital / "state" / AUDIT_LOG_NAME
    assert check_log(log).ok
    return [e for e in read_entries(log) if e["kind"] == "refused"]


def _other_component(tmp_path: Path) -> bytes:
    """Only a pyproject.toml, but naming another installed module as the ClientApp."""
    app = tmp_path / "other-component"
    app.mkdir()
    text = _app_pyproject(tmp_path).replace(
        'clientapp = "fedcare.client.app:app"', f'clientapp = "{MARKER_MODULE}:app"'
    )
    (app / "pyproject.toml").write_text(text)
    return build_fab_from_disk(app)


@pytest.mark.parametrize("how", ["own-clientapp", "extra-file", "other-component"])
def test_an_app_that_ships_code_is_refused_and_never_imported(
    worker: SiteWorker, hospital: Path, tmp_path: Path, how: str
) -> None:
    marker = tmp_path / "marker"
    fab = {
        "own-clientapp": lambda: _foreign_fab(tmp_path, marker),
        "extra-file": lambda: _with_extra_file(_fedcare_fab(tmp_path)),
        "other-component": lambda: _other_component(tmp_path),
    }[how]()
    reply, status, details = _answer(worker, hospital, fab)
    assert reply.has_error() and reply.error.code == keys.ERR_POLICY
    assert reply.error.reason.startswith("site-0: ")
    assert status == SubStatus.FAILED and details == reply.error.reason
    assert not marker.exists() and MARKER_MODULE not in sys.modules
    assert not (hospital / "state" / "ledger.sqlite").exists(), "the ledger was opened"
    refused = _refusals(hospital)
    assert len(refused) == 1 and refused[0]["data"]["reason"] in reply.error.reason


def test_another_version_of_fedcare_is_refused(
    worker: SiteWorker, hospital: Path, tmp_path: Path
) -> None:
    text = _app_pyproject(tmp_path)
    _, version = get_fab_metadata(_fedcare_fab(tmp_path))
    app = tmp_path / "other-version"
    app.mkdir()
    (app / "pyproject.toml").write_text(text.replace(f'version = "{version}"', 'version = "0.0.1"'))
    reply, status, _ = _answer(worker, hospital, build_fab_from_disk(app))
    assert (
        reply.has_error() and reply.error.code == keys.ERR_POLICY and "0.0.1" in reply.error.reason
    )
    assert status == SubStatus.FAILED


def test_a_message_type_fedcare_does_not_answer_is_refused(
    worker: SiteWorker, hospital: Path, tmp_path: Path
) -> None:
    reply, status, _ = _answer(worker, hospital, _fedcare_fab(tmp_path), kind="query")
    assert reply.has_error() and "query" in reply.error.reason
    assert status == SubStatus.FAILED and len(_refusals(hospital)) == 1


def test_fedcare_app_is_answered_from_warm_data_until_the_data_changes(
    worker: SiteWorker, hospital: Path, tmp_path: Path
) -> None:
    fab = _fedcare_fab(tmp_path)
    for _ in range(2):
        reply, status, _ = _answer(worker, hospital, fab)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert status == SubStatus.COMPLETED
    assert worker.warm.loads == 1, "the second message loaded the site again"
    # The hospital edits a data file: the next message loads the site afresh.
    table = next((hospital / "data" / "site-0").glob("*.csv"))
    table.write_text(table.read_text())
    reply, _, _ = _answer(worker, hospital, fab)
    assert not reply.has_error()
    assert worker.warm.loads == 2


def test_the_superexec_secret_is_private_and_new_at_every_start(hospital: Path) -> None:
    site = load_site_config(hospital / "site-config.toml")
    first = write_secret(site).read_bytes()
    path = write_secret(site)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 64 and path.read_bytes() != first


def test_the_supernode_runs_no_executor_of_its_own(hospital: Path) -> None:
    site = load_site_config(hospital / "site-config.toml")
    cmd = supernode_command(site, config_path=hospital / "site-config.toml", insecure=True)
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(
        hospital / "state" / "superexec.secret"
    )
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("broken", ["no-config", "wrong-shape"])
def test_an_unforeseen_message_gets_a_reply_never_a_jam(
    worker: SiteWorker, hospital: Path, tmp_path: Path, broken: str
) -> None:
    """A SuperNode whose task ends without a reply waits for it forever: whatever goes
    wrong, the worker answers, and the reason quotes no exception text (it could hold data)."""
    msg, context = _message(hospital)
    if broken == "no-config":
        del msg.content[keys.REC_CONFIG]
    else:
        arrays = msg.content[keys.REC_ARRAYS]
        first = next(iter(arrays))
        arrays[first] = Array(np.zeros((3, 1, 7), dtype=np.float32))
    fab = _fedcare_fab(tmp_path)
    fab_id, fab_version = get_fab_metadata(fab)
    reply, status, _ = worker.answer(
        msg, context, fab_content=fab, fab_id=fab_id, fab_version=fab_version
    )
    assert reply.has_error() and reply.error.reason.startswith("site-0: ")
    assert status == SubStatus.FAILED or reply.error.code != keys.ERR_FAILED


def test_an_agent_app_task_is_refused(worker: SiteWorker, hospital: Path, tmp_path: Path) -> None:
    msg, context = _message(hospital)
    fab = _fedcare_fab(tmp_path)
    fab_id, fab_version = get_fab_metadata(fab)
    reply, status, _ = worker.answer(
        msg,
        context,
        fab_content=fab,
        fab_id=fab_id,
        fab_version=fab_version,
        task_type="flwr-agentapp",
    )
    assert reply.has_error() and "flwr-agentapp" in reply.error.reason
    assert status == SubStatus.FAILED
    assert not (hospital / "state" / "ledger.sqlite").exists()
