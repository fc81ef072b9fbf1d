"""fedcare's SuperNode launcher, site worker and ServerApp executor shorten Flower's waits for
objects that are not there yet (1 s, 2 s, ... in Flower) and move several objects at once;
their event-driven waits are in test_prompt_waits.py."""

from __future__ import annotations

import threading
import time
import types

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid
from flwr.supernode import start_client_internal as loop

from fedcare.client import supernode
from fedcare.common import superexec
from fedcare.server import executor


def _undo_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything :func:`supernode.install` changes, restored after the test."""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.servicer.runtime import runtime_handlers

    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", inflatable_utils.pull_objects)
    monkeypatch.setattr(
        loop,
        "push_object_contents_from_iterable",
        inflatable_utils.push_object_contents_from_iterable,
    )
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    for cls, name in (
        (InMemoryNodeState, "create_task"),
        (InMemoryNodeState, "store_message"),
        (InMemoryObjectStore, "put"),
    ):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    for name in ("acquire_task", "pull_object"):
        monkeypatch.setattr(runtime_handlers, name, getattr(runtime_handlers, name))


def test_the_launcher_shortens_the_supernode_s_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.servicer.runtime import runtime_handlers

    _undo_install(monkeypatch)
    faster = supernode.install(poll_s=0.5, reply_poll_s=0.1)
    assert loop.time is faster
    pull = loop.pull_objects
    assert pull.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]
    assert pull.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": supernode.PULL_BACKOFF_S,
        "backoff_cap": supernode.PULL_BACKOFF_CAP_S,
        "max_tries_per_object": supernode.PULL_MAX_TRIES,  # ~10 min at the 1 s cap
        "max_concurrent_pulls": superexec.OBJECT_TRANSFERS,
    }
    push = loop.push_object_contents_from_iterable
    assert push.keywords == {"max_concurrent_pushes": superexec.OBJECT_TRANSFERS}  # type: ignore[attr-defined]
    assert (
        inflatable_utils.get_num_workers(superexec.OBJECT_TRANSFERS) == superexec.OBJECT_TRANSFERS
    )
    # The worker-facing handlers hold their requests (tests/client/test_prompt_waits.py).
    assert getattr(runtime_handlers.acquire_task, "__fedcare_holds__", False)


def test_the_launcher_refuses_a_loop_it_does_not_know(monkeypatch: pytest.MonkeyPatch) -> None:
    _undo_install(monkeypatch)
    monkeypatch.setattr(loop, "pull_objects", lambda *a, **k: {})
    with pytest.raises(RuntimeError, match="pull_objects"):
        supernode.install(poll_s=0.5, reply_poll_s=0.1)


class _WaitRecorder(threading.Event):
    """An Event whose waits are recorded instead of slept (no wall clock in the test)."""

    waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        _WaitRecorder.waits.append(float(timeout or 0.0))
        return self.is_set()


def test_a_supernode_pulls_an_object_soon_after_it_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the launcher's backoff, an object that appears on the third try is waited for
    about 0.05 s + 0.1 s (±20 % jitter), where Flower's defaults wait 1 s + 2 s."""
    tries: list[str] = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) < 3:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"content"

    _WaitRecorder.waits = []
    fake = types.SimpleNamespace(Lock=threading.Lock, Event=_WaitRecorder)
    monkeypatch.setattr(inflatable_utils, "threading", fake)
    got = inflatable_utils.pull_objects(
        ["a"],
        pull,
        initial_backoff=supernode.PULL_BACKOFF_S,
        backoff_cap=supernode.PULL_BACKOFF_CAP_S,
    )
    assert got == {"a": b"content"}
    first, second = _WaitRecorder.waits
    assert first == pytest.approx(supernode.PULL_BACKOFF_S, rel=0.2)
    assert second == pytest.approx(2 * supernode.PULL_BACKOFF_S, rel=0.2)


def test_the_executor_s_grid_pulls_replies_with_short_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    monkeypatch.setattr(http_grid, "push_objects", inflatable_utils.push_objects)
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    executor._prompt_object_pulls()  # noqa: SLF001
    pull = http_grid.pull_objects
    assert pull.func is inflatable_utils.pull_objects  # type: ignore[attr-defined]
    assert pull.keywords["initial_backoff"] == executor.PULL_BACKOFF_S  # type: ignore[attr-defined]
    assert pull.keywords["max_tries_per_object"] == executor.PULL_MAX_TRIES  # type: ignore[attr-defined]
    assert pull.keywords["max_concurrent_pulls"] == superexec.OBJECT_TRANSFERS  # type: ignore[attr-defined]
    push = http_grid.push_objects
    assert push.keywords == {"max_concurrent_pushes": superexec.OBJECT_TRANSFERS}  # type: ignore[attr-defined]


def test_the_executor_keeps_flower_s_waits_when_its_grid_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def other(*_a: object, **_k: object) -> dict[str, bytes]:
        return {}

    monkeypatch.setattr(http_grid, "pull_objects", other)
    monkeypatch.setattr(http_grid, "push_objects", inflatable_utils.push_objects)
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    executor._prompt_object_pulls()  # noqa: SLF001 - a warning, no failure
    assert http_grid.pull_objects is other


def test_the_site_worker_gives_flowers_pull_task_input_short_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp

    from fedcare.client.worker import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S, prompt_object_pulls

    original = inflatable_utils.pull_and_inflate_object_from_tree
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", original)
    monkeypatch.setattr(run_clientapp, "push_objects", inflatable_utils.push_objects)
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    prompt_object_pulls()
    prompt_object_pulls()  # idempotent: not a partial of a partial
    patched = run_clientapp.pull_and_inflate_object_from_tree
    assert patched.func is original  # type: ignore[attr-defined]
    assert patched.keywords == {  # type: ignore[attr-defined]
        "initial_backoff": PULL_BACKOFF_S,
        "backoff_cap": PULL_BACKOFF_CAP_S,
        "max_tries_per_object": None,  # Flower's overall time limit still holds
        "max_concurrent_pulls": superexec.OBJECT_TRANSFERS,
    }
    pushes = run_clientapp.push_objects
    assert pushes.keywords == {"max_concurrent_pushes": superexec.OBJECT_TRANSFERS}  # type: ignore[attr-defined]


def test_the_site_worker_refuses_a_flower_that_inflates_messages_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flwr.supernode.runtime import run_clientapp

    from fedcare.client.worker import prompt_object_pulls

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", lambda *a, **k: None)
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    with pytest.raises(RuntimeError, match="site worker needs updating"):
        prompt_object_pulls()


def test_a_site_polls_fast_only_while_a_run_is_on() -> None:
    """After answering a message the SuperNode polls every ``busy_poll_s`` (the run's next
    message is seconds away); once BUSY_WINDOW_S passed without one, every ``poll_s``."""
    now = [100.0]
    faster = supernode.FasterPolls(
        poll_s=0.5, reply_poll_s=0.1, busy_poll_s=0.1, clock=lambda: now[0]
    )
    assert faster.idle_wait() == 0.5  # idle from the start
    faster.sleep(supernode._REPLY_WAIT_S)  # Flower waits for a reply: it took a message
    assert faster.idle_wait() == 0.1
    now[0] += supernode.BUSY_WINDOW_S - 0.01
    assert faster.idle_wait() == 0.1
    now[0] += 0.02
    assert faster.idle_wait() == 0.5
    # A busy poll never exceeds the idle one.
    assert supernode.FasterPolls(poll_s=0.05, reply_poll_s=0.1, busy_poll_s=0.1).busy_poll_s == 0.05
