"""Flower's floor: a Message-API app that does no fedcare work, in fedcare's message shape.

:func:`benchmarks.federation_overhead.measure_floor` runs it on the same runner path as a
fedcare run (a local simulation SuperLink and the shared Ray cluster of
:mod:`fedcare.simulations.ray_cluster`, the same number of simulated sites, rounds and
model arrays), so what it costs is what Flower and Ray cost on their own: the floor under
fedcare's fixed overhead and per-round time.

The shape is fedcare's (``server/guard.py``): round 0 is a federated evaluation of the initial
arrays, each round r >= 1 one train exchange (round r's evaluation goes with round r + 1's
train message), and the last round an evaluate exchange of its own, all through Flower's
``FedAvg`` strategy loop (``Strategy.start``). The ClientApp replies with the arrays it
received; the ServerApp appends a ``progress.jsonl`` line after round 0 and after every
round, as fedcare's does (``{"round", "elapsed_s"}``, seconds from the strategy's start), and
writes ``result-path`` last.

This module imports Flower and NumPy only (no torch, no fedcare): the simulation and its Ray
actors import it by name (``benchmarks.flower_floor``), with the repository root first on
their ``PYTHONPATH`` (Opacus ships a top-level package also named ``benchmarks``).

Run config (``[tool.flwr.app.config]`` of the benchmark's thin app): ``num-server-rounds``,
``num-sites``, ``arrays-path`` (an ``.npz`` of the model arrays, ``arr_0``, ``arr_1``, ...,
with their names in ``names.json`` beside it), ``run-dir`` (where ``progress.jsonl`` and
the result go) and ``round-timeout``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

__all__ = ["CONFIG_DEFAULTS", "COMPONENTS", "PROGRESS_NAME", "RESULT_NAME", "load_arrays"]

CONFIG_DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 3,
    "num-sites": 3,
    "arrays-path": "",
    "run-dir": "",
    "round-timeout": 600.0,
}

COMPONENTS = {
    "serverapp": "benchmarks.flower_floor:server_app",
    "clientapp": "benchmarks.flower_floor:client_app",
}

PROGRESS_NAME = "progress.jsonl"
#: Written last by the ServerApp: its presence ends the runner's wait.
RESULT_NAME = "floor_result.json"
#: The names of the arrays, in the order of the ``.npz`` (``arr_0``, ...).
NAMES_FILE = "names.json"

server_app = ServerApp()
client_app = ClientApp()


def load_arrays(path: Path) -> ArrayRecord:
    """The model arrays saved as ``path`` (``.npz``) with ``names.json`` beside it."""
    names = json.loads((path.parent / NAMES_FILE).read_text(encoding="utf-8"))
    with np.load(path) as saved:
        return ArrayRecord({n: Array(saved[f"arr_{i}"]) for i, n in enumerate(names)})


class _FedcareShape(FedAvg):
    """FedAvg with fedcare's evaluation schedule: an evaluate exchange of its own only at
    round 0 (sent before ``start``) and at the last round."""

    def __init__(self, *, rounds: int, sites: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=sites,
            min_evaluate_nodes=sites,
            min_available_nodes=sites,
        )
        self.rounds = rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if server_round not in (0, self.rounds):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        replies = list(replies)
        if replies:
            super().aggregate_evaluate(server_round, replies)


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds, sites = int(rc["num-server-rounds"]), int(rc["num-sites"])
    timeout = float(rc["round-timeout"])
    run_dir = Path(str(rc["run-dir"]))
    arrays = load_arrays(Path(str(rc["arrays-path"])))
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < sites:  # the simulated nodes register meanwhile
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {sites} nodes came")
        time.sleep(0.02)
    strategy = _FedcareShape(rounds=rounds, sites=sites)
    t0 = time.monotonic()

    def progress(server_round: int, _arrays: ArrayRecord) -> None:
        line = {"round": server_round, "of": rounds, "elapsed_s": time.monotonic() - t0}
        with open(run_dir / PROGRESS_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    replies = list(
        grid.send_and_receive(
            messages=strategy.configure_evaluate(0, arrays, ConfigRecord(), grid),
            timeout=timeout,
        )
    )
    if len(replies) != sites or any(r.has_error() for r in replies):
        raise RuntimeError(f"round 0: {len(replies)} of {sites} replies, or an error reply")
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=rounds,
        timeout=timeout,
        evaluate_fn=progress,
    )
    if sorted(result.train_metrics_clientapp) != list(range(1, rounds + 1)):
        raise RuntimeError(f"trained rounds {sorted(result.train_metrics_clientapp)}")
    done = {"rounds": rounds, "evaluated": sorted(result.evaluate_metrics_clientapp)}
    partial = run_dir / (RESULT_NAME + ".tmp")
    partial.write_text(json.dumps(done), encoding="utf-8")
    partial.replace(run_dir / RESULT_NAME)


def _reply(msg: Message, *, with_arrays: bool) -> Message:
    arrays = msg.content.array_records["arrays"]
    content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
    if with_arrays:
        content["arrays"] = arrays
    return Message(content, reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _reply(msg, with_arrays=True)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, with_arrays=False)
