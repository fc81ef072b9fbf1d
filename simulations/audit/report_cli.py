"""``fedcare audit report RUNDIR --out report.html``: the run's privacy audit as one HTML page.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~fedcare.common.errors.FedcareError` and become one line on stderr there.

The page never replaces a file of the run it reports on: an ``--out`` that is an existing
file inside the run directory (its summary, its signed audit log, a checkpoint, ...) is
refused before anything is computed, unless that file is an earlier report (it carries the
report's ``<meta name="generator">``). The page is written atomically, mode 0600.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedcare.common.errors import ConfigError
from fedcare.common.files import atomic_private
from fedcare.simulations.audit.report import REPORT_GENERATOR, load_report_inputs

__all__ = ["audit_report", "check_report_out", "write_text_atomic"]

#: How much of an existing file is read to recognise an earlier report.
_SNIFF_BYTES = 4096


def _is_report(path: Path, generator: str = REPORT_GENERATOR) -> bool:
    """Whether ``path`` is a page ``generator`` wrote (its head names the generator)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    marker = f'<meta name="generator" content="{generator}">'.encode()
    return head.startswith(b"<!DOCTYPE html>") and marker in head


def check_report_out(out: Path, run_dir: Path, *, generator: str = REPORT_GENERATOR) -> None:
    """Refuse an ``--out`` that is a folder, or an existing file of the run (see the module
    docstring) that is not an earlier page of ``generator``; symbolic links are followed to
    what they name.

    Raises
    ------
    ConfigError
        With the reason and another ``--out`` to use.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; pass a file name, e.g. --out {out}/report.html")
    target, run = out.resolve(), Path(run_dir).resolve()
    if target.is_file() and target.is_relative_to(run) and not _is_report(target, generator):
        raise ConfigError(
            f"--out {out}: that is {target.relative_to(run)}, a file of the run {run_dir}, and "
            f"the report would replace it; choose a new file, e.g. --out {run_dir}/report.html"
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that a reader sees the old file or the new, never half.

    Parameters
    ----------
    path:
        Destination; its folder is created (mode 0700) if missing; the file is mode 0600.
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
        with atomic_private(path) as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot write it ({e.strerror or e}); free disk space or choose another --out"
        ) from e


def audit_report(
    run_dir: Path = typer.Argument(..., help="A finished run's directory."),  # noqa: B008
    out: Path = typer.Option(  # noqa: B008
        ..., "--out", help="The HTML file to write (never one of the run's own files)."
    ),
) -> None:
    """Write the run's privacy audit as one self-contained HTML page (no network needed):
    verdict, ε per site per round by two accountants, utility, update norms, rejected
    updates and drop-outs, attack results and the audit-log verification.

    Prints the page's path, then the verdict (PASS, or ATTENTION with its reasons).

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a finished run, a file in it cannot be read, or ``out``
        cannot be written or is one of the run's own files.
    """
    check_report_out(out, run_dir)
    inputs = load_report_inputs(run_dir)
    write_text_atomic(out, inputs.html(out))
    verdict = inputs.verdict()
    typer.echo(f"wrote {out}")
    typer.echo(f"verdict: {verdict.label}")
    for check in verdict.checks:
        mark = "ok " if check.passed else "!! "
        typer.echo(f"  {mark}{check.title}: {check.detail}")
