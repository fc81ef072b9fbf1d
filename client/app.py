"""The site's Flower ClientApp (Message API): train and evaluate at a hospital.

Which site is this? In a deployment, the SuperNode's node config names the site's own
``site-config.toml`` (``fedcare site start`` sets it): its data folder, state folder, budget,
policy and device, which no run config can override. In simulation, the run config's
``sites-manifest`` (a JSON list of site folders) or ``data-root/site-<partition-id>`` names
the folder, and the site's durable state (privacy ledger, audit log, stored releases) lives in
``state-root/<site-id>/`` when the run config sets ``state-root``, else in
``<site folder>/.fedcare/``.

The process keeps each site's loaded data and encoded tasks between the messages it answers
while the site's files are unchanged (:mod:`fedcare.client.warm`): a simulation's Ray actor serves
many simulated sites, and a message costs its training, not a reload. The site's ledger,
policy and config are read afresh for every message.

A reply carries the model arrays, aggregate numbers (``num-examples``, ``train-loss``,
``steps``; task metrics on evaluation) and a ``site`` record (site id and the dataset's
privacy state). A refusal (budget spent, task not allowed, schema mismatch, broken data) is
an error reply whose reason starts with the site id, never a crash of the run; a data
problem's details (which may quote values) never leave the site.

A train message may also ask for the evaluation of the round before its own
(``keys.CFG_EVALUATE_ROUND``; the server folds round r's evaluation into round r + 1's train
message): the site evaluates first, exactly as for an evaluate message, and the reply carries
that evaluation in records of its own (``keys.REC_EVAL_*``) beside the update, or beside the
training's refusal (``keys.REC_TRAIN_REFUSAL``) where the training is then refused.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcare.client import secagg
from fedcare.client.accounting import AccountantName
from fedcare.client.audit import (
    AUDIT_LOG_NAME,
    SiteAudit,
    audited_charges,
    open_site_audit,
    record_sha256,
    site_state_dir,
)
from fedcare.client.data.loaders import load_site
from fedcare.client.ledger import PrivacyLedger
from fedcare.client.local import RoundRequest, SiteTrainer, settings_from_run
from fedcare.client.personal import personal_settings
from fedcare.client.policy import simulated_site_policy
from fedcare.client.secagg import SiteHooks
from fedcare.client.site_config import SiteConfig, load_site_config
from fedcare.client.warm import WarmSites
from fedcare.common import keys
from fedcare.common.audit import config_hash
from fedcare.common.errors import (
    ConfigError,
    DataError,
    FedcareError,
    PolicyViolation,
    PrivacyBudgetExceeded,
    RoundFailed,
    TrainingDiverged,
)
from fedcare.common.federation import FederationConfig
from fedcare.common.files import private_dir
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.common.run_files import LEDGER_NAME, SITE_STATE_DIR
from fedcare.common.run_signing import verify_run
from fedcare.common.spec import FeatureSchema, describe_schema_difference, load_site_spec

__all__ = [
    "app",
    "handle_train",
    "handle_evaluate",
    "handle_train_message",
    "handle_secagg",
    "refuse",
    "resolve_site",
]

log = logging.getLogger(__name__)


def resolve_site(context: Context, cfg: FederationConfig) -> Path:
    """The site's data folder, from node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if keys.NC_DATA_PATH in node:
        # A site's budget, policy and ledger must come from the site, never from the run
        # config the coordinating server sends: a bare data folder would let the server set them.
        raise ConfigError(
            "this SuperNode names only a 'data-path'; a deployed site must run with its own "
            "site-config.toml (its budget, policy and ledger): start it with "
            "`fedcare site start site-config.toml`"
        )
    if keys.NC_PARTITION_ID not in node:
        raise ConfigError(
            "this SuperNode has no 'site-config' node config; start it with "
            "`fedcare site start site-config.toml`"
        )
    pid = int(node[keys.NC_PARTITION_ID])
    if cfg.sites_manifest:
        sites = json.loads(Path(cfg.sites_manifest).read_text(encoding="utf-8"))
        if not 0 <= pid < len(sites):
            raise ConfigError(
                f"partition {pid} has no site in {cfg.sites_manifest} ({len(sites)} listed); "
                "run as many simulated sites as the manifest lists"
            )
        return Path(sites[pid])
    return Path(cfg.data_root) / f"site-{pid}"


def _site_config(context: Context) -> SiteConfig | None:
    """The site's own ``site-config.toml`` when the SuperNode names one (a deployment)."""
    path = context.node_config.get(keys.NC_SITE_CONFIG)
    return load_site_config(Path(str(path))) if path else None


@dataclass(frozen=True)
class _Site:
    """This site for one message: its trainer, the run config with the site's own settings
    applied, and the folder of its durable state (ledger, releases, audit log)."""

    trainer: SiteTrainer
    cfg: FederationConfig
    state_dir: Path


def _open_ledger(path: Path, state_dir: Path, site_id: str) -> PrivacyLedger:
    """The site's ledger, refused when it is missing, emptied or behind the site's own
    audit log (which proves how many charges were made): a site never starts again from a
    smaller ε than it has spent."""
    proven = audited_charges(state_dir)
    if proven and not path.exists():
        raise ConfigError(
            f"site {site_id}: its privacy ledger {path} is missing, but its audit log "
            f"{state_dir / AUDIT_LOG_NAME} records {proven} charges; the site refuses to "
            "train on a fresh budget. Fix: restore the ledger from the site's backup"
        )
    try:
        ledger = PrivacyLedger(path)
        held = ledger.count_charges()
    except (OSError, sqlite3.Error) as e:
        raise ConfigError(
            f"site {site_id}: its privacy ledger {path} cannot be opened for writing ({e}); "
            f"make {state_dir} writable by the site's user (the site trains only with a "
            "ledger it can charge)"
        ) from e
    if held < proven:
        raise ConfigError(
            f"site {site_id}: its privacy ledger {path} holds {held} charges but its audit "
            f"log {state_dir / AUDIT_LOG_NAME} records {proven}; the ledger was replaced or "
            "rolled back, and the site refuses to train on it. Fix: restore the latest "
            "ledger from the site's backup"
        )
    return ledger


def _private_state(state_dir: Path, site_id: str) -> None:
    """The site's state folder, made private; one clear refusal if it cannot be."""
    try:
        private_dir(state_dir)
    except OSError as e:
        raise ConfigError(
            f"site {site_id}: its state folder {state_dir} cannot be created or made private "
            f"({e.strerror or e}); make it (or its parent) writable by the site's user"
        ) from e


def _open_site(context: Context, cfg: FederationConfig, warm: WarmSites | None = None) -> _Site:
    """Load this site, its policy and its ledger.

    A deployed site (node config ``site-config``) trains only for a run signed by the
    centre's run-signing key its ``site-config.toml`` pins (checked first, before its data or
    ledger is read), enforces its budget, policy, ledger and device, whatever the run asks,
    and refuses a ``site.toml`` that carries simulation-only settings. A simulated site's
    policy comes from :func:`fedcare.client.policy.simulated_site_policy` (the one constructor every
    simulated site uses). ``warm`` keeps the site's loaded data and encoded tasks between
    messages while its files are unchanged (a site worker's for its deployed site, this
    process's for the simulated sites it serves); the ledger, policy and config are read
    afresh for every message.
    """
    site_cfg = _site_config(context)
    if site_cfg is not None:
        # Before the data or the ledger is touched: only a run the centre's pinned key signed.
        verify_run(cfg.to_run_config(), site_cfg.run_public_key(), site_id=site_cfg.site_id)
        tasks = None
        if warm is None:
            site = load_site(site_cfg.data)
        else:
            site, tasks = warm.get(site_cfg)
        if site.spec.site_id != site_cfg.site_id:
            raise ConfigError(
                f"site-config says site_id {site_cfg.site_id!r} but {site_cfg.data}/site.toml "
                f"says {site.spec.site_id!r}; make them the same"
            )
        if site.spec.simulation is not None:
            raise ConfigError(
                f"site {site_cfg.site_id}: {site_cfg.data}/site.toml has a [simulation] table "
                "(reproducible noise or exact evaluation), which only a simulated site may "
                "use; a deployed hospital must not grant it. Fix: remove that table"
            )
        _private_state(site_cfg.state_dir, site_cfg.site_id)
        ledger = _open_ledger(site_cfg.ledger_path(), site_cfg.state_dir, site_cfg.site_id)
        trainer = SiteTrainer(
            site=site, policy=site_cfg.policy(), ledger=ledger, seed=cfg.seed, task_data=tasks
        )
        own = cfg.model_copy(update={"device": site_cfg.device})
        return _Site(trainer, own, site_cfg.state_dir)
    folder = resolve_site(context, cfg)
    tasks = None
    if warm is None:
        site = load_site(folder)
    else:
        # A state-root inside the data folder holds state, not data: its writes keep it warm.
        site, tasks = warm.load(folder, skip=[Path(cfg.state_root)] if cfg.state_root else [])
    state_dir = site_state_dir(cfg, site)
    _private_state(state_dir, site.spec.site_id)
    ledger = _open_ledger(state_dir / LEDGER_NAME, state_dir, site.spec.site_id)
    policy = simulated_site_policy(cfg)
    trainer = SiteTrainer(site=site, policy=policy, ledger=ledger, seed=cfg.seed, task_data=tasks)
    return _Site(trainer, cfg, state_dir)


def _server_value(config: ConfigRecord, key: str, kind: type[Any], default: Any = None) -> Any:
    """A value the server's message carries, checked: a malformed one is a refusal."""
    value = config.get(key, default)
    ok = (
        isinstance(value, str)
        if kind is str
        else (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (kind is not int or float(value).is_integer())
        )
    )
    if value is None or not ok:
        raise ConfigError(
            f"the server's message has {key}={value!r}, not a {kind.__name__}; the server and "
            "this site run incompatible fedcare versions"
        )
    return kind(value)


def _request(cfg: FederationConfig, run_cfg: FederationConfig, msg: Message) -> RoundRequest:
    """The round the message asks for. ``run_cfg`` is the run config as the server sent it
    (its hash binds a stored release to this run); ``cfg`` the one the site applies."""
    config = msg.content.config_records[keys.REC_CONFIG]
    mu = _server_value(config, keys.CFG_PROXIMAL_MU, float, cfg.proximal_mu)
    train, dp = settings_from_run(cfg, proximal_mu=mu)
    arrays = msg.content.array_records.get(keys.REC_ARRAYS)
    return RoundRequest(
        run_id=_server_value(config, keys.RC_RUN_ID, str),
        round=_server_value(config, keys.CFG_FEDCARE_ROUND, int),
        rounds_planned=cfg.num_server_rounds,
        task=cfg.task,
        train=train,
        dp=dp,
        evaluation_rounds=cfg.evaluation_rounds,
        received_sha256="" if arrays is None else record_sha256(arrays),
        config_sha256=config_hash(run_cfg.to_run_config()),
        personal=personal_settings(cfg),
        explain=cfg.explain,
    )


def _received_state(
    msg: Message, trainer: SiteTrainer, request: RoundRequest, model: str
) -> dict[str, torch.Tensor]:
    """The model the server sent, as tensors by name (packed on the wire:
    :mod:`fedcare.common.packed_arrays`), checked against this site's own model for the
    task (names, shapes, dtypes); a malformed, missing or foreign one is refused."""
    record = msg.content.array_records.get(keys.REC_ARRAYS)
    if record is None:
        raise ConfigError(f"the server's message has no {keys.REC_ARRAYS!r} model arrays")
    try:
        arrays = unpack_record(record)
    except Exception as e:  # anything the centre's bytes make numpy raise: its fault, refused
        raise ConfigError(
            f"the server's model arrays are malformed ({type(e).__name__}: {str(e)[:200]})"
        ) from e
    own = trainer.build_model(request.task, model or None).state_dict()
    differ = [
        name
        for name in sorted(set(own) | set(arrays))
        if name not in own
        or name not in arrays
        or tuple(arrays[name].shape) != tuple(own[name].shape)
        or str(arrays[name].dtype) != str(own[name].dtype).removeprefix("torch.")
    ]
    if differ:
        raise ConfigError(
            f"the server's model does not fit this site's {request.task!r} model: "
            f"{len(differ)} tensor(s) differ in name, shape or dtype (e.g. {differ[:3]}); "
            "every site and the server must run the same fedcare version and model"
        )
    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def _check_schema(trainer: SiteTrainer, msg: Message) -> None:
    """Refuse a federation whose feature schema is not this site's, naming what differs
    when the server sent its schema (the schema holds no patient data)."""
    config = msg.content[keys.REC_CONFIG]
    expected = str(config.get(keys.CFG_SCHEMA_FINGERPRINT, ""))
    mine = trainer.site.spec.feature_schema
    if not expected or expected == mine.fingerprint():
        return
    how = f"fingerprint {mine.fingerprint()[:12]} here, {expected[:12]} in the federation"
    raw = config.get(keys.CFG_SCHEMA)
    if isinstance(raw, str) and raw:
        try:
            theirs = FeatureSchema.model_validate_json(raw)
        except ValueError:
            how += "; the schema the server sent is not a valid feature schema"
        else:
            how = describe_schema_difference(
                mine, theirs, a_name="this site", b_name="the federation"
            )
    raise ConfigError(
        f"this site's feature schema differs from the federation's ({how}); every site must "
        "use the federation's shared schema in its site.toml"
    )


_ERROR_CODES: tuple[tuple[type[FedcareError], int], ...] = (
    (PrivacyBudgetExceeded, keys.ERR_BUDGET),
    (PolicyViolation, keys.ERR_POLICY),
    (DataError, keys.ERR_DATA),
    (TrainingDiverged, keys.ERR_DIVERGED),
    (RoundFailed, keys.ERR_FAILED),
    (FedcareError, keys.ERR_CONFIG),
)


def _public_reason(error: FedcareError, site_id: str) -> str:
    """What may leave the site about ``error``: never a data problem's details.

    A data error's message can quote cell values or patient ids, so the server (and the
    audit log an auditor receives) gets only its kind; the full text goes to the site's own
    log (the SuperNode's output).
    """
    if isinstance(error, DataError):
        log.warning("site %s refused the round: %s", site_id, error)
        return (
            f"its data failed validation ({type(error).__name__}); the details stay at the "
            "site: run `fedcare data check` on its data folder there"
        )
    return " ".join(str(error).split())


def _refusal(
    site_id: str, error: FedcareError, ledger: tuple[float, float] | None = None
) -> tuple[int, str]:
    """The error code and reason a refusal of ``error`` sends (the reason names the site)."""
    code = next(c for cls, c in _ERROR_CODES if isinstance(error, cls))
    reason = f"{site_id}: {_public_reason(error, site_id)}"
    if ledger is not None:
        reason = keys.with_ledger_epsilon(reason, epsilon=ledger[0], delta=ledger[1])
    return code, reason


def _ledger_epsilon(
    trainer: SiteTrainer | None, accountant: AccountantName
) -> tuple[float, float] | None:
    """``(ε, δ)`` this site's ledger holds for its patients, for a refusal to report (the
    same number every reply reports); ``None`` before the site (and so the run's signature)
    was checked, or where it cannot be read."""
    if trainer is None or trainer.ledger is None:
        return None
    delta = trainer.policy.delta
    try:
        spent = trainer.ledger.spent(trainer.dataset_key, delta=delta, accountant=accountant)
    except (FedcareError, OSError, sqlite3.Error):
        return None
    return float(spent), float(delta)


def _early_audit(context: Context) -> SiteAudit | None:
    """A deployed site's audit log for a refusal that came before its data was loaded (an
    unsigned run, a bad site.toml): the entry records the refusal, no dataset. ``None``
    where there is no site-config, or it is too broken to say where the log lives (the
    SuperNode's output then has the reason)."""
    path = context.node_config.get(keys.NC_SITE_CONFIG)
    if not path:
        return None
    try:
        site_cfg = load_site_config(Path(str(path)))
        private_dir(site_cfg.state_dir)
        return SiteAudit.open(site_cfg.state_dir, site_id=site_cfg.site_id, dataset_fingerprint="")
    except (FedcareError, OSError) as e:
        log.warning("the refusal cannot be written to the site's audit log: %s", e)
        return None


def _logged_refusal(
    msg: Message,
    site_id: str,
    error: FedcareError,
    audit: SiteAudit | None,
    phase: str,
    context: Context,
    ledger: tuple[float, float] | None = None,
    *,
    round: int | None = None,
) -> tuple[int, str]:
    """A refusal's code and reason, logged first in the site's audit log (a deployed site's
    log is opened for it when the refusal came before the site was loaded). ``round``: the
    round refused where it is not the message's own (a folded evaluation's)."""
    if audit is None:
        audit = _early_audit(context)
    if audit is not None:
        code = next(c for cls, c in _ERROR_CODES if isinstance(error, cls))
        try:
            audit.refused(
                msg, phase=phase, code=code, reason=_public_reason(error, site_id), round=round
            )
        except FedcareError as audit_error:  # a broken audit trail is the more urgent news
            error = audit_error
    return _refusal(site_id, error, ledger)


def _refuse(
    msg: Message,
    site_id: str,
    error: FedcareError,
    audit: SiteAudit | None,
    phase: str,
    context: Context,
    ledger: tuple[float, float] | None = None,
) -> Message:
    """The refusal reply, logged first in the site's audit log (:func:`_logged_refusal`)."""
    code, reason = _logged_refusal(msg, site_id, error, audit, phase, context, ledger)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def refuse(msg: Message, context: Context, error: FedcareError, *, phase: str) -> Message:
    """Refuse ``msg`` before fedcare's ClientApp looked at it (the site worker's refusal of
    an app that is not fedcare's, or of a message type it does not answer): the refusal is
    logged in a deployed site's audit log, and the error reply names the site."""
    return _refuse(msg, _site_id_guess(context), error, None, phase, context)


def _open_audit(site: _Site, run_cfg: FederationConfig, msg: Message) -> SiteAudit:
    """The site's audit log in its state dir, with this run's ``run-start`` logged.

    ``run_cfg`` is the run config as the server sent it (its hash is compared with the
    server's).
    """
    return open_site_audit(site.trainer, site.state_dir, msg, run_config=run_cfg.to_run_config())


def _privacy_numbers(
    epsilon: float | None, delta: float | None, run_epsilon: float | None
) -> tuple[float, float, float] | None:
    """``(ε, δ, run ε)`` of a DP release, or ``None`` when one is missing."""
    if epsilon is None or delta is None or run_epsilon is None:
        return None
    return float(epsilon), float(delta), float(run_epsilon)


def _site_id_guess(context: Context) -> str:
    node = context.node_config
    if keys.NC_SITE_CONFIG in node:
        try:
            return load_site_config(Path(str(node[keys.NC_SITE_CONFIG]))).site_id
        except ConfigError:
            pass  # the refusal that follows says what is wrong with the site-config
    if keys.NC_PARTITION_ID in node:
        # A simulated site that cannot be loaded still has a site.toml naming it.
        try:
            folder = resolve_site(context, FederationConfig.from_run_config(context.run_config))
            return load_site_spec(folder).site_id
        except (FedcareError, OSError, ValueError):
            return f"partition-{node[keys.NC_PARTITION_ID]}"
    return f"node-{context.node_id}"


def handle_train(msg: Message, context: Context, *, warm: WarmSites | None = None) -> Message:
    """One round of private local training; see the module docstring.

    Where the message also asks for the evaluation of the round before it
    (``keys.CFG_EVALUATE_ROUND``: the server folds round r's evaluation into round r + 1's
    train message, whose model is the global model after round r), the site runs that
    evaluation first, exactly as :func:`handle_evaluate` would (same policy checks, charge,
    release and audit entries, under round r), then trains (:func:`_folded_evaluation`).
    """
    site_id = _site_id_guess(context)
    audit: SiteAudit | None = None
    trainer: SiteTrainer | None = None
    accountant: AccountantName = "prv"
    folded: dict[str, ConfigRecord | MetricRecord] = {}
    try:
        run_cfg = FederationConfig.from_run_config(context.run_config)
        accountant = run_cfg.accountant
        here = _open_site(context, run_cfg, warm)
        trainer, cfg = here.trainer, here.cfg
        site_id = trainer.site_id
        audit = _open_audit(here, run_cfg, msg)
        _check_schema(trainer, msg)
        request = _request(cfg, run_cfg, msg)
        state = _received_state(msg, trainer, request, cfg.model)
        folded = _folded_evaluation(msg, context, here, request, state, audit)
        result = trainer.train_round(request, state)
        privacy = _privacy_numbers(result.epsilon, result.delta, result.run_epsilon)
        if result.mechanism is not None and privacy is None:
            raise ConfigError(
                f"site {site_id}: a DP round came back without its epsilon; the update is "
                "withheld (report this as a fedcare bug)"
            )
        evaluation = trainer.evaluation_mode(request.dp)
        arrays = pack_record(result.state)
        sent = record_sha256(arrays)
        head = audit.train(msg, result, sent_sha256=sent, accountant=cfg.accountant)
    except FedcareError as e:
        ledger = _ledger_epsilon(trainer, accountant)
        if not folded:
            return _refuse(msg, site_id, e, audit, "train", context, ledger)
        # The evaluation before it was answered (and may have been charged): it still
        # leaves, beside the training's refusal.
        code, reason = _logged_refusal(msg, site_id, e, audit, "train", context, ledger)
        refusal = ConfigRecord({keys.F_CODE: code, keys.F_REASON: reason})
        return Message(RecordDict({**folded, keys.REC_TRAIN_REFUSAL: refusal}), reply_to=msg)
    numbers: dict[str, int | float | list[int] | list[float]] = {
        keys.M_NUM_EXAMPLES: result.n_train,
        keys.M_STEPS: result.steps,
    }
    if evaluation == keys.EVAL_EXACT:
        # The training loss is a statistic of the patients under whatever weights the server
        # sent: it leaves the site only where evaluation is exact anyway.
        numbers[keys.M_TRAIN_LOSS] = float(result.train_loss)
    metrics = MetricRecord(numbers)
    info: dict[str, Any] = {
        keys.S_SITE_ID: site_id,
        keys.S_DP: result.mechanism is not None,
        keys.S_REPLAYED: result.replayed,
        keys.S_NOISE: result.noise,
        keys.S_EVALUATION: evaluation,
        keys.S_AUDIT_KEY: audit.key_fingerprint,
        keys.S_AUDIT_HEAD: str(head),
    }
    if result.mechanism is not None:
        assert privacy is not None  # checked above
        epsilon, delta, run_epsilon = privacy
        info.update(
            {
                keys.S_EPSILON: epsilon,
                keys.S_RUN_EPSILON: run_epsilon,
                keys.S_DELTA: delta,
                keys.S_ACCOUNTANT: cfg.accountant,
                keys.S_NOISE_MULTIPLIER: result.mechanism.noise_multiplier,
                keys.S_SAMPLE_RATE: result.mechanism.sample_rate,
                keys.S_STEPS: result.mechanism.steps,
            }
        )
    content = RecordDict(
        {
            keys.REC_ARRAYS: arrays,
            keys.REC_METRICS: metrics,
            keys.REC_SITE: ConfigRecord(info),
            **folded,
        }
    )
    return Message(content=content, reply_to=msg)


def _folded_evaluation(
    msg: Message,
    context: Context,
    here: _Site,
    request: RoundRequest,
    state: dict[str, torch.Tensor],
    audit: SiteAudit,
) -> dict[str, ConfigRecord | MetricRecord]:
    """The evaluation a train message asks for before its training, as the reply's records
    (none where it asks for none).

    Only the round before the message's own may be asked for (the round whose global model
    the message carries); the evaluation is then exactly :func:`handle_evaluate`'s under that
    round: the site's plan (``evaluation_rounds``), its per-run evaluation cap, its budget,
    the once-per-round release (a second request is answered with the stored release or
    refused) and k-suppression all apply. A refused evaluation is logged in the site's audit
    log and reported in its own record (``keys.REC_EVAL_REFUSAL``); the training goes on,
    as it would after a separate evaluate message the site refused. A malformed
    ``evaluate-round`` refuses the whole message.
    """
    config = msg.content.config_records[keys.REC_CONFIG]
    if keys.CFG_EVALUATE_ROUND not in config:
        return {}
    asked = _server_value(config, keys.CFG_EVALUATE_ROUND, int)
    trainer, cfg = here.trainer, here.cfg
    try:
        if asked != request.round - 1:
            raise PolicyViolation(
                f"site {trainer.site_id}: the train message of round {request.round} asks it "
                f"to evaluate round {asked}; a train message may carry only the evaluation of "
                "the round before its own (the global model it sends)"
            )
        metrics, info = _evaluation(
            msg, trainer, cfg, replace(request, round=asked), state, audit, audit_round=asked
        )
    except FedcareError as e:
        ledger = _ledger_epsilon(trainer, cfg.accountant)
        code, reason = _logged_refusal(
            msg, trainer.site_id, e, audit, "evaluate", context, ledger, round=asked
        )
        refusal = {keys.S_EVALUATED_ROUND: asked, keys.F_CODE: code, keys.F_REASON: reason}
        return {keys.REC_EVAL_REFUSAL: ConfigRecord(refusal)}
    info[keys.S_EVALUATED_ROUND] = asked
    return {keys.REC_EVAL_METRICS: metrics, keys.REC_EVAL_SITE: ConfigRecord(info)}


def _evaluation(
    msg: Message,
    trainer: SiteTrainer,
    cfg: FederationConfig,
    request: RoundRequest,
    state: dict[str, torch.Tensor],
    audit: SiteAudit,
    *,
    audit_round: int | None = None,
) -> tuple[MetricRecord, dict[str, Any]]:
    """Evaluate the received model for ``request`` (the personal model's fine-tune first,
    where the run's personalization runs one), log both in the site's audit log (under
    ``audit_round`` where it is not the message's own), and return the reply's metrics and site
    record."""
    # A fine-tune (its own charge) is run and logged before the evaluation, so its charge
    # is in the audit log even if the evaluation is then refused or fails.
    tuned = trainer.personalize(request, state)
    if tuned is not None:
        audit.personalize(
            msg, tuned, delta=trainer.policy.delta, accountant=cfg.accountant, round=audit_round
        )
    result = trainer.evaluate_round(request, state)
    audit.evaluate(
        msg, result, delta=trainer.policy.delta, accountant=cfg.accountant, round=audit_round
    )
    values = result.metrics
    n_test = max(int(round(values.get("test.n", 0))), 0)
    metrics = MetricRecord({keys.M_NUM_EXAMPLES: n_test, **values})
    info: dict[str, Any] = {
        keys.S_SITE_ID: trainer.site_id,
        keys.S_AUDIT_KEY: audit.key_fingerprint,
        keys.S_EVALUATION: result.mode,
    }
    if result.mechanism is not None:  # its noise: the centre bounds what noisy counts may be
        info[keys.S_NOISE_MULTIPLIER] = float(result.mechanism.noise_multiplier)
    epsilon, run_epsilon = result.epsilon, result.run_epsilon
    tuned = result.personalized  # a fine-tune's charge, the latest where evaluation is exact
    if (
        tuned is not None
        and tuned.epsilon is not None
        and tuned.run_epsilon is not None
        and (epsilon is None or tuned.epsilon > epsilon)
    ):
        epsilon, run_epsilon = tuned.epsilon, tuned.run_epsilon
    if epsilon is not None and run_epsilon is not None:
        info[keys.S_EPSILON] = float(epsilon)
        info[keys.S_RUN_EPSILON] = float(run_epsilon)
        info[keys.S_DELTA] = float(trainer.policy.delta)
    return metrics, info


def handle_evaluate(msg: Message, context: Context, *, warm: WarmSites | None = None) -> Message:
    """Evaluate the global model on this site's validation and test splits."""
    site_id = _site_id_guess(context)
    audit: SiteAudit | None = None
    trainer: SiteTrainer | None = None
    accountant: AccountantName = "prv"
    try:
        run_cfg = FederationConfig.from_run_config(context.run_config)
        accountant = run_cfg.accountant
        here = _open_site(context, run_cfg, warm)
        trainer, cfg = here.trainer, here.cfg
        site_id = trainer.site_id
        audit = _open_audit(here, run_cfg, msg)
        _check_schema(trainer, msg)
        request = _request(cfg, run_cfg, msg)
        state = _received_state(msg, trainer, request, cfg.model)
        metrics, info = _evaluation(msg, trainer, cfg, request, state, audit)
    except FedcareError as e:
        ledger = _ledger_epsilon(trainer, accountant)
        return _refuse(msg, site_id, e, audit, "evaluate", context, ledger)
    content = RecordDict({keys.REC_METRICS: metrics, keys.REC_SITE: ConfigRecord(info)})
    return Message(content=content, reply_to=msg)


#: The sites this process has loaded, kept between the messages it answers while their files
#: are unchanged (:class:`fedcare.client.warm.WarmSites`): a Ray actor of Flower's simulation engine
#: answers many simulated sites' messages. It is a module global on purpose: the engine
#: pickles the ClientApp (and the handlers' closures) into every message it sends an actor,
#: so only what the handlers reach through their module lasts in the actor's process, and a
#: pickled WarmSites is an empty one.
_process_sites = WarmSites()

app = ClientApp()


def _secagg_hooks(context: Context, warm: WarmSites | None) -> SiteHooks:
    """What secure aggregation's site side borrows from this app (client/secagg.py)."""

    def site_audit() -> SiteAudit:
        here = _open_site(context, FederationConfig.from_run_config(context.run_config), warm)
        trainer = here.trainer
        return SiteAudit.open(
            here.state_dir, site_id=trainer.site_id, dataset_fingerprint=trainer.dataset_key
        )

    return SiteHooks(
        train=lambda m: handle_train(m, context, warm=warm),
        audit=site_audit,
        refuse=lambda m, e, phase, audit: _refuse(
            m, _site_id_guess(context), e, audit, phase, context
        ),
        roster=lambda: _secagg_roster(context),
    )


def _secagg_roster(context: Context) -> dict[str, bytes]:
    """The hospitals this site pins for secure aggregation (``SiteHooks.roster``): a
    deployed site's peers file plus its own key; a simulated federation's sites' own keys."""
    site_cfg = _site_config(context)
    if site_cfg is not None:
        return site_cfg.secagg_roster()
    cfg = FederationConfig.from_run_config(context.run_config)
    count = context.node_config.get("num-partitions")
    if not isinstance(count, int) or count < 1:
        raise ConfigError("a simulated site has no 'num-partitions' to pin its peers from")
    sites = []
    for pid in range(count):
        probe = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={keys.NC_PARTITION_ID: pid},
            state=RecordDict(),
            run_config=context.run_config,
        )
        folder = resolve_site(probe, cfg)
        site_id = load_site_spec(folder).site_id
        state = Path(cfg.state_root) / site_id if cfg.state_root else folder / SITE_STATE_DIR
        sites.append((site_id, state))
    return secagg.audit_keys(sites)


def handle_train_message(
    msg: Message, context: Context, *, warm: WarmSites | None = None
) -> Message:
    """A train message: :func:`handle_train`, or secure aggregation's first stage where the
    run says ``secure-aggregation = true`` (``client/secagg.py``)."""
    return secagg.answer_train(msg, context, hooks=_secagg_hooks(context, warm))


def handle_secagg(msg: Message, context: Context, *, warm: WarmSites | None = None) -> Message:
    """A later stage of a secure-aggregation round (``query.secagg``)."""
    return secagg.answer_stage(msg, context, hooks=_secagg_hooks(context, warm))


@app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train_message(msg, context, warm=_process_sites)


@app.query("secagg")
def _secagg(msg: Message, context: Context) -> Message:
    return handle_secagg(msg, context, warm=_process_sites)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context, warm=_process_sites)
