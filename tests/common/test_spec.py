"""The dataset spec: valid files load; every kind of mistake names the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from fedcare.common.errors import ConfigError
from fedcare.common.spec import FeatureSchema, SiteSpec, load_site_spec

VALID = {
    "spec_version": 1,
    "site_id": "site-0",
    "patient_id": "pid",
    "ehr": {"table": "ehr.csv", "events": "events.csv"},
    "labels": [{"name": "readmission", "table": "ehr.csv", "column": "readm", "positive": 1}],
    "tasks": [{"name": "readmission", "label": "readmission", "modalities": ["ehr"]}],
    "schema": {
        "ehr": [
            {"name": "age", "kind": "numeric", "unit": "years", "min": 0, "max": 120},
            {"name": "sex", "kind": "categorical", "categories": ["F", "M"]},
            {"name": "diabetes", "kind": "binary"},
        ],
        "events": [{"name": "hr_mean", "code": "HR", "agg": "mean", "unit": "bpm"}],
    },
}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "site.toml"
    path.write_bytes(tomli_w.dumps(data).encode())
    return path


def test_valid_spec_loads_from_file_or_folder(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    spec = load_site_spec(tmp_path)
    assert spec.site_id == "site-0"
    assert spec.modalities == ("ehr",)
    assert [f.name for f in spec.feature_schema.ehr] == ["age", "sex", "diabetes"]
    assert spec.task("readmission").modalities == ("ehr",)


def test_spec_round_trips_through_toml(tmp_path: Path) -> None:
    spec = SiteSpec.model_validate(VALID)
    dumped = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    path = write(tmp_path, dumped)
    assert load_site_spec(path) == spec


def _with(**changes: object) -> dict:
    data = {**VALID, **changes}
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_with(colour="blue"), "field colour: unknown key"),
        (_with(site_id="site 0!"), "field site_id"),
        (_with(ehr=None), "declares no modality"),
        (
            _with(tasks=[{"name": "t", "label": "nope", "modalities": ["ehr"]}]),
            "uses label 'nope'",
        ),
        (
            _with(tasks=[{"name": "t", "label": "readmission", "modalities": ["mri"]}]),
            "field tasks.0.modalities.0",
        ),
        (
            _with(schema={"ehr": [{"name": "sex", "kind": "categorical"}]}),
            "needs a non-empty 'categories'",
        ),
        (
            _with(schema={"ehr": [{"name": "a", "kind": "numeric", "min": 5, "max": 1}]}),
            "min 5.0 is above max 1.0",
        ),
        (_with(imaging={"folder": "img", "labels": "img/labels.csv"}), "[schema.imaging]"),
        (
            _with(
                tasks=[
                    {
                        "name": "t",
                        "label": "readmission",
                        "modalities": ["ehr"],
                        "features": ["bmi"],
                    }
                ]
            ),
            "features not in the schema: bmi",
        ),
    ],
)
def test_invalid_spec_names_file_and_field(tmp_path: Path, data: dict, needle: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_site_spec(path)
    message = str(info.value)
    assert str(path) in message
    assert needle in message


def test_missing_and_malformed_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_site_spec(tmp_path)
    (tmp_path / "site.toml").write_text("site_id = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_site_spec(tmp_path)


def test_schema_fingerprint_tracks_order_and_content() -> None:
    spec = SiteSpec.model_validate(VALID)
    schema = spec.feature_schema
    same = FeatureSchema.model_validate(schema.model_dump())
    assert schema.fingerprint() == same.fingerprint()
    reordered = FeatureSchema.model_validate(
        {**schema.model_dump(), "ehr": list(reversed(schema.model_dump()["ehr"]))}
    )
    assert reordered.fingerprint() != schema.fingerprint()
