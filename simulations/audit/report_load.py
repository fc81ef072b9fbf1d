"""The audit report's inputs, loaded from a run directory.

:func:`load_report_inputs` reads what a finished run left (``summary.json``,
``server_record.json``, ``audit/attacks.json``) into typed findings, verifies its audit
logs (:mod:`.verify`) and recomputes ε (:mod:`.epsilon`); a failure of either step is kept as
a reason the page shows, not raised. :class:`ReportInputs` then gives the verdict
(:mod:`.report_verdict`) and the page (:mod:`.report_html`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fedcare.common import audit_kinds as kinds
from fedcare.common.audit import check_log
from fedcare.common.errors import ConfigError, FedcareError, format_validation_error
from fedcare.common.run_files import RECORD_NAME, SERVER_AUDIT_LOG, SUMMARY_NAME
from fedcare.common.run_record import RunRecord, load_run_record
from fedcare.common.summary import RunSummary, load_summary
from fedcare.simulations.audit.findings import (
    ATTACKS_FILE,
    AttackReport,
    EpsilonAudit,
    VerifyResult,
)
from fedcare.simulations.audit.report_html import build_report
from fedcare.simulations.audit.report_verdict import Verdict, attack_command, compute_verdict

__all__ = ["ReportInputs", "load_report_inputs"]

#: The field of the server log's start entries that holds the hash of the code that ran.
_CODE_HASH_KEY = "code_sha256"


@dataclass(frozen=True)
class ReportInputs:
    """Everything :func:`build_report` needs, as loaded from a run directory."""

    summary: RunSummary
    record: RunRecord
    verify: VerifyResult
    epsilon: EpsilonAudit | None
    attacks: AttackReport | None
    epsilon_error: str | None
    run_dir: Path
    code_hash: str | None

    def verdict(self) -> Verdict:
        """The verdict the page shows."""
        return compute_verdict(
            summary=self.summary,
            verify=self.verify,
            epsilon=self.epsilon,
            attacks=self.attacks,
            epsilon_error=self.epsilon_error,
            run_dir=self.run_dir,
        )

    def html(self, out: Path | None = None) -> str:
        """The page (:func:`build_report`), linking to the run's model card where one exists
        (relative to ``out``, the page's path, where given)."""
        from fedcare.simulations.audit.model_card import model_card_href

        return build_report(
            summary=self.summary,
            record=self.record,
            verify=self.verify,
            epsilon=self.epsilon,
            attacks=self.attacks,
            epsilon_error=self.epsilon_error,
            run_dir=self.run_dir,
            code_hash=self.code_hash,
            model_card=model_card_href(self.run_dir, out),
        )


def _load_attacks(path: Path, run_dir: Path) -> AttackReport | None:
    if not path.exists():
        return None
    try:
        return AttackReport.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e}); check its permissions") from e
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(str(path), e)
            + f"; run `{attack_command(run_dir)}` again to rewrite it"
        ) from e


def _guarded(step: Callable[[], Any]) -> tuple[Any, str | None]:
    """Run an audit step; a user-fixable failure becomes a reason on the page."""
    try:
        return step(), None
    except FedcareError as e:
        return None, str(e)


#: What the ε recomputation raises on a log entry that lacks a field, or holds one of a type
#: fedcare never writes (it reads the logs unverified: a hand-edited or forged log).
_MALFORMED_ENTRY_ERRORS = (KeyError, TypeError, ValueError, AttributeError)


def _recomputed_epsilon(run_dir: Path) -> tuple[EpsilonAudit | None, str | None]:
    """The ε recomputation, or why it failed: a user-fixable failure, or a log entry no
    fedcare wrote (a reason on the page, never a traceback)."""
    from fedcare.simulations.audit.epsilon import recompute_epsilon

    try:
        return recompute_epsilon(run_dir), None
    except FedcareError as e:
        return None, str(e)
    except _MALFORMED_ENTRY_ERRORS as e:
        return None, (
            f"an audit log of the run holds an entry that fedcare never writes ({type(e).__name__}"
            f": {str(e)[:200]}); the logs are not a fedcare run's as written: run `fedcare audit "
            f"verify {run_dir}` to find the entry"
        )


def _code_hash(run_dir: Path) -> str | None:
    """The code hash(es) the server's audit log signed at run start and resumes.

    Only entries that verify count; ``None`` when there is no log or no such entry (the
    verification section says why).
    """
    path = run_dir / SERVER_AUDIT_LOG
    if not path.is_file():
        return None
    try:
        verified = check_log(path).entries
    except FedcareError:
        return None
    hashes = [
        e.data.get(_CODE_HASH_KEY)
        for e in verified
        if e.kind in kinds.SERVER_START_KINDS and isinstance(e.data, dict)
    ]
    distinct = list(dict.fromkeys(h for h in hashes if isinstance(h, str) and h))
    return ", ".join(distinct) or None


def load_report_inputs(run_dir: Path) -> ReportInputs:
    """Load a run's findings: summary, record, log verification, ε recomputation, attacks.

    A failure of the verification or of the ε recomputation (a :class:`FedcareError`, e.g.
    a run without audit logs) does not stop the report: the page shows it and the verdict
    is ATTENTION.

    Parameters
    ----------
    run_dir:
        A finished run's directory (``summary.json``, ``server_record.json``, ``audit/``).

    Returns
    -------
    ReportInputs
        What :func:`build_report` needs.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a folder, or its summary, record or attack results cannot be
        read; the message names the file and the fix.
    """
    from fedcare.simulations.audit.verify import verify_paths

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir}: no such run directory; pass the folder a run wrote "
            "(`fedcare simulate --out DIR`)"
        )
    summary = load_summary(run_dir / SUMMARY_NAME)
    record = load_run_record(run_dir / RECORD_NAME)
    attacks = _load_attacks(run_dir / ATTACKS_FILE, run_dir)
    verify, verify_error = _guarded(lambda: verify_paths([run_dir]))
    if verify is None:
        verify = VerifyResult(
            ok=False, logs=[], cross_check_problems=[f"the logs cannot be verified: {verify_error}"]
        )
    epsilon, epsilon_error = _recomputed_epsilon(run_dir)
    return ReportInputs(
        summary=summary,
        record=record,
        verify=verify,
        epsilon=epsilon,
        attacks=attacks,
        epsilon_error=epsilon_error,
        run_dir=run_dir,
        code_hash=_code_hash(run_dir),
    )
