"""The SuperNode holds only its own worker's requests (issue 11: event-driven waits).

fedcare's SuperNode launcher holds an ``AcquireTask`` until the SuperNode has a task
(:mod:`fedcare.client.supernode`). A hold must never come before Flower's own check of the
SuperExec secret: another local user who reaches the loopback port gets Flower's refusal at
once, holds no thread, and never a task; the worker, holding the secret, gets the task as
soon as it exists. Real HTTP on 127.0.0.1, the SuperNode's own Runtime API app.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeState, NodeStateFactory

from fedcare.common.processes import free_port
from fedcare.common.superexec import ACQUIRE_TASK, task_acquirer
from tests.client.test_prompt_waits import AWAIT_S, changes  # noqa: F401 - fixture

SECRET = b"the-site-s-superexec-secret-0123456789abcdef"


@pytest.fixture()
def runtime_api(
    changes: Any,  # noqa: F811 - the launcher's holds, undone after the test
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, NodeState]]:
    from fedcare.client import supernode

    monkeypatch.setattr(supernode, "TASK_WAIT_S", AWAIT_S)
    factory = NodeStateFactory(ObjectStoreFactory())
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state_factory=factory, superexec_auth_secret=SECRET),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    ready = threading.Event()

    def started() -> None:
        while thread.is_alive() and not server.started:
            ready.wait(0.01)

    waiter = threading.Thread(target=started)
    waiter.start()
    waiter.join(AWAIT_S)
    assert server.started, "the SuperNode's Runtime API did not start"
    try:
        yield f"127.0.0.1:{port}", factory.state()
    finally:
        server.should_exit = True
        thread.join(AWAIT_S)


REQUEST = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])


def test_a_local_user_without_the_secret_is_refused_at_once_and_never_held(
    runtime_api: tuple[str, NodeState],
) -> None:
    address, state = runtime_api
    # fedcare's acquirer with a guessed secret, and no retries (Flower's retry a refusal).
    outsider = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=b"a guess at the secret", protected_methods=frozenset({ACQUIRE_TASK})
            ),
        ],
    )
    try:
        done: list[BaseException] = []

        def ask() -> None:
            try:
                outsider.AcquireTask(REQUEST)
            except BaseException as e:  # noqa: BLE001 - the refusal is the result
                done.append(e)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        # No task ever comes: a held request would only end at the (60 s) bound.
        thread.join(AWAIT_S / 2)
        assert not thread.is_alive(), "a request without the secret was held"
        assert isinstance(done[0], httpx.HTTPStatusError)
        assert done[0].response.status_code in (401, 403)
        assert not state.get_tasks()
    finally:
        outsider.close()


def test_the_worker_holding_the_secret_gets_the_task_as_soon_as_it_exists(
    runtime_api: tuple[str, NodeState],
) -> None:
    address, state = runtime_api
    worker = task_acquirer(address, SECRET)
    try:
        got: list[Any] = []
        thread = threading.Thread(target=lambda: got.append(worker.AcquireTask(REQUEST)))
        thread.start()
        task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=5, fab_hash="f")
        thread.join(AWAIT_S / 2)
        assert not thread.is_alive(), "the held AcquireTask did not wake for the task"
        assert got[0].task.task_id == task_id and got[0].token
    finally:
        worker.close()
