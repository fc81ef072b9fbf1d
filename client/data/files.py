"""A site's files, each read at most once per validation or load.

:class:`SiteFiles` is created per call (it is not a module-level cache): validation
reads every table and image through it, and :func:`~client.data.loaders.load_site`
hands the same object to the loaders, so nothing is parsed twice.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import numpy as np
import pandas as pd

from client.data.images import read_image
from client.data.tables import read_table
from common.errors import DataError

__all__ = ["SiteFiles", "normalize_relpath"]


def normalize_relpath(relpath: str) -> str:
    """A path as written in a spec or table, normalised to POSIX form.

    Examples
    --------
    >>> normalize_relpath("./imaging\\\\a/../b.png")
    'imaging/b.png'
    """
    return posixpath.normpath(relpath.replace("\\", "/"))


class SiteFiles:
    """Memoised reads of the tables and images under one site folder.

    Returned frames and arrays are shared between callers: treat them as read-only.

    Parameters
    ----------
    root:
        The folder holding ``site.toml``; every path is relative to it.
    id_column:
        The spec's patient-id column (always read as text).
    """

    def __init__(self, root: Path, *, id_column: str) -> None:
        self.root = Path(root)
        self.id_column = id_column
        self._tables: dict[str, pd.DataFrame | DataError] = {}
        self._images: dict[str, np.ndarray | DataError] = {}

    def path(self, relpath: str) -> Path:
        """The absolute path of a root-relative path."""
        return self.root / normalize_relpath(relpath)

    def exists(self, relpath: str) -> bool:
        """Whether the file exists."""
        return self.path(relpath).is_file()

    def table(self, relpath: str) -> pd.DataFrame:
        """The table at ``relpath``; a :class:`DataError` when it cannot be read."""
        key = normalize_relpath(relpath)
        if key not in self._tables:
            try:
                self._tables[key] = read_table(self.root / key, id_column=self.id_column)
            except DataError as e:
                self._tables[key] = e
        found = self._tables[key]
        if isinstance(found, DataError):
            raise found
        return found

    def image(self, relpath: str) -> np.ndarray:
        """The float32 image at ``relpath``; a :class:`DataError` when unreadable."""
        key = normalize_relpath(relpath)
        if key not in self._images:
            try:
                self._images[key] = read_image(self.root / key)
            except DataError as e:
                self._images[key] = e
        found = self._images[key]
        if isinstance(found, DataError):
            raise found
        return found
