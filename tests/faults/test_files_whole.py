"""Files stay whole: a torn audit line, a full disk mid-append, a truncated checkpoint.

Before, a crash or a full disk in mid-append left a torn last line in a signed audit log;
``--resume`` then refused, and moving the log aside left a run whose ``audit verify`` failed
forever. Now the next append cuts the torn bytes and records the cut in a signed
``recovery`` entry, which ``verify`` accepts and reports as a notice; a failed append cuts
the file back to its last whole entry and says which file, why and what to do; and an
unreadable checkpoint is one line naming the file, never a traceback.

A full disk is injected: ``os.write`` writes part of a line and then raises ``ENOSPC``,
exactly as the kernel does when a file system fills up in mid-write.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict

import fedcare.common.audit as audit_module
from fedcare.client.app import handle_train
from fedcare.client.audit import AUDIT_LOG_NAME, SiteAudit, audited_charges
from fedcare.client.ledger import PrivacyLedger
from fedcare.common import keys
from fedcare.common.audit import RECOVERY, AuditLog, AuditLogError, check_log, read_entries
from fedcare.common.errors import ConfigError, FedcareError
from fedcare.common.federation import FederationConfig
from fedcare.server.audit import ServerAudit, server_log_path
from fedcare.server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedcare.simulations.audit.verify import verify_paths
from fedcare.simulations.runner import recorded_run_id
from fedcare.simulations.synth import SynthConfig, synthesize
from tests._flower import server_message, task_identity

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

CFG = FederationConfig.from_run_config({"task": "readmission", "num-server-rounds": 3})


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _server_run(run_dir: Path) -> ServerAudit:
    """A server log as a run leaves it after round 1."""
    audit = ServerAudit.open(run_dir, CFG, run_id="run-a")
    audit.run_start(CFG, model="mlp", model_sha256="a" * 64)
    audit.round_start(1, model_sha256="a" * 64)
    audit.aggregate(1, model_sha256="b" * 64, updates=3)
    return audit


def _torn(entry: bytes, keep: float = 0.5) -> bytes:
    """What an interrupted write of ``entry`` leaves: a prefix, no line end."""
    return entry[: int(len(entry) * keep)]


class DiskFull:
    """Stands in for ``os.write`` on one file: once armed, writes ``room`` bytes of what it
    is given, then raises ``ENOSPC`` (the kernel's short write, then the error)."""

    def __init__(self, path: Path, real: Callable[[int, bytes], int]) -> None:
        self.path = path.resolve()
        self.real = real
        self.room: int | None = None  # None: not armed
        self.refused = 0

    def __call__(self, fd: int, data: bytes) -> int:
        if self.room is None or Path(os.readlink(f"/proc/self/fd/{fd}")) != self.path:
            return self.real(fd, data)
        if self.room > 0:
            n = self.real(fd, bytes(data[: self.room]))
            self.room -= n
            return n
        self.refused += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], DiskFull]]:
    made: list[DiskFull] = []

    def make(path: Path) -> DiskFull:
        fake = DiskFull(path, os.write)
        monkeypatch.setattr(audit_module.os, "write", fake)
        made.append(fake)
        return fake

    yield make


# ------------------------------------------------------------------ a torn last line


def test_a_torn_last_line_is_cut_recorded_and_the_resumed_log_verifies(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    audit = _server_run(run_dir)
    log = server_log_path(run_dir)
    whole = log.read_bytes()
    torn = _torn(b'{"data":{"model_sha256":"' + b"c" * 64 + b'","round":2}')
    log.write_bytes(whole + torn)  # the crash came in mid-write of round 2's entry
    before = check_log(log)
    assert not before.ok and before.first_bad_line == 5 and "no line end" in str(before.problem)

    # --resume: the server opens its log again and appends run-resume.
    resumed = ServerAudit.open(run_dir, CFG, run_id="run-a")
    assert resumed.head == audit.head  # the last whole entry
    resumed.run_resume(CFG, model="mlp", model_sha256="b" * 64, after_round=1)
    resumed.run_end(rounds_completed=1, model_sha256="b" * 64)

    lines = _lines(log)
    assert log.read_bytes().startswith(whole)  # nothing whole was touched
    recovery = json.loads(lines[4])
    assert recovery["kind"] == RECOVERY and recovery["seq"] == 5
    assert recovery["data"] == {
        "offset": len(whole),
        "length": len(torn),
        "sha256": hashlib.sha256(torn).hexdigest(),
    }
    assert [json.loads(line)["kind"] for line in lines[5:]] == ["run-resume", "run-end"]
    result = check_log(log)
    assert result.ok, result.problem
    assert (
        len(result.notices) == 1
        and f"{len(torn)} bytes at byte {len(whole)}" in (result.notices[0])
    )
    verified = verify_paths([log])
    assert verified.ok and verified.logs[0].notices == list(result.notices)


def test_verify_prints_the_recovery_as_a_notice_and_exits_0(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    log.write_bytes(log.read_bytes() + b'{"data":{"ro')
    ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "audit", "verify", str(log)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "notice: line 5: the writer found its last line incomplete" in done.stdout
    assert "verified: OK" in done.stdout


def test_a_log_whose_only_line_was_torn_starts_again_and_records_the_cut(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"data":{"format":"fedcare-au')  # the very first write was cut
    AuditLog(path, writer="site-0", key=key).append("train", {"round": 1})
    kinds = [json.loads(line)["kind"] for line in _lines(path)]
    assert kinds == ["log-open", RECOVERY, "train"]
    assert json.loads(_lines(path)[1])["data"]["offset"] == 0
    assert check_log(path).ok


def test_a_torn_site_log_still_proves_its_charges_and_recovers_on_the_next_round(
    tmp_path: Path,
) -> None:
    """The ClientApp counts the charges the site's own log proves before it opens the
    ledger: a torn tail must not make every later round fail."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / AUDIT_LOG_NAME
    log = AuditLog(path, writer="site-0", key=key)
    log.append("train", {"round": 1, "mechanism": {"steps": 4}, "replayed": False})
    log.append("train", {"round": 2, "mechanism": {"steps": 4}, "replayed": False})
    path.write_bytes(path.read_bytes() + b'{"data":{"mechanism":{"st')
    assert audited_charges(tmp_path) == 2
    assert len(read_entries(path)) == 3
    log.append("train", {"round": 3, "mechanism": {"steps": 4}, "replayed": False})
    assert audited_charges(tmp_path) == 3 and check_log(path).ok


def test_a_line_torn_in_the_middle_is_tampering_never_recovered(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    lines = _lines(log)
    lines[2] = _torn(lines[2])  # a line cut short, with whole lines after it
    log.write_bytes(b"\n".join(lines) + b"\n")
    result = check_log(log)
    assert not result.ok and result.first_bad_line == 3 and result.notices == ()
    # Only the bytes after the last line end are ever cut: a later append (the writer
    # checks the log's first and last entries) leaves line 3 as it is, and verify fails.
    log.write_bytes(log.read_bytes() + b'{"da')
    ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    assert _lines(log)[2] == lines[2]
    result = check_log(log)
    assert not result.ok and result.first_bad_line == 3
    assert not verify_paths([log]).ok


def test_a_damaged_last_whole_line_is_refused_before_any_cut(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    lines = _lines(log)
    lines[-1] = lines[-1].replace(b'"updates":3', b'"updates":4')
    content = b"\n".join(lines) + b"\n" + b'{"da'  # and a torn line after it
    log.write_bytes(content)
    with pytest.raises(AuditLogError, match="broken at line 4") as info:
        ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    assert "\n" not in str(info.value)
    assert log.read_bytes() == content


def test_a_recovery_entry_moved_away_from_its_cut_does_not_verify(tmp_path: Path) -> None:
    """A recovery entry records where the cut was made, which is where it stands: one that
    names another place was not written by a recovering writer at that point."""
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, writer="site-0", key=key)
    log.append("train", {"round": 1})
    path.write_bytes(path.read_bytes() + b'{"da')
    log.append("train", {"round": 2})
    lines = _lines(path)
    entry = json.loads(lines[2])
    entry["data"]["offset"] += 1
    body = {k: v for k, v in entry.items() if k != "sig"}
    entry["sig"] = audit_module._b64(key.sign(audit_module.canonical_json(body)))
    lines[2] = audit_module.canonical_json(entry)
    path.write_bytes(b"\n".join(lines[:3]) + b"\n")
    result = check_log(path)
    assert not result.ok and result.first_bad_line == 3
    assert "does not record a cut at its own place" in str(result.problem)


def test_callers_cannot_write_recovery_entries(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", writer="s", key=Ed25519PrivateKey.generate())
    with pytest.raises(AuditLogError, match="invalid audit entry kind"):
        log.append(RECOVERY, {"offset": 0, "length": 1, "sha256": "0" * 64})


# ------------------------------------------------------------------ a full disk


def test_a_full_disk_mid_append_leaves_no_torn_line_and_says_what_to_do(
    tmp_path: Path, disk_full: Callable[[Path], DiskFull]
) -> None:
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    content = log.read_bytes()
    fake = disk_full(log)
    fake.room = 57  # part of the next line fits, then the disk is full
    audit = ServerAudit.open(run_dir, CFG, run_id="run-a")
    with pytest.raises(AuditLogError) as info:
        audit.round_start(2, model_sha256="b" * 64)
    message = str(info.value)
    assert isinstance(info.value, FedcareError) and "\n" not in message
    assert str(log) in message and "the disk is full" in message
    assert "free disk space" in message and "last whole entry" in message
    assert fake.refused == 1
    assert log.read_bytes() == content  # cut back: no torn line
    assert check_log(log).ok

    fake.room = None  # space was freed: the run resumes and its log verifies
    ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    result = check_log(log)
    assert result.ok and result.notices == () and result.lines == 5


def test_a_failed_fsync_cuts_the_line_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    content = log.read_bytes()
    real = os.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        if not failed and Path(os.readlink(f"/proc/self/fd/{fd}")) == log.resolve():
            failed.append(fd)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(audit_module.os, "fsync", fsync)
    with pytest.raises(AuditLogError, match="an I/O error"):
        ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    assert log.read_bytes() == content


def test_when_even_the_cut_back_fails_the_next_append_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disk_full: Callable[[Path], DiskFull]
) -> None:
    """The worst case (the process dies in mid-write, or cannot truncate): a torn line is
    left, and the error says so; the next append cuts it and records the cut."""
    run_dir = tmp_path / "run"
    _server_run(run_dir)
    log = server_log_path(run_dir)
    content = log.read_bytes()
    fake = disk_full(log)
    fake.room = 40

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as m:
        m.setattr(audit_module.os, "ftruncate", no_truncate)
        with pytest.raises(AuditLogError, match="may end with a torn line"):
            ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    assert len(log.read_bytes()) == len(content) + 40
    fake.room = None
    ServerAudit.open(run_dir, CFG, run_id="run-a").round_start(2, model_sha256="b" * 64)
    result = check_log(log)
    assert result.ok and len(result.notices) == 1
    assert [json.loads(line)["kind"] for line in _lines(log)[4:]] == [RECOVERY, "round-start"]


# ------------------------------------------------------------------ a full disk at a site


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sites")
    synthesize(root, n_sites=1, seed=5, config=SynthConfig(patients_per_site=120))
    return root


@pytest.fixture
def _identity() -> Iterator[None]:
    with task_identity(run_id=3):
        yield


def _train_message(sites: Path) -> Message:
    return server_message(sites / "site-0")


def _site_context(sites: Path, state: Path) -> Context:
    config = {
        "data-root": str(sites),
        "state-root": str(state),
        "task": "readmission",
        "num-server-rounds": 2,
        "local-epochs": 1,
    }
    return Context(
        run_id=3,
        node_id=100,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=FederationConfig.from_run_config(config).to_run_config(),
    )


@pytest.mark.usefixtures("_identity")
def test_a_site_whose_disk_fills_reports_it_keeps_the_charge_and_never_charges_twice(
    sites: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    log = state / "site-0" / AUDIT_LOG_NAME
    fake = DiskFull(log, os.write)
    monkeypatch.setattr(audit_module.os, "write", fake)

    def fill_the_disk_once_trained(self: SiteAudit, *args: object, **kwargs: object) -> object:
        fake.room = 100  # the charge and the stored release made it; the log entry does not
        return real_train(self, *args, **kwargs)

    real_train = SiteAudit.train
    monkeypatch.setattr(SiteAudit, "train", fill_the_disk_once_trained)
    reply = handle_train(_train_message(sites), _site_context(sites, state))
    assert reply.has_error(), "an update whose audit entry failed must be withheld"
    reason = reply.error.reason
    assert reason.startswith("site-0: ") and str(log) in reason and "the disk is full" in reason
    assert fake.refused >= 1
    ledger = PrivacyLedger(state / "site-0" / "ledger.sqlite")
    assert ledger.count_charges() == 1  # written before training, and kept
    content_before = log.read_bytes()
    assert content_before.endswith(b"\n") and check_log(log).ok  # no torn line

    fake.room = None  # space freed; the server asks for round 1 again
    monkeypatch.setattr(SiteAudit, "train", real_train)
    again = handle_train(_train_message(sites), _site_context(sites, state))
    assert not again.has_error(), again.error.reason if again.has_error() else ""
    assert again.content[keys.REC_SITE][keys.S_REPLAYED] is True  # the stored release
    assert ledger.count_charges() == 1  # never charged twice
    assert check_log(log).ok


# ------------------------------------------------------------------ checkpoints


def _truncated_checkpoint(run_dir: Path) -> Path:
    arrays = {"w": np.zeros((64, 64), dtype=np.float32)}
    path = save_checkpoint(run_dir, Checkpoint(run_id="run-a", round=1, arrays=arrays))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])  # e.g. copied onto a full disk
    return path


def test_a_truncated_checkpoint_is_one_line_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    path = _truncated_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "truncated or damaged" in message and "Fix:" in message
    assert "Errno" not in message.split("torch:")[0]
    with pytest.raises(ConfigError) as resume:
        recorded_run_id(tmp_path)
    assert "\n" not in str(resume.value) and str(path) in str(resume.value)
    assert "without --resume" in str(resume.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04", b"not a checkpoint at all\n"])
def test_an_empty_or_foreign_checkpoint_is_a_checkpoint_error(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    with pytest.raises(CheckpointError, match=CHECKPOINT_NAME):
        load_checkpoint(tmp_path)


def test_simulate_resume_on_a_truncated_checkpoint_exits_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = _truncated_checkpoint(out)
    (out / "config.toml").write_text(tomli_w.dumps({"federation": {"run-id": "run-a"}}))
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "simulate", "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and str(path) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_truncated_stored_release_is_refused_naming_the_file(
    sites: Path, tmp_path: Path, _identity: None
) -> None:
    state = tmp_path / "state"
    first = handle_train(_train_message(sites), _site_context(sites, state))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    (release,) = (state / "site-0" / "releases").glob("*.pt")
    content = release.read_bytes()
    release.write_bytes(content[: len(content) // 2])
    again = handle_train(_train_message(sites), _site_context(sites, state))
    assert again.has_error()
    reason = again.error.reason
    assert reason.startswith("site-0: ") and str(release) in reason
    assert "unreadable" in reason and "Traceback" not in reason
    assert PrivacyLedger(state / "site-0" / "ledger.sqlite").count_charges() == 1
