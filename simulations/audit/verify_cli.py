"""``fedcare audit verify``: the command around the verifier (:mod:`.verify`).

It reads the trusted keys given with ``--key``, runs
:func:`~fedcare.simulations.audit.verify.verify_paths` and prints one line per log and per
cross-check problem (or the result as JSON); it exits 0 only when everything verifies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer

from fedcare.common.audit import load_public_key_file
from fedcare.common.errors import ConfigError
from fedcare.simulations.audit.verify import verify_paths

__all__ = ["audit_verify"]


def _trusted_keys(specs: Sequence[Path]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for spec in specs:
        writer, sep, file = str(spec).partition("=")
        if not sep or not writer or not file:
            raise ConfigError(
                f"--key {spec}: give WRITER=KEYFILE, e.g. --key server=/secure/server-key.pub "
                "or --key site-0=site-0-audit-key.pem"
            )
        out[writer] = load_public_key_file(Path(file))
    return out


def audit_verify(
    paths: list[Path] = typer.Argument(  # noqa: B008
        ..., help="Audit logs (.jsonl) and/or run directories."
    ),
    key: list[Path] = typer.Option(  # noqa: B008
        [],
        "--key",
        help=(
            "WRITER=KEYFILE: the trusted public key of a writer ('server' or a site id), as a "
            "PEM public or private key or the raw key in base64/hex. That writer's log must "
            "be signed with it. Repeatable."
        ),
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify audit logs: each one intact and signed, and server and sites consistent.

    Exits 0 only when every log verifies and no cross-check fails; 1 otherwise.

    Raises
    ------
    ConfigError
        If a path does not exist or a --key is malformed.
    """
    result = verify_paths(paths, trusted_keys=_trusted_keys(key))
    if json_out:
        typer.echo(result.model_dump_json(indent=2))
    else:
        for log in result.logs:
            status = "OK" if log.ok else f"FIRST BAD LINE {log.first_bad_line}: {log.problem}"
            writer = log.writer or "?"
            typer.echo(
                f"{log.path}: writer {writer}, {log.entries} entries, key "
                f"{log.key_fingerprint or '?'}, {status}"
            )
            for notice in log.notices:
                typer.echo(f"  notice: {notice}")
        for problem in result.cross_check_problems:
            typer.echo(f"cross-check: {problem}")
        if not key:
            typer.echo(
                "note: no --key given: each log was checked against the key in its own first "
                "entry; compare the key fingerprints above with the ones each writer published"
            )
        typer.echo("verified: OK" if result.ok else "verified: FAILED")
    if not result.ok:
        raise typer.Exit(1)
