"""Timelines: a patient's event stream encoded as a fixed-size sequence, from the schema.

References are computed here in plain Python from the events as written
(``tests/client/data/_builders.py``), never with the encoder's own code.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedcare.client.data.data_checks import validate_site
from fedcare.client.data.datasets import build_task_data
from fedcare.client.data.events import parse_events
from fedcare.client.data.loaders import load_site
from fedcare.client.data.sequences import CHANNEL, encode_timelines
from fedcare.common.encoding import TIMELINE_CHANNELS, TIMELINE_KEY, input_dims
from fedcare.common.errors import ConfigError
from fedcare.common.spec import FeatureSchema, TimelineCode, TimelineSchema, load_site_spec
from tests.client.data._builders import BuiltSite, build_site

CODES = {"HR": (80.0, 12.0), "CREAT": (1.0, 0.5)}  # code -> (center, scale)
LENGTH = 3
TIME_SCALE = 2.0


def _timeline_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "stay",
        "codes": [{"code": c, "center": m, "scale": s} for c, (m, s) in CODES.items()],
        "max_length": LENGTH,
        "time_unit": "days",
        "time_scale": TIME_SCALE,
    }
    return spec | overrides


def _with_timeline(site: BuiltSite, **overrides: Any) -> BuiltSite:
    site.spec["schema"]["timelines"] = [_timeline_spec(**overrides)]
    site.spec["tasks"].append(
        {
            "name": "readmission_tl",
            "label": "readmission",
            "modalities": ["ehr"],
            "timeline": "stay",
        }
    )
    site.write_spec()
    return site


def _reference(site: BuiltSite, pid: str) -> np.ndarray:
    """The expected ``(LENGTH, channels)`` timeline of ``pid``, from the written events."""
    index = {c: i + 1 for i, c in enumerate(CODES)}
    rows = [(t, k, c, v) for k, (p, t, c, v) in enumerate(site.events) if p == pid and c in index]
    rows.sort(key=lambda r: (r[0], r[1]))  # time, then file order
    rows = rows[-LENGTH:]
    out = np.zeros((LENGTH, len(TIMELINE_CHANNELS)))
    latest = max((r[0] for r in rows), default=0.0)
    for j, (t, _, code, value) in enumerate(rows):
        center, scale = CODES[code]
        has = not math.isnan(value)
        out[j] = [
            index[code],
            min(5.0, max(-5.0, (value - center) / scale)) if has else 0.0,
            float(has),
            math.log1p((t - rows[j - 1][0]) / TIME_SCALE) if j else 0.0,
            math.log1p((latest - t) / TIME_SCALE),
            1.0,
        ]
    return out


@pytest.mark.parametrize("iso_times", [False, True])
def test_loaded_timelines_match_the_written_events(tmp_path: Path, iso_times: bool) -> None:
    """Order by time, the latest LENGTH kept, padding after; ISO times converted to days."""
    site = _with_timeline(build_site(tmp_path / "s", iso_times=iso_times))
    data = load_site(site.root)
    encoded = encode_timelines(
        data.events,
        load_site_spec(site.root).feature_schema.timelines[0],
        patient_ids=site.patient_ids,
    )
    for row, pid in enumerate(site.patient_ids):
        np.testing.assert_allclose(encoded[row], _reference(site, pid), rtol=1e-5, atol=1e-5)
    truncated = [
        p
        for p in site.patient_ids
        if sum(e[0] == p and e[2] in CODES for e in site.events) > LENGTH
    ]
    padded = [
        p
        for p in site.patient_ids
        if sum(e[0] == p and e[2] in CODES for e in site.events) < LENGTH
    ]
    assert truncated and padded, "the builder's site must exercise truncation and padding"


def test_the_most_recent_events_are_kept_in_time_order() -> None:
    events = pd.DataFrame(
        {
            "patient_id": ["a"] * 5 + ["b"],
            "time": [5.0, 1.0, 4.0, 2.0, 4.0, 1.0],
            "code": ["X", "X", "X", "X", "Y", "Z"],  # Z is not in the timeline
            "value": [50.0, 10.0, 40.0, 20.0, 99.0, 1.0],
        }
    )
    timeline = TimelineSchema(
        name="t",
        codes=(TimelineCode(code="X"), TimelineCode(code="Y", center=100.0, scale=10.0)),
        max_length=3,
        time_unit="hours",
        value_clip=100.0,
    )
    x = encode_timelines(
        parse_events(events, id_column="patient_id"), timeline, patient_ids=["b", "a", "c"]
    )
    # a: the latest three are t=4 (X 40, then Y 99, in file order) and t=5 (X 50).
    assert x[1, :, CHANNEL["code"]].tolist() == [1.0, 2.0, 1.0]
    np.testing.assert_allclose(x[1, :, CHANNEL["value"]], [40.0, -0.1, 50.0], rtol=1e-6)
    np.testing.assert_allclose(
        x[1, :, CHANNEL["gap_before"]], [0.0, 0.0, math.log1p(1.0)], rtol=1e-6
    )
    np.testing.assert_allclose(
        x[1, :, CHANNEL["time_to_latest"]], [math.log1p(1.0), math.log1p(1.0), 0.0], rtol=1e-6
    )
    # b has only a Z event and c none: all padding, mask 0.
    assert not x[0].any() and not x[2].any()
    assert x[1, :, CHANNEL["present"]].tolist() == [1.0, 1.0, 1.0]


def test_values_are_clipped_and_missing_values_flagged() -> None:
    events = pd.DataFrame(
        {"patient_id": ["a", "a"], "time": [1, 2], "code": ["X", "X"], "value": [1000.0, None]}
    )
    timeline = TimelineSchema(
        name="t", codes=(TimelineCode(code="X"),), max_length=4, time_unit="days"
    )
    x = encode_timelines(parse_events(events, id_column="patient_id"), timeline, patient_ids=["a"])
    assert x[0, :, CHANNEL["value"]].tolist() == [5.0, 0.0, 0.0, 0.0]
    assert x[0, :, CHANNEL["value_present"]].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert x[0, :, CHANNEL["present"]].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_task_data_appends_the_timeline_to_the_ehr_vector(tmp_path: Path) -> None:
    site = _with_timeline(build_site(tmp_path / "s", n=30))
    data = load_site(site.root)
    plain = build_task_data(data, "readmission")
    with_timeline = build_task_data(data, "readmission_tl")
    width = LENGTH * len(TIMELINE_CHANNELS)
    assert with_timeline.input_dims[TIMELINE_KEY] == (LENGTH, len(CODES))
    spec = data.spec
    # The server derives the same dims from the schema alone.
    assert input_dims(spec.feature_schema, spec.task("readmission_tl")) == with_timeline.input_dims
    x = with_timeline.train.tensors[0]
    ids = list(with_timeline.patient_ids.train)
    assert x.shape[1] == int(with_timeline.input_dims["ehr"])
    expected = np.stack([_reference(site, p).reshape(-1) for p in ids])
    np.testing.assert_allclose(x[:, -width:].numpy(), expected, rtol=1e-5, atol=1e-5)
    # The static part is what the task without a timeline reads (same site, same split).
    assert list(plain.patient_ids.train) == ids
    np.testing.assert_allclose(x[:, :-width].numpy(), plain.train.tensors[0].numpy())


def _spec_error(site: BuiltSite) -> str:
    site.write_spec()
    with pytest.raises(ConfigError) as info:
        load_site_spec(site.root)
    return str(info.value)


def test_a_task_naming_an_undeclared_timeline_is_refused(tmp_path: Path) -> None:
    site = _with_timeline(build_site(tmp_path / "s"))
    site.spec["tasks"][-1]["timeline"] = "icu"
    message = _spec_error(site)
    assert "site.toml" in message and "'icu'" in message and "stay" in message


def test_a_timeline_task_must_read_ehr(tmp_path: Path) -> None:
    site = _with_timeline(build_site(tmp_path / "s"))
    site.spec["tasks"][-1]["modalities"] = ["genomics"]
    assert "add 'ehr' to its modalities" in _spec_error(site)


def test_a_timeline_needs_the_events_file(tmp_path: Path) -> None:
    site = _with_timeline(build_site(tmp_path / "s"))
    site.spec["schema"]["events"] = []
    del site.spec["ehr"]["events"]
    assert "ehr.events" in _spec_error(site)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"max_length": 0}, "max_length", "greater than or equal to 1"),
        ({"time_unit": "fortnights"}, "time_unit", "fortnights"),
        ({"time_scale": 0}, "time_scale", "greater than 0"),
        ({"codes": [{"code": "HR"}, {"code": "HR"}]}, "timelines", "more than once"),
        ({"codes": [{"code": "HR", "scale": -1}]}, "scale", "greater than 0"),
        ({"codes": [{"code": "HR", "typo": 1}]}, "typo", "typo"),
    ],
)
def test_bad_timeline_declarations_name_the_file_and_field(
    tmp_path: Path, change: dict[str, Any], field: str, words: str
) -> None:
    site = _with_timeline(build_site(tmp_path / "s"), **change)
    message = _spec_error(site)
    assert "site.toml" in message and field in message and words in message


def test_a_schema_without_timelines_fingerprints_as_before() -> None:
    """The field is left out of the canonical dump when empty (default data unchanged)."""
    schema = FeatureSchema()
    assert "timelines" not in schema.model_dump()
    timeline = TimelineSchema(
        name="t", codes=(TimelineCode(code="X"),), max_length=2, time_unit="days"
    )
    with_timeline = FeatureSchema(timelines=(timeline,))
    assert with_timeline.fingerprint() != schema.fingerprint()
    # Every encoding constant is part of the fingerprint a site checks the centre's against.
    moved = timeline.model_copy(update={"codes": (TimelineCode(code="X", center=1.0),)})
    assert FeatureSchema(timelines=(moved,)).fingerprint() != with_timeline.fingerprint()
    assert FeatureSchema.model_validate(with_timeline.model_dump()) == with_timeline


def test_a_timeline_code_no_event_carries_is_a_warning_naming_it(tmp_path: Path) -> None:
    site = build_site(tmp_path / "s")
    site.spec["schema"]["timelines"] = [_timeline_spec(codes=[{"code": "HR"}, {"code": "LACTATE"}])]
    site.write_spec()
    report = validate_site(site.root)
    found = [p for p in report.problems if p.rule == "timeline_code_absent"]
    assert report.ok and len(found) == 1
    assert found[0].severity == "warning" and found[0].file == "events.csv"
    assert "'LACTATE'" in found[0].message and "'HR'" not in found[0].message
