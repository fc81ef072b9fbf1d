"""The model card in a real browser (headless Chromium): it renders, shows the run's numbers,
and fetches nothing from the network (Chromium's own net log, as for the audit report).

Skipped, with the reason, only where no Chromium is installed.
"""

from __future__ import annotations

from pathlib import Path

from tests.simulations.audit_report._dom import section_rows, section_text
from tests.simulations.audit_report.test_model_card import _card
from tests.simulations.audit_report.test_report_browser import (  # noqa: F401 (a fixture)
    _page_requests,
    _run,
    chromium,
)


def test_the_card_renders_its_numbers_and_fetches_nothing(chromium: str, tmp_path: Path) -> None:  # noqa: F811
    page = tmp_path / "model_card.html"
    page.write_text(_card(), encoding="utf-8")
    net_log = tmp_path / "net.json"
    dom = _run(
        chromium,
        tmp_path,
        page,
        f"--log-net-log={net_log}",
        "--virtual-time-budget=2000",
        "--dump-dom",
    )
    assert section_text(dom, "model").startswith("Model and task")
    assert ["global model (federated)", "0.735", "0.401", "0.170", "82", "0.300"] in section_rows(
        dom, "performance"
    )
    groups = section_rows(dom, "groups")
    assert ["largest gap", "", "0.150", "0.150", "0.050", "0.030", "—", "—", "0.090"] in groups
    assert ["site-0", "on", "3.212", "7.988", "1e-05", "prv", "os-entropy", "dp"] in section_rows(
        dom, "privacy"
    )
    assert dom.count("<svg") >= 1  # the calibration curve
    assert _page_requests(net_log) == []
