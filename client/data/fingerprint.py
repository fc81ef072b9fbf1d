"""The dataset fingerprint: the key under which the privacy ledger records a site's data.

The fingerprint is a SHA-256 over the canonical spec (its JSON with sorted keys, so
comments and key order in ``site.toml`` do not count) and over every data file the spec
names: the EHR table and events, every label table, the imaging labels table and every
image it lists, the genomics matrix. Files are taken in sorted order of their
POSIX-normalised relative paths; each contributes its path and the SHA-256 of its
bytes. Absolute paths, modification times and files the spec does not name play no
part, so the same data gives the same fingerprint on any machine, and flipping any byte
of any named file changes it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedcare.client.data.files import SiteFiles, image_relpath, normalize_relpath
from fedcare.client.data.tables import as_text
from fedcare.common.errors import DataError
from fedcare.common.spec import SiteSpec

__all__ = ["FINGERPRINT_VERSION", "spec_tables", "image_paths", "data_files", "dataset_fingerprint"]

FINGERPRINT_VERSION = b"fedcare-dataset-fingerprint-v1"
_CHUNK = 1 << 20


def spec_tables(spec: SiteSpec) -> list[str]:
    """Every table the spec names, normalised, each once, in spec order."""
    names = [path for field, path in spec.path_fields() if field != "imaging.folder"]
    return list(dict.fromkeys(normalize_relpath(n) for n in names))


def image_paths(spec: SiteSpec, files: SiteFiles) -> dict[int, str]:
    """Root-relative paths of the images listed in the imaging labels table.

    Returns
    -------
    dict
        0-based table row -> normalised root-relative path, for rows with a file (an
        absolute name stays absolute, so that reading it is refused).

    Raises
    ------
    DataError
        When the imaging labels table cannot be read or lacks the file column.
    """
    if spec.imaging is None:
        return {}
    table = files.table(spec.imaging.labels)
    column = spec.imaging.file_column
    if column not in table.columns:
        raise DataError(
            f"{spec.imaging.labels}: no column {column!r}; add it (one image path per "
            "patient, relative to the imaging folder) or set imaging.file_column"
        )
    folder = spec.imaging.folder
    out: dict[int, str] = {}
    for row, name in enumerate(as_text(table[column]).tolist()):
        if isinstance(name, str):
            out[row] = image_relpath(folder, name)
    return out


def data_files(spec: SiteSpec, files: SiteFiles) -> list[str]:
    """Sorted, de-duplicated root-relative paths of every data file the spec names."""
    names = set(spec_tables(spec)) | set(image_paths(spec, files).values())
    return sorted(names)


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DataError(
            f"{path}: cannot read it for the dataset fingerprint ({e}); add the file or "
            "fix the path in site.toml"
        ) from e
    return digest.digest()


def dataset_fingerprint(spec: SiteSpec, root: str | Path, *, files: SiteFiles | None = None) -> str:
    """SHA-256 (hex) over the canonical spec and the bytes of every data file it names.

    Parameters
    ----------
    spec:
        The site's validated spec.
    root:
        The folder holding ``site.toml``.
    files:
        Reuse an existing reader of this site (it already parsed the imaging labels
        table); a fresh one otherwise.

    Raises
    ------
    DataError
        When a named file is missing or unreadable, or lies outside the site folder
        (:class:`~fedcare.client.data.files.PathOutsideSite`).
    """
    files = files if files is not None else SiteFiles(Path(root), id_column=spec.patient_id)
    canonical = json.dumps(
        spec.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":")
    ).encode()
    outer = hashlib.sha256()
    outer.update(FINGERPRINT_VERSION + b"\0")
    outer.update(hashlib.sha256(canonical).digest())
    for relpath in data_files(spec, files):
        encoded = relpath.encode("utf-8")
        outer.update(len(encoded).to_bytes(8, "big") + encoded)
        outer.update(_file_digest(files.path(relpath)))
    return outer.hexdigest()
