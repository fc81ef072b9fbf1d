"""``fedcare simulate``: a simulated hospital federation, with progress and a results table."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.errors import ConfigError
from simulations.runner import RunOutcome, run_experiment
from simulations.scenario import Scenario, Sweep, load_scenario

__all__ = ["simulate", "run_with_progress", "results_table"]

HEADLINE = ("test.auroc", "test.auprc", "test.brier")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def results_table(outcome: RunOutcome) -> Table:
    """Per-site and global metrics, ε per site, and the baselines, in one table."""
    s = outcome.summary
    done = f"{s.rounds_completed}/{s.rounds_planned} rounds"
    title = f"run {s.run_id}: {s.task}, {s.strategy}, {done}"
    table = Table(
        title=title,
        title_justify="left",
    )
    for col in ("", "status", "n train", "ε (δ)", *HEADLINE, "local-only test.auroc"):
        table.add_column(col)
    local = s.baselines.local_only
    for site in s.sites:
        p = site.privacy
        eps = f"{p.epsilon:.2f} ({p.delta:g})" if p.enabled and p.epsilon is not None else "off"
        table.add_row(
            site.site_id,
            site.status,
            str(site.n_train),
            eps,
            *(_fmt(site.metrics.get(m)) for m in HEADLINE),
            _fmt(local.get(site.site_id, {}).get("test.auroc")),
        )
    final = s.global_.final
    table.add_row(
        "[bold]federated (global)[/bold]", "", "", "", *(_fmt(final.get(m)) for m in HEADLINE), ""
    )
    pooled = s.baselines.pooled
    if pooled:
        table.add_row(
            "pooled, non-private", "", "", "off", *(_fmt(pooled.get(m)) for m in HEADLINE), ""
        )
    return table


def run_with_progress(
    scenario: Scenario,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    console: Console,
    resume: bool = False,
) -> RunOutcome:
    """Run one experiment with a progress bar per round."""
    rounds = scenario.federation_config(**(overrides or {})).num_server_rounds
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        refresh_per_second=2,
        disable=not console.is_terminal,
    ) as progress:
        bar = progress.add_task("federated rounds", total=rounds, status="starting Flower ...")

        def on_progress(event: dict[str, Any]) -> None:
            metrics = event.get("metrics", {})
            auroc = metrics.get("test.auroc")
            status = (
                f"round {event['round']}: test AUROC {auroc:.3f}"
                if auroc is not None
                else "sites connected"
            )
            events = event.get("events", [])
            if events:
                status += f", {len(events)} event(s)"
            progress.update(bar, completed=event["round"], status=status)
            if not console.is_terminal:  # a log: one line per round instead of a live bar
                console.print(f"federated round {event['round']}/{rounds}: {status}")

        outcome = run_experiment(
            scenario, out, overrides=overrides, on_progress=on_progress, resume=resume
        )
        progress.update(bar, completed=rounds, status="baselines done")
    return outcome


def _parse_sweep(text: str) -> Sweep:
    key, sep, values = text.partition("=")
    if not sep or not values:
        raise ConfigError(
            f"--sweep {text!r}: write KEY=V1,V2,... e.g. target-epsilon=0.5,1,2,4,8,inf"
        )
    return Sweep(key=key.strip(), values=tuple(v.strip() for v in values.split(",") if v.strip()))


def _sweep_overrides(sweep: Sweep, value: str) -> dict[str, Any]:
    if sweep.key == "target-epsilon" and value.lower() in ("inf", "infinity"):
        return {"dp": False}
    try:
        number: Any = float(value)
        if number.is_integer() and sweep.key not in ("target-epsilon", "target-delta"):
            number = int(number)
    except ValueError:
        number = value
    return {sweep.key: number}


def simulate(
    out: Path = typer.Option(Path("runs/sim"), "--out", help="Run directory."),  # noqa: B008
    config: Path | None = typer.Option(None, "--config", help="Scenario TOML (or a bundled name)."),  # noqa: B008
    sites: int | None = typer.Option(None, "--sites", min=1, help="Number of simulated hospitals."),
    rounds: int | None = typer.Option(None, "--rounds", min=1, help="Federated rounds."),
    task: str | None = typer.Option(None, "--task", help="Task name from site.toml."),
    strategy: str | None = typer.Option(None, "--strategy", help="fedavg, fedprox, fedadam, ..."),
    epsilon: float | None = typer.Option(
        None, "--epsilon", help="Target ε per site (inf = no DP)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of data, split, model and noise."),
    data_root: Path | None = typer.Option(None, "--data-root", help="Existing site folders."),  # noqa: B008
    sweep: str | None = typer.Option(None, "--sweep", help="KEY=V1,V2,... one run per value."),
    baselines: bool = typer.Option(
        True, "--baselines/--no-baselines", help="Local-only and pooled."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
) -> None:
    """Run a simulated federation of hospitals with Flower's simulation engine."""
    scenario = load_scenario(config) if config is not None else Scenario()
    changes: dict[str, Any] = {"baselines": baselines}
    if sites is not None:
        changes["sites"] = sites
    if seed is not None:
        changes["seed"] = seed
    if data_root is not None:
        changes["data_root"] = str(data_root)
    federation = dict(scenario.federation)
    for key, value in (("num-server-rounds", rounds), ("task", task), ("strategy", strategy)):
        if value is not None:
            federation[key] = value
    if epsilon is not None:
        if math.isinf(epsilon):
            federation["dp"] = False
        else:
            federation.update({"dp": True, "target-epsilon": epsilon})
    scenario = Scenario.model_validate(
        {**scenario.model_dump(), **changes, "federation": federation}
    )
    if sweep is not None:
        scenario = scenario.model_copy(update={"sweep": _parse_sweep(sweep)})
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    if scenario.sweep is None:
        outcome = run_with_progress(scenario, out, console=console, resume=resume)
        console.print(results_table(outcome))
        console.print(f"run directory: {outcome.run_dir}")
        return
    from simulations.reports import plot_privacy_utility

    points = []
    table = Table(title=f"sweep over {scenario.sweep.key}", title_justify="left")
    for col in ("value", *HEADLINE, "max ε"):
        table.add_column(col)
    for value in scenario.sweep.values:
        console.print(f"[bold]{scenario.sweep.key} = {value}[/bold]")
        outcome = run_with_progress(
            scenario,
            out / f"{scenario.sweep.key}={value}",
            overrides=_sweep_overrides(scenario.sweep, value),
            console=console,
        )
        final = outcome.summary.global_.final
        eps = [s.privacy.epsilon for s in outcome.summary.sites if s.privacy.epsilon is not None]
        table.add_row(
            value, *(_fmt(final.get(m)) for m in HEADLINE), _fmt(max(eps) if eps else None)
        )
        x = math.inf if value.lower() in ("inf", "infinity") else float(value)
        if "test.auroc" in final:
            points.append((x, final["test.auroc"]))
    out.mkdir(parents=True, exist_ok=True)
    plot_privacy_utility(points, out / "privacy_utility.png", x_label=scenario.sweep.key)
    console.print(table)
    console.print(f"privacy-utility plot: {out / 'privacy_utility.png'}")
