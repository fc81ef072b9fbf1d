"""Patient-level splits: deterministic, order-free, independent of the other patients."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.client.data.split import SPLIT_NAMES, Split, patient_hash, split_patients
from fedcare.common.errors import ConfigError, DataError

IDS = [f"patient-{i:05d}" for i in range(10_000)]


def _index(split: Split) -> dict[str, str]:
    return {p: name for name in SPLIT_NAMES for p in split[name]}


def test_split_is_deterministic_and_seed_dependent() -> None:
    ids = IDS[:500]
    assert split_patients(ids, seed=7) == split_patients(list(ids), seed=7)
    assert split_patients(ids, seed=7) != split_patients(ids, seed=8)


def test_split_does_not_depend_on_order() -> None:
    ids = IDS[:2000]
    shuffled = ids[:]
    random.Random(3).shuffle(shuffled)
    assert split_patients(shuffled, seed=1) == split_patients(ids, seed=1)


def test_split_of_a_patient_does_not_depend_on_the_other_patients() -> None:
    full = _index(split_patients(IDS[:3000], seed=2))
    subset = random.Random(0).sample(IDS[:3000], 400) + [f"new-{i}" for i in range(50)]
    sub = _index(split_patients(subset, seed=2))
    assert all(sub[p] == full[p] for p in subset if p in full)
    # a new patient lands where it would land alone among many others
    alone = _index(split_patients([*IDS[5000:5100], "new-7"], seed=2))
    assert alone["new-7"] == sub["new-7"]


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.25, 0.25), (0.8, 0.1, 0.1)])
def test_fractions_hold_within_tolerance_on_10k_ids(fractions: tuple[float, ...]) -> None:
    sizes = split_patients(IDS, seed=0, fractions=fractions).sizes()
    assert sum(sizes.values()) == len(IDS)
    for name, frac in zip(SPLIT_NAMES, fractions, strict=True):
        # binomial sd at n=10k is <= 0.005; 0.02 is four sd or more
        assert abs(sizes[name] / len(IDS) - frac) < 0.02, (name, sizes)


def test_patient_hash_is_sha256_based_and_roughly_uniform() -> None:
    hashes = [patient_hash(p, seed=5) for p in IDS]
    assert all(0.0 <= u < 1.0 for u in hashes)
    assert abs(sum(hashes) / len(hashes) - 0.5) < 0.01
    deciles = [sum(int(u * 10) == d for u in hashes) for d in range(10)]
    assert min(deciles) > 900 and max(deciles) < 1100
    # changing the seed or the id changes the number; it equals a fresh SHA-256 reading
    assert patient_hash("a", seed=0) != patient_hash("a", seed=1) != patient_hash("b", seed=1)
    digest = hashlib.sha256(b"fedcare-split-v1:4:abc").digest()
    assert patient_hash("abc", seed=4) == int.from_bytes(digest[:8], "big") / 2.0**64


def test_each_patient_falls_in_its_hash_interval() -> None:
    split = split_patients(IDS[:1000], seed=9, fractions=(0.6, 0.3, 0.1))
    for p in split.train:
        assert patient_hash(p, seed=9) < 0.6
    for p in split.val:
        assert 0.6 <= patient_hash(p, seed=9) < 0.9
    for p in split.test:
        assert patient_hash(p, seed=9) >= 0.9


@pytest.mark.parametrize("n", range(3, 12))
def test_small_sites_get_three_non_empty_splits(n: int) -> None:
    ids = [f"s{i}" for i in range(n)]
    for seed in range(40):
        split = split_patients(ids, seed=seed)
        assert min(split.sizes().values()) >= 1, (n, seed, split)
        assert sorted(_index(split)) == sorted(ids)


def test_rebalancing_moves_the_lowest_hash_patient_of_the_largest_split() -> None:
    ids = [f"q{i}" for i in range(5)]
    # extreme fractions: every patient hashes into train, so val and test are filled by moves
    split = split_patients(ids, seed=0, fractions=(0.999998, 0.000001, 0.000001))
    by_hash = sorted(ids, key=lambda p: patient_hash(p, seed=0))
    assert split.val == (by_hash[0],)
    assert split.test == (by_hash[1],)
    assert set(split.train) == set(by_hash[2:])


def test_fewer_than_three_patients_are_not_padded() -> None:
    assert split_patients([]).sizes() == {"train": 0, "val": 0, "test": 0}
    assert sum(split_patients(["only"]).sizes().values()) == 1
    assert sum(split_patients(["a", "b"]).sizes().values()) == 2


@pytest.mark.parametrize(
    "fractions",
    [
        (0.7, 0.2, 0.2),
        (0.7, 0.3, 0.0),
        (1.2, -0.1, -0.1),
        (0.5, 0.5),
        (0.4, 0.2, 0.2, 0.2),
        (float("nan"), 0.5, 0.5),
    ],
)
def test_bad_fractions_are_config_errors(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="fractions"):
        split_patients(IDS[:10], fractions=fractions)


def test_duplicate_ids_are_rejected() -> None:
    with pytest.raises(DataError, match="unique.*p1"):
        split_patients(["p1", "p2", "p1", "p3"])


def test_split_object_rejects_overlap_and_unknown_names() -> None:
    with pytest.raises(DataError, match="more than one split"):
        Split(train=("a", "b"), val=("b",), test=("c",))
    with pytest.raises(KeyError, match="train, val, test"):
        Split(train=("a",), val=(), test=())["holdout"]


@settings(max_examples=60, deadline=None)
@given(
    ids=st.sets(st.text(min_size=1, max_size=12), min_size=0, max_size=60),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_split_is_a_sorted_partition(ids: set[str], seed: int) -> None:
    split = split_patients(ids, seed=seed)
    flat = [p for name in SPLIT_NAMES for p in split[name]]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    for name in SPLIT_NAMES:
        assert list(split[name]) == sorted(split[name])
    if len(ids) >= 3:
        assert min(split.sizes().values()) >= 1
