"""The SuperExec shared secret of fedcare's own executors (the centre's ServerApp executor,
each site's worker): written, read, and used to take tasks, in one place.

Flower hands a task (and its token) only to a caller whose ``AcquireTask`` request is signed
with the secret the SuperLink or SuperNode was started with (``--superexec-auth-secret-file``,
honoured in ``--isolation process`` only). ``fedcare server start`` and ``fedcare site start``
write a fresh one at every start (:func:`write_secret`); only the service's user can read it.

The same executors, and the site's SuperNode, move a message as one HTTP request per object
(:func:`concurrent_object_transfers` lets them send all of a message's objects at once).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from fedcare.common.errors import ConfigError
from fedcare.common.files import write_private_atomic

__all__ = [
    "ACQUIRE_TASK",
    "OBJECT_TRANSFERS",
    "concurrent_object_transfers",
    "write_secret",
    "read_secret",
    "task_acquirer",
]

ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
"""The one Runtime API method Flower protects with the shared secret."""

OBJECT_TRANSFERS = 8
"""Objects of one message a fedcare process moves at once (pass it as Flower's
``max_concurrent_pulls``/``max_concurrent_pushes``). A fedcare message has 6 to 9 objects
(message, record dict, records, one packed array and its chunk): 8 moves a message in
about one request's time."""


def _as_asked(max_concurrent: int) -> int:
    """Flower's ``get_num_workers`` without its cap at the machine's core count."""
    return max(1, int(max_concurrent))


def concurrent_object_transfers() -> None:
    """Let Flower move as many of a message's objects at once as its caller asks.

    Flower runs ``min(asked, os.cpu_count())`` object transfers at once
    (``inflatable_utils.get_num_workers``): 2 on a 2-core machine, so a message of 9 objects
    costs 5 request round trips one after the other. A transfer is a wait on the network,
    not a computation; each thread holds one request. Changes this process's Flower only;
    idempotent. Refuses a Flower that no longer sizes its transfer pools there (the cap
    would silently stay).
    """
    current = getattr(inflatable_utils, "get_num_workers", None)
    if current is _as_asked:
        return
    if current is None or current.__module__ != inflatable_utils.__name__:
        raise RuntimeError(
            "flwr.supercore.inflatable.inflatable_utils no longer sizes its object transfers "
            "with get_num_workers; fedcare's transfer settings need updating"
        )
    inflatable_utils.get_num_workers = _as_asked  # type: ignore[assignment]


def write_secret(path: Path) -> Path:
    """A fresh secret (32 random bytes as 64 hex characters) at ``path``, mode 0600.

    Raises
    ------
    OSError
        If the file cannot be written (the caller names the setting to fix).
    """
    return write_private_atomic(path, secrets.token_hex(32).encode("ascii"))


def read_secret(path: Path, *, fix: str) -> bytes:
    """The secret at ``path``, read as Flower reads it; ``fix`` says how to make one.

    Raises
    ------
    ConfigError
        The file is missing, unreadable or empty.
    """
    try:
        secret = load_superexec_auth_secret(str(path))
    except ValueError as e:
        raise ConfigError(f"{path}: cannot read the SuperExec secret ({e}); {fix}") from e
    if not secret:
        raise ConfigError(f"{path}: the SuperExec secret is empty; {fix}")
    return secret


def task_acquirer(
    address: str, secret: bytes, *, root_certificates: Path | None = None
) -> RuntimeHttpClient:
    """A Runtime API client whose ``AcquireTask`` requests carry the secret's signature
    (plain HTTP on loopback unless ``root_certificates`` is given)."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else str(root_certificates),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=secret, protected_methods=frozenset({ACQUIRE_TASK})
            ),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
