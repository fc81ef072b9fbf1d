"""The coordinating centre's commands.

``fedcare server start``: the centre's three processes in the foreground
(``server/deploy.py``): the SuperLink on 127.0.0.1:``--control-port`` (the operator's
``flwr`` CLI, on this machine), the gateway on ``--host``:``--port`` (the only port that
faces the hospitals: it forwards the Fleet API and nothing else), and the executor that runs
fedcare's installed ServerApp. TLS and SuperNode authentication are on unless
``--insecure`` (which warns loudly). SIGTERM (``systemctl stop``) or Ctrl-C stops all three
and every process they started.

``fedcare server submit RUN.toml``: validates the run's settings and submits them with
``flwr run`` as a thin app (no code is shipped: every site runs the fedcare it installed).
Submitting again with the same ``run-id`` and ``run-dir`` resumes after the last completed
round.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import tomli_w
import typer

from fedcare.common.audit import load_or_create_signing_key
from fedcare.common.errors import ConfigError
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.flower_app import ConfigValue, check_values, write_app_dir
from fedcare.common.locks import FolderLock
from fedcare.common.processes import flower_env, supervise_group, venv_bin
from fedcare.common.run_signing import RUN_SIGNATURE_KEY, sign_run
from fedcare.common.tomlcompat import tomllib
from fedcare.server.deploy import (
    SuperLinkSettings,
    centre_children,
    connection_config,
    prepare_database,
    write_superexec_secret,
)

__all__ = ["server_start", "server_submit"]

_INSECURE_WARNING = (
    "WARNING: --insecure: the centre serves PLAIN TEXT and admits ANY SuperNode. Model "
    "updates cross the network unencrypted and unauthenticated. Use this only for a test on "
    "one machine, never between hospitals."
)


def server_start(
    certs: Path = typer.Option(  # noqa: B008
        None, "--certs", help="Folder with ca.crt, server.crt, server.key (fedcare certs init)."
    ),
    host: str = typer.Option(
        None, help="Public address to bind (default 0.0.0.0; 127.0.0.1 with --insecure)."
    ),
    port: int = typer.Option(9092, help="Public port: the hospitals' SuperNodes (Fleet API only)."),
    control_port: int = typer.Option(
        9093,
        "--control-port",
        help="Port of the SuperLink on 127.0.0.1: the flwr CLI on this machine (Control API).",
    ),
    database: Path = typer.Option(  # noqa: B008
        Path("superlink.db"), help="SQLite file of the SuperLink's state (kept across restarts)."
    ),
    name: str = typer.Option(
        "127.0.0.1", "--public-name", help="Name or address sites use to reach this centre."
    ),
    insecure: bool = typer.Option(False, "--insecure", help="Plain text, no node auth (tests)."),
    no_node_auth: bool = typer.Option(
        False, "--no-node-auth", help="Admit unregistered SuperNodes (TLS stays on)."
    ),
) -> None:
    """Start the centre: the SuperLink (local), the Fleet-only public gateway and the
    ServerApp executor, with TLS and SuperNode authentication (foreground)."""
    if host is None:
        host = "127.0.0.1" if insecure else "0.0.0.0"
    settings = SuperLinkSettings(
        certs=certs,
        host=host,
        port=port,
        control_port=control_port,
        database=database,
        insecure=insecure,
        node_auth=not no_node_auth,
    )
    children = centre_children(settings)  # checks ports and certificates first
    if insecure:
        typer.secho(_INSECURE_WARNING, fg=typer.colors.RED, bold=True, err=True)
    elif no_node_auth:
        typer.secho(
            "WARNING: --no-node-auth: any SuperNode that trusts this CA may join.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    table = connection_config(
        address=settings.control_address, ca_cert=settings.ca_cert, insecure=insecure
    )
    typer.echo(
        f"sites connect to {name}:{port} (Fleet API only; the Control and Runtime APIs "
        f"listen on {settings.control_address}, this machine only)\n"
        "flwr CLI connection on this machine (add to $FLWR_HOME/config.toml, default "
        "~/.flwr/config.toml):\n"
        + tomli_w.dumps({"superlink": {"fedcare": table}})
        + "register a site:  flwr supernode register SITE_KEY.pub fedcare\n"
        + "start a run:      fedcare server submit run.toml --run-key run-signing.key --wait\n"
    )
    prepare_database(database)
    # One centre per database: a second start would replace the running centre's secret.
    with FolderLock(Path(database).resolve().parent, what="--database folder"):
        write_superexec_secret(settings)
        code = supervise_group(children, env=flower_env(one_thread=False))
    raise typer.Exit(code)


def _read_overrides(path: Path) -> dict[str, ConfigValue]:
    """The run-config overrides in ``path``, validated; relative paths made absolute."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such file; write the run's settings there") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e}); fix the syntax") from e
    if RUN_SIGNATURE_KEY in raw:
        raise ConfigError(
            f"{path}: remove {RUN_SIGNATURE_KEY}; `fedcare server submit --run-key` signs the run"
        )
    for key in _PATH_KEYS:
        value = raw.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            raw[key] = str((path.parent / value).resolve())
    try:
        cfg = FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, **raw})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    check_values(raw, what=str(path))
    if not cfg.spec_path:
        raise ConfigError(
            f"{path}: set spec-path to a site.toml holding the federation's shared feature "
            "schema (the server sizes the model from it; it reads no patient data)"
        )
    return raw


#: Run-config keys holding a path, resolved against the run file's folder.
_PATH_KEYS = ("run-dir", "spec-path", "audit-key")


def _flwr_json(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(  # noqa: S603 - Flower's own CLI with our arguments
        [venv_bin("flwr"), *args], env=env, capture_output=True, text=True, check=False
    )
    start = out.stdout.find("{")
    if start < 0:
        raise ConfigError(f"`flwr {' '.join(args)}` failed: {(out.stderr or out.stdout).strip()}")
    try:
        reply = json.loads(out.stdout[start:])
    except json.JSONDecodeError as e:
        raise ConfigError(f"`flwr {args[0]}` printed no JSON reply: {out.stdout.strip()}") from e
    if not reply.get("success"):
        raise ConfigError(
            f"`flwr {args[0]}` failed: {reply.get('error-message', reply)}; check the "
            "connection in $FLWR_HOME/config.toml and that the SuperLink is running"
        )
    return dict(reply)


def server_submit(
    run_file: Path = typer.Argument(..., help="TOML of the run's settings (run-config keys)."),  # noqa: B008
    connection: str = typer.Option(
        "fedcare", help="The flwr CLI's SuperLink connection (in $FLWR_HOME/config.toml)."
    ),
    run_key: Path = typer.Option(  # noqa: B008
        ...,
        "--run-key",
        help="The centre's run-signing key (run-signing.key from `fedcare certs init`).",
    ),
    wait: bool = typer.Option(False, "--wait", help="Follow the run until it finishes."),
) -> None:
    """Submit a federated run to the SuperLink (flwr run with fedcare's thin app), signed
    with the centre's run-signing key: sites train only for runs that key signed."""
    overrides = _read_overrides(run_file)
    if not run_key.is_file():
        raise ConfigError(
            f"--run-key {run_key}: no such file; give the run-signing.key that `fedcare certs "
            "init` wrote beside the CA"
        )
    key = load_or_create_signing_key(run_key)
    resolved = FederationConfig.from_run_config({**RUN_CONFIG_DEFAULTS, **overrides})
    overrides[RUN_SIGNATURE_KEY] = sign_run(resolved.to_run_config(), key)
    env = flower_env(one_thread=False)
    with tempfile.TemporaryDirectory(prefix="fedcare-app-") as tmp:
        app = write_app_dir(
            Path(tmp) / "app",
            config_defaults=RUN_CONFIG_DEFAULTS,
            serverapp="fedcare.server.app:app",
            clientapp="fedcare.client.app:app",
        )
        overrides_file = Path(tmp) / "run.toml"
        overrides_file.write_text(tomli_w.dumps(overrides), encoding="utf-8")
        reply = _flwr_json(
            ["run", str(app), connection, "--format", "json", "--run-config", str(overrides_file)],
            env,
        )
    flwr_run = str(reply["run-id"])
    typer.echo(
        f"submitted: flwr run id {flwr_run}; follow with `flwr ls {connection} --run-id "
        f"{flwr_run}` and `flwr log {flwr_run} {connection}`"
    )
    if not wait:
        return
    last = ""
    while True:
        info = _flwr_json(["ls", connection, "--run-id", flwr_run, "--format", "json"], env)
        status = str(info["runs"][0]["status"])
        if status != last:
            typer.echo(f"{time.strftime('%H:%M:%S')} {status}")
            last = status
        if status.startswith("finished"):
            raise typer.Exit(0 if status == "finished:completed" else 1)
        time.sleep(5)
