"""Probing the SuperLink connection as the SuperNode will make it, and explaining failures.

:func:`probe_superlink` opens a real connection to the configured ``superlink.address``:
with TLS, a handshake with the configured CA (or the system trust store) and hostname
verification; then ``GET /health``. Every failure becomes one
:class:`~fedcare.client.site_checks.Check` that says what went wrong (refused, unresolved,
dropped by a firewall, not TLS, wrong CA, hostname mismatch, expired certificate) and how
to fix it. To explain a failed verification it fetches the server's certificate a second
time, unverified, only to describe it.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from collections.abc import Callable

from cryptography import x509

from fedcare.client.site_checks import Check
from fedcare.client.site_config import SuperLinkSection, split_address

__all__ = ["probe_superlink"]

_EXPIRY_WARNING_DAYS = 30


def _peer_certificate(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The server's certificate, fetched without verification (to explain a failure)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except OSError:
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _covered(cert: x509.Certificate | None) -> str:
    if cert is None:
        return "unknown"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no subject alternative name"
    return ", ".join(str(n.value) for n in san) or "nothing"


_Explain = Callable[[str, str, "x509.Certificate | None", SuperLinkSection], tuple[str, str]]


def _wrong_ca(
    host: str, reason: str, cert: x509.Certificate | None, link: SuperLinkSection
) -> tuple[str, str]:
    ca = link.root_certificates or "the system trust store"
    issuer = cert.issuer.rfc4514_string() if cert is not None else "an unknown issuer"
    return (
        f"certificate verify failed: the SuperLink's certificate (issued by {issuer}) is not "
        f"signed by the CA in {ca} ({reason})",
        "wrong CA, or the SuperLink's certificate was not signed by it: get the current "
        "ca.crt from the coordinating centre and compare its fingerprint, or have them "
        "start the SuperLink with the server.crt `fedcare certs init` made with this CA",
    )


def _hostname(
    host: str, reason: str, cert: x509.Certificate | None, link: SuperLinkSection
) -> tuple[str, str]:
    return (
        f"hostname mismatch: the SuperLink's certificate does not cover {host!r} "
        f"(it covers: {_covered(cert)})",
        f"connect with a name the certificate covers (superlink.address), or have the "
        f"coordinating centre regenerate it: `fedcare certs init --host {host} ... --force`",
    )


def _expired(
    host: str, reason: str, cert: x509.Certificate | None, link: SuperLinkSection
) -> tuple[str, str]:
    window = (
        f" (valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        if cert is not None
        else ""
    )
    return (
        f"the SuperLink's certificate is expired or not yet valid{window}: {reason}",
        "have the coordinating centre renew it (`fedcare certs init ... --force`), and check "
        "that this machine's clock is right",
    )


#: OpenSSL X509_V_ERR_* codes to an explanation (message, fix).
_VERIFY_ERRORS: dict[int, _Explain] = {
    9: _expired,  # CERT_NOT_YET_VALID
    10: _expired,  # CERT_HAS_EXPIRED
    62: _hostname,  # HOSTNAME_MISMATCH
    64: _hostname,  # IP_ADDRESS_MISMATCH
    2: _wrong_ca,  # UNABLE_TO_GET_ISSUER_CERT
    7: _wrong_ca,  # CERT_SIGNATURE_FAILURE
    18: _wrong_ca,  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: _wrong_ca,  # SELF_SIGNED_CERT_IN_CHAIN
    20: _wrong_ca,  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: _wrong_ca,  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
}


def _health(sock: socket.socket, host: str, name: str) -> Check:
    """``GET /health`` on an open connection: a SuperLink answers 200."""
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    try:
        sock.sendall(request.encode("ascii"))
        head = sock.recv(1024).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as e:
        return Check(
            f"{name} health",
            "warning",
            f"no answer to GET /health ({e})",
            "check that this address is a Flower SuperLink (flower-superlink 1.42)",
        )
    parts = head.split()
    if len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1] == "200":
        return Check(f"{name} health", "ok", "the SuperLink answered GET /health with 200")
    return Check(
        f"{name} health",
        "warning",
        f"GET /health answered {head!r}, not 200",
        "check that this address is a Flower SuperLink (flower-superlink 1.42)",
    )


def _connect(link: SuperLinkSection, timeout: float) -> socket.socket | Check:
    host, port = split_address(link.address)
    name = "superlink"
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return Check(
            name,
            "error",
            f"connection to {link.address} refused",
            f"is the SuperLink running and listening on port {port} (flower-superlink --port "
            f"{port})? is a firewall on {host} rejecting it?",
        )
    except socket.gaierror as e:
        return Check(
            name,
            "error",
            f"cannot resolve {host!r} ({e.strerror})",
            "check the host name in superlink.address and this machine's DNS",
        )
    except TimeoutError:
        return Check(
            name,
            "error",
            f"no answer from {link.address} within {timeout:g} s",
            "a firewall probably drops the traffic, or the address is wrong; ask the "
            "coordinating centre which port is open to this site",
        )
    except OSError as e:
        return Check(
            name,
            "error",
            f"cannot connect to {link.address} ({e.strerror or e})",
            "check superlink.address and the network route to it",
        )


def probe_superlink(link: SuperLinkSection, *, timeout: float = 5.0) -> list[Check]:
    """Connect to the SuperLink as the SuperNode will, and explain any failure.

    With TLS (``insecure = false``): a TLS handshake with the configured CA (or the system
    trust store) and hostname verification, then ``GET /health``. With ``insecure``: a
    plain TCP connection and ``GET /health``.

    Parameters
    ----------
    link:
        The ``[superlink]`` section.
    timeout:
        Seconds allowed for the connection, the handshake and the answer.
    """
    host, port = split_address(link.address)
    name = "superlink"
    conn = _connect(link, timeout)
    if isinstance(conn, Check):
        return [conn]
    if link.insecure:
        with conn:
            return [
                Check(name, "ok", f"TCP connection to {link.address} (plain text, no TLS)"),
                _health(conn, host, name),
            ]
    try:
        ctx = ssl.create_default_context(
            cafile=str(link.root_certificates) if link.root_certificates else None
        )
    except (ssl.SSLError, OSError) as e:
        conn.close()
        return [
            Check(
                name,
                "error",
                f"cannot load the CA certificate {link.root_certificates} ({e})",
                "use the ca.crt `fedcare certs init` wrote",
            )
        ]
    try:
        tls = ctx.wrap_socket(conn, server_hostname=host)
    except ssl.SSLCertVerificationError as e:
        conn.close()
        explain = _VERIFY_ERRORS.get(e.verify_code)
        reason = e.verify_message or str(e)
        if explain is None:
            return [
                Check(
                    name,
                    "error",
                    f"certificate verify failed: {reason}",
                    "check root_certificates and the SuperLink's certificate",
                )
            ]
        message, fix = explain(host, reason, _peer_certificate(host, port, timeout), link)
        return [Check(name, "error", message, fix)]
    except ssl.SSLError as e:
        conn.close()
        if e.reason in {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}:
            return [
                Check(
                    name,
                    "error",
                    f"{link.address} does not speak TLS ({e.reason}): the SuperLink runs "
                    "with --insecure, or this is not the SuperLink's port",
                    "have the coordinating centre start the SuperLink with its certificates "
                    "(--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile); set insecure = true "
                    "only for a local test",
                )
            ]
        return [
            Check(
                name,
                "error",
                f"TLS handshake with {link.address} failed ({e.reason or e})",
                "check that this is the SuperLink's address and that it runs with TLS",
            )
        ]
    except TimeoutError:
        conn.close()
        return [
            Check(
                name,
                "error",
                f"{link.address} accepted the connection but did not complete a TLS "
                f"handshake within {timeout:g} s",
                "check that this is the SuperLink's port (a TLS server answers at once)",
            )
        ]
    except OSError as e:
        conn.close()
        return [
            Check(
                name,
                "error",
                f"{link.address} closed the connection during the TLS handshake ({e})",
                "check that this is the SuperLink's port and that it runs with TLS",
            )
        ]
    with tls:
        checks = [
            Check(
                name,
                "ok",
                f"TLS ({tls.version()}) to {link.address}: certificate verified for {host!r}",
            )
        ]
        der = tls.getpeercert(binary_form=True)
        if der:
            cert = x509.load_der_x509_certificate(der)
            left = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
            if left < dt.timedelta(days=_EXPIRY_WARNING_DAYS):
                checks.append(
                    Check(
                        f"{name} certificate",
                        "warning",
                        f"the SuperLink's certificate expires on "
                        f"{cert.not_valid_after_utc:%Y-%m-%d} ({left.days} days)",
                        "ask the coordinating centre to renew it before then",
                    )
                )
        checks.append(_health(tls, host, name))
        return checks
