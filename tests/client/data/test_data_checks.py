"""Validation: each rule catches its broken input with a clear message; all at once."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedcare.client.data.data_checks import (
    PROBLEMS_PER_GROUP,
    ROWS_SHOWN,
    RULES,
    DataProblem,
    validate_site,
)
from tests.client.data._builders import BuiltSite, build_site, edit_csv


def test_the_valid_fixture_has_no_problem(written_site: BuiltSite) -> None:
    report = validate_site(written_site.root)
    assert report.problems == ()
    assert report.ok
    s = report.summary
    assert s.site_id == "site-0" and s.patients == 12
    assert s.modalities == {
        "ehr": 12,
        "imaging": len(written_site.images),
        "genomics": len(written_site.genomics),
    }
    readm = written_site.labels["readmission"]
    assert s.labels["readmission"] == (int(sum(readm.values())), len(readm))


def test_parquet_and_iso_variants_are_valid_too(tmp_path: Path) -> None:
    site = build_site(tmp_path / "s", ehr_format="parquet", genomics_format="csv", iso_times=True)
    assert validate_site(site.root).problems == ()


# ------------------------------------------------------------------------------ mutations


def _cell(file: str, column: str, row: int, value: str) -> Callable[[BuiltSite], None]:
    """Set data row ``row`` (1-based) of ``column`` to ``value``."""

    def mutate(site: BuiltSite) -> None:
        def change(f: pd.DataFrame) -> pd.DataFrame:
            f.loc[row - 1, column] = value
            return f

        edit_csv(site.path(file), change)

    return mutate


def _csv(file: str, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[BuiltSite], None]:
    return lambda site: edit_csv(site.path(file), change)


def _genomics(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[BuiltSite], None]:
    def mutate(site: BuiltSite) -> None:
        path = site.path("genomics.parquet")
        change(pd.read_parquet(path)).to_parquet(path, index=False)

    return mutate


def _spec(change: Callable[[dict], None]) -> Callable[[BuiltSite], None]:
    def mutate(site: BuiltSite) -> None:
        change(site.spec)
        site.write_spec()

    return mutate


def _image(kind: str) -> Callable[[BuiltSite], str]:
    """Path under the site of the first image whose file has ``kind``'s extension."""

    def find(site: BuiltSite) -> str:
        return next(f"imaging/{name}" for name in site.image_files.values() if name.endswith(kind))

    return find


def _truncate_png(site: BuiltSite) -> None:
    path = site.path(_image(".png")(site))
    path.write_bytes(path.read_bytes()[:60])


def _wrong_shape_npy(site: BuiltSite) -> None:
    np.save(site.path(_image(".npy")(site)), np.zeros((10, 8), dtype=np.float32))


def _inf_npy(site: BuiltSite) -> None:
    image = np.ones((8, 10), dtype=np.float32)
    image[2, 3] = np.inf
    np.save(site.path(_image(".npy")(site)), image)


def _rgb_png(site: BuiltSite) -> None:
    Image.new("RGB", (10, 8), (10, 20, 30)).save(site.path(_image(".png")(site)))


def _garbage_dicom(site: BuiltSite) -> None:
    site.path(_image(".dcm")(site)).write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")


def _delete_image(site: BuiltSite) -> None:
    site.path(_image(".png")(site)).unlink()


def _empty_everything(site: BuiltSite) -> None:
    for file in ("ehr.csv", "events.csv", "imaging/labels.csv"):
        edit_csv(site.path(file), lambda f: f.iloc[0:0])
    _genomics(lambda f: f.iloc[0:0])(site)


def _cut_last_row(file: str) -> Callable[[BuiltSite], None]:
    """Cut the file inside its last row, after its second field."""

    def mutate(site: BuiltSite) -> None:
        path = site.path(file)
        text = path.read_text()
        last = text.rstrip("\n").rsplit("\n", 1)[1]
        start = len(text.rstrip("\n")) - len(last)
        second_comma = last.index(",", last.index(",") + 1)
        path.write_text(text[: start + second_comma])

    return mutate


def _semicolons(file: str) -> Callable[[BuiltSite], None]:
    def mutate(site: BuiltSite) -> None:
        frame = pd.read_csv(site.path(file), dtype=str, keep_default_na=False)
        frame.to_csv(site.path(file), index=False, sep=";")

    return mutate


def _no_final_newline(site: BuiltSite) -> None:
    path = site.path("events.csv")
    path.write_text(path.read_text().rstrip("\n"))


def _few_images(site: BuiltSite) -> None:
    edit_csv(site.path("imaging/labels.csv"), lambda f: f.iloc[:3])  # 3 of 12: 75% lack it


def _genomics_stranger(site: BuiltSite) -> None:
    _genomics(lambda f: pd.concat([f, f.iloc[:1].assign(patient_id="9999")]))(site)


@dataclass(frozen=True)
class Case:
    """A broken input and the problem it must produce."""

    mutate: Callable[[BuiltSite], object]
    rule: str
    file: str
    column: str | None
    message: str  # regex searched in the message
    row: int | None = None
    severity: str = "error"
    also: frozenset[str] = frozenset()  # other rules the mutation legitimately triggers
    build: tuple[tuple[str, object], ...] = ()  # build_site options of the valid site


CASES: dict[str, Case] = {
    "spec invalid field": Case(
        _spec(lambda s: s["schema"]["ehr"][0].update(min=200)),
        "spec",
        "site.toml",
        "schema.ehr.0",
        r"min 200.0 is above max 120",
    ),
    "spec unknown key": Case(
        _spec(lambda s: s.update(colour="blue")), "spec", "site.toml", "colour", r"unknown key"
    ),
    "spec not toml": Case(
        lambda site: site.path("site.toml").write_text("site_id = [unclosed"),
        "spec",
        "site.toml",
        None,
        r"not valid TOML",
    ),
    "spec missing": Case(
        lambda site: site.path("site.toml").unlink(), "spec", "site.toml", None, r"no site\.toml in"
    ),
    "missing file": Case(
        lambda site: site.path("genomics.parquet").unlink(),
        "missing_file",
        "genomics.parquet",
        None,
        r"file not found",
    ),
    "unreadable table": Case(
        lambda site: site.path("genomics.parquet").write_bytes(b"PAR1 nonsense"),
        "unreadable_file",
        "genomics.parquet",
        None,
        r"cannot be read as Parquet",
    ),
    "missing column": Case(
        _csv("ehr.csv", lambda f: f.drop(columns=["age"])),
        "missing_column",
        "ehr.csv",
        "age",
        r"no column 'age'",
    ),
    "missing id column": Case(
        _csv("events.csv", lambda f: f.rename(columns={"patient_id": "patientid"})),
        "missing_column",
        "events.csv",
        "patient_id",
        r"no patient-id column 'patient_id' \(did you mean 'patientid'\?\)",
    ),
    "missing event column": Case(
        _csv("events.csv", lambda f: f.drop(columns=["code"])),
        "missing_column",
        "events.csv",
        "code",
        r"no column 'code'",
        also=frozenset({"event_code_absent"}),
    ),
    "missing label column": Case(
        _csv("imaging/labels.csv", lambda f: f.drop(columns=["finding"])),
        "missing_column",
        "imaging/labels.csv",
        "finding",
        r"label 'finding' reads it",
    ),
    "missing image file column": Case(
        _csv("imaging/labels.csv", lambda f: f.rename(columns={"file": "path"})),
        "missing_column",
        "imaging/labels.csv",
        "file",
        r"no column 'file'",
        also=frozenset({"extra_column"}),
    ),
    "missing genes": Case(
        _genomics(lambda f: f.drop(columns=["TP53", "KRAS"])),
        "missing_column",
        "genomics.parquet",
        "TP53",
        r"2 schema gene/variants have no column: TP53, KRAS",
    ),
    "extra column": Case(
        _csv("ehr.csv", lambda f: f.assign(shoe_size="42")),
        "extra_column",
        "ehr.csv",
        None,
        r"1 column not in the schema will be ignored: shoe_size",
        severity="warning",
    ),
    "not numeric": Case(
        _cell("ehr.csv", "age", 3, "abc"),
        "not_numeric",
        "ehr.csv",
        "age",
        r"column 'age' is numeric but has 1 non-numeric cell: row 3 \('abc'\)",
        row=3,
    ),
    "not numeric genomics": Case(
        _genomics(lambda f: f.astype({"EGFR": object}).assign(EGFR=["high"] * len(f))),
        "not_numeric",
        "genomics.parquet",
        "EGFR",
        r"'EGFR' is numeric but has 10 non-numeric cells: rows 1 \('high'\)",
        row=1,
    ),
    "out of range": Case(
        _cell("ehr.csv", "age", 2, "150"),
        "out_of_range",
        "ehr.csv",
        "age",
        r"allows \[0, 120\] but 1 value falls outside: row 2 \('150'\)",
        row=2,
    ),
    "genomics out of range": Case(
        _genomics(lambda f: f.assign(BRCA1=-1.0)),
        "out_of_range",
        "genomics.parquet",
        "BRCA1",
        r"allows \[0, inf\] but 10 values fall outside",
        row=1,
    ),
    "unknown category": Case(
        _cell("ehr.csv", "sex", 4, "female"),
        "unknown_category",
        "ehr.csv",
        "sex",
        r"takes F, M but 1 cell holds other values: row 4 \('female'\)",
        row=4,
    ),
    "category keeps leading zero": Case(
        _cell("ehr.csv", "ward", 1, "1"),
        "unknown_category",
        "ehr.csv",
        "ward",
        r"takes 01, 02, 10 .*\('1'\)",
        row=1,
    ),
    "binary not 0/1": Case(
        _cell("ehr.csv", "diabetes", 5, "2"),
        "not_binary",
        "ehr.csv",
        "diabetes",
        r"binary but 1 cell is not 0 or 1: row 5 \('2'\)",
        row=5,
    ),
    "inf in ehr": Case(
        _cell("ehr.csv", "bmi", 6, "inf"),
        "non_finite",
        "ehr.csv",
        "bmi",
        r"1 infinite value: row 6",
        row=6,
    ),
    "inf in genomics": Case(
        _genomics(lambda f: f.assign(KRAS=[*f["KRAS"][:-1], -np.inf])),
        "non_finite",
        "genomics.parquet",
        "KRAS",
        r"infinite",
        row=10,
    ),
    "inf pixel": Case(
        _inf_npy, "non_finite", "imaging/labels.csv", "file", r"NaN or infinite pixels"
    ),
    "duplicate id": Case(
        _csv("ehr.csv", lambda f: pd.concat([f, f.iloc[[2]]], ignore_index=True)),
        "duplicate_id",
        "ehr.csv",
        "patient_id",
        r"1 row repeats a patient id already seen.*row 13 \('0003'\)",
        row=13,
    ),
    "missing id": Case(
        _cell("genomics.csv", "patient_id", 2, ""),
        "missing_id",
        "genomics.csv",
        "patient_id",
        r"1 row has no patient id: row 2",
        row=2,
        build=(("genomics_format", "csv"),),
    ),
    "one-class label": Case(
        _csv("ehr.csv", lambda f: f.assign(readmission_30d="0")),
        "label_classes",
        "ehr.csv",
        "readmission_30d",
        r"label 'readmission' has one class only: all 12 .* negative",
    ),
    "no labelled patient": Case(
        _csv("imaging/labels.csv", lambda f: f.assign(finding="")),
        "label_classes",
        "imaging/labels.csv",
        "finding",
        r"label 'finding': no patient has a value",
    ),
    "path leaves the site": Case(
        _spec(lambda s: s["ehr"].update(events="../site-0/events.csv")),
        "outside_site",
        "site.toml",
        "ehr.events",
        r"ehr\.events = '\.\./site-0/events\.csv' climbs out of the site folder with '\.\.'",
    ),
    "last row cut short": Case(
        _cut_last_row("events.csv"),
        "torn_row",
        "events.csv",
        None,
        r"the last row \(line \d+\) has 2 of the header's 4 fields: the file looks cut off",
    ),
    "semicolon-separated": Case(
        _semicolons("ehr.csv"),
        "separator",
        "ehr.csv",
        None,
        r"the file looks ';'-separated",
    ),
    "no final newline": Case(
        _no_final_newline,
        "no_final_newline",
        "events.csv",
        None,
        r"does not end with a newline, so its last row \(data row \d+\) may have been cut",
        severity="warning",
    ),
    "image path leaves the site": Case(
        _cell("imaging/labels.csv", "file", 1, "../../outside.png"),
        "image_outside",
        "imaging/labels.csv",
        "file",
        r"1 image is refused .*: row 1: '\.\./outside\.png' climbs out of the site folder",
        row=1,
    ),
    "image listed but absent": Case(
        _delete_image,
        "image_missing",
        "imaging/labels.csv",
        "file",
        r"1 image is listed but absent from 'imaging': row \d+: 'imaging/scans/\d+\.png'",
    ),
    "truncated png": Case(
        _truncate_png,
        "image_unreadable",
        "imaging/labels.csv",
        "file",
        r"1 image is unreadable: row \d+: imaging/scans/\d+\.png: cannot read the image",
    ),
    "colour png": Case(
        _rgb_png, "image_unreadable", "imaging/labels.csv", "file", r"mode RGB.*greyscale"
    ),
    "corrupt dicom": Case(
        _garbage_dicom,
        "image_unreadable",
        "imaging/labels.csv",
        "file",
        r"\d+\.dcm: cannot read the image",
    ),
    "wrong-shape npy": Case(
        _wrong_shape_npy,
        "image_shape",
        "imaging/labels.csv",
        "file",
        r"1 image does not have the schema's shape 8x10: row \d+: '.*\.npy' is 10x8",
    ),
    "empty site": Case(
        _empty_everything,
        "empty_site",
        "site.toml",
        None,
        r"the site has no patient",
        also=frozenset({"label_classes", "event_code_absent"}),
    ),
    "imaging coverage": Case(
        _few_images,
        "coverage",
        "site.toml",
        "imaging.max_missing_fraction",
        r"imaging covers 3 of 12 patients \(75% lack it; .*allows 50%\)",
    ),
    "ehr coverage": Case(
        _genomics_stranger,
        "coverage",
        "site.toml",
        "ehr.max_missing_fraction",
        r"ehr covers 12 of 13 patients",
    ),
    "event time": Case(
        _cell("events.csv", "time", 2, "yesterday"),
        "event_time",
        "events.csv",
        "time",
        r"1 time cannot be parsed as a number or an ISO-8601 datetime: row 2 \('yesterday'\)",
        row=2,
    ),
    "event time iso": Case(
        _cell("events.csv", "time", 4, "2021-13-45"),
        "event_time",
        "events.csv",
        "time",
        r"1 time cannot be parsed .*: row 4 \('2021-13-45'\)",
        row=4,
        build=(("iso_times", True),),
    ),
    "event without time": Case(
        _cell("events.csv", "time", 3, ""),
        "event_time",
        "events.csv",
        "time",
        r"1 event has no time: row 3",
        row=3,
    ),
    "event value": Case(
        _cell("events.csv", "value", 4, "high"),
        "event_value",
        "events.csv",
        "value",
        r"column 'value' has 1 non-numeric value: row 4 \('high'\)",
        row=4,
    ),
    "event without code": Case(
        _cell("events.csv", "code", 1, ""),
        "event_code",
        "events.csv",
        "code",
        r"1 event has no code: row 1",
        row=1,
    ),
    "event inf": Case(
        _cell("events.csv", "value", 5, "-inf"),
        "non_finite",
        "events.csv",
        "value",
        r"1 event value is infinite: row 5",
        row=5,
    ),
    "event out of range": Case(
        _csv("events.csv", lambda f: f.assign(value=f["value"].where(f["code"] != "HR", "400"))),
        "out_of_range",
        "events.csv",
        "value",
        r"code 'HR' .*allows \[20, 250\]",
    ),
    "event unknown patient": Case(
        _csv(
            "events.csv",
            lambda f: pd.concat(
                [
                    f,
                    pd.DataFrame(
                        [{"patient_id": "7777", "time": "1", "code": "HR", "value": "70"}]
                    ),
                ],
                ignore_index=True,
            ),
        ),
        "event_unknown_patient",
        "events.csv",
        "patient_id",
        r"1 event of 1 patient absent from ehr\.csv will be ignored",
        severity="warning",
    ),
    "event code absent": Case(
        _csv("events.csv", lambda f: f[f["code"] != "CREAT"]),
        "event_code_absent",
        "events.csv",
        "code",
        r"no event has code 'CREAT'",
        severity="warning",
    ),
    "timeline code absent": Case(
        _spec(
            lambda s: s["schema"].update(
                timelines=[
                    {
                        "name": "t",
                        "codes": [{"code": "LACTATE"}],
                        "max_length": 4,
                        "time_unit": "days",
                    }
                ]
            )
        ),
        "timeline_code_absent",
        "events.csv",
        "code",
        r"no event has code\(s\) 'LACTATE', which timeline 't' keeps",
        severity="warning",
    ),
}


@pytest.mark.filterwarnings("ignore:.*VR.*:UserWarning")  # pydicom, on the corrupt file
@pytest.mark.parametrize("name", list(CASES))
def test_each_rule_catches_its_broken_input(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    site = build_site(tmp_path / "site-0", **dict(case.build))  # type: ignore[arg-type]
    case.mutate(site)
    report = validate_site(site.root)
    matching = [
        p
        for p in report.problems
        if p.rule == case.rule
        and p.file == case.file
        and p.column == case.column
        and re.search(case.message, p.message)
    ]
    assert matching, "\n".join(map(str, report.problems))
    problem = matching[0]
    assert problem.severity == case.severity
    assert problem.fix and problem.message
    if case.row is not None:
        assert problem.row == case.row
    # nothing else is reported: the mutation alone causes what the report says
    assert {p.rule for p in report.problems} <= {case.rule} | case.also, report.problems
    assert report.ok == (case.severity == "warning")


def test_every_rule_has_a_case() -> None:
    covered = {c.rule for c in CASES.values()}
    assert set(RULES) - covered == {"more"}  # "more" is covered by the capping test


def test_several_problems_are_all_reported_at_once(written_site: BuiltSite) -> None:
    site = written_site
    _cell("ehr.csv", "age", 3, "abc")(site)
    _cell("ehr.csv", "sex", 4, "female")(site)
    _cell("events.csv", "time", 2, "yesterday")(site)
    _wrong_shape_npy(site)
    _genomics(lambda f: f.assign(BRCA1=-1.0))(site)
    _spec(lambda s: s["labels"][0].update(column="readmit"))(site)
    report = validate_site(site.root)
    assert {(p.rule, p.file) for p in report.errors} == {
        ("not_numeric", "ehr.csv"),
        ("unknown_category", "ehr.csv"),
        ("event_time", "events.csv"),
        ("image_shape", "imaging/labels.csv"),
        ("out_of_range", "genomics.parquet"),
        ("missing_column", "ehr.csv"),
    }
    # the now-unread label column is reported as extra, not silently used
    assert [p.rule for p in report.warnings] == ["extra_column"]


def test_spec_errors_give_one_problem_per_field(written_site: BuiltSite) -> None:
    site = written_site
    site.spec["site_id"] = "bad id!"
    site.spec["ehr"]["max_missing_fraction"] = 2.0
    site.spec["imaging"]["colour"] = "grey"
    site.write_spec()
    report = validate_site(site.root)
    assert sorted(p.column or "" for p in report.problems) == [
        "ehr.max_missing_fraction",
        "imaging.colour",
        "site_id",
    ]
    assert all(p.rule == "spec" and p.file == "site.toml" for p in report.problems)


def test_a_million_row_style_report_stays_readable(tmp_path: Path) -> None:
    site = build_site(tmp_path / "s", n=12)
    n = 3000
    big = pd.DataFrame(
        {
            "patient_id": [f"{i:05d}" for i in range(n)],
            "age": ["abc"] * n,
            "bmi": ["25"] * n,
            "sex": ["F"] * n,
            "ward": ["01"] * n,
            "diabetes": ["1", "0"] * (n // 2),
            "readmission_30d": ["1", "0"] * (n // 2),
            **{f"extra{k}": ["1"] * n for k in range(3)},
        }
    )
    big.to_csv(site.path("ehr.csv"), index=False)
    # many genomics columns, each with a problem: the group is capped
    genes = [f"G{k}" for k in range(PROBLEMS_PER_GROUP + 7)]
    site.spec["schema"]["genomics"]["features"] = genes
    site.spec["schema"]["genomics"].pop("min")
    site.spec["ehr"]["max_missing_fraction"] = 1.0
    site.spec["genomics"]["max_missing_fraction"] = 1.0
    site.spec["imaging"]["max_missing_fraction"] = 1.0
    site.write_spec()
    pd.DataFrame({"patient_id": ["00001", "00002"], **{g: ["x", "1"] for g in genes}}).to_parquet(
        site.path("genomics.parquet"), index=False
    )
    report = validate_site(site.root)
    age = next(p for p in report.problems if p.column == "age")
    shown = re.findall(r"\d+ \('abc'\)", age.message)
    assert len(shown) == ROWS_SHOWN and f"and {n - ROWS_SHOWN} more" in age.message
    assert len(age.message) < 300
    per_gene = [
        p for p in report.problems if p.rule == "not_numeric" and p.file == "genomics.parquet"
    ]
    assert len(per_gene) == PROBLEMS_PER_GROUP
    more = [p for p in report.problems if p.rule == "more"]
    assert len(more) == 1 and "7 more 'not_numeric' problems in genomics.parquet" in more[0].message
    assert more[0].severity == "error"


def test_problem_is_frozen_and_report_serialises() -> None:
    p = DataProblem("error", "ehr.csv", "age", 3, "bad", "fix it", "not_numeric")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.row = 4  # type: ignore[misc]


def test_report_to_dict_has_no_patient_values(written_site: BuiltSite) -> None:
    d = validate_site(written_site.root).to_dict()
    assert d["ok"] and d["errors"] == 0 and d["summary"]["patients"] == 12
    text = repr(d)
    assert not any(pid in text for pid in written_site.patient_ids)
