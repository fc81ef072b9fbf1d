"""State files are private to their owner, whatever the process umask.

Under a login shell's umask 022 (and under 000, the widest), every folder fedcare keeps state
in is 0700 and every audit log, signing key, private key, checkpoint, stored release and
SuperLink database is 0600; public certificates (``ca.crt``, ``*.pub``) stay 0644. Each
component is driven through its real code (AuditLog, SiteAudit, ServerAudit, the checkpoint
writer, the certificate code, the SuperLink's database preparation); the systemd units set
``UMask=0077``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedcare.client.audit import AUDIT_KEY_NAME, AUDIT_LOG_NAME, SiteAudit
from fedcare.common.audit import AuditLog, AuditLogError, load_or_create_signing_key
from fedcare.common.certs import generate_node_keypair, init_certificates
from fedcare.common.federation import FederationConfig
from fedcare.common.files import (
    atomic_private,
    open_private,
    private_dir,
    write_private_atomic,
)
from fedcare.server.audit import SERVER_KEY, SERVER_LOG, ServerAudit
from fedcare.server.checkpoint import CHECKPOINT_NAME, Checkpoint, load_checkpoint, save_checkpoint
from fedcare.server.deploy import prepare_database

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _shared_dir(path: Path) -> Path:
    """A folder as an earlier fedcare (or ``mkdir``) left it: readable by everyone."""
    path.mkdir(parents=True)
    path.chmod(0o755)
    return path


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ fedcare.common.files


def test_private_dir_creates_0700_and_parents_as_mkdir_p(tmp_path: Path, umask: int) -> None:
    folder = private_dir(tmp_path / "root" / "site-0")
    assert folder == tmp_path / "root" / "site-0"
    assert _mode(folder) == 0o700
    assert _mode(folder.parent) == 0o777 & ~umask  # a parent may be shared: the umask decides


def test_private_dir_is_0700_even_where_the_umask_takes_owner_bits(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        folder = private_dir(tmp_path / "state")
    finally:
        os.umask(old)
    assert _mode(folder) == 0o700


def test_private_dir_tightens_an_owned_folder_unless_told_not_to(tmp_path: Path) -> None:
    state = _shared_dir(tmp_path / "state")
    (state / "keep.txt").write_text("x")
    assert _mode(private_dir(state)) == 0o700
    assert (state / "keep.txt").read_text() == "x"
    named = _shared_dir(tmp_path / "named")
    assert _mode(private_dir(named, tighten=False)) == 0o755


def test_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError):
        private_dir(tmp_path / "f")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder owned by another user needs root")
def test_private_dir_leaves_another_users_folder_alone(tmp_path: Path) -> None:
    folder = _shared_dir(tmp_path / "theirs")
    os.chown(folder, 65534, 65534)
    private_dir(folder)
    assert _mode(folder) == 0o755


def test_open_private_creates_0600_and_tightens_an_owned_file(tmp_path: Path, umask: int) -> None:
    new = tmp_path / "new.log"
    os.close(open_private(new, os.O_WRONLY | os.O_APPEND))
    assert _mode(new) == 0o600
    old = tmp_path / "old.log"
    old.write_text("kept\n")
    old.chmod(0o644)
    os.close(open_private(old, os.O_RDONLY))
    assert _mode(old) == 0o600 and old.read_text() == "kept\n"


def test_write_private_atomic_is_0600_replaces_and_leaves_no_temp(
    tmp_path: Path, umask: int
) -> None:
    path = tmp_path / "releases" / "abc.pt"
    write_private_atomic(path, b"one")
    assert _mode(path.parent) == 0o700  # a missing folder is made private
    assert _mode(path) == 0o600 and path.read_bytes() == b"one"
    path.chmod(0o644)  # a file an earlier version wrote: replaced by a private one
    write_private_atomic(path, b"two")
    assert _mode(path) == 0o600 and path.read_bytes() == b"two"
    assert _no_temp_files(path.parent)


def test_atomic_private_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_private_atomic(tmp_path / "checkpoint.pt", b"round 1")
    with pytest.raises(RuntimeError), atomic_private(path) as f:
        f.write(b"round 2, half")
        raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"round 1" and _no_temp_files(tmp_path)


# ------------------------------------------------------------------ audit logs and keys


def test_audit_log_and_signing_key_are_0600(tmp_path: Path, umask: int) -> None:
    folder = tmp_path / "audit"
    key = load_or_create_signing_key(folder / "key.pem")
    log = AuditLog(folder / "log.jsonl", writer="server", key=key)
    log.append("note", {"n": 1})
    assert _mode(folder) == 0o700
    assert _mode(folder / "key.pem") == 0o600
    assert _mode(folder / "log.jsonl") == 0o600
    assert _no_temp_files(folder)


def test_an_existing_world_readable_audit_log_is_tightened_on_append(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "key.pem")
    log = AuditLog(tmp_path / "log.jsonl", writer="server", key=key)
    log.append("note", {"n": 1})
    log.path.chmod(0o644)
    log.append("note", {"n": 2})
    assert _mode(log.path) == 0o600


def test_a_world_readable_signing_key_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(AuditLogError, match="chmod 600"):
        load_or_create_signing_key(path)


def test_site_state_dir_audit_log_and_key(tmp_path: Path, umask: int) -> None:
    state = _shared_dir(tmp_path / "site-0" / ".fedcare")  # as an earlier version made it
    audit = SiteAudit.open(state, site_id="site-0", dataset_fingerprint="f" * 64)
    audit.log.append("note", {"n": 1})
    assert _mode(state) == 0o700
    assert _mode(state / AUDIT_KEY_NAME) == 0o600
    assert _mode(state / AUDIT_LOG_NAME) == 0o600
    fresh = tmp_path / "state-root" / "site-1"
    SiteAudit.open(fresh, site_id="site-1", dataset_fingerprint="f" * 64)
    assert _mode(fresh) == 0o700


def test_server_audit_folder_log_and_key(tmp_path: Path, umask: int) -> None:
    run_dir = tmp_path / "runs" / "r1"
    cfg = FederationConfig.from_run_config({"min-sites": 1})
    audit = ServerAudit.open(run_dir, cfg, run_id="r1")
    audit.round_start(1, model_sha256="0" * 64)
    assert _mode((run_dir / SERVER_LOG).parent) == 0o700
    assert _mode(run_dir / SERVER_LOG) == 0o600
    assert _mode(run_dir / SERVER_KEY) == 0o600


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_and_run_dir(tmp_path: Path, umask: int) -> None:
    # A run folder fedcare creates is 0700; one the operator named (--out) keeps its mode
    # (it may be a group's results folder), while the files fedcare writes in it are 0600.
    fresh = tmp_path / "runs" / "new"
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(fresh, Checkpoint(run_id="r0", round=1, arrays=arrays))
    assert _mode(fresh) == 0o700
    run_dir = _shared_dir(tmp_path / "runs" / "r1")
    path = save_checkpoint(run_dir, Checkpoint(run_id="r1", round=1, arrays=arrays))
    assert path == run_dir / CHECKPOINT_NAME
    assert _mode(run_dir) == 0o755 and _mode(path) == 0o600
    save_checkpoint(run_dir, Checkpoint(run_id="r1", round=2, arrays=arrays))
    loaded = load_checkpoint(run_dir)
    assert loaded is not None and loaded.round == 2
    np.testing.assert_array_equal(loaded.arrays["w"], arrays["w"])
    assert _mode(path) == 0o600 and _no_temp_files(run_dir)


# ------------------------------------------------------------------ certificates and keys


def test_certificates_keys_private_certificates_public(tmp_path: Path, umask: int) -> None:
    paths = init_certificates(out=tmp_path / "centre" / "certs", hosts=["127.0.0.1"])
    assert _mode(paths.ca_key.parent) == 0o700
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644 and _mode(paths.server_cert) == 0o644


def test_node_key_private_public_half_public(tmp_path: Path, umask: int) -> None:
    paths = generate_node_keypair(out=tmp_path / "hospital" / "keys")
    assert _mode(paths.private_key.parent) == 0o700
    assert _mode(paths.private_key) == 0o600 and _mode(paths.public_key) == 0o644


# ------------------------------------------------------------------ the SuperLink database


def test_superlink_database_is_created_0600_in_a_0700_folder(tmp_path: Path, umask: int) -> None:
    db = prepare_database(tmp_path / "centre" / "superlink.db")
    assert _mode(db.parent) == 0o700 and _mode(db) == 0o600 and db.stat().st_size == 0


def test_sqlite_opens_the_prepared_file_and_keeps_its_mode_for_wal_files(
    tmp_path: Path, umask: int
) -> None:
    """What Flower does with ``--database`` (SQLite, WAL mode), on the prepared empty file."""
    db = prepare_database(tmp_path / "superlink.db")
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA journal_mode = WAL").fetchone() == ("wal",)
        con.execute("CREATE TABLE node (id INTEGER)")
        con.execute("INSERT INTO node VALUES (1)")
        con.commit()
        side = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        assert all(p.exists() for p in side)
        assert {p.name: _mode(p) for p in [db, *side]} == {p.name: 0o600 for p in [db, *side]}
    finally:
        con.close()


def test_an_existing_database_is_tightened_its_folder_left_alone(tmp_path: Path) -> None:
    folder = _shared_dir(tmp_path / "cwd")  # --database superlink.db in a shared folder
    db = folder / "superlink.db"
    for path in (db, db.with_name("superlink.db-wal")):
        path.write_bytes(b"")
        path.chmod(0o644)
    prepare_database(db)
    assert _mode(db) == 0o600 and _mode(db.with_name("superlink.db-wal")) == 0o600
    assert _mode(folder) == 0o755


# ------------------------------------------------------------------ deployment files


def _service_settings(unit: Path) -> dict[str, str]:
    section, settings = "", {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_units_create_private_files(unit: Path) -> None:
    settings = _service_settings(unit)
    assert settings.get("UMask") == "0077"
    assert settings.get("StateDirectory") == "fedcare"
    assert settings.get("StateDirectoryMode") == "0700"
    assert settings.get("WorkingDirectory") == "/var/lib/fedcare"


def test_there_are_two_systemd_units() -> None:
    assert [u.name for u in UNITS] == ["fedcare-site.service", "fedcare-superlink.service"]


def test_one_machine_walkthrough_sets_a_private_umask() -> None:
    lines = (REPO / "deploy" / "one-machine.sh").read_text(encoding="utf-8").splitlines()
    first_mkdir = next(i for i, line in enumerate(lines) if "mkdir" in line)
    assert "umask 077" in lines[:first_mkdir]
