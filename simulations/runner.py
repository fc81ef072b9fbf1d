"""Run a simulated multi-hospital federation end to end, the way Flower supports it.

``run_experiment`` prepares the sites (synthesized, or existing folders), checks every site's
data and that all share one schema, writes the resolved config, then runs fedcare's own
ServerApp and ClientApp with ``flwr run`` against a local simulation SuperLink (and the Ray
cluster its runs join) that it starts and stops, or one a sweep shares
(:mod:`fedcare.simulations.flower_driver`). The SuperLink and Ray start first, and come up
while the runner prepares and checks the sites. The run is over once the ServerApp has
written its record and summary; its simulation is then ended at once. While the
run goes it shows a progress bar fed by the server's ``progress.jsonl``. Afterwards it
computes the baselines (each site alone; all data pooled, non-private) and writes the run
directory:

``config.toml`` (resolved, the run id included), ``summary.json`` (schema:
``common/summary.py``), ``metrics.csv`` (round, site, split, metric, value; the baselines
too), ``final_model.pt``, ``plots/*.png``.

Every run has its own run id (:func:`new_run_id`), unless the scenario names one: sites key
their ledger charges and stored releases on it, so two runs must never share one. Resuming
continues the run recorded in the folder (:func:`recorded_run_id`), under its own id; a new
run in a folder that holds an earlier one clears that run's results first. One process at a
time works in a run directory: it holds ``<out>/.lock`` (:mod:`fedcare.common.locks`) for the whole
run, and a second run on the same folder is refused, naming the first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import secrets
import shutil
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import tomli_w

from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.local import settings_from_run
from fedcare.client.policy import simulated_site_policy
from fedcare.common.errors import ConfigError, DataError
from fedcare.common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from fedcare.common.locks import FolderLock
from fedcare.common.run_files import (
    BASELINE_LEDGERS_DIR,
    CONFIG_NAME,
    METRICS_NAME,
    PROGRESS_NAME,
    RECORD_NAME,
    SITES_DIR,
    SITES_MANIFEST_NAME,
    STATE_DIR,
    SUMMARY_NAME,
)
from fedcare.common.run_record import RunRecord, load_run_record
from fedcare.common.spec import SPEC_FILENAME, describe_schema_difference, load_site_spec
from fedcare.common.summary import RunSummary, write_summary
from fedcare.common.tomlcompat import tomllib
from fedcare.server.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from fedcare.server.summary import build_summary
from fedcare.simulations.baselines import local_only, pooled
from fedcare.simulations.flower_driver import (
    FlowerRunError,
    RunHandle,
    RunSource,
    local_superlink,
    write_app_dir,
)
from fedcare.simulations.reports import (
    MetricRow,
    Split,
    baseline_rows,
    personal_rows,
    write_metrics_csv,
    write_run_plots,
)
from fedcare.simulations.scenario import Scenario
from fedcare.simulations.synth import synthesize
from fedcare.simulations.synth.tasks import TASKS as SYNTH_TASKS

_log = logging.getLogger(__name__)

STATE_DIR_NAME = STATE_DIR
"""The folder of a run directory that holds its simulated sites' durable state."""

__all__ = [
    "STATE_DIR_NAME",
    "run_experiment",
    "make_out_dir",
    "prepare_sites",
    "RunOutcome",
    "new_run_id",
    "recorded_run_id",
    "metric_rows",
    "CONFIG_NAME",
    "METRICS_NAME",
]

_RUN_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")

ProgressFn = Callable[[dict[str, Any]], None]


def new_run_id(name: str, *, now: datetime | None = None, token: str | None = None) -> str:
    """A fresh run id: ``<name>-<UTC time>-<8 random hex digits>``.

    Parameters
    ----------
    name:
        The scenario's name; characters other than letters, digits, ``_``, ``.`` and ``-``
        become ``-``.
    now:
        The start time (default: now); a naive datetime is taken as UTC.
    token:
        The random part (default: 4 bytes from :func:`secrets.token_hex`), so two runs
        started in the same second still differ.

    Examples
    --------
    >>> new_run_id("demo", now=datetime(2025, 1, 2, 3, 4, 5), token="0a1b2c3d")
    'demo-20250102T030405Z-0a1b2c3d'
    """
    when = now or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    stamp = when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = _RUN_ID_UNSAFE.sub("-", name).strip("-") or "run"
    return f"{safe}-{stamp}-{token if token is not None else secrets.token_hex(4)}"


def recorded_run_id(out: Path) -> str:
    """The id of the run an earlier start recorded in ``out``: the one a resume continues.

    Read from ``config.toml`` (``[federation] run-id``), else from the checkpoint.

    Raises
    ------
    ConfigError
        ``out`` holds no earlier run, its record is unreadable, or ``config.toml`` and the
        checkpoint name different runs.
    """
    out = Path(out)
    config = out / CONFIG_NAME
    from_config: str | None = None
    if config.is_file():
        try:
            federation = tomllib.loads(config.read_text(encoding="utf-8")).get("federation", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(
                f"{config}: cannot read the earlier run's record ({e}); start a new run "
                "without --resume"
            ) from e
        run_id = federation.get("run-id") if isinstance(federation, dict) else None
        if not isinstance(run_id, str) or not run_id:
            raise ConfigError(
                f"{config}: records no [federation] run-id, so there is no run to resume; "
                "start a new run without --resume"
            )
        from_config = run_id
    try:
        checkpoint = load_checkpoint(out)
    except CheckpointError as e:
        raise ConfigError(
            f"{e.path}: cannot read the earlier run's checkpoint: {e.reason}. Fix: put back a "
            "good copy of it to resume, or start a new run without --resume (or in another "
            "--out)"
        ) from e
    if checkpoint is not None and from_config is not None and checkpoint.run_id != from_config:
        raise ConfigError(
            f"{out}: {CONFIG_NAME} records run {from_config} but {CHECKPOINT_NAME} holds run "
            f"{checkpoint.run_id}; the folder mixes two runs, start a new run without --resume"
        )
    if from_config is not None:
        return from_config
    if checkpoint is not None:
        return checkpoint.run_id
    raise ConfigError(
        f"{out}: no earlier run to resume (no {CONFIG_NAME} or {CHECKPOINT_NAME} there); "
        "start a new run without --resume, or give the --out of the interrupted run"
    )


def _check_same_run(out: Path, cfg: FederationConfig) -> None:
    """A resume must ask for exactly the configuration the recorded run started with."""
    config = out / CONFIG_NAME
    if not config.is_file():
        return  # only a checkpoint: nothing recorded to compare with
    recorded = tomllib.loads(config.read_text(encoding="utf-8")).get("federation", {})
    now = cfg.to_run_config()
    changed = sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))
    if changed:
        diffs = "; ".join(
            f"{k} = {recorded.get(k)!r} then, {now.get(k)!r} now" for k in changed[:5]
        ) + (f"; and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ConfigError(
            f"cannot resume run {cfg.run_id} in {out} with another configuration ({diffs}); "
            "resume with the options it started with, or start a new run without --resume"
        )


def prepare_sites(scenario: Scenario, out: Path, *, reuse: bool = False) -> list[Path]:
    """The site folders of the experiment: existing ones, or freshly synthesized.

    With ``reuse`` (resuming), the folders an earlier start listed in ``sites.json`` are kept
    as they are, ledgers included.
    """
    manifest = out / SITES_MANIFEST_NAME
    if reuse and manifest.is_file():
        return [Path(p) for p in json.loads(manifest.read_text(encoding="utf-8"))]
    if scenario.data_root:
        root = Path(scenario.data_root)
        if not root.is_dir():
            raise ConfigError(f"--data-root {root}: no such folder")
        sites = sorted(p for p in root.iterdir() if (p / SPEC_FILENAME).is_file())
        if not sites:
            raise ConfigError(
                f"--data-root {root}: no folder inside holds a {SPEC_FILENAME}; each site "
                "needs its own folder with a site.toml (see `fedcare data synth`)"
            )
        return sites
    return synthesize(
        out / SITES_DIR,
        n_sites=scenario.sites,
        seed=scenario.seed,
        config=scenario.synth,
        force=True,
    )


def _check_task(scenario: Scenario, out: Path, task: str, *, reuse: bool) -> None:
    """Refuse a task the sites do not define, from their ``site.toml`` alone (milliseconds),
    before Flower starts; :func:`load_sites` checks everything else while it starts.

    Raises
    ------
    ConfigError
        A site (or the synthesizer) defines no such task; the message lists those it does.
    """
    manifest = out / SITES_MANIFEST_NAME
    if reuse and manifest.is_file():
        folders = [Path(p) for p in json.loads(manifest.read_text(encoding="utf-8"))]
    elif scenario.data_root:
        root = Path(scenario.data_root)
        if not root.is_dir():
            return  # prepare_sites names the missing folder
        folders = sorted(p for p in root.iterdir() if (p / SPEC_FILENAME).is_file())
    else:
        if task not in SYNTH_TASKS:
            raise ConfigError(
                f"the synthetic sites define no task {task!r} (defined: "
                f"{', '.join(sorted(SYNTH_TASKS))}); pick one of them"
            )
        return
    for folder in folders:
        if (folder / SPEC_FILENAME).is_file():  # else load_sites says what is missing
            load_site_spec(folder / SPEC_FILENAME).task(task)


def load_sites(folders: list[Path], *, task: str | None = None) -> list[SiteData]:
    """Load and validate every site; all must share one schema and distinct site ids, and
    define ``task`` when it is given (checked before Flower starts)."""
    sites = [load_site(f) for f in folders]
    if task is not None:
        for site in sites:
            site.spec.task(task)
    ref = sites[0].spec
    differing = [
        f"{s.spec.site_id}: "
        + describe_schema_difference(
            ref.feature_schema, s.spec.feature_schema, a_name=ref.site_id, b_name=s.spec.site_id
        )
        for s in sites[1:]
        if s.spec.feature_schema.fingerprint() != ref.feature_schema.fingerprint()
    ]
    if differing:
        raise DataError(
            "the sites do not share one feature schema: "
            + " | ".join(differing)
            + "; give every site.toml the federation's schema"
        )
    ids = [s.spec.site_id for s in sites]
    if len(set(ids)) != len(ids):
        raise DataError(f"two site folders declare the same site_id: {ids}; make them unique")
    return sites


class RunOutcome:
    """What a finished experiment left: its folder and summary."""

    def __init__(self, run_dir: Path, summary: RunSummary) -> None:
        self.run_dir = run_dir
        self.summary = summary


def make_out_dir(out: Path, purpose: str) -> None:
    """Create ``--out`` (and its parents); one line naming it and the fix if it cannot be.

    ``purpose`` completes "--out OUT: cannot ..." (e.g. "be the run directory").
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot {purpose} ({e.strerror or e}); give a folder this user can write"
        ) from e


def run_experiment(
    scenario: Scenario,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    timeout_s: float = 3600.0,
    resume: bool = False,
    superlink: RunSource | None = None,
) -> RunOutcome:
    """Run one federated experiment into ``out`` (see the module docstring).

    Without ``superlink`` the run starts its own local simulation SuperLink and Ray cluster
    in ``<out>/.flower`` (before the sites are prepared and checked, so that they start
    meanwhile) and stops them (and everything they spawned) before returning. With a
    :class:`~fedcare.simulations.flower_driver.SharedSuperLink` (a sweep's values share one), the
    run is submitted to that SuperLink, started by the first run that asks, and left
    running for the next; the run is still its own Flower run, with its own run directory
    and ledger state.

    The run is over once its ServerApp has written its record and summary: its
    ``flwr-simulation`` and Ray processes are then killed
    (:meth:`~fedcare.simulations.flower_driver.SuperLinkHandle.end_run`) instead of waiting
    seconds for Flower to shut them down.

    The run gets a fresh id from :func:`new_run_id` unless the scenario (or ``overrides``)
    sets ``run-id``; any earlier run's state in ``out`` is cleared. With ``resume``, the run
    recorded in ``out`` (:func:`recorded_run_id`) is continued from its last completed round,
    under its own id and with the configuration it started with.

    ``out`` is locked (:class:`fedcare.common.locks.FolderLock`, ``<out>/.lock``) before anything in
    it is read or changed and until the run returns, so a second run on the same ``out``
    (with or without ``resume``) is refused at once, naming the process that holds it; the
    kernel drops the lock when that process ends, however it ends. ``resume`` on an ``out``
    that holds no run is refused (one line), never a silent fresh start.

    Raises
    ------
    ConfigError
        The configuration is invalid; or, with ``resume``, ``out`` holds no earlier run, or the
        configuration (or an explicit run id) differs from the recorded run's.
    FolderInUse
        Another process is working in ``out``.
    """
    out = out.resolve()
    cfg = scenario.federation_config(**(overrides or {}))
    if resume and not out.is_dir():
        recorded_run_id(out)  # raises: there is no earlier run, and nothing is created
    make_out_dir(out, "be the run directory")
    with FolderLock(out, what="--out"):
        return _run_locked(
            scenario,
            out,
            cfg,
            on_progress=on_progress,
            timeout_s=timeout_s,
            resume=resume,
            superlink=superlink,
        )


def _run_locked(
    scenario: Scenario,
    out: Path,
    cfg: FederationConfig,
    *,
    on_progress: ProgressFn | None,
    timeout_s: float,
    resume: bool,
    superlink: RunSource | None,
) -> RunOutcome:
    """:func:`run_experiment` once ``out`` is locked."""
    if resume:
        run_id = recorded_run_id(out)
        if cfg.run_id and cfg.run_id != run_id:
            raise ConfigError(
                f"{out} holds run {run_id}, not run {cfg.run_id} that the scenario names; "
                "resume with the --out of that run, or drop its run-id"
            )
    else:
        run_id = cfg.run_id or new_run_id(scenario.name)
    _check_task(scenario, out, cfg.task, reuse=resume)  # a wrong task never starts Flower
    own_link = superlink is None
    with contextlib.ExitStack() as flower:
        link: RunHandle = (
            flower.enter_context(local_superlink(work_dir=out / ".flower"))
            if superlink is None
            else superlink.handle()
        )
        # Flower's processes (SuperLink, Ray cluster) start now and come up while the
        # sites are prepared and checked below; the submit waits for them.
        folders = prepare_sites(scenario, out, reuse=resume)
        sites = load_sites(folders, task=cfg.task)
        run_dir = out
        # Each experiment is its own simulated world: the sites' ledgers, stored releases and
        # audit logs live in the run's folder (never in a --data-root, which stays read-only),
        # so a sweep's values or a re-run on the same sites each start from an empty ledger. A
        # scenario that names a state-root shares it across runs, as a real site's ledger is.
        state_root = Path(cfg.state_root) if cfg.state_root else out / STATE_DIR_NAME
        if not cfg.state_root and not resume:
            shutil.rmtree(state_root, ignore_errors=True)
        cfg = FederationConfig.from_run_config(
            {
                **cfg.to_run_config(),
                "state-root": str(state_root),
                "run-id": run_id,
                "run-dir": str(run_dir),
                "sites-manifest": str(out / SITES_MANIFEST_NAME),
                "num-sites": len(sites),
                "min-sites": min(cfg.min_sites, len(sites)),
            }
        )
        if resume:
            _check_same_run(out, cfg)
            # The ServerApp writes these two last: their presence ends the wait for the run.
            stale: tuple[str, ...] = (RECORD_NAME, SUMMARY_NAME)
        else:  # a new run: nothing of an earlier one may be mistaken for its results
            stale = (
                CHECKPOINT_NAME,
                PROGRESS_NAME,
                RECORD_NAME,
                SUMMARY_NAME,
                METRICS_NAME,
            )
        for name in stale:
            (run_dir / name).unlink(missing_ok=True)
        (out / SITES_MANIFEST_NAME).write_text(
            json.dumps([str(f.resolve()) for f in folders], indent=1)
        )
        resolved = {
            "scenario": scenario.model_dump(mode="json", exclude_none=True),
            "federation": cfg.to_run_config(),
        }
        (out / CONFIG_NAME).write_text(tomli_w.dumps(resolved), encoding="utf-8")

        app_dir = write_app_dir(
            out / ".flower" / "app",
            config_defaults=RUN_CONFIG_DEFAULTS,
            serverapp="fedcare.server.app:app",
            clientapp="fedcare.client.app:app",
        )
        gpus = scenario.gpus_per_site if _cuda_available() else 0.0
        progress_file = run_dir / PROGRESS_NAME
        seen = (
            len(progress_file.read_text(encoding="utf-8").splitlines())
            if progress_file.is_file()
            else 0
        )
        flower_run = link.submit(  # Flower's own number for the run, not fedcare's run id
            app_dir,
            run_config=cfg.to_run_config(),
            num_supernodes=len(sites),
            cpus_per_client=scenario.cpus_per_site,
            gpus_per_client=gpus,
        )

        def poll() -> None:
            nonlocal seen
            progress = run_dir / PROGRESS_NAME
            if on_progress is None or not progress.is_file():
                return
            lines = progress.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                if line.strip():
                    on_progress(json.loads(line))
            seen = len(lines)

        def server_done() -> bool:
            # The ServerApp's last two writes (atomic renames): the record, then the summary.
            # Every site's reply, and so its ledger charge, came before them; the seconds
            # Flower then spends shutting the simulation and Ray down are skipped (end_run).
            return (run_dir / RECORD_NAME).is_file() and (run_dir / SUMMARY_NAME).is_file()

        try:
            status = link.wait(flower_run, timeout_s=timeout_s, on_poll=poll, done=server_done)
        except BaseException:
            # A run that timed out, was interrupted (Ctrl-C, SIGTERM) or whose progress
            # callback raised is still going: its simulation is killed now, before it can
            # write more. Otherwise a shared SuperLink would outlive it, and its own would
            # stop only after a grace period (Ray's actors take ~3 s on SIGTERM) in which a
            # fast ServerApp could still finish. Every site's ledger survives a kill
            # mid-charge; the checkpoint holds the last completed round for --resume.
            with contextlib.suppress(FlowerRunError):
                link.end_run(flower_run)
            raise
        if status.status != "finished:completed":
            link.end_run(flower_run)
        poll()
        # The run is over and its output on disk: its own SuperLink and Ray cluster (none
        # for a shared SuperLink) stop in the background while the summary, metrics.csv and
        # plots are written, and are gone before this returns. Any failure above left the
        # `with` with them, stopped in the foreground.
        teardown = _Teardown(flower.pop_all(), home=out / ".flower" / "home" if own_link else None)
    with teardown:
        return _finish(scenario, out, cfg, run_dir=run_dir, sites=sites)


class _Teardown:
    """Close an exit stack (a SuperLink and what it started) in a thread, then remove
    ``home``; on exit of the ``with`` block, wait for it and raise what it raised.

    The block's own exception wins, with the teardown's noted on it (logged on Python
    3.10); the teardown's is raised where the block raised nothing. The thread is not a
    daemon, so an interrupted wait still lets it finish."""

    def __init__(self, stack: contextlib.ExitStack, *, home: Path | None) -> None:
        self._stack, self._home = stack, home
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flower-teardown")

    def _run(self) -> None:
        try:
            self._stack.close()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread on exit
            self._error = e
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> _Teardown:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, *rest: object
    ) -> None:
        self._thread.join()
        if self._error is None:
            return
        if error is None:
            raise self._error
        note = f"stopping the run's SuperLink and Ray also failed: {self._error!r}"
        if sys.version_info >= (3, 11):
            error.add_note(note)
        else:  # pragma: no cover - Python 3.10 has no exception notes
            _log.warning(note)


def _finish(
    scenario: Scenario, out: Path, cfg: FederationConfig, *, run_dir: Path, sites: list[SiteData]
) -> RunOutcome:
    """After the run: the baselines, ``summary.json``, ``metrics.csv`` and the plots."""
    record = load_run_record(run_dir / RECORD_NAME)
    baselines: dict[str, Any] = {"local_only": {}, "pooled": {}}
    if scenario.baselines:
        train, dp = settings_from_run(cfg, proximal_mu=0.0)  # baselines train plainly
        baselines["local_only"] = local_only(
            sites,
            task=cfg.task,
            train=train,
            dp=dp,
            rounds=cfg.num_server_rounds,
            seed=cfg.seed,
            ledger_dir=out / BASELINE_LEDGERS_DIR,
            policy=simulated_site_policy(cfg),  # the policy the ClientApp's sites enforce
        )
        baselines["pooled"] = pooled(
            sites,
            task=cfg.task,
            train=train,
            rounds=cfg.num_server_rounds,
            seed=cfg.seed,
            max_grad_norm=cfg.max_grad_norm,
        )
    summary = build_summary(record, baselines)
    write_summary(summary, run_dir / SUMMARY_NAME)
    write_metrics_csv(metric_rows(record, baselines), run_dir / METRICS_NAME)
    write_run_plots(run_dir)
    return RunOutcome(run_dir, summary)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def metric_rows(record: RunRecord, baselines: dict[str, Any]) -> list[MetricRow]:
    """The rows of ``metrics.csv``: every round's global and per-site numbers, the sites'
    personalized models' (``personal:<site id>``, :func:`fedcare.simulations.reports.personal_rows`)
    where the round recorded them, then the baselines' metrics at the run's last planned round.

    Parameters
    ----------
    record:
        The server's run record (``server_record.json``, :mod:`fedcare.common.run_record`).
    baselines:
        ``{"local_only": {site_id: metrics}, "pooled": metrics}``, either may be empty.
    """
    rows: list[MetricRow] = []
    for entry in sorted(record.rounds, key=lambda e: e.round):
        rnd = entry.round
        for name, value in entry.metrics.items():
            split, _, metric = name.partition(".")
            rows.append(MetricRow(rnd, "global", cast(Split, split), metric, value))
        for site_id, values in sorted(entry.sites.items()):
            for name, value in values.items():
                if "." in name:
                    split, _, metric = name.partition(".")
                else:
                    split, metric = "train", name
                # finite (the record is typed); MetricRow checks the split
                rows.append(MetricRow(rnd, site_id, cast(Split, split), metric, value))
        rows += personal_rows(entry.personal, round=rnd)
    rows += baseline_rows(
        local_only=baselines.get("local_only") or {},
        pooled=baselines.get("pooled") or {},
        round=record.rounds_planned,
    )
    return rows
