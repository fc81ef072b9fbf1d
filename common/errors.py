"""Typed exceptions. A user error prints one clear line: the cause and the fix.

Every error fedcare raises for bad input (a data file, a config, a CLI argument, a model
update) derives from :class:`FedcareError`; the CLI turns it into one message and a
non-zero exit, never a traceback.

A pydantic :class:`~pydantic.ValidationError` (a config file, a record, a run config that
does not match its model) is worded in one place, :func:`validation_problems`, and printed
by :func:`format_validation_error`: one line per offending field, ``<source>: field <key>:
<what is wrong>; <fix>``.

Examples
--------
>>> from pydantic import BaseModel, ConfigDict, Field, ValidationError
>>> class Knobs(BaseModel):
...     model_config = ConfigDict(extra="forbid")
...     rounds: int = Field(ge=1)
>>> try:
...     Knobs.model_validate({"rounds": 0, "colour": "red"})
... except ValidationError as e:
...     print(format_validation_error("knobs.toml", e))
knobs.toml: field rounds: Input should be greater than or equal to 1 (got 0)
knobs.toml: field colour: unknown key; remove it or check its spelling
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_core import ErrorDetails

__all__ = [
    "FieldProblem",
    "validation_problems",
    "format_validation_error",
    "FedcareError",
    "ConfigError",
    "DataError",
    "DataValidationError",
    "PrivacyBudgetExceeded",
    "PolicyViolation",
    "UpdateRejected",
    "RoundFailed",
    "TrainingDiverged",
]


class FedcareError(Exception):
    """Base class of every error that is the user's to fix."""


class ConfigError(FedcareError):
    """A configuration file or argument is invalid."""


class DataError(FedcareError):
    """A site's data files cannot be read."""


class DataValidationError(DataError):
    """A site's data failed validation; ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: list | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class PrivacyBudgetExceeded(FedcareError):
    """Training would take the site's privacy loss over its own budget."""


class PolicyViolation(FedcareError):
    """The request is not allowed by the site's policy."""


class UpdateRejected(FedcareError):
    """A model update failed server-side validation."""


class RoundFailed(FedcareError):
    """A site's round failed after its privacy charge was written (the charge is kept,
    marked failed): a failure at the site, reported as such, never as a drop-out."""


class TrainingDiverged(RoundFailed):
    """Local training diverged (non-finite weights): a setting to fix (usually the learning
    rate), not a refusal; the round's charge is kept."""


# --------------------------------------------------------------------------------------
# Wording a pydantic ValidationError
# --------------------------------------------------------------------------------------

#: Characters of an offending value quoted back in a message.
_MAX_QUOTED = 80


@dataclass(frozen=True)
class FieldProblem:
    """One field a pydantic model refused.

    Attributes
    ----------
    field:
        The dotted key as the file spells it (``privacy.epsilon``, ``labels.0.table``);
        ``None`` for the document as a whole.
    problem:
        What is wrong with it.
    fix:
        How to fix it; ``None`` where ``problem`` already says (a validator's own message).
    """

    field: str | None
    problem: str
    fix: str | None = None

    def line(self, source: str) -> str:
        """``<source>: field <key>: <problem>; <fix>``."""
        where = self.field if self.field is not None else "(top level)"
        fix = f"; {self.fix}" if self.fix else ""
        return f"{source}: field {where}: {self.problem}{fix}"


def validation_problems(
    err: ValidationError,
    *,
    spell: Callable[[str], str] | None = None,
    known_keys: Callable[[tuple[int | str, ...]], Sequence[str]] | None = None,
    reference: str | None = None,
    explain: Callable[[ErrorDetails], str | None] | None = None,
) -> list[FieldProblem]:
    """Every error of ``err`` as a :class:`FieldProblem`, worded one way for all of fedcare.

    Parameters
    ----------
    err:
        The pydantic error.
    spell:
        How a key is written where the user typed it (a Flower run config writes
        ``target-epsilon`` for the field ``target_epsilon``); default: as the model names it.
    known_keys:
        The keys allowed in the table at a location (the location of an unknown key, less
        its last part); when given, an unknown key names the closest known one.
    reference:
        Where every field is described (an example file), named in the fix of a missing or
        invalid field.
    explain:
        A caller's own wording for one error (say, a pattern a site id must match): return
        the problem text, or ``None`` to use the default wording.
    """
    import difflib

    problems: list[FieldProblem] = []
    see = f" (every field is described in {reference})" if reference else ""
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or None
        if dotted is not None and spell is not None:
            dotted = spell(dotted)
        msg = e["msg"].removeprefix("Value error, ")
        own = explain(e) if explain is not None else None
        if own is not None:
            problems.append(FieldProblem(dotted, own))
        elif e["type"] == "extra_forbidden":
            fix = "remove it or check its spelling"
            if known_keys is not None and loc:
                known = list(known_keys(loc[:-1]))
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                if close:
                    fix += f" (did you mean {close[0]!r}?)"
                elif known:
                    fix += f" (known keys: {', '.join(known)})"
            problems.append(FieldProblem(dotted, "unknown key", fix))
        elif e["type"] == "missing":
            problems.append(FieldProblem(dotted, "missing", f"add it{see}"))
        elif e["type"] in ("value_error", "assertion_error") or isinstance(
            e.get("input"), (dict, list)
        ):
            problems.append(FieldProblem(dotted, msg, None))
        else:
            quoted = repr(e.get("input"))
            if len(quoted) > _MAX_QUOTED:
                quoted = quoted[: _MAX_QUOTED - 3] + "..."
            correct = f"correct it{see}" if reference else None
            problems.append(FieldProblem(dotted, f"{msg} (got {quoted})", correct))
    return problems


def format_validation_error(
    source: str,
    err: ValidationError,
    *,
    spell: Callable[[str], str] | None = None,
    known_keys: Callable[[tuple[int | str, ...]], Sequence[str]] | None = None,
    reference: str | None = None,
    explain: Callable[[ErrorDetails], str | None] | None = None,
) -> str:
    """One line per error of ``err``: ``<source>: field <key>: <problem>; <fix>``.

    ``source`` names the file (or the command line, the run config) the values came from;
    the other parameters are those of :func:`validation_problems`.
    """
    problems = validation_problems(
        err, spell=spell, known_keys=known_keys, reference=reference, explain=explain
    )
    return "\n".join(p.line(source) for p in problems)
