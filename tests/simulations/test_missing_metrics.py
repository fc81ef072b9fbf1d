"""A results table never shows a bare "-" for a site's metric without saying why: withheld by
small-count suppression (with k and how to get the value), undefined on that split, or not
evaluated (with the site's reason)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from rich.console import Console

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.summary import RunSummary
from fedcare.models.evaluation import release
from fedcare.simulations.reports import (
    MissingMetric,
    missing_cell,
    missing_metric_notes,
    missing_reason,
)
from fedcare.simulations.runner import CONFIG_NAME, RunOutcome
from fedcare.simulations.simulate_cli import missing_notes, print_results, results_table

FULL = {
    "test.n": 40.0,
    "test.auroc": 0.7,
    "test.balanced_accuracy": 0.66,
    "test.auprc": 0.4,
    "test.brier": 0.2,
}


# ------------------------------------------------------------------ the classification


def test_a_split_a_site_released_nothing_of_is_withheld_not_undefined() -> None:
    # What a site's evaluation really sends (fedcare.models.evaluation.release), as the server keeps
    # it (the release sums dropped): a 6-patient test split leaves no test.* key at all.
    rng = np.random.default_rng(0)
    y = {"val": rng.integers(0, 2, 30), "test": rng.integers(0, 2, 6)}
    p = {split: rng.random(len(v)) for split, v in y.items()}
    wire = release(y, p, noise_multiplier=0.0, generator=None, min_count=10)
    kept = {k: float(v) for k, v in wire.items() if not keys.is_release_metric(k)}
    assert "val.auroc" in kept
    assert missing_reason(kept, "val.auroc", evaluated=True) is None
    assert missing_reason(kept, "test.auroc", evaluated=True) == "withheld"
    assert missing_reason(kept, "test.auroc", evaluated=False) == "withheld"  # val says it did


@pytest.mark.parametrize(
    ("metrics", "evaluated", "reason"),
    [
        (FULL, True, None),
        ({"test.n": 40.0, "test.brier": 0.2}, True, "undefined"),  # one class: no AUROC
        ({"val.n": 30.0, "val.auroc": 0.6}, False, "withheld"),
        ({}, True, "withheld"),  # answered, every split withheld
        ({}, False, "not evaluated"),
    ],
)
def test_missing_reason(metrics: dict[str, float], evaluated: bool, reason: str | None) -> None:
    assert missing_reason(metrics, "test.auroc", evaluated=evaluated) == reason


def test_a_withheld_cell_names_k_when_it_is_known() -> None:
    assert missing_cell("withheld", min_count=10) == "withheld (n<10)"
    assert missing_cell("withheld", min_count=None) == "withheld"
    assert missing_cell("not evaluated", min_count=10) == "not evaluated"
    assert missing_cell(None, min_count=10) == "-"


def test_the_notes_say_which_splits_were_withheld_why_and_how_to_get_them() -> None:
    missing = [
        MissingMetric("site-b", "test", "withheld"),
        MissingMetric("site-b", "test", "withheld"),  # one per metric: merged
        MissingMetric("site-b", "test", "withheld", baseline=True),
        MissingMetric("site-e", "test", "withheld"),
        MissingMetric("site-c", "test", "not evaluated", detail="dropped: no reply"),
        MissingMetric("site-d", "test", "undefined"),
    ]
    notes = missing_metric_notes(missing, min_count=10)
    assert len(notes) == 3
    withheld, undefined, dropped = notes
    assert withheld.startswith(
        "withheld (n<10) at site-b (test, local-only test), site-e (test): fewer than 10 "
        "patients in that split"
    ), withheld
    assert "small-count suppression" in withheld and "k = 10" in withheld
    assert "more patients in the split" in withheld
    assert "site-min-count below 10 (--set site-min-count=N)" in withheld
    assert undefined.startswith("undefined at site-d (test): ") and "one class" in undefined
    assert dropped == "not evaluated at site-c: dropped: no reply"
    assert missing_metric_notes([], min_count=10) == []


def test_without_a_known_k_the_notes_still_say_why() -> None:
    (note,) = missing_metric_notes([MissingMetric("site-b", "test", "withheld")], min_count=None)
    assert note.startswith("withheld at site-b (test): fewer patients than the site's minimum")
    assert "small-count suppression" in note and "a lower site-min-count" in note


# ------------------------------------------------------------------------ the table


def _site(site_id: str, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    evaluation = extra.pop("evaluation", "dp")
    privacy = {
        "enabled": True, "epsilon": 2.0, "run_epsilon": 2.0, "delta": 1e-5,
        "accountant": "prv", "noise": "os-entropy", "evaluation": evaluation,
    }  # fmt: skip
    site = {"site_id": site_id, "n_train": 40, "n_test": int(metrics.get("test.n", 0))}
    return {**site, "status": "completed", "privacy": privacy, "metrics": metrics, **extra}


def _summary() -> RunSummary:
    val = {"val.n": 30.0, "val.auroc": 0.6}
    return RunSummary.model_validate(
        {
            "run_id": "r1",
            "fedcare_version": "0",
            "flwr_version": "1.42.0",
            "task": "readmission",
            "strategy": "fedavg",
            "rounds_planned": 2,
            "rounds_completed": 2,
            "sites": [
                _site("site-a", FULL),
                _site("site-b", val),  # its test split was withheld
                _site(
                    "site-c",
                    {},
                    evaluation=None,
                    status="dropped",
                    reason="no reply within the round timeout (60 s)",
                ),
                _site("site-d", {"test.n": 12.0, "test.brier": 0.1}),  # one class
                _site("site-e", {}),  # answered, every split withheld
                _site("site-f", {}, evaluation=None),  # its evaluation failed
            ],
            "global": {"final": FULL},
            "baselines": {
                "local_only": {"site-a": {"test.auroc": 0.65}, "site-b": val},
                "pooled": {"test.auroc": 0.8},
            },
            "events": [
                {"round": 2, "site_id": "site-f", "kind": "evaluate-failed", "detail": "boom"}
            ],
        }
    )


def _write_config(run_dir: Path, min_count: int) -> None:
    federation = FederationConfig.from_run_config({"site-min-count": min_count})
    (run_dir / CONFIG_NAME).write_text(
        tomli_w.dumps({"federation": federation.to_run_config()}), encoding="utf-8"
    )


def _rows(outcome: RunOutcome) -> dict[str, str]:
    console = Console(width=250, record=True)
    console.print(results_table(outcome))
    lines = console.export_text().splitlines()
    return {site: next(line for line in lines if f" {site} " in line) for site in _SITES}


_SITES = ("site-a", "site-b", "site-c", "site-d", "site-e", "site-f", "federated (global)")


def test_each_missing_cell_says_why(tmp_path: Path) -> None:
    _write_config(tmp_path, 10)
    rows = _rows(RunOutcome(tmp_path, _summary()))
    assert "0.700" in rows["site-a"] and "0.650" in rows["site-a"]
    assert rows["site-b"].count("withheld (n<10)") == 5, rows["site-b"]  # 4 + local-only
    assert rows["site-c"].count("not evaluated") == 4, rows["site-c"]
    assert rows["site-d"].count("undefined") == 3 and "0.100" in rows["site-d"], rows["site-d"]
    assert rows["site-e"].count("withheld (n<10)") == 4, rows["site-e"]
    assert rows["site-f"].count("not evaluated") == 4, rows["site-f"]
    for site in ("site-b", "site-d", "site-e"):  # only "not run" baselines keep the dash
        assert rows[site].rstrip(" │").endswith("-") == (site != "site-b"), rows[site]


def test_the_printed_results_explain_the_missing_cells(tmp_path: Path) -> None:
    _write_config(tmp_path, 5)
    console = Console(width=250, record=True)
    print_results(console, RunOutcome(tmp_path, _summary()))
    text = console.export_text()
    assert "withheld (n<5) at site-b (test, local-only test), site-e (test): fewer than 5" in text
    assert "k = 5" in text and "--set site-min-count=N" in text
    assert "undefined at site-d (test)" in text
    assert "not evaluated at site-c: dropped: no reply within the round timeout (60 s)" in text
    assert "not evaluated at site-f: its evaluation failed in round 2: boom" in text


def test_a_run_dir_without_its_config_still_says_withheld(tmp_path: Path) -> None:
    outcome = RunOutcome(tmp_path, _summary())
    assert "withheld" in _rows(outcome)["site-b"] and "(n<" not in _rows(outcome)["site-b"]
    assert "the site's minimum count k" in missing_notes(outcome)[0]


def test_nothing_missing_adds_no_note(tmp_path: Path) -> None:
    summary = _summary()
    complete = summary.model_copy(
        update={"sites": summary.sites[:1], "events": ()}  # site-a only: every value there
    )
    assert missing_notes(RunOutcome(tmp_path, complete)) == []
