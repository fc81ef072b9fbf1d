"""`fedcare data check`: exit 0 (ok or warnings), 1 (errors), 2 (not a site); no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedcare.cli import main
from tests.client.data._builders import BuiltSite, build_site, edit_csv


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # rich wraps tables at the terminal width


def test_valid_site_exits_0_with_a_summary(
    written_site: BuiltSite, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(["data", "check", str(written_site.root)], capsys)
    assert code == 0
    assert "site-0" in out and "1 site(s) ok: 0 error(s), 0 warning(s)" in out
    header = next(line for line in out.splitlines() if "readmission" in line)
    row = next(line for line in out.splitlines() if "site-0" in line and "ok" in line)
    cells = [c.strip() for c in row.split("│")]
    names = [c.strip() for c in header.split("┃")]
    assert cells[names.index("readmission")] == "33%"  # prevalence: 4 of 12 positive


def test_errors_exit_1_and_are_listed_with_their_fix(
    written_site: BuiltSite, capsys: pytest.CaptureFixture[str]
) -> None:
    site = written_site
    edit_csv(site.path("ehr.csv"), lambda f: f.assign(age="abc"))
    site.path("genomics.parquet").unlink()
    code, out, _ = _run(["data", "check", str(site.root)], capsys)
    assert code == 1
    assert "is numeric but has 12 non-numeric cells" in out
    assert "genomics.parquet" in out and "file not found" in out
    assert "write a number" in out  # the fix column
    assert "1 of 1 site(s) have errors: 2 error(s)" in out


def test_warnings_only_exit_0(written_site: BuiltSite, capsys: pytest.CaptureFixture[str]) -> None:
    edit_csv(written_site.path("ehr.csv"), lambda f: f.assign(note="x"))
    code, out, _ = _run(["data", "check", str(written_site.root)], capsys)
    assert code == 0 and "warning" in out and "1 warning(s)" in out


@pytest.mark.parametrize("make", ["missing", "no-site-inside", "markup-in-path"])
def test_not_a_site_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str
) -> None:
    path = tmp_path / "nothing-here"
    if make == "no-site-inside":
        (path / "sub").mkdir(parents=True)
    if make == "markup-in-path":
        path = tmp_path / "[red]odd"
    code, out, err = _run(["data", "check", str(path)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and str(path) in err
    assert "site folder" in err


def test_folder_of_sites_gives_one_summary_row_per_site(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_site(tmp_path / "sites" / "a", site_id="site-a")
    broken = build_site(tmp_path / "sites" / "b", site_id="site-b", seed=1)
    edit_csv(broken.path("ehr.csv"), lambda f: f.assign(sex="Q"))
    (tmp_path / "sites" / "not-a-site").mkdir()
    code, out, _ = _run(["data", "check", str(tmp_path / "sites")], capsys)
    assert code == 1
    summary = out[out.index("summary") :]
    rows = [line for line in summary.splitlines() if "site-a" in line or "site-b" in line]
    assert len(rows) == 2
    assert "ok" in rows[0] and "ERRORS" in rows[1]
    assert "1 of 2 site(s) have errors" in out


def test_json_output(
    written_site: BuiltSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit_csv(written_site.path("ehr.csv"), lambda f: f.assign(diabetes="7"))
    code, out, _ = _run(["data", "check", "--json", str(written_site.root)], capsys)
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and len(report["sites"]) == 1
    (problem,) = report["sites"][0]["problems"]
    assert problem["rule"] == "not_binary" and problem["column"] == "diabetes"
    assert problem["row"] == 1 and problem["severity"] == "error"
    assert report["sites"][0]["summary"]["modalities"]["ehr"] == 12


def test_spec_errors_are_reported_not_raised(
    written_site: BuiltSite, capsys: pytest.CaptureFixture[str]
) -> None:
    written_site.path("site.toml").write_text("site_id = 'x'\n[ehr]\ntable = 1\n")
    code, out, _ = _run(["data", "check", str(written_site.root)], capsys)
    assert code == 1 and "site.toml" in out and "ehr.table" in out


def test_site_toml_path_is_accepted(
    written_site: BuiltSite, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(written_site.root, copy)
    code, _, _ = _run(["data", "check", str(copy / "site.toml")], capsys)
    assert code == 0
