"""Loaders: every format round-trips to the values written; events aggregate as specified."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.client.data.events import aggregate_events, parse_event_times
from fedcare.client.data.fingerprint import dataset_fingerprint
from fedcare.client.data.images import read_image
from fedcare.client.data.loaders import load_ehr, load_genomics, load_images, load_labels, load_site
from fedcare.client.data.tables import binary_label, read_table
from fedcare.common.errors import DataError, DataValidationError
from fedcare.common.spec import EventFeature, SiteSpec
from tests.client.data._builders import (
    EVENT_FEATURES,
    GENES,
    IMAGE_SHAPE,
    BuiltSite,
    build_site,
    edit_csv,
    reference_aggregate,
    write_dicom,
    write_image,
)


def _spec(site: BuiltSite) -> SiteSpec:
    return SiteSpec.model_validate(site.spec)


# ------------------------------------------------------------------------------ tables


def test_read_table_keeps_csv_ids_and_codes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("patient_id,ward,age\n0007,01,41\n0010,10,\n", encoding="utf-8")
    table = read_table(path)
    assert table["patient_id"].tolist() == ["0007", "0010"]
    assert table["ward"].tolist() == ["01", "10"]
    assert table["age"].isna().tolist() == [False, True]


def test_read_table_parquet_integer_ids_become_text(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pd.DataFrame({"pid": [3, 1, 2], "x": [0.5, 1.5, 2.5]}).to_parquet(path, index=False)
    table = read_table(path, id_column="pid")
    assert table["pid"].tolist() == ["3", "1", "2"]
    assert table["x"].tolist() == [0.5, 1.5, 2.5]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("t.xlsx", b"PK\x03\x04", r"t\.xlsx: unsupported table format '\.xlsx'.*CSV.*Parquet"),
        ("t.csv", b"", r"t\.csv: the file is empty.*header row"),
        ("t.parquet", b"not a parquet file at all", r"t\.parquet: cannot be read as Parquet"),
        ("t.csv", b"a,b\n\xff\xfe,1\n", r"t\.csv: not UTF-8.*re-save"),
    ],
)
def test_read_table_errors_name_the_file_and_the_fix(
    tmp_path: Path, name: str, content: bytes, needle: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        read_table(path)


def test_read_table_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_table(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("cells", "positive", "expected"),
    [
        ([1, 0, None, 2], 1, [1.0, 0.0, math.nan, 0.0]),
        (["1", "0", "", "1.0"], 1, [1.0, 0.0, math.nan, 1.0]),
        ([1.0, 0.0, math.nan], "1", [1.0, 0.0, math.nan]),
        (["yes", "No", "YES", None], "yes", [1.0, 0.0, 1.0, math.nan]),
        ([True, False], 1, [1.0, 0.0]),
        (["died", "alive"], "died", [1.0, 0.0]),
    ],
)
def test_binary_label_compares_as_text(cells: list, positive: object, expected: list) -> None:
    got = binary_label(pd.Series(cells, dtype=object), positive)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got, np.array(expected))


# ------------------------------------------------------------------------------ EHR


@pytest.mark.parametrize("ehr_format", ["csv", "parquet"])
def test_ehr_round_trip(tmp_path: Path, ehr_format: str) -> None:
    site = build_site(tmp_path / "s", ehr_format=ehr_format)
    ehr = load_ehr(_spec(site), site.root)
    assert ehr is not None
    assert list(ehr.index) == sorted(site.patient_ids)
    assert list(ehr.columns) == ["age", "bmi", "sex", "ward", "diabetes"] + [
        f["name"] for f in EVENT_FEATURES
    ]
    for pid, row in site.ehr.items():
        for name in ("age", "bmi", "diabetes"):
            written, read = row[name], ehr.at[pid, name]
            assert (math.isnan(written) and math.isnan(read)) or written == read, (pid, name)
        assert ehr.at[pid, "sex"] == row["sex"]
        assert ehr.at[pid, "ward"] == row["ward"]  # "01" keeps its zero
    assert ehr["sex"].dtype == object and ehr["age"].dtype == np.float64
    assert all(isinstance(v, str) for v in ehr["ward"])


@pytest.mark.parametrize("iso_times", [False, True])
def test_event_features_match_the_reference(tmp_path: Path, iso_times: bool) -> None:
    site = build_site(tmp_path / "s", iso_times=iso_times, seed=3)
    ehr = load_ehr(_spec(site), site.root)
    assert ehr is not None
    for pid in site.patient_ids:
        for f in EVENT_FEATURES:
            want, got = site.event_features[pid][f["name"]], ehr.at[pid, f["name"]]
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want), (
                pid,
                f["name"],
            )
    # every patient has HR events; a quarter have no CREAT: count 0 / others NaN checked above
    assert (ehr["hr_count"] >= 1).all()
    assert ehr["creat_last"].isna().any()


def test_count_is_zero_and_others_nan_without_events() -> None:
    events = pd.DataFrame({"patient_id": ["a"], "time": [1.0], "code": ["X"], "value": [5.0]})
    features = [
        EventFeature(name=f"f_{agg}", code="X", agg=agg)
        for agg in ("mean", "min", "max", "last", "count")
    ]
    out = aggregate_events(events, features, patient_ids=["a", "b"])
    assert out.loc["a"].tolist() == [5.0, 5.0, 5.0, 5.0, 1.0]
    assert out.loc["b", "f_count"] == 0.0
    assert out.loc["b"].drop("f_count").isna().all()


def test_event_times_numeric_or_iso() -> None:
    t, bad = parse_event_times(pd.Series(["1.5", "-2", None]))
    assert t[:2].tolist() == [1.5, -2.0] and math.isnan(t[2]) and not bad.any()
    t, bad = parse_event_times(pd.Series(["2021-01-02", "2021-01-01T12:00:00+00:00", "soon"]))
    assert t[0] - t[1] == 12 * 3600
    assert bad.tolist() == [False, False, True]


_event = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.integers(0, 5).map(float),  # few distinct times: ties happen
    st.sampled_from(["X", "Y"]),
    st.one_of(st.just(math.nan), st.floats(-1e6, 1e6, allow_nan=False)),
)


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(_event, max_size=25),
    aggs=st.lists(st.sampled_from(["mean", "min", "max", "last", "count"]), min_size=1, max_size=5),
)
def test_aggregation_matches_a_plain_python_reference(
    events: list[tuple[str, float, str, float]], aggs: list[str]
) -> None:
    features = [{"name": f"f{i}", "code": "XY"[i % 2], "agg": agg} for i, agg in enumerate(aggs)]
    frame = pd.DataFrame(events, columns=["patient_id", "time", "code", "value"]).astype(
        {"patient_id": object, "time": float, "code": object, "value": float}
    )
    patients = ["a", "b", "c", "d"]
    out = aggregate_events(
        frame, [EventFeature.model_validate(f) for f in features], patient_ids=patients
    )
    assert list(out.index) == patients and list(out.columns) == [f["name"] for f in features]
    for pid in patients:
        for f in features:
            want, got = reference_aggregate(events, f, pid), out.at[pid, f["name"]]
            if math.isnan(want):
                assert math.isnan(got), (pid, f)
            else:
                assert got == pytest.approx(want, rel=1e-12, abs=1e-9), (pid, f)


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("kind", ["png8", "png16", "npy", "dcm"])
def test_each_image_format_round_trips(tmp_path: Path, kind: str) -> None:
    ext = {"png8": "png", "png16": "png", "npy": "npy", "dcm": "dcm"}[kind]
    path = tmp_path / f"im.{ext}"
    expected = write_image(path, kind, np.random.default_rng(1))
    got = read_image(path)
    assert got.dtype == np.float32 and got.shape == IMAGE_SHAPE
    np.testing.assert_array_equal(got, expected)


def test_png16_keeps_values_above_255(tmp_path: Path) -> None:
    path = tmp_path / "im.png"
    write_image(path, "png16", np.random.default_rng(0))
    assert read_image(path).max() == 65535.0


def test_dicom_rescale_applied_only_when_present(tmp_path: Path) -> None:
    raw = np.arange(80, dtype=np.uint16).reshape(IMAGE_SHAPE) * 7
    write_dicom(tmp_path / "with.dcm", raw, rescale=True)
    write_dicom(tmp_path / "plain", raw, rescale=False)  # no extension: sniffed as DICOM
    np.testing.assert_array_equal(read_image(tmp_path / "with.dcm"), raw * 0.5 - 10.0)
    np.testing.assert_array_equal(read_image(tmp_path / "plain"), raw.astype(np.float32))


def test_unsupported_image_format_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(DataError, match=r"x\.jpg: unsupported image format '\.jpg'.*\.png"):
        read_image(tmp_path / "x.jpg")


def test_images_loader_maps_patients_to_arrays(written_site: BuiltSite) -> None:
    site = written_site
    images = load_images(_spec(site), site.root)
    assert images is not None and set(images) == set(site.images)
    for pid, expected in site.images.items():
        assert images[pid].dtype == np.float32
        np.testing.assert_array_equal(images[pid], expected)


# ------------------------------------------------------------------------------ genomics, labels


@pytest.mark.parametrize("genomics_format", ["parquet", "csv"])
def test_genomics_round_trip(tmp_path: Path, genomics_format: str) -> None:
    site = build_site(tmp_path / "s", genomics_format=genomics_format)
    genomics = load_genomics(_spec(site), site.root)
    assert genomics is not None
    assert list(genomics.columns) == list(GENES)
    assert list(genomics.index) == sorted(site.genomics)  # patients lacking it: no row
    for pid, values in site.genomics.items():
        assert genomics.loc[pid].tolist() == [values[g] for g in GENES]


def test_labels_positive_matching_and_missing(written_site: BuiltSite) -> None:
    site = written_site
    labels = load_labels(_spec(site), site.root, patient_ids=site.patient_ids)
    assert list(labels.columns) == ["readmission", "finding"]
    for pid in site.patient_ids:
        assert labels.at[pid, "readmission"] == site.labels["readmission"][pid]
        if pid in site.labels["finding"]:  # "YES" counts as "yes"
            assert labels.at[pid, "finding"] == site.labels["finding"][pid]
        else:
            assert math.isnan(labels.at[pid, "finding"])


# ------------------------------------------------------------------------------ load_site


def test_load_site_joins_modalities_by_id(written_site: BuiltSite) -> None:
    site = written_site
    data = load_site(site.root)
    assert data.patient_ids == tuple(sorted(site.patient_ids))
    assert data.spec == _spec(site) and data.root == site.root
    assert data.ehr is not None and data.genomics is not None and data.images is not None
    assert set(data.images) < set(data.patient_ids)  # some patients lack imaging
    assert set(data.genomics.index) < set(data.patient_ids)
    assert list(data.labels.index) == list(data.patient_ids)
    assert data.fingerprint == dataset_fingerprint(data.spec, site.root)
    assert load_site(site.root / "site.toml").fingerprint == data.fingerprint


def test_load_site_refuses_invalid_data_with_every_problem(written_site: BuiltSite) -> None:
    site = written_site
    edit_csv(site.path("ehr.csv"), lambda f: f.assign(age="abc", sex="Q"))
    with pytest.raises(
        DataValidationError, match=r"2 data error.*ehr\.csv.*age.*fedcare data check"
    ) as e:
        load_site(site.root)
    assert {(p.rule, p.column) for p in e.value.problems} == {
        ("not_numeric", "age"),
        ("unknown_category", "sex"),
    }


def test_load_site_accepts_warnings(written_site: BuiltSite) -> None:
    site = written_site
    edit_csv(site.path("ehr.csv"), lambda f: f.assign(unused_column="x"))
    data = load_site(site.root)
    assert data.ehr is not None and "unused_column" not in data.ehr.columns


def test_patient_only_in_a_label_table_joins_the_site(tmp_path: Path) -> None:
    site = build_site(tmp_path / "s")
    site.spec["ehr"]["max_missing_fraction"] = 0.2
    site.spec["labels"].append(
        {"name": "late", "table": "late.csv", "column": "y", "positive": "1"}
    )
    site.write_spec()
    pd.DataFrame({"patient_id": ["0001", "0002", "9999"], "y": ["1", "0", "1"]}).to_csv(
        site.path("late.csv"), index=False
    )
    data = load_site(site.root)
    assert "9999" in data.patient_ids
    assert data.labels.at["9999", "late"] == 1.0 and math.isnan(
        data.labels.at["9999", "readmission"]
    )
    assert data.ehr is not None and "9999" not in data.ehr.index
