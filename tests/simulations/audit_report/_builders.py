"""Hand-built findings of a 3-site x 2-round DP run, with the numbers the page must show.

Every value here is chosen by hand; ``EXPECTED_*`` are the strings the page prints for them
(three decimals, see ``fedcare.simulations.audit.report``), written out literally, not computed.
"""

from __future__ import annotations

from typing import Any

from fedcare.common.run_record import RunRecord
from fedcare.common.summary import RunSummary
from fedcare.simulations.audit.findings import (
    AttackReport,
    AttackResult,
    CanaryAudit,
    EpsilonAudit,
    EpsilonRow,
    LogCheck,
    RocCurve,
    VerifyResult,
)

RUN_ID = "audit-run-7"
SITES = ("site-0", "site-1", "site-2")
DELTA = 1e-05
FP = "ab" * 32  # a 64-hex key fingerprint

#: (site, round) -> (reported, recomputed)
EPSILONS = {
    ("site-0", 1): (5.884225, 5.881002),
    ("site-0", 2): (7.983397, 7.979512),
    ("site-1", 1): (5.884225, 5.881002),
    ("site-1", 2): (7.983397, 7.979512),
    ("site-2", 1): (6.038112, 6.031255),
    ("site-2", 2): (7.999937, 7.994488),
}
EXPECTED_EPSILON_STRINGS = ("5.884", "5.881", "7.983", "7.980", "6.038", "6.031", "8.000", "7.994")
#: recomputed - reported, signed, three decimals: -0.003 (site-0/1 r1), -0.004 (r2), ...
EXPECTED_DIFFERENCES = ("-0.003", "-0.004", "-0.007", "-0.005")

#: (site, round) -> update norm
NORMS = {
    ("site-0", 1): 0.680947,
    ("site-0", 2): 0.678220,
    ("site-1", 1): 0.678295,
    ("site-1", 2): 0.680010,
    ("site-2", 1): 0.892873,
    ("site-2", 2): 0.892658,
}
EXPECTED_NORM_STRINGS = ("0.681", "0.678", "0.680", "0.893")

#: round -> global test AUROC
AUROC = {0: 0.374782, 1: 0.506578, 2: 0.630310}
EXPECTED_AUROC_STRINGS = ("0.375", "0.507", "0.630")

#: (attack, site) -> (auc, tpr@0.1%, tpr@1%)
ATTACK_NUMBERS = {
    ("loss-threshold", "site-0"): (0.512345, 0.0021, 0.0143),
    ("loss-threshold", "site-1"): (0.498765, 0.0009, 0.0111),
    ("rmia", "site-2"): (0.537891, 0.0034, 0.0209),
}
EXPECTED_AUC_STRINGS = ("0.512", "0.499", "0.538")
EXPECTED_TPR_STRINGS = ("0.002", "0.001", "0.003", "0.014", "0.011", "0.021")
#: site -> (lower bound, claimed)
CANARIES = {"site-0": (0.731234, 7.983397), "site-2": (1.204567, 7.999937)}
EXPECTED_CANARY_STRINGS = ("0.731", "1.205")


def summary(*, events: list[dict[str, Any]] | None = None, dp: bool = True) -> RunSummary:
    """The run's summary; ``events`` are added to it (and mark their sites' status)."""
    events = events or []
    status = {
        e["site_id"]: e["kind"] for e in events if e["kind"] in ("refused", "dropped", "rejected")
    }
    sites = []
    for i, site in enumerate(SITES):
        privacy: dict[str, Any] = {"enabled": False}
        if dp:
            privacy = {
                "enabled": True,
                "epsilon": EPSILONS[(site, 2)][0],
                "delta": DELTA,
                "accountant": "prv",
                "mechanisms": [
                    {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 8},
                    {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 8},
                ],
            }
        sites.append(
            {
                "site_id": site,
                "n_train": 100 + 50 * i,
                "n_test": 30 + i,
                "status": status.get(site, "completed"),
                "reason": next((e["detail"] for e in events if e["site_id"] == site), None),
                "rounds_participated": [1, 2],
                "privacy": privacy,
                "metrics": {"test.auroc": 0.6},
            }
        )
    rounds = [
        {
            "round": r,
            "metrics": {
                "test.auroc": a,
                "test.accuracy": 0.758065,
                "test.n": 124.0,
                "val.auroc": 0.7,
                "val.n": 132.0,
            },
        }
        for r, a in AUROC.items()
    ]
    return RunSummary.model_validate(
        {
            "run_id": RUN_ID,
            "fedcare_version": "0.1.0",
            "flwr_version": "1.42.0",
            "task": "readmission",
            "strategy": "fedavg",
            "rounds_planned": 2,
            "rounds_completed": 2,
            "sites": sites,
            "global": {"rounds": rounds, "final": rounds[-1]["metrics"]},
            "events": events,
        }
    )


def record(*, max_update_norm: float = 0.0) -> RunRecord:
    """The run's ``server_record.json`` (its rounds hold what the page reads)."""
    rounds: list[dict[str, Any]] = [
        {"round": 0, "metrics": {}, "sites": {s: {"test.n": 30.0} for s in SITES}}
    ]
    for r in (1, 2):
        rounds.append(
            {
                "round": r,
                "metrics": {},
                "sites": {
                    s: {
                        "epsilon": EPSILONS[(s, r)][0],
                        "update-norm": NORMS[(s, r)],
                        "num-examples": 100,
                        "train-loss": 0.6,
                    }
                    for s in SITES
                },
            }
        )
    return RunRecord.from_dict(
        {
            "record_version": 2,
            "run_id": RUN_ID,
            "task": "readmission",
            "model": "ehr_mlp",
            "strategy": "fedavg",
            "personalization": "none",
            "rounds_planned": 2,
            "rounds_completed": 2,
            "config": {"max-update-norm": max_update_norm, "target-epsilon": 8.0, "dp": True},
            "rounds": rounds,
        },
        source="the test's record",
    )


def verify_ok() -> VerifyResult:
    logs = [
        LogCheck(
            path="audit/server.jsonl", writer="server", key_fingerprint=FP, entries=17, ok=True
        )
    ]
    logs += [
        LogCheck(
            path=f"sites/{s}/.fedcare/audit.jsonl", writer=s, key_fingerprint=FP, entries=5, ok=True
        )
        for s in SITES
    ]
    return VerifyResult(ok=True, logs=logs)


def verify_broken() -> VerifyResult:
    ok = verify_ok()
    logs = list(ok.logs)
    logs[2] = LogCheck(
        path=logs[2].path,
        writer=logs[2].writer,
        key_fingerprint=FP,
        entries=5,
        ok=False,
        first_bad_line=4,
        problem="signature does not verify: the entry was altered after it was written",
    )
    return VerifyResult(
        ok=False,
        logs=logs,
        cross_check_problems=["site-1 round 2: update hash 9f3c was never logged by the server"],
    )


def epsilon_audit(*, flag: tuple[str, int] | None = None, tolerance: float = 0.01) -> EpsilonAudit:
    rows = []
    for (site, rnd), (rep, rec) in EPSILONS.items():
        if (site, rnd) == flag:
            rep = rec - 0.5  # under-reported
        rows.append(
            EpsilonRow(
                site_id=site,
                round=rnd,
                delta=DELTA,
                reported_epsilon=rep,
                recomputed_epsilon=rec,
                difference=rec - rep,
                flagged=(site, rnd) == flag,
            )
        )
    return EpsilonAudit(
        reported_accountant="prv",
        independent_accountant="pld (dp-accounting)",
        tolerance=tolerance,
        rows=rows,
        ok=flag is None,
    )


def roc(lift: float = 1.0) -> RocCurve:
    """A slightly-better-than-chance ROC curve; ``lift`` > 1 bends it further up."""
    fpr = [0.0, 0.001, 0.01, 0.1, 0.5, 1.0]
    tpr = [0.0, 0.002 * lift, 0.014 * lift, 0.12 * lift, min(0.52 * lift, 0.99), 1.0]
    return RocCurve(fpr=fpr, tpr=tpr)


def attack_report(*, lower_bound_above: bool = False, run_id: str = RUN_ID) -> AttackReport:
    attacks = [
        AttackResult(
            attack=a,
            site_id=s,
            n_members=100,
            n_nonmembers=100,
            auc=auc,
            tpr_at_0_1pct_fpr=t1,
            tpr_at_1pct_fpr=t2,
            roc=roc(1.0 + 0.3 * i),
        )
        for i, ((a, s), (auc, t1, t2)) in enumerate(ATTACK_NUMBERS.items())
    ]
    canaries = []
    for s, (lb, claimed) in CANARIES.items():
        if lower_bound_above and s == "site-2":
            lb = claimed + 1.0
        canaries.append(
            CanaryAudit(
                site_id=s,
                n_canaries=1000,
                n_guesses=200,
                n_correct=120,
                confidence=0.95,
                epsilon_lower_bound=lb,
                claimed_epsilon=claimed,
                below_claim=lb < claimed,
            )
        )
    return AttackReport(run_id=run_id, dp=True, delta=DELTA, attacks=attacks, canaries=canaries)
