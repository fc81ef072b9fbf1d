"""fedcare's Python API: a few typed, keyword-only functions over what the commands run.

Each function is a thin front over the module that does the work (named in its docstring),
so a notebook, a script and the ``fedcare`` command all run the same code:

=========================  ================================================================
:func:`simulate`           a simulated federation, in this process (Flower's
                           ``run_simulation``) or through ``flwr run`` -> :class:`SimulationResult`
:func:`load_site`          a site's folder, validated -> ``SiteData``
:func:`train_site`         one site's private local training -> :class:`SiteTraining`
:func:`read_ledger`        a site's privacy ledger -> :class:`LedgerView`
:func:`verify_run`         a run's audit logs, verified and cross-checked -> ``VerifyResult``
:func:`audit_run`          membership inference and the canary audit -> ``AttackReport``
:func:`audit_report`       the audit page and its verdict -> ``ReportInputs``
:func:`synthesize`         synthetic hospitals, in the formats real sites hold
``register_model``,        plug-ins: a model, a task kind, a strategy (``docs/api.md``);
``register_task_kind``,    :func:`load_plugins` imports the plug-in modules that
``register_strategy``      ``FEDCARE_PLUGINS`` and the ``fedcare.plugins`` entry points name
=========================  ================================================================

Errors for bad input are :class:`~fedcare.common.errors.FedcareError` subclasses whose
message names the file or field and the fix.

Examples
--------
Two tiny synthetic hospitals, one site's private training, and its ledger:

>>> import tempfile
>>> from pathlib import Path
>>> root = Path(tempfile.mkdtemp())
>>> folders = synthesize(
...     root / "sites", n_sites=2, seed=0,
...     config=SynthConfig(patients_per_site=60, n_genes=20, image_size=16, image_format="npy"),
... )
>>> site = load_site(folders[0])
>>> site.spec.site_id
'site-0'
>>> trained = train_site(site, task="readmission", state_dir=root / "state", target_epsilon=1.0)
>>> round(trained.epsilon_spent, 2), trained.steps > 0
(1.0, True)
>>> ledger = read_ledger(root / "state")
>>> [c.kind for c in ledger.charges]
['train']
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.ledger import ChargeReceipt, DatasetSummary, PrivacyLedger
from fedcare.client.local import RoundRequest, RoundResult, SiteTrainer, settings_from_run
from fedcare.client.policy import simulated_site_policy
from fedcare.common.audit import config_hash, hash_arrays
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.common.plugins import load_plugins
from fedcare.common.run_files import LEDGER_NAME
from fedcare.common.summary import RECORD_NAME, SUMMARY_NAME, RunSummary
from fedcare.common.tomlcompat import tomllib
from fedcare.inprocess import InProcessFlower, check_telemetry_off
from fedcare.models import register_model, register_task_kind
from fedcare.server.strategies import register_strategy, strategy_builder
from fedcare.simulations.audit.attacks import (
    AttackOptions,
    CanaryOptions,
    write_attack_report,
)
from fedcare.simulations.audit.attacks import audit_run as _attack_run
from fedcare.simulations.audit.attacks.run import SkipFn
from fedcare.simulations.audit.findings import AttackReport, VerifyResult
from fedcare.simulations.audit.report import ReportInputs, load_report_inputs
from fedcare.simulations.audit.report_cli import check_report_out, write_text_atomic
from fedcare.simulations.audit.verify import verify_paths
from fedcare.simulations.runner import CONFIG_NAME, new_run_id, run_experiment
from fedcare.simulations.scenario import Scenario, load_scenario
from fedcare.simulations.synth import SynthConfig, synthesize

__all__ = [
    "simulate",
    "SimulationResult",
    "load_site",
    "train_site",
    "SiteTraining",
    "read_ledger",
    "LedgerView",
    "verify_run",
    "audit_run",
    "audit_report",
    "synthesize",
    "SynthConfig",
    "Scenario",
    "register_model",
    "register_task_kind",
    "register_strategy",
    "load_plugins",
]

PathLike = str | os.PathLike[str]

#: The file a simulated site's ledger has in its state folder (the ClientApp's name for it,
#: ``client/app.py``), so that :func:`train_site` and a federation charge the same ledger.
_LEDGER_FILE = LEDGER_NAME
#: The seconds a run through ``flwr run`` may take when :func:`simulate` is given none.
_DEFAULT_TIMEOUT_S = 3600.0
#: The splits :func:`train_site` reports its model's metrics on.
_EVAL_SPLITS = ("val", "test")


# --------------------------------------------------------------------------- simulate


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated federation left in its run directory (:func:`simulate`).

    Attributes
    ----------
    run_dir:
        The run directory (``config.toml``, ``summary.json``, ``metrics.csv``,
        ``final_model.pt``, ``plots/``, ``audit/``, ``state/``).
    run_id:
        fedcare's id of the run (every ledger charge and audit entry carries it).
    summary:
        The whole validated ``summary.json`` (schema: ``docs/summary-schema.md``).
    round_metrics:
        Round -> the global model's metrics after it (round 0: the initial model), for every
        evaluated round.
    final_metrics:
        The final global model's metrics (``"test.auroc"``, ...).
    epsilon_spent:
        Site id -> the ε this run added to the site's dataset, at :attr:`delta`; ``None``
        where the site trained without DP or never trained.
    lifetime_epsilon:
        Site id -> the ε of the site's dataset's whole ledger history after the run.
    delta:
        Site id -> the δ its ε is stated at (``None`` where it has no ε).
    state_dirs:
        Site id -> the folder of its durable state in this simulation (privacy ledger, audit
        log, stored releases): what :func:`read_ledger` reads.
    record_path:
        The ServerApp's full run record (``server_record.json``).
    summary_path:
        ``summary.json``.
    """

    run_dir: Path
    run_id: str
    summary: RunSummary
    round_metrics: dict[int, dict[str, float]]
    final_metrics: dict[str, float]
    epsilon_spent: dict[str, float | None]
    lifetime_epsilon: dict[str, float | None]
    delta: dict[str, float | None]
    state_dirs: dict[str, Path]
    record_path: Path
    summary_path: Path


def _scenario(
    scenario: Scenario | PathLike | None, *, sites: PathLike | None, baselines: bool | None
) -> Scenario:
    if scenario is None:
        base = Scenario()
    elif isinstance(scenario, Scenario):
        base = scenario
    else:
        base = load_scenario(Path(scenario))
    changes: dict[str, Any] = {}
    if sites is not None:
        changes["data_root"] = str(Path(sites))
    if baselines is not None:
        changes["baselines"] = baselines
    if not changes:
        return base
    return Scenario.model_validate({**base.model_dump(), **changes})


def _result(run_dir: Path, summary: RunSummary) -> SimulationResult:
    config = tomllib.loads((run_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    cfg = FederationConfig.from_run_config(config["federation"], source=str(run_dir / CONFIG_NAME))
    state_root = Path(cfg.state_root)
    return SimulationResult(
        run_dir=run_dir,
        run_id=summary.run_id,
        summary=summary,
        round_metrics={r.round: dict(r.metrics) for r in summary.global_.rounds},
        final_metrics=dict(summary.global_.final),
        epsilon_spent={s.site_id: s.privacy.run_epsilon for s in summary.sites},
        lifetime_epsilon={s.site_id: s.privacy.epsilon for s in summary.sites},
        delta={s.site_id: s.privacy.delta for s in summary.sites},
        state_dirs={s.site_id: state_root / s.site_id for s in summary.sites},
        record_path=run_dir / RECORD_NAME,
        summary_path=run_dir / SUMMARY_NAME,
    )


def simulate(
    *,
    out: PathLike,
    scenario: Scenario | PathLike | None = None,
    sites: PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    baselines: bool | None = None,
    in_process: bool = False,
    resume: bool = False,
    timeout_s: float | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> SimulationResult:
    """Run a simulated federation of hospitals into ``out`` and read back what it left.

    The run is :func:`fedcare.simulations.runner.run_experiment`'s (what ``fedcare simulate``
    runs): the sites are checked, fedcare's ServerApp and ClientApp train with DP-SGD at every
    site, then the baselines, ``summary.json``, ``metrics.csv`` and the plots are written.

    Parameters
    ----------
    out:
        The run directory (created; locked while the run goes).
    scenario:
        A :class:`Scenario`, a scenario file, or a bundled scenario's name (``"demo"``);
        ``None``: the defaults (four synthetic hospitals).
    sites:
        A folder of existing site folders (each with its ``site.toml``) to use instead of
        the scenario's synthetic ones.
    settings:
        Run-config keys over the scenario's ``[federation]``, as in ``pyproject.toml``'s
        ``[tool.flwr.app.config]`` (``{"num-server-rounds": 2, "task": "readmission"}``);
        an unknown key or a bad value is refused before anything runs.
    baselines:
        Whether to compute the local-only and pooled baselines (default: the scenario's).
    in_process:
        ``True``: the ServerApp runs in a thread of this process and the sites in Ray
        actors, started by Flower's own ``flwr.simulation.run_simulation``, which a notebook
        or a debugger can follow (:mod:`fedcare.inprocess`); the run's files are the same.
        ``False`` (default): a local SuperLink of its own and ``flwr run``, as the command
        runs it. In process, progress events arrive when the run ends, and no ``timeout_s``
        applies (the run's ``round-timeout`` bounds each round).
    resume:
        Continue the run recorded in ``out`` from its last completed round.
    timeout_s:
        Seconds the ``flwr run`` run may take (default 3600); refused with ``in_process``.
    on_progress:
        Called with each progress event of the ServerApp (``{"round": ..., ...}``).

    Returns
    -------
    SimulationResult

    Raises
    ------
    ConfigError
        A setting, the scenario or the strategy is invalid (an unknown strategy names the
        registered ones), ``timeout_s`` was given with ``in_process``, Flower's telemetry is
        on in this process (``in_process``), or ``out`` is unusable.
    FolderInUse
        Another process is running in ``out``.
    FlowerRunError
        The Flower run failed.

    Examples
    --------
    >>> result = simulate(  # doctest: +SKIP
    ...     out="runs/api", sites="runs/sites", in_process=True,
    ...     settings={"task": "readmission", "num-server-rounds": 2},
    ... )
    >>> result.final_metrics["test.auroc"]  # doctest: +SKIP
    0.71...
    """
    load_plugins()  # modules named in FEDCARE_PLUGINS since fedcare was imported
    chosen = _scenario(scenario, sites=sites, baselines=baselines)
    overrides = dict(settings or {})
    cfg = chosen.federation_config(**overrides)
    strategy_builder(cfg.strategy)  # a name no strategy is registered under: refused now
    run_dir = Path(out).resolve()
    if in_process:
        if timeout_s is not None:
            raise ConfigError(
                "simulate: timeout_s cannot be applied to an in-process run (Flower's "
                "run_simulation cannot be stopped from outside; the run's round-timeout "
                "bounds each round); drop timeout_s, or use in_process=False"
            )
        check_telemetry_off()
        outcome = run_experiment(
            chosen,
            run_dir,
            overrides=overrides,
            on_progress=on_progress,
            resume=resume,
            superlink=InProcessFlower(work_dir=run_dir / ".flower"),
        )
    else:
        outcome = run_experiment(
            chosen,
            run_dir,
            overrides=overrides,
            on_progress=on_progress,
            resume=resume,
            timeout_s=_DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s,
        )
    return _result(outcome.run_dir, outcome.summary)


# --------------------------------------------------------------------------- one site


@dataclass(frozen=True)
class SiteTraining:
    """One site's private local training (:func:`train_site`).

    Attributes
    ----------
    site_id, task, model, run_id:
        Who trained what, and the run id the ledger charged it under.
    state_dict:
        The trained weights (CPU tensors), loadable into ``build_model(model, ...)``.
    rounds:
        Rounds of local training (each ``local-epochs`` epochs, one ledger charge).
    steps:
        DP-SGD (or plain) optimizer steps over all rounds.
    n_train:
        The site's training patients.
    train_loss:
        The last round's mean training loss.
    epsilon_spent:
        The ε this training added to the site's dataset (``None`` without DP).
    lifetime_epsilon:
        The ε of the dataset's whole ledger history after it (``None`` without DP).
    delta:
        The δ of both (``None`` without DP).
    metrics:
        The model's exact metrics on the site's validation and test patients
        (``"test.auroc"``, ``"test.n"``, ...), for the site's own use; a split with fewer
        patients than ``site-min-count`` is withheld.
    ledger_path:
        The privacy ledger charged (``None`` without DP).
    """

    site_id: str
    task: str
    model: str
    run_id: str
    state_dict: dict[str, torch.Tensor]
    rounds: int
    steps: int
    n_train: int
    train_loss: float
    epsilon_spent: float | None
    lifetime_epsilon: float | None
    delta: float | None
    metrics: dict[str, float]
    ledger_path: Path | None


def train_site(
    site: SiteData | PathLike,
    *,
    task: str,
    state_dir: PathLike,
    rounds: int = 1,
    target_epsilon: float | None = 8.0,
    epsilon_budget: float = 10.0,
    settings: Mapping[str, Any] | None = None,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    run_id: str | None = None,
    seed: int = 0,
) -> SiteTraining:
    """Train a model on one site's patients with DP-SGD, charged to the site's ledger.

    The training is :class:`fedcare.client.local.SiteTrainer`'s, round by round, as a
    federated site runs it (the local-only baseline too): the site's policy is that of a
    simulated site (:func:`fedcare.client.policy.simulated_site_policy`), the noise is
    calibrated once so that all ``rounds`` add at most ``target_epsilon`` to what the
    dataset had already spent, and each round is charged to ``<state_dir>/ledger.sqlite``
    before it trains. That is the ledger a federation with ``state-root`` set to the
    folder above ``state_dir`` charges for this site: the budget is one.

    Parameters
    ----------
    site:
        The site (:func:`load_site`) or its folder.
    task:
        A task the site's ``site.toml`` defines (``"readmission"``, ...).
    state_dir:
        The site's state folder: its ledger and stored releases (created private).
    rounds:
        Rounds of local training, each one charge.
    target_epsilon:
        What the training may add to the dataset's ε (at ``target-delta``, default 1e-5);
        ``None``: no DP (no ledger is charged).
    epsilon_budget:
        The most ε the dataset may ever reach (``site-epsilon-budget``).
    settings:
        More run-config keys (``{"local-epochs": 2, "learning-rate": 0.05, "model": ...}``);
        the parameters above are not repeated there.
    initial_state:
        Weights to start from (e.g. a federated model's); default: the seeded initial model.
    run_id:
        The run id to charge under; default a fresh ``local-<site id>-...`` id. Under a run
        id whose rounds were released, the very same call gets the stored releases back
        (nothing is trained or charged again) and any other call is refused.
    seed:
        Seeds the initial weights only; DP noise comes from the site's own entropy (or the
        ``[simulation]`` seed of a simulated site's ``site.toml``).

    Returns
    -------
    SiteTraining

    Raises
    ------
    ConfigError
        A setting is invalid, repeats a parameter, or the site defines no such task.
    DataValidationError
        The site's files fail validation.
    PolicyViolation, PrivacyBudgetExceeded
        The training does not fit the site's policy or budget (nothing is charged), or it
        repeats a released round of ``run_id`` with other settings or weights.
    """
    load_plugins()
    given = dict(settings or {})
    explicit: dict[str, Any] = {
        "task": task,
        "num-server-rounds": rounds,
        "dp": target_epsilon is not None,
        "site-epsilon-budget": epsilon_budget,
        "seed": seed,
    }
    if target_epsilon is not None:
        explicit["target-epsilon"] = target_epsilon
    repeated = sorted(set(given) & {*explicit, "target-epsilon"})
    if repeated:
        raise ConfigError(
            f"train_site: settings repeat {', '.join(repeated)}; pass them as task=, rounds=, "
            "target_epsilon=, epsilon_budget= and seed= instead"
        )
    cfg = FederationConfig.from_run_config({**given, **explicit}, source="train_site")
    data = site if isinstance(site, SiteData) else load_site(Path(site))
    data.spec.task(task)
    train, dp = settings_from_run(cfg)
    ledger_path = Path(state_dir) / _LEDGER_FILE if cfg.dp else None
    trainer = SiteTrainer(
        site=data,
        policy=simulated_site_policy(cfg),
        ledger=PrivacyLedger(ledger_path) if ledger_path is not None else None,
        seed=cfg.seed,
    )
    run = run_id or new_run_id(f"local-{data.spec.site_id}")
    state: Mapping[str, torch.Tensor] | None = initial_state
    results: list[RoundResult] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        request = RoundRequest(
            run_id=run,
            round=rnd,
            rounds_planned=cfg.num_server_rounds,
            task=task,
            train=train,
            dp=dp,
            # What binds a stored release to this request, as a federated round binds it.
            received_sha256="" if state is None else _state_sha256(state),
            config_sha256=config_hash(cfg.to_run_config()),
        )
        results.append(trainer.train_round(request, state))
        state = results[-1].state
    last = results[-1]
    return SiteTraining(
        site_id=data.spec.site_id,
        task=task,
        model=trainer.model_name(task, train.model),
        run_id=run,
        state_dict=dict(last.state),
        rounds=len(results),
        steps=sum(r.steps for r in results),
        n_train=last.n_train,
        train_loss=last.train_loss,
        epsilon_spent=last.run_epsilon,
        lifetime_epsilon=last.epsilon,
        delta=last.delta,
        metrics=trainer.evaluate(
            task, last.state, model=train.model, splits=_EVAL_SPLITS, device=train.device
        ),
        ledger_path=ledger_path,
    )


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    return hash_arrays({k: v.detach().cpu().numpy() for k, v in state.items()})


# --------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class LedgerView:
    """A site's privacy ledger, read (:func:`read_ledger`).

    Attributes
    ----------
    path:
        The ledger file.
    datasets:
        Every dataset (cohort of patients) it has charged, oldest first: its lifetime ε
        (the composition of its own and every overlapping dataset's charges), δ, accountant,
        budget and its charges (:class:`fedcare.client.ledger.DatasetSummary`).
    """

    path: Path
    datasets: tuple[DatasetSummary, ...]

    @property
    def lifetime_epsilon(self) -> dict[str, float]:
        """Dataset key -> its lifetime ε (at its own δ)."""
        return {d.fingerprint: d.epsilon for d in self.datasets}

    @property
    def charges(self) -> tuple[ChargeReceipt, ...]:
        """Every charge (run, round, kind, mechanism, ε before and after), oldest first."""
        return tuple(sorted((c for d in self.datasets for c in d.charges), key=_charge_id))


def _charge_id(charge: ChargeReceipt) -> int:
    return charge.charge_id


def read_ledger(path: PathLike) -> LedgerView:
    """Read a site's privacy ledger (what ``fedcare budget show`` prints).

    Parameters
    ----------
    path:
        The site's state folder (holding ``ledger.sqlite``: :attr:`SimulationResult.state_dirs`,
        :func:`train_site`'s ``state_dir``) or the ledger file itself. Nothing is written.

    Raises
    ------
    ConfigError
        No ledger there, or the file is not a privacy ledger.
    """
    file = Path(path)
    if file.is_dir():
        file = file / _LEDGER_FILE
    return LedgerView(path=file, datasets=tuple(PrivacyLedger(file, create=False).summary()))


# --------------------------------------------------------------------------- audits


def _run_dir(run_dir: PathLike) -> Path:
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(
            f"{path}: no such run directory; pass the folder a run wrote (simulate(out=...), "
            "`fedcare simulate --out`)"
        )
    return path


def verify_run(
    run_dir: PathLike, *, trusted_keys: Mapping[str, bytes] | None = None
) -> VerifyResult:
    """Verify a run's audit logs and cross-check the server's against the sites'
    (``fedcare audit verify``, :func:`fedcare.simulations.audit.verify.verify_paths`).

    Parameters
    ----------
    run_dir:
        A run directory: its ``audit/server.jsonl`` and every site log found through
        ``sites.json`` and the run's ``state-root``.
    trusted_keys:
        Writer (``"server"`` or a site id) -> its raw Ed25519 public key, obtained out of
        band; that writer's log must be signed with it.

    Returns
    -------
    VerifyResult
        ``ok`` only when every log verifies and no cross-check fails.

    Examples
    --------
    >>> verify_run(result.run_dir).ok  # doctest: +SKIP
    True
    """
    return verify_paths([_run_dir(run_dir)], trusted_keys=trusted_keys)


def audit_run(
    run_dir: PathLike,
    *,
    sites: Sequence[str] = (),
    attacks: Sequence[str] | None = None,
    attack_options: AttackOptions = AttackOptions(),  # noqa: B008 - frozen
    canary_options: CanaryOptions | None = CanaryOptions(),  # noqa: B008 - frozen
    device: str = "auto",
    on_skip: SkipFn | None = None,
    save: bool = True,
) -> AttackReport:
    """Attack a finished run's final model at each site (membership inference) and audit
    each site's mechanism with canaries (``fedcare audit attack``,
    :func:`fedcare.simulations.audit.attacks.audit_run`, which documents every option).

    Parameters
    ----------
    save:
        Also write the report to ``<run_dir>/audit/attacks.json``, where
        :func:`audit_report` reads it.

    Examples
    --------
    >>> report = audit_run(result.run_dir, canary_options=None)  # doctest: +SKIP
    >>> max(a.auc for a in report.attacks) < 0.6  # doctest: +SKIP
    True
    """
    path = _run_dir(run_dir)
    report = _attack_run(
        path,
        sites=sites,
        attacks=attacks,
        attack_options=attack_options,
        canary_options=canary_options,
        device=device,
        on_skip=on_skip,
    )
    if save:
        write_attack_report(report, path)
    return report


def audit_report(run_dir: PathLike, *, out: PathLike | None = None) -> ReportInputs:
    """A run's privacy audit: its findings, verdict and HTML page (``fedcare audit report``,
    :func:`fedcare.simulations.audit.report.load_report_inputs`).

    Parameters
    ----------
    run_dir:
        A finished run's directory.
    out:
        Where to write the self-contained HTML page too (never one of the run's own files).

    Returns
    -------
    ReportInputs
        ``.verdict()`` (PASS or ATTENTION, with each check) and ``.html()`` (the page).

    Examples
    --------
    >>> audit_report(result.run_dir).verdict().label  # doctest: +SKIP
    'PASS'
    """
    path = _run_dir(run_dir)
    if out is not None:
        check_report_out(Path(out), path)
    inputs = load_report_inputs(path)
    if out is not None:
        write_text_atomic(Path(out), inputs.html())
    return inputs
