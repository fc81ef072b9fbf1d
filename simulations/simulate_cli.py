"""``fedcare simulate``: a simulated hospital federation, with progress and a results table."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedcare.common import keys, stopping
from fedcare.common.audit_kinds import EVALUATE_FAILED
from fedcare.common.errors import ConfigError
from fedcare.common.locks import FolderLock
from fedcare.common.spec import SPEC_FILENAME, format_validation_error, load_site_spec
from fedcare.common.summary import Privacy, RunSummary, SiteResult
from fedcare.common.tomlcompat import tomllib
from fedcare.simulations.flower_driver import SharedSuperLink
from fedcare.simulations.reports import (
    MissingMetric,
    missing_cell,
    missing_metric_notes,
    missing_reason,
)
from fedcare.simulations.runner import (
    CONFIG_NAME,
    RunOutcome,
    make_out_dir,
    recorded_run_id,
    run_experiment,
)
from fedcare.simulations.scenario import Scenario, Sweep, load_scenario
from fedcare.simulations.synth.tasks import TASKS as SYNTH_TASKS

__all__ = [
    "simulate",
    "run_with_progress",
    "results_table",
    "privacy_notes",
    "missing_notes",
    "print_results",
    "fairness_table",
]

#: The global model's metrics shown per site and for the federation: ranking, the balanced
#: accuracy at the validation-chosen threshold, and calibration.
HEADLINE = ("test.auroc", "test.balanced_accuracy", "test.auprc", "test.brier")
#: The local-only baseline's metric shown beside each site's.
LOCAL_HEADLINE = "test.auroc"
#: The personalized model's metric shown beside the global model's and the local-only one.
PERSONAL_HEADLINE = "test.auroc"
#: A survival task's (fedcare.models.survival): C-index, time-dependent AUC, integrated Brier.
SURVIVAL_HEADLINE = ("test.c_index", "test.td_auc", "test.ibs")


def _headline(summary: RunSummary) -> tuple[tuple[str, ...], str]:
    """The columns of the results table and the local-only/personal one: a survival run's
    (its sites or its global metrics report a C-index) or a binary run's."""
    reported = [summary.global_.final, *(s.metrics for s in summary.sites)]
    if any(any(k.endswith(".c_index") for k in m) for m in reported):
        return SURVIVAL_HEADLINE, SURVIVAL_HEADLINE[0]
    return HEADLINE, LOCAL_HEADLINE


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}"
    return str(value)


def _epsilons(p: Privacy) -> tuple[str, str]:
    """The "run ε" and "lifetime ε (δ)" cells of a site ("off" without DP, "-" unknown)."""
    if not p.enabled:
        return "off", "off"
    run = "-" if p.run_epsilon is None else f"{p.run_epsilon:.2f}"
    life = "-" if p.epsilon is None else f"{p.epsilon:.2f} ({p.delta:g})"
    return run, life


def results_table(outcome: RunOutcome) -> Table:
    """Per-site and global metrics, ε per site (this run's and lifetime), and the baselines.

    A site whose noise was reproducible or whose evaluation was exact is marked with ``*``
    in the status column; :func:`privacy_notes` says what that means. With personal models
    (the run's ``personalization``), each site's row shows its global model, its
    personalized model and its local-only baseline side by side (test AUROC).
    """
    s = outcome.summary
    headline, local_headline = _headline(s)
    done = f"{s.rounds_completed}/{s.rounds_planned} rounds"
    title = f"run {s.run_id}: {s.task}, {s.strategy}, {done}"
    table = Table(
        title=title,
        title_justify="left",
    )
    columns = ("", "status", "n train", "run ε", "lifetime ε (δ)", *headline)
    personal = _personal_column(s)
    for col in (*columns, *personal, f"local-only {local_headline}"):
        table.add_column(col)
    local = s.baselines.local_only
    min_count = _site_min_count(outcome.run_dir)
    for site in s.sites:
        flagged = site.site_id in _weakened(s)
        table.add_row(
            site.site_id,
            site.status + (" *" if flagged else ""),
            str(site.n_train),
            *_epsilons(site.privacy),
            *_site_cells(site, min_count=min_count, headline=headline),
            *(_fmt(site.personal_metrics.get(PERSONAL_HEADLINE)) for _ in personal),
            _local_only_cell(local.get(site.site_id), min_count=min_count, name=local_headline),
        )
    table.add_row(
        "[bold]federated (global)[/bold]",
        "",
        "",
        "",
        "",
        *(_global_cell(s, m, min_count=min_count) for m in headline),
        *("" for _ in personal),
        "",
    )
    pooled = s.baselines.pooled
    if pooled:
        table.add_row(
            "pooled, non-private",
            "",
            "",
            "off",
            "off",
            *(_fmt(pooled.get(m)) for m in headline),
            *("" for _ in personal),
            "",
        )
    return table


def _personal_column(summary: RunSummary) -> tuple[str, ...]:
    """The personalized model's column, when the run kept personal models."""
    if summary.personalization == "none" and not any(s.personal_metrics for s in summary.sites):
        return ()
    return (f"personal ({summary.personalization}) {PERSONAL_HEADLINE}",)


def _weakened(summary: RunSummary) -> set[str]:
    return {
        s.site_id
        for s in summary.sites
        if s.privacy.noise == keys.NOISE_REPRODUCIBLE or s.privacy.evaluation == keys.EVAL_EXACT
    }


def privacy_notes(summary: RunSummary) -> list[str]:
    """Sentences a run's output must carry: reproducible noise and exact evaluation.

    Empty when every site drew its noise from OS entropy and released evaluations with DP.
    """
    notes = []
    seeded = [s.site_id for s in summary.sites if s.privacy.noise == keys.NOISE_REPRODUCIBLE]
    if seeded:
        notes.append(
            f"* noise = reproducible at {', '.join(seeded)}: the DP noise came from a seed in "
            "the site's own site.toml, not OS entropy; the ε shown does not hold against "
            "anyone who knows that seed (simulation only)"
        )
    exact = [s.site_id for s in summary.sites if s.privacy.evaluation == keys.EVAL_EXACT]
    if exact:
        notes.append(
            f"* evaluation = exact at {', '.join(exact)}: the site's own site.toml released its "
            "evaluation metrics without DP noise, so ε does not cover them (simulation only)"
        )
    return notes


def _site_min_count(run_dir: Path) -> int | None:
    """The simulated sites' minimum count (``site-min-count``) the run recorded, if readable.

    Every simulated site enforces that one count
    (:func:`fedcare.client.policy.simulated_site_policy`),
    the local-only baseline too. ``None`` where the run directory holds no readable record.
    """
    try:
        recorded = tomllib.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    federation = recorded.get("federation")
    value = federation.get("site-min-count") if isinstance(federation, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _evaluated(site: SiteResult) -> bool:
    """Whether the site answered an evaluation: it reported metrics or its evaluation mode."""
    return bool(site.metrics) or site.privacy.evaluation is not None


def _not_evaluated_detail(summary: RunSummary, site: SiteResult) -> str:
    """Why a site has no evaluation, in words: its status, else its last failed evaluation."""
    if site.status != "completed" and site.reason:
        return f"{site.status}: {site.reason}"
    failed = [e for e in summary.events if e.site_id == site.site_id and e.kind == EVALUATE_FAILED]
    if failed:
        return f"its evaluation failed in round {failed[-1].round}: {failed[-1].detail}"
    return "it answered no evaluation request"


def _missing(summary: RunSummary) -> list[MissingMetric]:
    """Every site and split of the results table shown without values, with the reason."""
    out = []
    local = summary.baselines.local_only
    headline, local_headline = _headline(summary)
    for site in summary.sites:
        for name in headline:
            reason = missing_reason(site.metrics, name, evaluated=_evaluated(site))
            if reason is not None:
                detail = _not_evaluated_detail(summary, site) if reason == "not evaluated" else ""
                out.append(
                    MissingMetric(site.site_id, name.split(".", 1)[0], reason, False, detail)
                )
        baseline = local.get(site.site_id)
        reason = (
            None if baseline is None else missing_reason(baseline, local_headline, evaluated=True)
        )
        if reason is not None:
            out.append(MissingMetric(site.site_id, local_headline.split(".", 1)[0], reason, True))
    return out


def _site_cells(
    site: SiteResult, *, min_count: int | None, headline: tuple[str, ...] = HEADLINE
) -> list[str]:
    """A site's ``headline`` cells: a value, or why there is none."""
    evaluated = _evaluated(site)
    return [
        _fmt(site.metrics[m])
        if m in site.metrics
        else missing_cell(missing_reason(site.metrics, m, evaluated=evaluated), min_count=min_count)
        for m in headline
    ]


def _local_only_cell(
    metrics: dict[str, float] | None, *, min_count: int | None, name: str = LOCAL_HEADLINE
) -> str:
    """The local-only baseline's cell: a value, why there is none, or ``-`` (not run)."""
    if metrics is None:
        return "-"
    if name in metrics:
        return _fmt(metrics[name])
    reason = missing_reason(metrics, name, evaluated=True)
    return missing_cell(reason, min_count=min_count)


def _global_cell(summary: RunSummary, name: str, *, min_count: int | None) -> str:
    """The global row's cell: a value, or why there is none.

    ``withheld``: no site released that split; ``not evaluated``: no site evaluated;
    ``undefined``: the pooled split has no such metric (one class only).
    """
    final = summary.global_.final
    if name in final:
        return _fmt(final[name])
    evaluated = any(_evaluated(s) for s in summary.sites)
    return missing_cell(missing_reason(final, name, evaluated=evaluated), min_count=min_count)


def missing_notes(outcome: RunOutcome) -> list[str]:
    """Lines that say why some cells of :func:`results_table` have no value, and how to get
    them (:func:`fedcare.simulations.reports.missing_metric_notes`); empty when none is missing."""
    min_count = _site_min_count(outcome.run_dir)
    return missing_metric_notes(_missing(outcome.summary), min_count=min_count)


def fairness_table(summary: RunSummary) -> Table | None:
    """The global model's test metrics per patient group and the largest gap, per group
    attribute of the run (:func:`fedcare.simulations.audit.model_card.group_rows`); ``None``
    when the run reports no group."""
    from fedcare.simulations.audit.model_card import group_rows

    table = Table(title="global model per patient group (test)", title_justify="left")
    for col in ("attribute", "group", "n", "AUROC", "TPR", "FPR", "calibration error"):
        table.add_column(col)
    shown = False
    for group in summary.groups:
        for row in group_rows(summary.global_.final, group):
            shown = True
            v = row.values
            n = v.get("n")
            table.add_row(
                group.name,
                row.label,
                "" if n is None else str(int(n)),
                *(_fmt(v.get(m)) for m in ("auroc", "tpr", "fpr", "calibration_error")),
            )
    return table if shown else None


def print_results(console: Console, outcome: RunOutcome) -> None:
    """The results table, then the notes of :func:`privacy_notes` and :func:`missing_notes`,
    and the per-group table where the run has groups (:func:`fairness_table`)."""
    console.print(results_table(outcome))
    groups = fairness_table(outcome.summary)
    if groups is not None:
        console.print(groups)
    for note in privacy_notes(outcome.summary):
        console.print(note, style="bold yellow", markup=False, soft_wrap=True)
    for note in missing_notes(outcome):
        console.print(note, markup=False, soft_wrap=True)


def _progress_status(event: dict[str, Any]) -> str:
    """The status shown for a ``progress.jsonl`` line (:mod:`fedcare.server.recorder`).

    Its metrics are those of round ``evaluated_round``, not of the line's own round where
    evaluation is folded into the next train message (round r's line usually shows round
    r - 1's evaluation), so they are labelled with that round.

    Examples
    --------
    >>> _progress_status({"round": 2, "metrics": {"test.auroc": 0.7123}, "evaluated_round": 1})
    'evaluated round 1: test AUROC 0.712'
    >>> _progress_status({"round": 3, "metrics": {"test.c_index": 0.68}, "evaluated_round": 2})
    'evaluated round 2: test C-index 0.680'
    >>> _progress_status({"round": 0, "metrics": {}, "evaluated_round": None})
    'sites connected'
    """
    metrics = event.get("metrics") or {}
    # A binary task's headline metric, else a survival task's.
    shown = [(label, metrics[key]) for key, label in _HEADLINE if key in metrics]
    if not shown:
        return "sites connected"
    label, value = shown[0]
    evaluated = event.get("evaluated_round")
    if evaluated is None:  # a line written before the recorder said which round it shows
        return f"round {event['round']}: test {label} {value:.3f}"
    return f"evaluated round {evaluated}: test {label} {value:.3f}"


#: The metric a progress line shows, in order of preference: (metrics key, label).
_HEADLINE = (("test.auroc", "AUROC"), ("test.c_index", "C-index"))


def run_with_progress(
    scenario: Scenario,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    console: Console,
    resume: bool = False,
    superlink: SharedSuperLink | None = None,
) -> RunOutcome:
    """Run one experiment with a progress bar per round (on ``superlink`` where given)."""
    stopping.set_resume_hint(
        f"the rounds completed so far (checkpoint, audit log, ledgers) are kept in {out}; "
        f"continue with `fedcare simulate --out {out} --resume` and the same options"
    )
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
            status = _progress_status(event)
            events = event.get("events", [])
            if events:
                status += f", {len(events)} event(s)"
            progress.update(bar, completed=event["round"], status=status)
            if not console.is_terminal:  # a log: one line per round instead of a live bar
                console.print(f"federated round {event['round']}/{rounds}: {status}")

        outcome = run_experiment(
            scenario,
            out,
            overrides=overrides,
            on_progress=on_progress,
            resume=resume,
            superlink=superlink,
        )
        progress.update(bar, completed=rounds, status="baselines done")
    return outcome


@contextlib.contextmanager
def _sweep_superlink(out: Path) -> Iterator[SharedSuperLink]:
    """The one SuperLink and Ray cluster of a sweep into ``out`` (in ``out/.flower``), with
    ``out`` locked.

    Both start with the first value and stop after the last (or on an error); each value
    is still its own Flower run (its own ``flwr-simulation`` and Ray actors), in its own
    ``out/KEY=VALUE`` with its own ledgers. ``out`` stays locked meanwhile: the SuperLink's
    ``FLWR_HOME`` is there.
    """
    make_out_dir(out, "hold the sweep")
    with FolderLock(out, what="--out"), SharedSuperLink(work_dir=out / ".flower") as link:
        yield link


def _parse_sweep(text: str) -> Sweep:
    key, sep, values = text.partition("=")
    parsed = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not parsed:
        raise ConfigError(
            f"--sweep {text!r}: write KEY=V1,V2,... e.g. target-epsilon=0.5,1,2,4,8,inf"
        )
    return Sweep(key=key.strip(), values=parsed)


def _check_tasks(scenario: Scenario, tasks: list[str]) -> None:
    """Every task a sweep asks for exists at the sites, before the first value trains (the
    run itself checks again after the sites are written)."""
    if scenario.data_root:
        root = Path(scenario.data_root)
        first = next(iter(sorted(root.glob(f"*/{SPEC_FILENAME}"))), None)
        if first is None:
            return  # the run says what is wrong with the folder
        known = {t.name for t in load_site_spec(first).tasks}
    else:
        known = set(SYNTH_TASKS)
    unknown = sorted({t for t in tasks if t not in known})
    if unknown:
        raise ConfigError(
            f"the sweep asks for task(s) {', '.join(map(repr, unknown))}, which the sites do "
            f"not define (defined: {', '.join(sorted(known))}); fix the sweep's values"
        )


def _check_out(out: Path) -> None:
    """``--out`` must be a folder or not exist yet, and nothing above it a file."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"is below the file {path}"
                raise ConfigError(f"--out {out} {where}; give a folder (created if missing)")
            return


def _parse_settings(settings: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as run-config values (numbers and booleans parsed)."""
    parsed: dict[str, Any] = {}
    for text in settings:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {text!r}: write KEY=VALUE, e.g. --set proximal-mu=0.01")
        raw = value.strip()
        number: Any
        if raw.lower() in ("true", "false"):
            number = raw.lower() == "true"
        else:
            try:
                number = int(raw)
            except ValueError:
                try:
                    number = float(raw)
                except ValueError:
                    number = raw
        parsed[key.strip()] = number
    return parsed


def _sweep_x(value: str) -> float | None:
    """A sweep value as a point on the privacy-utility plot's axis (None: not a number > 0).

    >>> _sweep_x("0.5"), _sweep_x("inf"), _sweep_x("fedprox"), _sweep_x("0")
    (0.5, inf, None, None)
    """
    try:
        x = float(value)
    except ValueError:
        return None
    return x if x > 0 else None


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
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of data, splits and model (DP noise: each site's own)."
    ),
    data_root: Path | None = typer.Option(None, "--data-root", help="Existing site folders."),  # noqa: B008
    sweep: str | None = typer.Option(None, "--sweep", help="KEY=V1,V2,... one run per value."),
    baselines: bool | None = typer.Option(
        None, "--baselines/--no-baselines", help="Local-only and pooled (default: scenario's)."
    ),
    settings: list[str] = typer.Option(  # noqa: B008
        [], "--set", help="KEY=VALUE run-config setting (repeatable), e.g. proximal-mu=0.01."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the interrupted run recorded in --out (its run id)."
    ),
) -> None:
    """Run a simulated federation of hospitals with Flower's simulation engine."""
    _check_out(out)
    scenario = load_scenario(config) if config is not None else Scenario()
    changes: dict[str, Any] = {}
    if baselines is not None:
        changes["baselines"] = baselines
    if sites is not None:
        changes["sites"] = sites
    if seed is not None:
        changes["seed"] = seed
    if data_root is not None:
        changes["data_root"] = str(data_root)
    federation = dict(scenario.federation)
    federation.update(_parse_settings(settings))
    for key, value in (("num-server-rounds", rounds), ("task", task), ("strategy", strategy)):
        if value is not None:
            federation[key] = value
    if epsilon is not None:
        if math.isinf(epsilon):
            federation["dp"] = False
        else:
            federation.update({"dp": True, "target-epsilon": epsilon})
    try:
        scenario = Scenario.model_validate(
            {**scenario.model_dump(), **changes, "federation": federation}
        )
    except ValidationError as e:
        raise ConfigError(format_validation_error("the command line and scenario", e)) from e
    if sweep is not None:
        scenario = scenario.model_copy(update={"sweep": _parse_sweep(sweep)})
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    if scenario.sweep is None:
        if resume:
            console.print(f"resuming run {recorded_run_id(out.resolve())} in {out}", markup=False)
        outcome = run_with_progress(scenario, out, console=console, resume=resume)
        print_results(console, outcome)
        console.print(f"run directory: {outcome.run_dir}")
        return
    if resume:
        raise ConfigError(
            "--resume continues one run, not a sweep (--sweep or the scenario's [sweep]); "
            f"resume one value's run with --out {out}/KEY=VALUE --resume, that value's options "
            "and a scenario without [sweep]"
        )
    plan = scenario.sweep_plan()  # every value validated before the first one trains
    _check_tasks(scenario, [run.config.task for run in plan])
    from fedcare.simulations.reports import plot_privacy_utility

    key = scenario.sweep.key
    points: list[tuple[float | None, float]] = []
    notes: list[str] = []
    table = Table(title=f"sweep over {key}", title_justify="left")
    for col in ("value", "run id", *HEADLINE, "max run ε", "max lifetime ε"):
        table.add_column(col)
    with _sweep_superlink(out) as link:
        for run in plan:
            console.print(f"[bold]{key} = {run.value}[/bold]")
            outcome = run_with_progress(
                scenario,
                out / f"{key}={run.value}",
                overrides=run.overrides,
                console=console,
                superlink=link,
            )
            summary = outcome.summary
            final = summary.global_.final
            run_eps = [s.privacy.run_epsilon for s in summary.sites]
            life_eps = [s.privacy.epsilon for s in summary.sites]
            table.add_row(
                run.value,
                summary.run_id,
                *(_fmt(final.get(m)) for m in HEADLINE),
                _fmt(max((e for e in run_eps if e is not None), default=None)),
                _fmt(max((e for e in life_eps if e is not None), default=None)),
            )
            notes += [
                f"{key} = {run.value}: {n.removeprefix('* ')}" for n in privacy_notes(summary)
            ]
            if "test.auroc" in final:
                points.append((_sweep_x(run.value), final["test.auroc"]))
    console.print(table)
    for note in notes:
        console.print(note, style="bold yellow", markup=False, soft_wrap=True)
    plotted = [(x, y) for x, y in points if x is not None]
    if len(plotted) < len(points):
        console.print(f"no privacy-utility plot: the values of {key} are not all numbers > 0")
        return
    out.mkdir(parents=True, exist_ok=True)
    plot_privacy_utility(plotted, out / "privacy_utility.png", x_label=key)
    console.print(f"privacy-utility plot: {out / 'privacy_utility.png'}")
