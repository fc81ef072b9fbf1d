"""A site's files, each read at most once per validation or load, and never from outside.

:class:`SiteFiles` is created per call (it is not a module-level cache): validation
reads every table and image through it, and :func:`~fedcare.client.data.loaders.load_site`
hands the same object to the loaders, so nothing is parsed twice.

Every path a site names (in ``site.toml`` or in its imaging labels table) is confined to
the site folder: :meth:`SiteFiles.path` refuses an absolute path, a ``..`` that climbs
out, a symbolic link (to a file, or any folder on the way) that leads outside, and a
special file (FIFO, device, socket). A refusal names the path and why, never what the
file outside holds.
"""

from __future__ import annotations

import posixpath
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from fedcare.client.data.images import read_image
from fedcare.client.data.tables import read_table
from fedcare.common.errors import DataError

__all__ = [
    "CONFINEMENT_FIX",
    "PathOutsideSite",
    "SiteFiles",
    "confine",
    "image_relpath",
    "normalize_relpath",
]

CONFINEMENT_FIX = (
    "copy or move the file into the site folder and give its path relative to the folder "
    "holding site.toml (fedcare reads nothing outside a site's folder; a symbolic link or "
    "'..' may not lead out of it)"
)


class PathOutsideSite(DataError):
    """A path a site names would read outside the site folder, or a special file.

    Attributes
    ----------
    relpath:
        The path as the site wrote it.
    reason:
        Why it is refused (``"is an absolute path"``...); it never quotes the target.
    """

    def __init__(self, root: Path, relpath: str, reason: str) -> None:
        self.relpath = relpath
        self.reason = reason
        super().__init__(
            f"{root}: {relpath!r} {reason}; {CONFINEMENT_FIX}",
        )


def normalize_relpath(relpath: str) -> str:
    """A path as written in a spec or table, normalised to POSIX form.

    Examples
    --------
    >>> normalize_relpath("./imaging\\\\a/../b.png")
    'imaging/b.png'
    """
    return posixpath.normpath(relpath.replace("\\", "/"))


def _is_absolute(relpath: str) -> bool:
    posix = relpath.replace("\\", "/")
    return PurePosixPath(posix).is_absolute() or bool(PureWindowsPath(relpath).drive)


def image_relpath(folder: str, name: str) -> str:
    """The site-relative path of an image listed as ``name`` under the imaging ``folder``.

    An absolute ``name`` stays absolute (so that :meth:`SiteFiles.path` refuses it)
    rather than being folded under the folder.

    Examples
    --------
    >>> image_relpath("imaging", "scans/a.png"), image_relpath("imaging", "/etc/a.png")
    ('imaging/scans/a.png', '/etc/a.png')
    """
    if _is_absolute(name):
        return normalize_relpath(name)
    return normalize_relpath(f"{folder}/{name}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refusal(root: Path, relpath: str) -> str | None:
    """Why ``relpath`` may not be read from ``root``; None when it may."""
    if _is_absolute(relpath):
        return "is an absolute path"
    norm = normalize_relpath(relpath)
    if norm == ".." or norm.startswith("../"):
        return "climbs out of the site folder with '..'"
    try:
        real_root = root.resolve()
        current = root
        for part in PurePosixPath(norm).parts:
            current = current / part
            if current.is_symlink() and not _inside(current.resolve(), real_root):
                inner = current.relative_to(root).as_posix()
                if inner == norm:
                    return "is a symbolic link that leads outside the site folder"
                return f"lies under {inner!r}, a symbolic link that leads outside the site folder"
        target = (root / norm).resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop
        return "cannot be resolved (a symbolic-link loop?)"
    if not _inside(target, real_root):  # pragma: no cover - every escape is caught above
        return "resolves outside the site folder"
    try:
        mode = target.stat().st_mode
    except OSError:
        return None  # absent: the reader says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file (a FIFO, device or socket)"
    return None


def confine(root: str | Path, relpath: str) -> Path:
    """The path of ``relpath`` under the site folder ``root``, if it stays inside.

    Parameters
    ----------
    root:
        The site folder (the one holding ``site.toml``).
    relpath:
        A path as the site names it, relative to ``root``.

    Returns
    -------
    pathlib.Path
        ``root`` joined with the normalised ``relpath`` (the file need not exist).

    Raises
    ------
    PathOutsideSite
        When the path is absolute, climbs out with ``..``, goes through a symbolic link
        that leads outside ``root`` (resolved, so a ``root`` that is itself a link is
        fine), or names a special file.

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> confine(root, "a/../b.csv") == root / "b.csv"
    True
    >>> try:
    ...     confine(root, "../x.csv")
    ... except PathOutsideSite as e:
    ...     print(e.reason)
    climbs out of the site folder with '..'
    """
    root = Path(root)
    reason = _refusal(root, relpath)
    if reason is not None:
        raise PathOutsideSite(root, relpath, reason)
    return root / normalize_relpath(relpath)


class SiteFiles:
    """Memoised reads of the tables and images under one site folder.

    Returned frames and arrays are shared between callers: treat them as read-only.

    Parameters
    ----------
    root:
        The folder holding ``site.toml``; every path is relative to it and must stay
        inside it (see :func:`confine`).
    id_column:
        The spec's patient-id column (always read as text).
    """

    def __init__(self, root: Path, *, id_column: str) -> None:
        self.root = Path(root)
        self.id_column = id_column
        self._tables: dict[str, pd.DataFrame | DataError] = {}
        self._images: dict[str, np.ndarray | DataError] = {}

    def path(self, relpath: str) -> Path:
        """The path of a root-relative path; :class:`PathOutsideSite` if it leads out."""
        return confine(self.root, relpath)

    def exists(self, relpath: str) -> bool:
        """Whether the file exists; :class:`PathOutsideSite` if it leads out."""
        return self.path(relpath).is_file()

    def table(self, relpath: str) -> pd.DataFrame:
        """The table at ``relpath``; a :class:`DataError` when it cannot be read."""
        key = normalize_relpath(relpath)
        if key not in self._tables:
            try:
                self._tables[key] = read_table(self.path(relpath), id_column=self.id_column)
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
                self._images[key] = read_image(self.path(relpath))
            except DataError as e:
                self._images[key] = e
        found = self._images[key]
        if isinstance(found, DataError):
            raise found
        return found
