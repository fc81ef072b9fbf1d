"""Tamper-evident audit logs: append-only, hash-chained, Ed25519-signed JSON Lines.

One log per writer (the server, or one site). Each line is one entry, written as canonical
JSON (sorted keys, no spaces, UTF-8)::

    {"data": {...}, "kind": "...", "prev": "<sha256 hex>", "run_id": "..." | null,
     "seq": n, "sig": "<base64>", "time": "<ISO 8601 UTC>", "writer": "..."}

* ``seq`` is the entry's 1-based line number;
* ``prev`` is the SHA-256 of the previous line's exact bytes (without its line end); the
  first entry's is :data:`GENESIS` (64 zeros);
* ``sig`` is the writer's Ed25519 signature over the canonical JSON of every other field.

The first entry is always ``kind = "log-open"``; its data carries the writer's raw public key
(base64) and its fingerprint (:func:`public_key_fingerprint`), and every later entry must
verify under that key. Changing, inserting, deleting or reordering bytes or lines therefore
breaks a signature, a sequence number or a hash link at the first altered line, which
:func:`check_log` names. What a chain alone cannot show is that its *last* whole entries
were cut off; the server and the sites anchor each other's log heads for that (see
``server/audit.py`` and ``client/audit.py``).

Entries hold hashes, counts, parameters and ε only: the writer refuses any data value that
is not ``str``/``int``/``float``/``bool``/``None`` or a small list/dict of those, so a
patient-level table or array cannot be written into a log by mistake.

Several processes of one site may append to its log (Flower runs each ClientApp call in
its own process): appends hold an exclusive ``fcntl.flock`` on the file, check the log's
first and last entries, write one line (in one ``os.write``) and ``fsync`` it.

Files stay whole. A write that fails (a full disk, an I/O error) cuts the file back to its
length before and raises :class:`AuditLogError` naming the file, the cause and the fix; a
failed append is never taken for a written one. What a crash in mid-write can still leave
is an incomplete last line: bytes after the last line end. The next append cuts them and
first writes a signed ``recovery`` entry, chained to the last whole entry, whose data
records the cut: ``offset`` (the byte where it was made, which is where the entry itself
starts; or 0, when the first line was cut and a new ``log-open`` precedes the entry),
``length`` and ``sha256`` of the bytes cut. :func:`check_log` accepts a recovery
entry that records a cut at its own place and reports it as a notice, not an error. Only
the bytes after the last line end are ever cut: a whole line that does not verify, wherever
it is, is an alteration that :func:`check_log` reports as an error (and the writer refuses
to append after a damaged last entry). Until the next append, an incomplete last line is
reported as the log's first bad line.

A log and its signing key are private to their owner: both files are created with mode 0600
(an existing log this process owns is tightened on its next append), and a missing folder
with 0700 (:mod:`fedcare.common.files`), whatever the umask.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Union

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedcare.common.audit_kinds import LOG_OPEN, RECOVERY
from fedcare.common.errors import FedcareError
from fedcare.common.files import fsync_dir, open_private, private_dir
from fedcare.common.plugins import plugin_code_modules

__all__ = [
    "AUDIT_FORMAT",
    "GENESIS",
    "ENTRY_FIELDS",
    "LOG_OPEN",
    "RECOVERY",
    "CODE_PACKAGES",
    "AuditLogError",
    "JsonValue",
    "LogHead",
    "LoggedEntry",
    "LogVerification",
    "AuditLog",
    "canonical_json",
    "line_hash",
    "load_or_create_signing_key",
    "private_audit_dir",
    "public_key_raw",
    "public_key_fingerprint",
    "load_public_key_file",
    "hash_arrays",
    "config_hash",
    "code_hash",
    "running_code_hash",
    "versions",
    "check_log",
    "read_entries",
]

AUDIT_FORMAT = "fedcare-audit-v1"
GENESIS = "0" * 64
ENTRY_FIELDS = frozenset({"seq", "time", "kind", "writer", "run_id", "data", "prev", "sig"})
CODE_PACKAGES = ("fedcare.common", "fedcare.models", "fedcare.client", "fedcare.server")
"""The packages whose sources :func:`code_hash` covers (the code that runs in a round)."""

MAX_STRING = 4000
MAX_ITEMS = 64
MAX_DEPTH = 4

JsonValue = Union[str, int, float, bool, None, "list[JsonValue]", "dict[str, JsonValue]"]


class AuditLogError(FedcareError):
    """An audit log cannot be written or read, or its tail is broken."""


# --------------------------------------------------------------------------- encoding


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8, no NaN/Infinity.

    >>> canonical_json({"b": 1, "a": [True, None, "é"]})
    b'{"a":[true,null,"\\xc3\\xa9"],"b":1}'
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of one log line's exact bytes, without its line end."""
    return hashlib.sha256(line).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_data(value: Any, where: str, depth: int = 0) -> None:
    """Refuse anything but small JSON scalars/lists/dicts (see the module docstring)."""
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditLogError(f"audit entry field {where} is {value!r}; only finite numbers")
        return
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise AuditLogError(
                f"audit entry field {where} is a string of {len(value)} characters (at most "
                f"{MAX_STRING}); log a hash of long content instead"
            )
        return
    if depth >= MAX_DEPTH:
        raise AuditLogError(f"audit entry field {where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_ITEMS:
            raise AuditLogError(
                f"audit entry field {where} lists {len(value)} values (at most {MAX_ITEMS}); "
                "audit entries hold hashes, counts, parameters and epsilon, never per-patient "
                "values: log a hash instead"
            )
        for i, item in enumerate(value):
            _check_data(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        if len(value) > MAX_ITEMS:
            raise AuditLogError(
                f"audit entry field {where} has {len(value)} keys (at most {MAX_ITEMS})"
            )
        for k, item in value.items():
            if not isinstance(k, str):
                raise AuditLogError(f"audit entry field {where} has a non-string key {k!r}")
            _check_data(item, f"{where}.{k}", depth + 1)
        return
    raise AuditLogError(
        f"audit entry field {where} is a {type(value).__name__}; an audit entry holds only "
        "str, int, float, bool, None and lists/dicts of those (convert numpy scalars with "
        "float()/int(), and never log arrays or tables: log their hash)"
    )


# --------------------------------------------------------------------------- keys


def private_audit_dir(folder: Path) -> Path:
    """``folder``, created or tightened to mode 0700, for a writer's audit log and key.

    Use it on a folder fedcare owns outright (a site's state folder, a run's ``audit``
    folder): an existing one this process owns loses its group and other bits.

    Raises
    ------
    AuditLogError
        If the folder cannot be created or is a file.
    """
    try:
        return private_dir(folder)
    except OSError as e:
        raise AuditLogError(
            f"cannot create the audit folder {folder} ({e}); make its parent writable by "
            "this process, or remove the file in its place"
        ) from e


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key at ``path`` (PEM, PKCS8), created first if missing.

    A new key file is created with mode 0600 (``os.open``), written completely and then
    linked into place, so two processes racing to create it end up with the same key.

    Raises
    ------
    AuditLogError
        If the file is readable by group or others, is not an Ed25519 PEM private key, or
        cannot be read or written.
    """
    path = Path(path)
    try:
        if not path.exists():
            _create_key_file(path)
        mode = path.stat().st_mode
        if mode & 0o077:
            raise AuditLogError(
                f"audit signing key {path} is readable by other users (mode {mode & 0o777:o}); "
                f"anyone who can read it can forge audit entries. Fix: chmod 600 {path}"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise AuditLogError(
            f"cannot read or create the audit signing key {path} ({e}); check the folder "
            "exists and is writable by this process"
        ) from e
    except (ValueError, TypeError) as e:
        raise AuditLogError(
            f"{path} is not an unencrypted PEM private key ({e}); point the audit key at an "
            "Ed25519 key file, or remove it to have a new one created"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditLogError(
            f"{path} holds a {type(key).__name__}, not an Ed25519 key; audit logs are signed "
            "with Ed25519 (remove the file to have a new key created)"
        )
    return key


def _create_key_file(path: Path) -> None:
    private_dir(path.parent, tighten=False)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        # Atomic; fails if another process created the key first, whose key is then used.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def public_key_raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (of a private key's public half)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_fingerprint(pub: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key."""
    raw = pub if isinstance(pub, bytes) else public_key_raw(pub)
    return hashlib.sha256(raw).hexdigest()


def load_public_key_file(path: Path) -> bytes:
    """Raw public key bytes from a key file: PEM public key, PEM private key (its public
    half), or the raw 32 bytes in base64 or hex on one line.

    Raises
    ------
    AuditLogError
        If the file cannot be read or holds no Ed25519 key.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise AuditLogError(f"cannot read key file {path} ({e})") from e
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            if b"PRIVATE KEY" in text.splitlines()[0]:
                key: Any = serialization.load_pem_private_key(text, password=None)
            else:
                key = serialization.load_pem_public_key(text)
        except (ValueError, TypeError) as e:
            raise AuditLogError(f"{path} is not a readable PEM key ({e})") from e
        if not isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
            raise AuditLogError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return public_key_raw(key)
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            raw = decode(text.decode("ascii"))  # type: ignore[operator]
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
        if len(raw) == 32:
            return raw
    raise AuditLogError(
        f"{path} holds no Ed25519 public key; give a PEM public or private key, or the raw "
        "32-byte key in base64 or hex"
    )


# --------------------------------------------------------------------------- hashes


def hash_arrays(arrays: Mapping[str, Any]) -> str:
    """Canonical SHA-256 (hex) of named arrays (a model's weights).

    Covers, for each name in sorted order: the name, the dtype (little-endian), the shape
    and the C-order bytes. So the same weights give the same hash whether they are a torch
    state dict turned into numpy at a site, or the numpy arrays the server reads from the
    Flower ``ArrayRecord`` it received (whatever memory layout those arrays have).

    >>> a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    >>> hash_arrays(a) == hash_arrays({"w": np.asfortranarray(a["w"])})
    True
    >>> hash_arrays(a) == hash_arrays({"v": a["w"]})
    False
    """
    digest = hashlib.sha256(b"fedcare-arrays-v1\n")
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if array.dtype.hasobject:
            raise AuditLogError(f"array {name!r} has dtype object; only numeric arrays hash")
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder in "<>=" else array.dtype
        array = np.ascontiguousarray(array, dtype=dtype)
        header = canonical_json({"name": name, "dtype": dtype.str, "shape": list(array.shape)})
        digest.update(len(header).to_bytes(8, "big") + header)
        payload = array.tobytes(order="C")
        digest.update(len(payload).to_bytes(8, "big") + payload)
    return digest.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a resolved run config's canonical JSON."""
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


def code_hash(packages: Sequence[str] = CODE_PACKAGES) -> str:
    """SHA-256 (hex) over the ``.py`` sources of ``packages``, as installed.

    Each file contributes its path relative to the package's parent (POSIX, sorted) and the
    SHA-256 of its bytes; caches and other files do not count. The packages are located
    without being imported (only their parent, ``fedcare``, whose ``__init__`` is light).

    Raises
    ------
    AuditLogError
        If a package cannot be found.
    """
    digest = hashlib.sha256(b"fedcare-code-v1\n")
    for package in sorted(packages):
        spec = importlib.util.find_spec(package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations and spec is not None and str(spec.origin or "").endswith(".py"):
            # A plug-in that is one module, not a package: its one file.
            source = Path(str(spec.origin))
            rel = f"{package}/{source.name}"
            digest.update(canonical_json([rel, hashlib.sha256(source.read_bytes()).hexdigest()]))
            continue
        if not locations:
            raise AuditLogError(f"cannot find the package {package!r} to hash its code")
        root = Path(locations[0])
        files = sorted(
            (p for p in root.rglob("*.py") if "__pycache__" not in p.parts),
            key=lambda p: p.relative_to(root).as_posix(),
        )
        for path in files:
            rel = f"{package}/{path.relative_to(root).as_posix()}"
            digest.update(canonical_json([rel, hashlib.sha256(path.read_bytes()).hexdigest()]))
    return digest.hexdigest()


def running_code_hash() -> str:
    """:func:`code_hash` of fedcare's packages and of the plug-in modules this process
    loads (:func:`fedcare.common.plugins.plugin_code_modules`), taken once per process.

    Every message's ``run-start`` entry records it, and hashing every source costs ~12 ms.
    It names the code as it was on disk when this process first asked, close to the code
    the process imported when it started, not code installed later while it runs. A
    plug-in named later in the process (``fedcare.load_plugins`` after a change of
    ``FEDCARE_PLUGINS``) is a new set of code and gets its own hash.
    """
    installed = _entry_point_packages()
    named = plugin_code_modules(entry_points=False)
    return _code_hash_of(tuple(dict.fromkeys((*installed, *named))))


@functools.cache
def _entry_point_packages() -> tuple[str, ...]:
    """The entry-point plug-ins' packages, looked up once (installing one needs a restart)."""
    return plugin_code_modules(environ={})


@functools.cache
def _code_hash_of(plugins: tuple[str, ...]) -> str:
    return code_hash((*CODE_PACKAGES, *plugins))


def versions() -> dict[str, str]:
    """Installed versions of fedcare, flwr, torch and opacus (``"unknown"`` if missing),
    read once per process (package metadata lookups cost ~9 ms)."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    out = {}
    for name in ("fedcare", "flwr", "torch", "opacus"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class LogHead:
    """The last entry of a log: its line number and the SHA-256 of its bytes."""

    seq: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.sha256}"

    @classmethod
    def parse(cls, text: str) -> LogHead:
        """Read ``"<seq>:<sha256>"``; raises ``ValueError`` if malformed."""
        seq, sep, digest = text.partition(":")
        if not sep or len(digest) != 64 or int(seq) < 1:
            raise ValueError(f"not a log head: {text!r}")
        int(digest, 16)
        return cls(int(seq), digest)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class AuditLog:
    """An append-only, signed, hash-chained JSON Lines log (see the module docstring).

    Parameters
    ----------
    path:
        The log file; created (mode 0600, with its folder 0700) on the first append.
    writer:
        Who writes it: ``"server"`` or the site id. A log holds one writer's entries only.
    key:
        The writer's signing key; an existing log must have been opened with it.
    clock:
        Returns the current UTC time (injected for tests).
    """

    def __init__(
        self,
        path: Path,
        *,
        writer: str,
        key: Ed25519PrivateKey,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        if not writer or not isinstance(writer, str):
            raise AuditLogError("an audit log needs a writer name (the server or the site id)")
        self.path = Path(path)
        self.writer = writer
        self._key = key
        self._public = public_key_raw(key)
        self.key_fingerprint = public_key_fingerprint(self._public)
        self._clock = clock

    def append(
        self,
        kind: str,
        data: Mapping[str, Any],
        *,
        run_id: str | None = None,
        once_per: Sequence[str] | None = None,
    ) -> LogHead | None:
        """Append one entry; return the new head.

        With ``once_per`` (names of ``data`` fields), nothing is written (and ``None``
        returned) when the log already holds an entry of this ``kind`` and ``run_id`` whose
        data has the same values in those fields (``()``: any entry of that kind and run).

        Raises
        ------
        AuditLogError
            If ``data`` holds a value an audit entry may not hold, the log's tail is broken
            or belongs to another writer or key, or the file cannot be written.
        """
        if not kind or kind in (LOG_OPEN, RECOVERY):
            raise AuditLogError(f"invalid audit entry kind {kind!r}")
        data = dict(data)
        _check_data(data, "data")
        try:
            private_dir(self.path.parent, tighten=False)
            fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as e:
            raise self._write_error(e, cut_back=True) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return self._append_locked(fd, kind, data, run_id=run_id, once_per=once_per)
        finally:
            os.close(fd)  # also lets go of the lock

    def _append_locked(
        self,
        fd: int,
        kind: str,
        data: dict[str, Any],
        *,
        run_id: str | None,
        once_per: Sequence[str] | None,
    ) -> LogHead | None:
        try:
            content = _read_all(fd)
        except OSError as e:
            raise AuditLogError(
                f"cannot read the audit log {self.path} ({e}); check the disk and the file's "
                "permissions: no round runs without its audit entry"
            ) from e
        end = content.rfind(b"\n") + 1  # the bytes after the last line end are a torn write
        lines = content[:end].split(b"\n")[:-1]
        if lines:
            self._check_tail(lines)
        torn = content[end:]
        if torn:
            self._recover(fd, lines, end=end, torn=torn)
        elif not lines:
            lines.append(self._write(fd, 1, LOG_OPEN, self._open_data(), None, GENESIS))
        if once_per is not None:
            wanted = [data.get(name) for name in once_per]
            for line in lines:
                entry = _parse_line(line)
                if (
                    entry is not None
                    and (entry.get("kind"), entry.get("run_id")) == (kind, run_id)
                    and isinstance(entry.get("data"), dict)
                    and [entry["data"].get(name) for name in once_per] == wanted
                ):
                    return None
        line = self._write(fd, len(lines) + 1, kind, data, run_id, line_hash(lines[-1]))
        if not content:
            _fsync_dir_quietly(self.path.parent)
        return LogHead(len(lines) + 1, line_hash(line))

    def _recover(self, fd: int, lines: list[bytes], *, end: int, torn: bytes) -> None:
        """Cut a torn last line (the bytes after the last line end: a write interrupted by a
        crash or a full disk) and record the cut in a signed ``recovery`` entry chained to
        the last whole entry (after a fresh ``log-open`` when not even that was whole).
        Appends the lines written to ``lines``. If the entry cannot be written, the torn
        bytes are put back (as far as possible), so no cut goes unrecorded."""
        try:
            os.ftruncate(fd, end)
        except OSError as e:
            raise self._write_error(e, cut_back=False) from e
        try:
            if not lines:
                lines.append(self._write(fd, 1, LOG_OPEN, self._open_data(), None, GENESIS))
            cut = {"offset": end, "length": len(torn), "sha256": hashlib.sha256(torn).hexdigest()}
            lines.append(self._write(fd, len(lines) + 1, RECOVERY, cut, None, line_hash(lines[-1])))
        except AuditLogError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
                os.write(fd, torn)
                os.fsync(fd)
            raise

    def _open_data(self) -> dict[str, Any]:
        return {
            "format": AUDIT_FORMAT,
            "public_key": _b64(self._public),
            "key_fingerprint": self.key_fingerprint,
        }

    def _write(
        self, fd: int, seq: int, kind: str, data: dict[str, Any], run_id: str | None, prev: str
    ) -> bytes:
        """Sign and append one entry: the whole line in one write, then ``fsync``. When the
        write or the ``fsync`` fails (a full disk, an I/O error), the file is cut back to its
        length before, so no torn line is left behind, and :class:`AuditLogError` says why."""
        body = {
            "seq": seq,
            "time": self._clock().astimezone(timezone.utc).isoformat(timespec="microseconds"),
            "kind": kind,
            "writer": self.writer,
            "run_id": run_id,
            "data": data,
            "prev": prev,
        }
        body["sig"] = _b64(self._key.sign(canonical_json(body)))
        line = canonical_json(body)
        try:
            before = os.fstat(fd).st_size
        except OSError as e:
            raise self._write_error(e, cut_back=True) from e
        try:
            _write_all(fd, line + b"\n")
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, before)
                os.fsync(fd)
            except OSError:
                raise self._write_error(e, cut_back=False) from e
            raise self._write_error(e, cut_back=True) from e
        return line

    def _write_error(self, error: OSError, *, cut_back: bool) -> AuditLogError:
        """The one-line error of a failed write: the file, the cause and the fix."""
        code = error.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            cause = "the disk is full" if code == errno.ENOSPC else "the disk quota is used up"
            fix = f"free disk space on the file system that holds {self.path.parent}"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause = "it is not writable"
            fix = f"make {self.path} and its folder writable by this user"
        elif code == errno.EIO:
            cause = "an I/O error"
            fix = "check the disk (dmesg) and the file system"
        else:
            cause = error.strerror or str(error)
            fix = "check the disk and the file's permissions"
        state = (
            "the log still ends with its last whole entry"
            if cut_back
            else "the log may end with a torn line, which the next append cuts and records"
        )
        return AuditLogError(
            f"cannot write the audit log {self.path}: {cause} ([Errno {code}] "
            f"{error.strerror or error}); {state}. Fix: {fix}, then resume: no round runs "
            "without its audit entry"
        )

    def _check_tail(self, lines: list[bytes]) -> None:
        """The first entry must be this writer's log-open with this key; the last must be
        an intact entry signed with it, at its own line number."""
        first = _parse_line(lines[0])
        if first is None or first.get("kind") != LOG_OPEN:
            raise self._broken(1, "its first line is not a readable log-open entry")
        if first.get("writer") != self.writer:
            raise AuditLogError(
                f"audit log {self.path} belongs to writer {first.get('writer')!r}, not "
                f"{self.writer!r}; give each writer its own log file"
            )
        data = first.get("data")
        if not isinstance(data, dict) or data.get("public_key") != _b64(self._public):
            raise AuditLogError(
                f"audit log {self.path} was opened with another signing key than this "
                f"writer's ({self.key_fingerprint[:16]}...); the key file was replaced. Put "
                "the original key back, or move the log aside (keep it as evidence) to start "
                "a new one"
            )
        n = len(lines)
        last = _parse_line(lines[-1])
        if (
            last is None
            or set(last) != ENTRY_FIELDS
            or canonical_json(last) != lines[-1]
            or last.get("seq") != n
        ):
            raise self._broken(n, "its last entry is unreadable or out of sequence")
        if not _verify_signature(last, self._key.public_key()):
            raise self._broken(n, "its last entry's signature does not verify")

    def _broken(self, line: int, what: str) -> AuditLogError:
        return AuditLogError(
            f"audit log {self.path} is broken at line {line}: {what}. Its whole lines were "
            "altered or damaged (an interrupted write leaves only an incomplete last line, "
            "which is cut and recorded on its own); nothing more is appended to it. Run "
            "`fedcare audit verify` on it and keep it as evidence; moving it aside starts a "
            "new log, but the entries it held no longer verify then"
        )

    def head(self) -> LogHead | None:
        """The current last entry, or ``None`` for a missing or empty log."""
        try:
            content = self.path.read_bytes()
        except FileNotFoundError:
            return None
        lines = content.split(b"\n")[:-1]
        return LogHead(len(lines), line_hash(lines[-1])) if lines else None


def _read_all(fd: int) -> bytes:
    """The whole file behind ``fd``, from its first byte."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (one call, unless the kernel writes less:
    then the next call raises the reason, e.g. ``ENOSPC``)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir_quietly(folder: Path) -> None:
    """Make a new log's name durable; a failure here loses nothing already fsynced."""
    with contextlib.suppress(OSError):
        fsync_dir(folder)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """The JSON object a line holds; ``None`` if it holds none (not UTF-8 or not JSON, an
    integer too long to read, or nesting too deep for the parser: never an entry)."""
    try:
        value = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class LoggedEntry:
    """One verified entry: its 1-based line, the SHA-256 of the line, the parsed entry."""

    line: int
    sha256: str
    entry: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.entry["kind"])

    @property
    def run_id(self) -> str | None:
        return self.entry["run_id"]

    @property
    def data(self) -> dict[str, Any]:
        return self.entry["data"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LogVerification:
    """What :func:`check_log` found (``fedcare.simulations.audit.verify`` turns it into a LogCheck).

    ``entries`` are the verified entries before the first bad line (all of them if ok);
    ``lines`` is how many lines the file has; ``notices`` what a verified log records that
    an auditor should know without it being an error (a cut torn line, see ``recovery``).
    """

    path: str
    writer: str
    key_fingerprint: str
    lines: int
    ok: bool
    first_bad_line: int | None
    problem: str | None
    entries: tuple[LoggedEntry, ...]
    notices: tuple[str, ...] = ()


def _problem(line: bytes, i: int, opened: dict[str, Any] | None, prev: str) -> str | None:
    """What is wrong with line ``i`` (``None`` if nothing), given the log-open entry."""
    entry = _parse_line(line)
    if entry is None:
        return "not a JSON entry: its bytes were altered or the line was cut"
    if set(entry) != ENTRY_FIELDS:
        return f"has fields {sorted(entry)}, expected {sorted(ENTRY_FIELDS)}"
    if canonical_json(entry) != line:
        return "is not in canonical form: its bytes were altered"
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq != i:
        return (
            f"has seq {seq!r} where {i} was expected: entries were deleted, inserted or reordered"
        )
    if entry["prev"] != prev:
        return (
            "does not chain to the line before it (prev hash differs): that line was altered, "
            "or lines were deleted or reordered"
        )
    if not isinstance(entry["kind"], str) or not isinstance(entry["data"], dict):
        return "has a malformed kind or data field"
    if entry["run_id"] is not None and not isinstance(entry["run_id"], str):
        return "has a malformed run_id"
    try:
        when = datetime.fromisoformat(str(entry["time"]))
    except ValueError:
        return f"has an unreadable time {entry['time']!r}"
    if when.utcoffset() is None or when.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
        return f"has a time {entry['time']!r} that is not UTC"
    if i == 1:
        if entry["kind"] != LOG_OPEN:
            return f"is a {entry['kind']!r} entry; a log starts with a log-open entry"
        return None  # the key is checked by the caller, then the signature
    if entry["kind"] == LOG_OPEN:
        return "is a second log-open entry: another log was spliced in"
    assert opened is not None
    if entry["writer"] != opened["writer"]:
        return f"is written by {entry['writer']!r}, but the log belongs to {opened['writer']!r}"
    return None


def _strict_b64(text: Any) -> bytes:
    """Decode base64 that is in canonical form (no unused bits set, no stray characters),
    so each value has exactly one spelling; raises ``ValueError`` otherwise."""
    raw = base64.b64decode(str(text), validate=True)
    if _b64(raw) != text:
        raise ValueError("non-canonical base64")
    return raw


def _verify_signature(entry: dict[str, Any], public: Ed25519PublicKey) -> bool:
    body = {k: v for k, v in entry.items() if k != "sig"}
    try:
        public.verify(_strict_b64(entry["sig"]), canonical_json(body))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def check_log(path: Path, *, trusted_key: bytes | None = None) -> LogVerification:
    """Verify one audit log line by line and name its first broken or forged entry.

    Checks that every line is a canonical JSON entry, that ``seq`` counts lines, that each
    ``prev`` is the hash of the line before, that the first entry opens the log with a
    well-formed public key (equal to ``trusted_key`` when one is given) and that every
    signature verifies under it.

    Parameters
    ----------
    path:
        The ``.jsonl`` log.
    trusted_key:
        The writer's raw 32-byte public key, obtained out of band. Without it a log is only
        checked against the key it declares itself, which shows alteration of a log but
        not its wholesale replacement by one signed with another key.
    """
    path = Path(path)

    def result(
        writer: str,
        fingerprint: str,
        n: int,
        bad: int | None,
        problem: str | None,
        entries: list[LoggedEntry],
    ) -> LogVerification:
        notices = tuple(_recovery_notice(e) for e in entries if e.kind == RECOVERY)
        return LogVerification(
            str(path), writer, fingerprint, n, bad is None, bad, problem, tuple(entries), notices
        )

    try:
        content = path.read_bytes()
    except OSError as e:
        return result("", "", 0, 1, f"cannot read the log ({e})", [])
    if not content:
        return result("", "", 0, 1, "the log is empty: it has no log-open entry", [])
    lines = content.split(b"\n")
    torn = lines[-1] != b""
    if not torn:
        lines = lines[:-1]
    writer, fingerprint = "", ""
    opened: dict[str, Any] | None = None
    public: Ed25519PublicKey | None = None
    entries: list[LoggedEntry] = []
    prev = GENESIS
    offset = 0  # of line i's first byte
    for i, line in enumerate(lines, start=1):
        if i == len(lines) and torn:
            problem: str | None = (
                "has no line end: a write was interrupted (a crash or a full disk) or the log "
                f"was cut; the {i - 1} entries before it verify. The writer cuts it and records "
                "the cut in a recovery entry on its next append (e.g. `fedcare simulate "
                "--resume`)"
            )
            return result(writer, fingerprint, len(lines), i, f"line {i} {problem}", entries)
        problem = _problem(line, i, opened, prev)
        if problem is None and i == 1:
            opened = json.loads(line)
            assert opened is not None
            writer = str(opened["writer"])
            problem, public, fingerprint = _open_key(opened["data"], trusted_key)
        if problem is None:
            entry = json.loads(line)
            assert public is not None
            if not _verify_signature(entry, public):
                problem = (
                    "its signature does not verify: the entry was altered, or forged with "
                    "another key"
                )
            elif entry["kind"] == RECOVERY:
                # A cut first line is followed by a new log-open, then its recovery entry.
                problem = _recovery_problem(entry["data"], 0 if i == 2 else offset, offset)
        if problem is not None:
            return result(writer, fingerprint, len(lines), i, f"line {i} {problem}", entries)
        entries.append(LoggedEntry(i, line_hash(line), json.loads(line)))
        prev = line_hash(line)
        offset += len(line) + 1
    return result(writer, fingerprint, len(lines), None, None, entries)


def _recovery_problem(data: dict[str, Any], first: int, offset: int) -> str | None:
    """What is wrong with a signed ``recovery`` entry that starts at byte ``offset``: it must
    record a cut made exactly where it stands (the writer writes it there right after the
    cut; at line 2, ``first``, the cut of the first line, 0), of a positive length, with a
    SHA-256."""
    length, digest = data.get("length"), data.get("sha256")
    if (
        data.get("offset") not in (first, offset)
        or not isinstance(length, int)
        or isinstance(length, bool)
        or length < 1
        or not isinstance(digest, str)
        or len(digest) != 64
        or digest.strip("0123456789abcdef")
    ):
        return (
            f"is a recovery entry that does not record a cut at its own place (byte {offset}): "
            "lines before it were altered, inserted or deleted"
        )
    return None


def _recovery_notice(e: LoggedEntry) -> str:
    d = e.data
    return (
        f"line {e.line}: the writer found its last line incomplete (a write interrupted by a "
        f"crash or a full disk), cut those {d.get('length')} bytes at byte {d.get('offset')} "
        f"(SHA-256 {str(d.get('sha256'))[:16]}...) on {e.entry.get('time')} and recorded it "
        "here"
    )


def _open_key(
    data: dict[str, Any], trusted_key: bytes | None
) -> tuple[str | None, Ed25519PublicKey | None, str]:
    """(problem, public key, fingerprint) of a log-open entry's data."""
    try:
        raw = _strict_b64(data.get("public_key"))
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        return "declares no valid Ed25519 public key", None, ""
    fingerprint = public_key_fingerprint(raw)
    if data.get("key_fingerprint") != fingerprint:
        return "declares a key fingerprint that is not its key's", None, fingerprint
    if trusted_key is not None and bytes(trusted_key) != raw:
        return (
            f"is signed with key {fingerprint[:16]}..., not the trusted key "
            f"{public_key_fingerprint(bytes(trusted_key))[:16]}...: the log was replaced or "
            "re-signed by someone else",
            None,
            fingerprint,
        )
    return None, public, fingerprint


def read_entries(path: Path) -> list[dict[str, Any]]:
    """The parsed entries of a log, without verifying it (use :func:`check_log` for that).

    An incomplete last line (a write interrupted by a crash or a full disk; the writer cuts
    it on its next append) is not an entry and is skipped.

    Raises
    ------
    AuditLogError
        If a whole line is not a JSON entry.
    """
    try:
        content = Path(path).read_bytes()
    except OSError as e:
        raise AuditLogError(f"cannot read the audit log {path} ({e})") from e
    out = []
    whole = content[: content.rfind(b"\n") + 1]
    for i, line in enumerate(whole.split(b"\n"), start=1):
        if not line:
            continue
        entry = _parse_line(line)
        if entry is None or set(entry) != ENTRY_FIELDS:
            raise AuditLogError(
                f"audit log {path} line {i} is not an audit entry; run `fedcare audit verify "
                f"{path}` to see what is wrong"
            )
        out.append(entry)
    return out
