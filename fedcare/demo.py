"""``fedcare demo``: the main job on an embedded default, for a newcomer's first run."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from client.cli import data_check
from simulations.synth import synthesize

__all__ = ["demo"]


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's files."),  # noqa: B008
    sites: int = typer.Option(4, "--sites", min=2, help="Number of simulated hospitals."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic hospitals."),
) -> None:
    """Synthesize hospitals on this machine and check each site's data."""
    console = Console(highlight=False)
    data_root = out / "sites"
    console.print(f"[bold]1/2[/bold] synthesizing {sites} hospitals into {data_root} ...")
    synthesize(data_root, n_sites=sites, seed=seed, force=True)
    console.print("[bold]2/2[/bold] checking every site's data against its site.toml ...")
    data_check(data_root, json_out=False)
