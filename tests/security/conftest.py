"""Fixtures for the attacks in tests/security: small real hospitals, as a site holds them.

Synthetic sites opt into reproducible noise and exact evaluation in their ``site.toml``
(``[simulation]``); a real hospital's ``site.toml`` has no such table. ``real_site`` is the
same data without it, which is what every attack here is tried against.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData

TASK = "readmission"


@pytest.fixture(scope="session")
def synthetic_site(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """One small synthetic hospital as written by ``fedcare data synth`` (with its
    ``[simulation]`` opt-ins)."""
    from fedcare.simulations.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("security-site")
    config = SynthConfig(patients_per_site=200, size_skew=0.0, n_genes=12, image_size=16)
    synthesize(root, n_sites=1, seed=5, config=config)
    return load_site(root / "site-0")


@pytest.fixture(scope="session")
def real_site(synthetic_site: SiteData) -> SiteData:
    """The same patients as a real hospital holds them: no ``[simulation]`` table."""
    spec = synthetic_site.spec.model_copy(update={"simulation": None})
    return dataclasses.replace(synthetic_site, spec=spec)


@pytest.fixture()
def state_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "state"
    folder.mkdir()
    return folder
