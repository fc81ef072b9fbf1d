"""A tiny Message-API Flower app for tests of :mod:`fedcare.simulations.flower_driver`.

The "model" is 3 numbers. Client ``p`` (its partition id) moves the global model a step
``lr`` towards its own target :func:`target` and weighs its reply with :func:`num_examples`,
so the FedAvg result after each round has a closed form the test recomputes with numpy.

Run config (``[tool.flwr.app.config]`` of the test's thin app): ``num-server-rounds``,
``min-nodes``, ``lr``, ``result-path`` (absolute; the ServerApp writes its JSON result
there), ``fail`` (the ServerApp raises :data:`FAILURE` at start) and ``hold-s`` (after the
rounds, the ServerApp writes ``result-path`` + ``.held`` and sleeps that long, with Ray up).

Its module path is ``tests.simulations._tiny_flower_app``: the simulation imports it only
with the repo root on ``PYTHONPATH`` (the file name must not start with ``test_``: Flower
leaves such files out of a FAB, and pytest would collect it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

#: The ServerApp raises ``RuntimeError(FAILURE)`` when run config ``fail`` is true.
FAILURE = "tiny app failed on purpose"

CONFIG_DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 2,
    "min-nodes": 3,
    "lr": 0.5,
    "result-path": "",
    "fail": False,
    "hold-s": 0.0,
}

COMPONENTS = {
    "serverapp": "tests.simulations._tiny_flower_app:server_app",
    "clientapp": "tests.simulations._tiny_flower_app:client_app",
}


def target(partition_id: int) -> np.ndarray:
    """Client ``partition_id``'s optimum."""
    return np.array([partition_id, 1.0 - partition_id, 2.0 * partition_id])


def num_examples(partition_id: int) -> int:
    """Client ``partition_id``'s FedAvg weight."""
    return 10 * (partition_id + 1)


server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    if bool(rc["fail"]):
        raise RuntimeError(FAILURE)
    n = int(rc["min-nodes"])
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(3)]),
        num_rounds=int(rc["num-server-rounds"]),
        timeout=120.0,
        train_config=ConfigRecord({"lr": float(rc["lr"])}),
    )
    out = Path(str(rc["result-path"]))
    record = {
        "final": result.arrays.to_numpy_ndarrays()[0].tolist(),
        "train_rounds": sorted(result.train_metrics_clientapp),
        "eval_rounds": sorted(result.evaluate_metrics_clientapp),
        "num_nodes": len(list(grid.get_node_ids())),
    }
    out.write_text(json.dumps(record), encoding="utf-8")
    if float(rc["hold-s"]) > 0:
        Path(f"{out}.held").write_text("", encoding="utf-8")
        time.sleep(float(rc["hold-s"]))


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    w = msg.content.array_records["arrays"].to_numpy_ndarrays()[0]
    lr = float(cast(float, msg.content.config_records["config"]["lr"]))
    new_w = w + lr * (target(pid) - w)
    metrics = MetricRecord({"num-examples": num_examples(pid)})
    return Message(RecordDict({"arrays": ArrayRecord([new_w]), "metrics": metrics}), reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    w = msg.content.array_records["arrays"].to_numpy_ndarrays()[0]
    loss = float(np.mean((w - target(pid)) ** 2))
    metrics = MetricRecord({"num-examples": num_examples(pid), "loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
