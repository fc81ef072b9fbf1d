"""``fedcare data real NAME --out DIR``, as a plain typer-annotated function.

``fedcare/cli.py`` mounts it; errors are raised as :class:`~fedcare.common.errors.ConfigError` and
printed there as one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedcare.simulations.realdata import DATASETS, MANIFEST_FILENAME, dataset, write_real_sites

__all__ = ["data_real"]


def data_real(
    name: Annotated[
        str, typer.Argument(help=f"The dataset: {', '.join(sorted(DATASETS))}.", show_default=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", help="New or empty folder for site-<i>/ and realdata.json.")
    ],
    seed: Annotated[
        int, typer.Option("--seed", help="Seed (>= 0) of each site's train/val/test split.")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the site folders and manifest in --out.")
    ] = False,
    for_deployment: Annotated[
        bool,
        typer.Option(
            "--for-deployment",
            help="No \\[simulation] opt-ins (reproducible noise, exact evaluation) in site.toml: "
            "hospitals for `fedcare site start`.",
        ),
    ] = False,
) -> None:
    """Write real public multi-hospital data (shipped in an installed package) as sites."""
    chosen = dataset(name)
    folders = write_real_sites(chosen, out, seed=seed, force=force, simulated=not for_deployment)
    root = folders[0].parent
    manifest = json.loads((root / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    _print_summary(manifest, root)


def _print_summary(manifest: dict[str, Any], out: Path) -> None:
    """One table row per site written: patients, positives, split sizes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    source = manifest["source"]
    table = Table(
        title=f"{manifest['dataset']}: {manifest['n_sites']} sites, task {manifest['task']!r} "
        f"({source['package']} {source['version']}, {source['file']})"
    )
    for col in ("site", "site id", "source", "patients", "positives", "rate", "train/val/test"):
        table.add_column(col, no_wrap=True)
    for s in manifest["sites"]:
        split = s["split"]
        table.add_row(
            s["folder"],
            s["site_id"],
            s["source_name"],
            str(s["n_patients"]),
            str(s["n_positive"]),
            f"{s['prevalence']:.2f}",
            f"{split['train']}/{split['val']}/{split['test']}",
        )
    console.print(table)
    console.print(
        f"wrote {manifest['n_sites']} sites ({manifest['n_patients']} patients) and "
        f"{MANIFEST_FILENAME} to {out}",
        soft_wrap=True,
    )
