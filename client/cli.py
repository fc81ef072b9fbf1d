"""The site's commands, as plain typer-annotated functions.

``fedcare/cli.py`` mounts them (``fedcare data check`` -> :func:`data_check`). A
:class:`~fedcare.common.errors.FedcareError` raised here becomes one line and exit code 2 there.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from fedcare.client.data.data_checks import ValidationReport, validate_site
from fedcare.common.errors import DataError
from fedcare.common.spec import SPEC_FILENAME, schema_differences

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
    if path.is_file():
        if path.suffix.lower() != ".toml":
            raise DataError(
                f"{path} is not a site folder: it is a file, and a site is a folder holding a "
                f"{SPEC_FILENAME}; pass that folder (or its {SPEC_FILENAME}), or a folder of "
                "site folders"
            )
        return [path]
    if (path / SPEC_FILENAME).is_file():
        return [path]
    sites = sorted(p for p in path.iterdir() if p.is_dir() and (p / SPEC_FILENAME).is_file())
    if not sites:
        raise DataError(
            f"{path} is not a site folder: it has no {SPEC_FILENAME}, and no folder inside it "
            "has one; pass a site folder or a folder of site folders (`fedcare data synth` "
            "writes some)"
        )
    return sites


_DIFFERENCES_SHOWN = 10


def _schema_differences(reports: list[ValidationReport]) -> list[dict[str, Any]]:
    """Each site whose feature schema differs from the most common one, and how.

    The reference is the schema most sites share (the first site's on a tie); every other
    schema is compared with it feature by feature.
    """
    specs = [r.spec for r in reports if r.spec is not None]
    if len(specs) < 2:
        return []
    # most_common keeps first-seen order among equal counts: the first site wins a tie.
    common = Counter(s.feature_schema.fingerprint() for s in specs).most_common(1)[0][0]
    reference = next(s for s in specs if s.feature_schema.fingerprint() == common)
    out = []
    for spec in specs:
        if spec.feature_schema.fingerprint() == common:
            continue
        out.append(
            {
                "site_id": spec.site_id,
                "reference_site_id": reference.site_id,
                "differences": schema_differences(
                    reference.feature_schema,
                    spec.feature_schema,
                    a_name=reference.site_id,
                    b_name=spec.site_id,
                ),
            }
        )
    return out


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


def _summary_table(reports: list[ValidationReport], *, differing: set[str]) -> Table:
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
        if not r.ok:
            status = Text("ERRORS", style="red")
        elif s.site_id in differing:
            status = Text("SCHEMA DIFFERS", style="red")
        else:
            status = Text("ok", style="green")
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

    On a folder of sites, also checks that they share one feature schema, and names each
    differing feature. Exits 1 when any site has an error or the schemas differ, 0 when
    there are warnings only.
    """
    sites = _site_folders(path)
    with warnings.catch_warnings():
        # pydicom warns while parsing a corrupt file; the report already names that file.
        warnings.filterwarnings("ignore", module="pydicom")
        reports = [validate_site(site) for site in sites]
    mismatches = _schema_differences(reports)
    failed = any(not r.ok for r in reports) or bool(mismatches)
    if json_out:
        typer.echo(
            json.dumps(
                {
                    "ok": not failed,
                    "sites": [r.to_dict() for r in reports],
                    "schema_differences": mismatches,
                },
                indent=2,
            )
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
        console.print(_summary_table(reports, differing={m["site_id"] for m in mismatches}))
        for m in mismatches:
            shown = m["differences"][:_DIFFERENCES_SHOWN]
            rest = len(m["differences"]) - len(shown)
            more = f"; and {rest} more difference(s) (--json lists them all)" if rest else ""
            console.print(
                Text(
                    f"error: {m['site_id']}'s feature schema differs from "
                    f"{m['reference_site_id']}'s: {'; '.join(shown)}{more}; fix: give every "
                    "site.toml the federation's one [schema]",
                    style="red",
                ),
                soft_wrap=True,
            )
        n_err = sum(len(r.errors) for r in reports)
        n_warn = sum(len(r.warnings) for r in reports)
        bad = sum(not r.ok for r in reports)
        verdict = (
            f"{bad} of {len(reports)} site(s) have errors" if bad else f"{len(reports)} site(s) ok"
        )
        verdict += f": {n_err} error(s), {n_warn} warning(s)"
        if mismatches:
            if not bad:
                verdict = f"every site's files are valid ({n_warn} warning(s))"
            verdict += (
                f"; but {len(mismatches)} site(s) do not share the feature schema of "
                f"{mismatches[0]['reference_site_id']}"
            )
        console.print(Text(verdict, style="red" if failed else "green"))
    if failed:
        raise typer.Exit(1)
