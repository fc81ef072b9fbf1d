"""fedcare.common.packed_arrays: a model as one array per dtype, aggregated as its tensors are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcare.common import keys
from fedcare.common.audit import hash_arrays
from fedcare.common.packed_arrays import (
    MAX_LAYOUT_CHARS,
    PACKED_PREFIX,
    layout_of,
    pack,
    pack_record,
    unpack,
    unpack_record,
)
from fedcare.models import build_model
from tests._flower import task_identity


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "body.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "body.0.bias": rng.normal(size=4).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
        "head.weight": rng.normal(size=(1, 4)).astype(np.float32),
    }


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        st.tuples(shapes, st.sampled_from(["float32", "float64", "int64"])),
        min_size=1,
        max_size=6,
    )
)
def test_unpack_inverts_pack_for_any_names_shapes_and_dtypes(spec: dict) -> None:
    state = {
        name: np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
        for name, (shape, dtype) in spec.items()
    }
    back = unpack_record(pack_record(state))
    assert list(back) == [n for g in layout_of(state) for n, _ in g]
    assert hash_arrays(back) == hash_arrays(state)


def test_one_array_per_dtype_whatever_the_tensor_count() -> None:
    packed = pack(_state())
    assert len(packed) == 2  # float32 and int64
    assert all(name.startswith(PACKED_PREFIX) for name in packed)
    assert sorted(v.size for v in packed.values()) == [1, 12 + 4 + 4]


def test_a_models_message_is_a_handful_of_objects_not_two_per_tensor() -> None:
    """What a deployed round pays for: one request per object of the message's tree."""
    state = build_model(
        "ehr_mlp", input_dims={"ehr": 12}, generator=torch.Generator().manual_seed(0)
    ).state_dict()
    assert len(state) >= 4

    def objects(arrays: ArrayRecord) -> int:
        content = RecordDict(
            {keys.REC_ARRAYS: arrays, keys.REC_METRICS: MetricRecord({"n": 1}), "c": ConfigRecord()}
        )
        with task_identity(run_id=1):
            return len(
                get_all_nested_objects(Message(content, dst_node_id=2, message_type="train"))
            )

    plain = objects(ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}))
    packed = objects(pack_record(state))
    assert packed == 2 + 5  # one array and its chunk, beside the message and its 4 records
    assert plain == 2 * len(state) + 5


def test_flower_aggregates_packed_models_exactly_as_their_tensors() -> None:
    """FedAvg over packed arrays equals FedAvg tensor by tensor (numpy reference)."""
    states = [_state(seed) for seed in range(3)]
    weights = [10, 30, 60]
    replies = []
    for state, n in zip(states, weights, strict=True):
        content = RecordDict(
            {"arrays": pack_record(state), "metrics": MetricRecord({"num-examples": n})}
        )
        replies.append(content)
    aggregate = unpack_record(aggregate_arrayrecords(replies, "num-examples"))
    plain = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        for state, n in zip(states, weights, strict=True)
    ]
    per_tensor = unpack_record(aggregate_arrayrecords(plain, "num-examples"))
    assert hash_arrays(aggregate) == hash_arrays(per_tensor)  # the same numbers, bit for bit
    for name in states[0]:
        expected = np.average([s[name] for s in states], axis=0, weights=weights)
        np.testing.assert_allclose(aggregate[name], expected, rtol=1e-6, atol=1e-6)


def test_a_layout_packs_values_of_another_dtype_under_the_same_names() -> None:
    """An optimizer's float64 moments of a float32 model meet the model's numbers."""
    model = {k: v for k, v in _state().items() if v.dtype == np.float32}
    moments = {k: np.ones(v.shape, np.float64) for k, v in model.items()}
    assert list(pack(moments, layout=layout_of(model))) == list(pack(model))


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        (PACKED_PREFIX + "not json", np.zeros(1), "not JSON"),
        (PACKED_PREFIX + "[]", np.zeros(0), "non-empty list"),
        (PACKED_PREFIX + json.dumps([["w", [-1]]]), np.zeros(1), "dims >= 0"),
        (PACKED_PREFIX + json.dumps([["w", [2.5]]]), np.zeros(1), "dims >= 0"),
        (PACKED_PREFIX + json.dumps([["w", [3]]]), np.zeros(4), "needs a flat array of 3"),
        (PACKED_PREFIX + json.dumps([["w", [2]], ["w", [2]]]), np.zeros(4), "twice"),
        (PACKED_PREFIX + json.dumps([["w", [2]]]), np.zeros((1, 2)), "flat array"),
        (PACKED_PREFIX + "[" * 5000, np.zeros(1), "nests too deeply"),
        (PACKED_PREFIX + " " * (MAX_LAYOUT_CHARS + 1), np.zeros(1), "characters, over"),
    ],
)
def test_a_malformed_layout_is_named_never_read(name: str, value: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        unpack({name: value})


def test_packed_and_plain_arrays_never_mix() -> None:
    packed = pack({"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="mix packed and plain"):
        unpack({**packed, "b": np.zeros(1)})


def test_plain_named_arrays_pass_through() -> None:
    state = _state()
    assert hash_arrays(unpack(state)) == hash_arrays(state)


def test_pack_refuses_a_state_that_is_not_its_layout() -> None:
    state = _state()
    with pytest.raises(ValueError, match="layout lists"):
        pack({"x": np.zeros(1)}, layout=layout_of(state))
    wrong = {**state, "head.weight": np.zeros((2, 4), np.float32)}
    with pytest.raises(ValueError, match="has shape"):
        pack(wrong, layout=layout_of(state))
