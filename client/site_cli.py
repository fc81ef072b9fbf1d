"""``fedcare site keygen``, ``site check`` and ``site peer-key``: a hospital's deployment
commands.

Plain typer-annotated functions; :mod:`fedcare.cli` mounts them. A
:class:`~fedcare.common.errors.FedcareError` raised here becomes one line and exit code 2 there.

``site check`` runs every check it can and reports them all in one table (ok / warning /
error, each error with its fix): the config file, the files it names, the site's data
(the same validation as ``fedcare data check``) and the policy against the data
(:mod:`fedcare.client.site_checks`), and a real TLS connection to the SuperLink with the
configured CA and hostname verification (:mod:`fedcare.client.tls_probe`).
:func:`run_site_checks` returns the same checks as data, for tests and other commands.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedcare.client.site_checks import Check, local_checks
from fedcare.client.site_config import SiteConfig, load_site_config
from fedcare.client.tls_probe import probe_superlink
from fedcare.common.certs import generate_node_keypair, load_node_private_key, ssh_fingerprint
from fedcare.common.errors import ConfigError

__all__ = [
    "run_site_checks",
    "site_keygen",
    "site_check",
    "site_peer_key",
]

_STYLE: dict[str, str] = {"ok": "green", "warning": "yellow", "error": "red", "skipped": "dim"}


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
# fedcare site check
# --------------------------------------------------------------------------------------


def run_site_checks(
    config: SiteConfig, *, connect: bool = True, timeout: float = 5.0
) -> list[Check]:
    """Every check of ``fedcare site check`` on a parsed config, in report order.

    :func:`~fedcare.client.site_checks.local_checks`, then (with ``connect``)
    :func:`~fedcare.client.tls_probe.probe_superlink`.
    """
    checks = local_checks(config)
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
        with warnings.catch_warnings():
            # pydicom warns while parsing a corrupt file; the report already names that file.
            warnings.filterwarnings("ignore", module="pydicom")
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


# --------------------------------------------------------------------------------------
# fedcare site peer-key
# --------------------------------------------------------------------------------------


def site_peer_key(
    config: Path = typer.Argument(  # noqa: B008 - typer's declaration style
        ..., help="The site's site-config.toml."
    ),
) -> None:
    """Print this hospital's line for the other hospitals' secure-aggregation peers files.

    The line is ``<site id> = "<hex of the site's audit public key>"`` (its state folder's
    audit signing key, made there first if missing, as the site would). Send it to the
    other hospitals by a channel you trust (not through the coordinating centre, which
    could swap it); each adds it under ``[peers]`` in the file its ``secagg_peers`` names.

    Raises
    ------
    ConfigError
        The config is invalid, or its state folder cannot hold the key.
    """
    from fedcare.client.secagg import audit_keys

    cfg = load_site_config(config)
    key = audit_keys([(cfg.site_id, cfg.state_dir)])[cfg.site_id]
    console = Console(highlight=False, soft_wrap=True, emoji=False)
    console.print(f'{cfg.site_id} = "{key.hex()}"', markup=False, emoji=False)
