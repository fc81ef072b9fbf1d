"""``fedcare audit report``: one self-contained HTML page about a run's privacy.

The public front of the report; each part lives in the module named for its job:

* :mod:`.report_verdict` -- the verdict (PASS or ATTENTION, with the reasons), pure;
* :mod:`.report_html` -- the page (:func:`build_report`, a pure function of the findings);
* :mod:`.report_load` -- loading a run directory into those findings;
* :mod:`.report_format` -- how every number is printed.

:func:`render_run_report` loads a run's findings and renders the page.
"""

from __future__ import annotations

from pathlib import Path

from fedcare.simulations.audit.report_format import fmt_num
from fedcare.simulations.audit.report_html import REPORT_GENERATOR, SECTION_IDS, build_report
from fedcare.simulations.audit.report_load import ReportInputs, load_report_inputs
from fedcare.simulations.audit.report_verdict import (
    ATTENTION,
    PASS,
    Check,
    Verdict,
    compute_verdict,
)

__all__ = [
    "SECTION_IDS",
    "REPORT_GENERATOR",
    "PASS",
    "ATTENTION",
    "Check",
    "Verdict",
    "ReportInputs",
    "compute_verdict",
    "build_report",
    "load_report_inputs",
    "render_run_report",
    "fmt_num",
]


def render_run_report(run_dir: Path) -> str:
    """The audit report of the run in ``run_dir`` (see :func:`load_report_inputs`).

    Parameters
    ----------
    run_dir:
        A finished run's directory.

    Returns
    -------
    str
        The HTML page.
    """
    return load_report_inputs(run_dir).html()
