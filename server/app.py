"""The coordinating server's Flower ServerApp (Message API).

``run_federation`` sizes the initial model from the federation's shared schema (it never
sees patient data), waits for the sites, resumes from the last completed round when the run
directory holds a checkpoint of the same run (the model, the run record and the server
optimizer's state, e.g. FedAdam's moments, put back into the freshly built strategy; a
checkpoint of an older fedcare without that state resumes with fresh moments, said once in
the log and in the record's ``optimizer_reset``), drives the strategy inside a
:class:`~fedcare.server.guard.GuardedStrategy`, and writes the final model and
``server_record.json``
(everything ``summary.json`` is built from) into the run directory. Every step is also
logged, signed, in the run's audit log ``<run-dir>/audit/server.jsonl`` (``server/audit.py``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedcare.common.audit import hash_arrays
from fedcare.common.encoding import input_dims
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.files import atomic_private, private_dir
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.common.run_files import FINAL_MODEL_NAME, RECORD_NAME, SUMMARY_NAME
from fedcare.common.run_record import OptimizerReset, RunRecord, write_run_record
from fedcare.common.spec import LabelSpec, SiteSpec, load_site_spec
from fedcare.common.summary import write_summary
from fedcare.models import build_model, default_model_for
from fedcare.models.explain import task_features
from fedcare.models.tasks import task_definition
from fedcare.server.audit import ServerAudit
from fedcare.server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from fedcare.server.grid import prompt
from fedcare.server.guard import GuardedStrategy
from fedcare.server.secagg import SecureGrid
from fedcare.server.strategies import build_strategy, restore_optimizer_state
from fedcare.server.summary import build_summary

__all__ = ["app", "run_federation", "federation_spec", "RECORD_NAME", "FINAL_MODEL_NAME"]

log = logging.getLogger(__name__)


def federation_spec(cfg: FederationConfig) -> SiteSpec:
    """The spec holding the shared schema and tasks (a site.toml; only its schema is read)."""
    if cfg.spec_path:
        return load_site_spec(cfg.spec_path)
    if cfg.sites_manifest:
        sites = json.loads(Path(cfg.sites_manifest).read_text(encoding="utf-8"))
        if not sites:
            raise ConfigError(f"{cfg.sites_manifest} lists no site")
        return load_site_spec(sites[0])
    return load_site_spec(Path(cfg.data_root) / "site-0")


def initial_state(cfg: FederationConfig, spec: SiteSpec) -> tuple[str, dict[str, torch.Tensor]]:
    """The model name and its seeded initial weights, from the schema alone."""
    task = spec.task(cfg.task)
    name = cfg.model or default_model_for(task.modalities, timeline=task.timeline is not None)
    definition = task_definition(task, model=name, label=spec.label(task.label))
    dims = input_dims(spec.feature_schema, task)
    model = build_model(name, input_dims=dims, generator=torch.Generator().manual_seed(cfg.seed))
    model = definition.kind.wrap(model)  # a survival task's K interval hazards on top
    return name, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _survival_label(spec: SiteSpec, task: str) -> LabelSpec | None:
    """The task's label when it is a survival label (its cuts: the curves' time axis)."""
    label = spec.label(spec.task(task).label)
    return label if label.kind == "survival" else None


def _wait_for_sites(grid: Grid, cfg: FederationConfig) -> int:
    """Number of sites taking part: ``num-sites``, or all connected once ``min-sites`` are."""
    wanted = cfg.num_sites or cfg.min_sites
    deadline = time.monotonic() + cfg.connect_timeout
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= wanted:
            return cfg.num_sites or n
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {n} site(s) connected within connect-timeout={cfg.connect_timeout:g} s; "
                f"the run needs {wanted} (start the missing SuperNodes or lower num-sites)"
            )
        time.sleep(0.5)


#: The run's facts a resume takes from its own start (the rest comes from the checkpoint).
_RUN_FACTS = {"run_id", "task", "model", "strategy", "personalization", "rounds_planned", "config"}


def run_federation(grid: Grid, cfg: FederationConfig) -> RunRecord:
    """Run (or resume) the federation described by ``cfg``; returns the run record."""
    grid = prompt(grid)  # replies collected every 0.1 s, not Flower's deployment 3 s
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    run_dir = Path(cfg.run_dir or f"runs/{run_id}").resolve()
    private_dir(run_dir, tighten=False)  # a folder the operator may have named: not re-moded
    spec = federation_spec(cfg)
    model_name, state = initial_state(cfg, spec)
    model_arrays = {k: v.numpy() for k, v in state.items()}  # what the run's sites train
    record = RunRecord.start(
        run_id=run_id,
        task=cfg.task,
        model=model_name,
        strategy=cfg.strategy,
        personalization=cfg.personalization,
        rounds_planned=cfg.num_server_rounds,
        config=cfg.to_run_config(),
    )
    offset = 0
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is not None and checkpoint.run_id == run_id:
        offset = checkpoint.round
        saved = RunRecord.from_dict(checkpoint.record, source=str(run_dir / CHECKPOINT_NAME))
        facts = record.model_dump(include=_RUN_FACTS)  # this start's, as a fresh run's
        record = saved.model_copy(update={**facts, "resumed_from": offset})
        state = {k: torch.from_numpy(v) for k, v in checkpoint.arrays.items()}
        log.warning("resuming run %s after round %d", run_id, offset)
    audit = ServerAudit.open(run_dir, cfg, run_id=run_id)
    start_sha256 = hash_arrays(state)
    if offset:
        audit.run_resume(cfg, model=model_name, model_sha256=start_sha256, after_round=offset)
    else:
        audit.run_start(cfg, model=model_name, model_sha256=start_sha256)
    remaining = cfg.num_server_rounds - offset
    if cfg.secure_aggregation:  # the centre sees only the sum of the updates (server/secagg.py)
        grid = SecureGrid(grid, cfg=cfg, audit=audit)
    if remaining > 0:
        n_sites = _wait_for_sites(grid, cfg)
        strategy = build_strategy(cfg, n_sites=n_sites)
        if offset and checkpoint is not None:
            note = restore_optimizer_state(
                strategy, checkpoint, model=model_arrays, path=run_dir / CHECKPOINT_NAME
            )
            if note is not None:
                log.warning("resuming run %s: %s", run_id, note)
                record.optimizer_reset = OptimizerReset(after_round=offset, reason=note)
        guard = GuardedStrategy(
            strategy,
            cfg=cfg,
            run_dir=run_dir,
            run_id=run_id,
            round_offset=offset,
            record=record,
            schema_fingerprint=spec.feature_schema.fingerprint(),
            schema_json=spec.feature_schema.model_dump_json(),
            audit=audit,
            explain_features=(
                task_features(spec.feature_schema, spec.task(cfg.task)) if cfg.explain else None
            ),
            survival_label=_survival_label(spec, cfg.task),
        )
        if offset == 0:
            guard.evaluate_initial(grid, pack_record(state))
        result = guard.start(
            grid=grid,
            initial_arrays=pack_record(state),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=guard.after_round,
        )
        if len(result.arrays) > 0:
            state = {k: torch.from_numpy(v) for k, v in unpack_record(result.arrays).items()}
    record.finish()
    audit.run_end(
        rounds_completed=record.rounds_completed,
        model_sha256=hash_arrays(state),
    )
    with atomic_private(run_dir / FINAL_MODEL_NAME) as out:
        torch.save({"model": model_name, "task": cfg.task, "state_dict": state}, out)
    # These two stay the last writes: once both exist, a simulation's runner ends the run's
    # processes at once (fedcare.simulations.runner, SuperLinkHandle.end_run).
    write_run_record(run_dir / RECORD_NAME, record)
    write_summary(build_summary(record), run_dir / SUMMARY_NAME)
    return record


app = ServerApp()


@app.main()
def _main(grid: Grid, context: Context) -> None:
    run_federation(grid, FederationConfig.from_run_config(context.run_config))
