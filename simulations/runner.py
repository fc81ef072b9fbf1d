"""Run a simulated multi-hospital federation end to end, the way Flower supports it.

``run_experiment`` prepares the sites (synthesized, or existing folders), checks every site's
data and that all share one schema, writes the resolved config, then runs fedcare's own
ServerApp and ClientApp with ``flwr run`` against a local simulation SuperLink that it starts
and stops (:mod:`simulations.flower_driver`). While the run goes it shows a progress bar fed
by the server's ``progress.jsonl``. Afterwards it computes the baselines (each site alone;
all data pooled, non-private) and writes the run directory:

``config.toml`` (resolved), ``summary.json`` (schema: ``common/summary.py``),
``metrics.csv`` (round, site, split, metric, value), ``final_model.pt``, ``plots/*.png``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from client.data.loaders import load_site
from client.data.site import SiteData
from client.local import settings_from_run
from client.policy import SitePolicy
from common.errors import ConfigError, DataError
from common.federation import RUN_CONFIG_DEFAULTS, FederationConfig
from common.spec import SPEC_FILENAME
from common.summary import RunSummary, write_summary
from server.summary import build_summary
from simulations.baselines import local_only, pooled
from simulations.flower_driver import local_superlink, write_app_dir
from simulations.reports import MetricRow, write_metrics_csv, write_run_plots
from simulations.scenario import Scenario
from simulations.synth import synthesize

__all__ = ["run_experiment", "prepare_sites", "RunOutcome"]

ProgressFn = Callable[[dict[str, Any]], None]


def prepare_sites(scenario: Scenario, out: Path, *, reuse: bool = False) -> list[Path]:
    """The site folders of the experiment: existing ones, or freshly synthesized.

    With ``reuse`` (resuming), the folders an earlier start listed in ``sites.json`` are kept
    as they are, ledgers included.
    """
    manifest = out / "sites.json"
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
        out / "sites", n_sites=scenario.sites, seed=scenario.seed, config=scenario.synth, force=True
    )


def load_sites(folders: list[Path]) -> list[SiteData]:
    """Load and validate every site; all must share one schema and distinct site ids."""
    sites = [load_site(f) for f in folders]
    fingerprints = {s.spec.feature_schema.fingerprint() for s in sites}
    if len(fingerprints) > 1:
        raise DataError(
            "the sites do not share one feature schema ("
            + ", ".join(
                f"{s.spec.site_id}: {s.spec.feature_schema.fingerprint()[:12]}" for s in sites
            )
            + "); give every site.toml the federation's schema"
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


def run_experiment(
    scenario: Scenario,
    out: Path,
    *,
    overrides: dict[str, Any] | None = None,
    on_progress: ProgressFn | None = None,
    timeout_s: float = 3600.0,
    resume: bool = False,
) -> RunOutcome:
    """Run one federated experiment into ``out`` (see the module docstring).

    With ``resume``, a checkpoint left in ``out`` by an interrupted run of the same run id is
    continued from its last completed round; otherwise any earlier run state there is cleared.
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = prepare_sites(scenario, out, reuse=resume)
    sites = load_sites(folders)
    run_dir = out
    cfg = scenario.federation_config(**(overrides or {}))
    cfg = FederationConfig.from_run_config(
        {
            **cfg.to_run_config(),
            "run-id": cfg.run_id or f"{scenario.name}-{scenario.seed}",
            "run-dir": str(run_dir),
            "sites-manifest": str(out / "sites.json"),
            "num-sites": len(sites),
            "min-sites": min(cfg.min_sites, len(sites)),
        }
    )
    stale = (
        ("server_record.json",)
        if resume
        else ("checkpoint.pt", "progress.jsonl", "server_record.json")
    )
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    (out / "sites.json").write_text(json.dumps([str(f.resolve()) for f in folders], indent=1))
    resolved = {
        "scenario": scenario.model_dump(mode="json", exclude_none=True),
        "federation": cfg.to_run_config(),
    }
    (out / "config.toml").write_text(tomli_w.dumps(resolved), encoding="utf-8")

    app_dir = write_app_dir(
        out / ".flower" / "app",
        config_defaults=RUN_CONFIG_DEFAULTS,
        serverapp="server.app:app",
        clientapp="client.app:app",
    )
    gpus = scenario.gpus_per_site if _cuda_available() else 0.0
    progress_file = run_dir / "progress.jsonl"
    seen = (
        len(progress_file.read_text(encoding="utf-8").splitlines())
        if progress_file.is_file()
        else 0
    )
    with local_superlink(work_dir=out / ".flower") as link:
        run_id = link.submit(
            app_dir,
            run_config=cfg.to_run_config(),
            num_supernodes=len(sites),
            cpus_per_client=scenario.cpus_per_site,
            gpus_per_client=gpus,
        )

        def poll() -> None:
            nonlocal seen
            progress = run_dir / "progress.jsonl"
            if on_progress is None or not progress.is_file():
                return
            lines = progress.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                if line.strip():
                    on_progress(json.loads(line))
            seen = len(lines)

        # Each poll runs the flwr CLI in a fresh process; every 2 s keeps that cost small.
        link.wait(run_id, timeout_s=timeout_s, on_poll=poll, poll_s=2.0)
        poll()
    shutil.rmtree(out / ".flower" / "home", ignore_errors=True)

    record = json.loads((run_dir / "server_record.json").read_text(encoding="utf-8"))
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
            ledger_dir=out / "baseline-ledgers",
            policy=SitePolicy(
                epsilon_budget=cfg.site_epsilon_budget,
                delta=cfg.target_delta,
                accountant=cfg.accountant,
                require_dp=cfg.dp,
                min_count=cfg.site_min_count,
                max_local_epochs=max(cfg.local_epochs, SitePolicy().max_local_epochs),
            ),
        )
        baselines["pooled"] = pooled(
            sites, task=cfg.task, train=train, rounds=cfg.num_server_rounds, seed=cfg.seed
        )
    summary = build_summary(record, baselines)
    write_summary(summary, run_dir / "summary.json")
    write_metrics_csv(_metric_rows(record, baselines), run_dir / "metrics.csv")
    write_run_plots(run_dir)
    return RunOutcome(run_dir, summary)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _metric_rows(record: dict[str, Any], baselines: dict[str, Any]) -> list[MetricRow]:
    rows: list[MetricRow] = []
    for entry in sorted(record["rounds"], key=lambda e: e["round"]):
        rnd = entry["round"]
        for name, value in entry["metrics"].items():
            split, _, metric = name.partition(".")
            rows.append(MetricRow(rnd, "global", split, metric, float(value)))
        for site_id, values in sorted(entry["sites"].items()):
            for name, value in values.items():
                if "." in name:
                    split, _, metric = name.partition(".")
                else:
                    split, metric = "train", name
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    rows.append(MetricRow(rnd, site_id, split, metric, float(value)))
    return rows
