"""What a run writes, from the server's record: metrics.csv rows (baselines included) and the
privacy a site reported (lifetime ε, run ε, noise, evaluation) in summary.json, metrics.csv
and the results table. Flower is not started: the guard is fed real Flower messages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.run_record import RunRecord
from fedcare.common.summary import load_summary, write_summary
from fedcare.models.evaluation import release
from fedcare.server.guard import GuardedStrategy
from fedcare.server.summary import build_summary
from fedcare.simulations.reports import read_metrics_csv, write_metrics_csv, write_run_plots
from fedcare.simulations.runner import RunOutcome, metric_rows
from fedcare.simulations.simulate_cli import privacy_notes, results_table
from tests._flower import task_identity

REF = {"w": np.zeros((2, 2), dtype=np.float32)}


def _record() -> RunRecord:
    """A server record of a 2-round run (``server_record.json``)."""
    site = {"train-loss": 0.5, "update-norm": 1.0, "num-examples": 40, "epsilon": 3.0}
    record = RunRecord.start(
        run_id="r1",
        task="readmission",
        model="ehr_mlp",
        strategy="fedavg",
        personalization="none",
        rounds_planned=2,
        config={},
    )
    record.round_entry(0).metrics = {"test.auroc": 0.5}
    record.round_entry(0).sites = {"a": {"test.auroc": 0.5}}
    record.round_entry(1).sites = {"a": site}
    record.round_entry(2).metrics = {"test.auroc": 0.7}
    record.round_entry(2).sites = {"a": {"test.auroc": 0.7}}
    return record


def test_metrics_csv_holds_the_baselines(tmp_path: Path) -> None:
    baselines = {
        "local_only": {"a": {"test.auroc": 0.6, "test.n": 30.0}, "b": {"test.auroc": 0.55}},
        "pooled": {"test.auroc": 0.8, "val.auroc": 0.79},
    }
    write_metrics_csv(metric_rows(_record(), baselines), tmp_path / "metrics.csv")
    frame = read_metrics_csv(tmp_path / "metrics.csv")
    got = {
        (r.round, r.site, r.split, r.metric): r.value
        for r in frame.itertuples()
        if r.site.startswith("baseline:")
    }
    assert got == {
        (2, "baseline:local-only:a", "test", "auroc"): 0.6,
        (2, "baseline:local-only:a", "test", "n"): 30.0,
        (2, "baseline:local-only:b", "test", "auroc"): 0.55,
        (2, "baseline:pooled", "test", "auroc"): 0.8,
        (2, "baseline:pooled", "val", "auroc"): 0.79,
    }
    # The federation's own rows are still all there.
    assert ((frame["site"] == "global") & (frame["round"] == 2)).any()
    assert ((frame["site"] == "a") & (frame["metric"] == "epsilon")).any()


def test_without_baselines_only_the_federation_rows_are_written() -> None:
    rows = metric_rows(_record(), {"local_only": {}, "pooled": {}})
    assert rows and not [r for r in rows if r.site.startswith("baseline:")]
    assert not [r for r in rows if r.site.startswith("personal:")]  # no personal models


def test_metrics_csv_holds_the_personalized_models_beside_the_global_one(tmp_path: Path) -> None:
    record = _record()
    record.personalization = "finetune"
    record.rounds[2].personal = {"a": {"test.auroc": 0.8, "val.auroc": 0.75, "own": 1.0}}
    baselines = {"local_only": {"a": {"test.auroc": 0.6}}, "pooled": {"test.auroc": 0.85}}
    write_metrics_csv(metric_rows(record, baselines), tmp_path / "metrics.csv")
    frame = read_metrics_csv(tmp_path / "metrics.csv")
    got = {
        (r.round, r.site, r.split, r.metric): r.value
        for r in frame.itertuples()
        if r.site.startswith("personal:")
    }
    assert got == {
        (2, "personal:a", "test", "auroc"): 0.8,
        (2, "personal:a", "val", "auroc"): 0.75,
        (2, "personal:a", "val", "own"): 1.0,
    }
    # The global model's rows, the site's own included, are those of a run without them.
    plain = set(metric_rows(_record(), baselines))
    mine = {r for r in metric_rows(record, baselines) if not r.site.startswith("personal:")}
    assert mine == plain
    written = {p.name for p in write_run_plots(tmp_path)}
    assert "test_auroc_per_site.png" in written and "test_auroc.png" in written


# ---------------------------------------------------------------- a site's reported privacy


@pytest.fixture(autouse=True)
def _identity() -> Iterator[None]:
    """Flower stamps messages with the running task's identity; play the server's."""
    with task_identity(run_id=7):
        yield


def _reply(node: int, info: dict[str, Any], *, loss: bool = True) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
    TaskIdentity.node_id = node
    numbers: dict[str, int | float] = {keys.M_NUM_EXAMPLES: 40, keys.M_STEPS: 4}
    if loss:
        numbers[keys.M_TRAIN_LOSS] = 0.5
    content = RecordDict(
        {
            keys.REC_ARRAYS: ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}),
            keys.REC_METRICS: MetricRecord(numbers),  # type: ignore[arg-type]
            keys.REC_SITE: ConfigRecord(info),
        }
    )
    return Message(content, reply_to=ins)


def _dp_info(site: str, lifetime: float, run: float, **extra: Any) -> dict[str, Any]:
    return {
        keys.S_SITE_ID: site,
        keys.S_DP: True,
        keys.S_REPLAYED: False,
        keys.S_EPSILON: lifetime,
        keys.S_RUN_EPSILON: run,
        keys.S_DELTA: 1e-5,
        keys.S_ACCOUNTANT: "prv",
        keys.S_NOISE_MULTIPLIER: 1.1,
        keys.S_SAMPLE_RATE: 0.25,
        keys.S_STEPS: 4,
        **extra,
    }


def _guard(tmp_path: Path, nodes: set[int]) -> GuardedStrategy:
    guard = GuardedStrategy(
        FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        cfg=FederationConfig.from_run_config({"min-sites": 1, "num-server-rounds": 2}),
        run_dir=tmp_path,
        run_id="r1",
    )
    guard._reference = {k: v.copy() for k, v in REF.items()}
    guard._expected = nodes
    return guard


def test_lifetime_and_run_epsilon_noise_and_evaluation_reach_every_output(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path, {11, 12, 13})
    seeded = {keys.S_NOISE: keys.NOISE_REPRODUCIBLE, keys.S_EVALUATION: keys.EVAL_EXACT}
    real = {keys.S_NOISE: keys.NOISE_OS_ENTROPY, keys.S_EVALUATION: keys.EVAL_DP}
    # site-a had 4.0 of ε from an earlier run; site-b is new; site-c sends no new key (older).
    older = _dp_info("site-c", 1.0, 0.0)
    del older[keys.S_RUN_EPSILON]
    guard.aggregate_train(
        1,
        [
            _reply(11, _dp_info("site-a", 5.0, 1.0, **seeded)),
            _reply(12, _dp_info("site-b", 1.2, 1.2, **real)),
            _reply(13, older),
        ],
    )
    guard.aggregate_train(
        2,
        [
            _reply(11, _dp_info("site-a", 6.5, 2.5, **seeded)),
            _reply(12, _dp_info("site-b", 2.0, 2.0, **real)),
        ],
    )
    summary = build_summary(guard.record)
    write_summary(summary, tmp_path / "summary.json")
    sites = {s.site_id: s.privacy for s in load_summary(tmp_path / "summary.json").sites}
    a, b, c = sites["site-a"], sites["site-b"], sites["site-c"]
    assert (a.epsilon, a.run_epsilon, a.noise, a.evaluation) == (6.5, 2.5, "reproducible", "exact")
    assert (b.epsilon, b.run_epsilon, b.noise, b.evaluation) == (2.0, 2.0, "os-entropy", "dp")
    assert (c.epsilon, c.run_epsilon, c.noise, c.evaluation) == (1.0, None, None, None)

    rows = {(r.round, r.site, r.metric): r.value for r in metric_rows(guard.record, {})}
    assert rows[(2, "site-a", "epsilon")] == 6.5 and rows[(2, "site-a", "run-epsilon")] == 2.5
    assert rows[(1, "site-a", "run-epsilon")] == 1.0
    assert (1, "site-c", "run-epsilon") not in rows
    assert rows[(2, "site-a", "train-loss")] == 0.5

    console = Console(width=200, record=True)
    console.print(results_table(RunOutcome(tmp_path, summary)))
    text = console.export_text()
    assert "run ε" in text and "lifetime ε (δ)" in text
    line_a = next(line for line in text.splitlines() if "site-a" in line)
    assert re.search(r"completed \*.*2\.50.*6\.50 \(1e-05\)", line_a), line_a
    line_b = next(line for line in text.splitlines() if "site-b" in line)
    assert "*" not in line_b and re.search(r"2\.00.*2\.00 \(1e-05\)", line_b), line_b
    notes = privacy_notes(summary)
    assert len(notes) == 2
    assert "noise = reproducible at site-a" in notes[0]
    assert "evaluation = exact at site-a" in notes[1]


def test_a_site_that_evaluates_with_dp_keeps_its_training_loss_and_is_accepted(
    tmp_path: Path,
) -> None:
    guard = _guard(tmp_path, {11, 12})
    dp_eval = {keys.S_NOISE: keys.NOISE_OS_ENTROPY, keys.S_EVALUATION: keys.EVAL_DP}
    arrays, _ = guard.aggregate_train(
        1,
        [
            _reply(11, _dp_info("site-a", 1.0, 1.0, **dp_eval), loss=False),
            _reply(12, _dp_info("site-b", 1.0, 1.0, **dp_eval), loss=False),
        ],
    )
    assert arrays is not None
    assert [s.status for s in guard.record.sites.values()] == ["completed"] * 2
    rows = {(r.site, r.metric) for r in metric_rows(guard.record, {})}
    assert ("site-a", "num-examples") in rows and ("site-a", "train-loss") not in rows


def _evaluate_reply(node: int, site: str, values: dict[str, float]) -> Message:
    TaskIdentity.node_id = 1
    ins = Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="evaluate"
    )
    TaskIdentity.node_id = node
    content = RecordDict(
        {
            keys.REC_METRICS: MetricRecord({keys.M_NUM_EXAMPLES: 1, **values}),
            keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: site}),
        }
    )
    return Message(content, reply_to=ins)


def test_the_personalized_metrics_a_site_reports_reach_metrics_csv_as_in_summary(
    tmp_path: Path,
) -> None:
    """One record, two readers: what summary.json keeps as a site's ``personal_metrics`` is
    what metrics.csv holds for ``personal:<site id>`` at the site's last evaluation."""
    guard = _guard(tmp_path, {11, 12})
    rng = np.random.default_rng(0)
    y = {s: rng.integers(0, 2, 60) for s in keys.EVAL_SPLITS}
    p = {s: np.clip(rng.random(60) * 0.6 + 0.4 * y[s], 0, 1) for s in keys.EVAL_SPLITS}
    exact = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
    pp = keys.PERSONAL_PREFIX
    for rnd, (own_auroc, own) in enumerate([(0.61, 0.0), (0.93, 1.0)], start=1):
        guard.aggregate_evaluate(
            rnd,
            [
                _evaluate_reply(
                    11,
                    "site-a",
                    {
                        **exact,
                        f"{pp}test.auroc": own_auroc,
                        f"{pp}val.auroc": 0.9,
                        keys.M_PERSONAL_OWN: own,
                    },
                ),
                _evaluate_reply(12, "site-b", exact),  # keeps no personal model
            ],
        )
    rows = metric_rows(guard.record, {})
    personal = {(r.round, r.site, r.split, r.metric): r.value for r in rows if ":" in r.site}
    assert personal == {
        (1, "personal:site-a", "test", "auroc"): 0.61,
        (1, "personal:site-a", "val", "auroc"): 0.9,
        (1, "personal:site-a", "val", "own"): 0.0,
        (2, "personal:site-a", "test", "auroc"): 0.93,
        (2, "personal:site-a", "val", "auroc"): 0.9,
        (2, "personal:site-a", "val", "own"): 1.0,
    }
    summary = build_summary(guard.record)
    site_a = next(s for s in summary.sites if s.site_id == "site-a")
    assert site_a.personal_metrics == {"test.auroc": 0.93, "val.auroc": 0.9, "own": 1.0}
    assert not next(s for s in summary.sites if s.site_id == "site-b").personal_metrics
    # The global model's rows of site-a are its own evaluation, untouched by the personal one.
    assert {(r.round, r.split, r.metric) for r in rows if r.site == "site-a"} == {
        (r.round, r.split, r.metric) for r in rows if r.site == "site-b"
    }


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({keys.S_NOISE: "seeded-by-server"}, "noise"),
        ({keys.S_EVALUATION: 1}, "evaluation"),
        ({keys.S_RUN_EPSILON: -0.5}, "run-epsilon = -0.5 is negative"),
        ({keys.S_RUN_EPSILON: "1.0"}, "run-epsilon is str"),
        ({keys.S_EPSILON: float("inf")}, "epsilon is not finite"),
        ({keys.S_DELTA: 2.0}, "delta = 2.0 is not in (0, 1)"),
    ],
)
def test_a_malformed_privacy_report_rejects_the_update_not_the_run(
    tmp_path: Path, extra: dict[str, Any], needle: str
) -> None:
    guard = _guard(tmp_path, {11, 12})
    arrays, _ = guard.aggregate_train(
        1,
        [
            _reply(11, _dp_info("site-a", 1.0, 1.0)),
            _reply(12, _dp_info("site-b", 1.0, 1.0, **extra)),
        ],
    )
    assert arrays is not None
    site = guard.record.sites["site-b"]
    assert site.status == "rejected" and needle in (site.reason or ""), site.reason
    build_summary(guard.record)  # the record still makes a valid summary
