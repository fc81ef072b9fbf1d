"""``fedcare report model RUN-DIR [--out FILE]``: the run's model card as one HTML page.

A plain typer-annotated function; :mod:`fedcare.cli` mounts it. Errors are
:class:`~fedcare.common.errors.FedcareError` and become one line on stderr there.

The page goes to ``RUN-DIR/model_card.html`` unless ``--out`` names another file; like the
audit report, it never replaces another file of the run (only an earlier model card), and it
is written atomically, mode 0600. ``fedcare audit report`` links to the card at its default
place.
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedcare.common.run_files import MODEL_CARD_NAME
from fedcare.simulations.audit.model_card import (
    MODEL_CARD_GENERATOR,
    build_model_card,
    load_card_inputs,
)
from fedcare.simulations.audit.report_cli import check_report_out, write_text_atomic

__all__ = ["report_model"]


def report_model(
    run_dir: Path = typer.Argument(..., help="A finished run's directory."),  # noqa: B008
    out: Path | None = typer.Option(  # noqa: B008
        None,
        "--out",
        help=f"The HTML file to write (default: RUN-DIR/{MODEL_CARD_NAME}).",
    ),
) -> None:
    """Write the run's model card as one self-contained HTML page (no network needed): task
    and data per site, performance (global, per site, personalized, local-only, pooled),
    calibration, metrics per patient group with the largest gap, and privacy spent per site.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a finished run, or ``out`` cannot be written or is another
        file of the run.
    """
    target = Path(run_dir) / MODEL_CARD_NAME if out is None else Path(out)
    check_report_out(target, run_dir, generator=MODEL_CARD_GENERATOR)
    page = build_model_card(load_card_inputs(run_dir))
    write_text_atomic(target, page)
    typer.echo(f"wrote {target}")
