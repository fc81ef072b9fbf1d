"""Certificates and node keys: checked with ``cryptography``'s own primitives, a real TLS
handshake through Python's ``ssl``, and Flower's own key loaders as the references."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedcare.common.certs import (
    CertPaths,
    describe_certificate,
    fingerprint,
    generate_node_keypair,
    init_certificates,
    load_certificate,
    load_node_private_key,
    load_node_public_key,
    ssh_fingerprint,
    verify_signed_by,
)
from fedcare.common.errors import ConfigError
from fedcare.server.certs_cli import certs_init

HOSTS = ["fl.example.org", "10.1.2.3", "[2001:db8::7]"]


# --------------------------------------------------------------------------------------
# A tiny TLS (or plain) server on 127.0.0.1: answers GET /health with 200
# --------------------------------------------------------------------------------------


class TLSServer:
    """Serve on a free 127.0.0.1 port in a thread; ``context=None`` serves plain TCP.

    Each connection: TLS handshake (if any), then one request read; ``GET /health`` gets
    ``200``, anything else ``400``. Handshake failures are kept in ``errors``.
    """

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context
        self.errors: list[Exception] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @classmethod
    def from_files(cls, cert: Path, key: Path) -> TLSServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return cls(ctx)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(2.0)
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
            request = conn.recv(1024)
            ok = request.startswith(b"GET /health ")
            status = b"200 OK" if ok else b"400 Bad Request"
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        except (OSError, ssl.SSLError) as e:
            self.errors.append(e)
        finally:
            conn.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._handle(conn)

    def __enter__(self) -> TLSServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def handshake(port: int, ca: Path, server_hostname: str) -> str:
    """A verifying TLS client handshake to 127.0.0.1:port; returns the TLS version."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: be ready for it
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=server_hostname) as tls,
    ):
        return str(tls.version())


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certificates(out=tmp_path_factory.mktemp("pki") / "certs", hosts=HOSTS)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return init_certificates(out=tmp_path_factory.mktemp("other"), hosts=["fl.example.org"])


@pytest.fixture(scope="module")
def server(certs: CertPaths) -> Iterator[TLSServer]:
    with TLSServer.from_files(certs.server_cert, certs.server_key) as srv:
        yield srv


def _sans(path: Path) -> tuple[set[str], set[object]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips: set[object] = set(san.get_values_for_type(x509.IPAddress))
    return set(san.get_values_for_type(x509.DNSName)), ips


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------------------
# init_certificates
# --------------------------------------------------------------------------------------


def test_server_certificate_covers_every_host_with_the_right_san_type(certs: CertPaths) -> None:
    dns, ips = _sans(certs.server_cert)
    assert dns == {"fl.example.org", "localhost"}
    assert ips == {
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("2001:db8::7"),
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_loopback_can_be_left_out(tmp_path: Path) -> None:
    paths = init_certificates(out=tmp_path, hosts=["Fl.Example.org."], include_loopback=False)
    assert _sans(paths.server_cert) == ({"fl.example.org"}, set())


def test_ca_and_server_extensions(certs: CertPaths) -> None:
    ca = load_certificate(certs.ca_cert)
    server = load_certificate(certs.server_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.issuer == ca.subject
    sbc = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert sbc.critical and not sbc.value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert server.issuer == ca.subject
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert days == 825


def test_ca_public_key_verifies_the_server_signature(certs: CertPaths, other_ca: CertPaths) -> None:
    ca = load_certificate(certs.ca_cert)
    server = load_certificate(certs.server_cert)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert server.signature_hash_algorithm is not None
    ca_key.verify(  # raises InvalidSignature if wrong
        server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm)
    )
    assert verify_signed_by(server, ca)
    assert not verify_signed_by(server, load_certificate(other_ca.ca_cert))


def test_key_files_are_private_and_match_their_certificates(certs: CertPaths) -> None:
    assert _mode(certs.ca_key) == 0o600 and _mode(certs.server_key) == 0o600
    assert _mode(certs.ca_cert) == 0o644 and _mode(certs.server_cert) == 0o644
    for key_path, cert_path in (
        (certs.ca_key, certs.ca_cert),
        (certs.server_key, certs.server_cert),
    ):
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = load_certificate(cert_path)
        assert key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_modes_do_not_depend_on_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        paths = init_certificates(out=tmp_path / "c", hosts=["a.example"])
    finally:
        os.umask(old)
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644 and _mode(paths.server_cert) == 0o644


def test_private_keys_are_created_0600_never_chmodded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int]] = []
    real_open = os.open

    def spy_open(path: os.PathLike[str] | str, flags: int, mode: int = 0o777) -> int:
        opened.append((os.path.basename(path), mode))
        return real_open(path, flags, mode)

    def no_chmod(*args: object, **kwargs: object) -> None:
        raise AssertionError("a file mode was changed after creation")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    init_certificates(out=tmp_path, hosts=["a.example"])
    generate_node_keypair(out=tmp_path / "keys")
    # temporary names are ".<target>.<random hex>.tmp"
    modes = {name[1:].rsplit(".", 2)[0]: mode for name, mode in opened}
    assert {n: modes[n] for n in ("ca.key", "server.key", "supernode")} == dict.fromkeys(
        ("ca.key", "server.key", "supernode"), 0o600
    )
    assert {"ca.crt", "server.crt", "supernode.pub"} <= set(modes)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = init_certificates(out=tmp_path, hosts=["a.example"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=r"ca\.crt already exists.*--force"):
        init_certificates(out=tmp_path, hosts=["a.example"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    again = init_certificates(out=tmp_path, hosts=["a.example"], force=True)
    assert again == first
    old_ca = x509.load_pem_x509_certificate(before["ca.crt"])
    assert describe_certificate(again.ca_cert).fingerprint != fingerprint(old_ca)


def test_one_existing_file_stops_everything_before_writing(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("keep me")
    with pytest.raises(ConfigError, match=r"server\.key"):
        init_certificates(out=tmp_path, hosts=["a.example"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.key"]
    assert (tmp_path / "server.key").read_text() == "keep me"


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space"):
        init_certificates(out=tmp_path, hosts=["a.example"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ([], "no --host"),
        (["fl.example.org:9092"], "without a port"),
        (["https://fl.example.org"], "without a port or URL prefix"),
        (["bad_host!"], "not a valid DNS name"),
        (["-leading.example"], "not a valid DNS name"),
        ([""], "not a valid DNS name"),
    ],
)
def test_bad_hosts_are_refused_with_the_fix(tmp_path: Path, hosts: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        init_certificates(out=tmp_path, hosts=hosts)
    assert list(tmp_path.iterdir()) == []


def test_days_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--days"):
        init_certificates(out=tmp_path, hosts=["a.example"], days=0)


def test_fingerprint_is_sha256_of_der_as_openssl_prints_it(certs: CertPaths) -> None:
    der = load_certificate(certs.ca_cert).public_bytes(serialization.Encoding.DER)
    reference = hashlib.sha256(der).hexdigest().upper()
    info = describe_certificate(certs.ca_cert)
    assert info.fingerprint.replace(":", "") == reference
    assert len(info.fingerprint.split(":")) == 32
    assert info.is_ca and not describe_certificate(certs.server_cert).is_ca
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(certs.ca_cert)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip().split("=", 1)[1] == info.fingerprint


def test_describe_certificate_and_expiry(tmp_path: Path) -> None:
    start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    paths = init_certificates(out=tmp_path, hosts=["a.example"], days=10, valid_from=start)
    info = describe_certificate(paths.server_cert)
    assert "a.example" in info.sans and "127.0.0.1" in info.sans
    assert info.not_after - info.not_before == dt.timedelta(days=10)
    assert info.expired()
    assert not info.expired(start + dt.timedelta(days=1))


def test_load_certificate_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"ca\.crt: not a PEM certificate"):
        load_certificate(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_certificate(tmp_path / "missing.crt")


# --------------------------------------------------------------------------------------
# A real TLS handshake
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "fl.example.org", "10.1.2.3"])
def test_tls_handshake_verifies_for_every_covered_name(
    certs: CertPaths, server: TLSServer, name: str
) -> None:
    assert handshake(server.port, certs.ca_cert, name).startswith("TLS")


def test_tls_handshake_fails_for_a_name_not_covered(certs: CertPaths, server: TLSServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(server.port, certs.ca_cert, "other.example.org")
    assert info.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH


def test_tls_handshake_fails_with_another_ca(other_ca: CertPaths, server: TLSServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        handshake(server.port, other_ca.ca_cert, "localhost")
    assert info.value.verify_code == 20  # unable to get local issuer certificate


# --------------------------------------------------------------------------------------
# SuperNode authentication keys
# --------------------------------------------------------------------------------------


def test_node_keys_load_as_openssh_ec_nist(tmp_path: Path) -> None:
    paths = generate_node_keypair(out=tmp_path / "keys", name="st-mary")
    assert paths.private_key == tmp_path / "keys" / "st-mary"
    assert paths.public_key == tmp_path / "keys" / "st-mary.pub"
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), None)
    public = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert paths.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert paths.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert _mode(paths.private_key) == 0o600 and _mode(paths.public_key) == 0o644
    assert _mode(tmp_path / "keys") == 0o700
    assert load_node_public_key(paths.public_key).public_numbers() == public.public_numbers()
    assert load_node_private_key(paths.private_key).private_numbers() == (private.private_numbers())


def test_flower_accepts_the_node_keys(tmp_path: Path) -> None:
    """Flower 1.42's own loaders are the reference: `flwr supernode register` and
    `flower-supernode --auth-supernode-private-key`."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    paths = generate_node_keypair(out=tmp_path)
    registered = try_load_public_key(paths.public_key)  # exits the process if refused
    args = argparse.Namespace(
        auth_supernode_private_key=str(paths.private_key), auth_supernode_public_key=None
    )
    keys = _try_setup_client_authentication(args)
    assert keys is not None
    assert public_key_to_bytes(keys[1]) == registered


def test_ssh_fingerprint_matches_the_openssh_definition(tmp_path: Path) -> None:
    paths = generate_node_keypair(out=tmp_path)
    blob = base64.b64decode(paths.public_key.read_text().split()[1])
    reference = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert ssh_fingerprint(load_node_public_key(paths.public_key)) == reference
    if shutil.which("ssh-keygen"):
        out = subprocess.run(
            ["ssh-keygen", "-lf", str(paths.public_key)], capture_output=True, text=True
        ).stdout
        assert reference in out


def test_node_keypair_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    generate_node_keypair(out=tmp_path)
    before = (tmp_path / "supernode").read_bytes()
    with pytest.raises(ConfigError, match=r"supernode already exists.*--force"):
        generate_node_keypair(out=tmp_path)
    assert (tmp_path / "supernode").read_bytes() == before
    generate_node_keypair(out=tmp_path, force=True)
    assert (tmp_path / "supernode").read_bytes() != before
    for name in ("../escape", "a/b", "", ".."):
        with pytest.raises(ConfigError, match="--name"):
            generate_node_keypair(out=tmp_path / "x", name=name)


def _write_ssh_key(path: Path, key: object) -> None:
    assert isinstance(
        key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    )
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )


def test_wrong_key_types_are_refused_with_the_fix(tmp_path: Path) -> None:
    ed = tmp_path / "ed"
    _write_ssh_key(ed, ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ConfigError, match=r"needs an EC key on a NIST curve.*site keygen"):
        load_node_private_key(ed)
    # (OpenSSH encodes EC keys on the NIST curves only, so no other curve can get this far.)
    garbage = tmp_path / "garbage"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match="not an OpenSSH private key"):
        load_node_private_key(garbage)
    pem = tmp_path / "pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match="not an OpenSSH private key"):
        load_node_private_key(pem)
    if shutil.which("ssh-keygen"):  # cryptography needs bcrypt to *write* an encrypted key
        enc = tmp_path / "enc"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "secret", "-f", str(enc)],
            check=True,
        )
        with pytest.raises(ConfigError, match="passphrase"):
            load_node_private_key(enc)


# --------------------------------------------------------------------------------------
# fedcare certs init
# --------------------------------------------------------------------------------------


def test_certs_init_command_prints_paths_sans_and_ca_fingerprint(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(certs_init)
    out = tmp_path / "pki:ab:"  # rich would print ":ab:" as an emoji unless told not to
    result = CliRunner().invoke(
        app, ["--out", str(out), "--host", "fl.example.org", "--host", "10.0.0.5"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    der = load_certificate(out / "ca.crt").public_bytes(serialization.Encoding.DER)
    reference = ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    assert reference in text
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        assert str(out / name) in text
    assert "fl.example.org, 10.0.0.5" in text
    assert "offline" in text
    again = CliRunner().invoke(app, ["--out", str(out), "--host", "fl.example.org"])
    assert isinstance(again.exception, ConfigError) and "--force" in str(again.exception)
