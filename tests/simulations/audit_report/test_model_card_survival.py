"""Survival curves from the sites' wire to the model card, against scikit-survival and numpy.

Three sites send their exact curve releases (the site's code path, noise 0) in their last
evaluation's reply; the guard reads and pools them into the run record, the summary carries
them, and the card prints them. Every printed number is checked against an independent
computation on all the sites' patients: scikit-survival's ``kaplan_meier_estimator`` of the
times grouped into the cuts' intervals (observed), numpy's mean of the patients' predicted
curves (predicted) and numpy's at-risk and event counts. A centre cannot slip curves into
another round, or into a run that is not a survival task: such a reply is a failed
evaluation, left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from sksurv.metrics import concordance_index_censored
from sksurv.nonparametric import kaplan_meier_estimator

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.spec import Feature, FeatureSchema, GroupAttribute, LabelSpec
from fedcare.common.summary import RunSummary
from fedcare.models.survival import (
    SurvivalTask,
    event_probability,
    interval_index,
    survival_curves,
    survival_release,
)
from fedcare.models.survival_curves import release
from fedcare.models.survival_groups import release_survival_groups
from fedcare.server.guard import GuardedStrategy
from fedcare.simulations.audit.model_card import CardInputs, build_model_card
from tests._flower import task_identity
from tests.simulations.audit_report._dom import section_rows, section_text
from tests.simulations.audit_report.test_report_browser import (  # noqa: F401 (a fixture)
    _page_requests,
    _run,
    chromium,
)

CUTS = (365.0, 730.0, 1095.0, 1460.0)
LABEL = LabelSpec(
    name="death",
    table="ehr.csv",
    column="event",
    kind="survival",
    time_column="time",
    cuts=CUTS,
    time_unit="days",
)
NODES = {"site-a": 11, "site-b": 12, "site-c": 13}
MIN_COUNT = 10


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    with task_identity(run_id=9):
        yield


def _reply(site: str, values: Mapping[str, float], *, evaluation: str | None = None) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=NODES[site], message_type="evaluate"
    )
    TaskIdentity.node_id = NODES[site]
    content = RecordDict(
        {
            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 1, **values}),
            keys.REC_SITE: ConfigRecord(
                {keys.S_SITE_ID: site, **({keys.S_EVALUATION: evaluation} if evaluation else {})}
            ),
        }
    )
    return Message(content, reply_to=ins)


SCHEMA = FeatureSchema(
    ehr=(Feature(name="sex", kind="categorical", categories=("F", "M")),),
    groups=(GroupAttribute(name="sex", column="sex"),),
)


def _guard(tmp_path: Path, *, label: LabelSpec | None = LABEL) -> GuardedStrategy:
    return GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        schema_fingerprint=SCHEMA.fingerprint(),
        schema_json=SCHEMA.model_dump_json(),
        cfg=FederationConfig.from_run_config(
            {"min-sites": 1, "num-server-rounds": 2, "site-min-count": MIN_COUNT}
        ),
        run_dir=tmp_path,
        run_id="r1",
        survival_label=label,
    )


def _site(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    time = rng.exponential(900.0, n)
    event = (rng.random(n) < 0.6).astype(int)
    hazards = rng.uniform(0.05, 0.4, (n, len(CUTS)))
    return event, time, hazards


def _wire(event: np.ndarray, time: np.ndarray, hazards: np.ndarray) -> dict[str, float]:
    rel = release(
        event,
        interval_index(time, CUTS),
        survival_curves(hazards),
        cuts=CUTS,
        noise_multiplier=0.0,
        generator=None,
        min_count=MIN_COUNT,
    )
    assert rel is not None
    return {"test.n": float(event.size), "test.c_index": 0.7, **rel.to_wire()}


def _km(event: np.ndarray, time: np.ndarray) -> np.ndarray:
    """scikit-survival's Kaplan-Meier after each interval, times grouped into intervals."""
    k = interval_index(time, CUTS)
    times, prob = kaplan_meier_estimator((event == 1) & (k < len(CUTS)), k.astype(float))
    idx = np.searchsorted(times, np.arange(len(CUTS)), side="right") - 1
    return np.where(idx >= 0, prob[np.clip(idx, 0, None)], 1.0)


def _f(v: float) -> str:
    return f"{v:.3f}"


def test_the_cards_survival_curves_are_the_pooled_kaplan_meier_and_mean_prediction(
    tmp_path: Path,
) -> None:
    sizes = {"site-a": 150, "site-b": 90, "site-c": 220}
    sites = {name: _site(seed, n) for seed, (name, n) in enumerate(sizes.items())}
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(2, [_reply(s, _wire(*data)) for s, data in sites.items()])
    record = guard.record
    assert record.survival is not None and record.events == []
    # Release sums are the record's only through the curves, never a site's own metrics.
    assert not any(keys.is_curve_metric(k) for s in record.sites.values() for k in s.metrics)

    summary = RunSummary.from_record(record, fedcare_version="0", flwr_version="1.42.0")
    assert summary.survival == record.survival
    page = build_model_card(CardInputs(summary=summary, record=record))

    event, time, hazards = (np.concatenate(p) for p in zip(*sites.values(), strict=True))
    k = interval_index(time, CUTS)
    observed = _km(event, time)
    predicted = survival_curves(hazards).mean(axis=0)
    rows = section_rows(page, "survival")
    assert rows[0] == [
        "interval (days)", "at risk (start)", "events", "observed (end)", "predicted (end)"
    ]  # fmt: skip
    expected = [
        [
            f"{([0.0, *CUTS])[j]:g}–{t:g}",
            str((k >= j).sum()),
            str(((event == 1) & (k == j)).sum()),
            _f(observed[j]),
            _f(predicted[j]),
        ]
        for j, t in enumerate(CUTS)
    ]
    assert rows[1 : 1 + len(CUTS)] == expected
    # Each site's own curves, observed / predicted.
    site_rows = {r[0]: r for r in rows if r[0] in NODES}
    for name, (e, t, h) in sites.items():
        km, mean = _km(e, t), survival_curves(h).mean(axis=0)
        ki = interval_index(t, CUTS)
        at_risk = np.array([(ki >= j).sum() for j in range(len(CUTS))])
        cells = [
            f"{_f(km[j]) if at_risk[j] >= MIN_COUNT else 'withheld'} / {_f(mean[j])}"
            for j in range(len(CUTS))
        ]
        assert site_rows[name] == [name, str(e.size), *cells]
    text = section_text(page, "survival")
    assert f"over {len(event)}" in text and "No patient's time or prediction left a site" in text
    assert "<svg" in page.split('id="survival"')[1] and "<script" not in page


def test_curves_the_run_did_not_ask_for_are_a_failed_evaluation(tmp_path: Path) -> None:
    data = _site(0, 100)
    early = _guard(tmp_path / "early")
    early.aggregate_evaluate(1, [_reply("site-a", _wire(*data))])  # not the last round
    not_survival = _guard(tmp_path / "binary", label=None)
    not_survival.aggregate_evaluate(2, [_reply("site-a", _wire(*data))])
    for guard in (early, not_survival):
        assert guard.record.survival is None
        assert [e.kind for e in guard.record.events] == ["evaluate-failed"]
        assert "did not ask for" in guard.record.events[0].detail
    malformed = _guard(tmp_path / "malformed")
    wire = _wire(*data)
    del wire[keys.curve_key(keys.CURVE_PREDICTED, 2)]
    malformed.aggregate_evaluate(2, [_reply("site-a", wire)])
    assert malformed.record.survival is None
    assert "predicted sums" in malformed.record.events[0].detail


def test_the_cards_group_table_of_a_survival_task_is_the_count_weighted_c_index(
    tmp_path: Path,
) -> None:
    """Each site's group C-index is scikit-survival's on the group's patients; the card's
    global one is their mean weighted by the group counts (numpy)."""
    task = SurvivalTask(cuts=CUTS)
    sizes = {"site-a": 150, "site-b": 90}
    sites = {name: _site(seed, n) for seed, (name, n) in enumerate(sizes.items())}
    codes = {name: np.random.default_rng(10 + i).integers(0, 2, n)
             for i, (name, n) in enumerate(sizes.items())}  # fmt: skip
    replies = []
    for name, (e, t, h) in sites.items():
        y = np.column_stack([t, e])
        wire = _wire(e, t, h)
        wire.update(
            release_survival_groups(
                task, {"test": y}, {"test": h}, {"sex": {"test": codes[name]}}, {"sex": 3},
                noise_multiplier=0.0, generator=None, min_count=MIN_COUNT, train=y,
            )
        )  # fmt: skip
        replies.append(_reply(name, wire))
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(2, replies)
    assert guard.record.events == []
    summary = RunSummary.from_record(guard.record, fedcare_version="0", flwr_version="1.42.0")
    page = build_model_card(CardInputs(summary=summary, record=guard.record))

    per_group: dict[int, list[tuple[float, int]]] = {0: [], 1: []}
    for name, (e, t, h) in sites.items():
        for g in (0, 1):
            mask = codes[name] == g
            c = concordance_index_censored(e[mask] == 1, t[mask], event_probability(h[mask]))[0]
            per_group[g].append((c, int(mask.sum())))
    expected = {
        g: float(np.average([c for c, _ in v], weights=[n for _, n in v]))
        for g, v in per_group.items()
    }
    rows = section_rows(page, "groups")
    assert rows[0] == ["group", "n", "C-index", "td-AUC"]
    by_label = {r[0]: r for r in rows}
    for g, label in enumerate(("F", "M")):
        assert by_label[label][1] == str(sum(n for _, n in per_group[g]))
        assert by_label[label][2] == _f(expected[g])
    assert by_label["largest gap"][2] == _f(abs(expected[0] - expected[1]))
    site_rows = [r for r in rows if r[0] in sizes]
    assert [r[:2] for r in site_rows] == [["site-a", "sex"], ["site-b", "sex"]]
    for r in site_rows:
        own = [c for g in (0, 1) for c, _ in [per_group[g][list(sizes).index(r[0])]]]
        assert r[2] == _f(abs(own[0] - own[1]))


def test_the_survival_card_renders_in_a_browser_and_fetches_nothing(
    chromium: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    sites = {name: _site(seed, 120) for seed, name in enumerate(NODES)}
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(2, [_reply(s, _wire(*data)) for s, data in sites.items()])
    summary = RunSummary.from_record(guard.record, fedcare_version="0", flwr_version="1.42.0")
    page = tmp_path / "model_card.html"
    page.write_text(build_model_card(CardInputs(summary=summary, record=guard.record)))
    net_log = tmp_path / "net.json"
    dom = _run(
        chromium, tmp_path, page, f"--log-net-log={net_log}", "--virtual-time-budget=2000",
        "--dump-dom",
    )  # fmt: skip
    event, time, _ = (np.concatenate(p) for p in zip(*sites.values(), strict=True))
    rows = section_rows(dom, "survival")
    assert rows[1][:4] == ["0–365", "360", str(((event == 1) & (time <= 365)).sum()),
                           _f(_km(event, time)[0])]  # fmt: skip
    assert dom.split('id="survival"')[1].count("<svg") >= 1
    assert _page_requests(net_log) == []


def _pooled_wire(event: np.ndarray, time: np.ndarray, hazards: np.ndarray) -> dict[str, float]:
    """A site's exact evaluation reply through the site's own code path, histogram included."""
    y = np.column_stack([time, event])
    out = survival_release(
        SurvivalTask(cuts=CUTS), {"test": y}, {"test": hazards}, noise_multiplier=0.0,
        generator=None, min_count=MIN_COUNT, train=y, bins=keys.HIST_MAX_BINS, histogram=True,
    )  # fmt: skip
    return out


def test_the_cards_global_c_index_is_pooled_over_all_the_sites_patients(tmp_path: Path) -> None:
    """The global C-index is scikit-survival's over the union of the sites' test patients
    (risks and times binned as the histograms bin them); n and events are numpy's; the
    site-weighted mean beside it is numpy's mean of scikit-survival's per-site C-indices."""
    sizes = {"site-a": 150, "site-b": 90, "site-c": 220}
    sites = {name: _site(seed, n) for seed, (name, n) in enumerate(sizes.items())}
    guard = _guard(tmp_path)
    replies = [_reply(s, _pooled_wire(*d), evaluation="exact") for s, d in sites.items()]
    guard.aggregate_evaluate(2, replies)
    assert guard.record.events == []
    assert not any(
        keys.is_surv_hist_metric(k) for s in guard.record.sites.values() for k in s.metrics
    )
    summary = RunSummary.from_record(guard.record, fedcare_version="0", flwr_version="1.42.0")
    page = build_model_card(CardInputs(summary=summary, record=guard.record))

    event, time, hazards = (np.concatenate(p) for p in zip(*sites.values(), strict=True))
    k = interval_index(time, CUTS)
    b = np.clip(np.floor(event_probability(hazards) * keys.HIST_MAX_BINS), 0, 99)
    pooled = concordance_index_censored(event == 1, k + 1.0 - 0.5 * (event == 0), b)[0]
    own = [
        (concordance_index_censored(e == 1, t, event_probability(h))[0], e.size)
        for e, t, h in sites.values()
    ]
    site_mean = float(np.average([c for c, _ in own], weights=[n for _, n in own]))
    final = summary.global_.final
    assert final["test.c_index"] == pytest.approx(pooled, abs=1e-12)
    assert final["test.site_mean.c_index"] == pytest.approx(site_mean, abs=1e-12)
    rows = section_rows(page, "concordance")
    assert rows[0] == ["", "C-index", "td-AUC", "test patients", "events"]
    assert rows[1][1] == _f(pooled) and rows[1][3:] == [str(event.size), str(event.sum())]
    assert rows[2][1] == _f(site_mean)
    assert "exact counts" in section_text(page, "concordance")


def test_a_malformed_histogram_is_a_failed_evaluation_with_its_reason(tmp_path: Path) -> None:
    data = _site(0, 100)
    wire = _pooled_wire(*data)
    del wire[keys.surv_hist_key("test", 7, 1, 0)]
    guard = _guard(tmp_path)
    guard.aggregate_evaluate(
        2, [_reply("site-a", wire), _reply("site-b", _pooled_wire(*_site(1, 80)))]
    )
    (failed,) = guard.record.events
    assert failed.kind == "evaluate-failed" and failed.site_id == "site-a"
    assert "survival histogram of 100 risk bins and 4 cuts has 1000 cells" in failed.detail
    # The other site's evaluation stands, pooled on its own.
    final = guard.record.rounds[-1].metrics
    assert final["test.n"] == 80 and "test.events" in final
