"""Drive a Flower strategy as fedcare's ServerApp does, and numpy references to compare with.

The ServerApp (``server/app.py``) builds its strategy with
:func:`fedcare.server.strategies.build_strategy`, and the guard (``server/guard.py``) calls
``configure_train(round, arrays, config, grid)`` and then
``aggregate_train(round, replies)`` with the sites' replies: real ``flwr.app.Message``
objects carrying an ``ArrayRecord`` (:data:`~fedcare.common.keys.REC_ARRAYS`), a
``MetricRecord`` (:data:`~fedcare.common.keys.REC_METRICS`, weighted by
:data:`~fedcare.common.keys.M_NUM_EXAMPLES`) and the site's ``ConfigRecord``. This module
plays the grid and the sites; the references are written from each algorithm's definition,
in float64, without Flower's code.

The ServerApp sends a model *packed* (``fedcare.common.packed_arrays``: one flat array per
dtype, named by its layout) and the guard hands the strategy every reply in the round's
layout; ``packed=False`` drives a strategy with plain named arrays instead, the form the
packing claims to aggregate exactly like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)
from flwr.supercore.task_identity import TaskIdentity

from fedcare.common import keys
from fedcare.common.federation import FederationConfig
from fedcare.common.packed_arrays import pack_record, unpack_record
from fedcare.server.krum import Krum as FedcareKrum

Arrays = dict[str, np.ndarray]

#: The seven strategies fedcare offers by name (issue 15: every one exercised), and the class
#: each name must build: Flower's own, but Krum's, which is Flower's with float64 distances.
CLASSES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": FedcareKrum,
}
STRATEGIES = tuple(CLASSES)

#: Reddi et al. (2020), "Adaptive Federated Optimization", Sec. 5: the server moments'
#: decay rates and the adaptivity τ they recommend. fedcare configures only the server
#: learning rate η, so these must be what the built strategy uses.
BETA_1, BETA_2, TAU = 0.9, 0.99, 1e-3

#: Unit roundoff of IEEE float32 and float64 (half the machine epsilon).
U32 = float(np.finfo(np.float32).eps) / 2
U64 = float(np.finfo(np.float64).eps) / 2


def config(**values: Any) -> FederationConfig:
    """A run config (``-`` or ``_`` in keys), validated as the ServerApp validates it."""
    return FederationConfig.from_run_config({k.replace("_", "-"): v for k, v in values.items()})


class Grid:
    """Just enough of a Flower Grid for ``configure_train``: the connected sites' node ids."""

    def __init__(self, nodes: Sequence[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def to_record(arrays: Mapping[str, np.ndarray], *, packed: bool) -> ArrayRecord:
    """``arrays`` as a message carries them: packed (the ServerApp's form) or plain."""
    if packed:
        return pack_record(arrays)
    return ArrayRecord({k: Array(np.array(v, copy=True)) for k, v in arrays.items()})


def to_numpy(record: ArrayRecord) -> Arrays:
    """The named arrays of a record, packed or plain."""
    return unpack_record(record)


def reply(
    message: Message,
    update: Mapping[str, np.ndarray],
    num_examples: int,
    loss: float,
    *,
    packed: bool,
) -> Message:
    """What a site sends back for ``message``: its model, its numbers, who it is."""
    node = message.metadata.dst_node_id
    saved = TaskIdentity.node_id
    TaskIdentity.node_id = node  # the site's side
    try:
        return Message(
            RecordDict(
                {
                    keys.REC_ARRAYS: to_record(update, packed=packed),
                    keys.REC_METRICS: MetricRecord(
                        {keys.M_NUM_EXAMPLES: num_examples, keys.M_TRAIN_LOSS: loss}
                    ),
                    keys.REC_SITE: ConfigRecord({keys.S_SITE_ID: f"site-{node}", keys.S_DP: False}),
                }
            ),
            reply_to=message,
        )
    finally:
        TaskIdentity.node_id = saved


def send(
    strategy: Strategy,
    server_round: int,
    model: Mapping[str, np.ndarray],
    n: int,
    *,
    packed: bool = True,
) -> list[Message]:
    """``configure_train`` for ``n`` connected sites (node ids 101, 102, ...), in node order."""
    grid = Grid(range(101, 101 + n))
    record = to_record(model, packed=packed)
    messages = strategy.configure_train(server_round, record, ConfigRecord({}), grid)  # type: ignore[arg-type]
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def train_round(
    strategy: Strategy,
    server_round: int,
    model: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[int],
    *,
    losses: Sequence[float] | None = None,
    connected: int | None = None,
    packed: bool = True,
) -> tuple[Arrays | None, MetricRecord | None]:
    """One training round: the global ``model`` out, ``updates[i]`` back from site ``i``.

    ``connected`` sites get the round (default: one per update); the first
    ``len(updates)`` of them answer, the others drop out.
    """
    messages = send(strategy, server_round, model, connected or len(updates), packed=packed)
    losses = losses or [0.5] * len(updates)
    replies = [
        reply(m, u, w, loss, packed=packed)
        for m, u, w, loss in zip(messages, updates, weights, losses, strict=False)
    ]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    return (None if arrays is None else to_numpy(arrays)), metrics


# ---------------------------------------------------------------------------- references


def weighted_mean(models: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> Arrays:
    """FedAvg (McMahan et al. 2017): Σ n_k x_k / Σ n_k, per array."""
    total = float(sum(weights))
    return {
        k: sum(
            float(w) * np.asarray(m[k], np.float64) for m, w in zip(models, weights, strict=True)
        )
        / total
        for k in models[0]
    }


def coordinate_median(models: Sequence[Mapping[str, np.ndarray]]) -> Arrays:
    """FedMedian (Yin et al. 2018): per coordinate, the middle value of the sorted values
    (the mean of the two middle ones for an even count)."""
    out = {}
    for k in models[0]:
        s = np.sort(np.stack([np.asarray(m[k], np.float64) for m in models]), axis=0)
        n = len(models)
        out[k] = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return out


def trimmed_mean(models: Sequence[Mapping[str, np.ndarray]], beta: float) -> Arrays:
    """FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the ⌊β n⌋ smallest and largest
    values and average the rest (unweighted)."""
    n = len(models)
    cut = int(np.floor(beta * n))
    return {
        k: np.sort(np.stack([np.asarray(m[k], np.float64) for m in models]), axis=0)[
            cut : n - cut
        ].mean(axis=0)
        for k in models[0]
    }


def krum_choice(models: Sequence[Mapping[str, np.ndarray]], f: int) -> int:
    """Krum (Blanchard et al. 2017): the model whose summed squared distance to its
    n - f - 2 nearest others is smallest. The minimum must be unique (a test that relied on a
    tie-break would test the tie-break)."""
    flat = [np.concatenate([np.asarray(m[k], np.float64).ravel() for k in m]) for m in models]
    n = len(flat)
    nearest = max(1, n - f - 2)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:nearest]))
    order = np.argsort(scores)
    assert scores[order[1]] > scores[order[0]] * (1 + 1e-6), f"Krum scores tie: {scores}"
    return int(order[0])


def fedadam_step(
    x: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    *,
    t: int,
    eta: float,
) -> tuple[Arrays, Arrays, Arrays]:
    """One FedAdam server step (Reddi et al. 2020, Alg. 2) from the global model ``x``:
    Δ = aggregate - x; m ← β1 m + (1-β1) Δ; v ← β2 v + (1-β2) Δ²; x ← x + η_t m / (√v + τ),
    moments starting at zero. η_t is Flower's bias-corrected step η √(1-β2^(t+1)) / (1-β1^(t+1))
    for server round t (the guard passes the absolute round)."""
    step = eta * np.sqrt(1 - BETA_2 ** (t + 1)) / (1 - BETA_1 ** (t + 1))
    new_x, new_m, new_v = {}, {}, {}
    for k in x:
        delta = np.asarray(aggregate[k], np.float64) - np.asarray(x[k], np.float64)
        m0 = np.zeros_like(delta) if m is None else m[k]
        v0 = np.zeros_like(delta) if v is None else v[k]
        new_m[k] = BETA_1 * m0 + (1 - BETA_1) * delta
        new_v[k] = BETA_2 * v0 + (1 - BETA_2) * delta**2
        new_x[k] = np.asarray(x[k], np.float64) + step * new_m[k] / (np.sqrt(new_v[k]) + TAU)
    return new_x, new_m, new_v


def fedyogi_step(
    x: Mapping[str, np.ndarray],
    aggregate: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    *,
    eta: float,
) -> tuple[Arrays, Arrays, Arrays]:
    """One FedYogi server step (Reddi et al. 2020, Alg. 2): as FedAdam, but
    v ← v - (1-β2) Δ² sign(v - Δ²), and the step is η without bias correction."""
    new_x, new_m, new_v = {}, {}, {}
    for k in x:
        delta = np.asarray(aggregate[k], np.float64) - np.asarray(x[k], np.float64)
        m0 = np.zeros_like(delta) if m is None else m[k]
        v0 = np.zeros_like(delta) if v is None else v[k]
        new_m[k] = BETA_1 * m0 + (1 - BETA_1) * delta
        new_v[k] = v0 - (1 - BETA_2) * delta**2 * np.sign(v0 - delta**2)
        new_x[k] = np.asarray(x[k], np.float64) + eta * new_m[k] / (np.sqrt(new_v[k]) + TAU)
    return new_x, new_m, new_v


def reference_aggregate(
    name: str,
    cfg: FederationConfig,
    model: Mapping[str, np.ndarray],
    updates: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[int],
    *,
    t: int = 1,
) -> Arrays:
    """What strategy ``name`` (configured by ``cfg``) makes of one round from fresh state."""
    if name in ("fedavg", "fedprox"):  # FedProx changes the sites' objective, not the server's
        return weighted_mean(updates, weights)
    if name == "fedmedian":
        return coordinate_median(updates)
    if name == "fedtrimmedavg":
        return trimmed_mean(updates, cfg.trim_beta)
    if name == "krum":
        chosen = updates[krum_choice(updates, cfg.krum_malicious)]
        return {k: np.asarray(v, np.float64) for k, v in chosen.items()}
    aggregate = weighted_mean(updates, weights)
    if name == "fedadam":
        return fedadam_step(model, aggregate, None, None, t=t, eta=cfg.server_learning_rate)[0]
    if name == "fedyogi":
        return fedyogi_step(model, aggregate, None, None, eta=cfg.server_learning_rate)[0]
    raise AssertionError(f"no reference for strategy {name!r}")


def clipped(
    model: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], clip: float
) -> Arrays:
    """Fixed clipping (McMahan et al. 2018): the update Δ = x - g scaled to norm at most
    ``clip`` (its L2 norm over all arrays together), added back to the global model g."""
    delta = {k: np.asarray(update[k], np.float64) - np.asarray(model[k], np.float64) for k in model}
    norm = float(np.sqrt(sum(np.sum(d**2) for d in delta.values())))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: np.asarray(model[k], np.float64) + scale * delta[k] for k in model}


def flat(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in name order."""
    return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(arrays)])
