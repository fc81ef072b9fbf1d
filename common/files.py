"""Private state files: folders 0700, files 0600, whatever the process umask.

A hospital's audit log and signing key, its stored model releases, the server's checkpoints
and the SuperLink's database say what was trained on whose data: no other local user may
read them. The modes here are set at creation (``os.open(..., 0o600)``, ``os.mkdir`` then
``chmod 0700``), so a file is never readable by others, not even for an instant, and an
umask of 022 (a login shell's) gives the same modes as systemd's ``UMask=0077``.

* :func:`private_dir`: a folder only its owner can enter (an existing one this process
  owns is tightened, unless ``tighten=False``).
* :func:`open_private`: ``os.open`` with ``O_CREAT`` and mode 0600; an existing file this
  process owns loses its group and other bits.
* :func:`atomic_file` / :func:`atomic_private` / :func:`write_private_atomic`: a file
  written under a temporary name in the same folder (created 0700 if missing), fsynced, then
  renamed into place and its folder fsynced: a reader sees the old file or the new one,
  never half of one, and a failure removes the temporary file and leaves the old one.
* :func:`write_atomic_files`: the same for several files at once, all or none: every one is
  written and fsynced under its temporary name before any is renamed.

These are fedcare's one way to replace a file. A file is private (0600) unless a caller
names another mode: public material (``ca.crt``, ``*.pub``) is written 0644 on purpose by
:mod:`fedcare.common.certs`. The mode is exact, whatever the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from fedcare.common.errors import ConfigError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "private_dir",
    "open_private",
    "atomic_file",
    "atomic_private",
    "write_private_atomic",
    "write_atomic_files",
    "fsync_dir",
    "read_json_file",
]

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def _tighten(path: Path | int, st: os.stat_result) -> None:
    """Drop group and other bits from a file or folder this process owns."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077 and st.st_uid == os.geteuid():
        if isinstance(path, int):
            os.fchmod(path, mode & 0o700)
        else:
            os.chmod(path, mode & 0o700)


def private_dir(path: Path | str, *, tighten: bool = True) -> Path:
    """Create the folder ``path`` with mode 0700 if missing; return it.

    Missing parents are created as ``mkdir -p`` would (the umask decides their mode): a
    parent may be shared, e.g. ``/etc/fedcare``, and the folder's own mode already keeps its
    contents from other users.

    Parameters
    ----------
    path:
        The folder.
    tighten:
        Also drop the group and other bits of an existing folder this process owns. Leave it
        on for a folder fedcare owns outright (a site's state folder, a run folder); turn it
        off for one a person may have named (``--out``, the folder of ``--database``).

    Raises
    ------
    OSError
        ``path`` exists and is not a folder (``FileExistsError``), or cannot be created.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     oct(private_dir(Path(tmp) / "a" / "state").stat().st_mode & 0o777)
    '0o700'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        if tighten:
            _tighten(path, path.stat())
    else:
        # The umask can only have narrowed 0700; an odd one that took the owner's own bits
        # would leave a folder its owner cannot use.
        if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
            os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private(path: Path | str, flags: int) -> int:
    """``os.open(path, flags | O_CREAT, 0o600)``; an existing file this process owns loses
    its group and other bits. Returns the file descriptor (wrap it with ``os.fdopen``).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     fd = open_private(Path(tmp) / "audit.jsonl", os.O_WRONLY | os.O_APPEND)
    ...     mode = os.fstat(fd).st_mode & 0o777
    ...     os.close(fd)
    >>> oct(mode)
    '0o600'
    """
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        _tighten(fd, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _temporary(path: Path, mode: int) -> tuple[Path, int]:
    """A new ``.<name>.<random>.tmp`` beside ``path``, open for writing, mode exactly
    ``mode``; its name and file descriptor."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # Created no wider than 0600, then set exactly: the umask may have narrowed it (even the
    # owner's bits), and a public file's wider bits are added only once it is ours.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return tmp, fd


@contextlib.contextmanager
def atomic_file(path: Path | str, *, mode: int = PRIVATE_FILE_MODE) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through, renamed into place on success.

    The file is ``.<name>.<random>.tmp`` in the same folder (created with mode 0700 if
    missing; an existing folder keeps its mode), created with mode ``mode`` (default 0600);
    when the block ends without an exception it is flushed, fsynced and renamed over
    ``path``, and the folder is fsynced; otherwise it is removed and ``path`` is left as it
    was.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with atomic_file(Path(tmp) / "ca.crt", mode=0o644) as f:
    ...         _ = f.write(b"certificate")
    ...     oct((Path(tmp) / "ca.crt").stat().st_mode & 0o777)
    '0o644'
    """
    path = Path(path)
    private_dir(path.parent, tighten=False)
    tmp, fd = _temporary(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the new name survives a power cut too


@contextlib.contextmanager
def atomic_private(path: Path | str) -> Iterator[BinaryIO]:
    """:func:`atomic_file` with mode 0600.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with atomic_private(Path(tmp) / "checkpoint.pt") as f:
    ...         _ = f.write(b"weights")
    ...     (Path(tmp) / "checkpoint.pt").read_bytes()
    b'weights'
    """
    with atomic_file(path, mode=PRIVATE_FILE_MODE) as f:
        yield f


def write_atomic_files(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every ``(path, data, mode)``, all or none.

    Each file is written to a temporary name beside its path (mode exactly ``mode``) and
    fsynced; only then are all renamed into place, and their folders fsynced. If any write
    fails, every temporary file is removed and no path is touched. The folders must exist.

    Raises
    ------
    OSError
        A file could not be written (its ``filename`` is the temporary file's).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = Path(tmp)
    ...     write_atomic_files([(folder / "a.key", b"k", 0o600), (folder / "a.pub", b"p", 0o644)])
    ...     sorted(oct(p.stat().st_mode & 0o777) for p in Path(tmp).iterdir())
    ['0o600', '0o644']
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp, fd = _temporary(Path(path), mode)
            temps.append((tmp, Path(path)))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
        renamed, temps = temps, []
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    for folder in dict.fromkeys(path.parent for _, path in renamed):
        fsync_dir(folder)


def fsync_dir(folder: Path | str) -> None:
    """``fsync`` a folder, so that a file created or renamed in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_private`; return ``path``."""
    with atomic_private(path) as f:
        f.write(data)
    return Path(path)


def read_json_file(path: Path | str, *, fix: str, missing: str | None = None) -> Any:
    """The JSON value ``path`` holds; otherwise one :class:`ConfigError` naming the file.

    A file fedcare reads back (a run record, a summary, a manifest) may come from anyone who
    hands an auditor a run directory: unreadable bytes, not UTF-8 or JSON, an integer too
    long to convert, or nesting too deep for the parser each say so, with ``fix`` (or
    ``missing`` for a file that is not there).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp) / "x.json"
    ...     _ = p.write_text("[" * 100_000)
    ...     read_json_file(p, fix="rerun")
    Traceback (most recent call last):
    ...
    fedcare.common.errors.ConfigError: .../x.json: not valid JSON (it nests too deeply); rerun
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file; {missing or fix}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e}); check the path and permissions") from e
    except (ValueError, RecursionError) as e:  # not UTF-8 or JSON, an overlong integer, too deep
        reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
        raise ConfigError(f"{path}: not valid JSON ({reason}); {fix}") from e
