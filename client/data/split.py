"""Patient-level train/val/test splits by hashing: stable, order-free, reproducible.

A patient's split is a function of ``(seed, patient id)`` alone: SHA-256 of the pair gives a
number ``u`` uniform on ``[0, 1)``, and ``u`` falls into the train, val or test interval laid
out by ``fractions``. So adding, removing or reordering other patients never moves a patient
from one split to another, and the same patient lands in the same split for every task that
uses the same seed (no patient is in one task's train set and another task's test set).

The split is *not* stratified by label: stratifying needs a ranking within each class, which
would make a patient's split depend on the other patients. Class balance therefore follows
the site's prevalence only in expectation; :func:`fedcare.client.data.datasets.build_task_data`
refuses a train split holding one class only.

One exception keeps small sites usable: with three or more patients every split is made
non-empty by moving, from the largest split, its lowest-hash patient into each empty split
(see :func:`split_patients`). This touches only sites so small that a split came out empty.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedcare.common.errors import ConfigError, DataError

__all__ = ["SPLIT_NAMES", "DEFAULT_FRACTIONS", "Split", "patient_hash", "split_patients"]

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
_HASH_DOMAIN = "fedcare-split-v1"


@dataclass(frozen=True)
class Split:
    """Patient ids of each split, each tuple sorted; the three are disjoint.

    Examples
    --------
    >>> s = Split(train=("a", "b"), val=("c",), test=("d",))
    >>> s["val"], s.sizes()
    (('c',), {'train': 2, 'val': 1, 'test': 1})
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for name in SPLIT_NAMES:
            ids = self[name]
            overlap = seen.intersection(ids)
            if overlap:
                raise DataError(
                    f"patient {sorted(overlap)[0]!r} is in more than one split; "
                    "build splits with split_patients()"
                )
            seen.update(ids)

    def __getitem__(self, name: str) -> tuple[str, ...]:
        """The ids of split ``name`` (one of :data:`SPLIT_NAMES`)."""
        if name not in SPLIT_NAMES:
            raise KeyError(f"no split {name!r}; the splits are {', '.join(SPLIT_NAMES)}")
        ids: tuple[str, ...] = getattr(self, name)
        return ids

    def sizes(self) -> dict[str, int]:
        """Number of patients per split, in :data:`SPLIT_NAMES` order."""
        return {name: len(self[name]) for name in SPLIT_NAMES}


def patient_hash(patient_id: str, *, seed: int = 0) -> float:
    """A number uniform on ``[0, 1)`` from SHA-256 of ``(seed, patient_id)``.

    Parameters
    ----------
    patient_id:
        The patient's id (``str``).
    seed:
        Selects an independent split; the same seed always gives the same number.

    Examples
    --------
    >>> patient_hash("p1", seed=0) == patient_hash("p1", seed=0)
    True
    >>> 0.0 <= patient_hash("p1", seed=3) < 1.0
    True
    """
    digest = hashlib.sha256(f"{_HASH_DOMAIN}:{int(seed)}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3:
        raise ConfigError(
            f"split fractions {tuple(fractions)} must give three numbers (train, val, test), "
            "e.g. (0.7, 0.15, 0.15)"
        )
    if not all(math.isfinite(f) and f > 0.0 for f in values):
        raise ConfigError(
            f"split fractions {values} must each be above 0; give every split a share, "
            "e.g. (0.7, 0.15, 0.15)"
        )
    if not math.isclose(sum(values), 1.0, rel_tol=0.0, abs_tol=1e-6):
        raise ConfigError(f"split fractions {values} sum to {sum(values):.6g}, not 1; rescale them")
    return values[0], values[1], values[2]


def split_patients(
    patient_ids: Iterable[str],
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Split:
    """Assign each patient to train, val or test by hashing ``(seed, patient id)``.

    Parameters
    ----------
    patient_ids:
        Unique patient ids, in any order.
    seed:
        Selects the split; fixed default so runs are reproducible.
    fractions:
        ``(train, val, test)`` shares, each above 0, summing to 1.

    Returns
    -------
    Split
        Disjoint, sorted tuples of ids. With three or more patients no split is empty:
        each empty split receives the lowest-hash patient of the (then) largest split,
        ties between equally large splits going to the earlier of train, val, test.

    Raises
    ------
    ConfigError
        When ``fractions`` is not three positive numbers summing to 1.
    DataError
        When a patient id appears twice.

    Examples
    --------
    >>> ids = [f"p{i}" for i in range(100)]
    >>> a = split_patients(ids, seed=1)
    >>> b = split_patients(reversed(ids), seed=1)
    >>> a == b and sum(a.sizes().values()) == 100
    True
    """
    f_train, f_val, _ = _check_fractions(fractions)
    ids = [str(p) for p in patient_ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(p for p, k in Counter(ids).items() if k > 1)
        raise DataError(
            f"patient ids must be unique to split them; repeated: {', '.join(dupes[:5])}"
        )
    bounds = (f_train, f_train + f_val)
    hashes = {p: patient_hash(p, seed=seed) for p in ids}
    groups: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for p, u in hashes.items():
        name = "train" if u < bounds[0] else "val" if u < bounds[1] else "test"
        groups[name].append(p)
    if len(ids) >= len(SPLIT_NAMES):
        for empty in SPLIT_NAMES:
            if groups[empty]:
                continue
            donor = max(SPLIT_NAMES, key=lambda n: (len(groups[n]), -SPLIT_NAMES.index(n)))
            moved = min(groups[donor], key=lambda p: (hashes[p], p))
            groups[donor].remove(moved)
            groups[empty].append(moved)
    return Split(**{name: tuple(sorted(groups[name])) for name in SPLIT_NAMES})
