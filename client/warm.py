"""A site's data, loaded once and kept in this process while it is unchanged.

Loading a site validates every file, reads the tables and images, and hashes every byte for
the dataset fingerprint; encoding a task builds its splits. A process that answers many
messages keeps both between them in a :class:`WarmSites`, so a round costs its training, not
a cold start: a deployed site's long-lived worker (:mod:`fedcare.client.worker`) keeps its one site,
and each process of a simulated federation (a Ray actor of Flower's simulation engine, which
answers the messages of many virtual sites) keeps the simulated sites it has served
(:mod:`fedcare.client.app` holds that process's cache).

What is kept is tied to the data folder's **signature**: the path, size, inode, and
modification and change times (ns) of ``site.toml`` and of every file under the folder. Any
write, replacement, rename, permission change or new file changes a change time, which no
user can set back, so the next message loads the site afresh; the fingerprint the ledger is
keyed by is then computed again from the bytes. Nothing patient-related is kept anywhere
but this process's memory: a pickled :class:`WarmSites` (an app shipped to another process)
is an empty one. The site's configuration, policy and ledger are read afresh for every
message: only the data is warm.

Memory is bounded: the least recently used site is dropped once more than ``max_sites`` are
kept, or once their estimated size (:func:`site_nbytes`) passes ``max_bytes``; a site larger
than ``max_bytes`` on its own is loaded for every message, as without a cache. Keeping the
100 sites of 50 patients of the scale benchmark, each with its encoded readmission task,
adds about 130 MiB to a process (1.3 MiB a site; :func:`site_nbytes` counts 0.5 MiB of
arrays, the rest is per-object overhead), so the defaults keep all of them in each
simulation process: a least-recently-used bound below the number of sites a round visits
in turn would drop every site just before its next message. Large sites are bounded by
their arrays, which then dominate.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcare.client.data.datasets import TaskData
from fedcare.client.data.loaders import load_site
from fedcare.client.data.site import SiteData
from fedcare.client.site_config import SiteConfig
from fedcare.common.run_files import SITE_STATE_DIR

__all__ = ["WarmSites", "data_signature", "site_nbytes"]

#: Folders under a data folder that hold state, not data (a simulated site keeps its ledger
#: in ``.fedcare/``); writes there do not make the data cold.
_STATE_FOLDERS = frozenset({SITE_STATE_DIR})

#: Default bounds of one process's cache (see the module docstring).
DEFAULT_MAX_SITES = 128
DEFAULT_MAX_BYTES = 512 << 20

Signature = tuple[tuple[str, int, int, int, int], ...]


def _stat_entries(root: Path, skip: Iterable[Path]) -> list[tuple[str, int, int, int, int]]:
    skipped = {p.resolve() for p in skip}
    entries = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if d not in _STATE_FOLDERS and (here / d).resolve() not in skipped
        )
        for name in sorted(files):
            try:
                st = (here / name).stat()
            except FileNotFoundError:
                continue  # removed while walking: the next signature differs anyway
            rel = str((here / name).relative_to(root))
            entries.append((rel, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
    return entries


def data_signature(root: Path, *, skip: Iterable[Path] = ()) -> Signature:
    """The signature of every file under ``root`` (``skip``: folders to leave out).

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "site.toml").write_text("a")
    >>> before = data_signature(d)
    >>> _ = (d / "site.toml").write_text("b")
    >>> data_signature(d) != before
    True
    """
    return tuple(_stat_entries(Path(root), skip))


def site_nbytes(site: SiteData) -> int:
    """An estimate of the memory ``site`` and its encoded tasks hold, in bytes.

    The arrays of its tables (deep, strings included) and images, counted twice: a task's
    encoded splits hold about as much again.
    """
    frames = (site.ehr, site.genomics, site.labels)
    held = sum(int(f.memory_usage(deep=True, index=True).sum()) for f in frames if f is not None)
    held += sum(a.nbytes for a in (site.images or {}).values())
    return 2 * held


@dataclass
class _Entry:
    signature: Signature
    site: SiteData
    nbytes: int
    task_data: dict[str, TaskData] = field(default_factory=dict)


class WarmSites:
    """The loaded site of each data folder, and its encoded tasks, while unchanged.

    Parameters
    ----------
    max_sites:
        The most sites kept; the least recently used is dropped first.
    max_bytes:
        The most memory the kept sites may hold, as :func:`site_nbytes` estimates it.

    ``loads`` counts the times a site was loaded from disk (a cold message); a test or a
    benchmark reads it to see what a message cost.
    """

    def __init__(
        self, *, max_sites: int = DEFAULT_MAX_SITES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_sites < 1 or max_bytes < 1:
            raise ValueError(
                f"WarmSites needs max_sites >= 1 and max_bytes >= 1, not {max_sites} and "
                f"{max_bytes}; to keep nothing, pass no WarmSites at all"
            )
        self.max_sites = max_sites
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Path, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def __len__(self) -> int:
        """The number of sites kept."""
        return len(self._entries)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # Patient data never travels: a copy made by pickling is an empty cache.
        return functools.partial(WarmSites, max_sites=self.max_sites, max_bytes=self.max_bytes), ()

    def get(self, site_cfg: SiteConfig) -> tuple[SiteData, dict[str, TaskData]]:
        """The site ``site_cfg`` names (a deployed site); see :meth:`load`."""
        return self.load(site_cfg.data, skip=[site_cfg.state_dir])

    def load(
        self, folder: Path | str, *, skip: Iterable[Path] = ()
    ) -> tuple[SiteData, dict[str, TaskData]]:
        """The site in ``folder`` and the shared cache of its encoded tasks.

        ``skip`` names folders under ``folder`` that hold the site's state, not its data.
        The returned task cache is for :class:`fedcare.client.local.SiteTrainer` (``task_data=``):
        a task encoded in one message is reused by the next while the data is unchanged.
        """
        root = Path(folder).resolve()
        skip = list(skip)
        with self._lock:
            signature = data_signature(root, skip=skip)
            entry = self._entries.get(root)
            if entry is not None and entry.signature == signature:
                self._entries.move_to_end(root)
                return entry.site, entry.task_data
            self._entries.pop(root, None)
            site = load_site(root)
            self.loads += 1
            # A file changed while it was loaded: keep it only if the signature still holds.
            if data_signature(root, skip=skip) != signature:
                return site, {}
            nbytes = site_nbytes(site)
            if nbytes > self.max_bytes:
                return site, {}  # too large to keep: it would push out every other site
            entry = _Entry(signature, site, nbytes)
            self._entries[root] = entry
            self._evict()
            return entry.site, entry.task_data

    def _evict(self) -> None:
        """Drop the least recently used sites until both bounds hold."""
        held = sum(e.nbytes for e in self._entries.values())
        while self._entries and (len(self._entries) > self.max_sites or held > self.max_bytes):
            _, dropped = self._entries.popitem(last=False)
            held -= dropped.nbytes
