"""Attack a finished run: membership inference per site, and a one-run canary audit.

:func:`audit_run` is what ``fedcare audit attack RUNDIR`` does. For each audited site it
rebuilds the site's split exactly as training did, scores the site's training patients
(members) against its held-out val and test patients (non-members) under the run's final
global model with every registered attack (loss threshold, offline RMIA), and audits the
site's mechanism with canaries. The population an attacker may use at a site -- for
reference models, and as canaries -- is the federation's other sites' patients; canaries may
also copy the site's own held-out patients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch.utils.data import ConcatDataset, Dataset

from fedcare.client.data.datasets import TaskData
from fedcare.client.training import resolve_device
from fedcare.common.errors import ConfigError, format_validation_error
from fedcare.common.files import write_private_atomic
from fedcare.simulations.audit.attacks.base import (
    AttackOptions,
    AttackTarget,
    attack_names,
    get_attack,
)
from fedcare.simulations.audit.attacks.canary import CanaryOptions, canary_audit
from fedcare.simulations.audit.attacks.roc import attack_result
from fedcare.simulations.audit.attacks.run_dir import RunArtifacts, load_run
from fedcare.simulations.audit.attacks.signals import example_losses
from fedcare.simulations.audit.findings import ATTACKS_FILE, AttackReport, AttackResult, CanaryAudit

__all__ = ["audit_run", "write_attack_report", "read_attack_report", "SkipFn"]

SkipFn = Callable[[str, str, str], None]
"""Told ``(site_id, attack, reason)`` when an attack cannot run at a site."""


def _all_splits(data: TaskData) -> Dataset[Any]:
    return ConcatDataset([data.train, data.val, data.test])


def _targets(
    art: RunArtifacts, datas: dict[str, TaskData], site_ids: Sequence[str], device: str
) -> list[tuple[AttackTarget, Dataset[Any]]]:
    dev = resolve_device(device)
    out: list[tuple[AttackTarget, Dataset[Any]]] = []
    for site_id in site_ids:
        data = datas[site_id]
        kind = art.kind(data)
        model = art.final_model(data, dev)
        nonmembers: Dataset[Any] = ConcatDataset([data.val, data.test])
        others = [_all_splits(d) for s, d in datas.items() if s != site_id]
        target = AttackTarget(
            site_id=site_id,
            members=data.train,
            nonmembers=nonmembers,
            member_losses=example_losses(model, data.train, kind=kind, device=dev),
            nonmember_losses=example_losses(model, nonmembers, kind=kind, device=dev),
            population=ConcatDataset(others) if others else None,
            build_model=art.model_factory(data),
            kind=kind,
            mechanism=art.mechanism(site_id),
            device=dev,
        )
        out.append((target, ConcatDataset([nonmembers, *others])))
    return out


def _check_sites(art: RunArtifacts, sites: Sequence[str]) -> None:
    known = sorted(s.site_id for s in art.summary.sites)
    unknown = [s for s in sites if s not in known]
    if unknown:
        raise ConfigError(
            f"site(s) {', '.join(unknown)} did not take part in the run at {art.run_dir}; "
            f"choose from: {', '.join(known)}"
        )


def _select(datas: dict[str, TaskData], sites: Sequence[str], run_dir: Path) -> list[str]:
    missing = [s for s in sites if s not in datas]
    if missing:
        raise ConfigError(
            f"site(s) {', '.join(missing)} took part in the run at {run_dir} but none of the "
            f"folders in its sites.json holds them now; restore their folders"
        )
    return list(dict.fromkeys(sites)) if sites else sorted(datas)


def audit_run(
    run_dir: Path,
    *,
    sites: Sequence[str] = (),
    attacks: Sequence[str] | None = None,
    attack_options: AttackOptions = AttackOptions(),  # noqa: B008 - frozen
    canary_options: CanaryOptions | None = CanaryOptions(),  # noqa: B008 - frozen
    device: str = "auto",
    on_skip: SkipFn | None = None,
) -> AttackReport:
    """Attack a finished run's final global model at each site; audit each site with canaries.

    Parameters
    ----------
    run_dir:
        A finished run directory (``fedcare simulate --out``).
    sites:
        Site ids to audit; empty: every site of the run.
    attacks:
        Registered attack names; ``None``: all (:func:`attack_names`).
    attack_options:
        Reference models, RMIA's offline ``a``, seed.
    canary_options:
        The canary audit's settings; ``None`` skips the canary audit.
    device:
        ``auto``, ``cpu`` or ``cuda``.
    on_skip:
        Told about every attack that cannot run at a site (e.g. RMIA in a one-site run).

    Returns
    -------
    AttackReport
        ``delta`` is the δ every canary bound is computed at: the sites' δ for a DP run, the
        run's ``target-delta`` for a non-private one.

    Raises
    ------
    ConfigError
        Not a finished run directory, a site folder gone or changed, an unknown site or
        attack, or more canaries than patients to copy.
    """
    names = list(attack_names() if attacks is None else attacks)
    chosen = [get_attack(n) for n in names]
    art = load_run(Path(run_dir))
    _check_sites(art, sites)
    datas = art.site_task_data()
    site_ids = _select(datas, sites, art.run_dir)
    delta = art.config.target_delta
    results: list[AttackResult] = []
    audits: list[CanaryAudit] = []
    targets = _targets(art, datas, site_ids, device)
    if canary_options is not None:  # refuse impossible canary counts before any training
        for _, canary_pool in targets:
            canary_options.resolve(len(canary_pool))  # type: ignore[arg-type]
    for target, canary_pool in targets:
        for attack in chosen:
            reason = attack.applicable(target)
            if reason is not None:
                if on_skip is not None:
                    on_skip(target.site_id, attack.name, reason)
                continue
            members, nonmembers = attack.scores(target, attack_options)
            results.append(
                attack_result(
                    attack=attack.name,
                    site_id=target.site_id,
                    member_scores=members,
                    nonmember_scores=nonmembers,
                )
            )
        if canary_options is None:
            continue
        claimed: float | None = None
        site_delta = delta
        site = art.site_result(target.site_id)
        if art.dp and site is not None:
            claimed = site.privacy.epsilon
            site_delta = site.privacy.delta if site.privacy.delta is not None else delta
        audits.append(
            canary_audit(
                target,
                canary_pool=canary_pool,
                claimed_epsilon=claimed,
                delta=site_delta,
                options=canary_options,
            )
        )
    return AttackReport(
        run_id=art.summary.run_id, dp=art.dp, delta=delta, attacks=results, canaries=audits
    )


def write_attack_report(report: AttackReport, run_dir: Path) -> Path:
    """Save ``report`` atomically as ``run_dir / ATTACKS_FILE``; returns the path."""
    path = Path(run_dir) / ATTACKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_private_atomic(path, report.model_dump_json(indent=2).encode("utf-8"))


def read_attack_report(run_dir: Path) -> AttackReport:
    """Read ``run_dir / ATTACKS_FILE`` back, validated.

    Raises
    ------
    ConfigError
        Missing, unreadable, or not an attack report.
    """
    path = Path(run_dir) / ATTACKS_FILE
    try:
        return AttackReport.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read it ({e}); run `fedcare audit attack {run_dir}` first"
        ) from e
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(str(path), e)
            + f"; it is not an attack report this fedcare reads: rerun `fedcare audit attack "
            f"{run_dir}` to rewrite it"
        ) from e
