"""``[[schema.groups]]`` and ``[[tasks]] groups`` in site.toml: validated once, clear messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedcare.common.errors import ConfigError
from fedcare.common.spec import (
    Feature,
    FeatureSchema,
    GroupAttribute,
    describe_schema_difference,
    load_site_spec,
)

SITE = """
spec_version = 1
site_id = "site-0"

[ehr]
table = "ehr.csv"

[[labels]]
name = "readmission"
table = "ehr.csv"
column = "readmission_30d"

[[tasks]]
name = "readmission"
label = "readmission"
modalities = ["ehr"]
groups = {task_groups}

[[schema.ehr]]
name = "age"
kind = "numeric"

[[schema.ehr]]
name = "sex"
kind = "categorical"
categories = ["F", "M"]

{groups}
"""

GROUPS = """
[[schema.groups]]
name = "sex"
column = "sex"

[[schema.groups]]
name = "age_band"
column = "age"
cuts = [50, 70]
"""


def _write(tmp_path: Path, groups: str = GROUPS, task_groups: str = '["sex", "age_band"]') -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE.format(groups=groups, task_groups=task_groups), encoding="utf-8")
    return path


def test_a_site_declares_groups_and_a_task_reports_them(tmp_path: Path) -> None:
    spec = load_site_spec(_write(tmp_path))
    assert spec.task("readmission").groups == ("sex", "age_band")
    schema = spec.feature_schema
    assert schema.group_labels("sex") == ("F", "M", "unknown")
    assert schema.group_labels("age_band") == ("<50", "50-70", ">=70", "unknown")


def test_a_schema_without_groups_keeps_its_fingerprint() -> None:
    ehr = (Feature(name="sex", kind="categorical", categories=("F", "M")),)
    plain = FeatureSchema(ehr=ehr)
    assert "groups" not in plain.model_dump()
    grouped = FeatureSchema(ehr=ehr, groups=(GroupAttribute(name="sex", column="sex"),))
    assert grouped.fingerprint() != plain.fingerprint()
    assert describe_schema_difference(plain, grouped, a_name="here", b_name="there") == (
        "group 'sex' only in there"
    )


@pytest.mark.parametrize(
    ("groups", "task_groups", "needle"),
    [
        (GROUPS, '["race"]', "reports groups no [[schema.groups]] declares: race"),
        (GROUPS, '["sex", "sex"]', "lists a group twice"),
        (GROUPS.replace('column = "sex"', 'column = "ethnicity"'), "[]", "'ethnicity'"),
        (GROUPS.replace("cuts = [50, 70]", ""), "[]", "give its bands' 'cuts'"),
        (GROUPS.replace("cuts = [50, 70]", "cuts = [70, 50]"), "[]", "strictly increasing"),
        (GROUPS + '\n[[schema.groups]]\nname = "sex"\ncolumn = "sex"\n', "[]", "share a name"),
        (
            GROUPS + '\n[[schema.groups]]\nname = "age_51"\ncolumn = "age"\ncuts = [51]\n',
            "[]",
            "two [[schema.groups]] read the column 'age'",
        ),  # two cuts of one column: subtracting their groups isolates the patients between
        (
            GROUPS.replace(
                'name = "sex"\ncolumn = "sex"', 'name = "sex"\ncolumn = "sex"\ncuts = [1]'
            ),
            "[]",
            "only a numeric column takes 'cuts'",
        ),  # fmt: skip
        (GROUPS.replace('name = "age_band"', 'name = "Age Band"'), "[]", "groups.1.name"),
        (
            GROUPS.replace("cuts = [50, 70]", 'cuts = [50, 70]\nlabels = ["young", "old"]'),
            "[]",
            "has 3 groups but 2 labels",
        ),  # fmt: skip
    ],
)
def test_a_bad_group_declaration_is_one_clear_error_naming_the_field(
    tmp_path: Path, groups: str, task_groups: str, needle: str
) -> None:
    path = _write(tmp_path, groups, task_groups)
    with pytest.raises(ConfigError) as info:
        load_site_spec(path)
    message = str(info.value)
    assert str(path) in message and needle in message, message


def test_too_many_attributes_or_groups_are_refused() -> None:
    ehr = tuple(Feature(name=f"c{i}", kind="binary") for i in range(9))
    many: dict[str, Any] = {
        "ehr": ehr,
        "groups": tuple(GroupAttribute(name=f"c{i}", column=f"c{i}") for i in range(9)),
    }
    with pytest.raises(ValueError, match="at most 8"):
        FeatureSchema(**many)
    wide = (Feature(name="age", kind="numeric"),)
    cuts = tuple(float(c) for c in range(16))
    with pytest.raises(ValueError, match="17 groups; at most 16"):
        FeatureSchema(ehr=wide, groups=(GroupAttribute(name="age", column="age", cuts=cuts),))


def test_a_survival_task_may_report_groups(tmp_path: Path) -> None:
    """Per-group C-index and time-dependent AUC (models/survival_groups.py)."""
    path = _write(tmp_path)
    text = path.read_text(encoding="utf-8").replace(
        'column = "readmission_30d"\n',
        'column = "event"\nkind = "survival"\ntime_column = "days"\ncuts = [30, 90]\n',
    )
    path.write_text(text, encoding="utf-8")
    spec = load_site_spec(path)
    task = next(t for t in spec.tasks if t.groups)
    assert spec.label(task.label).kind == "survival"
