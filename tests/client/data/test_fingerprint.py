"""The dataset fingerprint: stable across runs and folders, changed by any named byte."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fedcare.client.data.files import SiteFiles
from fedcare.client.data.fingerprint import data_files, dataset_fingerprint
from fedcare.common.errors import DataError
from fedcare.common.spec import SiteSpec, load_site_spec
from tests.client.data._builders import BuiltSite


def _fp(root: Path) -> str:
    return dataset_fingerprint(load_site_spec(root), root)


def test_fingerprint_is_a_stable_sha256(written_site: BuiltSite, tmp_path: Path) -> None:
    first = _fp(written_site.root)
    assert len(first) == 64 and int(first, 16) >= 0
    assert _fp(written_site.root) == first
    copy = tmp_path / "elsewhere" / "another-name"
    shutil.copytree(written_site.root, copy)
    assert _fp(copy) == first  # absolute paths and mtimes play no part


def test_fingerprint_covers_every_named_file(written_site: BuiltSite) -> None:
    site = written_site
    spec = SiteSpec.model_validate(site.spec)
    names = data_files(spec, SiteFiles(site.root, id_column="patient_id"))
    images = sorted(f"imaging/{n}" for n in site.image_files.values())
    assert names == sorted(
        ["ehr.csv", "events.csv", "imaging/labels.csv", "genomics.parquet", *images]
    )


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "target",
    ["ehr.csv", "events.csv", "imaging/labels.csv", "genomics.parquet", ".png", ".npy", ".dcm"],
)
def test_one_flipped_byte_changes_the_fingerprint(written_site: BuiltSite, target: str) -> None:
    site = written_site
    before = _fp(site.root)
    if target.startswith("."):
        target = next(f"imaging/{n}" for n in site.image_files.values() if n.endswith(target))
    path = site.path(target)
    _flip(path, len(path.read_bytes()) - 3)  # late in the file: pixel data, last rows
    assert _fp(site.root) != before


def test_spec_content_counts_but_its_formatting_does_not(written_site: BuiltSite) -> None:
    site = written_site
    before = _fp(site.root)
    toml = site.path("site.toml")
    toml.write_text("# a comment\n\n" + toml.read_text())
    assert _fp(site.root) == before
    site.spec["schema"]["ehr"][1]["max"] = 81
    site.write_spec()
    assert _fp(site.root) != before


def test_files_the_spec_does_not_name_do_not_count(written_site: BuiltSite) -> None:
    site = written_site
    before = _fp(site.root)
    (site.root / "notes.txt").write_text("hello")
    (site.root / "imaging" / "unlisted.png").write_bytes(b"x")
    assert _fp(site.root) == before


def test_renaming_a_file_changes_the_fingerprint(written_site: BuiltSite) -> None:
    site = written_site
    before = _fp(site.root)
    site.path("events.csv").rename(site.path("events2.csv"))
    site.spec["ehr"]["events"] = "events2.csv"
    site.write_spec()
    assert _fp(site.root) != before


def test_missing_named_file_is_a_data_error(written_site: BuiltSite) -> None:
    site = written_site
    site.path("genomics.parquet").unlink()
    with pytest.raises(DataError, match=r"genomics\.parquet.*fix the path in site\.toml"):
        _fp(site.root)
