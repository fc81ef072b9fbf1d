"""fedcare's one way to replace files: exact modes whatever the umask, all or none, no
temporary file left behind (the private-file cases are in tests/security/test_file_modes.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcare.common import files
from fedcare.common.files import atomic_file, write_atomic_files


@pytest.fixture(params=[0o022, 0o077, 0o277])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_every_file_gets_exactly_its_mode_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    with atomic_file(tmp_path / "ca.crt", mode=0o644) as f:
        f.write(b"public")
    write_atomic_files([(tmp_path / "a.key", b"k", 0o600), (tmp_path / "a.pub", b"p", 0o644)])
    assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
        "ca.crt": 0o644,
        "a.key": 0o600,
        "a.pub": 0o644,
    }


def test_a_failed_write_of_a_group_touches_no_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "one").write_bytes(b"old one")
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file's data
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    group = [(tmp_path / "one", b"new one", 0o600), (tmp_path / "two", b"new two", 0o644)]
    with pytest.raises(OSError, match="No space"):
        write_atomic_files(group)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]
    assert (tmp_path / "one").read_bytes() == b"old one"


def test_a_group_replaces_every_file_and_syncs_their_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "one").write_bytes(b"old one")
    synced: list[Path] = []
    monkeypatch.setattr(files, "fsync_dir", lambda folder: synced.append(Path(folder)))
    write_atomic_files([(tmp_path / "one", b"1", 0o600), (tmp_path / "two", b"2", 0o600)])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"one": b"1", "two": b"2"}
    assert synced == [tmp_path]


def test_a_block_that_raises_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "sites.json"
    path.write_bytes(b"[]")
    with pytest.raises(RuntimeError), atomic_file(path, mode=0o644) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"[]" and [p.name for p in tmp_path.iterdir()] == ["sites.json"]
