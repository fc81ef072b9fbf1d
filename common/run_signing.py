"""Runs authorised by the coordinating centre's key, checked by every site.

Flower 1.42's Control API has no authentication in open source: whoever reaches the
SuperLink's port can submit a run, and a submitted run reaches every hospital. So a site
trains only for a run that the centre's **run-signing key** (Ed25519, made by ``fedcare certs
init`` beside the CA) signed, and refuses anything else before it touches its data or its
ledger. What is signed is what a hospital agrees to: the run's resolved configuration (its
SHA-256, :func:`fedcare.common.audit.config_hash`, over every run-config key but the signature
itself), shown with the run id, planned rounds, target ε and the app (fedcare, by name).

``fedcare server submit --run-key KEY`` signs (:func:`sign_run`) and sends the signature as
the run-config key ``run-signature``; a site pins the centre's public key in its
``site-config.toml`` (``[superlink] run_signing_key``) and checks it (:func:`verify_run`).

Examples
--------
>>> from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
>>> from fedcare.common.audit import public_key_raw
>>> key = Ed25519PrivateKey.generate()
>>> config = {"run-id": "r1", "num-server-rounds": 3, "target-epsilon": 4.0}
>>> signed = {**config, RUN_SIGNATURE_KEY: sign_run(config, key)}
>>> verify_run(signed, public_key_raw(key), site_id="st-mary")
>>> verify_run({**signed, "target-epsilon": 10.0}, public_key_raw(key), site_id="st-mary")
... # doctest: +ELLIPSIS
Traceback (most recent call last):
...
fedcare.common.errors.PolicyViolation: site st-mary refuses run 'r1': its signature does not match
...
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcare.common.audit import config_hash, public_key_fingerprint, public_key_raw
from fedcare.common.errors import PolicyViolation

__all__ = [
    "RUN_SIGNATURE_KEY",
    "RUN_KEY_NAME",
    "RUN_PUBLIC_KEY_NAME",
    "run_statement",
    "sign_run",
    "verify_run",
    "write_public_key",
]

RUN_SIGNATURE_KEY = "run-signature"
"""The run-config key that carries the centre's signature (base64)."""
RUN_KEY_NAME = "run-signing.key"
"""The centre's private run-signing key, in the certificates folder (mode 0600)."""
RUN_PUBLIC_KEY_NAME = "run-signing.pub"
"""Its public half (base64 of the raw 32 bytes, mode 0644): give a copy to every site."""

_DOMAIN = "fedcare-run-v1"


def _signed_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in run_config.items() if str(k) != RUN_SIGNATURE_KEY}


def run_statement(run_config: Mapping[str, Any]) -> bytes:
    """The bytes the centre signs for ``run_config`` (its signature key excluded)."""
    config = _signed_config(run_config)
    statement = {
        "domain": _DOMAIN,
        "app": "fedcare",
        "config_sha256": config_hash(config),
        "run_id": config.get("run-id"),
        "rounds": config.get("num-server-rounds"),
        "target_epsilon": config.get("target-epsilon"),
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()


def sign_run(run_config: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """The base64 signature of ``run_config`` by the centre's run-signing ``key``."""
    return base64.b64encode(key.sign(run_statement(run_config))).decode("ascii")


def verify_run(run_config: Mapping[str, Any], public_key: bytes, *, site_id: str) -> None:
    """Refuse a run the centre's key (``public_key``, raw 32 bytes) did not sign.

    Raises
    ------
    PolicyViolation
        The run carries no signature, a malformed one, or one that the pinned key did not
        make over exactly this configuration; the message names the site, the run and the
        pinned key's fingerprint.
    """
    run_id = run_config.get("run-id", "")
    pinned = public_key_fingerprint(public_key)[:16]
    signature = run_config.get(RUN_SIGNATURE_KEY, "")
    if not isinstance(signature, str) or not signature:
        raise PolicyViolation(
            f"site {site_id} refuses run {run_id!r}: it is not signed; this site trains only "
            f"for runs signed by the centre's run-signing key {pinned}... (submit it with "
            "`fedcare server submit --run-key`)"
        )
    try:
        raw = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw, run_statement(run_config))
    except (InvalidSignature, ValueError, binascii.Error):
        raise PolicyViolation(
            f"site {site_id} refuses run {run_id!r}: its signature does not match this "
            f"configuration under the pinned run-signing key {pinned}...; it was changed "
            "after signing or signed by another key"
        ) from None


def write_public_key(key: Ed25519PrivateKey, path: Path) -> Path:
    """Write the public half of ``key`` to ``path`` (base64 of the raw bytes, mode 0644)."""
    path.write_text(base64.b64encode(public_key_raw(key)).decode("ascii") + "\n")
    path.chmod(0o644)
    return path
