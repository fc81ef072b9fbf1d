"""``fedcare demo``: the main job on an embedded default, for a newcomer's first run.

Four synthetic hospitals (the bundled ``demo`` scenario), each site's data checked, then a
federated run of the EHR readmission task with DP-SGD at every site on Flower's simulation
engine (the run-config defaults: the recipe of ``client/recipe.py``) and a DP fine-tune of
the result at each site, ending with per-site and global metrics, each site's global,
personalized and local-only model side by side, ε per site (this run's and the dataset's
lifetime total), and the pooled non-private baseline. Every demo is a new run with its own run id.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from fedcare.client.cli import data_check
from fedcare.common.locks import FolderLock
from fedcare.simulations.scenario import load_scenario
from fedcare.simulations.simulate_cli import print_results, run_with_progress
from fedcare.simulations.synth import synthesize

__all__ = ["demo"]


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the demo's files."),  # noqa: B008
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Federated rounds."),
) -> None:
    """Simulate a federation of four hospitals end to end on this machine."""
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    scenario = load_scenario("demo")
    sites = out / "sites"
    console.print(f"[bold]1/3[/bold] synthesizing {scenario.sites} hospitals into {sites}")
    out.mkdir(parents=True, exist_ok=True)
    # Not over the sites of a run that is going on in --out (the run takes the lock again).
    with FolderLock(out, what="--out"):
        synthesize(
            sites, n_sites=scenario.sites, seed=scenario.seed, config=scenario.synth, force=True
        )
    console.print("[bold]2/3[/bold] checking every site's data against its site.toml")
    data_check(sites, json_out=False)
    console.print(
        "[bold]3/3[/bold] federated training with DP-SGD at every site (Flower simulation)"
    )
    scenario = scenario.model_copy(update={"data_root": str(sites)})
    overrides = {"num-server-rounds": rounds} if rounds is not None else None
    outcome = run_with_progress(scenario, out, overrides=overrides, console=console)
    print_results(console, outcome)
    console.print(f"run directory: {outcome.run_dir} (summary.json, metrics.csv, plots/)")
    console.print(
        f"audit it: fedcare audit verify {outcome.run_dir} && fedcare audit attack "
        f"{outcome.run_dir} && fedcare audit report {outcome.run_dir} --out "
        f"{outcome.run_dir}/audit.html",
        markup=False,
        soft_wrap=True,
    )
