"""Outputs never overwrite a run's own files.

Before, ``fedcare audit report RUN --out RUN/summary.json`` (or ``RUN/audit/server.jsonl``)
replaced the run's summary or its signed audit log with HTML and exited 0. Now any
``--out`` that is an existing file of the run is refused in one line, exit non-zero, the
file unchanged; only an earlier report may be replaced. The real command runs here
(``fedcare.cli.main``), with the real verification and ε steps, on a sample run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from fedcare.cli import main
from fedcare.common.errors import ConfigError
from fedcare.common.federation import FederationConfig
from fedcare.server.audit import ServerAudit
from fedcare.server.checkpoint import Checkpoint, save_checkpoint
from fedcare.simulations.audit.report_cli import check_report_out

SAMPLE = Path(__file__).parents[1] / "simulations" / "audit_report" / "data"
CFG = FederationConfig.from_run_config({"task": "readmission"})

#: Files a run writes (besides summary.json and server_record.json of the sample).
RUN_FILES = (
    "summary.json",
    "server_record.json",
    "audit/server.jsonl",
    "audit/server-key.pem",
    "checkpoint.pt",
    "final_model.pt",
    "progress.jsonl",
    "metrics.csv",
    "config.toml",
    "sites/site-0/site.toml",
)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run directory: the sample's summary and record, a signed server log, a checkpoint
    and the other files a run leaves."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "server_record.json"):
        shutil.copy(SAMPLE / name, run / name)
    ServerAudit.open(run, CFG, run_id="default-0").run_start(
        CFG, model="mlp", model_sha256="a" * 64
    )
    save_checkpoint(run, Checkpoint("default-0", 1, {"w": np.zeros(3, dtype=np.float32)}))
    for name in ("final_model.pt", "progress.jsonl", "metrics.csv", "config.toml"):
        (run / name).write_bytes(b"what the run wrote\n")
    (run / "sites" / "site-0").mkdir(parents=True)
    (run / "sites" / "site-0" / "site.toml").write_text("[site]\n")
    return run


def _report(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["audit", "report", str(run), "--out", str(out)])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_report_into_one_of_the_runs_files_is_refused_and_the_file_kept(
    run: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = run / name
    before = target.read_bytes()
    code, out, err = _report(run, target, capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out "), err
    assert f"that is {name}, a file of the run" in lines[0]
    assert "Traceback" not in err and "wrote" not in out
    assert target.read_bytes() == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")) == []


def test_a_link_to_one_of_the_runs_files_is_refused_too(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "report.html"
    link.symlink_to(run / "audit" / "server.jsonl")
    before = (run / "audit" / "server.jsonl").read_bytes()
    code, _, err = _report(run, link, capsys)
    assert code != 0 and "audit/server.jsonl, a file of the run" in err
    assert (run / "audit" / "server.jsonl").read_bytes() == before and link.is_symlink()


def test_a_new_report_inside_the_run_and_its_replacement_are_written(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = run / "report.html"
    code, out, err = _report(run, page, capsys)
    assert code == 0, err
    assert f"wrote {page}" in out
    first = page.read_bytes()
    assert first.startswith(b"<!DOCTYPE html>")
    page.write_bytes(first.replace(b"</footer>", b" (old)</footer>"))
    code, _, err = _report(run, page, capsys)  # an earlier report may be replaced
    assert code == 0, err
    assert b"(old)" not in page.read_bytes()
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def test_an_html_file_that_is_not_a_report_is_kept(run: Path) -> None:
    notes = run / "notes.html"
    notes.write_text("<!DOCTYPE html><p>the ethics board's notes</p>")
    with pytest.raises(ConfigError, match="a file of the run"):
        check_report_out(notes, run)
    check_report_out(run / "new.html", run)  # a new file is fine
    check_report_out(run.parent / "elsewhere.html", run)
