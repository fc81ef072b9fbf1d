"""A model's tensors as one array per dtype on the wire: the form fedcare's messages use.

Flower 1.42 moves a message as a tree of objects, one request each between a SuperNode and
the SuperLink: the message, its records, and an array plus a chunk for every tensor. A model
of eight tensors is 16 of a message's ~20 objects, so a deployed round paid for its tensor
count in round trips. fedcare sends a model *packed*: every tensor of one dtype flattened and
concatenated, in the model's order, into one array whose name is its layout::

    fedcare-packed-v1:[["body.0.weight", [64, 32]], ["body.0.bias", [64]], ...]

The name travels with the array through Flower's strategies: they aggregate an
``ArrayRecord`` array by array and keep the names, and every strategy fedcare offers
(FedAvg, FedProx, FedAdam, FedYogi, FedMedian, FedTrimmedAvg, Krum, and hospital-level DP's
clipping) works on the same numbers elementwise or on their concatenation,
so a packed model aggregates exactly as its tensors would.

The layout is data from the other side, never trusted: :func:`unpack` checks it (names,
shapes, sizes) and raises :class:`ValueError` naming what is wrong; the receiver then checks
the named tensors against its own model as before. A record of plain named arrays (no
packed name) is read as it is, and a record mixing both is refused.

Examples
--------
>>> import numpy as np
>>> state = {"w": np.ones((2, 3), np.float32), "b": np.zeros(2, np.float32)}
>>> packed = pack(state)
>>> [name[:18] for name in packed], packed_size(packed)
(['fedcare-packed-v1:'], 8)
>>> {name: value.shape for name, value in unpack(packed).items()}
{'w': (2, 3), 'b': (2,)}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

__all__ = [
    "PACKED_PREFIX",
    "MAX_LAYOUT_CHARS",
    "Layout",
    "is_packed",
    "layout_of",
    "pack",
    "pack_record",
    "packed_size",
    "unpack",
    "unpack_record",
]

#: The name of a packed array starts with this; the rest is its layout as JSON.
PACKED_PREFIX = "fedcare-packed-v1:"

#: The longest layout read (about 20,000 tensors of typical names): a longer one is refused
#: before it is parsed.
MAX_LAYOUT_CHARS = 1_000_000

#: A packed array's layout: its tensors' names and shapes, in order.
Layout = tuple[tuple[str, tuple[int, ...]], ...]


def is_packed(name: str) -> bool:
    """Whether an array's ``name`` is a packed array's (see the module docstring)."""
    return name.startswith(PACKED_PREFIX)


def layout_of(state: Mapping[str, Any]) -> tuple[Layout, ...]:
    """The groups :func:`pack` makes of ``state``: one per dtype, in the order each dtype
    first appears, each holding its tensors' names and shapes in ``state``'s order."""
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for name, value in state.items():
        array = _numpy(value)
        groups.setdefault(array.dtype.str, []).append((name, tuple(array.shape)))
    return tuple(tuple(group) for group in groups.values())


def pack(
    state: Mapping[str, Any], *, layout: tuple[Layout, ...] | None = None
) -> dict[str, np.ndarray]:
    """``state``'s tensors (numpy arrays or torch tensors) packed into one array per group.

    Parameters
    ----------
    state:
        The tensors by name.
    layout:
        The groups to pack into (default :func:`layout_of` ``state``): a model's layout, so
        that values of another dtype (an optimizer's float64 moments of a float32 model) are
        packed exactly as the model is. Every name of ``state`` must be in it, with its shape.

    Returns
    -------
    dict
        Packed name -> flat array; a group's array has the dtype numpy gives its values
        concatenated.
    """
    groups = layout_of(state) if layout is None else layout
    listed = {name for group in groups for name, _ in group}
    if listed != set(state):
        raise ValueError(
            f"the layout lists {sorted(listed - set(state))[:5]} that the state lacks, "
            f"and the state has {sorted(set(state) - listed)[:5]} that the layout lacks"
        )
    out: dict[str, np.ndarray] = {}
    for group in groups:
        parts = []
        for name, shape in group:
            array = _numpy(state[name])
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name!r} has shape {array.shape}, the layout says {shape}")
            parts.append(array.reshape(-1))
        out[_name(group)] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return out


def unpack(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The named tensors of ``arrays`` (packed, or plain named arrays passed through).

    A tensor is a view of its packed array, in that array's dtype.

    Raises
    ------
    ValueError
        A packed name is not a valid layout, a layout's sizes do not add up to its array's
        size, a tensor name repeats, or packed and plain arrays are mixed.
    """
    names = list(arrays)
    packed = [n for n in names if is_packed(n)]
    if not packed:
        return {name: _numpy(value) for name, value in arrays.items()}
    if len(packed) != len(names):
        raise ValueError("the model arrays mix packed and plain arrays; send one form")
    out: dict[str, np.ndarray] = {}
    for name in packed:
        flat = _numpy(arrays[name])
        layout = _parse(name)
        needed = sum(math.prod(shape) for _, shape in layout)
        if flat.ndim != 1 or flat.size != needed:
            raise ValueError(
                f"a packed array of shape {flat.shape} holds {flat.size} values, its "
                f"layout ({len(layout)} tensors) needs a flat array of {needed}"
            )
        start = 0
        for tensor, shape in layout:
            if tensor in out:
                raise ValueError(f"the packed arrays name the tensor {tensor!r} twice")
            size = math.prod(shape)
            out[tensor] = flat[start : start + size].reshape(shape)
            start += size
    return out


def packed_size(arrays: Mapping[str, Any]) -> int:
    """How many values ``arrays`` hold (packed or not)."""
    return sum(int(_numpy(v).size) for v in arrays.values())


def pack_record(
    state: Mapping[str, Any], *, layout: tuple[Layout, ...] | None = None
) -> ArrayRecord:
    """:func:`pack` as the Flower ``ArrayRecord`` a message carries."""
    return ArrayRecord({name: Array(value) for name, value in pack(state, layout=layout).items()})


def unpack_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """:func:`unpack` of a Flower ``ArrayRecord`` (each tensor a fresh array of its own)."""
    return {k: np.array(v) for k, v in unpack({n: a.numpy() for n, a in record.items()}).items()}


def _name(group: Layout) -> str:
    return PACKED_PREFIX + json.dumps([[n, list(s)] for n, s in group], separators=(",", ":"))


def _parse(name: str) -> Layout:
    text = name[len(PACKED_PREFIX) :]
    if len(text) > MAX_LAYOUT_CHARS:
        raise ValueError(
            f"a packed array's layout is {len(text)} characters, over {MAX_LAYOUT_CHARS}"
        )
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"a packed array's layout is not JSON ({e.msg})") from e
    except RecursionError as e:  # nesting deep enough to exhaust the parser's stack
        raise ValueError("a packed array's layout nests too deeply to be a layout") from e
    if not isinstance(raw, list) or not raw:
        raise ValueError("a packed array's layout must be a non-empty list of [name, shape]")
    layout = []
    for entry in raw:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])
        ):
            raise ValueError(
                f"a packed array's layout entry {str(entry)[:80]} is not [name, [dims >= 0]]"
            )
        layout.append((entry[0], tuple(entry[1])))
    return tuple(layout)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)
