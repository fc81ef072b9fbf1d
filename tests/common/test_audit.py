"""Audit-log primitives: any alteration of a log is found at the right line; keys; hashes."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import multiprocessing
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord
from flwr.common.serde import array_record_from_proto, array_record_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.common.audit import (
    GENESIS,
    AuditLog,
    AuditLogError,
    canonical_json,
    check_log,
    code_hash,
    hash_arrays,
    line_hash,
    load_or_create_signing_key,
    load_public_key_file,
    public_key_fingerprint,
    public_key_raw,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _clock() -> object:
    ticks = iter(range(10_000))
    return lambda: T0 + timedelta(seconds=next(ticks))


def _key(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"k{seed}".encode()).digest())


def _write_log(path: Path, key: Ed25519PrivateKey | None = None, writer: str = "site-a") -> Path:
    log = AuditLog(path, writer=writer, key=key or _key(1), clock=_clock())  # type: ignore[arg-type]
    log.append("run-start", {"code_sha256": "ab" * 32, "n": 3}, run_id="r1")
    log.append("train", {"round": 1, "epsilon": 1.25, "mechanism": {"steps": 8}}, run_id="r1")
    log.append("refused", {"round": 2, "reason": "budget spent: ε ≥ 8"}, run_id="r1")
    log.append("run-end", {"ok": True, "none": None}, run_id=None)
    return path


def _line_of(content: bytes, position: int) -> int:
    return content[:position].count(b"\n") + 1


@pytest.fixture()
def log_path(tmp_path: Path) -> Path:
    return _write_log(tmp_path / "audit.jsonl")


# ------------------------------------------------------------------ format


def test_log_format_chain_and_signatures_against_an_independent_reading(log_path: Path) -> None:
    lines = log_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6
    public = _key(1).public_key()
    prev = GENESIS
    for i, line in enumerate(lines[:-1], start=1):
        entry = json.loads(line)
        assert set(entry) == {"seq", "time", "kind", "writer", "run_id", "data", "prev", "sig"}
        assert entry["seq"] == i and entry["prev"] == prev and entry["writer"] == "site-a"
        body = {k: v for k, v in entry.items() if k != "sig"}
        signed = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        public.verify(base64.b64decode(entry["sig"]), signed.encode("utf-8"))  # raises if bad
        assert datetime.fromisoformat(entry["time"]).utcoffset() == timedelta(0)
        prev = hashlib.sha256(line).hexdigest()
    opened = json.loads(lines[0])
    raw = base64.b64decode(opened["data"]["public_key"])
    assert opened["kind"] == "log-open"
    assert opened["data"]["key_fingerprint"] == hashlib.sha256(raw).hexdigest()
    result = check_log(log_path)
    assert result.ok and result.lines == 5 and result.writer == "site-a"
    assert result.key_fingerprint == public_key_fingerprint(_key(1).public_key())
    assert [e.kind for e in result.entries] == [
        "log-open",
        "run-start",
        "train",
        "refused",
        "run-end",
    ]


# ------------------------------------------------------------------ tampering


def test_flipping_any_single_byte_is_found_at_its_line(log_path: Path, tmp_path: Path) -> None:
    content = log_path.read_bytes()
    bad = tmp_path / "bad.jsonl"
    for position in range(len(content)):
        altered = bytearray(content)
        altered[position] ^= 0x01
        bad.write_bytes(bytes(altered))
        result = check_log(bad)
        assert not result.ok, position
        assert result.first_bad_line == _line_of(content, position), (position, result.problem)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_replacing_any_byte_by_any_other_is_found_at_its_line(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("hyp")
    content = _write_log(folder / "a.jsonl").read_bytes()
    position = data.draw(st.integers(0, len(content) - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != content[position]))
    altered = bytearray(content)
    altered[position] = value
    (folder / "b.jsonl").write_bytes(bytes(altered))
    result = check_log(folder / "b.jsonl")
    assert not result.ok and result.first_bad_line == _line_of(content, position)


def test_other_spellings_of_the_same_last_entry_are_found(log_path: Path, tmp_path: Path) -> None:
    """JSON and base64 allow several spellings of one value; the signature alone would not
    see a respelled last line (no later line chains to it), so the log must be canonical."""
    content = log_path.read_bytes()
    lines = content.split(b"\n")[:-1]
    bad = tmp_path / "bad.jsonl"
    last = lines[-1]
    respelled = [
        last.replace(b'"ok":true', b'"ok": true'),
        last.replace(b'"none":null', b'"none":null '),
        last.replace(b'"kind":"run-end"', b'"kind":"run\\u002dend"'),
    ]
    sig = json.loads(last)["sig"]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    assert sig.endswith("==")  # 64 bytes: the last data character has 4 unused low bits
    for c in alphabet:
        other = sig[:-3] + chr(c) + "=="
        if other != sig:
            respelled.append(last.replace(sig.encode(), other.encode()))
    for line in respelled:
        assert line != last
        bad.write_bytes(b"\n".join([*lines[:-1], line]) + b"\n")
        result = check_log(bad)
        assert result.first_bad_line == len(lines), line


def test_deleted_reordered_and_cut_lines_are_found(log_path: Path, tmp_path: Path) -> None:
    lines = log_path.read_bytes().split(b"\n")[:-1]
    bad = tmp_path / "bad.jsonl"

    def check(new_lines: list[bytes], tail: bytes = b"\n") -> int | None:
        bad.write_bytes(b"\n".join(new_lines) + tail)
        return check_log(bad).first_bad_line

    for k in range(len(lines) - 1):  # deleting any line but the last
        assert check(lines[:k] + lines[k + 1 :]) == k + 1, k
    for k in range(len(lines) - 1):  # swapping two neighbours
        swapped = list(lines)
        swapped[k], swapped[k + 1] = swapped[k + 1], swapped[k]
        assert check(swapped) == k + 1, k
    for k in range(len(lines)):  # cutting a line short
        assert check(lines[:k] + [lines[k][: len(lines[k]) // 2]], tail=b"") == k + 1
    assert check(lines, tail=b"") == len(lines)  # the last line's end is missing
    assert check(lines[:2] + [b""] + lines[2:]) == 3  # an empty line inserted
    # Dropping whole entries off the end leaves a valid shorter chain: a single log cannot
    # show it; the server and site logs anchor each other's heads for that (verify tests).
    assert check(lines[:-1]) is None


def test_entry_re_signed_with_another_key_is_a_forgery(log_path: Path, tmp_path: Path) -> None:
    lines = log_path.read_bytes().split(b"\n")[:-1]
    entry = json.loads(lines[2])
    entry["data"]["epsilon"] = 0.5  # what a forger would want to change
    body = {k: v for k, v in entry.items() if k != "sig"}
    entry["sig"] = base64.b64encode(_key(2).sign(canonical_json(body))).decode()
    lines[2] = canonical_json(entry)
    bad = tmp_path / "forged.jsonl"
    bad.write_bytes(b"\n".join(lines) + b"\n")
    result = check_log(bad)
    assert result.first_bad_line == 3 and "signature" in str(result.problem)
    assert [e.line for e in result.entries] == [1, 2]  # only the entries before it count


def test_a_log_rewritten_with_another_key_fails_only_against_the_trusted_key(
    tmp_path: Path,
) -> None:
    original = _key(1)
    forged = _write_log(tmp_path / "forged.jsonl", key=_key(2))
    assert check_log(forged).ok  # self-consistent...
    result = check_log(forged, trusted_key=public_key_raw(original))
    assert not result.ok and result.first_bad_line == 1 and "trusted key" in str(result.problem)
    genuine = _write_log(tmp_path / "genuine.jsonl", key=original)
    assert check_log(genuine, trusted_key=public_key_raw(original)).ok


def test_writer_refuses_to_append_to_a_broken_or_foreign_log(log_path: Path) -> None:
    # (An incomplete last line is a torn write, cut and recorded: tests/faults/test_files_whole.py.)
    content = log_path.read_bytes()
    lines = content.split(b"\n")[:-1]
    log_path.write_bytes(b"\n".join([*lines[:-1], lines[-1][:-5]]) + b"\n")  # a whole line cut
    with pytest.raises(AuditLogError, match="line 5"):
        AuditLog(log_path, writer="site-a", key=_key(1)).append("x", {})
    log_path.write_bytes(content.replace(b'"ok":true', b'"ok":false'))
    with pytest.raises(AuditLogError, match="signature"):
        AuditLog(log_path, writer="site-a", key=_key(1)).append("x", {})
    log_path.write_bytes(content)
    with pytest.raises(AuditLogError, match="another signing key"):
        AuditLog(log_path, writer="site-a", key=_key(2)).append("x", {})
    with pytest.raises(AuditLogError, match="belongs to writer"):
        AuditLog(log_path, writer="site-b", key=_key(1)).append("x", {})
    assert log_path.read_bytes() == content  # nothing was written by the refused appends
    head = AuditLog(log_path, writer="site-a", key=_key(1)).append("x", {"n": 1})
    assert head is not None and head.seq == 6
    assert head.sha256 == line_hash(log_path.read_bytes().split(b"\n")[5])
    assert check_log(log_path).ok


def test_once_per_appends_only_new_combinations(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", writer="s", key=_key(1))
    assert log.append("run-start", {"cfg": "a", "t": 1}, run_id="r", once_per=("cfg",))
    assert log.append("run-start", {"cfg": "a", "t": 2}, run_id="r", once_per=("cfg",)) is None
    assert log.append("run-start", {"cfg": "b"}, run_id="r", once_per=("cfg",))
    assert log.append("run-start", {"cfg": "a"}, run_id="q", once_per=("cfg",))
    assert check_log(tmp_path / "a.jsonl").lines == 4


@pytest.mark.parametrize(
    "value",
    [
        np.float32(1.0),
        np.int64(3),
        np.zeros(3),
        torch.zeros(2),
        float("nan"),
        list(range(65)),
        "x" * 5000,
        {1: "non-string key"},
        b"bytes",
        {"deep": {"deeper": {"deepest": {"too": [1]}}}},
    ],
)
def test_writer_refuses_values_that_could_carry_patient_level_data(
    tmp_path: Path, value: object
) -> None:
    log = AuditLog(tmp_path / "a.jsonl", writer="s", key=_key(1))
    with pytest.raises(AuditLogError):
        log.append("train", {"value": value})
    assert not (tmp_path / "a.jsonl").exists()


def _append_many(path: str, worker: int) -> None:
    log = AuditLog(Path(path), writer="site-a", key=_key(1))
    for i in range(10):
        log.append("train", {"worker": worker, "i": i})


def test_concurrent_appends_from_several_processes_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(30)
        assert p.exitcode == 0
    result = check_log(path)
    assert result.ok and result.lines == 41, result.problem
    seen = sorted((e.data["worker"], e.data["i"]) for e in result.entries[1:])
    assert seen == [(w, i) for w in range(4) for i in range(10)]


# ------------------------------------------------------------------ keys


def test_signing_key_is_created_0600_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit-key.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_raw(load_or_create_signing_key(path)) == public_key_raw(key)
    assert load_public_key_file(path) == public_key_raw(key)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    os.chmod(path, 0o644)
    with pytest.raises(AuditLogError, match="chmod 600"):
        load_or_create_signing_key(path)


def test_public_key_files_in_every_accepted_form(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = _key(3)
    raw = public_key_raw(key)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for name, content in {
        "a.pub": pem,
        "b.b64": base64.b64encode(raw) + b"\n",
        "c.hex": raw.hex().encode(),
    }.items():
        (tmp_path / name).write_bytes(content)
        assert load_public_key_file(tmp_path / name) == raw
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(AuditLogError, match="no Ed25519 public key"):
        load_public_key_file(tmp_path / "junk")
    assert public_key_fingerprint(raw) == hashlib.sha256(raw).hexdigest()


# ------------------------------------------------------------------ hashes


def test_hash_of_a_state_dict_equals_the_hash_after_a_flower_round_trip() -> None:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.GroupNorm(2, 4), torch.nn.Linear(4, 1)
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["t"] = torch.randn(4, 3, generator=gen).t()  # not contiguous
    state["count"] = torch.tensor(7)  # a 0-d int64
    state["h"] = torch.randn(2, 2, generator=gen).to(torch.float16)
    site_side = hash_arrays({k: v.numpy() for k, v in state.items()})
    received = array_record_from_proto(array_record_to_proto(ArrayRecord(state)))
    server_side = hash_arrays({k: a.numpy() for k, a in received.items()})
    assert site_side == server_side
    changed = dict(state)
    changed["count"] = torch.tensor(8)
    assert hash_arrays({k: v.numpy() for k, v in changed.items()}) != site_side
    as_f64 = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    assert hash_arrays(as_f64) != site_side  # same values, other dtype: other bytes


def test_hash_covers_names_shapes_and_layout_independence() -> None:
    a = np.arange(6, dtype=np.float32)
    assert hash_arrays({"w": a.reshape(2, 3)}) != hash_arrays({"w": a.reshape(3, 2)})
    assert hash_arrays({"w": a, "v": a}) == hash_arrays({"v": a, "w": a})
    assert hash_arrays({"w": a.reshape(2, 3)}) == hash_arrays(
        {"w": np.asfortranarray(a.reshape(2, 3))}
    )
    assert hash_arrays({"w": a}) == hash_arrays({"w": a.astype(">f4")})  # byte order
    assert hash_arrays({"w": a}) != hash_arrays({"x": a})


def test_code_hash_follows_sources_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fc_audit_probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "m.py").write_text("y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    first = code_hash(("fc_audit_probe_pkg",))
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "junk.py").write_text("ignored")
    (pkg / "notes.txt").write_text("ignored")
    assert code_hash(("fc_audit_probe_pkg",)) == first
    (pkg / "sub" / "m.py").write_text("y = 3\n")
    assert code_hash(("fc_audit_probe_pkg",)) != first
    assert code_hash() == code_hash()  # the installed packages: stable
    with pytest.raises(AuditLogError, match="cannot find"):
        code_hash(("no_such_package_fc",))
