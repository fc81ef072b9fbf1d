"""The audit report's HTML page: one self-contained file about a run's privacy.

The page needs no network: CSS is inline, charts are inline SVG, there is no script, and a
Content-Security-Policy forbids the browser from fetching anything. Its sections, each an
element with a fixed ``id`` (:data:`SECTION_IDS`):

``verdict``
    PASS, or ATTENTION with the reasons (:mod:`.report_verdict`).
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

Numbers are printed as :mod:`.report_format` prints them. :func:`build_report` is a pure
function of the run's findings (:mod:`.report_load` reads them from a run directory).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from fedcare.common import keys
from fedcare.common.run_record import RunRecord
from fedcare.common.summary import RunSummary
from fedcare.simulations.audit.findings import AttackReport, EpsilonAudit, LogCheck, VerifyResult
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
from fedcare.simulations.audit.report_format import fmt_g, fmt_num
from fedcare.simulations.audit.report_verdict import (
    EVENT_ORDER,
    Verdict,
    attack_command,
    compute_verdict,
    dp_sites,
)

__all__ = ["SECTION_IDS", "REPORT_GENERATOR", "build_report"]

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
#: The page's ``<meta name="generator">``: marks a file as a report that a new one may replace.
REPORT_GENERATOR: Final = "fedcare audit report"

#: Test metrics drawn in the utility chart, when the task reports them.
_UTILITY_PLOTTED: Final = ("auroc", "auprc", "balanced_accuracy", "accuracy")
#: The per-site numbers of the record's rounds, and the run-config keys, this page reads.
_R_UPDATE_NORM, _R_EPSILON = "update-norm", "epsilon"
_C_MAX_UPDATE_NORM, _C_TARGET_EPSILON = "max-update-norm", "target-epsilon"
_C_SITE_BUDGET = "site-epsilon-budget"


class _Html(str):
    """Markup built here, inserted as is (any other ``str`` is escaped)."""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


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
    record: RunRecord,
    run_dir: Path | None,
    code_hash: str | None,
) -> str:
    dp = dp_sites(summary)
    deltas = sorted({s.privacy.delta for s in summary.sites if s.privacy.delta is not None})
    facts: list[tuple[str, str]] = [("Run id", summary.run_id)]
    if run_dir is not None:
        facts.append(("Run directory", str(run_dir)))
    facts += [
        ("Task", summary.task),
        ("Model", record.model or "—"),
        ("Strategy", summary.strategy),
        ("Rounds", f"{summary.rounds_completed} of {summary.rounds_planned}"),
        ("Sites", str(len(summary.sites))),
        (
            "Record-level DP",
            f"{len(dp)} of {len(summary.sites)} sites"
            + (f", δ = {', '.join(fmt_g(d) for d in deltas)}" if deltas else ""),
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
            fmt_g(s.privacy.delta),
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
    record: RunRecord,
    epsilon: EpsilonAudit | None,
    epsilon_error: str | None,
) -> str:
    parts: list[str] = []
    if epsilon is None:
        parts.append(_p(f"ε could not be recomputed: {epsilon_error or 'no result'}", "error"))
        reported = record.per_site_round(_R_EPSILON)
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
    target = record.config_number(_C_TARGET_EPSILON)
    if target is not None and target > 0:
        hlines.append(HLine(target, f"target ε {fmt_num(target)}"))
    budget = record.config_number(_C_SITE_BUDGET)
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
                fmt_g(r.delta),
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
                if k.startswith(f"{split}.")
                and k != f"{split}.n"
                and not keys.is_group_metric(k)  # per group: the model card's
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


def _norms_html(record: RunRecord) -> str:
    norms = record.per_site_round(_R_UPDATE_NORM)
    bound = record.config_number(_C_MAX_UPDATE_NORM)
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
        f"{n} {k}" for k in EVENT_ORDER if (n := sum(1 for ev in summary.events if ev.kind == k))
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
            f'<p class="error">no attack run yet: run <code>{_e(attack_command(run_dir))}'
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
                f"The run was private (δ = {fmt_g(attacks.delta)})."
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
    record: RunRecord,
    verify: VerifyResult,
    epsilon: EpsilonAudit | None,
    attacks: AttackReport | None,
    epsilon_error: str | None = None,
    run_dir: Path | None = None,
    code_hash: str | None = None,
    model_card: str | None = None,
) -> str:
    """The audit report of one run, as one self-contained HTML page.

    A pure function: the same findings give the same page, byte for byte.

    Parameters
    ----------
    summary:
        The run's ``summary.json``.
    record:
        The run's ``server_record.json`` (:class:`~fedcare.common.run_record.RunRecord`;
        read: per-round update norms and reported ε, the run config's norm bound, target ε
        and site budget, the model).
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
    model_card:
        A link to the run's model card (``fedcare report model``), where one exists.

    Returns
    -------
    str
        The HTML page (UTF-8 text).
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
        + (
            f'<p id="model-card-link">The run\'s model card: <a href="{_e(model_card)}">'
            f"{_e(model_card)}</a></p>"
            if model_card
            else ""
        )
        + "".join(sections)
        + f"<footer>fedcare {_e(summary.fedcare_version)} audit report</footer>"
        "</main></body></html>\n"
    )
