"""``synthesize``: N synthetic hospitals on disk, plus a manifest with the Bayes AUROCs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcare.common.errors import ConfigError
from fedcare.common.spec import FeatureSchema, GroupAttribute, ImagingSchema
from fedcare.models.metrics import auroc
from fedcare.simulations.synth.cohort import SyntheticSite, simulate_site, site_sizes
from fedcare.simulations.synth.config import SynthConfig
from fedcare.simulations.synth.ehr import MISSABLE, ehr_features, event_features
from fedcare.simulations.synth.genomics import GeneBiology, draw_biology, genomics_schema
from fedcare.simulations.synth.latent import rng_for
from fedcare.simulations.synth.manifest import (
    MANIFEST_FILENAME,
    TRUTH_FILENAME,
    write_manifest,
)
from fedcare.simulations.synth.tasks import TASKS
from fedcare.simulations.synth.timeline import (
    LABEL_COLUMN,
    temporal_event_features,
    timeline_schema,
)
from fedcare.simulations.synth.timeline import SIGNAL as TEMPORAL_SIGNAL
from fedcare.simulations.synth.timeline import TASK as TEMPORAL_TASK
from fedcare.simulations.synth.writer import TABLE_WRITERS, write_site

__all__ = ["synthesize", "build_schema", "MAX_SITES", "SYNTH_GROUPS"]

MAX_SITES = 1000


#: The group attributes a synthetic federation declares with ``SynthConfig(groups=True)``.
SYNTH_GROUPS: tuple[GroupAttribute, ...] = (
    GroupAttribute(name="sex", column="sex", description="administrative sex"),
    GroupAttribute(
        name="age_band", column="age", cuts=(50.0, 70.0), description="age at admission"
    ),
)


def build_schema(config: SynthConfig, biology: GeneBiology) -> FeatureSchema:
    """The federation-wide schema: identical for every site of one run."""
    return FeatureSchema(
        ehr=ehr_features(),
        events=(*event_features(), *(temporal_event_features() if config.temporal_signal else ())),
        genomics=genomics_schema(biology),
        imaging=ImagingSchema(shape=(config.image_size, config.image_size)),
        timelines=(timeline_schema(),) if config.temporal_signal else (),
        groups=SYNTH_GROUPS if config.groups else (),
    )


def _site_folder(i: int) -> str:
    return f"site-{i}"


def _stale_sites(out: Path, n_sites: int) -> list[Path]:
    """Generated site folders numbered ``n_sites`` or above (left by a larger earlier run)."""
    if not out.is_dir():
        return []
    return sorted(
        p
        for p in out.glob("site-*")
        if p.is_dir()
        and p.name.removeprefix("site-").isdigit()
        and int(p.name.removeprefix("site-")) >= n_sites
        and (p / "site.toml").is_file()
    )


def _check_args(out: Path, n_sites: int, seed: int, force: bool) -> None:
    if not 1 <= n_sites <= MAX_SITES:
        raise ConfigError(
            f"cannot synthesize {n_sites} sites; ask for between 1 and {MAX_SITES} (--sites)"
        )
    if seed < 0:
        raise ConfigError(f"seed {seed} is negative; use a seed >= 0 (--seed)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; choose another --out")
    if force:
        return
    taken = [
        out / name
        for name in [*(_site_folder(i) for i in range(n_sites)), MANIFEST_FILENAME, TRUTH_FILENAME]
        if (out / name).is_file() or ((out / name).is_dir() and any((out / name).iterdir()))
    ] + _stale_sites(out, n_sites)
    if taken:
        shown = ", ".join(str(p) for p in taken[:3]) + (" ..." if len(taken) > 3 else "")
        raise ConfigError(
            f"refusing to overwrite existing data: {shown}; pass --force (force=True) to "
            "replace it, or choose an empty --out folder"
        )


def _site_summary(site: SyntheticSite, image_format: str, table_format: str) -> dict[str, Any]:
    prevalence = {t: float(site.truth[f"y_{t}"].mean()) for t in _tasks_in(site.truth)}
    return {
        "site_id": site.site_id,
        "folder": _site_folder(site.index),
        "n_patients": site.n_patients,
        "n_imaging": len(site.image_ids),
        "n_genomics": len(site.genomics),
        "image_format": image_format,
        "table_format": table_format,
        "prevalence": prevalence,
        "ehr_missing_fraction": float(site.ehr[list(MISSABLE)].isna().to_numpy().mean()),
        "scanner": site.scanner.as_dict(),
        "covariate_shift": {
            "frailty": site.shift.frailty,
            "age": site.shift.age,
            "bmi": site.shift.bmi,
            **{f"lab_{k}": v for k, v in site.shift.labs.items()},
        },
        "intercept_shift": dict(site.shift.intercepts),
    }


def _tasks_in(truth: pd.DataFrame) -> list[str]:
    """The tasks whose labels ``truth`` holds (the temporal one only when generated)."""
    return [*TASKS, *([TEMPORAL_TASK] if f"y_{TEMPORAL_TASK}" in truth.columns else [])]


def _task_summary(truth: pd.DataFrame) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for name in _tasks_in(truth):
        p = truth[f"p_{name}"].to_numpy(dtype=float)
        y = truth[f"y_{name}"].to_numpy()
        both = 0 < y.sum() < len(y)
        if name in TASKS:
            task = TASKS[name]
            where = {"label_column": task.column, "label_table": task.table}
            modalities, signal = list(task.modalities), task.signal
        else:
            where = {"label_column": LABEL_COLUMN, "label_table": "outcomes"}
            modalities, signal = ["ehr"], TEMPORAL_SIGNAL
        tasks[name] = {
            **where,
            "modalities": modalities,
            "prevalence": float(y.mean()),
            "bayes_auroc": auroc(y, p) if both else None,
            "signal": signal,
        }
    return tasks


def _move_into(src: Path, dst: Path, trash: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is first moved into ``trash``."""
    if dst.exists():
        os.replace(dst, trash / f"old-{dst.name}")
    os.replace(src, dst)


def synthesize(
    out: Path,
    *,
    n_sites: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    force: bool = False,
) -> list[Path]:
    """Write ``n_sites`` synthetic hospitals under ``out``; returns their folders.

    Writes ``out/site-<i>/`` (see :mod:`fedcare.simulations.synth.writer` for the layout),
    ``out/synth.json`` (seed, config, per-site sizes and prevalences, per-task Bayes
    AUROC and what carries the signal) and ``out/synth_truth.csv`` (every patient's true
    probabilities and labels; not part of any site). Everything is generated in a
    temporary folder beside ``out`` and renamed into place, so a failure leaves ``out``
    as it was. The same ``seed`` and ``config`` give byte-identical files.

    Parameters
    ----------
    out:
        The folder to write into (created when missing).
    n_sites:
        Number of sites, 1 to :data:`MAX_SITES`.
    seed:
        Non-negative seed; every random stream derives from ``(seed, site index)``.
    config:
        The generator's knobs; ``None`` uses :class:`SynthConfig` defaults.
    force:
        Replace existing site folders and manifest instead of refusing.

    Raises
    ------
    ConfigError
        Bad arguments, or ``out`` already holds data and ``force`` is false.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     folders = synthesize(Path(d) / "sites", n_sites=2, seed=3,
    ...                          config=SynthConfig(patients_per_site=20, n_genes=12))
    ...     [f.name for f in folders]
    ['site-0', 'site-1']
    """
    config = config if config is not None else SynthConfig()
    out = Path(out).resolve()
    _check_args(out, n_sites, seed, force)
    biology = draw_biology(rng_for(seed, "biology"), n_genes=config.n_genes)
    schema = build_schema(config, biology)
    sizes = site_sizes(seed=seed, n_sites=n_sites, config=config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.synth-", dir=out.parent))
    try:
        staged = tmp / "staged"
        staged.mkdir()
        summaries, truths = [], []
        for i, n in enumerate(sizes):
            site = simulate_site(seed=seed, index=i, n=n, config=config, biology=biology)
            image_format = config.image_format_for(site=i)
            table_format = config.table_format_for(site=i)
            write_site(
                staged / _site_folder(i),
                site,
                schema=schema,
                image_format=image_format,
                table_format=table_format,
                seed=seed,
                simulated=config.simulated,
            )
            summaries.append(_site_summary(site, image_format, table_format))
            truths.append(site.truth)
        truth = pd.concat(truths, ignore_index=True)
        TABLE_WRITERS["csv"].write(staged / TRUTH_FILENAME, truth)
        manifest = {
            "generator": "fedcare.simulations.synth",
            "seed": seed,
            "n_sites": n_sites,
            "config": config.model_dump(mode="json"),
            "schema_fingerprint": schema.fingerprint(),
            "driver_genes": list(biology.driver_names),
            "n_patients": int(np.sum(sizes)),
            "sites": summaries,
            "tasks": _task_summary(truth),
            "truth_file": TRUTH_FILENAME,
            "bayes_auroc_note": (
                "AUROC of the true probabilities against the sampled labels over all "
                "generated patients (every site pooled); an upper bound for any model."
            ),
        }
        write_manifest(staged / MANIFEST_FILENAME, manifest)

        out.mkdir(exist_ok=True)
        trash = tmp / "replaced"
        trash.mkdir()
        for i in range(n_sites):
            _move_into(staged / _site_folder(i), out / _site_folder(i), trash)
        _move_into(staged / TRUTH_FILENAME, out / TRUTH_FILENAME, trash)
        _move_into(staged / MANIFEST_FILENAME, out / MANIFEST_FILENAME, trash)
        # A smaller run replacing a larger one must not leave the old sites behind: a later
        # --data-root run would take them for part of this federation.
        for stale in _stale_sites(out, n_sites):
            stale.rename(trash / stale.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / _site_folder(i) for i in range(n_sites)]
