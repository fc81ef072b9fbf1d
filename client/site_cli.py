"""``fedcare site keygen`` and ``fedcare site check``: a hospital's deployment commands.

Plain typer-annotated functions; :mod:`fedcare.cli` mounts them. A
:class:`~fedcare.common.errors.FedcareError` raised here becomes one line and exit code 2 there.

``site check`` runs every check it can and reports them all in one table (ok / warning /
error, each error with its fix): the config file, the files it names, the site's data
(the same validation as ``fedcare data check``), the policy against the data, and a real
TLS connection to the SuperLink with the configured CA and hostname verification.
:func:`run_site_checks` returns the same checks as data, for tests and other commands.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import typer
from cryptography import x509
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedcare.client.data.validation import ValidationReport, validate_site
from fedcare.client.site_config import (
    SiteConfig,
    SuperLinkSection,
    load_site_config,
    split_address,
)
from fedcare.common.audit import public_key_fingerprint
from fedcare.common.certs import (
    describe_certificate,
    generate_node_keypair,
    load_node_private_key,
    ssh_fingerprint,
)
from fedcare.common.errors import ConfigError
from fedcare.common.spec import SPEC_FILENAME

__all__ = [
    "Status",
    "Check",
    "run_site_checks",
    "probe_superlink",
    "site_keygen",
    "site_check",
]

Status = Literal["ok", "warning", "error", "skipped"]
_EXPIRY_WARNING_DAYS = 30
#: The order of the file checks in the report (the config file's order).
_FILE_ORDER: tuple[str, ...] = (
    "data",
    "state_dir",
    "ledger",
    "superlink.root_certificates",
    "superlink.auth_private_key",
    "superlink.insecure",
)
_STYLE: dict[str, str] = {"ok": "green", "warning": "yellow", "error": "red", "skipped": "dim"}


@dataclass(frozen=True)
class Check:
    """One line of ``fedcare site check``.

    Attributes
    ----------
    name:
        What was checked (a config field, ``data``, ``superlink``...).
    status:
        ``ok``, ``warning``, ``error`` or ``skipped``.
    detail:
        What was found.
    fix:
        How to fix it (empty when there is nothing to fix).
    """

    name: str
    status: Status
    detail: str
    fix: str = ""


# --------------------------------------------------------------------------------------
# fedcare site keygen
# --------------------------------------------------------------------------------------


def site_keygen(
    out: Path = typer.Option(  # noqa: B008 - typer's declaration style
        ..., "--out", help="Folder for the key pair (created with mode 0700)."
    ),
    name: str = typer.Option("supernode", "--name", help="File name of the private key."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing key pair."),
) -> None:
    """Create this site's SuperNode authentication key pair (EC P-384, OpenSSH format).

    The private key stays on this machine; the .pub file goes to the coordinating centre,
    which registers it with ``flwr supernode register``.

    Raises
    ------
    ConfigError
        A bad name, or an existing key without --force.
    """
    paths = generate_node_keypair(out=out, name=name, force=force)
    public = load_node_private_key(paths.private_key).public_key()
    private_abs = paths.private_key.resolve()
    console = Console(highlight=False, soft_wrap=True, emoji=False)

    def say(text: str = "", style: str | None = None) -> None:
        console.print(text, style=style, markup=False, emoji=False)

    say(f"wrote {paths.private_key}      private key (mode 0600): never leaves this machine")
    say(f"wrote {paths.public_key}  public key: send it to the coordinating centre")
    say(f"key fingerprint: {ssh_fingerprint(public)}")
    say()
    say("The coordinating centre registers it (after comparing the fingerprint with you):")
    say(f"  flwr supernode register {paths.public_key.name} <superlink-connection> --name {name}")
    say("where <superlink-connection> names their SuperLink connection in $FLWR_HOME/config.toml.")
    say()
    say("Then point this site's site-config.toml at the private key:")
    say("  [superlink]")
    say(f'  auth_private_key = "{private_abs}"')
    say("and check everything with: fedcare site check site-config.toml")


# --------------------------------------------------------------------------------------
# Local checks
# --------------------------------------------------------------------------------------


def _file_checks(config: SiteConfig) -> list[Check]:
    """:meth:`SiteConfig.check_files`, plus an ok line (with what matters) per clean field."""
    problems = config.check_files()
    checks = [Check(p.field, p.severity, p.message, p.fix) for p in problems]
    flagged = {p.field for p in problems if p.severity == "error"}
    link = config.superlink
    ok: list[tuple[str, Callable[[], str]]] = [
        ("data", lambda: f"{config.data} holds a {SPEC_FILENAME}"),
        ("state_dir", lambda: f"{config.state_dir} is writable"),
    ]
    if config.ledger is not None:
        ok.append(("ledger", lambda: f"{config.ledger} can be written"))
    ca_path, key_path = link.root_certificates, link.auth_private_key
    if ca_path is not None:

        def ca_detail() -> str:
            info = describe_certificate(ca_path)
            return (
                f"{info.subject}, valid until {info.not_after:%Y-%m-%d}; SHA-256 fingerprint "
                f"{info.fingerprint} (compare it with the one the coordinating centre announced)"
            )

        ok.append(("superlink.root_certificates", ca_detail))
    if key_path is not None:

        def key_detail() -> str:
            key = load_node_private_key(key_path)
            return (
                f"EC {key.curve.name} key, mode 0600; fingerprint "
                f"{ssh_fingerprint(key.public_key())}"
            )

        ok.append(("superlink.auth_private_key", key_detail))
    ok.append(
        (
            "superlink.run_signing_key",
            lambda: (
                "runs must be signed by the centre's key "
                f"{public_key_fingerprint(config.run_public_key())[:16]}..."
            ),
        )
    )
    for field, detail in ok:
        if field not in flagged and not any(c.name == field for c in checks):
            checks.append(Check(field, "ok", detail()))
    if link.insecure:
        checks.append(
            Check(
                "superlink.insecure",
                "warning",
                "TLS is OFF: model updates cross the network unencrypted and the SuperLink "
                "is not authenticated",
                "use insecure = true only for local tests; set insecure = false and "
                "root_certificates for a real deployment",
            )
        )
    elif link.root_certificates is None:
        checks.append(
            Check(
                "superlink.root_certificates",
                "ok",
                "not set: the system's trust store verifies the SuperLink's certificate",
                "",
            )
        )
    if link.auth_private_key is None:
        checks.append(
            Check(
                "superlink.auth_private_key",
                "warning",
                "no node-authentication key: a SuperLink started with "
                "--enable-supernode-auth refuses this site",
                "run `fedcare site keygen --out keys`, have the coordinating centre register "
                "keys/supernode.pub, and set auth_private_key",
            )
        )
    rank = {name: i for i, name in enumerate(_FILE_ORDER)}
    return sorted(checks, key=lambda c: rank.get(c.name, len(rank)))


def _data_checks(config: SiteConfig) -> tuple[list[Check], ValidationReport | None]:
    if not (config.data / SPEC_FILENAME).is_file():
        return [Check("data.validation", "skipped", f"no {SPEC_FILENAME} to validate")], None
    with warnings.catch_warnings():
        # pydicom warns while parsing a corrupt file; the report already names that file.
        warnings.filterwarnings("ignore", module="pydicom")
        report = validate_site(config.data)
    checks = []
    for p in report.problems:
        where = ":".join(x for x in (p.file, p.column or "") if x)
        row = f" (row {p.row})" if p.row is not None else ""
        checks.append(Check(f"data: {where}", p.severity, f"{p.message}{row}", p.fix))
    if report.ok:
        s = report.summary
        held = ", ".join(f"{m} {n}" for m, n in s.modalities.items())
        checks.append(
            Check(
                "data.validation",
                "ok",
                f"{s.patients} patients ({held}); {len(report.warnings)} warning(s)",
            )
        )
    else:
        checks.append(
            Check(
                "data.validation",
                "error",
                f"{len(report.errors)} error(s) in {config.data}",
                f"fix them (details: fedcare data check {config.data})",
            )
        )
    if report.spec is not None:
        if report.spec.site_id != config.site_id:
            checks.append(
                Check(
                    "site_id",
                    "error",
                    f"site-config says {config.site_id!r} but {config.data / SPEC_FILENAME} "
                    f"says {report.spec.site_id!r}",
                    "make them the same (the site id names the site in the federation)",
                )
            )
        else:
            checks.append(Check("site_id", "ok", f"{config.site_id!r} matches {SPEC_FILENAME}"))
    return checks, report


def _policy_checks(config: SiteConfig, report: ValidationReport | None) -> list[Check]:
    checks = []
    rules = config.rules
    if rules.allowed_tasks is not None and report is not None and report.spec is not None:
        defined = {t.name for t in report.spec.tasks}
        for task in rules.allowed_tasks:
            if task not in defined:
                checks.append(
                    Check(
                        "policy.allowed_tasks",
                        "warning",
                        f"task {task!r} is not defined in {SPEC_FILENAME} (defined: "
                        f"{', '.join(sorted(defined)) or 'none'}); no run can use it",
                        "fix its spelling or remove it",
                    )
                )
    if rules.allowed_models is not None:
        from fedcare.models.registry import available_models  # importing models loads torch

        known = set(available_models())
        for model in rules.allowed_models:
            if model not in known:
                checks.append(
                    Check(
                        "policy.allowed_models",
                        "warning",
                        f"model {model!r} is not a registered model (registered: "
                        f"{', '.join(sorted(known))}); no run can use it",
                        "fix its spelling or remove it",
                    )
                )
    p = config.privacy
    checks.append(
        Check(
            "privacy",
            "ok" if p.require_dp else "warning",
            f"budget ε={p.epsilon:g} at δ={p.delta:g} ({p.accountant}), noise multiplier "
            f">= {p.min_noise_multiplier:g}, DP {'required' if p.require_dp else 'NOT required'}",
            "" if p.require_dp else "set require_dp = true outside a research sandbox",
        )
    )
    if config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            checks.append(
                Check(
                    "device",
                    "error",
                    "device = 'cuda' but PyTorch sees no CUDA device on this machine",
                    "set device = 'auto' or 'cpu', or install the GPU driver and a CUDA build "
                    "of PyTorch",
                )
            )
    return checks


# --------------------------------------------------------------------------------------
# The SuperLink connection
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# fedcare site check
# --------------------------------------------------------------------------------------


def run_site_checks(
    config: SiteConfig, *, connect: bool = True, timeout: float = 5.0
) -> list[Check]:
    """Every check of ``fedcare site check`` on a parsed config, in report order."""
    checks = _file_checks(config)
    data_checks, report = _data_checks(config)
    checks += data_checks
    checks += _policy_checks(config, report)
    if not connect:
        checks.append(Check("superlink", "skipped", "not contacted (--no-connect)"))
    else:
        checks += probe_superlink(config.superlink, timeout=timeout)
    return checks


def _table(checks: list[Check]) -> Table:
    table = Table(show_header=True, header_style="bold", show_edge=False)
    for name in ("check", "status", "detail", "fix"):
        table.add_column(name, overflow="fold")
    for c in checks:
        table.add_row(
            Text(c.name), Text(c.status, style=_STYLE[c.status]), Text(c.detail), Text(c.fix)
        )
    return table


def site_check(
    config: Path = typer.Argument(  # noqa: B008 - typer's declaration style
        ..., help="The site's site-config.toml."
    ),
    connect: bool = typer.Option(
        True, "--connect/--no-connect", help="Also open a TLS connection to the SuperLink."
    ),
    timeout: float = typer.Option(
        5.0, "--timeout", min=0.1, help="Seconds allowed for the SuperLink connection."
    ),
) -> None:
    """Check a site's deployment: its config, files, keys, data and the SuperLink.

    Prints one line per check (ok / warning / error, each problem with its fix). Exits 1
    when any check is an error, 0 otherwise.

    Raises
    ------
    ConfigError
        When the config file cannot be read or parsed (the message names the file and
        every bad field).
    """
    cfg = load_site_config(config)
    console = Console(
        highlight=False,
        emoji=False,
        soft_wrap=False,
        width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160,
    )
    if cfg.superlink.insecure:
        console.print(
            Text(
                "WARNING: insecure = true — TLS is OFF. Model updates travel unencrypted and "
                "the SuperLink is not authenticated. Use this only for local tests.",
                style="bold red",
            )
        )
    checks = [Check("config", "ok", f"{config} parsed (site {cfg.site_id!r})")]
    try:
        checks += run_site_checks(cfg, connect=connect, timeout=timeout)
    except ConfigError as e:  # a file changed between two checks: report, don't crash
        checks.append(Check("config", "error", str(e), "run the check again"))
    console.print(_table(checks))
    n_err = sum(c.status == "error" for c in checks)
    n_warn = sum(c.status == "warning" for c in checks)
    verdict = f"{n_err} error(s), {n_warn} warning(s)"
    if n_err:
        console.print(Text(f"site {cfg.site_id}: NOT ready: {verdict}", style="red"))
        raise typer.Exit(1)
    console.print(Text(f"site {cfg.site_id}: ready: {verdict}", style="green"))
