"""PromptGrid: replies collected at its own poll interval, within the timeout."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from fedcare.server import grid as grid_module
from fedcare.server.grid import PromptGrid, prompt


class _SlowGrid:
    """A grid whose replies arrive one per pull (as sites finish one after another)."""

    def __init__(self, n: int) -> None:
        self.pending = [f"m{i}" for i in range(n)]
        self.pulls = 0

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        list(messages)
        return list(self.pending)

    def pull_messages(self, ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        wanted = sorted(ids)
        if not wanted:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=wanted[0]))]


def test_all_replies_collected_sleeping_the_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", sleeps.append)
    inner = _SlowGrid(3)
    replies = list(PromptGrid(inner, poll_s=0.25).send_and_receive([object()] * 3, timeout=60))  # type: ignore[arg-type]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert inner.pulls == 3
    assert sleeps == [0.25, 0.25]  # never Flower's 3 s


def test_timeout_returns_what_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 1000, 10))  # each monotonic() call: 10 s later
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: None)
    replies = list(PromptGrid(_SlowGrid(5)).send_and_receive([object()] * 5, timeout=25))  # type: ignore[arg-type]
    assert 1 <= len(replies) < 5


def test_in_memory_grid_is_used_as_is() -> None:
    fast = SimpleNamespace(pull_interval=0.1)
    assert prompt(fast) is fast  # type: ignore[arg-type]
    assert isinstance(prompt(_SlowGrid(1)), PromptGrid)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="poll_s"):
        PromptGrid(_SlowGrid(1), poll_s=0)  # type: ignore[arg-type]


class _Nodes:
    """A grid whose node list is ``nodes`` at each ask; counts the asks."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.asks = 0

    def get_node_ids(self) -> list[int]:
        self.asks += 1
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_ask_right_after_another_reuses_its_node_list_once() -> None:
    inner = _Nodes([1, 2, 3])
    grid = PromptGrid(inner, clock=_Clock())  # type: ignore[arg-type]
    assert list(grid.get_node_ids()) == [1, 2, 3]
    inner.nodes = [1, 2, 3, 4]  # a site connects between the two asks of one configure_train
    assert list(grid.get_node_ids()) == [1, 2, 3]
    assert inner.asks == 1
    assert list(grid.get_node_ids()) == [1, 2, 3, 4]  # the third asks the SuperLink again
    assert inner.asks == 2


def test_a_push_or_time_ends_the_reuse() -> None:
    clock = _Clock()
    inner = _Nodes([1, 2])
    grid = PromptGrid(inner, clock=clock)  # type: ignore[arg-type]
    grid.get_node_ids()
    grid.push_messages([object()])  # type: ignore[list-item]
    grid.get_node_ids()
    assert inner.asks == 2
    clock.now += grid_module.NODE_LIST_REUSE_S + 0.01
    grid.get_node_ids()
    assert inner.asks == 3


def test_flower_s_wait_for_nodes_still_sees_a_node_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sample_nodes`` asks, and asks again after each 1 s wait until enough nodes are
    connected: with the reuse it must still end once the third node is there."""
    from flwr.serverapp.strategy import strategy_utils

    inner = _Nodes([1, 2])
    clock = _Clock()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds
        if len(waits) == 2:
            inner.nodes = [1, 2, 3]

    monkeypatch.setattr(strategy_utils, "sleep", sleep)
    grid = PromptGrid(inner, clock=clock)  # type: ignore[arg-type]
    grid.get_node_ids()  # FedAvg's first ask (the sample's size)
    sampled, connected = strategy_utils.sample_nodes(grid, 3, 3)  # type: ignore[arg-type]
    assert sorted(sampled) == [1, 2, 3] and sorted(connected) == [1, 2, 3]
    assert len(waits) == 2  # seen at the first ask after it connected
