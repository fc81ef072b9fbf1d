"""The SuperExec shared secret of fedcare's own executors (the centre's ServerApp executor,
each site's worker): written, read, and used to take tasks, in one place.

Flower hands a task (and its token) only to a caller whose ``AcquireTask`` request is signed
with the secret the SuperLink or SuperNode was started with (``--superexec-auth-secret-file``,
honoured in ``--isolation process`` only). ``fedcare server start`` and ``fedcare site start``
write a fresh one at every start (:func:`write_secret`); only the service's user can read it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from flwr.supercore.auth.superexec_secret import load_superexec_auth_secret
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from fedcare.common.errors import ConfigError
from fedcare.common.files import write_private_atomic

__all__ = ["ACQUIRE_TASK", "write_secret", "read_secret", "task_acquirer"]

ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"
"""The one Runtime API method Flower protects with the shared secret."""


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
