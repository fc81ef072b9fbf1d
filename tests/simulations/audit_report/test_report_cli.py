"""Loading a run directory and ``fedcare audit report``: files in, page out, clear errors.

The verifier and the ε recomputation are other modules' work: here they are stand-ins
(injected as ``fedcare.simulations.audit.verify`` / ``fedcare.simulations.audit.epsilon``), so
these tests
check only what this module does with a run directory; the last test runs the real ones on
a hostile audit log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fedcare.common.errors import ConfigError
from fedcare.simulations.audit.findings import ATTACKS_FILE
from fedcare.simulations.audit.report import load_report_inputs, render_run_report
from fedcare.simulations.audit.report_cli import audit_report
from tests.simulations.audit_report import _builders as b
from tests.simulations.audit_report._dom import section_rows, section_text

SAMPLE = Path(__file__).parent / "data"


def _sample_run(tmp_path: Path) -> Path:
    """summary.json + server_record.json of a real 3-site x 2-round DP run (run id default-0)."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "server_record.json"):
        shutil.copy(SAMPLE / name, run / name)
    return run


@pytest.fixture
def audit_steps(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Stand-in verify/epsilon modules; set ``*_error`` to an exception to make one fail."""
    state: dict[str, object] = {"verify_error": None, "epsilon_error": None, "seen": []}

    def verify_paths(paths, *, trusted_keys=None):  # type: ignore[no-untyped-def]
        state["seen"].append(("verify", list(paths)))  # type: ignore[union-attr]
        if state["verify_error"] is not None:
            raise state["verify_error"]  # type: ignore[misc]
        return b.verify_ok()

    def recompute_epsilon(run_dir):  # type: ignore[no-untyped-def]
        state["seen"].append(("epsilon", run_dir))  # type: ignore[union-attr]
        if state["epsilon_error"] is not None:
            raise state["epsilon_error"]  # type: ignore[misc]
        return b.epsilon_audit()

    verify = types.ModuleType("fedcare.simulations.audit.verify")
    verify.verify_paths = verify_paths  # type: ignore[attr-defined]
    epsilon = types.ModuleType("fedcare.simulations.audit.epsilon")
    epsilon.recompute_epsilon = recompute_epsilon  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fedcare.simulations.audit.verify", verify)
    monkeypatch.setitem(sys.modules, "fedcare.simulations.audit.epsilon", epsilon)
    return state


def test_render_reads_summary_record_and_calls_the_audit_steps(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    run = _sample_run(tmp_path)
    page = render_run_report(run)
    assert audit_steps["seen"] == [("verify", [run]), ("epsilon", run)]
    facts = section_rows(page, "run-facts")
    # final ε of summary.json: 7.983397385911686 and 7.999936605554885
    assert facts[1][:2] == ["site-0", "completed"] and facts[1][6] == "7.983"
    assert facts[3][0] == "site-2" and facts[3][6] == "8.000"
    # update norms of server_record.json: 0.680947093795727 (site-0, round 1), 0.8928728 ...
    assert section_rows(page, "update-norms")[1] == ["1", "0.681", "0.678", "0.893"]
    # global test AUROC and AUPRC after round 2: 0.6303101483711449, 0.3944786373627674
    test_rows = section_rows(page, "utility")
    header = test_rows[0]
    round2 = dict(zip(header, test_rows[3], strict=True))
    assert round2["Round"] == "2" and round2["auroc"] == "0.630" and round2["auprc"] == "0.394"
    assert "no attack run yet: run fedcare audit attack " + str(run) in section_text(
        page, "attacks"
    )
    assert section_text(page, "verdict").startswith("Verdict: ATTENTION")


def test_attack_results_are_read_and_validated(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    run = _sample_run(tmp_path)
    (run / ATTACKS_FILE).parent.mkdir(parents=True)
    (run / ATTACKS_FILE).write_text(b.attack_report(run_id="default-0").model_dump_json())
    page = render_run_report(run)
    assert ["rmia", "site-2", "100", "100", "0.538", "0.003", "0.021"] in section_rows(
        page, "attacks"
    )
    (run / ATTACKS_FILE).write_text('{"run_id": "default-0", "colour": "red"}')
    with pytest.raises(ConfigError) as info:
        render_run_report(run)
    assert str(run / ATTACKS_FILE) in str(info.value)
    assert "fedcare audit attack" in str(info.value)


def test_failed_audit_steps_become_reasons_not_crashes(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    run = _sample_run(tmp_path)
    audit_steps["verify_error"] = ConfigError(f"{run}/audit/server.jsonl: no such file; rerun")
    audit_steps["epsilon_error"] = ConfigError("no mechanism logged; rerun with audit on")
    inputs = load_report_inputs(run)
    reasons = {c.key: c.detail for c in inputs.verdict().reasons}
    assert "the logs cannot be verified" in reasons["logs"]
    assert "audit/server.jsonl: no such file" in reasons["logs"]
    assert (
        reasons["epsilon"] == "ε could not be recomputed: no mechanism logged; rerun with audit on"
    )
    # the sites' own ε per round still shows, from server_record.json (5.884225257006293)
    assert ["site-0", "1", "5.884"] in section_rows(inputs.html(), "epsilon")


def test_unexpected_errors_are_not_swallowed(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    audit_steps["verify_error"] = RuntimeError("bug")
    with pytest.raises(RuntimeError, match="bug"):
        load_report_inputs(_sample_run(tmp_path))


def _signed_server_log(run: Path) -> str:
    """Write the server's audit log of a run start (as a run does); return its code hash."""
    from fedcare.common.audit import code_hash
    from fedcare.common.federation import FederationConfig
    from fedcare.server.audit import ServerAudit

    cfg = FederationConfig()
    ServerAudit.open(run, cfg, run_id="default-0").run_start(
        cfg, model="ehr_mlp", model_sha256="0" * 64
    )
    return code_hash()


def test_code_hash_comes_from_the_signed_server_log(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    run = _sample_run(tmp_path)
    assert "Code hash not recorded" in section_text(render_run_report(run), "run-facts")
    expected = _signed_server_log(run)
    assert f"Code hash {expected}" in section_text(render_run_report(run), "run-facts")


def test_a_forged_code_hash_is_not_shown(tmp_path: Path, audit_steps: dict[str, object]) -> None:
    run = _sample_run(tmp_path)
    expected = _signed_server_log(run)
    log = run / "audit" / "server.jsonl"
    log.write_text(log.read_text().replace(expected, "f" * 64))
    facts = section_text(render_run_report(run), "run-facts")
    assert "Code hash not recorded" in facts and "f" * 64 not in facts


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        ("no-dir", "no such run directory"),
        ("no-summary", "summary.json: no such file"),
        ("no-record", "server_record.json: no such file"),
        ("bad-record", "server_record.json: not valid JSON"),
    ],
)
def test_unreadable_run_names_the_path(
    tmp_path: Path, audit_steps: dict[str, object], breakage: str, needle: str
) -> None:
    run = _sample_run(tmp_path)
    if breakage == "no-dir":
        run = tmp_path / "missing"
    elif breakage == "no-summary":
        (run / "summary.json").unlink()
    elif breakage == "no-record":
        (run / "server_record.json").unlink()
    else:
        (run / "server_record.json").write_text("{not json")
    with pytest.raises(ConfigError, match=needle) as info:
        load_report_inputs(run)
    assert str(run) in str(info.value)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(audit_report)
    return app


def test_cli_writes_the_page_and_prints_the_verdict(
    tmp_path: Path, audit_steps: dict[str, object]
) -> None:
    run = _sample_run(tmp_path)
    out = tmp_path / "reports" / "report.html"
    result = CliRunner().invoke(_app(), [str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert "verdict: ATTENTION" in result.output
    assert "no attack run yet" in result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left


def test_cli_refuses_a_folder_as_output(tmp_path: Path, audit_steps: dict[str, object]) -> None:
    run = _sample_run(tmp_path)
    result = CliRunner().invoke(_app(), [str(run), "--out", str(tmp_path)])
    assert isinstance(result.exception, ConfigError)
    assert "is a folder; pass a file name" in str(result.exception)


# What an auditor receives may hold anything: ``json.loads`` raises ValueError on an integer
# over Python's digit limit and RecursionError on nesting deeper than its stack.
_HOSTILE = {
    "long-int": ('{"schema_version": ' + "9" * 5000 + "}", "Exceeds the limit"),
    "deep-array": ("[" * 200_000, "it nests too deeply"),
    "deep-object": ('{"a":' * 200_000, "it nests too deeply"),
}


@pytest.mark.parametrize("hostile", sorted(_HOSTILE))
@pytest.mark.parametrize(
    ("name", "what"),
    [("summary.json", "not valid JSON"), ("server_record.json", "not valid JSON")],
)
def test_a_hostile_summary_or_record_is_one_clear_error(
    tmp_path: Path, audit_steps: dict[str, object], hostile: str, name: str, what: str
) -> None:
    run = _sample_run(tmp_path)
    content, reason = _HOSTILE[hostile]
    (run / name).write_text(content)
    with pytest.raises(ConfigError) as info:
        load_report_inputs(run)
    message = str(info.value)
    assert message.startswith(f"{run / name}: {what} ({reason}"), message
    assert "the file is damaged or is not a fedcare run's" in message and "\n" not in message


def test_the_command_prints_one_line_for_a_hostile_run_directory(tmp_path: Path) -> None:
    run = _sample_run(tmp_path)
    (run / "summary.json").write_text(_HOSTILE["deep-array"][0])
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "fedcare.cli", "audit", "report", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "NO_COLOR": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: {run / 'summary.json'}: not valid JSON (it nests too")
    assert not out.exists()


@pytest.mark.parametrize(
    "error",
    [
        AttributeError("'str' object has no attribute 'get'"),
        TypeError("float() argument must be a string or a real number, not 'list'"),
        ValueError("invalid literal for int() with base 10: 'one'"),
        KeyError("epsilon"),
    ],
    ids=type,
)
def test_a_log_entry_the_epsilon_step_cannot_read_becomes_a_reason(
    tmp_path: Path, audit_steps: dict[str, object], error: Exception
) -> None:
    """The ε recomputation reads the logs unverified: an entry no fedcare wrote (a field
    missing, or of another type) is a reason on the page, never a traceback."""
    run = _sample_run(tmp_path)
    audit_steps["epsilon_error"] = error
    inputs = load_report_inputs(run)
    reasons = {c.key: c.detail for c in inputs.verdict().reasons}
    assert reasons["epsilon"].startswith(
        "ε could not be recomputed: an audit log of the run holds an entry that fedcare never "
        f"writes ({type(error).__name__}: "
    )
    assert reasons["epsilon"].endswith(f"run `fedcare audit verify {run}` to find the entry")
    assert inputs.html().startswith("<!DOCTYPE html>")


def test_a_self_signed_server_log_of_the_wrong_types_gives_a_page_not_a_traceback(
    tmp_path: Path,
) -> None:
    """The real verifier and ε step (no stand-ins): a log signed by its own key, with an
    update whose ``site`` is text, fails verification naming the entry."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcare.common.audit import AuditLog

    run = _sample_run(tmp_path)
    log = AuditLog(
        run / "audit" / "server.jsonl", writer="server", key=Ed25519PrivateKey.generate()
    )
    start = {"config_sha256": "c", "model_sha256": "m", "config": {}}
    log.append("run-start", start, run_id="default-0")
    log.append("update", {"round": 1, "site_id": "site-0", "site": "text"}, run_id="default-0")
    out = tmp_path / "report.html"
    result = CliRunner().invoke(_app(), [str(run), "--out", str(out)])
    assert result.exit_code == 0 and result.exception is None, result.output
    assert "verdict: ATTENTION" in result.output
    assert "server log line 3: its 'update' entry's site is 'text', not an object" in result.output
    assert "an audit log of the run holds an entry that fedcare never writes" in result.output
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
