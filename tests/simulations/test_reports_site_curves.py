"""Each simulated site's Kaplan-Meier curve (``plots/survival_curves.png``): drawn for a run
of a survival task from the sites' own files, and for any other task not drawn at all,
without the seconds of loading every site's files to find that out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

import fedcare.client.data.loaders as loaders
from fedcare.common.run_files import CONFIG_NAME, SITES_MANIFEST_NAME
from fedcare.simulations.reports import PLOTS_DIR, SURVIVAL_CURVES_NAME, write_survival_curves
from fedcare.simulations.synth import SynthConfig, synthesize


def _run_dir(tmp_path: Path, task: str) -> Path:
    folders = synthesize(
        tmp_path / "sites",
        n_sites=2,
        seed=0,
        config=SynthConfig(patients_per_site=60, n_genes=12, image_size=16, survival=True),
        force=True,
    )
    run = tmp_path / "run"
    run.mkdir()
    (run / SITES_MANIFEST_NAME).write_text(json.dumps([str(f) for f in folders]))
    (run / CONFIG_NAME).write_text(tomli_w.dumps({"federation": {"task": task}}))
    return run


def test_a_survival_run_draws_each_sites_curve(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "survival")
    assert write_survival_curves(run) == [run / PLOTS_DIR / SURVIVAL_CURVES_NAME]
    assert (run / PLOTS_DIR / SURVIVAL_CURVES_NAME).read_bytes().startswith(b"\x89PNG")


def test_any_other_task_draws_none_and_loads_no_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _run_dir(tmp_path, "readmission")

    def must_not_load(folder: object) -> None:
        raise AssertionError(f"loaded {folder} for a task without a survival label")

    monkeypatch.setattr(loaders, "load_site", must_not_load)
    assert write_survival_curves(run) == []
    assert not (run / PLOTS_DIR).exists()
