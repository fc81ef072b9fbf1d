"""``fedcare budget show``: what a site's privacy ledger says each dataset has spent.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~common.errors.FedcareError` and become one line on stderr there.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.ledger import DatasetSummary, PrivacyLedger

__all__ = ["budget_show"]


def _table(summary: DatasetSummary) -> Table:
    table = Table(show_header=True, header_style="bold", show_edge=False)
    for name, justify in (
        ("#", "right"),
        ("run", "left"),
        ("round", "right"),
        ("σ", "right"),
        ("q", "right"),
        ("steps", "right"),
        ("ε after", "right"),
        ("status", "left"),
        ("charged (UTC)", "left"),
    ):
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in summary.charges:
        table.add_row(
            str(c.charge_id),
            Text(c.run_id),
            str(c.round),
            f"{c.mechanism.noise_multiplier:.4g}",
            f"{c.mechanism.sample_rate:.4g}",
            str(c.mechanism.steps),
            f"{c.epsilon_after:.4g}",
            c.status,
            c.created_at[:16].replace("T", " "),
        )
    return table


def budget_show(
    db: Path = typer.Option(..., "--db", help="The site's privacy ledger (SQLite file)."),  # noqa: B008
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show, per dataset, ε spent (the composition of its whole history), δ, the
    accountant and every mechanism charged.

    Raises
    ------
    ConfigError
        If ``db`` is missing or is not a privacy ledger.
    """
    ledger = PrivacyLedger(db, create=False)
    summaries = ledger.summary()
    if json_out:
        payload = {"ledger": str(db), "datasets": [s.to_dict() for s in summaries]}
        typer.echo(json.dumps(payload, indent=2))
        return
    console = Console(highlight=False)
    if not summaries:
        console.print(
            f"privacy ledger {db}: no dataset has been charged yet", markup=False, soft_wrap=True
        )
        return
    for s in summaries:
        budget = f" of budget {s.budget_epsilon:g}" if s.budget_epsilon is not None else ""
        steps = sum(m.steps for m in s.mechanisms)
        console.print(f"dataset {s.fingerprint}", style="bold", markup=False, soft_wrap=True)
        console.print(
            f"  ε = {s.epsilon:.4g}{budget}  δ = {s.delta:g}  accountant = {s.accountant}  "
            f"({len(s.charges)} charges, {steps} DP-SGD steps)",
            markup=False,
            soft_wrap=True,
        )
        console.print(_table(s))
        console.print()
