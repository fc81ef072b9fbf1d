"""``fedcare audit report``: one self-contained HTML page about a run's privacy.

The page needs no network: CSS is inline, charts are inline SVG, there is no script, and a
Content-Security-Policy forbids the browser from fetching anything. Its sections, each an
element with a fixed ``id`` (:data:`SECTION_IDS`):

``verdict``
    PASS, or ATTENTION with the reasons (:func:`compute_verdict`).
``run-facts``
    Run id, task, strategy, rounds, versions, code hash; every site's status and final ε.
``epsilon``
    ε per site per round: the sites' accountant next to the independent one, the difference
    and the flag, as a chart and a table.
``utility``
    The global model's metrics per round.
``update-norms``
    Each site's update norm per round, with the server's bound.
``events``
    Rejected updates, refusals, drop-outs and skipped rounds, with their reasons.
``attacks``
    Membership-inference results (AUC, TPR at 0.1 % and 1 % FPR, ROC curves) and the canary
    lower bound on ε against the claimed ε.
``verification``
    Each audit log: writer, entries, key fingerprint, OK or the first bad line; cross-checks.

Numbers are printed one way everywhere: ε, differences, AUC, rates, metrics and norms with
three decimals (``7.983``; differences signed, ``+0.004``), δ and tolerances with ``:g``
(``1e-05``), an infinite value as ``∞``, a missing one as ``—``.

:func:`build_report` is a pure function of the run's findings;
:func:`render_run_report` loads them from a run directory and calls it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from fedcare.common.errors import ConfigError, FedcareError
from fedcare.common.spec import format_validation_error
from fedcare.common.summary import RECORD_NAME, SUMMARY_NAME, RunSummary, load_summary
from fedcare.simulations.audit.findings import (
    ATTACKS_FILE,
    AttackReport,
    EpsilonAudit,
    LogCheck,
    VerifyResult,
)
from fedcare.simulations.audit.html_charts import (
    DASHES,
    PALETTE,
    Axis,
    Bar,
    BarGroup,
    HLine,
    Series,
    bar_chart,
    legend,
    line_chart,
)

__all__ = [
    "SECTION_IDS",
    "REPORT_GENERATOR",
    "PASS",
    "ATTENTION",
    "Check",
    "Verdict",
    "ReportInputs",
    "compute_verdict",
    "build_report",
    "load_report_inputs",
    "render_run_report",
    "fmt_num",
]

#: The ``id`` of each section of the page, in page order.
SECTION_IDS: Final = (
    "verdict",
    "run-facts",
    "epsilon",
    "utility",
    "update-norms",
    "events",
    "attacks",
    "verification",
)
PASS: Final = "PASS"
ATTENTION: Final = "ATTENTION"
#: The page's ``<meta name="generator">``: marks a file as a report that a new one may replace.
REPORT_GENERATOR: Final = "fedcare audit report"

#: Event kinds that need a reader's attention (all of :data:`fedcare.common.summary.EVENT_KINDS`).
_EVENT_ORDER: Final = (
    "rejected",
    "diverged",
    "failed",
    "refused",
    "dropped",
    "round-skipped",
    "evaluate-failed",
)
#: Test metrics drawn in the utility chart, when the task reports them.
_UTILITY_PLOTTED: Final = ("auroc", "auprc", "balanced_accuracy", "accuracy")
#: The record's keys (``server_record.json``) this page reads; see ``server/guard.py``.
_R_CONFIG, _R_ROUNDS, _R_SITES, _R_MODEL = "config", "rounds", "sites", "model"
_R_UPDATE_NORM, _R_EPSILON = "update-norm", "epsilon"
_C_MAX_UPDATE_NORM, _C_TARGET_EPSILON = "max-update-norm", "target-epsilon"
_C_SITE_BUDGET, _C_DP = "site-epsilon-budget", "dp"
#: The server log's entries that record the code hash (``server/audit.py``), and its key.
_CODE_ENTRY_KINDS, _CODE_HASH_KEY = ("run-start", "run-resume"), "code_sha256"
_RECORD_FILE, _SUMMARY_FILE = RECORD_NAME, SUMMARY_NAME


# --------------------------------------------------------------------------- formatting


class _Html(str):
    """Markup built here, inserted as is (any other ``str`` is escaped)."""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_num(value: float | None, digits: int = 3, *, signed: bool = False) -> str:
    """A number as the page prints it.

    Examples
    --------
    >>> fmt_num(7.983397385911686)
    '7.983'
    >>> fmt_num(0.0042, signed=True)
    '+0.004'
    >>> fmt_num(float("inf")), fmt_num(None)
    ('∞', '—')
    """
    if value is None:
        return "—"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return ("+∞" if signed else "∞") if value > 0 else "−∞"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _fmt_g(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


# --------------------------------------------------------------------------- verdict


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


def _dp_sites(summary: RunSummary) -> list[str]:
    return [s.site_id for s in summary.sites if s.privacy.enabled]


def _check_epsilon(
    summary: RunSummary, epsilon: EpsilonAudit | None, epsilon_error: str | None
) -> Check:
    title = "Every site's reported ε is at least the recomputed ε"
    if epsilon is None:
        return Check(
            "epsilon", title, False, f"ε could not be recomputed: {epsilon_error or 'no result'}"
        )
    if not _dp_sites(summary) and not epsilon.rows:
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


def _attack_command(run_dir: Path | None) -> str:
    return f"fedcare audit attack {run_dir if run_dir is not None else 'RUNDIR'}"


def _check_attacks(
    summary: RunSummary, attacks: AttackReport | None, run_dir: Path | None
) -> Check:
    title = "Empirical ε lower bound is below the claimed ε"
    if attacks is None:
        return Check(
            "attacks", title, False, f"no attack run yet: run `{_attack_command(run_dir)}`"
        )
    if attacks.run_id != summary.run_id:
        return Check(
            "attacks",
            title,
            False,
            f"the attack results are for run {attacks.run_id!r}, not {summary.run_id!r}: "
            f"run `{_attack_command(run_dir)}` again",
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
    counts = {k: sum(1 for ev in summary.events if ev.kind == k) for k in _EVENT_ORDER}
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


# --------------------------------------------------------------------------- the record


def _record_rounds(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rounds = record.get(_R_ROUNDS, [])
    if not isinstance(rounds, list) or not all(
        isinstance(r, Mapping) and isinstance(r.get("round"), int) for r in rounds
    ):
        raise ConfigError(
            f"{_RECORD_FILE}: 'rounds' must be a list of objects with an integer 'round'; "
            "the file is damaged or from another fedcare: rerun the federation"
        )
    return rounds


def _per_site_round(record: Mapping[str, Any], key: str) -> dict[str, dict[int, float]]:
    """``site -> round -> value`` of one per-site number of the record's rounds."""
    out: dict[str, dict[int, float]] = {}
    for entry in _record_rounds(record):
        sites = entry.get(_R_SITES, {})
        if not isinstance(sites, Mapping):
            continue
        for site_id, values in sites.items():
            if isinstance(values, Mapping) and isinstance(values.get(key), (int, float)):
                out.setdefault(str(site_id), {})[entry["round"]] = float(values[key])
    return out


def _config_number(record: Mapping[str, Any], key: str) -> float | None:
    config = record.get(_R_CONFIG, {})
    value = config.get(key) if isinstance(config, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- page parts


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], *, cls: str = "") -> str:
    def cell(value: object, tag: str) -> str:
        body = value if isinstance(value, _Html) else _e(value)
        return f"<{tag}>{body}</{tag}>"

    head = "".join(cell(h, "th") for h in headers)
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in rows)
    cls_attr = f' class="{_e(cls)}"' if cls else ""
    return f"<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(section_id: str, title: str, *parts: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{"".join(parts)}</section>'


def _p(text: str, cls: str = "") -> str:
    cls_attr = f' class="{cls}"' if cls else ""
    return f"<p{cls_attr}>{_e(text)}</p>"


def _badge(ok: bool, yes: str = "OK", no: str = "ATTENTION") -> _Html:
    return _Html(f'<span class="badge {"ok" if ok else "bad"}">{_e(yes if ok else no)}</span>')


def _colors(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _verdict_html(verdict: Verdict) -> str:
    items = "".join(
        f'<li class="{"ok" if c.passed else "bad"}" data-check="{_e(c.key)}">'
        f"{_badge(c.passed, 'PASS', 'ATTENTION')} <strong>{_e(c.title)}</strong>: "
        f"{_e(c.detail)}</li>"
        for c in verdict.checks
    )
    cls = "pass" if verdict.passed else "attention"
    return (
        f'<section id="verdict" class="{cls}"><h2>Verdict: '
        f'<span class="verdict-label">{verdict.label}</span></h2><ul class="checks">{items}</ul>'
        "</section>"
    )


def _run_facts_html(
    summary: RunSummary,
    record: Mapping[str, Any],
    run_dir: Path | None,
    code_hash: str | None,
) -> str:
    dp = _dp_sites(summary)
    deltas = sorted({s.privacy.delta for s in summary.sites if s.privacy.delta is not None})
    model = record.get(_R_MODEL)
    facts: list[tuple[str, str]] = [("Run id", summary.run_id)]
    if run_dir is not None:
        facts.append(("Run directory", str(run_dir)))
    facts += [
        ("Task", summary.task),
        ("Model", str(model) if isinstance(model, str) and model else "—"),
        ("Strategy", summary.strategy),
        ("Rounds", f"{summary.rounds_completed} of {summary.rounds_planned}"),
        ("Sites", str(len(summary.sites))),
        (
            "Record-level DP",
            f"{len(dp)} of {len(summary.sites)} sites"
            + (f", δ = {', '.join(_fmt_g(d) for d in deltas)}" if deltas else ""),
        ),
        ("fedcare version", summary.fedcare_version),
        ("Flower version", summary.flwr_version),
        ("Code hash", code_hash or "not recorded"),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    rows = [
        (
            s.site_id,
            _badge(s.status == "completed", s.status, s.status),
            s.reason or "",
            ", ".join(str(r) for r in s.rounds_participated) or "none",
            s.n_train,
            s.n_test,
            fmt_num(s.privacy.epsilon),
            _fmt_g(s.privacy.delta),
            s.privacy.accountant or "—",
        )
        for s in summary.sites
    ]
    sites = _table(
        ["Site", "Status", "Reason", "Rounds", "n train", "n test", "final ε", "δ", "Accountant"],
        rows,
    )
    return _section("run-facts", "Run", f'<dl class="facts">{dl}</dl>', sites)


def _epsilon_html(
    summary: RunSummary,
    record: Mapping[str, Any],
    epsilon: EpsilonAudit | None,
    epsilon_error: str | None,
) -> str:
    parts: list[str] = []
    if epsilon is None:
        parts.append(_p(f"ε could not be recomputed: {epsilon_error or 'no result'}", "error"))
        reported = _per_site_round(record, _R_EPSILON)
        recomputed: dict[str, dict[int, float]] = {}
        reported_name, independent_name = "reported", "recomputed"
    else:
        reported, recomputed = {}, {}
        for r in epsilon.rows:
            reported.setdefault(r.site_id, {})[r.round] = r.reported_epsilon
            recomputed.setdefault(r.site_id, {})[r.round] = r.recomputed_epsilon
        reported_name = f"reported ({epsilon.reported_accountant})"
        independent_name = f"recomputed ({epsilon.independent_accountant})"
        parts.append(
            _p(
                f"Each site reports ε with its own accountant ({epsilon.reported_accountant}); "
                f"the audit recomputes it from the logged mechanisms with an independent one "
                f"({epsilon.independent_accountant}). A row is flagged when the reported ε is "
                f"below the recomputed ε by more than the tolerance {epsilon.tolerance:g}."
            )
        )
    sites = sorted(set(reported) | set(recomputed))
    if not sites:
        parts.append(_p("No site reported an ε: the run trained without differential privacy."))
        return _section("epsilon", "ε per site per round", *parts)
    colors = _colors(sites)
    series = []
    entries = []
    for site in sites:
        for values, name, dash in (
            (reported.get(site, {}), reported_name, DASHES[0]),
            (recomputed.get(site, {}), independent_name, DASHES[1]),
        ):
            if values:
                label = f"{site} {name}"
                series.append(Series(label, tuple(sorted(values.items())), colors[site], dash=dash))
                entries.append((label, colors[site], dash))
    hlines = []
    target = _config_number(record, _C_TARGET_EPSILON)
    if target is not None and target > 0:
        hlines.append(HLine(target, f"target ε {fmt_num(target)}"))
    budget = _config_number(record, _C_SITE_BUDGET)
    if budget is not None and budget > 0:
        hlines.append(HLine(budget, f"site budget ε {fmt_num(budget)}", "#B00020"))
    parts.append(
        line_chart(
            series,
            x=Axis("round", integer=True),
            y=Axis("ε", lo=0.0),
            title="ε after each round (solid: reported, dashed: recomputed)",
            width=760,
            hlines=hlines,
        )
    )
    parts.append(legend(entries))
    rows: list[Sequence[object]]
    if epsilon is not None:
        rows = [
            (
                r.site_id,
                r.round if r.kind == "train" else f"{r.round} ({r.kind})",
                _fmt_g(r.delta),
                fmt_num(r.reported_epsilon),
                fmt_num(r.recomputed_epsilon),
                fmt_num(r.difference, signed=True),
                _badge(not r.flagged, "ok", "FLAGGED"),
            )
            for r in sorted(epsilon.rows, key=lambda r: (r.site_id, r.round))
        ]
        parts.append(
            _table(
                ["Site", "Round", "δ", reported_name, independent_name, "difference", "flag"],
                rows,
                cls="numeric",
            )
        )
    else:
        rows = [
            (site, rnd, fmt_num(value))
            for site in sites
            for rnd, value in sorted(reported.get(site, {}).items())
        ]
        parts.append(_table(["Site", "Round", "reported ε"], rows, cls="numeric"))
    return _section("epsilon", "ε per site per round", *parts)


def _metric_tables(summary: RunSummary) -> list[str]:
    out = []
    for split in ("test", "val"):
        names = sorted(
            {
                k.split(".", 1)[1]
                for r in summary.global_.rounds
                for k in r.metrics
                if k.startswith(f"{split}.") and k != f"{split}.n"
            }
        )
        if not names:
            continue
        rows = [
            [r.round, *(fmt_num(r.metrics.get(f"{split}.{n}")) for n in names)]
            for r in summary.global_.rounds
        ]
        out.append(f"<h3>{_e(split)} split</h3>")
        out.append(_table(["Round", *names], rows, cls="numeric"))
    return out


def _utility_html(summary: RunSummary) -> str:
    rounds = summary.global_.rounds
    if not rounds:
        return _section("utility", "Utility per round", _p("No round was evaluated."))
    present = {k for r in rounds for k in r.metrics}
    plotted = [m for m in _UTILITY_PLOTTED if f"test.{m}" in present]
    parts = [
        _p(
            "The global model evaluated by every site on its own test and validation splits "
            "after each round (round 0: the initial model), weighted by patients."
        )
    ]
    if plotted:
        colors = _colors(plotted)
        series = [
            Series(
                f"test {m}",
                tuple(
                    (float(r.round), r.metrics[f"test.{m}"])
                    for r in rounds
                    if f"test.{m}" in r.metrics
                ),
                colors[m],
            )
            for m in plotted
        ]
        parts.append(
            line_chart(
                series,
                x=Axis("round", integer=True),
                y=Axis("value", lo=0.0, hi=1.0),
                title="Global test metrics per round",
                width=760,
            )
        )
        parts.append(legend([(s.name, s.color, "") for s in series]))
    parts.extend(_metric_tables(summary))
    return _section("utility", "Utility per round", *parts)


def _norms_html(record: Mapping[str, Any]) -> str:
    norms = _per_site_round(record, _R_UPDATE_NORM)
    bound = _config_number(record, _C_MAX_UPDATE_NORM)
    bound_text = (
        f"The server rejects an update whose norm exceeds {fmt_num(bound)}."
        if bound is not None and bound > 0
        else "The server enforced no norm bound in this run."
    )
    parts = [
        _p(
            "L2 norm of each accepted update (the site's model minus the global model it "
            f"started from), as the server measured it before aggregation. {bound_text}"
        )
    ]
    if not norms:
        parts.append(_p("No update norm was recorded."))
        return _section("update-norms", "Update norms", *parts)
    sites = sorted(norms)
    colors = _colors(sites)
    series = [Series(s, tuple(sorted(norms[s].items())), colors[s]) for s in sites]
    hlines = [HLine(bound, f"bound {fmt_num(bound)}", "#B00020")] if bound and bound > 0 else []
    parts.append(
        line_chart(
            series,
            x=Axis("round", integer=True),
            y=Axis("update norm", lo=0.0),
            title="Update norm per site per round",
            width=760,
            hlines=hlines,
        )
    )
    parts.append(legend([(s, colors[s], "") for s in sites]))
    rounds = sorted({r for v in norms.values() for r in v})
    rows = [[r, *(fmt_num(norms[s].get(r)) for s in sites)] for r in rounds]
    parts.append(_table(["Round", *sites], rows, cls="numeric"))
    return _section("update-norms", "Update norms", *parts)


def _events_html(summary: RunSummary) -> str:
    if not summary.events:
        body = _p("No rejected updates, refusals or drop-outs: every site answered every round.")
        return _section("events", "Rejected updates, refusals and drop-outs", body)
    counts = ", ".join(
        f"{n} {k}" for k in _EVENT_ORDER if (n := sum(1 for ev in summary.events if ev.kind == k))
    )
    rows = [(ev.round, ev.site_id, ev.kind, ev.detail) for ev in summary.events]
    return _section(
        "events",
        "Rejected updates, refusals and drop-outs",
        _p(f"{len(summary.events)} event(s): {counts}."),
        _table(["Round", "Site", "Kind", "Reason"], rows),
    )


def _roc_charts(report: AttackReport) -> list[str]:
    with_roc = [a for a in report.attacks if a.roc.fpr]
    if not with_roc:
        return []
    sites = sorted({a.site_id for a in with_roc})
    kinds = sorted({a.attack for a in with_roc})
    colors = _colors(sites)
    dashes = {k: DASHES[i % len(DASHES)] for i, k in enumerate(kinds)}
    series = [
        Series(
            f"{a.attack} {a.site_id}",
            tuple(zip(a.roc.fpr, a.roc.tpr, strict=True)),
            colors[a.site_id],
            dash=dashes[a.attack],
            markers=False,
        )
        for a in with_roc
    ]
    n_min = min(max(a.n_nonmembers, 1) for a in with_roc)
    floor = 10.0 ** math.floor(math.log10(min(1e-3, 1.0 / n_min)))
    linear = line_chart(
        series,
        x=Axis("false-positive rate", lo=0.0, hi=1.0),
        y=Axis("true-positive rate", lo=0.0, hi=1.0),
        title="ROC curves (linear)",
        width=420,
        height=380,
        diagonal=True,
    )
    loglog = line_chart(
        series,
        x=Axis("false-positive rate", lo=floor, hi=1.0, log=True),
        y=Axis("true-positive rate", lo=floor, hi=1.0, log=True),
        title="ROC curves (log-log: the low-FPR regime)",
        width=420,
        height=380,
        diagonal=True,
    )
    return [
        f'<div class="charts-row">{linear}{loglog}</div>',
        legend([(s.name, s.color, s.dash) for s in series] + [("chance", "#999999", "4 4")]),
    ]


def _attacks_html(summary: RunSummary, attacks: AttackReport | None, run_dir: Path | None) -> str:
    title = "Attack results"
    if attacks is None:
        return _section(
            "attacks",
            title,
            f'<p class="error">no attack run yet: run <code>{_e(_attack_command(run_dir))}'
            "</code></p>",
        )
    parts = []
    if attacks.run_id != summary.run_id:
        parts.append(
            _p(f"These results are for run {attacks.run_id}, not {summary.run_id}.", "error")
        )
    parts.append(
        _p(
            "Membership inference: can an attacker who holds the final model tell a site's "
            "training patients from its held-out patients? AUC 0.5 is chance. "
            + (
                f"The run was private (δ = {_fmt_g(attacks.delta)})."
                if attacks.dp
                else "The run was not private."
            )
        )
    )
    rows: list[Sequence[object]]
    if attacks.attacks:
        rows = [
            (
                a.attack,
                a.site_id,
                a.n_members,
                a.n_nonmembers,
                fmt_num(a.auc),
                fmt_num(a.tpr_at_0_1pct_fpr),
                fmt_num(a.tpr_at_1pct_fpr),
            )
            for a in attacks.attacks
        ]
        parts.append(
            _table(
                ["Attack", "Site", "members", "non-members", "AUC", "TPR@0.1%FPR", "TPR@1%FPR"],
                rows,
                cls="numeric",
            )
        )
        parts.extend(_roc_charts(attacks))
    else:
        parts.append(_p("No membership-inference attack was run."))
    parts.append("<h3>Canary audit: empirical lower bound on ε</h3>")
    if attacks.canaries:
        parts.append(
            _p(
                "One-run audit (Steinke, Nasr and Jagielski 2023): canaries inserted at random "
                "are guessed from the final model; the guesses give a lower bound on ε at the "
                "stated confidence. A bound at or above the claimed ε means the guarantee "
                "does not hold as claimed."
            )
        )
        rows = [
            (
                c.site_id,
                c.n_canaries,
                c.n_guesses,
                c.n_correct,
                fmt_num(c.confidence, 2),
                fmt_num(c.epsilon_lower_bound),
                fmt_num(c.claimed_epsilon),
                _Html("—")
                if c.below_claim is None
                else _badge(c.below_claim, "below claim", "AT OR ABOVE CLAIM"),
            )
            for c in attacks.canaries
        ]
        parts.append(
            _table(
                [
                    "Site",
                    "canaries",
                    "guesses",
                    "correct",
                    "confidence",
                    "ε lower bound",
                    "claimed ε",
                    "result",
                ],
                rows,
                cls="numeric",
            )
        )
        groups = [
            BarGroup(
                c.site_id,
                (
                    Bar("ε lower bound", c.epsilon_lower_bound, PALETTE[1]),
                    *(
                        (Bar("claimed ε", c.claimed_epsilon, PALETTE[0]),)
                        if c.claimed_epsilon is not None
                        else ()
                    ),
                ),
            )
            for c in attacks.canaries
        ]
        parts.append(bar_chart(groups, title="Canary lower bound vs claimed ε", x_label="ε"))
        parts.append(legend([("ε lower bound", PALETTE[1], ""), ("claimed ε", PALETTE[0], "")]))
    else:
        parts.append(_p("No canary audit was run.", "error"))
    return _section("attacks", title, *parts)


def _log_result(log: LogCheck) -> _Html:
    notices = "".join(f"<br>notice: {_e(n)}" for n in log.notices)
    if log.ok:
        return _Html(f"{_badge(True)}{notices}")
    line = f"line {log.first_bad_line}: " if log.first_bad_line is not None else ""
    return _Html(f"{_badge(False, no='FAILED')} {_e(line + (log.problem or 'does not verify'))}")


def _verification_html(verify: VerifyResult) -> str:
    parts = [
        _p(
            "Each writer (the server and every site) keeps its own audit log, signed with its "
            "own Ed25519 key; the verifier checks every entry and cross-checks the logs. "
            + ("All logs verify." if verify.ok else "Verification FAILED.")
        )
    ]
    if verify.logs:
        rows = [
            (
                log.writer,
                _Html(f'<code class="path">{_e(log.path)}</code>'),
                log.entries,
                _Html(f'<code class="fp">{_e(log.key_fingerprint)}</code>'),
                _log_result(log),
            )
            for log in verify.logs
        ]
        parts.append(
            _table(["Writer", "Log", "entries", "key fingerprint (SHA-256)", "result"], rows)
        )
    else:
        parts.append(_p("No audit log was verified.", "error"))
    if verify.cross_check_problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in verify.cross_check_problems)
        parts.append(f'<h3>Cross-check problems</h3><ul class="problems">{items}</ul>')
    else:
        parts.append(_p("Cross-checks between the logs found no problem."))
    return _section("verification", "Verification", *parts)


_CSS = """
:root{--ok:#1b7f3b;--bad:#b3261e;--warn:#8a5a00;--line:#d9d9d9}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
margin:0;background:#f3f4f6;color:#1f2328;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:20px}
h1{font-size:1.5rem;margin:0 0 12px}
h2{font-size:1.2rem;margin:0 0 10px}
h3{font-size:1rem;margin:16px 0 6px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:16px 20px;
margin:0 0 16px}
#verdict.pass{border-left:8px solid var(--ok)}
#verdict.attention{border-left:8px solid var(--warn);background:#fff8e6}
#verdict .verdict-label{letter-spacing:.05em}
#verdict.pass .verdict-label{color:var(--ok)}
#verdict.attention .verdict-label{color:var(--warn)}
ul.checks{list-style:none;padding:0;margin:0}
ul.checks li{padding:4px 0}
.badge{display:inline-block;padding:0 6px;border-radius:4px;font-size:.8rem;font-weight:600;
color:#fff}
.badge.ok{background:var(--ok)}
.badge.bad{background:var(--bad)}
table{border-collapse:collapse;margin:8px 0;font-size:.9rem}
th,td{border-bottom:1px solid var(--line);padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa}
table.numeric td{font-variant-numeric:tabular-nums}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0 0 8px}
dt{font-weight:600}
dd{margin:0}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:.85rem}
code.fp{word-break:break-all;font-size:.75rem}
code.path{white-space:nowrap}
p.error{color:var(--bad);font-weight:600}
svg.chart{display:block;max-width:100%;height:auto;margin:8px 0}
.charts-row{display:flex;flex-wrap:wrap;gap:12px}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:.85rem;margin:0 0 8px}
.legend-item{display:inline-flex;align-items:center;gap:6px}
footer{color:#57606a;font-size:.8rem;text-align:center;padding:8px}
"""

#: No fetch of any kind: the page is complete as written.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def build_report(
    *,
    summary: RunSummary,
    record: Mapping[str, Any],
    verify: VerifyResult,
    epsilon: EpsilonAudit | None,
    attacks: AttackReport | None,
    epsilon_error: str | None = None,
    run_dir: Path | None = None,
    code_hash: str | None = None,
) -> str:
    """The audit report of one run, as one self-contained HTML page.

    A pure function: the same findings give the same page, byte for byte.

    Parameters
    ----------
    summary:
        The run's ``summary.json``.
    record:
        The run's ``server_record.json`` (read: per-round update norms and reported ε, the
        run config's norm bound, target ε and site budget, the model).
    verify:
        The verification of the run's audit logs.
    epsilon:
        The independent ε recomputation; ``None`` when it failed, with ``epsilon_error``.
    attacks:
        ``audit/attacks.json``; ``None`` when no attack has been run.
    epsilon_error:
        Why ε could not be recomputed.
    run_dir:
        The run directory (shown, and named in the hint to run the attacks).
    code_hash:
        The hash of the code that ran (the server log's signed ``code_sha256``), if known.

    Returns
    -------
    str
        The HTML page (UTF-8 text).

    Raises
    ------
    ConfigError
        If ``record`` does not have the shape ``server/guard.py`` writes.
    """
    verdict = compute_verdict(
        summary=summary,
        verify=verify,
        epsilon=epsilon,
        attacks=attacks,
        epsilon_error=epsilon_error,
        run_dir=run_dir,
    )
    sections = [
        _verdict_html(verdict),
        _run_facts_html(summary, record, run_dir, code_hash),
        _epsilon_html(summary, record, epsilon, epsilon_error),
        _utility_html(summary),
        _norms_html(record),
        _events_html(summary),
        _attacks_html(summary, attacks, run_dir),
        _verification_html(verify),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{REPORT_GENERATOR}">'
        f"<title>fedcare privacy audit: {_e(summary.run_id)} — {verdict.label}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"<h1>Privacy audit of run {_e(summary.run_id)}</h1>"
        + "".join(sections)
        + f"<footer>fedcare {_e(summary.fedcare_version)} audit report</footer>"
        "</main></body></html>\n"
    )


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class ReportInputs:
    """Everything :func:`build_report` needs, as loaded from a run directory."""

    summary: RunSummary
    record: Mapping[str, Any]
    verify: VerifyResult
    epsilon: EpsilonAudit | None
    attacks: AttackReport | None
    epsilon_error: str | None
    run_dir: Path
    code_hash: str | None

    def verdict(self) -> Verdict:
        """The verdict the page shows."""
        return compute_verdict(
            summary=self.summary,
            verify=self.verify,
            epsilon=self.epsilon,
            attacks=self.attacks,
            epsilon_error=self.epsilon_error,
            run_dir=self.run_dir,
        )

    def html(self) -> str:
        """The page (:func:`build_report`)."""
        return build_report(
            summary=self.summary,
            record=self.record,
            verify=self.verify,
            epsilon=self.epsilon,
            attacks=self.attacks,
            epsilon_error=self.epsilon_error,
            run_dir=self.run_dir,
            code_hash=self.code_hash,
        )


def _load_record(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(
            f"{path}: no such file; the server writes it after every round: pass a run "
            "directory of `fedcare simulate` or of a deployment's server"
        ) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{path}: cannot read it as JSON ({e}); the file is damaged: rerun the federation"
        ) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a JSON object; the file is damaged: rerun the federation")
    return raw


def _load_attacks(path: Path, run_dir: Path) -> AttackReport | None:
    if not path.exists():
        return None
    try:
        return AttackReport.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e}); check its permissions") from e
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(str(path), e)
            + f"; run `{_attack_command(run_dir)}` again to rewrite it"
        ) from e


def _guarded(step: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run an audit step; a user-fixable failure becomes a reason on the page."""
    try:
        return step(), None
    except FedcareError as e:
        return None, str(e)


def _code_hash(run_dir: Path) -> str | None:
    """The code hash(es) the server's audit log signed at run start and resumes.

    Only entries that verify count; ``None`` when there is no log or no such entry (the
    verification section says why).
    """
    from fedcare.common.audit import check_log
    from fedcare.server.audit import SERVER_LOG

    path = run_dir / SERVER_LOG
    if not path.is_file():
        return None
    try:
        verified = check_log(path).entries
    except FedcareError:
        return None
    hashes = [
        e.data.get(_CODE_HASH_KEY)
        for e in verified
        if e.kind in _CODE_ENTRY_KINDS and isinstance(e.data, dict)
    ]
    distinct = list(dict.fromkeys(h for h in hashes if isinstance(h, str) and h))
    return ", ".join(distinct) or None


def load_report_inputs(run_dir: Path) -> ReportInputs:
    """Load a run's findings: summary, record, log verification, ε recomputation, attacks.

    A failure of the verification or of the ε recomputation (a :class:`FedcareError`, e.g.
    a run without audit logs) does not stop the report: the page shows it and the verdict
    is ATTENTION.

    Parameters
    ----------
    run_dir:
        A finished run's directory (``summary.json``, ``server_record.json``, ``audit/``).

    Returns
    -------
    ReportInputs
        What :func:`build_report` needs.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a folder, or its summary, record or attack results cannot be
        read; the message names the file and the fix.
    """
    from fedcare.simulations.audit.epsilon import recompute_epsilon
    from fedcare.simulations.audit.verify import verify_paths

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: no such run directory; pass the folder a run wrote "
            "(`fedcare simulate --out DIR`)"
        )
    summary = load_summary(run_dir / _SUMMARY_FILE)
    record = _load_record(run_dir / _RECORD_FILE)
    attacks = _load_attacks(run_dir / ATTACKS_FILE, run_dir)
    verify, verify_error = _guarded(lambda: verify_paths([run_dir]))
    if verify is None:
        verify = VerifyResult(
            ok=False, logs=[], cross_check_problems=[f"the logs cannot be verified: {verify_error}"]
        )
    epsilon, epsilon_error = _guarded(lambda: recompute_epsilon(run_dir))
    return ReportInputs(
        summary=summary,
        record=record,
        verify=verify,
        epsilon=epsilon,
        attacks=attacks,
        epsilon_error=epsilon_error,
        run_dir=run_dir,
        code_hash=_code_hash(run_dir),
    )


def render_run_report(run_dir: Path) -> str:
    """The audit report of the run in ``run_dir`` (see :func:`load_report_inputs`).

    Parameters
    ----------
    run_dir:
        A finished run's directory.

    Returns
    -------
    str
        The HTML page.
    """
    return load_report_inputs(run_dir).html()
