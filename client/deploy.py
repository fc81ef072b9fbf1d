"""A hospital's SuperNode and site worker, started the safe way from its ``site-config.toml``.

:func:`supernode_command` builds the ``flower-superlink`` counterpart: ``flower-supernode``
verifying the SuperLink's certificate against the site's CA, signing in with the site's
node-authentication key, and telling the ClientApp where the site's own configuration is
(node config ``site-config``): the ClientApp then enforces that file's budget, policy,
ledger and device, whatever a run asks. Plain text needs an explicit ``insecure``, and then
no key is sent (Flower allows node authentication over TLS only).

The SuperNode runs with ``--isolation process``: Flower launches no executor of its own
(which would install and run the app bundle a run ships). Its Runtime API listens on
127.0.0.1 and hands tasks only to a holder of the site's SuperExec secret
(:func:`write_secret`): fedcare's site worker (:func:`worker_command`,
:mod:`fedcare.client.worker`), which runs only the fedcare installed here.
"""

from __future__ import annotations

from pathlib import Path

from fedcare.client.site_config import SiteConfig
from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.processes import module_command
from fedcare.common.superexec import write_secret as write_new_secret

__all__ = ["supernode_command", "worker_command", "write_secret", "secret_path", "SECRET_FILE_NAME"]

SECRET_FILE_NAME = "superexec.secret"
"""The SuperExec shared secret of a site's SuperNode and worker, in its ``state_dir``."""


def secret_path(site: SiteConfig) -> Path:
    """Where the site's SuperExec secret lives (written by ``fedcare site start``)."""
    return Path(site.state_dir) / SECRET_FILE_NAME


def _existing(path: Path, what: str, fix: str) -> Path:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} not found; {fix}")
    return Path(path).resolve()


def supernode_command(site: SiteConfig, *, config_path: Path, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for the site described by ``config_path``
    (through :mod:`fedcare.client.supernode`, which shortens Flower's fixed waits between polls)."""
    link = site.superlink
    poll = f"{site.supernode.poll_interval:g}"
    cmd = [*module_command("fedcare.client.supernode"), "--poll", poll, "--"]
    cmd += ["--superlink", link.address]
    if insecure or link.insecure:
        cmd.append("--insecure")
    else:
        if link.root_certificates is not None:  # else the system's certificate store
            ca = _existing(
                link.root_certificates,
                f"{config_path}: superlink.root_certificates",
                "copy the coordinating centre's ca.crt there (fedcare certs init made it)",
            )
            cmd += ["--root-certificates", str(ca)]
        if link.auth_private_key is not None:
            key = _existing(
                link.auth_private_key,
                f"{config_path}: superlink.auth_private_key",
                "create the site's key with `fedcare site keygen --out DIR` and have the "
                "coordinating centre register DIR/supernode.pub",
            )
            cmd += ["--auth-supernode-private-key", str(key)]
    value = str(Path(config_path).resolve())
    if '"' in value or "\\" in value:
        raise ConfigError(
            f"{value}: Flower's --node-config cannot carry a path holding '\"' or '\\'; "
            "move site-config.toml to a folder whose path has neither"
        )
    cmd += ["--node-config", f'{keys.NC_SITE_CONFIG}="{value}"']
    cmd += ["--host", "127.0.0.1", "--port", str(site.supernode.port)]
    cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret_path(site))]
    return cmd


def worker_command(*, config_path: Path, poll_s: float = 0.25) -> list[str]:
    """The site worker's command line (:mod:`fedcare.client.worker`) for ``config_path``."""
    config = str(Path(config_path).resolve())
    return [*module_command("fedcare.client.worker"), config, "--poll", f"{poll_s:g}"]


def write_secret(site: SiteConfig) -> Path:
    """A fresh SuperExec secret (32 random bytes, mode 0600) in the site's ``state_dir``.

    Written at every ``site start``, before the SuperNode and the worker read it; whoever
    holds it can take the SuperNode's tasks, so only the site's user can read it.
    """
    return write_new_secret(secret_path(site))
