"""Certificates and keys of a real deployment: the federation's CA, the SuperLink's TLS
certificate, and each SuperNode's authentication key pair.

Everything is made with the ``cryptography`` package, in the formats Flower 1.42 reads:

* :func:`init_certificates` (coordinating centre) writes a self-signed CA (``ca.crt``,
  ``ca.key``) and a SuperLink certificate signed by it (``server.crt``, ``server.key``) whose
  subject alternative names cover every host name or IP address the sites dial. These are
  the ``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` files; each site
  gets ``ca.crt`` (its ``--root-certificates``) and nothing else.
* :func:`generate_node_keypair` (each site) writes an EC P-384 key pair in OpenSSH format:
  the private key is ``flower-supernode --auth-supernode-private-key`` (loaded with
  ``load_ssh_private_key``), the ``.pub`` file is what the coordinating centre registers with
  ``flwr supernode register`` (loaded with ``load_ssh_public_key``; Flower requires an EC key
  on a NIST curve).

Private keys are created with mode 0600 (``os.open(..., 0o600)``: never readable by others,
not even for an instant) and public files with 0644. Nothing is half-written: every file is
first written under a temporary name in the same folder, then renamed into place; existing
files are never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcare.common.errors import ConfigError
from fedcare.common.files import PRIVATE_FILE_MODE, private_dir, write_atomic_files

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "LOOPBACK_HOSTS",
    "NIST_CURVES",
    "CertPaths",
    "NodeKeyPaths",
    "CertificateInfo",
    "init_certificates",
    "generate_node_keypair",
    "fingerprint",
    "ssh_fingerprint",
    "load_certificate",
    "describe_certificate",
    "verify_signed_by",
    "load_node_private_key",
    "load_node_public_key",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"

#: Added to the SuperLink certificate by default: a SuperLink bound to 0.0.0.0 (or ::)
#: starts its SuperExec against 127.0.0.1 (or ::1) with the same certificate, so the
#: loopback addresses must verify too (flwr.supercore.address.resolve_bind_address).
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

#: The curves ``flwr supernode register`` accepts (flwr.supercore.primitives.asymmetric).
NIST_CURVES: tuple[type[ec.EllipticCurve], ...] = (
    ec.SECP192R1,
    ec.SECP224R1,
    ec.SECP256R1,
    ec.SECP384R1,
    ec.SECP521R1,
)

_CURVE = ec.SECP384R1
_PRIVATE_MODE = PRIVATE_FILE_MODE
_PUBLIC_MODE = 0o644
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`init_certificates` wrote the CA and the SuperLink certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where :func:`generate_node_keypair` wrote a SuperNode's key pair."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertificateInfo:
    """What a person checks about a certificate (see :func:`describe_certificate`).

    Attributes
    ----------
    subject, issuer:
        RFC 4514 strings (``CN=...``).
    sans:
        Subject alternative names: DNS names and IP addresses, as text.
    not_before, not_after:
        Validity window, timezone-aware UTC.
    fingerprint:
        SHA-256 of the DER certificate, as ``AB:CD:...`` (what
        ``openssl x509 -noout -fingerprint -sha256`` prints).
    is_ca:
        Whether BasicConstraints says ``ca=True``.
    """

    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    is_ca: bool

    def expired(self, now: dt.datetime | None = None) -> bool:
        """True when ``now`` (default: the current time) lies outside the validity window."""
        now = now or dt.datetime.now(dt.timezone.utc)
        return not (self.not_before <= now <= self.not_after)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def fingerprint(obj: x509.Certificate | ec.EllipticCurvePublicKey | bytes) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex.

    Parameters
    ----------
    obj:
        A certificate (hash of its DER encoding, the same value ``openssl x509 -noout
        -fingerprint -sha256`` prints), a public key (hash of its DER SubjectPublicKeyInfo),
        or raw bytes.

    Examples
    --------
    >>> fingerprint(b"")[:11]
    'E3:B0:C4:42'
    """
    if isinstance(obj, x509.Certificate):
        data = obj.public_bytes(serialization.Encoding.DER)
    elif isinstance(obj, bytes):
        data = obj
    else:
        data = obj.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return _colon_hex(hashlib.sha256(data).digest())


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH fingerprint of a key, ``SHA256:<base64>`` (what ``ssh-keygen -lf`` prints)."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _general_name(host: str) -> x509.GeneralName:
    """An IPAddress SAN for an IP address, a DNSName SAN for a host name."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if ":" in name or "/" in name:
        raise ConfigError(
            f"--host {host!r} is not a host name or IP address; give the name alone, "
            "without a port or URL prefix (e.g. --host fl.example-hospital.org)"
        )
    labels = name.split(".")
    if labels and labels[0] == "*":  # a wildcard is allowed as the left-most label only
        labels = labels[1:]
    if not name or len(name) > 253 or not labels or not all(map(_DNS_LABEL.match, labels)):
        raise ConfigError(
            f"--host {host!r} is not a valid DNS name or IP address; use letters, digits, "
            "hyphens and dots (an internationalised name in its xn-- form)"
        )
    return x509.DNSName(name)


def _san_text(name: x509.GeneralName) -> str:
    return str(name.value)


def _check_targets(paths: Sequence[Path], *, force: bool) -> None:
    """Refuse before writing anything if a target exists (or is not a regular file)."""
    for path in paths:
        if path.exists() or path.is_symlink():
            if not force:
                raise ConfigError(
                    f"{path} already exists; refusing to overwrite it. Pass --force to "
                    "replace it, or choose another output folder"
                )
            if path.is_dir():
                raise ConfigError(f"{path} is a folder; remove it or choose another output folder")


def _write_all(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every ``(path, data, mode)``, all or none
    (:func:`fedcare.common.files.write_atomic_files`).

    A private key is created 0600 and never readable by others; if any write fails, no
    target is touched and nothing is left behind.
    """
    try:
        write_atomic_files(files)
    except PermissionError as e:
        folder = files[0][0].parent if files else Path(".")
        raise ConfigError(
            f"cannot write into {folder} ({e.strerror}); choose a folder you can write"
        ) from e


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; --out must be a folder")
    try:
        private_dir(out, tighten=False)
    except OSError as e:
        raise ConfigError(f"cannot create {out} ({e}); choose a folder you can write") from e


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the ``allowed`` bits set."""
    bits = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    bits.update(allowed)
    return x509.KeyUsage(**bits)


def _ski(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


# --------------------------------------------------------------------------------------
# CA and SuperLink certificate
# --------------------------------------------------------------------------------------


def init_certificates(
    *,
    out: Path,
    hosts: Sequence[str],
    days: int = 825,
    force: bool = False,
    include_loopback: bool = True,
    valid_from: dt.datetime | None = None,
) -> CertPaths:
    """Create the federation's CA and the SuperLink's TLS certificate, signed by it.

    Parameters
    ----------
    out:
        Folder to write ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` into
        (created with mode 0700 if absent).
    hosts:
        Every name or IP address sites use to reach the SuperLink; each becomes a subject
        alternative name (IP addresses as IPAddress, names as DNSName). The first one is
        also the certificate's common name.
    days:
        Validity of both certificates, from ``valid_from``.
    force:
        Replace existing files (every certificate the old CA signed stops verifying).
    include_loopback:
        Also cover ``localhost``, ``127.0.0.1`` and ``::1`` (:data:`LOOPBACK_HOSTS`): the
        SuperLink's own SuperExec connects through the loopback address.
    valid_from:
        Start of validity (default: now, UTC). For tests of expired certificates.

    Returns
    -------
    CertPaths
        The four files written.

    Raises
    ------
    ConfigError
        No host, a malformed host, ``days < 1``, or an existing file without ``force``.
    """
    if not hosts:
        raise ConfigError(
            "no --host given; name every host name or IP address sites use to reach the "
            "SuperLink (e.g. --host fl.example-hospital.org --host 10.0.0.5)"
        )
    if days < 1:
        raise ConfigError(f"--days must be at least 1 (got {days})")
    names: list[x509.GeneralName] = []
    for host in [*hosts, *(LOOPBACK_HOSTS if include_loopback else ())]:
        name = _general_name(host)
        if name not in names:
            names.append(name)
    out = Path(out)
    paths = CertPaths(
        ca_cert=out / CA_CERT,
        ca_key=out / CA_KEY,
        server_cert=out / SERVER_CERT,
        server_key=out / SERVER_KEY,
    )
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    _make_folder(out)
    _check_targets(targets, force=force)

    start = (valid_from or dt.datetime.now(dt.timezone.utc)).astimezone(dt.timezone.utc)
    start = start - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    end = start + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(_CURVE())
    server_key = ec.generate_private_key(_CURVE())
    first = _san_text(names[0])[:64]
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"fedcare CA {first}"[:64]),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(_ski(ca_key), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcare federation"),
                    x509.NameAttribute(NameOID.COMMON_NAME, first),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(_ski(server_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    _write_all(
        [
            (paths.ca_key, _private_pem(ca_key), _PRIVATE_MODE),
            (paths.server_key, _private_pem(server_key), _PRIVATE_MODE),
            (paths.ca_cert, ca_cert.public_bytes(pem), _PUBLIC_MODE),
            (paths.server_cert, server_cert.public_bytes(pem), _PUBLIC_MODE),
        ]
    )
    return paths


# --------------------------------------------------------------------------------------
# SuperNode authentication keys
# --------------------------------------------------------------------------------------


def generate_node_keypair(
    *, out: Path, name: str = "supernode", force: bool = False
) -> NodeKeyPaths:
    """Create a SuperNode's authentication key pair (EC P-384, OpenSSH format).

    Parameters
    ----------
    out:
        Folder for ``<name>`` (private key, mode 0600) and ``<name>.pub`` (public key,
        mode 0644); created with mode 0700 if absent.
    name:
        File name of the private key (letters, digits, ``_``, ``.``, ``-``).
    force:
        Replace existing files (the old public key's registration then stops working).

    Returns
    -------
    NodeKeyPaths
        The two files written.

    Raises
    ------
    ConfigError
        A bad name, or an existing file without ``force``.
    """
    if not _KEY_NAME.match(name) or name in {".", ".."}:
        raise ConfigError(
            f"--name {name!r} is not a plain file name; use letters, digits, '_', '.' or '-'"
        )
    out = Path(out)
    paths = NodeKeyPaths(private_key=out / name, public_key=out / f"{name}.pub")
    _make_folder(out)
    _check_targets([paths.private_key, paths.public_key], force=force)
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_all(
        [
            (paths.private_key, private, _PRIVATE_MODE),
            (paths.public_key, public + f" fedcare-{name}\n".encode(), _PUBLIC_MODE),
        ]
    )
    return paths


def _not_ec(key: object, path: Path, what: str) -> ConfigError:
    kind = type(key).__name__.lstrip("_")
    return ConfigError(
        f"{path}: the {what} is a {kind}, but Flower needs an EC key on a NIST curve; make "
        "one with `fedcare site keygen`"
    )


def _check_curve(curve: ec.EllipticCurve, path: Path, what: str) -> None:
    if not isinstance(curve, NIST_CURVES):
        raise ConfigError(
            f"{path}: the {what} uses curve {curve.name}, which Flower does not accept "
            "(NIST P-256/P-384/P-521 only); make one with `fedcare site keygen`"
        )


def load_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Load a SuperNode's private key as ``flower-supernode`` does (OpenSSH, EC NIST).

    Raises
    ------
    ConfigError
        Missing, unreadable, encrypted, not OpenSSH, or not an EC NIST key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the SuperNode private key ({e.strerror}); check the path "
            "(`fedcare site keygen` writes one)"
        ) from e
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except TypeError as e:  # encrypted
        raise ConfigError(
            f"{path}: the private key is passphrase-protected, which flower-supernode cannot "
            "read; make an unencrypted one with `fedcare site keygen`"
        ) from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{path}: not an OpenSSH private key ({e}); make one with `fedcare site keygen`"
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise _not_ec(key, path, "private key")
    _check_curve(key.curve, path, "private key")
    return key


def load_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a SuperNode's public key as ``flwr supernode register`` does (OpenSSH, EC NIST)."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the public key ({e.strerror})") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(
            f"{path}: not an OpenSSH public key ({e}); use the .pub file `fedcare site keygen` "
            "wrote"
        ) from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _not_ec(key, path, "public key")
    _check_curve(key.curve, path, "public key")
    return key


# --------------------------------------------------------------------------------------
# Reading certificates
# --------------------------------------------------------------------------------------


def load_certificate(path: Path) -> x509.Certificate:
    """The first PEM certificate in ``path``.

    Raises
    ------
    ConfigError
        Missing, unreadable or not a PEM certificate.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the certificate ({e.strerror}); check the path"
        ) from e
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise ConfigError(
            f"{path}: not a PEM certificate ({e}); use the ca.crt `fedcare certs init` wrote"
        ) from e


def describe_certificate(path: Path) -> CertificateInfo:
    """Subject, issuer, SANs, validity and fingerprint of the certificate in ``path``."""
    cert = load_certificate(path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(_san_text(n) for n in san)
    except x509.ExtensionNotFound:
        sans = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertificateInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        sans=sans,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        fingerprint=fingerprint(cert),
        is_ca=is_ca,
    )


def verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer`` names and signed ``cert`` (signature check only, no dates)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
