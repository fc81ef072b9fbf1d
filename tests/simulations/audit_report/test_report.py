"""The audit page from hand-built findings: every number, every reason, nothing fetched.

Expected strings are written out by hand in ``_builders`` (three decimals), so a change in
how the page computes or formats a number fails here.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from fedcare.common.errors import ConfigError
from fedcare.common.run_record import load_run_record
from fedcare.simulations.audit.findings import CanaryAudit, LogCheck, VerifyResult
from fedcare.simulations.audit.report import SECTION_IDS, build_report, compute_verdict
from tests.simulations.audit_report import _builders as b
from tests.simulations.audit_report._dom import parse, section_rows, section_text

EVENTS = [
    {
        "round": 2,
        "site_id": "site-1",
        "kind": "rejected",
        "detail": "update norm 3.2 exceeds the bound 1",
    },
    {"round": 2, "site_id": "site-2", "kind": "dropped", "detail": "no reply within 600 s"},
]


def _page(**overrides: Any) -> str:
    kwargs: dict[str, Any] = {
        "summary": b.summary(),
        "record": b.record(max_update_norm=1.0),
        "verify": b.verify_ok(),
        "epsilon": b.epsilon_audit(),
        "attacks": b.attack_report(),
    }
    kwargs.update(overrides)
    return build_report(**kwargs)


def _checks(page: str) -> dict[str, str]:
    """check key -> its line of text in the verdict."""
    return {
        m.group(1): html.unescape(re.sub("<[^>]+>", "", m.group(2)))
        for m in re.finditer(r'<li class="(?:ok|bad)" data-check="([a-z]+)">(.*?)</li>', page)
    }


def test_good_run_passes_and_has_every_section_in_order() -> None:
    page = _page()
    ids = [i for i in parse(page).ids_in_order if i in SECTION_IDS]
    assert ids == list(SECTION_IDS)
    assert section_text(page, "verdict").startswith("Verdict: PASS")
    assert all(line.startswith("PASS ") for line in _checks(page).values())
    assert set(_checks(page)) == {"logs", "epsilon", "attacks", "events"}


def test_epsilon_table_shows_both_accountants_and_differences() -> None:
    rows = section_rows(_page(), "epsilon")
    assert rows[0] == [
        "Site",
        "Round",
        "δ",
        "reported (prv)",
        "recomputed (pld (dp-accounting))",
        "difference",
        "flag",
    ]
    assert ["site-0", "1", "1e-05", "5.884", "5.881", "-0.003", "ok"] in rows
    assert ["site-0", "2", "1e-05", "7.983", "7.980", "-0.004", "ok"] in rows
    assert ["site-2", "1", "1e-05", "6.038", "6.031", "-0.007", "ok"] in rows
    assert ["site-2", "2", "1e-05", "8.000", "7.994", "-0.005", "ok"] in rows
    assert len(rows) == 1 + 6
    text = section_text(_page(), "epsilon")
    assert "tolerance 0.01" in text
    for s in b.EXPECTED_EPSILON_STRINGS + b.EXPECTED_DIFFERENCES:
        assert s in text


def test_epsilon_chart_draws_reported_and_recomputed_per_site_with_the_target() -> None:
    page = _page()
    names = re.findall(r'<polyline class="series" data-name="([^"]+)"', page)
    for site in b.SITES:
        assert f"{site} reported (prv)" in names
        assert f"{site} recomputed (pld (dp-accounting))" in names
    assert "target ε 8.000" in section_text(page, "epsilon")


def test_utility_and_norm_tables() -> None:
    page = _page()
    utility = section_rows(page, "utility")
    assert ["Round", "accuracy", "auroc"] in utility
    assert ["0", "0.758", "0.375"] in utility
    assert ["1", "0.758", "0.507"] in utility
    assert ["2", "0.758", "0.630"] in utility
    norms = section_rows(page, "update-norms")
    assert norms[0] == ["Round", "site-0", "site-1", "site-2"]
    assert norms[1:] == [["1", "0.681", "0.678", "0.893"], ["2", "0.678", "0.680", "0.893"]]
    assert "exceeds 1.000" in section_text(page, "update-norms")
    assert "bound 1.000" in section_text(page, "update-norms")  # the chart's line
    no_bound = _page(record=b.record(max_update_norm=0.0))
    assert "enforced no norm bound" in section_text(no_bound, "update-norms")


def test_attack_and_canary_tables() -> None:
    page = _page()
    rows = section_rows(page, "attacks")
    assert ["loss-threshold", "site-0", "100", "100", "0.512", "0.002", "0.014"] in rows
    assert ["loss-threshold", "site-1", "100", "100", "0.499", "0.001", "0.011"] in rows
    assert ["rmia", "site-2", "100", "100", "0.538", "0.003", "0.021"] in rows
    assert ["site-0", "1000", "200", "120", "0.95", "0.731", "7.983", "below claim"] in rows
    assert ["site-2", "1000", "200", "120", "0.95", "1.205", "8.000", "below claim"] in rows
    text = section_text(page, "attacks")
    assert "ROC curves (linear)" in text and "ROC curves (log-log" in text
    assert page.count('class="diagonal"') == 2  # chance line on both ROC charts
    assert "Canary lower bound vs claimed ε" in text


def test_verification_table_and_run_facts() -> None:
    page = _page(code_hash="c0ffee12")
    rows = section_rows(page, "verification")
    assert ["server", "audit/server.jsonl", "17", b.FP, "OK"] in rows
    assert len(rows) == 1 + 4
    assert "All logs verify." in section_text(page, "verification")
    facts = section_text(page, "run-facts")
    for needle in (
        b.RUN_ID,
        "readmission",
        "fedavg",
        "ehr_mlp",
        "2 of 2",
        "0.1.0",
        "1.42.0",
        "c0ffee12",
        "3 of 3 sites, δ = 1e-05",
    ):
        assert needle in facts
    assert ["site-2", "completed", "", "1, 2", "200", "32", "8.000", "1e-05", "prv"] in (
        section_rows(page, "run-facts")
    )
    assert "Code hash not recorded" in section_text(_page(), "run-facts")


def test_broken_log_shows_first_bad_line_and_cross_check() -> None:
    page = _page(verify=b.verify_broken())
    assert section_text(page, "verdict").startswith("Verdict: ATTENTION")
    checks = _checks(page)
    assert checks["logs"].startswith("ATTENTION")
    assert "site-1: line 4: signature does not verify" in checks["logs"]
    assert checks["epsilon"].startswith("PASS") and checks["events"].startswith("PASS")
    rows = section_rows(page, "verification")
    assert [
        "site-1",
        "sites/site-1/.fedcare/audit.jsonl",
        "5",
        b.FP,
        "FAILED line 4: signature does not verify: the entry was altered after it was written",
    ] in rows
    text = section_text(page, "verification")
    assert "Verification FAILED." in text
    assert "site-1 round 2: update hash 9f3c was never logged by the server" in text


def test_no_log_at_all_is_attention() -> None:
    page = _page(verify=VerifyResult(ok=True, logs=[]))
    assert _checks(page)["logs"].startswith("ATTENTION")
    assert "no audit log was verified" in _checks(page)["logs"]


def test_under_reported_epsilon_is_flagged() -> None:
    page = _page(epsilon=b.epsilon_audit(flag=("site-1", 2)))
    check = _checks(page)["epsilon"]
    assert check.startswith("ATTENTION")
    assert "site-1 round 2 (reported 7.480 < recomputed 7.980)" in check
    assert ["site-1", "2", "1e-05", "7.480", "7.980", "+0.500", "FLAGGED"] in section_rows(
        page, "epsilon"
    )


def test_missing_attacks_name_the_command() -> None:
    page = _page(attacks=None)
    assert "no attack run yet: run `fedcare audit attack RUNDIR`" in _checks(page)["attacks"]
    assert "no attack run yet: run fedcare audit attack RUNDIR" in section_text(page, "attacks")
    page = _page(attacks=None, run_dir=Path("/runs/r7"))
    assert "fedcare audit attack /runs/r7" in section_text(page, "attacks")
    assert section_text(page, "verdict").startswith("Verdict: ATTENTION")


def test_canary_bound_above_claim_is_attention() -> None:
    page = _page(attacks=b.attack_report(lower_bound_above=True))
    check = _checks(page)["attacks"]
    assert check.startswith("ATTENTION")
    assert "site-2: lower bound 9.000 ≥ claimed 8.000" in check
    assert ["site-2", "1000", "200", "120", "0.95", "9.000", "8.000", "AT OR ABOVE CLAIM"] in (
        section_rows(page, "attacks")
    )


def test_attacks_of_another_run_or_without_canaries_are_attention() -> None:
    other = _page(attacks=b.attack_report(run_id="some-other-run"))
    assert "for run 'some-other-run', not 'audit-run-7'" in _checks(other)["attacks"]
    report = b.attack_report().model_copy(update={"canaries": []})
    assert "no canary audit" in _checks(_page(attacks=report))["attacks"]
    unclaimed = b.attack_report().model_copy(
        update={
            "canaries": [
                CanaryAudit(
                    site_id="site-0",
                    n_canaries=10,
                    n_guesses=5,
                    n_correct=3,
                    confidence=0.95,
                    epsilon_lower_bound=0.2,
                    claimed_epsilon=None,
                    below_claim=None,
                )
            ]
        }
    )
    assert "no ε is claimed for site-0" in _checks(_page(attacks=unclaimed))["attacks"]


def test_rejected_and_dropped_updates_are_listed_with_reasons() -> None:
    page = _page(summary=b.summary(events=EVENTS))
    check = _checks(page)["events"]
    assert check.startswith("ATTENTION") and "1 rejected, 1 dropped" in check
    rows = section_rows(page, "events")
    assert rows == [
        ["Round", "Site", "Kind", "Reason"],
        ["2", "site-1", "rejected", "update norm 3.2 exceeds the bound 1"],
        ["2", "site-2", "dropped", "no reply within 600 s"],
    ]
    assert "No rejected updates" in section_text(_page(), "events")


def test_non_private_run_cannot_pass_on_epsilon() -> None:
    epsilon = b.epsilon_audit().model_copy(update={"rows": []})
    page = _page(summary=b.summary(dp=False), epsilon=epsilon)
    assert "without differential privacy" in _checks(page)["epsilon"]
    assert "trained without differential privacy" in section_text(page, "epsilon")


def test_failed_recomputation_still_shows_reported_epsilon_from_the_record() -> None:
    page = _page(epsilon=None, epsilon_error="site-0: no mechanism logged; rerun with audit on")
    assert "ε could not be recomputed: site-0: no mechanism logged" in _checks(page)["epsilon"]
    rows = section_rows(page, "epsilon")
    assert ["site-0", "1", "5.884"] in rows and ["site-2", "2", "8.000"] in rows


def test_each_failure_flips_only_its_own_check() -> None:
    good: dict[str, Any] = {
        "summary": b.summary(),
        "verify": b.verify_ok(),
        "epsilon": b.epsilon_audit(),
        "attacks": b.attack_report(),
    }
    assert compute_verdict(**good).passed
    assert compute_verdict(**good).label == "PASS"
    broken: dict[str, dict[str, Any]] = {
        "logs": {"verify": b.verify_broken()},
        "epsilon": {"epsilon": b.epsilon_audit(flag=("site-0", 1))},
        "attacks": {"attacks": None},
        "events": {"summary": b.summary(events=EVENTS)},
    }
    for key, change in broken.items():
        verdict = compute_verdict(**{**good, **change})
        assert verdict.label == "ATTENTION"
        assert [c.key for c in verdict.reasons] == [key]


def test_every_string_is_escaped() -> None:
    evil = '<script>alert("x")</script>'
    summary = b.summary(
        events=[{"round": 1, "site_id": "site-0", "kind": "refused", "detail": evil}]
    )
    summary = summary.model_copy(update={"run_id": evil, "task": "<b>t</b>"})
    verify = VerifyResult(
        ok=False,
        logs=[
            LogCheck(
                path='a"b<c>.jsonl',
                writer="<i>w</i>",
                key_fingerprint="f",
                entries=1,
                ok=False,
                first_bad_line=1,
                problem=evil,
            )
        ],
        cross_check_problems=[evil],
    )
    page = _page(summary=summary, verify=verify, attacks=None, code_hash=evil)
    assert "<script" not in page and "<b>t</b>" not in page and "<i>w</i>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert evil in section_text(page, "events") and evil in section_text(page, "verification")


def test_page_is_self_contained() -> None:
    page = _page()
    assert not re.search(r"\b(src|href|xlink:href|action|poster)\s*=", page, re.IGNORECASE)
    assert not re.search(r"https?:|//[a-z0-9]", page, re.IGNORECASE)
    assert "url(" not in page and "@import" not in page
    for tag in ("<script", "<link", "<img", "<iframe", "<object", "<embed", "<base"):
        assert tag not in page.lower()
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert csp is not None and "default-src &#x27;none&#x27;" in csp.group(1)
    assert page.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.update(rounds={"1": {}}), "field rounds: Input should be a valid list"),
        (
            lambda r: r["rounds"][1]["sites"]["site-0"].update(epsilon="high"),
            "field rounds.1.sites.site-0.epsilon: Input should be a valid number",
        ),
        (lambda r: r.update(colour="red"), "field colour: unknown key"),
        (lambda r: r.update(record_version=9), "field record_version: version 9"),
    ],
)
def test_malformed_record_is_one_config_error_naming_file_and_field(
    tmp_path: Path, change: Any, field: str
) -> None:
    raw = b.record().to_dict()
    change(raw)
    path = tmp_path / "server_record.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {field}")):
        load_run_record(path)
