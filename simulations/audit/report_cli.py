"""``fedcare audit report RUNDIR --out report.html``: the run's privacy audit as one HTML page.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~common.errors.FedcareError` and become one line on stderr there.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer

from common.errors import ConfigError
from simulations.audit.report import load_report_inputs

__all__ = ["audit_report", "write_text_atomic"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that a reader sees the old file or the new, never half.

    Parameters
    ----------
    path:
        Destination; its folder is created if missing.
    text:
        The content.

    Raises
    ------
    ConfigError
        If ``path`` is a folder or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; pass a file name, e.g. --out {path}/report.html")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    except OSError as e:
        raise ConfigError(f"{path}: cannot write there ({e}); choose another --out") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write it ({e}); choose another --out") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def audit_report(
    run_dir: Path = typer.Argument(..., help="A finished run's directory."),  # noqa: B008
    out: Path = typer.Option(..., "--out", help="The HTML file to write."),  # noqa: B008
) -> None:
    """Write the run's privacy audit as one self-contained HTML page (no network needed):
    verdict, ε per site per round by two accountants, utility, update norms, rejected
    updates and drop-outs, attack results and the audit-log verification.

    Prints the page's path, then the verdict (PASS, or ATTENTION with its reasons).

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a finished run, a file in it cannot be read, or ``out``
        cannot be written.
    """
    inputs = load_report_inputs(run_dir)
    write_text_atomic(out, inputs.html())
    verdict = inputs.verdict()
    typer.echo(f"wrote {out}")
    typer.echo(f"verdict: {verdict.label}")
    for check in verdict.checks:
        mark = "ok " if check.passed else "!! "
        typer.echo(f"  {mark}{check.title}: {check.detail}")
