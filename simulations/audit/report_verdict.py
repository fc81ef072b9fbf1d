"""The audit report's verdict: what passed and what needs attention. Pure.

:func:`compute_verdict` turns a run's findings (its summary, the verification of its audit
logs, the independent ε recomputation and the attack results) into four checks; the verdict
is PASS only when all four pass, ATTENTION otherwise, with the reasons. The page
(:mod:`.report_html`) and the command (:mod:`.report_cli`) show it; nothing here reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedcare.common import audit_kinds as kinds
from fedcare.common.summary import RunSummary
from fedcare.simulations.audit.findings import AttackReport, EpsilonAudit, VerifyResult
from fedcare.simulations.audit.report_format import fmt_num

__all__ = [
    "PASS",
    "ATTENTION",
    "EVENT_ORDER",
    "Check",
    "Verdict",
    "compute_verdict",
    "dp_sites",
    "attack_command",
]

PASS: Final = "PASS"
ATTENTION: Final = "ATTENTION"
#: Event kinds that need a reader's attention (all of :data:`fedcare.common.summary.EVENT_KINDS`),
#: in the order the page counts them.
EVENT_ORDER: Final = (
    kinds.REJECTED,
    kinds.DIVERGED,
    kinds.FAILED,
    kinds.REFUSED,
    kinds.DROPPED,
    kinds.ROUND_SKIPPED,
    kinds.EVALUATE_FAILED,
)


@dataclass(frozen=True)
class Check:
    """One line of the verdict: what was checked, whether it passed, and why not."""

    key: str
    title: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    """PASS when every check passed, ATTENTION otherwise."""

    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def label(self) -> str:
        """``PASS`` or ``ATTENTION``."""
        return PASS if self.passed else ATTENTION

    @property
    def reasons(self) -> tuple[Check, ...]:
        """The checks that did not pass."""
        return tuple(c for c in self.checks if not c.passed)


def _check_logs(verify: VerifyResult) -> Check:
    title = "Audit logs verify"
    bad = [log for log in verify.logs if not log.ok]
    problems = list(verify.cross_check_problems)
    if not verify.logs:
        detail = "no audit log was verified"
        if problems:
            detail += f": {problems[0]}"
        return Check("logs", title, False, detail)
    if verify.ok and not bad and not problems:
        entries = sum(log.entries for log in verify.logs)
        return Check("logs", title, True, f"{len(verify.logs)} log(s), {entries} entries, all OK")
    parts = [
        f"{log.writer}: line {log.first_bad_line if log.first_bad_line is not None else '?'}: "
        f"{log.problem or 'does not verify'}"
        for log in bad
    ]
    if problems:
        parts.append(f"{len(problems)} cross-check problem(s), first: {problems[0]}")
    if not parts:
        parts.append("the verifier reported a failure")
    return Check("logs", title, False, "; ".join(parts))


def dp_sites(summary: RunSummary) -> list[str]:
    """The sites that trained with differential privacy."""
    return [s.site_id for s in summary.sites if s.privacy.enabled]


def _check_epsilon(
    summary: RunSummary, epsilon: EpsilonAudit | None, epsilon_error: str | None
) -> Check:
    title = "Every site's reported ε is at least the recomputed ε"
    if epsilon is None:
        return Check(
            "epsilon", title, False, f"ε could not be recomputed: {epsilon_error or 'no result'}"
        )
    if not dp_sites(summary) and not epsilon.rows:
        return Check(
            "epsilon",
            title,
            False,
            "the run trained without differential privacy: there is no ε guarantee to check",
        )
    if not epsilon.rows:
        return Check("epsilon", title, False, "no ε was recomputed for any site and round")
    flagged = [r for r in epsilon.rows if r.flagged]
    if flagged or not epsilon.ok:
        shown = ", ".join(
            f"{r.site_id} round {r.round} (reported {fmt_num(r.reported_epsilon)} < "
            f"recomputed {fmt_num(r.recomputed_epsilon)})"
            for r in flagged[:3]
        )
        more = f" and {len(flagged) - 3} more" if len(flagged) > 3 else ""
        detail = (
            f"{len(flagged)} row(s) under-report ε beyond the tolerance "
            f"{epsilon.tolerance:g}: {shown}{more}"
            if flagged
            else "the ε audit did not pass"
        )
        return Check("epsilon", title, False, detail)
    return Check(
        "epsilon",
        title,
        True,
        f"{len(epsilon.rows)} site-round(s) agree within {epsilon.tolerance:g} "
        f"({epsilon.reported_accountant} vs {epsilon.independent_accountant})",
    )


def attack_command(run_dir: Path | None) -> str:
    """The command that runs the attacks on ``run_dir`` (named in hints)."""
    return f"fedcare audit attack {run_dir if run_dir is not None else 'RUNDIR'}"


def _check_attacks(
    summary: RunSummary, attacks: AttackReport | None, run_dir: Path | None
) -> Check:
    title = "Empirical ε lower bound is below the claimed ε"
    if attacks is None:
        return Check("attacks", title, False, f"no attack run yet: run `{attack_command(run_dir)}`")
    if attacks.run_id != summary.run_id:
        return Check(
            "attacks",
            title,
            False,
            f"the attack results are for run {attacks.run_id!r}, not {summary.run_id!r}: "
            f"run `{attack_command(run_dir)}` again",
        )
    if not attacks.canaries:
        return Check("attacks", title, False, "the attack results hold no canary audit")
    above = [c for c in attacks.canaries if c.below_claim is False]
    if above:
        detail = "; ".join(
            f"{c.site_id}: lower bound {fmt_num(c.epsilon_lower_bound)} ≥ claimed "
            f"{fmt_num(c.claimed_epsilon)} — the DP guarantee does not hold as claimed"
            for c in above
        )
        return Check("attacks", title, False, detail)
    unclaimed = [c.site_id for c in attacks.canaries if c.below_claim is None]
    if unclaimed:
        return Check(
            "attacks",
            title,
            False,
            f"no ε is claimed for {', '.join(unclaimed)} (non-private): the canary bound "
            "has nothing to check",
        )
    worst = max(attacks.canaries, key=lambda c: c.epsilon_lower_bound)
    return Check(
        "attacks",
        title,
        True,
        f"highest lower bound {fmt_num(worst.epsilon_lower_bound)} ({worst.site_id}) < "
        f"claimed {fmt_num(worst.claimed_epsilon)}",
    )


def _check_events(summary: RunSummary) -> Check:
    title = "No rejected updates, refusals or drop-outs"
    counts = {k: sum(1 for ev in summary.events if ev.kind == k) for k in EVENT_ORDER}
    present = [f"{n} {k}" for k, n in counts.items() if n]
    not_done = [s.site_id for s in summary.sites if s.status != "completed"]
    if not present and not not_done:
        return Check("events", title, True, "every site's update was accepted in every round")
    detail = ", ".join(present) if present else "no events recorded"
    if not_done:
        detail += f"; sites not completed: {', '.join(not_done)}"
    return Check("events", title, False, detail)


def compute_verdict(
    *,
    summary: RunSummary,
    verify: VerifyResult,
    epsilon: EpsilonAudit | None,
    attacks: AttackReport | None,
    epsilon_error: str | None = None,
    run_dir: Path | None = None,
) -> Verdict:
    """The report's verdict: four checks, PASS only when all pass.

    Parameters
    ----------
    summary:
        The run's ``summary.json``.
    verify:
        The verification of the run's audit logs.
    epsilon:
        The independent ε recomputation, or ``None`` when it failed (``epsilon_error``).
    attacks:
        ``audit/attacks.json``, or ``None`` when no attack has been run.
    epsilon_error:
        Why ε could not be recomputed.
    run_dir:
        The run directory, named in the hint to run the attacks.

    Returns
    -------
    Verdict
        Checks, in order: logs verify; no site under-reports ε; the canary lower bound on ε
        is below the claimed ε; no rejected update, refusal or drop-out.
    """
    return Verdict(
        checks=(
            _check_logs(verify),
            _check_epsilon(summary, epsilon, epsilon_error),
            _check_attacks(summary, attacks, run_dir),
            _check_events(summary),
        )
    )
