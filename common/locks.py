"""One fedcare process at a time in a folder: an advisory lock on ``<folder>/.lock``.

A run directory (``fedcare simulate --out``) and a deployed site's state folder
(``fedcare site start``) each hold files that exactly one process may write: a checkpoint,
a signed audit log, a privacy ledger, Flower's working files. Two processes on one folder
interleave them (one run resumes the other's checkpoint; both append to one audit log). So
the process that owns a folder holds an exclusive ``fcntl.flock`` on ``<folder>/.lock`` for
as long as it works there, and a second one is refused at once, with the holder named::

    runs/sim is in use by pid 1234 (fedcare simulate --out runs/sim, started 2025-06-01
    04:10:03); wait for it to finish or stop it, or choose another folder

The kernel drops a ``flock`` when its holder exits, however it exits (``kill -9``
included), so a lock is never stale: no pid checks, no lock files to remove by hand. The
file itself stays (mode 0600), holding the last holder's pid, host, command and start time
as JSON; those are read only to name a holder that still holds the lock. The lock's file
descriptor is not inherited by child processes (Python opens files non-inheritable), so a
process the holder started does not keep the folder locked after the holder is gone.

The lock is advisory: it keeps fedcare processes from each other, not a user with ``rm``.
Within one process a folder is locked once: a second :meth:`FolderLock.acquire` of the same
folder, even in the same process, is refused too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from fedcare.common.errors import FedcareError
from fedcare.common.files import open_private

__all__ = ["LOCK_NAME", "FolderInUse", "LockHolder", "FolderLock"]

LOCK_NAME = ".lock"
_MAX_COMMAND = 160


class FolderInUse(FedcareError):
    """A folder is locked by another process (``holder``: who, when known)."""

    def __init__(self, message: str, holder: LockHolder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class LockHolder:
    """Who holds a folder's lock: as the holder recorded itself in the lock file."""

    pid: int
    hostname: str
    command: str
    started: str  # ISO 8601, UTC

    def describe(self) -> str:
        """``pid 1234 (fedcare simulate ..., started 2025-06-01 04:10:03)``, local time;
        the host is named when it is not this one (a folder on a shared file system)."""
        try:
            started = datetime.fromisoformat(self.started).astimezone()
            when = f"started {started:%Y-%m-%d %H:%M:%S}"
        except ValueError:
            when = f"started {self.started}"
        host = "" if self.hostname == socket.gethostname() else f" on host {self.hostname}"
        return f"pid {self.pid}{host} ({self.command}, {when})"

    @classmethod
    def parse(cls, text: bytes) -> LockHolder | None:
        """The holder a lock file records (``None`` when empty or unreadable)."""
        try:
            value = json.loads(text.decode("utf-8"))
            return cls(
                pid=int(value["pid"]),
                hostname=str(value["hostname"]),
                command=str(value["command"]),
                started=str(value["started"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "pid": self.pid,
                "hostname": self.hostname,
                "command": self.command,
                "started": self.started,
            }
        ).encode("utf-8")


def _this_command() -> str:
    """This process's command line, as a person would type it (shortened)."""
    argv = list(sys.argv) or ["python"]
    words = [Path(argv[0]).name or "python", *argv[1:]]
    text = " ".join(words)
    return text if len(text) <= _MAX_COMMAND else text[: _MAX_COMMAND - 3] + "..."


class FolderLock:
    """An exclusive, non-blocking lock on ``<folder>/.lock`` (see the module docstring).

    Parameters
    ----------
    folder:
        The folder to lock; it must exist.
    command:
        How the holder is named to a process that is refused (default: this process's
        command line).
    what:
        What the folder is, for the refusal's fix (e.g. ``"--out"``): the message then
        suggests choosing another one.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp, FolderLock(Path(tmp), command="demo"):
    ...     try:
    ...         FolderLock(Path(tmp)).acquire()
    ...     except FolderInUse as e:
    ...         print("refused:", e.holder.command)
    refused: demo
    """

    def __init__(self, folder: Path, *, command: str | None = None, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command or _this_command()
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock, or raise at once.

        Raises
        ------
        FolderInUse
            Another process (or another lock in this one) holds it.
        FedcareError
            The folder is missing, or the lock file cannot be created (a read-only folder).
        """
        if self._fd is not None:
            return self
        if not self.folder.is_dir():
            raise FedcareError(f"{self.folder}: no such folder to work in; create it first")
        try:
            fd = open_private(self.path, os.O_RDWR)
        except OSError as e:
            raise FedcareError(
                f"cannot lock {self.folder} ({e.strerror or e}: {self.path}); make the folder "
                "writable by this user, or choose another one"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FedcareError(f"cannot lock {self.folder} ({e}); choose another one") from e
            raise FolderInUse(self._refusal(holder), holder) from None
        try:
            holder = LockHolder(
                pid=os.getpid(),
                hostname=socket.gethostname(),
                command=self.command,
                started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_bytes(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only its holder goes unnamed
        self._fd = fd
        return self

    def _refusal(self, holder: LockHolder | None) -> str:
        who = holder.describe() if holder is not None else "another process"
        return (
            f"{self.folder} is in use by {who}; wait for it to finish or stop it, or choose "
            f"another {self.what}"
        )

    def release(self) -> None:
        """Let go of the lock (the file stays; see the module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_holder(fd: int) -> LockHolder | None:
    """The holder the lock file names, unless that record is an earlier holder's (a process
    of this host that is gone: the new holder has not written its own yet)."""
    try:
        holder = LockHolder.parse(os.pread(fd, 4096, 0))
    except OSError:
        return None
    if holder is not None and holder.hostname == socket.gethostname():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # alive, another user's
    return holder
