"""The coordinating centre's SuperLink, started the safe way.

:func:`superlink_command` builds the ``flower-superlink`` command line: TLS with the
certificates of ``fedcare certs init`` and SuperNode authentication on, run-time dependency
installation off, durable state in a SQLite database (registered SuperNodes and runs survive
a restart). Plain text needs an explicit ``insecure=True``, and then node authentication is
off too (Flower requires TLS for it).

:func:`prepare_database` creates that database file with mode 0600 before Flower opens it
(SQLite gives its ``-wal`` and ``-shm`` files the same mode), in a folder created with mode
0700: the database holds the registered SuperNodes' keys and every run's messages.

:func:`connection_config` is the ``flwr`` CLI's connection to that SuperLink, for the
coordinating centre's ``FLWR_HOME/config.toml`` (``flwr run``, ``flwr ls``,
``flwr supernode register`` use it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError
from common.files import open_private, private_dir
from common.processes import venv_bin

__all__ = [
    "SuperLinkSettings",
    "superlink_command",
    "connection_config",
    "prepare_database",
    "CERT_FILES",
]

#: Files of a certificate folder the SuperLink needs (written by ``fedcare certs init``).
CERT_FILES = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where and how the SuperLink serves.

    Attributes
    ----------
    certs:
        Folder with ``ca.crt``, ``server.crt`` and ``server.key`` (``fedcare certs init``).
        Ignored when ``insecure``.
    host, port:
        Address the SuperLink binds; sites and the ``flwr`` CLI reach it on ``port``.
    database:
        SQLite file of the SuperLink's state.
    insecure:
        Serve plain text, without node authentication (tests on one machine only).
    node_auth:
        Admit only SuperNodes registered with ``flwr supernode register``.
    """

    certs: Path | None
    host: str = "0.0.0.0"
    port: int = 9092
    database: Path = Path("superlink.db")
    insecure: bool = False
    node_auth: bool = True

    def cert_paths(self) -> dict[str, Path]:
        """The CA, certificate and key files; each must exist."""
        if self.certs is None:
            raise ConfigError(
                "the SuperLink needs --certs DIR (made by `fedcare certs init --out DIR "
                "--host NAME`), or --insecure for a plain-text test on one machine"
            )
        paths = {k: Path(self.certs) / name for k, name in CERT_FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not found; create the certificates with "
                f"`fedcare certs init --out {self.certs} --host <the SuperLink's name>`"
            )
        return paths


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``."""
    if not 0 < settings.port < 65536:
        raise ConfigError(f"--port {settings.port} is not a TCP port; use 1..65535")
    cmd = [venv_bin("flower-superlink")]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        paths = settings.cert_paths()
        cmd += ["--ssl-ca-certfile", str(paths["ca"].resolve())]
        cmd += ["--ssl-certfile", str(paths["cert"].resolve())]
        cmd += ["--ssl-keyfile", str(paths["key"].resolve())]
        if settings.node_auth:
            cmd.append("--enable-supernode-auth")
    cmd += ["--disable-runtime-dependency-installation"]
    cmd += ["--host", settings.host, "--port", str(settings.port)]
    cmd += ["--database", str(Path(settings.database).resolve())]
    return cmd


#: Files SQLite keeps beside a database in WAL mode (Flower's), or after a crash.
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def prepare_database(database: Path) -> Path:
    """Create the SuperLink's SQLite file with mode 0600 (folder 0700 if new); return it.

    Flower would otherwise create the file itself, readable by every local user under the
    usual umask 022; SQLite opens an existing empty file as a new database and gives the
    ``-wal``/``-shm`` files it adds the database file's mode. An existing database (and any
    such file beside it) this process owns loses its group and other bits. An existing
    folder is left as it is: it may be the folder the command was started in.

    Raises
    ------
    ConfigError
        If the folder or the file cannot be created.
    """
    database = Path(database)
    try:
        private_dir(database.parent, tighten=False)
        os.close(open_private(database, os.O_RDWR))
        for suffix in _SQLITE_SIDE_FILES:
            side = database.with_name(database.name + suffix)
            if side.is_file():
                os.close(open_private(side, os.O_RDONLY))
    except OSError as e:
        raise ConfigError(
            f"--database {database}: cannot create it ({e}); choose a folder this user can write"
        ) from e
    return database


def connection_config(*, address: str, ca_cert: Path | None, insecure: bool) -> dict[str, object]:
    """One ``[superlink.<name>]`` table of the ``flwr`` CLI's ``config.toml``."""
    if insecure:
        return {"address": address, "insecure": True}
    if ca_cert is None:
        raise ConfigError("a TLS connection needs the CA certificate (ca.crt)")
    return {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
