"""The centre's ServerApp executor: runs fedcare's installed ServerApp, and nothing else.

``fedcare server start`` starts ``flower-superlink`` with ``--isolation process`` and a
SuperExec secret (``--superexec-auth-secret-file``), so the SuperLink launches no process
itself and its Runtime API hands a ServerApp task only to a caller that signs
``AcquireTask`` with that secret (Flower's ``SuperExecAuthHttpInterceptor``). This module is
that caller:

* :func:`run_executor` (``python -m fedcare.server.executor --runtime-api-address ...``, built by
  ``fedcare.server.deploy.executor_command``) polls
  ``AcquireTask`` for ``flwr-serverapp`` tasks on the SuperLink's loopback Runtime API every
  0.5 s (every :data:`BUSY_POLL_INTERVAL_S` while a ServerApp of its own runs: each ask costs
  the SuperLink's CPU, which a running federation's rounds need) and starts one task process
  per task, handing it the task's token on its standard input (never on a command line other
  local users can read);
* :func:`run_task` (``python -m fedcare.server.executor --run-task ...``) does what Flower's own
  ``flwr-serverapp`` does (``flwr.superlink.runtime.run_serverapp``: an ``HttpGrid`` holding
  the token, task heartbeats, ``PullTaskInput``, the run config fused from the FAB's
  defaults and the run's overrides with Flower's ``get_fused_config_from_fab``, the
  process's output uploaded so that ``flwr log`` shows it, ``PushTaskOutput`` completed or
  failed) with one difference: it never installs or imports anything from the FAB. It first
  checks the FAB with :func:`fedcare.common.flower_app.check_fab`; a FAB that is not fedcare's thin
  app (it ships a file, names other components, another publisher, name or version) is
  refused: the task is pushed as failed with the reason, and one line says so. Otherwise it
  calls the installed ``fedcare.server.app.app``. It also shortens the waits of the task's grid
  between tries for a reply object the SuperLink does not hold yet (:data:`PULL_BACKOFF_S`),
  and lets it move :data:`~fedcare.common.superexec.OBJECT_TRANSFERS` message objects at once
  (Flower: at most one per CPU core); its grid (:class:`CollectingGrid`) collects the replies
  the SuperLink hands out side by side, not one site after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from queue import Queue
from typing import NoReturn, cast

import httpx
from flwr.app import Message, Metadata, RecordDict
from flwr.app.error import Error
from flwr.app.exception import AppExitException
from flwr.app.message import make_message
from flwr.common.config import get_fused_config_from_fab
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree
from flwr.proto.message_pb2 import Message as MessageProto
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    PushTaskOutputRequest,
)
from flwr.server.run_serverapp import run as run_serverapp
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE, TaskType
from flwr.supercore.date import now
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.exit.exit_handler import trigger_exit_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.logger import (
    flush_logs,
    mirror_output_to_queue,
    start_log_uploader,
    stop_log_uploader,
)
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType
from flwr.superlink.grid import HttpGrid
from flwr.superlink.grid import http_grid as _http_grid

from fedcare.common.errors import ConfigError, PolicyViolation
from fedcare.common.flower_app import check_fab
from fedcare.common.processes import module_command
from fedcare.common.superexec import (
    OBJECT_TRANSFERS,
    concurrent_object_transfers,
    read_secret,
    task_acquirer,
)

__all__ = [
    "BUSY_POLL_INTERVAL_S",
    "POLL_INTERVAL_S",
    "CollectingGrid",
    "pull_reply_objects",
    "run_executor",
    "run_task",
    "main",
]

log = logging.getLogger(__name__)

#: How often an idle executor asks for a task.
POLL_INTERVAL_S = 0.5
#: How often it asks while a ServerApp task of its own runs: another run's task waits up to
#: this long to start, and the running rounds keep the SuperLink's CPU (each ask costs about
#: as much as any other request to it).
BUSY_POLL_INTERVAL_S = 2.0
#: Waits between tries for a reply object the SuperLink does not hold yet (a site's
#: SuperNode announces its reply, then uploads its objects): first, longest. Flower's grid
#: waits 1 s, 2 s, 4 s..., which holds a reply up to a second after it is complete; these
#: are requests to the SuperLink on this machine.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.25
#: Tries per reply object (~10 min at the 0.25 s cap): a site that announces a reply and
#: never uploads its objects gets Flower's error reply for it (a drop-out), instead of
#: holding the round for Flower's whole 2 h limit.
PULL_MAX_TRIES = 2400
#: Longest the objects of one reply are waited for, all waits together (the tries above at
#: the cap): a reply whose objects never all come is then Flower's error reply, a drop-out.
REPLY_OBJECTS_MAX_S = PULL_MAX_TRIES * PULL_BACKOFF_CAP_S
#: Replies a ServerApp task collects side by side (each a site's, over its own requests).
REPLY_COLLECTORS = 8
_TOKEN = re.compile(r"[0-9a-f]{16,256}")


def _task_command(*, runtime_api_address: str, root_certificates: Path | None) -> list[str]:
    cmd = [*module_command("fedcare.server.executor"), "--run-task"]
    cmd += ["--runtime-api-address", runtime_api_address, "--parent-pid", str(os.getpid())]
    if root_certificates is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    return cmd


def run_executor(
    *,
    runtime_api_address: str,
    root_certificates: Path | None,
    secret: bytes,
    poll_s: float = POLL_INTERVAL_S,
    busy_poll_s: float = BUSY_POLL_INTERVAL_S,
) -> int:
    """Take ServerApp tasks from the SuperLink and run each in its own task process; ask
    every ``poll_s`` seconds, every ``busy_poll_s`` while a task process of its own runs.

    Returns when told to stop (SIGTERM, SIGINT, SIGHUP): each running task process gets
    SIGTERM (Flower's handler pushes its task as failed) and up to 10 s to exit. Returns 0
    then, or 3 when the SuperLink refuses the secret.
    """
    client = task_acquirer(runtime_api_address, secret, root_certificates=root_certificates)
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {
        s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    command = _task_command(
        runtime_api_address=runtime_api_address, root_certificates=root_certificates
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP])
    tasks: dict[int, subprocess.Popen[bytes]] = {}
    waiting = False
    log.info("taking ServerApp tasks from %s (fedcare's installed app only)", runtime_api_address)
    try:
        while not stop.is_set():
            for task_id, proc in list(tasks.items()):
                if proc.poll() is not None:
                    log.info("task %d: ServerApp process exited with %d", task_id, proc.returncode)
                    del tasks[task_id]
            try:
                reply = client.AcquireTask(request)
            except httpx.HTTPStatusError as e:
                if e.response.status_code in (401, 403):
                    log.error(
                        "the SuperLink at %s refused the SuperExec secret (HTTP %d); start "
                        "the executor with the secret file the SuperLink was started with",
                        runtime_api_address,
                        e.response.status_code,
                    )
                    return 3
                log.warning("AcquireTask failed: HTTP %d", e.response.status_code)
            except httpx.TransportError as e:
                if not waiting:
                    log.info("waiting for the SuperLink at %s (%s)", runtime_api_address, e)
                waiting = True
            else:
                if waiting:
                    log.info("connected to the SuperLink at %s", runtime_api_address)
                waiting = False
                if reply.HasField("task") and reply.token:
                    task = reply.task
                    if task.type != TaskType.SERVER_APP:  # never asked for; never run
                        log.error("task %d of type %r ignored", task.task_id, task.type)
                    else:
                        tasks[task.task_id] = _launch(command, reply.token)
                        log.info(
                            "run %d: task %d taken, ServerApp process %d",
                            task.run_id,
                            task.task_id,
                            tasks[task.task_id].pid,
                        )
                    continue  # another task may be waiting
            stop.wait(max(poll_s, busy_poll_s) if _running(tasks) else poll_s)
    finally:
        for proc in tasks.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in tasks.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        client.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def _running(tasks: dict[int, subprocess.Popen[bytes]]) -> bool:
    """Whether a task process of this executor is still running."""
    return any(proc.poll() is None for proc in tasks.values())


def _launch(command: Sequence[str], token: str) -> subprocess.Popen[bytes]:
    """Start a task process; its token goes through a pipe, not the command line."""
    proc = subprocess.Popen(list(command), stdin=subprocess.PIPE)  # noqa: S603 - ourselves
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):  # it died at once: its exit code says why
        proc.stdin.write(token.encode("ascii") + b"\n")
        proc.stdin.close()
    return proc


def run_task(
    *,
    runtime_api_address: str,
    token: str,
    root_certificates: bytes | None,
    parent_pid: int | None,
    log_queue: Queue[str | None],
) -> NoReturn:
    """Run one ServerApp task with fedcare's installed ServerApp, or refuse it; exit.

    Mirrors ``flwr.superlink.runtime.run_serverapp`` (same Flower building blocks, same
    exit handling) except that the FAB is checked (:func:`fedcare.common.flower_app.check_fab`)
    and never installed or imported: the ServerApp is ``fedcare.server.app.app``.
    """
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    _prompt_object_pulls()
    grid = CollectingGrid(
        runtime_api_address=runtime_api_address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        token=token,
    )
    # Flower's own ServerApp process reaches the Runtime client the same way.
    runtime = grid._runtime_client  # noqa: SLF001
    state: dict[str, object] = {
        "sub_status": SubStatus.FAILED,
        "details": "Task failed with unknown error.",
        "context": None,
        "log_uploader": None,
        "heartbeat": None,
    }

    def on_exit() -> None:
        grid._retry_invoker.max_tries = 1  # noqa: SLF001 - do not block on exit
        uploader = state["log_uploader"]
        if isinstance(uploader, threading.Thread):
            flush_logs(log_queue)
        context = state["context"]
        request = PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,  # type: ignore[arg-type]
            sub_status=str(state["sub_status"]),
            details=str(state["details"]),
        )
        try:
            runtime.PushTaskOutput(request)
        except httpx.HTTPError as err:
            log.error("failed to push the task's output: %s", err)
        if isinstance(uploader, threading.Thread):
            stop_log_uploader(log_queue, uploader)
        heartbeat = state["heartbeat"]
        if isinstance(heartbeat, HeartbeatSender) and heartbeat.is_running:
            heartbeat.stop()
        grid.close()

    register_signal_handlers(
        event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE,
        exit_message="Task stopped by user.",
        exit_handlers=[on_exit],
    )
    exit_code = ExitCode.SUCCESS
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
        state["heartbeat"] = heartbeat
        heartbeat.start()
        res = runtime.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        state["context"] = context
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        grid.set_run(run)
        state["log_uploader"] = start_log_uploader(
            log_queue=log_queue, node_id=0, run_id=run.run_id, client=runtime
        )
        try:
            check_fab(fab.content, run.fab_id, run.fab_version)
        except PolicyViolation as e:
            refused = f"fedcare refused run {run.run_id}: {e}"
            state["details"] = refused
            print(refused, file=sys.stderr, flush=True)  # the one line, also in `flwr log`
            # Flower's exit handling (push the output, stop uploads and heartbeats)
            # without flwr_exit's "unhandled exception in the ServerApp" text.
            trigger_exit_handlers(run_before_force_exit=True)
            trigger_exit_handlers(run_before_force_exit=False)
            sys.exit(1)
        else:
            context.run_config = get_fused_config_from_fab(fab.content, run)
            from fedcare.server.app import app as server_app  # the installed one, only now

            context = run_serverapp(
                grid=grid, context=context, server_app_dir="", loaded_server_app=server_app
            )
            context.state = RecordDict()  # as Flower: the context goes back without state
            state.update(context=context, sub_status=SubStatus.COMPLETED, details="")
    except Exception as ex:  # noqa: BLE001 - reported as the task's failure, as Flower does
        log.exception("ServerApp raised an exception")
        state.update(sub_status=SubStatus.FAILED, details=f"ServerApp failed with exception: {ex}")
        exit_code = ExitCode.SERVERAPP_EXCEPTION
        if isinstance(ex, AppExitException):
            exit_code = ex.exit_code
        elif isinstance(ex, ImportError):
            exit_code = ExitCode.COMMON_APP_IMPORT_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_SERVERAPP_RUN_LEAVE)


class CollectingGrid(HttpGrid):
    """Flower's ``HttpGrid``, collecting the replies one ``PullMessages`` hands out side by side.

    Flower's ``pull_messages`` takes the replies the SuperLink has (which removes them
    there), then pulls each reply's objects and confirms it, one reply after the other, so
    the last site's reply waits for every other's transfers. Each reply comes from its own
    site over its own requests; here they are collected by up to :data:`REPLY_COLLECTORS`
    threads. What is done with each reply is Flower's (flwr 1.42
    ``HttpGrid.pull_messages``): its objects pulled (a reply whose objects never come is
    Flower's ``MESSAGE_UNAVAILABLE`` error message, a drop-out), the reply confirmed and
    inflated; the order of the replies is the SuperLink's. Only the waits for objects still
    being uploaded differ (:func:`pull_reply_objects`: one object waited for, not each).
    """

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        run_id = cast(Run, self._run).run_id
        try:
            res = self._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
            replies = list(zip(res.messages_list, res.message_object_trees, strict=True))
            if len(replies) <= 1:
                return [self._collect(run_id, *reply) for reply in replies]
            with ThreadPoolExecutor(min(len(replies), REPLY_COLLECTORS)) as pool:
                return list(pool.map(lambda reply: self._collect(run_id, *reply), replies))
        except httpx.HTTPStatusError as e:
            if e.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                log.error("%s", _http_grid.ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE)
                return []
            raise

    def _collect(self, run_id: int, msg_proto: MessageProto, msg_tree: ObjectTree) -> Message:
        msg_id = msg_proto.metadata.message_id
        try:
            contents = pull_reply_objects(
                [tree.object_id for tree in iterate_object_tree(msg_tree)],
                make_pull_object_fn_protobuf(
                    pull_object_protobuf=self._runtime_client.PullObject,
                    node=self.node,
                    run_id=run_id,
                ),
            )
        except inflatable_utils.ObjectPullError as e:
            return make_message(
                metadata=Metadata(
                    run_id=run_id,
                    message_id="",
                    src_node_id=self.node.node_id,
                    dst_node_id=self.node.node_id,
                    message_type=SYSTEM_MESSAGE_TYPE,
                    group_id="",
                    ttl=0,
                    reply_to_message_id=msg_proto.metadata.reply_to_message_id,
                    created_at=now().timestamp(),
                ),
                error=Error(
                    code=ErrorCode.MESSAGE_UNAVAILABLE,
                    reason=(
                        "Reply message objects are unavailable. The sender may not have "
                        "completed the upload before the object-push session expired. "
                        f"{e}"
                    ),
                ),
            )
        self._runtime_client.ConfirmMessageReceived(
            ConfirmMessageReceivedRequest(node=self.node, run_id=run_id, message_object_id=msg_id)
        )
        message = cast(Message, inflatable_utils.inflate_object_from_contents(msg_id, contents))
        message.metadata.__dict__["_message_id"] = msg_id
        return message


def pull_reply_objects(
    object_ids: Sequence[str], pull_object_fn: Callable[[str], bytes]
) -> dict[str, bytes]:
    """A reply's objects (``object_ids`` in Flower's post-order: the message itself last),
    asking the SuperLink for each about once.

    The SuperLink hands out a reply as soon as the site's SuperNode announced it, and the
    SuperNode then uploads its objects, the message itself last (post-order, as Flower
    iterates the tree). Flower's ``pull_objects`` retries every object that is not there
    yet on its own, up to :data:`OBJECT_TRANSFERS` requests per wait. Here every object is
    asked for once, side by side; if some were not there yet, only the last of those (the
    message itself, where it is missing) is waited for (Flower's ``pull_objects``:
    :data:`PULL_BACKOFF_S`, :data:`PULL_MAX_TRIES`), then the rest of them are pulled
    (Flower's ``pull_objects`` again, whose retries cover any object uploaded after the
    message), all waits within :data:`REPLY_OBJECTS_MAX_S`. Raises Flower's
    ``ObjectPullError`` where Flower's own pull would (an object the SuperLink does not
    know, or one that does not come in time).
    """
    deadline = time.monotonic() + REPLY_OBJECTS_MAX_S
    ids = list(dict.fromkeys(object_ids))
    contents: dict[str, bytes] = {}

    def first_try(object_id: str) -> None:
        # Not there yet (still being uploaded): left out of ``contents``, waited for below.
        with contextlib.suppress(inflatable_utils.ObjectUnavailableError):
            contents[object_id] = pull_object_fn(object_id)

    with ThreadPoolExecutor(max(1, min(len(ids), OBJECT_TRANSFERS))) as pool:
        for done in [pool.submit(first_try, object_id) for object_id in ids]:
            done.result()
    missing = [object_id for object_id in ids if object_id not in contents]
    if not missing:
        return contents
    for wait_for in ([missing[-1]], missing[:-1]):  # the message itself is uploaded last
        if wait_for:
            contents.update(
                _http_grid.pull_objects(
                    object_ids=wait_for,
                    pull_object_fn=pull_object_fn,
                    max_time=max(0.0, deadline - time.monotonic()),
                )
            )
    return contents


def _prompt_object_pulls() -> None:
    """Give ``HttpGrid.pull_messages`` (this task process's) :data:`PULL_BACKOFF_S`, and
    its pulls and pushes :data:`~fedcare.common.superexec.OBJECT_TRANSFERS` objects at once.

    A Flower whose grid no longer moves objects through those functions keeps its own waits
    (one warning): slower rounds, never a task that fails for it.
    """
    try:
        concurrent_object_transfers()
    except RuntimeError as e:
        log.warning("%s; message objects move at Flower's own pace", e)
    if getattr(_http_grid, "push_objects", None) is inflatable_utils.push_objects:
        _http_grid.push_objects = partial(  # type: ignore[assignment]
            inflatable_utils.push_objects, max_concurrent_pushes=OBJECT_TRANSFERS
        )
    elif not isinstance(_http_grid.push_objects, partial):
        log.warning(
            "flwr.superlink.grid.http_grid no longer uses flwr's push_objects; messages are "
            "sent at Flower's own pace (fedcare's executor needs updating)"
        )
    if getattr(_http_grid, "pull_objects", None) is not inflatable_utils.pull_objects:
        log.warning(
            "flwr.superlink.grid.http_grid no longer uses flwr's pull_objects; replies are "
            "collected with Flower's own waits (fedcare's executor needs updating)"
        )
        return
    _http_grid.pull_objects = partial(  # type: ignore[assignment]
        inflatable_utils.pull_objects,
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
        max_tries_per_object=PULL_MAX_TRIES,
        max_concurrent_pulls=OBJECT_TRANSFERS,
    )


def _read_secret(path: Path) -> bytes:
    return read_secret(path, fix="`fedcare server start` writes it")


def _read_token() -> str:
    token = sys.stdin.readline().strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError("--run-task reads the task's token (hex) on its standard input")
    return token


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedcare.server.executor``: the executor, or (``--run-task``) one task process."""
    parser = argparse.ArgumentParser(
        prog="python -m fedcare.server.executor",
        description="Run fedcare's installed ServerApp for the SuperLink's ServerApp tasks.",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperLink HOST:PORT")
    parser.add_argument("--root-certificates", type=Path, help="the federation's ca.crt")
    parser.add_argument("--insecure", action="store_true", help="plain text (tests only)")
    parser.add_argument("--superexec-auth-secret-file", type=Path, help="the SuperExec secret")
    parser.add_argument("--run-task", action="store_true", help="run one task (token on stdin)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    try:
        if args.insecure == (args.root_certificates is not None):
            raise ConfigError("give exactly one of --root-certificates CA_CERT and --insecure")
        if args.root_certificates is not None and not args.root_certificates.is_file():
            raise ConfigError(f"--root-certificates {args.root_certificates}: no such file")
        if args.run_task:
            return _task_main(args, _read_token())
        if args.superexec_auth_secret_file is None:
            raise ConfigError("--superexec-auth-secret-file is required (the SuperLink's)")
        secret = _read_secret(args.superexec_auth_secret_file)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s executor %(message)s")
    for noisy in ("httpx", "httpcore"):  # a line per poll otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return run_executor(
        runtime_api_address=args.runtime_api_address,
        root_certificates=args.root_certificates,
        secret=secret,
    )


def _task_main(args: argparse.Namespace, token: str) -> NoReturn:
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)  # what the task prints reaches `flwr log` too
    # As under Flower's flwr-serverapp: Flower's logger has its own handler; no root
    # handler, so nothing (httpx's line per request) is uploaded twice or without end.
    certificates = None
    if args.root_certificates is not None:
        certificates = args.root_certificates.read_bytes()
    run_task(
        runtime_api_address=args.runtime_api_address,
        token=token,
        root_certificates=certificates,
        parent_pid=args.parent_pid,
        log_queue=log_queue,
    )


if __name__ == "__main__":
    raise SystemExit(main())
