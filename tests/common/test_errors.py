"""One wording of pydantic errors for every config file, record and run config."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedcare.common.errors import FieldProblem, format_validation_error, validation_problems


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(gt=0)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    site_id: str = Field(pattern=r"^[a-z]+$")
    target_epsilon: float = 1.0
    privacy: _Inner

    @field_validator("target_epsilon")
    @classmethod
    def _small(cls, value: float) -> float:
        if value > 10:
            raise ValueError("target-epsilon above 10 protects nobody; ask for 10 or less")
        return value


def _error(raw: dict[str, object]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Config.model_validate(raw)
    return info.value


def test_each_kind_of_error_is_worded_with_its_field_and_fix() -> None:
    err = _error({"site_id": "a", "target_epsilon": 20, "privacy": {"epsilom": 1}, "x": 1})
    assert validation_problems(err) == [
        FieldProblem(
            "target_epsilon", "target-epsilon above 10 protects nobody; ask for 10 or less"
        ),
        FieldProblem("privacy.epsilon", "missing", "add it"),
        FieldProblem("privacy.epsilom", "unknown key", "remove it or check its spelling"),
        FieldProblem("x", "unknown key", "remove it or check its spelling"),
    ]


def test_known_keys_spelling_reference_and_a_callers_own_wording() -> None:
    err = _error({"site_id": "A B", "target_epsilon": "lots", "privacy": {"epsilom": 1}})
    message = format_validation_error(
        "site.toml",
        err,
        spell=lambda key: key.replace("_", "-"),
        known_keys=lambda loc: ["epsilon"] if loc == ("privacy",) else ["site_id"],
        reference="example.toml",
        explain=lambda e: "not a site id" if e["type"] == "string_pattern_mismatch" else None,
    )
    assert message.splitlines() == [
        "site.toml: field site-id: not a site id",
        "site.toml: field target-epsilon: Input should be a valid number, unable to parse "
        "string as a number (got 'lots'); correct it (every field is described in example.toml)",
        "site.toml: field privacy.epsilon: missing; add it (every field is described in "
        "example.toml)",
        "site.toml: field privacy.epsilom: unknown key; remove it or check its spelling "
        "(did you mean 'epsilon'?)",
    ]


def test_a_long_value_is_quoted_cut_short() -> None:
    err = _error({"site_id": "a", "target_epsilon": "9" * 500 + "x", "privacy": {"epsilon": 1}})
    (problem,) = validation_problems(err)
    assert problem.problem.endswith("...)") and len(problem.problem) < 200
