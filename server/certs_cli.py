"""``fedcare certs init``: the coordinating centre's CA and SuperLink TLS certificate.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~fedcare.common.errors.FedcareError` and become one line on stderr there.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedcare.common.audit import load_or_create_signing_key
from fedcare.common.certs import describe_certificate, init_certificates
from fedcare.common.run_signing import RUN_KEY_NAME, RUN_PUBLIC_KEY_NAME, write_public_key

__all__ = ["certs_init"]


def certs_init(
    out: Path = typer.Option(  # noqa: B008 - typer's declaration style
        ..., "--out", help="Folder to write ca.crt, ca.key, server.crt and server.key into."
    ),
    host: list[str] = typer.Option(  # noqa: B008
        ...,
        "--host",
        help="A host name or IP address sites use to reach the SuperLink; repeat for each.",
    ),
    days: int = typer.Option(825, "--days", min=1, help="Validity of both certificates."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Create the federation's CA and the SuperLink's TLS certificate signed by it.

    The certificate covers every --host (plus localhost, 127.0.0.1 and ::1, which the
    SuperLink's own ServerApp process connects through). Start the SuperLink with
    ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key``;
    give each site ca.crt only.

    Raises
    ------
    ConfigError
        A malformed --host, or an existing file without --force.
    """
    paths = init_certificates(out=out, hosts=host, days=days, force=force)
    run_key_path = out / RUN_KEY_NAME
    if force:
        run_key_path.unlink(missing_ok=True)
    run_key = load_or_create_signing_key(run_key_path)  # Ed25519, mode 0600
    run_public = write_public_key(run_key, out / RUN_PUBLIC_KEY_NAME)
    ca = describe_certificate(paths.ca_cert)
    server = describe_certificate(paths.server_cert)
    console = Console(highlight=False, soft_wrap=True, emoji=False)

    def say(text: str = "", style: str | None = None) -> None:
        console.print(text, style=style, markup=False, emoji=False)

    say(f"wrote {paths.ca_cert}      CA certificate: give a copy to every site")
    say(f"wrote {paths.ca_key}      CA private key (mode 0600)")
    say(f"wrote {paths.server_cert}  SuperLink certificate, signed by the CA")
    say(f"wrote {paths.server_key}  SuperLink private key (mode 0600)")
    say(f"wrote {run_key_path}  run-signing key (mode 0600): `server submit --run-key`")
    say(f"wrote {run_public}  its public half: every site pins it (run_signing_key)")
    say()
    say(f"SuperLink certificate covers: {', '.join(server.sans)}")
    say(f"valid until {server.not_after:%Y-%m-%d %H:%M} UTC")
    say()
    say("CA fingerprint (SHA-256); sites compare it with the ca.crt they received,")
    say("by phone or another channel, before trusting it:")
    say(f"  {ca.fingerprint}", style="bold")
    say()
    say("Start the SuperLink with:")
    say(f"  fedcare server start --certs {paths.ca_cert.parent} --database superlink.db")
    say()
    say(
        f"Keep {paths.ca_key} private and preferably offline: anyone holding it can "
        "impersonate the SuperLink to every site. The SuperLink needs only server.crt, "
        "server.key and ca.crt.",
        style="bold yellow",
    )
