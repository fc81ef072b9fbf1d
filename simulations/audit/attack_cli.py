"""``fedcare audit attack RUNDIR``: membership inference and a canary audit of a finished run.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Prints one table per site
(attack, AUC, TPR at 0.1% and 1% FPR; the canary ε lower bound against the claimed ε) and
saves the :class:`~fedcare.simulations.audit.findings.AttackReport` as
``RUNDIR/audit/attacks.json``.
Errors are :class:`~fedcare.common.errors.FedcareError` and become one line on stderr there.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcare.simulations.audit.attacks import (
    AttackOptions,
    CanaryOptions,
    audit_run,
    write_attack_report,
)
from fedcare.simulations.audit.findings import AttackReport

__all__ = ["audit_attack", "report_tables"]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def report_tables(report: AttackReport) -> list[tuple[str, Table, list[str]]]:
    """Per site: its title, its attack table, and its canary-audit lines."""
    sites = sorted({a.site_id for a in report.attacks} | {c.site_id for c in report.canaries})
    out = []
    for site_id in sites:
        table = Table(show_header=True, header_style="bold", show_edge=False)
        for name in ("attack", "members", "held-out", "AUC", "TPR@0.1%FPR", "TPR@1%FPR"):
            table.add_column(name, justify="left" if name == "attack" else "right")
        for a in (a for a in report.attacks if a.site_id == site_id):
            table.add_row(
                a.attack,
                str(a.n_members),
                str(a.n_nonmembers),
                f"{a.auc:.3f}",
                _pct(a.tpr_at_0_1pct_fpr),
                _pct(a.tpr_at_1pct_fpr),
            )
        lines = []
        for c in (c for c in report.canaries if c.site_id == site_id):
            claim = (
                "no ε claimed (non-private run)"
                if c.claimed_epsilon is None
                else f"claimed ε = {c.claimed_epsilon:.3g}: "
                + (
                    "below the claim"
                    if c.below_claim
                    else "ABOVE THE CLAIM: the DP claim is refuted"
                )
            )
            delta = "" if report.delta is None else f" (δ = {report.delta:g})"
            lines.append(
                f"canary audit: {c.n_correct}/{c.n_guesses} guesses right on {c.n_canaries} "
                f"canaries -> ε ≥ {c.epsilon_lower_bound:.3f} at {100 * c.confidence:.0f}% "
                f"confidence{delta}; {claim}"
            )
        out.append((f"site {site_id}", table, lines))
    return out


def audit_attack(
    run_dir: Path = typer.Argument(  # noqa: B008
        ..., help="A finished run directory (the --out of `fedcare simulate`)."
    ),
    reference_models: int = typer.Option(
        4, "--reference-models", min=1, help="Reference models of the calibrated attack (RMIA)."
    ),
    canaries: int | None = typer.Option(
        None, "--canaries", min=2, help="Canaries per site (default 500, or all there are)."
    ),
    guesses: int | None = typer.Option(
        None, "--guesses", min=1, help="Canary guesses per side, fixed in advance (default m/10)."
    ),
    site: list[str] | None = typer.Option(  # noqa: B008
        None, "--site", help="Audit only this site id (repeat for more); default: every site."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of reference models and canaries."),
    confidence: float = typer.Option(
        0.95, "--confidence", min=0.5, max=0.9999, help="Confidence of the canary ε bound."
    ),
    no_canaries: bool = typer.Option(False, "--no-canaries", help="Skip the canary audit."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Attack a run's final global model: membership inference per site (loss threshold,
    offline RMIA) and a one-run canary audit giving an empirical lower bound on ε.

    Raises
    ------
    ConfigError
        ``run_dir`` is not a finished run, a site folder is gone, or an option is invalid.
    """
    console = Console(highlight=False)
    skipped: list[str] = []
    report = audit_run(
        run_dir,
        sites=site or (),
        attack_options=AttackOptions(reference_models=reference_models, seed=seed),
        canary_options=None
        if no_canaries
        else CanaryOptions(canaries=canaries, guesses=guesses, beta=1.0 - confidence, seed=seed),
        device=device,
        on_skip=lambda s, a, why: skipped.append(f"site {s}: {a} skipped: {why}"),
    )
    path = write_attack_report(report, run_dir)
    kind = "DP" if report.dp else "non-private"
    console.print(f"run {report.run_id} ({kind})", style="bold", markup=False, soft_wrap=True)
    for title, table, lines in report_tables(report):
        console.print(title, style="bold", markup=False)
        console.print(table)
        for line in lines:
            console.print(f"  {line}", markup=False, soft_wrap=True)
        console.print()
    for line in skipped:
        console.print(line, markup=False, soft_wrap=True)
    if any(a.n_nonmembers < 1000 for a in report.attacks):
        console.print(
            "TPR at 0.1% FPR with fewer than 1000 held-out patients is the TPR at zero false "
            "positives (members scored above every held-out patient).",
            markup=False,
            soft_wrap=True,
        )
    console.print(f"saved {path}", markup=False, soft_wrap=True)
