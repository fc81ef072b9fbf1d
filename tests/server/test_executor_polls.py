"""How often the centre's ServerApp executor asks the SuperLink for a task (issue 11): every
``POLL_INTERVAL_S`` while idle, every ``BUSY_POLL_INTERVAL_S`` while a ServerApp task of its
own runs (each ask costs the SuperLink's CPU, which the running rounds need). The SuperLink
and the task processes are stand-ins; the loop is the real one."""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskResponse
from flwr.supercore.constant import TaskType

from fedcare.server import executor


class _Task:
    """A task process: running until ``finish``."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.pid = 4242

    def poll(self) -> int | None:
        return self.returncode

    def terminate(self) -> None:
        self.returncode = -15

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


def test_asks_rarely_while_its_serverapp_runs_and_often_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    task = _Task()
    asks: list[int] = []
    waits: list[float] = []

    class Client:
        def AcquireTask(self, request: Any) -> AcquireTaskResponse:  # noqa: N802 - Flower's
            asks.append(len(asks))
            if len(asks) == 1:  # a run's ServerApp task
                res = AcquireTaskResponse(token="ab" * 8)
                res.task.task_id, res.task.run_id = 7, 3
                res.task.type = TaskType.SERVER_APP
                return res
            if len(asks) == 4:
                task.returncode = 0  # the run ended
            if len(asks) == 6:
                os.kill(os.getpid(), signal.SIGTERM)  # the executor's own stop
            return AcquireTaskResponse()

        def close(self) -> None:
            pass

    class Event:
        def __init__(self) -> None:
            self.flag = False

        def set(self) -> None:
            self.flag = True

        def is_set(self) -> bool:
            return self.flag

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return self.flag

    monkeypatch.setattr(executor, "task_acquirer", lambda *a, **kw: Client())
    monkeypatch.setattr(executor, "_launch", lambda command, token: task)
    monkeypatch.setattr(executor, "threading", SimpleNamespace(Event=Event))
    code = executor.run_executor(
        runtime_api_address="127.0.0.1:9", root_certificates=None, secret=b"s"
    )
    assert code == 0
    busy, idle = executor.BUSY_POLL_INTERVAL_S, executor.POLL_INTERVAL_S
    assert busy > idle
    # ask 1 took the task (asks again at once); after 2 and 3 it runs; by the end of 4 it
    # has ended; 5 and 6 (during which the stop came) are idle
    assert waits == [busy, busy, idle, idle, idle]
