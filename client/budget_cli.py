"""``fedcare budget show``: what a site's privacy ledger says each dataset has spent.

A dataset is a cohort of patients (its key is
:meth:`fedcare.client.ledger.PrivacyLedger.cohort_key`);
its ε composes its own charges and those of every dataset sharing a patient with it (or of
unknown membership), so it bounds each of its patients. The output lists the dataset's own
charges and names the overlapping datasets whose charges its ε also counts.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~fedcare.common.errors.FedcareError` and become one line on stderr there.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedcare.client.ledger import DatasetSummary, PrivacyLedger

__all__ = ["budget_show"]


def _table(summary: DatasetSummary) -> Table:
    table = Table(
        show_header=True,
        header_style="bold",
        show_edge=False,
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
    )
    # Short values never wrap; the run id and the time fold when the terminal is narrow.
    for name, justify, wrap in (
        ("#", "right", False),
        ("run", "left", True),
        ("round", "right", False),
        ("kind", "left", False),
        ("σ", "right", False),
        ("q", "right", False),
        ("steps", "right", False),
        ("ε after", "right", False),
        ("status", "left", False),
        ("charged (UTC)", "left", True),
    ):
        table.add_column(name, justify=justify, overflow="fold", no_wrap=not wrap)  # type: ignore[arg-type]
    for c in summary.charges:
        table.add_row(
            str(c.charge_id),
            Text(c.run_id),
            str(c.round),
            c.kind,
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
    """Show, per dataset, ε spent (the composition of its whole history and of every
    overlapping dataset's), δ, the accountant, its cohort size and every mechanism charged.

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
        console.print(f"dataset {s.fingerprint}", style="bold", markup=False, soft_wrap=True)
        for line in _describe(s):
            console.print(f"  {line}", markup=False, soft_wrap=True)
        console.print(_table(s))
        console.print()


def _describe(s: DatasetSummary) -> list[str]:
    """The lines under a dataset's heading: its ε, its cohort and what ε composes."""
    budget = f" of budget {s.budget_epsilon:g}" if s.budget_epsilon is not None else ""
    train = sum(c.kind == "train" for c in s.charges)
    evaluate = sum(c.kind == "evaluate" for c in s.charges)
    personalize = len(s.charges) - train - evaluate  # personal models' fine-tunes
    steps = sum(c.mechanism.steps for c in s.charges)
    tuned = f", {personalize} personalize" if personalize else ""
    lines = [
        f"ε = {s.epsilon:.4g}{budget}  δ = {s.delta:g}  accountant = {s.accountant}  "
        f"({len(s.charges)} charges: {train} train, {evaluate} evaluate{tuned}; "
        f"{steps} steps)",
        f"cohort of {s.members} patients"
        if s.members is not None
        else "cohort membership unknown (a v1 dataset or a key not made by cohort_key): "
        "its ε composes every charge in the ledger and its charges count for every dataset",
    ]
    if s.overlapping:
        borrowed = len(s.composed) - len(s.charges)
        lines.append(
            f"ε also composes {borrowed} charges of {len(s.overlapping)} overlapping "
            f"dataset(s): {', '.join(s.overlapping)}"
        )
    return lines
