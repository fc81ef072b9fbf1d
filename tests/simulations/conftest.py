"""Shared synthetic runs: generated once per session, read by many tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcare.simulations.synth import SynthConfig, synthesize

#: Four sites with every default knob: covers png, npy, dicom and csv, parquet.
DEFAULT_SITES = 4
DEFAULT_SEED = 0


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthesize`` with the shipped defaults (4 sites x ~300 patients)."""
    out = tmp_path_factory.mktemp("synth-default") / "sites"
    synthesize(out, n_sites=DEFAULT_SITES, seed=DEFAULT_SEED, config=SynthConfig())
    return out


@pytest.fixture(scope="session")
def tiny_config() -> SynthConfig:
    """A fast config for tests that only need structure, not statistics."""
    return SynthConfig(patients_per_site=30, n_genes=12, image_size=16)
