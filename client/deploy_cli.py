"""``fedcare site start CONFIG``: a hospital's SuperNode and site worker, in the foreground.

TLS and node authentication are on unless the config or ``--insecure`` says otherwise
(which warns loudly). The SuperNode launches nothing itself (process isolation); fedcare's
site worker (:mod:`fedcare.client.worker`) is its only executor and runs only the fedcare installed
here. A worker that dies is started again; the SuperNode's exit ends the command. SIGTERM
(``systemctl stop``) or Ctrl-C stops both and everything they started. The site's
``state_dir`` is made private to its user first (mode 0700, tightened if it was wider), and
a fresh SuperExec secret is written there for the two to share. The command holds
``<state_dir>/.lock`` (:mod:`fedcare.common.locks`) for its lifetime: a second ``site start`` on the
same state folder (whose ledger, audit log and secret belong to one SuperNode) is refused at
once, naming the first; the lock goes when the command ends, however it ends.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedcare.client.deploy import supernode_command, worker_command, write_secret
from fedcare.client.site_config import load_site_config
from fedcare.common.errors import ConfigError
from fedcare.common.files import private_dir
from fedcare.common.locks import FolderLock
from fedcare.common.processes import Child, flower_env, supervise_group

__all__ = ["site_start"]

_INSECURE_WARNING = (
    "WARNING: insecure: this SuperNode talks to the SuperLink in PLAIN TEXT and without node "
    "authentication. Model updates cross the network unencrypted. Use this only for a test "
    "on one machine, never between hospitals."
)


def site_start(
    config: Path = typer.Argument(..., help="The site's site-config.toml."),  # noqa: B008
    insecure: bool = typer.Option(False, "--insecure", help="Plain text, no node auth (tests)."),
) -> None:
    """Start this site's SuperNode (TLS, node authentication) and its site worker, which
    runs only the fedcare installed here (foreground)."""
    site = load_site_config(config)
    command = supernode_command(site, config_path=config, insecure=insecure)
    if insecure or site.superlink.insecure:
        typer.secho(_INSECURE_WARNING, fg=typer.colors.RED, bold=True, err=True)
    errors = [p for p in site.check_files() if p.severity == "error"]
    if errors:
        raise ConfigError(
            f"{config}: " + "; ".join(f"{p.field}: {p.message} ({p.fix})" for p in errors)
        )
    try:
        private_dir(site.state_dir)
    except OSError as e:
        raise ConfigError(f"{config}: state_dir {site.state_dir}: cannot write it ({e})") from e
    with FolderLock(site.state_dir, what="state_dir"):
        try:
            write_secret(site)
        except OSError as e:
            raise ConfigError(f"{config}: state_dir {site.state_dir}: cannot write it ({e})") from e
        typer.echo(
            f"site {site.site_id}: SuperNode -> {site.superlink.address}; data {site.data}; "
            f"state {site.state_dir}; budget epsilon={site.privacy.epsilon:g} "
            f"(delta={site.privacy.delta:g})"
        )
        children = [
            Child("supernode", command),
            Child("site-worker", worker_command(config_path=config), restart=True),
        ]
        code = supervise_group(children, env=flower_env(one_thread=False))
    raise typer.Exit(code)
