"""A deployed site wakes on events, not on sleeps (issue 11: per-round overhead).

Inside the SuperNode process (:mod:`fedcare.client.supernode`) the worker's ``AcquireTask``
and ``PullObject`` are held until the SuperNode's state has an answer, and its loop wakes
when the worker's reply is stored; the worker (:mod:`fedcare.client.worker`) asks again at
once after a held ask; Flower moves a message's objects several at a time, whatever the
machine's core count (:mod:`fedcare.common.superexec`). No test here measures time: each
waits for a condition (with a generous bound that only a broken wake-up reaches).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flwr.proto.message_pb2 import PullObjectRequest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.servicer.runtime import runtime_handlers as core_handlers
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
from flwr.supernode.servicer.runtime import runtime_handlers as handlers

from fedcare.client import supernode
from fedcare.client.worker import SiteWorker
from fedcare.common import superexec

#: Bound on an awaited condition: far beyond any wake-up, far below a test timeout.
AWAIT_S = 60.0


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def _asked(event: threading.Event, fn: Callable[..., Any]) -> Callable[..., Any]:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        finally:
            event.set()

    return recorded


@pytest.fixture()
def changes(monkeypatch: pytest.MonkeyPatch) -> Iterator[supernode.StateChanges]:
    """The launcher's announcements and holds, undone after the test."""
    for cls, name in (
        (InMemoryNodeState, "create_task"),
        (InMemoryNodeState, "store_message"),
        (InMemoryObjectStore, "put"),
    ):
        monkeypatch.setattr(cls, name, getattr(cls, name))
    monkeypatch.setattr(handlers, "acquire_task", handlers.acquire_task)
    monkeypatch.setattr(handlers, "pull_object", handlers.pull_object)
    c = supernode.StateChanges()
    supernode._announce_changes(c)  # noqa: SLF001
    supernode._hold_worker_requests(c)  # noqa: SLF001
    yield c


def test_a_held_ask_is_asked_again_at_the_next_change() -> None:
    changes = supernode.StateChanges()
    answers = ["none yet"]
    first_ask = threading.Event()

    def ask() -> str:
        first_ask.set()
        return answers[-1]

    thread, out = _in_thread(
        lambda: supernode.hold_until(changes, ask, lambda a: a != "none yet", hold_s=AWAIT_S)
    )
    assert first_ask.wait(AWAIT_S)
    answers.append("a task")
    changes.bump()
    thread.join(AWAIT_S)
    assert not thread.is_alive(), "the change did not wake the held ask"
    assert out == ["a task"]


def test_a_change_between_asking_and_waiting_is_not_missed() -> None:
    """The generation is read before the ask: a change that lands while the ask runs ends
    the wait at once (a lost wake-up would hold the ask for its whole bound)."""
    changes = supernode.StateChanges()
    answers = iter(["none yet", "a task"])

    def ask() -> str:
        answer = next(answers)
        changes.bump()  # as if the task arrived while this ask ran
        return answer

    thread, out = _in_thread(
        lambda: supernode.hold_until(changes, ask, lambda a: a == "a task", hold_s=AWAIT_S)
    )
    thread.join(AWAIT_S)
    assert not thread.is_alive() and out == ["a task"]


def test_an_ask_that_stays_unanswered_returns_its_last_answer_at_the_bound() -> None:
    got = supernode.hold_until(supernode.StateChanges(), lambda: "none", bool, hold_s=0.0)
    assert got == "none"
    ticks = iter([0.0, 0.0, 5.0])  # the bound passes after one wait
    waited: list[float] = []

    class Recorder(supernode.StateChanges):
        def wait(self, since: int, timeout: float) -> int:
            waited.append(timeout)
            return since

    got = supernode.hold_until(
        Recorder(), lambda: "none", lambda a: False, hold_s=1.0, clock=lambda: next(ticks)
    )
    assert got == "none" and waited == [1.0]


def test_the_worker_s_acquire_task_is_held_until_the_supernode_has_a_task(
    changes: supernode.StateChanges, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supernode, "TASK_WAIT_S", AWAIT_S)
    asked = threading.Event()
    monkeypatch.setattr(core_handlers, "acquire_task", _asked(asked, core_handlers.acquire_task))
    state = NodeStateFactory(ObjectStoreFactory()).state()
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    thread, out = _in_thread(lambda: handlers.acquire_task(request, state))
    assert asked.wait(AWAIT_S)  # it asked, found nothing, and is held
    assert thread.is_alive()
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="f")
    thread.join(AWAIT_S)
    assert not thread.is_alive(), "creating a task did not wake the held AcquireTask"
    assert out[0].task.task_id == task_id and out[0].token


def test_an_idle_acquire_task_is_answered_empty_at_the_bound(
    changes: supernode.StateChanges, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supernode, "TASK_WAIT_S", 0.0)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    res = handlers.acquire_task(AcquireTaskRequest(supported_task_types=["x"]), state)
    assert not res.HasField("task")


def test_a_pull_of_an_object_still_on_its_way_is_held_until_it_is_stored(
    changes: supernode.StateChanges, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ConfigRecord
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    monkeypatch.setattr(supernode, "OBJECT_WAIT_S", AWAIT_S)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    record = ConfigRecord({"a": 1})
    state.object_store.preregister(7, get_object_tree(record))  # announced, not there yet
    task_stub = type("T", (), {"run_id": 7})()  # the handler reads only the task's run
    request = PullObjectRequest(object_id=record.object_id)
    asked = threading.Event()
    monkeypatch.setattr(state, "get_object", _asked(asked, state.get_object))
    thread, out = _in_thread(lambda: handlers.pull_object(request, state, task_stub))
    assert asked.wait(AWAIT_S)
    assert thread.is_alive()
    state.object_store.put(record.object_id, record.deflate())
    thread.join(AWAIT_S)
    assert not thread.is_alive(), "storing the object did not wake the held PullObject"
    assert out[0].object_available and out[0].object_content == record.deflate()


def test_a_pull_of_an_unknown_object_is_answered_at_once(
    changes: supernode.StateChanges, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing will announce it: holding would only delay the worker's error."""
    monkeypatch.setattr(supernode, "OBJECT_WAIT_S", AWAIT_S)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    task_stub = type("T", (), {"run_id": 7})()
    thread, out = _in_thread(
        lambda: handlers.pull_object(PullObjectRequest(object_id="0" * 64), state, task_stub)
    )
    thread.join(AWAIT_S)
    assert not thread.is_alive() and not out[0].object_found


def test_the_supernode_loop_wakes_when_the_reply_is_stored() -> None:
    """Flower's loop sleeps 0.5 s between looks for the worker's reply; the launcher's wait
    ends at the next state change, and a change since its last wake ends it at once."""
    changes = supernode.StateChanges()
    faster = supernode.FasterPolls(poll_s=0.5, reply_poll_s=3.0, changes=changes)
    waits: list[tuple[int, float]] = []
    real_wait = changes.wait

    def recorded(since: int, timeout: float) -> int:
        waits.append((since, timeout))
        return real_wait(since, timeout)

    changes.wait = recorded  # type: ignore[method-assign]
    changes.bump()  # the reply was stored before Flower's loop looked
    thread, _ = _in_thread(lambda: faster.sleep(supernode._REPLY_WAIT_S))  # noqa: SLF001
    thread.join(AWAIT_S)
    assert not thread.is_alive()
    assert waits == [(0, 3.0)]  # generation 0 seen at start: the bump to 1 ends it at once
    assert faster.idle_wait() == faster.busy_poll_s  # a run is on: fast polls of the centre


def test_the_worker_asks_again_at_once_after_a_held_ask_and_waits_after_a_prompt_one(
    tmp_path: Any,
) -> None:
    worker = SiteWorker(config_path=tmp_path / "x.toml", runtime_address="127.0.0.1:9", secret=b"s")
    now = [0.0]
    slept: list[float] = []
    held = iter([2.0, 0.0, 0.0])  # the first ask is held 2 s, the next answered at once

    def poll() -> bool:
        now[0] += next(held)
        return False

    asks = iter([False, False, True])
    worker.poll = poll  # type: ignore[method-assign]
    try:
        worker.serve(
            poll_s=0.25,
            stop=lambda: next(asks),
            clock=lambda: now[0],
            sleep=slept.append,
        )
    finally:
        worker.close()
    assert slept == [0.25]


def test_flower_moves_a_message_s_objects_several_at_once_on_any_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower caps its transfer threads at the core count (2 here, maybe); fedcare asks for
    OBJECT_TRANSFERS. All of them must be in flight together: each pull waits for the
    others at a barrier, which breaks if fewer run at once."""
    monkeypatch.setattr(inflatable_utils, "get_num_workers", inflatable_utils.get_num_workers)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    superexec.concurrent_object_transfers()
    superexec.concurrent_object_transfers()  # idempotent
    n = superexec.OBJECT_TRANSFERS
    barrier = threading.Barrier(n, timeout=AWAIT_S)

    def pull(object_id: str) -> bytes:
        barrier.wait()
        return object_id.encode()

    ids = [f"o{i}" for i in range(n)]
    got = inflatable_utils.pull_objects(ids, pull, max_concurrent_pulls=n)
    assert got == {i: i.encode() for i in ids}


def test_an_unknown_flower_transfer_pool_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inflatable_utils, "get_num_workers", lambda n: n)
    with pytest.raises(RuntimeError, match="get_num_workers"):
        superexec.concurrent_object_transfers()
