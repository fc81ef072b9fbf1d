"""A deployed site's data, loaded once and kept while it is unchanged (the site worker's).

Loading a site validates every file, reads the tables and images, and hashes every byte for
the dataset fingerprint; encoding a task builds its splits. A long-lived site worker
(:mod:`client.worker`) keeps both between messages in a :class:`WarmSites`, so a round costs
its training, not a cold start.

What is kept is tied to the data folder's **signature**: the path, size, inode, and
modification and change times (ns) of ``site.toml`` and of every file under the folder. Any
write, replacement, rename, permission change or new file changes a change time, which no
user can set back, so the next message loads the site afresh; the fingerprint the ledger is
keyed by is then computed again from the bytes. Nothing patient-related is kept anywhere
but this process's memory. The site's configuration, policy and ledger are read afresh for
every message: only the data is warm.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from client.data.datasets import TaskData
from client.data.loaders import load_site
from client.data.site import SiteData
from client.site_config import SiteConfig

__all__ = ["WarmSites", "data_signature"]

#: Folders under a data folder that hold state, not data (a simulated site keeps its ledger
#: in ``.fedcare/``); writes there do not make the data cold.
_STATE_FOLDERS = frozenset({".fedcare"})

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


@dataclass
class _Entry:
    signature: Signature
    site: SiteData
    task_data: dict[str, TaskData] = field(default_factory=dict)


class WarmSites:
    """The loaded site of each data folder, and its encoded tasks, while unchanged.

    ``loads`` counts the times a site was loaded from disk (a cold message); a test or a
    benchmark reads it to see what a message cost.
    """

    def __init__(self) -> None:
        self._entries: dict[Path, _Entry] = {}
        self.loads = 0

    def get(self, site_cfg: SiteConfig) -> tuple[SiteData, dict[str, TaskData]]:
        """The site ``site_cfg`` names and the shared cache of its encoded tasks.

        The returned task cache is for :class:`client.local.SiteTrainer` (``task_data=``):
        a task encoded in one message is reused by the next while the data is unchanged.
        """
        root = Path(site_cfg.data).resolve()
        signature = data_signature(root, skip=[site_cfg.state_dir])
        entry = self._entries.get(root)
        if entry is None or entry.signature != signature:
            self._entries.pop(root, None)
            site = load_site(root)
            self.loads += 1
            # A file changed while it was loaded: keep it only if the signature still holds.
            if data_signature(root, skip=[site_cfg.state_dir]) != signature:
                return site, {}
            entry = _Entry(signature, site)
            self._entries[root] = entry
        return entry.site, entry.task_data
