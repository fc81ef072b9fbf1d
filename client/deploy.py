"""A hospital's SuperNode, started the safe way from its ``site-config.toml``.

:func:`supernode_command` builds the ``flower-superlink`` counterpart: ``flower-supernode``
verifying the SuperLink's certificate against the site's CA, signing in with the site's
node-authentication key, and telling the ClientApp where the site's own configuration is
(node config ``site-config``): the ClientApp then enforces that file's budget, policy,
ledger and device, whatever a run asks. Plain text needs an explicit ``insecure``, and then
no key is sent (Flower allows node authentication over TLS only).
"""

from __future__ import annotations

from pathlib import Path

from client.site_config import SiteConfig
from common import keys
from common.errors import ConfigError
from common.processes import venv_bin

__all__ = ["supernode_command"]


def _existing(path: Path, what: str, fix: str) -> Path:
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} not found; {fix}")
    return Path(path).resolve()


def supernode_command(site: SiteConfig, *, config_path: Path, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for the site described by ``config_path``."""
    link = site.superlink
    cmd = [venv_bin("flower-supernode"), "--superlink", link.address]
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
    cmd += ["--port", str(site.supernode.port), "--isolation", site.supernode.isolation]
    return cmd
