"""The ``fedcare`` command: mounts the sub-commands that each package defines.

Each package keeps its commands as plain typer-annotated functions in its own ``cli.py``;
this module only assembles them into groups. A :class:`~common.errors.FedcareError`
raised by any command becomes one clear line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from common.errors import FedcareError

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedcare",
    help="Federated learning for hospitals: private local training, federated aggregation, audits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Site data: synthesize hospitals, check a site's files.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
budget_app = typer.Typer(help="A site's privacy-budget ledger.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")


_mounted = False


def _mount() -> None:
    """Register every package's commands once (imported late so `--help` stays cheap)."""
    global _mounted
    if _mounted:
        return
    _mounted = True
    from client import budget_cli
    from client import cli as client_cli
    from fedcare import demo as demo_cmd
    from simulations import cli as sim_cli
    from simulations import simulate_cli

    data_app.command("check")(client_cli.data_check)
    data_app.command("synth")(sim_cli.data_synth)
    budget_app.command("show")(budget_cli.budget_show)
    app.command("demo")(demo_cmd.demo)
    app.command("simulate")(simulate_cli.simulate)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Opacus repeats these on every round; the CLI documents secure_mode instead.
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
    _mount()
    try:
        rc = app(args=argv, standalone_mode=False)
    except FedcareError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
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
