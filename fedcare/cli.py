"""The ``fedcare`` command: mounts the sub-commands that each package defines.

Each package keeps its commands as plain typer-annotated functions in its own ``cli.py``;
this module only assembles them into groups. A :class:`~fedcare.common.errors.FedcareError`
raised by any command becomes one clear line on stderr and exit code 2, never a traceback.
SIGINT, SIGTERM and SIGHUP stop a command the same way (:mod:`fedcare.common.stopping`): every
process it started is stopped, one line says what was kept, exit code 128 + the signal.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import warnings

import typer

from fedcare.common import stopping
from fedcare.common.errors import FedcareError

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedcare",
    help="Federated learning for hospitals: private local training, federated aggregation, audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Site data: synthesize hospitals, write real public ones, check a site's files.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")
budget_app = typer.Typer(help="A site's privacy-budget ledger.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")
certs_app = typer.Typer(help="TLS certificates for a deployment.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
server_app = typer.Typer(help="The coordinating centre's SuperLink.", no_args_is_help=True)
app.add_typer(server_app, name="server")
site_app = typer.Typer(help="A hospital site: keys, checks, its SuperNode.", no_args_is_help=True)
app.add_typer(site_app, name="site")
audit_app = typer.Typer(
    help="Privacy audit: verify logs, attack the model, report.", no_args_is_help=True
)
app.add_typer(audit_app, name="audit")
report_app = typer.Typer(
    help="What a run produced, for its readers: the model card.", no_args_is_help=True
)
app.add_typer(report_app, name="report")


#: Every command: (group or None for a top-level command, name, "module:function").
COMMANDS: tuple[tuple[str | None, str, str], ...] = (
    ("data", "check", "fedcare.client.cli:data_check"),
    ("data", "synth", "fedcare.simulations.cli:data_synth"),
    ("data", "real", "fedcare.simulations.realdata.cli:data_real"),
    ("budget", "show", "fedcare.client.budget_cli:budget_show"),
    (None, "demo", "fedcare.demo:demo"),
    (None, "simulate", "fedcare.simulations.simulate_cli:simulate"),
    ("certs", "init", "fedcare.server.certs_cli:certs_init"),
    ("server", "start", "fedcare.server.deploy_cli:server_start"),
    ("server", "submit", "fedcare.server.deploy_cli:server_submit"),
    ("site", "keygen", "fedcare.client.site_cli:site_keygen"),
    ("site", "check", "fedcare.client.site_cli:site_check"),
    ("site", "peer-key", "fedcare.client.site_cli:site_peer_key"),
    ("site", "start", "fedcare.client.deploy_cli:site_start"),
    ("audit", "verify", "fedcare.simulations.audit.verify_cli:audit_verify"),
    ("audit", "attack", "fedcare.simulations.audit.attack_cli:audit_attack"),
    ("audit", "report", "fedcare.simulations.audit.report_cli:audit_report"),
    ("report", "model", "fedcare.simulations.audit.model_card_cli:report_model"),
)
_GROUPS = {
    "data": data_app,
    "budget": budget_app,
    "certs": certs_app,
    "server": server_app,
    "site": site_app,
    "audit": audit_app,
    "report": report_app,
}
_mounted: set[tuple[str | None, str]] = set()


def _mount(argv: list[str]) -> None:
    """Register the commands this invocation can reach, importing only their modules.

    ``fedcare site keygen`` then never imports torch; a bare ``fedcare`` or ``--help``
    mounts everything.
    """
    first = next((a for a in argv if not a.startswith("-")), None)
    wanted = {first} if first in _GROUPS else set(_GROUPS) | {None}
    for group, name, ref in COMMANDS:
        if group not in wanted or (group, name) in _mounted:
            continue
        _mounted.add((group, name))
        module, _, attribute = ref.partition(":")
        function = getattr(importlib.import_module(module), attribute)
        (app if group is None else _GROUPS[group]).command(name)(function)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Opacus repeats these on every round; the CLI documents secure_mode instead.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
    stopping.install()
    try:
        # Mounting imports the command's module, and so the plug-ins (fedcare.common.plugins):
        # a broken one is one line, like any other configuration error.
        _mount(list(sys.argv[1:] if argv is None else argv))
        rc = app(args=argv, standalone_mode=False)
    except FedcareError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        typer.secho(f"fedcare: {stopping.stop_message(signal.SIGINT)}", err=True)
        sys.exit(128 + signal.SIGINT)
    except stopping.Stopped as e:
        typer.secho(f"fedcare: {stopping.stop_message(e.signum)}", err=True)
        sys.exit(128 + e.signum)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":  # pragma: no cover
    main()
