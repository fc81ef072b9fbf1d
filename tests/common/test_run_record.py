"""``server_record.json``: one typed record, read by every reader the same way.

The golden record is a real 3-site x 2-round DP run written by fedcare before the record was
typed (version 1, no ``record_version``): it must still read, and the summary built from it
must be the summary that run wrote.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from fedcare.common.errors import ConfigError
from fedcare.common.run_record import (
    RECORD_VERSION,
    RunRecord,
    load_run_record,
    write_run_record,
)
from fedcare.common.summary import RunSummary, load_summary

GOLDEN = Path(__file__).parents[1] / "simulations" / "audit_report" / "data"


def _v2() -> dict[str, Any]:
    """A version-2 record as the ServerApp writes it: one site, one round."""
    record = RunRecord.start(
        run_id="r1",
        task="readmission",
        model="ehr_mlp",
        strategy="fedavg",
        personalization="none",
        rounds_planned=2,
        config={"dp": True, "max-update-norm": 1.5},
    )
    return record.to_dict() | {
        "sites": {
            "site-0": {
                "site_id": "site-0",
                "privacy": {"enabled": True, "epsilon": 1.0, "delta": 1e-5, "accountant": "prv"},
            }
        },
        "rounds": [{"round": 1, "sites": {"site-0": {"update-norm": 0.5, "epsilon": 1.0}}}],
        "rounds_completed": 1,
    }


def test_the_golden_version_1_record_reads_with_what_that_fedcare_did_not_write() -> None:
    raw = json.loads((GOLDEN / "server_record.json").read_text())
    assert "record_version" not in raw and "personalization" not in raw
    record = load_run_record(GOLDEN / "server_record.json")
    assert record.record_version == RECORD_VERSION
    assert (record.run_id, record.personalization, record.rounds_completed) == (
        "default-0",
        "none",
        2,
    )
    site = record.sites["site-0"]
    assert site.privacy.run_epsilon is None and site.personal_metrics == {}
    assert [m.round for m in site.privacy.mechanisms] == [1, 2]
    assert record.per_site_round("update-norm")["site-0"][1] == pytest.approx(0.680947093795727)
    assert record.config_number("max-update-norm") == 0.0 and record.config_number("dp") is None


def test_the_summary_built_from_the_golden_record_is_the_one_that_run_wrote() -> None:
    record = load_run_record(GOLDEN / "server_record.json")
    written = load_summary(GOLDEN / "summary.json")
    built = RunSummary.from_record(
        record,
        fedcare_version=written.fedcare_version,
        flwr_version=written.flwr_version,
        baselines=written.baselines.model_dump(),
    )
    assert built == written


def test_a_record_round_trips_through_its_file(tmp_path: Path) -> None:
    record = RunRecord.from_dict(_v2(), source="test")
    path = write_run_record(tmp_path / "server_record.json", record)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = load_run_record(path)
    assert again == record
    assert json.loads(path.read_text())["record_version"] == RECORD_VERSION


def test_a_checkpoints_version_1_record_takes_its_last_round_as_completed() -> None:
    raw = _v2()
    for key in ("record_version", "rounds_completed", "personalization"):
        del raw[key]
    raw["rounds"].append({"round": 3, "metrics": {}, "sites": {}})
    assert RunRecord.from_dict(raw, source="checkpoint.pt").rounds_completed == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("personalization"), "field personalization: missing"),
        (lambda r: r.update(colour="red"), "field colour: unknown key"),
        (
            lambda r: r["sites"]["site-0"]["privacy"].update(epsilon=-1.0),
            "field sites.site-0.privacy.epsilon: Input should be greater than or equal to 0",
        ),
        (
            lambda r: r["sites"]["site-0"].update(site_id="site-9"),
            "filed under another site's id",
        ),
        (
            lambda r: r["events"].append({"round": 1, "site_id": "a", "kind": "x", "detail": ""}),
            "field events.0.kind",
        ),
        (lambda r: r.update(record_version=5), "field record_version: version 5 is not one"),
        (lambda r: r.update(record_version=True), "field record_version: version True"),
    ],
)
def test_a_malformed_record_is_one_config_error_naming_the_source_and_field(
    change: Any, message: str
) -> None:
    """Version 2 is fedcare's own writing: nothing is filled in or passed over."""
    raw = _v2()
    change(raw)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        RunRecord.from_dict(raw, source="runs/x/server_record.json")
    assert str(info.value).startswith("runs/x/server_record.json: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), ("{oops", "not valid JSON"), ("[1, 2]", "not a run record")],
)
def test_an_unreadable_record_file_names_the_file_and_the_fix(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "server_record.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        load_run_record(path)


def test_assignments_are_checked_and_the_whole_record_again_when_written(tmp_path: Path) -> None:
    record = RunRecord.from_dict(_v2(), source="test")
    with pytest.raises(ValueError, match="status"):
        record.sites["site-0"].status = "vanished"  # type: ignore[assignment]
    record.round_entry(1).metrics["test.auroc"] = math.nan  # a dict changed in place
    path = tmp_path / "server_record.json"
    with pytest.raises(ConfigError, match=r"field rounds\.0\.metrics\.test\.auroc"):
        write_run_record(path, record)
    assert not path.exists()


def test_rounds_are_kept_in_order_and_counted_when_finished() -> None:
    record = RunRecord.from_dict(_v2(), source="test")
    record.round_entry(0)
    record.round_entry(2).metrics["test.auroc"] = 0.7
    assert [e.round for e in record.rounds] == [1, 0, 2] and record.rounds_completed == 2
    record.finish()
    assert [e.round for e in record.rounds] == [0, 1, 2]
    assert record.round_or_none(5) is None


#: JSON no fedcare writes, that makes ``json.loads`` raise something other than a decode
#: error: an integer over Python's digit limit (ValueError) or nesting deeper than the
#: parser's stack (RecursionError).
HOSTILE_JSON = [
    pytest.param('{"rounds_planned": ' + "9" * 5000 + "}", "Exceeds the limit", id="long-int"),
    pytest.param("[" * 200_000, "it nests too deeply", id="deep-array"),
    pytest.param('{"a":' * 200_000, "it nests too deeply", id="deep-object"),
    pytest.param("[" * 5_000 + "]" * 5_000, "it nests too deeply", id="deep-closed-array"),
]


@pytest.mark.parametrize(("content", "reason"), HOSTILE_JSON)
@pytest.mark.parametrize(
    ("name", "load", "what"),
    [
        ("server_record.json", load_run_record, "not valid JSON"),
        ("summary.json", load_summary, "not valid JSON"),
    ],
)
def test_a_hostile_record_or_summary_is_one_config_error_naming_the_file(
    tmp_path: Path, content: str, reason: str, name: str, load: Any, what: str
) -> None:
    """A run directory an auditor receives may hold anything: never a traceback."""
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {what} ({reason}"), message
    assert "the file is damaged or is not a fedcare run's" in message
    assert "\n" not in message


def test_a_record_nested_deep_but_parseable_is_a_validation_error(tmp_path: Path) -> None:
    raw = _v2()
    raw["config"] = {"x": json.loads("[" * 900 + "]" * 900)}
    path = tmp_path / "server_record.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: field config.x")):
        load_run_record(path)
