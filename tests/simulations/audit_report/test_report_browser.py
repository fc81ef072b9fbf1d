"""The audit page in a real browser (headless Chromium): it renders, shows the key numbers,
and fetches nothing from the network.

Skipped, with the reason, only where no Chromium is installed (CI installs Debian's
``chromium``). The network check reads Chromium's own net log: a request made on behalf of
the page carries the page's ``file://`` network-isolation key, so the browser's background
traffic (clock sync, account checks) is told apart from the page's.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fedcare.simulations.audit.report import build_report
from tests.simulations.audit_report import _builders as b
from tests.simulations.audit_report._dom import section_rows, section_text

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if found is None:
        pytest.skip("Chromium not installed: install Debian's chromium to run the browser check")
    return found


def _run(chromium: str, tmp: Path, page: Path, *extra: str) -> str:
    proc = subprocess.run(
        [chromium, *_FLAGS, f"--user-data-dir={tmp / 'profile'}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _page_requests(net_log: Path) -> list[str]:
    """URLs (not file:/data:) that Chromium started fetching for a file:// page."""
    log: dict[str, Any] = json.loads(net_log.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params", {})
        if (
            event["type"] == start_job
            and str(params.get("network_isolation_key", "")).startswith("file://")
            and not str(params.get("url", "")).startswith(("file:", "data:"))
        ):
            urls.append(params["url"])
    return urls


def _good_page(tmp_path: Path) -> Path:
    path = tmp_path / "report.html"
    path.write_text(
        build_report(
            summary=b.summary(),
            record=b.record(max_update_norm=1.0),
            verify=b.verify_ok(),
            epsilon=b.epsilon_audit(),
            attacks=b.attack_report(),
            run_dir=Path("/runs/audit-run-7"),
        ),
        encoding="utf-8",
    )
    return path


def test_browser_shows_the_key_numbers_and_fetches_nothing(chromium: str, tmp_path: Path) -> None:
    net_log = tmp_path / "net.json"
    dom = _run(
        chromium,
        tmp_path,
        _good_page(tmp_path),
        f"--log-net-log={net_log}",
        "--virtual-time-budget=2000",
        "--dump-dom",
    )
    assert section_text(dom, "verdict").startswith("Verdict: PASS")
    epsilon = section_rows(dom, "epsilon")
    assert ["site-0", "2", "1e-05", "7.983", "7.980", "-0.004", "ok"] in epsilon
    assert ["site-2", "2", "1e-05", "8.000", "7.994", "-0.005", "ok"] in epsilon
    attacks = section_rows(dom, "attacks")
    for (attack, site), auc in zip(b.ATTACK_NUMBERS, b.EXPECTED_AUC_STRINGS, strict=True):
        assert any(r[:2] == [attack, site] and r[4] == auc for r in attacks)
    assert ["site-2", "1000", "200", "120", "0.95", "1.205", "8.000", "below claim"] in attacks
    assert ["2", "0.758", "0.630"] in section_rows(dom, "utility")
    assert ["server", "audit/server.jsonl", "17", b.FP, "OK"] in section_rows(dom, "verification")
    assert dom.count("<svg") >= 6  # ε, utility, norms, 2 ROC, canary bars (+ legend samples)
    assert _page_requests(net_log) == []


def test_net_log_check_catches_a_page_that_fetches(chromium: str, tmp_path: Path) -> None:
    """The detector itself: a page with a remote image is caught (loopback, port 9: refused)."""
    page = tmp_path / "fetching.html"
    page.write_text('<!DOCTYPE html><img src="http://127.0.0.1:9/x.png"><p>x</p>')
    net_log = tmp_path / "net.json"
    _run(
        chromium,
        tmp_path,
        page,
        f"--log-net-log={net_log}",
        "--virtual-time-budget=2000",
        "--dump-dom",
    )
    assert _page_requests(net_log) == ["http://127.0.0.1:9/x.png"]


def test_attention_page_shows_its_reasons(chromium: str, tmp_path: Path) -> None:
    path = tmp_path / "attention.html"
    path.write_text(
        build_report(
            summary=b.summary(
                events=[
                    {
                        "round": 2,
                        "site_id": "site-2",
                        "kind": "dropped",
                        "detail": "no reply within 600 s",
                    }
                ]
            ),
            record=b.record(),
            verify=b.verify_broken(),
            epsilon=b.epsilon_audit(flag=("site-1", 2)),
            attacks=None,
        ),
        encoding="utf-8",
    )
    dom = _run(chromium, tmp_path, path, "--dump-dom")
    verdict = section_text(dom, "verdict")
    assert verdict.startswith("Verdict: ATTENTION")
    for reason in (
        "site-1: line 4: signature does not verify",
        "site-1 round 2 (reported 7.480 < recomputed 7.980)",
        "no attack run yet: run `fedcare audit attack RUNDIR`",
        "1 dropped",
    ):
        assert reason in verdict
    assert ["2", "site-2", "dropped", "no reply within 600 s"] in section_rows(dom, "events")


def test_screenshot_renders_the_page(chromium: str, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    _run(
        chromium,
        tmp_path,
        _good_page(tmp_path),
        f"--screenshot={png}",
        "--window-size=1200,3000",
        "--hide-scrollbars",
    )
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 3000)
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").resize((120, 300)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50  # text, charts, badges: not a blank page
