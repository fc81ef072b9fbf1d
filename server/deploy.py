"""The coordinating centre's processes, started the safe way.

``fedcare server start`` runs three processes under one supervisor
(:func:`centre_children`):

* the **SuperLink** (:func:`superlink_command`), bound to 127.0.0.1 on the *control port*:
  TLS with the certificates of ``fedcare certs init``, SuperNode authentication on,
  run-time dependency installation off, durable state in a SQLite database (registered
  SuperNodes and runs survive a restart), ``--isolation process`` (it launches nothing
  itself) and a SuperExec secret (:func:`write_superexec_secret`) without which its Runtime
  API hands out no ServerApp task. The operator's ``flwr`` CLI uses this port, on this
  machine only (:func:`connection_config`);
* the **gateway** (:func:`gateway_command`, ``server/gateway.py``) on the public address:
  it terminates TLS with the same certificate and forwards only Fleet requests
  (``/v1/fleet/*``) to the SuperLink; the Control and Runtime APIs are not reachable from
  the network;
* the **executor** (:func:`executor_command`, ``server/executor.py``): it takes the
  ServerApp tasks with the secret and runs fedcare's *installed* ServerApp for runs whose
  app is fedcare's thin app, refusing any other.

Plain text needs an explicit ``insecure=True``; then node authentication is off too
(Flower requires TLS for it), and the same three processes run without TLS, the SuperLink
still on 127.0.0.1.

:func:`prepare_database` creates that database file with mode 0600 before Flower opens it
(SQLite gives its ``-wal`` and ``-shm`` files the same mode), in a folder created with mode
0700: the database holds the registered SuperNodes' keys and every run's messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedcare.common.errors import ConfigError
from fedcare.common.files import open_private, private_dir
from fedcare.common.processes import Child, module_command, venv_bin
from fedcare.common.superexec import write_secret as write_new_secret

__all__ = [
    "SuperLinkSettings",
    "superlink_command",
    "gateway_command",
    "executor_command",
    "centre_children",
    "write_superexec_secret",
    "connection_config",
    "prepare_database",
    "CERT_FILES",
    "certificate_files",
    "LOOPBACK",
]

#: Where the SuperLink (and with it the Control and Runtime APIs) listens.
LOOPBACK = "127.0.0.1"

#: Files of a certificate folder the SuperLink needs (written by ``fedcare certs init``).
CERT_FILES = {"ca": "ca.crt", "cert": "server.crt", "key": "server.key"}


def certificate_files(certs: Path | None, *, who: str) -> dict[str, Path]:
    """``ca``, ``cert`` and ``key`` of the centre in ``certs`` (:data:`CERT_FILES`); each
    must exist, and ``who`` (the process that needs them) is named when one does not.

    Raises
    ------
    ConfigError
        ``certs`` is not given, or a file is missing; the message says how to make them.
    """
    if certs is None:
        raise ConfigError(
            f"{who} needs --certs DIR (made by `fedcare certs init --out DIR --host NAME`), "
            "or --insecure for a plain-text test on one machine"
        )
    paths = {k: Path(certs) / name for k, name in CERT_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not found; create the certificates with "
            f"`fedcare certs init --out {certs} --host <the centre's name>`"
        )
    return paths


@dataclass(frozen=True)
class SuperLinkSettings:
    """Where and how the SuperLink serves.

    Attributes
    ----------
    certs:
        Folder with ``ca.crt``, ``server.crt`` and ``server.key`` (``fedcare certs init``).
        Ignored when ``insecure``.
    host, port:
        The public address: the gateway binds it, and sites reach the Fleet API there.
    control_port:
        The SuperLink's port on 127.0.0.1: the ``flwr`` CLI (Control API) and the
        executor and ServerApp processes (Runtime API) use it, on this machine only.
    database:
        SQLite file of the SuperLink's state; the SuperExec secret is written beside it
        (:attr:`secret_file`).
    insecure:
        Serve plain text, without node authentication (tests on one machine only).
    node_auth:
        Admit only SuperNodes registered with ``flwr supernode register``.
    """

    certs: Path | None
    host: str = "0.0.0.0"
    port: int = 9092
    control_port: int = 9093
    database: Path = Path("superlink.db")
    insecure: bool = False
    node_auth: bool = True

    def cert_paths(self) -> dict[str, Path]:
        """The CA, certificate and key files; each must exist."""
        return certificate_files(self.certs, who="the SuperLink")

    @property
    def secret_file(self) -> Path:
        """The SuperExec secret's file, beside the database (``superlink.superexec-secret``)."""
        database = Path(self.database)
        return database.with_name(f"{database.stem}.superexec-secret")

    @property
    def ca_cert(self) -> Path | None:
        """The CA the loopback clients verify the SuperLink with (``None`` if insecure)."""
        return None if self.insecure else self.cert_paths()["ca"].resolve()

    @property
    def control_address(self) -> str:
        return f"{LOOPBACK}:{self.control_port}"

    def check_ports(self) -> None:
        """Both ports are TCP ports, and not the same one."""
        for option, port in (("--port", self.port), ("--control-port", self.control_port)):
            if not 0 < port < 65536:
                raise ConfigError(f"{option} {port} is not a TCP port; use 1..65535")
        if self.port == self.control_port:
            raise ConfigError(
                f"--port and --control-port are both {self.port}: the public (Fleet) port and "
                "the local control port must differ"
            )


def superlink_command(settings: SuperLinkSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``settings``: on 127.0.0.1, process
    isolation, the SuperExec secret of :attr:`SuperLinkSettings.secret_file`."""
    settings.check_ports()
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
    cmd += ["--host", LOOPBACK, "--port", str(settings.control_port)]
    cmd += ["--database", str(Path(settings.database).resolve())]
    cmd += ["--isolation", "process"]
    cmd += ["--superexec-auth-secret-file", str(settings.secret_file.resolve())]
    return cmd


def gateway_command(settings: SuperLinkSettings) -> list[str]:
    """The gateway's command line: ``settings.host:port`` forwarded to the SuperLink."""
    settings.check_ports()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    cmd = [*module_command("fedcare.server.gateway"), "--listen", f"{host}:{settings.port}"]
    cmd += ["--upstream", settings.control_address]
    if settings.insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--certs", str(settings.cert_paths()["ca"].parent.resolve())]
    return cmd


def executor_command(settings: SuperLinkSettings) -> list[str]:
    """The ServerApp executor's command line (``server/executor.py``)."""
    cmd = [
        *module_command("fedcare.server.executor"),
        "--runtime-api-address",
        settings.control_address,
    ]
    cmd += ["--superexec-auth-secret-file", str(settings.secret_file.resolve())]
    ca = settings.ca_cert
    cmd += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    return cmd


def centre_children(settings: SuperLinkSettings) -> list[Child]:
    """The centre's three processes, for :func:`fedcare.common.processes.supervise_group`.

    The SuperLink's exit stops the group (a service manager restarts it); the gateway and
    the executor are restarted when they exit on their own. The secret file must exist
    (:func:`write_superexec_secret`).
    """
    return [
        Child("superlink", superlink_command(settings)),
        Child("gateway", gateway_command(settings), restart=True),
        Child("executor", executor_command(settings), restart=True),
    ]


def write_superexec_secret(settings: SuperLinkSettings) -> Path:
    """A fresh random SuperExec secret (32 bytes, hex), mode 0600, beside the database.

    A new one at every start: the SuperLink and the executor read it when they start, and
    nothing else needs it.

    Raises
    ------
    ConfigError
        If the file cannot be written.
    """
    try:
        return write_new_secret(settings.secret_file)
    except OSError as e:
        raise ConfigError(
            f"cannot write the SuperExec secret {settings.secret_file} ({e}); choose a "
            "--database folder this user can write"
        ) from e


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
    """One ``[superlink.<name>]`` table of the ``flwr`` CLI's ``config.toml``: the operator's
    connection to the control port (``127.0.0.1:<control port>``, on the centre's machine)."""
    if insecure:
        return {"address": address, "insecure": True}
    if ca_cert is None:
        raise ConfigError("a TLS connection needs the CA certificate (ca.crt)")
    return {"address": address, "root-certificates": str(Path(ca_cert).resolve())}
