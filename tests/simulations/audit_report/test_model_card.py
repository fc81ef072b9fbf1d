"""The model card (``fedcare report model``): every number it shows is the run's, printed as
the page prints numbers; sections appear only where the run has their data; the audit report
links to the card; the command never replaces another file of the run.

The summary here is written by hand and the expected strings are literal (three decimals).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedcare.common.errors import ConfigError
from fedcare.common.run_record import RunRecord, write_run_record
from fedcare.common.summary import RunSummary, write_summary
from fedcare.simulations.audit.model_card import (
    SECTIONS,
    CardInputs,
    CardSection,
    build_model_card,
)
from fedcare.simulations.audit.model_card_cli import report_model
from fedcare.simulations.audit.report_cli import audit_report
from tests.simulations.audit_report._dom import section_rows, section_text

SITE_METRICS = {
    "test.auroc": 0.712345,
    "test.brier": 0.181234,
    "test.n": 41.0,
    "val.n": 39.0,
    "test.group.sex.0.n": 20.0,
    "test.group.sex.0.auroc": 0.6,
    "test.group.sex.1.n": 21.0,
    "test.group.sex.1.auroc": 0.8,
    "test.gap.sex.auroc": 0.2,
    "test.gap.sex.tpr": 0.1234,
}
GLOBAL = {
    "test.auroc": 0.734567,
    "test.auprc": 0.401234,
    "test.brier": 0.170001,
    "test.n": 82.0,
    "test.threshold": 0.3,
    "test.group.sex.0.n": 40.0,
    "test.group.sex.0.auroc": 0.651234,
    "test.group.sex.0.tpr": 0.55,
    "test.group.sex.0.fpr": 0.25,
    "test.group.sex.0.ece": 0.0812,
    "test.group.sex.0.mean_predicted": 0.31,
    "test.group.sex.0.observed": 0.25,
    "test.group.sex.0.calibration_error": 0.06,
    "test.group.sex.1.n": 42.0,
    "test.group.sex.1.auroc": 0.801234,
    "test.group.sex.1.tpr": 0.7,
    "test.group.sex.1.fpr": 0.2,
    "test.group.sex.1.ece": 0.0511,
    "test.group.sex.1.mean_predicted": 0.3,
    "test.group.sex.1.observed": 0.33,
    "test.group.sex.1.calibration_error": -0.03,
    "test.gap.sex.auroc": 0.15,
    "test.gap.sex.tpr": 0.15,
    "test.gap.sex.fpr": 0.05,
    "test.gap.sex.ece": 0.0301,
    "test.gap.sex.calibration_error": 0.09,
}
SUMMARY: dict[str, Any] = {
    "schema_version": 5,
    "run_id": "card-run",
    "fedcare_version": "0.1.0",
    "flwr_version": "1.42.0",
    "task": "readmission",
    "strategy": "fedavg",
    "personalization": "finetune",
    "rounds_planned": 2,
    "rounds_completed": 2,
    "sites": [
        {
            "site_id": "site-0",
            "n_train": 143,
            "n_test": 41,
            "status": "completed",
            "rounds_participated": [1, 2],
            "privacy": {
                "enabled": True,
                "epsilon": 7.98765,
                "run_epsilon": 3.21234,
                "delta": 1e-5,
                "accountant": "prv",
                "noise": "os-entropy",
                "evaluation": "dp",
                "mechanisms": [{"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8}],
            },
            "metrics": SITE_METRICS,
            "personal_metrics": {"test.auroc": 0.755555, "test.n": 41.0},
        },
        {
            "site_id": "site-1",
            "n_train": 0,
            "n_test": 0,
            "status": "refused",
            "reason": "budget",
            "privacy": {"enabled": False},
        },
    ],
    "global": {
        "rounds": [{"round": 2, "metrics": GLOBAL}],
        "final": GLOBAL,
        "calibration": [
            {"bin": 1, "mean_predicted": 0.141234, "observed": 0.12, "n": 30.0},
            {"bin": 4, "mean_predicted": 0.44, "observed": 0.52, "n": 52.0},
        ],
    },
    "baselines": {
        "local_only": {"site-0": {"test.auroc": 0.633333}},
        "pooled": {"test.auroc": 0.81},
    },
    "events": [],
    "groups": [{"name": "sex", "column": "sex", "labels": ["F", "M", "unknown"]}],
}


def _record() -> RunRecord:
    return RunRecord.start(
        run_id="card-run",
        task="readmission",
        model="ehr_mlp",
        strategy="fedavg",
        personalization="finetune",
        rounds_planned=2,
        config={"dp": True},
    )


def _card(data: dict[str, Any] = SUMMARY) -> str:
    return build_model_card(CardInputs(summary=RunSummary.model_validate(data), record=_record()))


def test_every_section_shows_the_runs_numbers() -> None:
    page = _card()
    assert "Model ehr_mlp" in section_text(page, "model")
    assert section_rows(page, "data")[1:] == [
        ["site-0", "completed", "143", "39", "41", "dp"],
        ["site-1", "refused", "0", "withheld", "withheld", "—"],
    ]
    performance = section_rows(page, "performance")
    assert performance[0] == ["Model", "auroc", "auprc", "brier", "n", "threshold"]
    assert performance[1:] == [
        ["global model (federated)", "0.735", "0.401", "0.170", "82", "0.300"],
        ["global model on site-0", "0.712", "—", "0.181", "41", "—"],
        ["personalized, site-0", "0.756", "—", "—", "41", "—"],
        ["local-only, site-0", "0.633", "—", "—", "—", "—"],
        ["pooled, non-private", "0.810", "—", "—", "—", "—"],
    ]
    assert section_rows(page, "calibration")[1:] == [
        ["0.1–0.2", "0.141", "0.120", "30"],
        ["0.4–0.5", "0.440", "0.520", "52"],
    ]
    groups = section_rows(page, "groups")
    assert ["F", "40", "0.651", "0.550", "0.250", "0.081", "0.310", "0.250", "+0.060"] in groups
    assert ["M", "42", "0.801", "0.700", "0.200", "0.051", "0.300", "0.330", "-0.030"] in groups
    assert ["largest gap", "", "0.150", "0.150", "0.050", "0.030", "—", "—", "0.090"] in groups
    assert ["site-0", "sex", "0.200", "0.123", "—", "—", "—"] in groups
    assert section_rows(page, "privacy")[1:] == [
        ["site-0", "on", "3.212", "7.988", "1e-05", "prv", "os-entropy", "dp"],
        ["site-1", "off", "off", "off", "—", "—", "—", "—"],
    ]
    assert "<script" not in page and "http" not in page.split("</head>")[1]


def test_a_section_the_run_has_no_data_for_is_left_out() -> None:
    data = copy.deepcopy(SUMMARY)
    data["groups"] = []
    data["global"]["calibration"] = []
    page = _card(data)
    assert 'id="groups"' not in page and 'id="calibration"' not in page
    assert 'id="privacy"' in page


def test_a_new_section_is_one_entry() -> None:
    extra = CardSection("attributions", "Feature attributions", lambda card: "<p>age 0.4</p>")
    absent = CardSection("survival", "Survival curves", lambda card: None)
    page = build_model_card(
        CardInputs(summary=RunSummary.model_validate(SUMMARY), record=_record()),
        sections=(*SECTIONS, extra, absent),
    )
    assert section_text(page, "attributions") == "Feature attributions age 0.4"
    assert 'id="survival"' not in page


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    write_summary(RunSummary.model_validate(SUMMARY), run / "summary.json")
    write_run_record(run / "server_record.json", _record())
    return run


def test_the_command_writes_the_card_beside_the_run_and_never_replaces_its_files(
    tmp_path: Path,
) -> None:
    run = _run_dir(tmp_path)
    report_model(run, None)
    card = run / "model_card.html"
    assert card.stat().st_mode & 0o777 == 0o600
    assert "Model card: readmission (card-run)" in card.read_text(encoding="utf-8")
    report_model(run, None)  # an earlier card is replaced
    before = (run / "summary.json").read_bytes()
    with pytest.raises(ConfigError, match="a file of the run"):
        report_model(run, run / "summary.json")
    assert (run / "summary.json").read_bytes() == before
    with pytest.raises(ConfigError, match="no such run directory"):
        report_model(tmp_path / "nope", tmp_path / "card.html")


def test_the_audit_report_links_to_the_card_where_one_exists(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    out = tmp_path / "reports" / "audit.html"
    audit_report(run, out)
    assert 'id="model-card-link"' not in out.read_text(encoding="utf-8")
    report_model(run, None)
    audit_report(run, out)
    page = out.read_text(encoding="utf-8")
    assert '<a href="../run/model_card.html">' in page
    assert (out.parent / "../run/model_card.html").resolve() == (run / "model_card.html")
    json.loads((run / "summary.json").read_text(encoding="utf-8"))  # untouched, still JSON
