"""Recompute every site's ε from the audit logs with an independent accountant.

Sites account with Opacus (PRV by default). This audit takes the mechanisms the logs record
(noise multiplier, sample rate, steps) and recomputes ε after each round with Google's
``dp_accounting`` PLD accountant (:func:`fedcare.client.accounting.independent_epsilon`), which
shares no code with Opacus.

Where a site's own log is at hand it is the source: it holds the **whole history** of the
site's dataset (every run that trained on it, in order; one history per dataset
fingerprint), so the recomputed ε covers earlier runs too. Otherwise the server log's
per-round reports of that site are used; they cover this run only, so the recomputed ε is
then a lower bound and a site with an earlier history will look as if it over-reports,
which is never flagged (only the latest ``run-start`` of the run in that log counts).

A round is charged once per kind: a retried or replayed round (same dataset, run, round
and kind) adds nothing; a private evaluation (an ``evaluate`` entry with a mechanism) is a
charge of its own, and so is the DP fine-tune of a site's personal model (a
``personalize`` entry), which also gets a row of its own (``kind`` ``personalize``). A row
is *flagged* when the site reported less than the recomputed ε by more than
:data:`TOLERANCE`: both accountants return upper bounds on the true ε, and the PLD one
is at most its discretisation interval above it, so a sound report is never below
``recomputed - TOLERANCE`` (the band ``tests/client/test_accounting.py`` checks).

The logs are read, not verified: run ``fedcare audit verify`` (``verify_paths``) too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcare.client.accounting import (
    PLD_DISCRETIZATION,
    Mechanism,
    independent_epsilon,
    merge_mechanisms,
)
from fedcare.common import audit_kinds as kinds
from fedcare.common.audit import read_entries
from fedcare.simulations.audit.findings import EpsilonAudit, EpsilonRow
from fedcare.simulations.audit.verify import SERVER_WRITER, find_run_logs, run_config

__all__ = [
    "TOLERANCE",
    "INDEPENDENT_ACCOUNTANT",
    "Charge",
    "site_log_charges",
    "server_log_charges",
    "audit_charges",
    "recompute_epsilon",
]

TOLERANCE = PLD_DISCRETIZATION
INDEPENDENT_ACCOUNTANT = "pld (dp-accounting)"


@dataclass(frozen=True)
class Charge:
    """One round's mechanism as a log records it, with the ε the site reported after it."""

    site_id: str
    dataset: str  # dataset fingerprint ("" when only the server's report is known)
    run_id: str
    round: int
    mechanism: Mechanism
    reported_epsilon: float
    delta: float
    accountant: str
    # "evaluate": a private evaluation release (joins the history only); "personalize": the
    # DP fine-tune of a site's personal model (a row of its own, like a training round).
    kind: str = kinds.TRAIN


def _mechanism(data: dict[str, Any]) -> Mechanism:
    return Mechanism(
        noise_multiplier=float(data["noise_multiplier"]),
        sample_rate=float(data["sample_rate"]),
        steps=int(data["steps"]),
    )


def site_log_charges(entries: Sequence[dict[str, Any]]) -> list[Charge]:
    """The charged releases of one site's log, in log order, each (dataset, run, round,
    kind) once: DP-SGD rounds (``train``), private evaluations (``evaluate`` entries that
    carry a mechanism: ``steps`` Gaussian releases) and personal models' DP fine-tunes
    (``personalize`` entries that carry a mechanism)."""
    out: list[Charge] = []
    seen: set[tuple[str, str, int, str]] = set()
    for e in entries:
        d = e["data"]
        if d.get("mechanism") is None:
            continue
        charged = e["kind"] in (kinds.EVALUATE, kinds.PERSONALIZE)
        if not (charged or (e["kind"] == kinds.TRAIN and d.get("dp"))):
            continue
        key = (str(d["dataset_fingerprint"]), str(e["run_id"]), int(d["round"]), e["kind"])
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Charge(
                site_id=str(e["writer"]),
                dataset=key[0],
                run_id=key[1],
                round=key[2],
                mechanism=_mechanism(d["mechanism"]),
                reported_epsilon=float(d["epsilon"]),
                delta=float(d["delta"]),
                accountant=str(d.get("accountant")),
                kind=str(e["kind"]),
            )
        )
    return out


def server_log_charges(entries: Sequence[dict[str, Any]]) -> list[Charge]:
    """The DP rounds each site reported to the server (accepted or rejected updates), in log
    order, each (site, run, round) once."""
    out: list[Charge] = []
    seen: set[tuple[str, str, int]] = set()
    for e in entries:
        d = e["data"]
        report = d.get("site") or {}
        if e["kind"] not in kinds.SERVER_UPDATE_KINDS or report.get("dp") is not True:
            continue
        key = (str(d["site_id"]), str(e["run_id"]), int(d["round"]))
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Charge(
                site_id=key[0],
                dataset="",
                run_id=key[1],
                round=key[2],
                mechanism=_mechanism(report),
                reported_epsilon=float(report["epsilon"]),
                delta=float(report["delta"]),
                accountant=str(report.get("accountant")),
            )
        )
    return out


def audit_charges(
    charges: Sequence[Charge], *, run_ids: set[str] | None = None
) -> list[EpsilonRow]:
    """One row per training (or fine-tune) charge of ``run_ids`` (all when ``None``): ε
    recomputed over the dataset's history up to and including that charge, and compared
    with the report."""
    rows: list[EpsilonRow] = []
    history: dict[tuple[str, str], list[Mechanism]] = {}
    done: set[tuple[str, str, int, str]] = set()
    for c in charges:
        past = history.setdefault((c.site_id, c.dataset), [])
        past.append(c.mechanism)
        key = (c.site_id, c.run_id, c.round, c.kind)
        if c.kind not in (kinds.TRAIN, kinds.PERSONALIZE):
            continue  # an evaluation's charge counts in the history; rows are per round
        if (run_ids is not None and c.run_id not in run_ids) or key in done:
            continue
        done.add(key)
        recomputed = independent_epsilon(merge_mechanisms(past), delta=c.delta)
        rows.append(
            EpsilonRow(
                site_id=c.site_id,
                round=c.round,
                delta=c.delta,
                reported_epsilon=c.reported_epsilon,
                recomputed_epsilon=recomputed,
                difference=recomputed - c.reported_epsilon,
                flagged=c.reported_epsilon < recomputed - TOLERANCE,
                kind=kinds.PERSONALIZE if c.kind == kinds.PERSONALIZE else kinds.TRAIN,
            )
        )
    return rows


def recompute_epsilon(run_dir: Path) -> EpsilonAudit:
    """Recompute each site's ε after each round of the run in ``run_dir``.

    Parameters
    ----------
    run_dir:
        A run directory (its ``audit/server.jsonl`` and the site logs found through
        ``sites.json`` / ``state-root``; see
        :func:`~fedcare.simulations.audit.verify.find_run_logs`).

    Returns
    -------
    EpsilonAudit
        One row per site and round of this run (DP rounds only), sorted by site and round.

    Raises
    ------
    AuditLogError
        If a log has a line that is not an audit entry.
    """
    logs = find_run_logs(Path(run_dir))
    server_entries = read_entries(logs.server) if logs.server is not None else []
    starts = kinds.SERVER_START_KINDS
    run_ids = {str(e["run_id"]) for e in server_entries if e["kind"] in starts}
    if not run_ids:
        configured = str(run_config(Path(run_dir)).get("run-id") or "")
        run_ids = {configured} if configured else set()
    rows: list[EpsilonRow] = []
    accountants: set[str] = set()
    covered: set[str] = set()
    for path in logs.sites:
        entries = read_entries(path)
        if not entries or entries[0]["writer"] == SERVER_WRITER:
            continue
        covered.add(str(entries[0]["writer"]))
        charges = site_log_charges(entries)
        accountants.update(c.accountant for c in charges if c.run_id in run_ids or not run_ids)
        rows.extend(audit_charges(charges, run_ids=run_ids or None))
    # The server's reports of its latest start of the run (an earlier start in the same
    # folder may have had other sites).
    first = [i for i, e in enumerate(server_entries) if e["kind"] == kinds.RUN_START]
    latest = server_entries[first[-1] :] if first else server_entries
    fallback = [c for c in server_log_charges(latest) if c.site_id not in covered]
    accountants.update(c.accountant for c in fallback)
    rows.extend(audit_charges(fallback, run_ids=run_ids or None))
    rows.sort(key=lambda r: (r.site_id, r.round))
    return EpsilonAudit(
        reported_accountant=", ".join(sorted(accountants)) or "none",
        independent_accountant=INDEPENDENT_ACCOUNTANT,
        tolerance=TOLERANCE,
        rows=rows,
        ok=not any(r.flagged for r in rows),
    )
