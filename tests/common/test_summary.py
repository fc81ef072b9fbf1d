"""summary.json: round trip by alias, strict validation that names file and field, versions."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fedcare.common import keys
from fedcare.common.errors import ConfigError
from fedcare.common.summary import (
    EVALUATION_MODES,
    EVENT_KINDS,
    NOISE_SOURCES,
    OLDER_READABLE_VERSIONS,
    SCHEMA_VERSION,
    SITE_STATUSES,
    RunSummary,
    load_summary,
    write_summary,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "summary-schema.md"

# A hand-written reference summary: one site completed with DP, one refused its budget.
VALID: dict[str, Any] = {
    "schema_version": 5,
    "run_id": "run-7",
    "fedcare_version": "0.1.0",
    "flwr_version": "1.42.0",
    "task": "readmission",
    "strategy": "fedavg",
    "personalization": "fedper",
    "rounds_planned": 3,
    "rounds_completed": 2,
    "sites": [
        {
            "site_id": "site-a",
            "n_train": 120,
            "n_test": 30,
            "status": "completed",
            "reason": None,
            "rounds_participated": [1, 2],
            "privacy": {
                "enabled": True,
                "epsilon": 2.5,
                "run_epsilon": 1.5,
                "delta": 1e-5,
                "accountant": "prv",
                "noise": "os-entropy",
                "evaluation": "dp",
                "mechanisms": [
                    {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8},
                    {"noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 8},
                ],
            },
            "metrics": {"test.auroc": 0.75, "test.n": 30.0},
            "personal_metrics": {"test.auroc": 0.8, "test.n": 30.0},
        },
        {
            "site_id": "site-b",
            "n_train": 0,
            "n_test": 0,
            "status": "refused",
            "reason": "budget: ε would reach 12 > 10",
            "rounds_participated": [],
            "privacy": {
                "enabled": True,
                "epsilon": None,
                "run_epsilon": None,
                "delta": None,
                "accountant": "prv",
                "noise": None,
                "evaluation": None,
                "mechanisms": [],
            },
            "metrics": {},
            "personal_metrics": {},
        },
    ],
    "global": {
        "rounds": [
            {"round": 0, "metrics": {"test.auroc": 0.5}},
            {"round": 1, "metrics": {"test.auroc": 0.7}},
            {"round": 2, "metrics": {"test.auroc": 0.75}},
        ],
        "final": {"test.auroc": 0.75},
        "calibration": [{"bin": 7, "mean_predicted": 0.74, "observed": 0.7, "n": 20.0}],
    },
    "baselines": {
        "local_only": {"site-a": {"test.auroc": 0.7}, "site-b": {"test.auroc": 0.6}},
        "pooled": {"test.auroc": 0.8},
    },
    "events": [
        {"round": 1, "site_id": "site-b", "kind": "refused", "detail": "budget"},
        {"round": 3, "site_id": "*", "kind": "round-skipped", "detail": "too few"},
    ],
    "groups": [{"name": "sex", "column": "sex", "labels": ["F", "M", "unknown"]}],
    "explanation": {
        "round": 3,
        "features": ["ehr:age", "genomics:g1"],
        "modalities": ["ehr", "genomics"],
        "n": 60.0,
        "importance": {"ehr:age": 0.3, "genomics:g1": 0.1},
        "modality_shares": {"ehr": 0.75, "genomics": 0.25},
        "sites": {"site-a": {"ehr:age": 0.28, "genomics:g1": 0.12}},
    },
    "survival": {
        "round": 3,
        "cuts": [365.0, 730.0, 1095.0],
        "time_unit": "days",
        "n": 60.0,
        "at_risk": [60.0, 41.0],
        "events": [12.0, 8.0],
        "observed": [0.8, 0.6439],
        "predicted": [0.82, 0.66, 0.5],
        "sites": {"site-a": {"n": 60.0, "observed": [0.8, 0.6439], "predicted": [0.82, 0.66, 0.5]}},
    },
}


def dump(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def changed(**top: Any) -> dict[str, Any]:
    data = copy.deepcopy(VALID)
    data.update(top)
    return data


def test_write_then_load_round_trips_with_the_global_alias(tmp_path: Path) -> None:
    summary = RunSummary.model_validate(VALID)
    path = tmp_path / "out" / "summary.json"
    write_summary(summary, path)
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert "global" in on_disk and "global_" not in on_disk
    # What is written is exactly the reference (tuples become lists, nothing added or lost).
    assert on_disk == VALID
    assert load_summary(path) == summary
    assert "global" in summary.model_dump() and "global" in summary.model_dump(mode="json")


def test_the_fields_are_exactly_those_of_the_schema() -> None:
    dumped = RunSummary.model_validate(VALID).model_dump()
    assert set(dumped) == {
        "schema_version", "run_id", "fedcare_version", "flwr_version", "task", "strategy",
        "personalization", "rounds_planned", "rounds_completed", "sites", "global",
        "baselines", "events", "groups", "explanation", "survival",
    }  # fmt: skip
    assert set(dumped["sites"][0]) == {
        "site_id", "n_train", "n_test", "status", "reason", "rounds_participated",
        "privacy", "metrics", "personal_metrics",
    }  # fmt: skip
    assert set(dumped["sites"][0]["privacy"]) == {
        "enabled", "epsilon", "run_epsilon", "delta", "accountant", "noise", "evaluation",
        "mechanisms",
    }  # fmt: skip
    assert set(dumped["global"]) == {"rounds", "final", "calibration"}
    assert set(dumped["baselines"]) == {"local_only", "pooled"}
    assert set(SITE_STATUSES) == {
        "completed",
        "refused",
        "failed",
        "diverged",
        "dropped",
        "rejected",
    }
    assert {"refused", "failed", "diverged", "dropped", "rejected"} <= set(EVENT_KINDS)


def test_the_python_attribute_is_global_underscore() -> None:
    summary = RunSummary.model_validate(VALID)
    assert summary.global_.final == {"test.auroc": 0.75}
    assert [r.round for r in summary.global_.rounds] == [0, 1, 2]


def test_the_summary_is_frozen() -> None:
    summary = RunSummary.model_validate(VALID)
    with pytest.raises(ValidationError):
        summary.run_id = "other"  # type: ignore[misc]


def test_rewriting_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old", encoding="utf-8")
    write_summary(RunSummary.model_validate(VALID), path)
    assert json.loads(path.read_text(encoding="utf-8"))["run_id"] == "run-7"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old", encoding="utf-8")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_summary(RunSummary.model_validate(VALID), path)
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(colour="red"), "field colour: unknown key"),
        (lambda d: d["sites"][0]["privacy"].update(sigma=1.0), "field sites.0.privacy.sigma"),
        (lambda d: d["global"].update(best={}), "field global.best: unknown key"),
        (lambda d: d.update({"global_": d.pop("global")}), "field global:"),
    ],
)
def test_an_unknown_key_is_rejected_naming_file_and_field(
    tmp_path: Path, mutate: Any, field: str
) -> None:
    data = copy.deepcopy(VALID)
    mutate(data)
    path = dump(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_summary(path)
    assert str(path) in str(err.value)
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (changed(rounds_planned=0), "field rounds_planned"),
        (changed(run_id=""), "field run_id"),
        (changed(sites="site-a"), "field sites"),
    ],
)
def test_a_wrong_value_names_its_field(tmp_path: Path, data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_summary(dump(tmp_path, data))


def test_an_unknown_status_names_the_site_field(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["sites"][1]["status"] = "crashed"
    with pytest.raises(ConfigError, match=r"field sites\.1\.status"):
        load_summary(dump(tmp_path, data))


@pytest.mark.parametrize("status", ["refused", "dropped", "rejected"])
def test_a_site_that_did_not_complete_must_say_why(tmp_path: Path, status: str) -> None:
    data = copy.deepcopy(VALID)
    data["sites"][1].update(status=status, reason=None)
    with pytest.raises(ConfigError, match=rf"field sites\.1: .*{status}.*reason"):
        load_summary(dump(tmp_path, data))
    data["sites"][1]["reason"] = "no reply within 60 s"
    assert load_summary(dump(tmp_path, data)).sites[1].status == status


def test_non_finite_metrics_are_rejected_since_json_has_no_nan(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["global"]["final"]["test.auroc"] = math.nan
    with pytest.raises(ValidationError):
        RunSummary.model_validate(data)
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(data), encoding="utf-8")  # Python writes the non-JSON NaN
    with pytest.raises(ConfigError, match=r"field global\.final\.test\.auroc"):
        load_summary(path)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["sites"].append(copy.deepcopy(d["sites"][0])), "site-a appears more"),
        (lambda d: d.update(rounds_completed=4), "exceeds rounds_planned"),
        (lambda d: d["survival"].update(observed=[0.8, 1.2]), "survival probabilities"),
        (lambda d: d["survival"].update(events=[12.0]), "1 event and 2 observed"),
        (lambda d: d["survival"].update(predicted=[0.8]), "1 predicted, for 3 cuts"),
        (lambda d: d["global"]["rounds"].reverse(), "distinct and increasing"),
        (lambda d: d["sites"][0].update(rounds_participated=[2, 1]), "rounds_participated"),
        (lambda d: d["sites"][0]["privacy"].update(enabled=False), "enabled is false"),
        (
            lambda d: d["sites"][0]["privacy"].update(
                enabled=False, epsilon=None, mechanisms=[], run_epsilon=None
            ),
            "enabled is false",  # noise is still set: no DP noise without DP
        ),
        (lambda d: d["sites"][0]["privacy"].update(delta=None), "without delta"),
        (
            lambda d: d["sites"][0]["privacy"].update(epsilon=None, delta=None),
            "without delta",  # run_epsilon alone needs its δ as well
        ),
        (lambda d: d["sites"][0]["privacy"].update(run_epsilon=-0.1), "run_epsilon"),
        (lambda d: d["sites"][0]["privacy"].update(noise="seeded"), "privacy.noise"),
        (lambda d: d["sites"][0]["privacy"].update(evaluation="raw"), "privacy.evaluation"),
        (lambda d: d["events"][0].update(kind="exploded"), "field events.0.kind"),
    ],
)
def test_inconsistent_content_is_rejected(tmp_path: Path, mutate: Any, needle: str) -> None:
    data = copy.deepcopy(VALID)
    mutate(data)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_summary(dump(tmp_path, data))


def test_the_current_version_loads_and_a_missing_one_means_it(tmp_path: Path) -> None:
    assert SCHEMA_VERSION == 5
    assert load_summary(dump(tmp_path, VALID)).schema_version == 5
    data = copy.deepcopy(VALID)
    del data["schema_version"]
    assert load_summary(dump(tmp_path, data)).schema_version == SCHEMA_VERSION


def test_a_version_1_file_reads_with_the_new_privacy_fields_unknown(tmp_path: Path) -> None:
    assert OLDER_READABLE_VERSIONS == (1, 2, 3, 4)
    data = copy.deepcopy(VALID)
    data["schema_version"] = 1
    del data["personalization"]
    del data["groups"]
    del data["global"]["calibration"]
    for site in data["sites"]:
        del site["personal_metrics"]
        for name in ("run_epsilon", "noise", "evaluation"):
            del site["privacy"][name]
    summary = load_summary(dump(tmp_path, data))
    assert summary.schema_version == SCHEMA_VERSION
    privacy = summary.sites[0].privacy
    assert privacy.epsilon == 2.5  # the lifetime ε it recorded
    assert (privacy.run_epsilon, privacy.noise, privacy.evaluation) == (None, None, None)


def test_noise_and_evaluation_values_are_the_wire_constants() -> None:
    assert NOISE_SOURCES == (keys.NOISE_OS_ENTROPY, keys.NOISE_REPRODUCIBLE)
    assert EVALUATION_MODES == (keys.EVAL_DP, keys.EVAL_EXACT)


def test_a_site_without_dp_may_still_say_how_it_evaluated(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["sites"][0]["privacy"] = {
        "enabled": False, "epsilon": None, "run_epsilon": None, "delta": None,
        "accountant": None, "noise": None, "evaluation": "exact", "mechanisms": [],
    }  # fmt: skip
    assert load_summary(dump(tmp_path, data)).sites[0].privacy.evaluation == "exact"


def test_a_version_2_file_reads_without_personal_models(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["schema_version"] = 2
    del data["personalization"]
    del data["groups"]
    del data["global"]["calibration"]
    for site in data["sites"]:
        del site["personal_metrics"]
    summary = load_summary(dump(tmp_path, data))
    assert summary.schema_version == SCHEMA_VERSION
    assert summary.personalization == "none"
    assert all(site.personal_metrics == {} for site in summary.sites)


def test_a_version_3_file_reads_without_group_attributes(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["schema_version"] = 3
    del data["groups"]
    del data["global"]["calibration"]
    summary = load_summary(dump(tmp_path, data))
    assert summary.schema_version == SCHEMA_VERSION
    assert summary.groups == () and summary.global_.calibration == ()


def test_a_version_4_file_reads_without_survival_curves(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["schema_version"] = 4
    data.pop("survival", None)
    summary = load_summary(dump(tmp_path, data))
    assert summary.schema_version == SCHEMA_VERSION and summary.survival is None


@pytest.mark.parametrize("version", [6, 0, "1", True])
def test_another_schema_version_is_refused_with_the_fix(tmp_path: Path, version: Any) -> None:
    path = dump(tmp_path, changed(schema_version=version))
    with pytest.raises(ConfigError) as err:
        load_summary(path)
    message = str(err.value)
    assert str(path) in message and "field schema_version" in message
    assert "fedcare that wrote it" in message


def test_a_missing_or_broken_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "summary.json"
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_summary(missing)
    broken = tmp_path / "summary.json"
    broken.write_text('{"run_id": ', encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_summary(broken)
    broken.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(broken))):
        load_summary(broken)


def test_the_documented_example_is_a_valid_summary_and_every_field_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/summary-schema.md needs a ```json example"
    example = RunSummary.model_validate(json.loads(blocks[0]), by_alias=True, by_name=False)
    assert example.schema_version == SCHEMA_VERSION
    dumped = example.model_dump()
    names = set(dumped) | set(dumped["sites"][0]) | set(dumped["sites"][0]["privacy"])
    names |= {"noise_multiplier", "sample_rate", "steps", "local_only", "pooled", "kind"}
    undocumented = sorted(n for n in names if f"`{n}`" not in text)
    assert not undocumented, f"fields missing from docs/summary-schema.md: {undocumented}"
    for status in SITE_STATUSES:
        assert f"`{status}`" in text
