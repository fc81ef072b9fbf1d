"""The site's commands, as plain typer-annotated functions.

``fedcare/cli.py`` mounts them (``fedcare data check`` -> :func:`data_check`). A
:class:`~common.errors.FedcareError` raised here becomes one line and exit code 2 there.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.data.validation import ValidationReport, validate_site
from common.errors import DataError
from common.spec import SPEC_FILENAME

__all__ = ["data_check"]


# --------------------------------------------------------------------------------------
# fedcare data check
# --------------------------------------------------------------------------------------


def _site_folders(path: Path) -> list[Path]:
    """``path`` itself when it is a site, else its sub-folders that are sites."""
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; pass a site folder (holding {SPEC_FILENAME}) "
            "or a folder of site folders"
        )
    if path.is_file() or (path / SPEC_FILENAME).is_file():
        return [path]
    sites = sorted(p for p in path.iterdir() if p.is_dir() and (p / SPEC_FILENAME).is_file())
    if not sites:
        raise DataError(
            f"{path}: neither it nor any folder inside it holds a {SPEC_FILENAME}; pass a "
            "site folder or a folder of site folders (`fedcare data synth` writes some)"
        )
    return sites


def _problems_table(report: ValidationReport) -> Table:
    table = Table(title=f"{report.summary.site_id or report.path}: problems", title_justify="left")
    for name in ("severity", "file", "column", "row", "problem", "fix"):
        table.add_column(name, overflow="fold")
    for p in report.problems:
        colour = "red" if p.severity == "error" else "yellow"
        table.add_row(
            Text(p.severity, style=colour),
            Text(p.file),
            Text(p.column or ""),
            Text("" if p.row is None else str(p.row)),
            Text(p.message),
            Text(p.fix),
        )
    return table


def _summary_table(reports: list[ValidationReport]) -> Table:
    table = Table(
        title="summary (patients per modality; % positive per label)", title_justify="left"
    )
    label_names = list(dict.fromkeys(n for r in reports for n in r.summary.labels))
    columns = ["site", "status", "patients", "ehr", "imaging", "genomics", *label_names]
    for name in (*columns, "errors", "warnings"):
        table.add_column(name, overflow="fold")
    for r in reports:
        s = r.summary
        declared = r.spec.modalities if r.spec is not None else ()
        cells = [
            str(s.modalities.get(m, "?")) if m in declared else "-"
            for m in ("ehr", "imaging", "genomics")
        ]
        labels = []
        for name in label_names:
            pos, n = s.labels.get(name, (0, 0))
            labels.append(f"{100 * pos / n:.0f}%" if n else "-")
        status = Text("ok", style="green") if r.ok else Text("ERRORS", style="red")
        table.add_row(
            Text(s.site_id or r.path.name),
            status,
            Text(str(s.patients)),
            *map(Text, cells),
            *map(Text, labels),
            Text(str(len(r.errors))),
            Text(str(len(r.warnings))),
        )
    return table


def data_check(
    path: Path = typer.Argument(  # noqa: B008 - typer's declaration style
        ..., help="A site folder (with site.toml) or a folder of site folders."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a site's data files against its site.toml and report every problem.

    Exits 1 when any site has an error, 0 when there are warnings only.
    """
    sites = _site_folders(path)
    with warnings.catch_warnings():
        # pydicom warns while parsing a corrupt file; the report already names that file.
        warnings.filterwarnings("ignore", module="pydicom")
        reports = [validate_site(site) for site in sites]
    failed = any(not r.ok for r in reports)
    if json_out:
        typer.echo(
            json.dumps({"ok": not failed, "sites": [r.to_dict() for r in reports]}, indent=2)
        )
    else:
        console = Console(
            highlight=False,
            soft_wrap=False,
            width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140,
        )
        for r in reports:
            if r.problems:
                console.print(_problems_table(r))
        console.print(_summary_table(reports))
        n_err = sum(len(r.errors) for r in reports)
        n_warn = sum(len(r.warnings) for r in reports)
        bad = sum(not r.ok for r in reports)
        verdict = (
            f"{bad} of {len(reports)} site(s) have errors"
            if failed
            else f"{len(reports)} site(s) ok"
        )
        console.print(
            Text(
                f"{verdict}: {n_err} error(s), {n_warn} warning(s)",
                style="red" if failed else "green",
            )
        )
    if failed:
        raise typer.Exit(1)
