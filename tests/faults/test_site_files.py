"""A site's files, broken the way a careless or hostile user breaks them.

Each case starts from a small synthetic hospital (``fedcare.simulations.synth``), breaks one thing,
and checks what a user sees: ``fedcare data check`` exits non-zero with no traceback, the
problem names the file or site.toml field and the fix, and nothing outside the site folder
is read or quoted. Loading (``load_site``, ``SiteFiles``, the dataset fingerprint) refuses
the same inputs, so no code path reads outside the site.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from fedcare.cli import main
from fedcare.client.data.data_checks import validate_site
from fedcare.client.data.files import PathOutsideSite, SiteFiles
from fedcare.client.data.fingerprint import dataset_fingerprint
from fedcare.client.data.loaders import load_site
from fedcare.common.errors import DataError, DataValidationError
from fedcare.common.spec import (
    EventFeature,
    Feature,
    FeatureSchema,
    GenomicsSchema,
    ImagingSchema,
    describe_schema_difference,
    load_site_spec,
    schema_differences,
)
from fedcare.simulations.synth import SynthConfig, synthesize

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

# A line no site file holds: it must never appear in any report or error.
SECRET = "PRETTY_NAME=SECRET-OUTSIDE-THE-SITE-4f1c"
GENES = 60


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small valid synthetic sites, all tables CSV, all images PNG."""
    out = tmp_path_factory.mktemp("template") / "sites"
    config = SynthConfig(
        patients_per_site=20, n_genes=GENES, image_size=16, table_format="csv", image_format="png"
    )
    synthesize(out, n_sites=2, seed=5, config=config)
    return out


@pytest.fixture
def site(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of one valid site, ``tmp_path/sites/site-0``."""
    root = tmp_path / "sites" / "site-0"
    shutil.copytree(template / "site-0", root)
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the site, holding files that look like a site's but carry SECRET."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "os-release").write_text(f'{SECRET}\nID="secret"\n')
    (folder / "table.csv").write_text(f"patient_id,{SECRET}\nS0-00000,1\n")
    return folder


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # rich wraps table cells at the terminal width


def _check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run ``fedcare data check ARGS``; its exit code and everything it printed."""
    try:
        main(["data", "check", *args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out + err


def _problems(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, list[dict[str, Any]]]:
    """Run ``fedcare data check --json``; the exit code and every problem of every site."""
    code, out = _check(capsys, "--json", str(root))
    report = json.loads(out)
    return code, [p for s in report["sites"] for p in s["problems"]]


def _edit_spec(root: Path, change: Any) -> None:
    spec = tomllib.loads((root / "site.toml").read_text())
    change(spec)
    (root / "site.toml").write_text(tomli_w.dumps(spec))


def _assert_refused_everywhere(root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """data check exits 1, text and JSON never quote SECRET; loading refuses; the message."""
    code, text = _check(capsys, str(root))
    assert code == 1 and SECRET not in text
    code, problems = _problems(capsys, root)
    assert code == 1 and SECRET not in json.dumps(problems)
    with pytest.raises(DataValidationError) as refused:
        load_site(root)
    chain = f"{refused.value} {refused.value.problems} {refused.value.__cause__}"
    assert SECRET not in chain
    return text


# ------------------------------------------------------------------------- confinement


def test_dotdot_path_in_site_toml_is_refused(
    site: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_spec(site, lambda s: s["ehr"].update(events="../../elsewhere/table.csv"))
    _assert_refused_everywhere(site, capsys)
    _, problems = _problems(capsys, site)
    (problem,) = [p for p in problems if p["rule"] == "outside_site"]
    assert problem["file"] == "site.toml" and problem["column"] == "ehr.events"
    assert problem["message"] == (
        "ehr.events = '../../elsewhere/table.csv' climbs out of the site folder with '..'"
    )
    assert "copy or move the file into the site folder" in problem["fix"]


def test_absolute_path_in_site_toml_is_refused(
    site: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(outside / "table.csv")
    _edit_spec(site, lambda s: s["genomics"].update(matrix=target))
    _assert_refused_everywhere(site, capsys)
    _, problems = _problems(capsys, site)
    (problem,) = [p for p in problems if p["rule"] == "outside_site"]
    assert problem["column"] == "genomics.matrix"
    assert problem["message"] == f"genomics.matrix = {target!r} is an absolute path"


def test_table_symlinked_to_a_file_outside_is_refused_and_never_quoted(
    site: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The case: ehr.csv linked to a system file echoed its first line.
    (site / "ehr.csv").unlink()
    (site / "ehr.csv").symlink_to(outside / "os-release")
    text = _assert_refused_everywhere(site, capsys)
    assert "columns found" not in text
    _, problems = _problems(capsys, site)
    fields = sorted(p["column"] for p in problems if p["rule"] == "outside_site")
    assert fields == ["ehr.table", "labels.0.table"]  # the label is read from ehr.csv too
    assert all(
        "is a symbolic link that leads outside the site folder" in p["message"]
        for p in problems
        if p["rule"] == "outside_site"
    )
    # Every reader refuses it too, without quoting it.
    files = SiteFiles(site, id_column="patient_id")
    with pytest.raises(PathOutsideSite) as refused:
        files.table("ehr.csv")
    assert SECRET not in str(refused.value) and "ehr.csv" in str(refused.value)
    with pytest.raises(DataError) as refused:
        dataset_fingerprint(load_site_spec(site), site)
    assert SECRET not in str(refused.value)


def test_symlinked_parent_folder_is_refused(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "elsewhere" / "imaging"
    moved.parent.mkdir()
    shutil.move(str(site / "imaging"), moved)
    (site / "imaging").symlink_to(moved, target_is_directory=True)
    code, problems = _problems(capsys, site)
    assert code == 1
    refused = {p["column"]: p["message"] for p in problems if p["rule"] == "outside_site"}
    assert set(refused) == {"imaging.folder", "imaging.labels"}
    assert refused["imaging.labels"] == (
        "imaging.labels = 'imaging/labels.csv' lies under 'imaging', a symbolic link that "
        "leads outside the site folder"
    )
    # the images under the link are not opened one by one either
    assert not [p for p in problems if p["rule"].startswith("image_")]
    with pytest.raises(DataValidationError):
        load_site(site)


def test_links_that_stay_inside_the_site_are_fine(
    site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (site / "data").mkdir()
    shutil.move(str(site / "ehr.csv"), site / "data" / "ehr.csv")
    (site / "ehr.csv").symlink_to(Path("data") / "ehr.csv")
    linked_root = tmp_path / "site-link"
    linked_root.symlink_to(site, target_is_directory=True)  # the site folder itself a link
    code, text = _check(capsys, str(linked_root))
    assert code == 0, text
    assert load_site(linked_root).ehr is not None


def test_image_paths_escaping_the_site_are_refused(
    site: Path, outside: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(next((site / "imaging").glob("*.png")), outside / "scan.png")
    labels = site / "imaging" / "labels.csv"
    lines = labels.read_text().splitlines()
    first_id, second_id = lines[1].split(",")[0], lines[2].split(",")[0]
    lines[1] = f"{first_id},../../elsewhere/scan.png"
    lines[2] = f"{second_id},{outside / 'scan.png'}"
    labels.write_text("\n".join(lines) + "\n")
    code, problems = _problems(capsys, site)
    assert code == 1
    (problem,) = [p for p in problems if p["rule"] == "image_outside"]
    assert problem["file"] == "imaging/labels.csv" and problem["column"] == "file"
    assert problem["row"] == 1
    assert (
        "row 1: '../elsewhere/scan.png' climbs out of the site folder with '..'"
        in (problem["message"])
    )
    assert f"row 2: {str(outside / 'scan.png')!r} is an absolute path" in problem["message"]
    assert "copy or move the file into the site folder" in problem["fix"]
    with pytest.raises(DataValidationError):
        load_site(site)


def test_a_fifo_is_refused_without_blocking(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "events.csv").unlink()
    os.mkfifo(site / "events.csv")  # opening it to read would wait for a writer forever
    code, problems = _problems(capsys, site)
    assert code == 1
    (problem,) = [p for p in problems if p["rule"] == "outside_site"]
    assert problem["message"] == (
        "ehr.events = 'events.csv' is not a regular file (a FIFO, device or socket)"
    )


# ------------------------------------------------------------------------- torn files


def _cut(path: Path, fraction: float) -> str:
    """Keep the first ``fraction`` of the file's bytes; returns the partial last line."""
    data = path.read_bytes()
    kept = data[: int(len(data) * fraction)]
    path.write_bytes(kept)
    return kept.decode().rsplit("\n", 1)[1]


def test_genomics_matrix_cut_at_80_percent_is_an_error(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    matrix = site / "genomics.csv"
    lines_before = matrix.read_text().count("\n")
    partial = _cut(matrix, 0.8)
    found = partial.count(",") + 1
    assert 1 < found < GENES + 1  # the seed's data cut mid-row: the premise of the test
    line = matrix.read_text().count("\n") + 1
    assert line < lines_before
    code, problems = _problems(capsys, site)
    assert code == 1
    (problem,) = [p for p in problems if p["file"] == "genomics.csv"]
    assert problem["rule"] == "torn_row" and problem["severity"] == "error"
    assert problem["message"] == (
        f"the last row (line {line}) has {found} of the header's {GENES + 1} fields: the file "
        "looks cut off mid-row"
    )
    assert "copy or export the complete file again" in problem["fix"]
    with pytest.raises(DataValidationError, match=r"genomics\.csv: the last row"):
        load_site(site)


def test_events_file_cut_mid_row_is_an_error(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = site / "events.csv"
    text = events.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    start = len(text.rstrip("\n")) - len(last)
    events.write_text(text[: start + last.index(",") + 1])  # "S0-00012," : 2 of 4 fields
    line = text.rstrip("\n").count("\n") + 1
    code, problems = _problems(capsys, site)
    assert code == 1
    (problem,) = [p for p in problems if p["file"] == "events.csv"]
    assert problem["rule"] == "torn_row"
    assert f"the last row (line {line}) has 2 of the header's 4 fields" in problem["message"]


def test_events_file_cut_inside_its_last_cell_is_a_warning(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = site / "events.csv"
    events.write_text(events.read_text().rstrip("\n")[:-1])  # full fields, last cell shorter
    code, problems = _problems(capsys, site)
    assert code == 0
    (problem,) = [p for p in problems if p["file"] == "events.csv"]
    assert problem["rule"] == "no_final_newline" and problem["severity"] == "warning"
    assert "does not end with a newline" in problem["message"]


def test_short_rows_in_the_middle_are_errors_with_their_lines(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = site / "outcomes.csv"
    lines = table.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0]  # line 3 loses its last field
    lines[4] += ",extra"  # line 5 gains one
    table.write_text("\n".join(lines) + "\n")
    n = lines[0].count(",") + 1
    code, problems = _problems(capsys, site)
    assert code == 1
    (problem,) = [p for p in problems if p["file"] == "outcomes.csv"]
    assert problem["rule"] == "torn_row"
    assert problem["message"] == (
        f"2 row(s) do not have the header's {n} fields: line 3 has {n - 1}, line 5 has {n + 1}"
    )


@pytest.mark.parametrize(("separator", "name"), [(";", "';'"), ("\t", "tab")])
def test_csv_with_another_separator_gets_the_right_fix(
    site: Path, capsys: pytest.CaptureFixture[str], separator: str, name: str
) -> None:
    ehr = site / "ehr.csv"
    ehr.write_text(ehr.read_text().replace(",", separator))
    code, text = _check(capsys, str(site))
    assert code == 1
    assert "add the patient-id column" not in text
    code, problems = _problems(capsys, site)
    (problem,) = [p for p in problems if p["file"] == "ehr.csv"]
    assert problem["rule"] == "separator"
    assert problem["message"].endswith(f"the file looks {name}-separated")
    assert problem["fix"].startswith("fedcare reads comma-separated CSV: re-export it with commas")


# ------------------------------------------------------------------------- not a site


def test_data_check_on_a_csv_file_says_it_is_not_a_site(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, text = _check(capsys, str(site / "ehr.csv"))
    assert code == 2
    assert text.count("\n") == 1 and text.startswith("error: ")
    assert f"{site / 'ehr.csv'} is not a site folder: it is a file" in text
    assert "TOML" not in text
    report = validate_site(site / "ehr.csv")
    assert not report.ok and "is not a site folder" in report.errors[0].message


def test_data_check_on_a_folder_without_site_toml_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.csv").write_text("a,b\n1,2\n")
    code, text = _check(capsys, str(tmp_path / "stuff"))
    assert code == 2 and text.count("\n") == 1
    assert f"{tmp_path / 'stuff'} is not a site folder: it has no site.toml" in text


# ------------------------------------------------------------------------- schemas


def test_sites_whose_schemas_differ_are_named_feature_by_feature(
    template: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = tmp_path / "sites"
    shutil.copytree(template, sites)

    def drift(spec: dict[str, Any]) -> None:
        ehr = {f["name"]: f for f in spec["schema"]["ehr"]}
        ehr["age"]["unit"] = "months"
        ehr["age"]["max"] = 1440
        ehr["sex"]["categories"] = ["M", "F"]
        spec["schema"]["ehr"] = [f for f in spec["schema"]["ehr"] if f["name"] != "bmi"]

    _edit_spec(sites / "site-1", drift)
    code, text = _check(capsys, str(sites))
    assert code == 1
    (line,) = [x for x in text.splitlines() if "feature schema differs" in x]
    assert line.startswith("error: site-1's feature schema differs from site-0's: ")
    assert "EHR feature only in site-0: 'bmi' (numeric; unit 'kg/m2')" in line
    assert "EHR feature 'age': unit 'years' in site-0, 'months' in site-1 and max" in line
    assert "EHR feature 'sex': categories ['F', 'M'] in site-0, ['M', 'F'] in site-1" in line
    assert "fix: give every site.toml the federation's one [schema]" in line
    assert "SCHEMA DIFFERS" in text
    code, out = _check(capsys, "--json", str(sites))
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    (mismatch,) = report["schema_differences"]
    assert mismatch["site_id"] == "site-1" and mismatch["reference_site_id"] == "site-0"
    assert len(mismatch["differences"]) == 3


def test_schema_difference_covers_every_part_of_the_schema() -> None:
    age = Feature(name="age", kind="numeric", unit="years", min=0, max=120)
    smoker = Feature(name="smoker", kind="categorical", categories=("never", "ever"))
    hr = EventFeature(name="hr_max", code="HR", agg="max", unit="bpm")
    a = FeatureSchema(
        ehr=(age, smoker),
        events=(hr,),
        genomics=GenomicsSchema(kind="expression", features=("G1", "G2", "G3")),
        imaging=ImagingSchema(shape=(32, 32)),
    )
    b = FeatureSchema(
        ehr=(Feature(name="smoker", kind="binary"), age),
        events=(EventFeature(name="hr_max", code="HR", agg="mean", unit="bpm"),),
        genomics=GenomicsSchema(kind="expression", features=("G1", "G3", "G4"), max=20),
    )
    found = schema_differences(a, b, a_name="A", b_name="B")
    assert found == [
        "EHR feature 'smoker': kind 'categorical' in A, 'binary' in B and categories "
        "['never', 'ever'] in A, none in B",
        "EHR features in another order (the encoded vector follows it): age, smoker in A; "
        "smoker, age in B",
        "event feature 'hr_max': agg 'max' in A, 'mean' in B",
        "genomics: max none in A, 20 in B",
        "genomics features only in A: G2",
        "genomics features only in B: G4",
        "[schema.imaging] only in A (none in B)",
    ]
    assert describe_schema_difference(a, a) == "the feature schemas are identical"
    assert describe_schema_difference(a, b, a_name="A", b_name="B", limit=2).endswith(
        "; and 5 more difference(s)"
    )
