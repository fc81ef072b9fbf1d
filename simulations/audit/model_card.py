"""``fedcare report model``: a run's model card, one self-contained HTML page.

What the model is for and how well it does, for the clinicians and committees who decide
whether to use it, built from what a finished run left (``summary.json`` and
``server_record.json``): only numbers the sites released (counts, aggregate metrics, ε),
never anything per patient. Like the audit report, the page needs no network (inline CSS and
SVG, no script, a Content-Security-Policy that forbids every fetch).

Sections are data-driven: :data:`SECTIONS` lists :class:`CardSection` entries, each a
function of the run's :class:`CardInputs` that returns the section's body, or ``None`` when
the run has nothing for it (so no section is ever a placeholder). Adding a section (feature
attributions, survival curves) is one function and one entry. The sections now:

``model``
    Task, model, strategy, personalization, rounds, versions.
``data``
    Per site: status, and the patient counts it released (train, validation, test).
``performance``
    Test metrics of the global model (federated), of the global model on each site's own
    test split, of each site's personalized model and local-only model, and of the pooled,
    non-private model, where the run has them.
``calibration``
    The global model's test calibration curve (pooled release): chart and table.
``groups``
    Per group attribute: the global model's test metrics per group and the largest gap,
    and each site's largest gaps (:mod:`fedcare.models.fairness`; a survival task's C-index
    and time-dependent AUC per group, :mod:`fedcare.models.survival_groups`).
``explanation``
    The final model's feature attributions (:mod:`fedcare.models.explain`).
``concordance``
    A survival task's global test C-index and time-dependent AUC, pooled from the sites'
    (risk bin, interval, event) histograms over all their test patients and events, beside
    the site-weighted mean of the sites' own values (:mod:`fedcare.models.survival_pooled`).
``survival``
    A survival task's test survival curves at the label's cuts: the observed Kaplan-Meier
    curve of the sites' pooled noisy life tables against the final model's mean predicted
    survival, pooled and per site (:mod:`fedcare.models.survival_curves`).
``privacy``
    Per site: DP on or off, the ε this run added and the lifetime ε (δ), the accountant,
    where the noise came from and how evaluation was released.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.run_files import MODEL_CARD_NAME, RECORD_NAME, SUMMARY_NAME
from fedcare.common.run_record import RunRecord, load_run_record
from fedcare.common.summary import GroupInfo, Metrics, RunSummary, SiteResult, load_summary
from fedcare.models.fairness import CALIBRATION_BINS
from fedcare.models.survival_pooled import site_mean_key
from fedcare.simulations.audit.html_charts import PALETTE, Axis, Series, legend, line_chart
from fedcare.simulations.audit.report_format import fmt_g, fmt_num
from fedcare.simulations.audit.report_html import _CSP, _CSS, _e, _p, _table

__all__ = [
    "MODEL_CARD_GENERATOR",
    "MODEL_CARD_NAME",
    "CardInputs",
    "CardSection",
    "SECTIONS",
    "GroupRow",
    "group_rows",
    "GROUP_COLUMNS",
    "SURVIVAL_GROUP_COLUMNS",
    "performance_rows",
    "load_card_inputs",
    "build_model_card",
    "model_card_href",
]

#: The page's ``<meta name="generator">``: marks a file as a model card a new one may replace.
MODEL_CARD_GENERATOR: Final = "fedcare model card"

#: The per-group metrics the card shows, in column order (``fedcare.common.keys.GROUP_METRICS``).
GROUP_COLUMNS: Final = (
    "n",
    "auroc",
    "tpr",
    "fpr",
    "ece",
    "mean_predicted",
    "observed",
    "calibration_error",
)
_GROUP_HEADERS: Final = (
    "n",
    "AUROC",
    "TPR",
    "FPR",
    "ECE",
    "mean predicted",
    "observed",
    "calibration error",
)


@dataclass(frozen=True)
class CardInputs:
    """What the card is built from: the run's summary and record."""

    summary: RunSummary
    record: RunRecord
    run_dir: Path | None = None


@dataclass(frozen=True)
class CardSection:
    """One section: its element ``id``, its title, and its body (``None``: not shown)."""

    id: str
    title: str
    render: Callable[[CardInputs], str | None]


@dataclass(frozen=True)
class GroupRow:
    """One group's metrics (``label`` a group, or ``largest gap``)."""

    label: str
    values: dict[str, float]


#: A survival task's per-group columns (:mod:`fedcare.models.survival_groups`).
SURVIVAL_GROUP_COLUMNS: Final = ("n", "c_index", "td_auc")
_SURVIVAL_GROUP_HEADERS: Final = ("n", "C-index", "td-AUC")
#: The gaps each site's row shows, binary and survival.
_SITE_GAPS: Final = ("auroc", "tpr", "fpr", "ece", "calibration_error")
_SITE_GAP_HEADERS: Final = ("AUROC", "TPR", "FPR", "ECE", "calibration error")
_SURVIVAL_SITE_GAPS: Final = ("c_index", "td_auc")


def group_rows(
    metrics: Metrics,
    group: GroupInfo,
    *,
    split: str = "test",
    columns: Sequence[str] = GROUP_COLUMNS,
) -> list[GroupRow]:
    """The rows of one attribute's table: every group with a released count, then the
    largest gap (where there is one), from ``metrics`` (``<split>.group.<a>.<g>.<metric>``,
    ``<split>.gap.<a>.<metric>``).

    Examples
    --------
    >>> info = GroupInfo(name="sex", column="sex", labels=("F", "M", "unknown"))
    >>> m = {"test.group.sex.0.n": 40.0, "test.group.sex.0.auroc": 0.6,
    ...      "test.group.sex.1.n": 38.0, "test.group.sex.1.auroc": 0.8,
    ...      "test.gap.sex.auroc": 0.2}
    >>> [(r.label, r.values.get("auroc")) for r in group_rows(m, info)]
    [('F', 0.6), ('M', 0.8), ('largest gap', 0.2)]
    """
    rows = []
    for g, label in enumerate(group.labels):
        prefix = keys.group_prefix(split, group.name, g)
        values = {c: metrics[f"{prefix}.{c}"] for c in columns if f"{prefix}.{c}" in metrics}
        if "n" in values:
            rows.append(GroupRow(label, values))
    gap = {
        c: metrics[keys.gap_key(split, group.name, c)]
        for c in keys.GAP_METRICS
        if keys.gap_key(split, group.name, c) in metrics
    }
    if gap:
        rows.append(GroupRow("largest gap", gap))
    return rows


def _test_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """``test.<name>`` (one level: no per-group keys) -> value, without the prefix."""
    return {
        k.removeprefix("test."): v
        for k, v in metrics.items()
        if k.startswith("test.") and k.count(".") == 1
    }


def performance_rows(summary: RunSummary) -> list[tuple[str, dict[str, float]]]:
    """``(model, its test metrics)`` for every model the run reports: the global model
    (federated), the global model on each site's test split, each site's personalized and
    local-only model, the pooled non-private model; rows without a metric left out."""
    rows = [("global model (federated)", _test_metrics(summary.global_.final))]
    rows += [(f"global model on {s.site_id}", _test_metrics(s.metrics)) for s in summary.sites]
    rows += [
        (f"personalized, {s.site_id}", _test_metrics(s.personal_metrics)) for s in summary.sites
    ]
    rows += [
        (f"local-only, {site}", _test_metrics(m))
        for site, m in sorted(summary.baselines.local_only.items())
    ]
    rows.append(("pooled, non-private", _test_metrics(summary.baselines.pooled)))
    return [(name, values) for name, values in rows if values]


def _columns(rows: Sequence[Mapping[str, float]]) -> list[str]:
    present = {k for r in rows for k in r}
    ordered = [m for m in keys.TASK_METRICS if m in present]
    return ordered + sorted(present - set(ordered))


# ------------------------------------------------------------------------------ sections


def _model_html(card: CardInputs) -> str:
    s, r = card.summary, card.record
    facts = [
        ("Run id", s.run_id),
        ("Task", s.task),
        ("Model", r.model or "—"),
        ("Strategy", s.strategy),
        ("Personalization", s.personalization),
        ("Rounds", f"{s.rounds_completed} of {s.rounds_planned}"),
        ("Sites", str(len(s.sites))),
        ("fedcare version", s.fedcare_version),
        ("Flower version", s.flwr_version),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    return f'<dl class="facts">{dl}</dl>'


def _count(metrics: Mapping[str, float], name: str) -> str:
    return str(int(metrics[name])) if name in metrics else "withheld"


def _data_html(card: CardInputs) -> str:
    rows = [
        (
            s.site_id,
            s.status,
            s.n_train,
            _count(s.metrics, "val.n"),
            _count(s.metrics, "test.n"),
            s.privacy.evaluation or "—",
        )
        for s in card.summary.sites
    ]
    return _p(
        "Patient counts as each site released them: the training count it trained on, and "
        "its validation and test counts from its last evaluation (noisy where evaluation is "
        "private; a split below the site's minimum count is withheld)."
    ) + _table(
        ["Site", "Status", "n train", "n validation", "n test", "evaluation"], rows, cls="numeric"
    )


def _metric_cell(values: Mapping[str, float], column: str) -> str:
    if column == "n" and column in values:
        return str(int(values[column]))
    return fmt_num(values.get(column))


def _performance_html(card: CardInputs) -> str | None:
    rows = performance_rows(card.summary)
    if not rows:
        return None
    columns = _columns([values for _, values in rows])
    body = [[name, *(_metric_cell(values, c) for c in columns)] for name, values in rows]
    return _p(
        "Test metrics (decision threshold chosen on the validation split). Federated and "
        "per-site numbers come from the sites' released evaluations; the local-only and pooled "
        "models are the run's baselines."
    ) + _table(["Model", *columns], body, cls="numeric")


def _bin_label(b: int) -> str:
    return f"{b / CALIBRATION_BINS:.1f}–{(b + 1) / CALIBRATION_BINS:.1f}"


def _calibration_html(card: CardInputs) -> str | None:
    curve = card.summary.global_.calibration
    if not curve:
        return None
    chart = line_chart(
        [
            Series(
                "global model",
                tuple((c.mean_predicted, c.observed) for c in curve),
                PALETTE[0],
            )
        ],
        x=Axis("mean predicted probability", lo=0.0, hi=1.0),
        y=Axis("observed rate", lo=0.0, hi=1.0),
        title="Calibration of the global model (test, pooled over sites)",
        width=480,
        height=360,
        diagonal=True,
    )
    rows = [
        (_bin_label(c.bin), fmt_num(c.mean_predicted), fmt_num(c.observed), str(int(c.n)))
        for c in curve
    ]
    return (
        _p(
            "Mean predicted probability against the observed rate of positives, per score bin "
            "of the sites' pooled test releases; the diagonal is perfect calibration."
        )
        + chart
        + legend([("global model", PALETTE[0], ""), ("perfect calibration", "#888888", "")])
        + _table(["score bin", "mean predicted", "observed", "n"], rows, cls="numeric")
    )


def _group_cell(row: GroupRow, column: str) -> str:
    if column == "n":
        return str(int(row.values["n"])) if "n" in row.values else ""
    signed = column == "calibration_error" and row.label != "largest gap"
    return fmt_num(row.values.get(column), signed=signed)


def _site_gaps(site: SiteResult, group: GroupInfo, gaps: Sequence[str]) -> list[str] | None:
    names = [keys.gap_key("test", group.name, m) for m in gaps]
    if not any(n in site.metrics for n in names):
        return None
    return [site.site_id, group.name, *(fmt_num(site.metrics.get(n)) for n in names)]


def _groups_html(card: CardInputs) -> str | None:
    s = card.summary
    if not s.groups:
        return None
    survival = any(
        k.startswith("test.group.") and k.endswith(".c_index")
        for metrics in (s.global_.final, *(site.metrics for site in s.sites))
        for k in metrics
    )
    columns: Sequence[str]
    headers: Sequence[str]
    gap_columns: Sequence[str]
    gap_headers: Sequence[str]
    if survival:
        columns, headers = SURVIVAL_GROUP_COLUMNS, _SURVIVAL_GROUP_HEADERS
        gap_columns, gap_headers = _SURVIVAL_SITE_GAPS, _SURVIVAL_GROUP_HEADERS[1:]
        intro = (
            "The global model's test C-index and time-dependent AUC per patient group: the "
            "mean of the sites' values for the group, weighted by its count at each site "
            "(each site's from its own noisy group release), and the largest difference "
            "across the groups."
        )
    else:
        columns, headers = GROUP_COLUMNS, _GROUP_HEADERS
        gap_columns, gap_headers = _SITE_GAPS, _SITE_GAP_HEADERS
        intro = (
            "The global model's test metrics per patient group, from the sites' pooled group "
            "releases (TPR and FPR at the decision threshold), and the largest difference "
            "across the groups."
        )
    parts = [
        _p(
            intro + " A group a site held fewer patients of than its minimum count is withheld "
            "there."
        )
    ]
    shown = False
    for group in s.groups:
        rows = group_rows(s.global_.final, group, columns=columns)
        if not rows:
            continue
        shown = True
        body = [[r.label, *(_group_cell(r, c) for c in columns)] for r in rows]
        parts.append(f"<h3>{_e(group.name)} <small>(column {_e(group.column)})</small></h3>")
        parts.append(_table(["group", *headers], body, cls=f"numeric groups group-{group.name}"))
    found = (_site_gaps(site, group, gap_columns) for site in s.sites for group in s.groups)
    sites = [row for row in found if row is not None]
    if sites:
        shown = True
        parts.append("<h3>Largest gap at each site</h3>")
        parts.append(_table(["site", "attribute", *gap_headers], sites, cls="numeric site-gaps"))
    return "".join(parts) if shown else None


def _privacy_html(card: CardInputs) -> str:
    rows = []
    for site in card.summary.sites:
        p = site.privacy
        rows.append(
            (
                site.site_id,
                "on" if p.enabled else "off",
                fmt_num(p.run_epsilon) if p.enabled else "off",
                fmt_num(p.epsilon) if p.enabled else "off",
                fmt_g(p.delta),
                p.accountant or "—",
                p.noise or "—",
                p.evaluation or "—",
            )
        )
    return _p(
        "Record-level differential privacy at each site, as its own ledger reports it: the ε "
        "this run added and the lifetime ε of the site's dataset (all runs), at δ."
    ) + _table(
        ["Site", "DP", "run ε", "lifetime ε", "δ", "accountant", "noise", "evaluation"],
        rows,
        cls="numeric",
    )


#: The most features the attribution table lists (the largest first); the rest are counted.
TOP_FEATURES: Final = 20


def _explanation_html(card: CardInputs) -> str | None:
    e = card.summary.explanation
    if e is None:
        return None
    parts = [
        _p(
            f"Which features drove the global model of round {e.round}: each feature's mean "
            "absolute integrated-gradients attribution (logit units, each patient's row clipped "
            "to norm 2), computed at each site over its test patients and released as a noisy "
            f"sum charged to its ledger; {fmt_num(e.n)} test patients in all (noisy). No "
            "patient's attribution left a site."
        )
    ]
    if e.importance:
        ranked = sorted(e.importance.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ranked[:TOP_FEATURES]
        site_ids = sorted(e.sites)
        rows = [
            (name, fmt_num(value), *(fmt_num(e.sites[s].get(name, 0.0)) for s in site_ids))
            for name, value in shown
        ]
        parts.append(_table(["Feature", "global", *site_ids], rows, cls="numeric"))
        if len(ranked) > len(shown):
            parts.append(_p(f"{len(ranked) - len(shown)} more features, each less important."))
        shares = [(m, fmt_num(v)) for m, v in sorted(e.modality_shares.items())]
        parts.append(_p("Share of the total importance by modality:"))
        parts.append(_table(["Modality", "share"], shares, cls="numeric"))
    else:
        parts.append(
            _p(
                "The sites' releases together hold fewer test patients than the run's minimum "
                "count, so no global attribution is shown."
            )
        )
    return "".join(parts)


def _concordance_html(card: CardInputs) -> str | None:
    """A survival task's pooled test C-index and td-AUC beside the sites' weighted mean;
    ``None`` unless the run pooled the sites' histograms (``test.events`` is then global)."""
    final = card.summary.global_.final
    if "test.events" not in final or "test.n" not in final:
        return None
    # (exact and DP sites' histograms differ in bins: they are never pooled together)
    modes = {s.privacy.evaluation for s in card.summary.sites if s.metrics}
    how = ""  # mode unknown (not reported): say nothing about it
    if modes == {"exact"}:
        how = " with exact counts (simulated sites that opted in)"
    elif modes == {"dp"}:
        how = (
            ", each count with Gaussian noise, from the very release its own metrics come "
            "from (no further privacy cost)"
        )
    rows = [
        (
            "global, pooled over the sites' patients",
            fmt_num(final.get("test.c_index")),
            fmt_num(final.get("test.td_auc")),
            str(int(final["test.n"])),
            str(int(final["test.events"])),
        ),
        (
            "mean of the sites' own values (weighted by n)",
            fmt_num(final.get(site_mean_key("test", "c_index"))),
            fmt_num(final.get(site_mean_key("test", "td_auc"))),
            "",
            "",
        ),
    ]
    return _p(
        "How well the final model ranks the test patients of all sites together: each site "
        "released its test patients as a histogram of (predicted-risk bin, interval between "
        "the label's cuts, event or censored)"
        + how
        + "; the server summed them and computed Harrell's C-index and the time-dependent "
        "AUC of the pooled histogram. Pairs of patients from different sites count, which a "
        "mean of the sites' C-indices never sees. Two patients of the same interval are not "
        "compared and risks in one bin count one half, so the pooled C-index is that of the "
        "binned risks and times. No patient's time or prediction left a site."
    ) + _table(
        ["", "C-index", "td-AUC", "test patients", "events"], rows, cls="numeric concordance"
    )


def _survival_points(
    cuts: Sequence[float], values: Sequence[float]
) -> tuple[tuple[float, float], ...]:
    """``(0, 1)`` then ``(cut, value)``: a survival curve starts at 1."""
    return ((0.0, 1.0), *zip(cuts, values, strict=False))


def _survival_html(card: CardInputs) -> str | None:
    c = card.summary.survival
    if c is None:
        return None
    unit = f" ({c.time_unit})" if c.time_unit else ""
    series = [
        Series("observed (Kaplan-Meier)", _survival_points(c.cuts, c.observed), PALETTE[0]),
        Series(
            "predicted (mean, global model)",
            _survival_points(c.cuts, c.predicted),
            PALETTE[1],
            dash="6 3",
        ),
    ]
    site_ids = sorted(c.sites)
    for i, site in enumerate(site_ids):
        own = c.sites[site]
        color = PALETTE[(i + 2) % len(PALETTE)]
        series.append(
            Series(f"{site} observed", _survival_points(c.cuts, own.observed), color, "2 3", False)
        )
    chart = line_chart(
        series,
        x=Axis(f"time{unit}", lo=0.0),
        y=Axis("survival probability", lo=0.0, hi=1.0),
        title="Survival of the test patients: observed and predicted",
        width=560,
        height=360,
    )
    names = [
        ("observed (Kaplan-Meier, pooled)", PALETTE[0], ""),
        ("predicted (mean, global model)", PALETTE[1], "6 3"),
    ]
    names += [
        (f"{site} observed", PALETTE[(i + 2) % len(PALETTE)], "2 3")
        for i, site in enumerate(site_ids)
    ]
    starts = [0.0, *c.cuts[:-1]]
    rows = [
        (
            f"{fmt_g(starts[k])}–{fmt_g(t)}",
            str(int(round(c.at_risk[k]))) if k < len(c.at_risk) else "withheld",
            str(int(round(c.events[k]))) if k < len(c.events) else "withheld",
            fmt_num(c.observed[k]) if k < len(c.observed) else "withheld",
            fmt_num(c.predicted[k]) if k < len(c.predicted) else "—",
        )
        for k, t in enumerate(c.cuts)
    ]
    per_site = [
        (
            site,
            str(int(round(c.sites[site].n))),
            *(
                f"{fmt_num(own.observed[k]) if k < len(own.observed) else 'withheld'} / "
                f"{fmt_num(own.predicted[k]) if k < len(own.predicted) else '—'}"
                for k in range(len(c.cuts))
            ),
        )
        for site in site_ids
        for own in (c.sites[site],)
    ]
    return (
        _p(
            f"The final model (round {c.round}) against what happened to the test patients: "
            "the observed survival is the Kaplan-Meier estimate of the sites' pooled life "
            "tables (patients at risk at the start of each interval between the label's cuts, "
            "and the events in it), the predicted survival the model's mean predicted survival "
            f"at each cut, over {int(round(c.n))} test patients in all. Each site released its "
            "life table and its sum of predicted survival with Gaussian noise, charged to its "
            "ledger; an interval with fewer patients at risk than a site's minimum count, and "
            "every later one, was withheld there, so the observed curve ends where too few "
            "patients were followed. No patient's time or prediction left a site."
        )
        + chart
        + legend(names)
        + _table(
            [f"interval{unit}", "at risk (start)", "events", "observed (end)", "predicted (end)"],
            rows,
            cls="numeric survival-curve",
        )
        + (
            _p("Each site's own curves, observed / predicted at each cut:")
            + _table(
                ["site", "n", *(fmt_g(t) for t in c.cuts)], per_site, cls="numeric survival-sites"
            )
            if per_site
            else ""
        )
    )


#: The card's sections, in page order; see the module docstring.
SECTIONS: tuple[CardSection, ...] = (
    CardSection("model", "Model and task", _model_html),
    CardSection("data", "Data per site", _data_html),
    CardSection("performance", "Performance", _performance_html),
    CardSection("calibration", "Calibration", _calibration_html),
    CardSection("groups", "Performance across patient groups", _groups_html),
    CardSection("explanation", "Feature attributions", _explanation_html),
    CardSection("concordance", "Survival: global C-index", _concordance_html),
    CardSection("survival", "Survival curves", _survival_html),
    CardSection("privacy", "Privacy spent per site", _privacy_html),
)


def build_model_card(card: CardInputs, *, sections: Sequence[CardSection] = SECTIONS) -> str:
    """The model card of one run, as one self-contained HTML page (a pure function)."""
    s = card.summary
    parts = []
    for section in sections:
        body = section.render(card)
        if body is not None:
            parts.append(
                f'<section id="{_e(section.id)}"><h2>{_e(section.title)}</h2>{body}</section>'
            )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{MODEL_CARD_GENERATOR}">'
        f"<title>fedcare model card: {_e(s.run_id)}</title>"
        f"<style>{_CSS}</style></head><body><main>"
        f"<h1>Model card: {_e(s.task)} ({_e(s.run_id)})</h1>"
        + "".join(parts)
        + f"<footer>fedcare {_e(s.fedcare_version)} model card</footer>"
        "</main></body></html>\n"
    )


def load_card_inputs(run_dir: Path) -> CardInputs:
    """The run's summary and record, validated.

    Raises
    ------
    ConfigError
        ``run_dir`` is not a folder, or its summary or record is missing or invalid; the
        message names the file and the fix.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: no such run directory; pass the folder a run wrote "
            "(`fedcare simulate --out DIR`)"
        )
    return CardInputs(
        summary=load_summary(run_dir / SUMMARY_NAME),
        record=load_run_record(run_dir / RECORD_NAME),
        run_dir=run_dir,
    )


def model_card_href(run_dir: Path, page: Path | None) -> str | None:
    """A link from ``page`` (``None``: absolute) to the run's model card, where it exists."""
    card = Path(run_dir) / MODEL_CARD_NAME
    if not card.is_file():
        return None
    if page is None:
        return card.resolve().as_uri()
    return Path(os.path.relpath(card.resolve(), Path(page).resolve().parent)).as_posix()
