"""Commands of the ``simulations`` package, as plain typer-annotated functions.

``fedcare/cli.py`` mounts them (``data_synth`` is ``fedcare data synth``); errors are
raised as :class:`~fedcare.common.errors.ConfigError` and printed there as one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from fedcare.common.errors import ConfigError
from fedcare.common.spec import format_validation_error
from fedcare.common.tomlcompat import tomllib
from fedcare.simulations.synth.config import IMAGE_FORMATS, TABLE_FORMATS, SynthConfig
from fedcare.simulations.synth.generator import MAX_SITES, synthesize
from fedcare.simulations.synth.manifest import MANIFEST_FILENAME

__all__ = ["data_synth", "build_synth_config"]


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise ConfigError(
            f"unknown {option.removeprefix('--').replace('-', ' ')} {value!r}; "
            f"use one of {', '.join(allowed)} ({option})"
        )
    return value


def build_synth_config(
    *,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> SynthConfig:
    """A :class:`SynthConfig` from an optional TOML file of knobs, then ``overrides``.

    ``None`` values in ``overrides`` are ignored (the file's or the default value wins).

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a knob is unknown or out of range.
    """
    knobs: dict[str, Any] = {}
    source = "synth config"
    if config_file is not None:
        source = str(config_file)
        try:
            knobs = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"{config_file}: no such file; fix the --config path") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{config_file}: not valid TOML ({e}); fix the syntax") from e
    knobs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return SynthConfig.model_validate(knobs)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from e


def data_synth(
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write site-<i>/ and synth.json into.")
    ],
    sites: Annotated[
        int, typer.Option("--sites", help=f"Number of hospitals (1 to {MAX_SITES}).")
    ] = 4,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed (>= 0); the same seed gives the same files.")
    ] = 0,
    patients: Annotated[
        int | None, typer.Option("--patients", help="Mean patients per site (default 300).")
    ] = None,
    image_format: Annotated[
        str | None,
        typer.Option("--image-format", help="mixed (cycle by site; default), png, npy or dicom."),
    ] = None,
    table_format: Annotated[
        str | None,
        typer.Option("--table-format", help="mixed (alternate by site; default), csv or parquet."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="TOML file of generator knobs (SynthConfig fields)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing site folders and manifest.")
    ] = False,
    for_deployment: Annotated[
        bool,
        typer.Option(
            "--for-deployment",
            help="No [simulation] opt-ins (reproducible noise, exact evaluation) in site.toml: "
            "hospitals for `fedcare site start`.",
        ),
    ] = False,
) -> None:
    """Write synthetic hospitals (EHR, imaging, genomics) with known Bayes-optimal AUROCs."""
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1 (got {sites}); ask for 1 or more sites")
    if image_format is not None:
        _choice(image_format, ("mixed", *IMAGE_FORMATS), "--image-format")
    if table_format is not None:
        _choice(table_format, ("mixed", *TABLE_FORMATS), "--table-format")
    cfg = build_synth_config(
        config_file=config,
        overrides={
            "patients_per_site": patients,
            "image_format": image_format,
            "table_format": table_format,
            "simulated": False if for_deployment else None,
        },
    )
    folders = synthesize(out, n_sites=sites, seed=seed, config=cfg, force=force)
    manifest = json.loads((folders[0].parent / MANIFEST_FILENAME).read_text(encoding="utf-8"))
    _print_summary(manifest, folders[0].parent)


def _print_summary(manifest: dict[str, Any], out: Path) -> None:
    """One table row per site written, then one per task with its Bayes AUROC."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sites = Table(title=f"{manifest['n_sites']} synthetic sites (seed {manifest['seed']})")
    for col in ("site", "patients", "imaging", "genomics", "files"):
        sites.add_column(col, no_wrap=True)
    for s in manifest["sites"]:
        sites.add_row(
            s["folder"],
            str(s["n_patients"]),
            str(s["n_imaging"]),
            str(s["n_genomics"]),
            f"{s['image_format']} + {s['table_format']}",
        )
    console.print(sites)
    tasks = Table(title="Bayes-optimal AUROC per task (true probabilities, all patients)")
    for col in ("task", "Bayes AUROC", "prevalence", "site prevalences"):
        tasks.add_column(col, no_wrap=True)
    for task, info in manifest["tasks"].items():
        value = info["bayes_auroc"]
        per_site = [s["prevalence"][task] for s in manifest["sites"]]
        tasks.add_row(
            task,
            "n/a" if value is None else f"{value:.3f}",
            f"{info['prevalence']:.2f}",
            f"{min(per_site):.2f} - {max(per_site):.2f}",
        )
    console.print(tasks)
    console.print(f"wrote {manifest['n_sites']} sites and synth.json to {out}", soft_wrap=True)
