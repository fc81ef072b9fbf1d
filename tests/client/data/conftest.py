"""Fixtures of the site data tests: a small valid site written by hand into tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client.data._builders import BuiltSite, build_site


@pytest.fixture
def written_site(tmp_path: Path) -> BuiltSite:
    """A valid 12-patient site: EHR CSV + events, PNG/NPY/DICOM images, genomics Parquet."""
    return build_site(tmp_path / "site-0")
