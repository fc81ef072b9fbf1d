"""A whole privacy audit of one real DP federation, with the ``fedcare audit`` commands.

One simulated run (Flower's engine, 2 hospitals x 2 rounds, DP at each site: the session's
``audited_run`` of tests/conftest.py, whose model card
tests/simulations/audit_report/test_model_card_run.py checks) is audited as an auditor
would: ``audit verify`` (exit 0), the ε recomputation against this test's own PLD
accountant call, ``audit attack`` (the canary audit's empirical lower bound stays below the
claimed ε), ``audit report`` rendered in headless Chromium; then one byte of a site's log
and of the server's log is flipped: ``audit verify`` exits 1 naming that line, and the
report's verdict turns to ATTENTION (and the logs are put back). Slow: CI runs it too.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fedcare.cli import main
from fedcare.client.accounting import Mechanism, independent_epsilon
from fedcare.common.summary import load_summary
from fedcare.simulations.audit.findings import ATTACKS_FILE, AttackReport
from tests.conftest import AUDITED_RUN_GROUP, AuditedRun
from tests.simulations.audit_report.test_report_browser import _FLAGS as CHROMIUM_FLAGS

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group(AUDITED_RUN_GROUP)]


def _fedcare(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``fedcare`` command in this process (as the console script would)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = int(e.code or 0)
    return subprocess.CompletedProcess(["fedcare", *args], code, out.getvalue(), err.getvalue())


def _dom(page: Path, profile: Path) -> str | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    out = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return out.stdout


def _flip_middle_byte(path: Path, kind: str) -> int:
    """Flip one bit in the middle of the first entry of ``kind``; returns its line number."""
    lines = path.read_bytes().split(b"\n")
    line = next(i for i, raw in enumerate(lines) if raw and json.loads(raw)["kind"] == kind)
    raw = bytearray(lines[line])
    raw[len(raw) // 2] ^= 0x01
    lines[line] = bytes(raw)
    path.write_bytes(b"\n".join(lines))
    return line + 1


def test_a_whole_audit_of_a_real_dp_run(audited_run: AuditedRun, tmp_path: Path) -> None:
    run = audited_run.run
    summary = load_summary(run / "summary.json")
    assert summary.rounds_completed == 2 and len(summary.sites) == 2

    # 1. Every log intact and signed, and server and sites agree.
    verify = _fedcare("audit", "verify", str(run))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.count(", OK") == 3  # server + two sites

    # 2. The audit's recomputed ε equals this test's own PLD call on the summary's mechanisms.
    from fedcare.simulations.audit.epsilon import recompute_epsilon

    audit = recompute_epsilon(run)
    assert audit.ok
    for site in summary.sites:
        mechanisms = [
            Mechanism(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate, steps=m.steps)
            for m in site.privacy.mechanisms
        ]
        expected = independent_epsilon(mechanisms, delta=site.privacy.delta)
        last = max((r for r in audit.rows if r.site_id == site.site_id), key=lambda r: r.round)
        assert last.recomputed_epsilon == pytest.approx(expected, abs=1e-6)
        assert last.reported_epsilon >= expected - 1e-3  # the site never under-reports

    # 3. Attacks: the canary audit's empirical lower bound stays below the claimed ε.
    attack = _fedcare("audit", "attack", str(run), "--reference-models", "2")
    assert attack.returncode == 0, attack.stdout + attack.stderr
    report = AttackReport.model_validate_json((run / ATTACKS_FILE).read_text())
    assert report.dp and {c.site_id for c in report.canaries} == {"site-0", "site-1"}
    for canary in report.canaries:
        assert canary.claimed_epsilon is not None
        assert canary.epsilon_lower_bound < canary.claimed_epsilon
        assert canary.below_claim

    # 4. The HTML report, as a browser shows it.
    page = tmp_path / "report.html"
    out = _fedcare("audit", "report", str(run), "--out", str(page))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "verdict: PASS" in out.stdout, out.stdout
    dom = _dom(page, tmp_path / "profile")
    if dom is not None:  # the browser check proper lives in tests/simulations/audit_report
        assert "PASS" in dom
        for site in summary.sites:
            assert f"{site.privacy.epsilon:.3f}" in dom

    # 5. Tampering: one flipped bit in a site's log, then in the server's log.
    for log, kind in (
        (run / "state" / "site-1" / "audit.jsonl", "train"),
        (run / "audit" / "server.jsonl", "aggregate"),
    ):
        original = log.read_bytes()
        try:
            line = _flip_middle_byte(log, kind)
            verify = _fedcare("audit", "verify", str(run))
            assert verify.returncode == 1, verify.stdout
            assert f"FIRST BAD LINE {line}:" in verify.stdout, verify.stdout
            out = _fedcare("audit", "report", str(run), "--out", str(page))
            assert "verdict: ATTENTION" in out.stdout, out.stdout
        finally:  # the run is the session's: the model card test reads it too
            log.write_bytes(original)
