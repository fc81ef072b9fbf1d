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
