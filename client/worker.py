"""fedcare's site worker: the only executor of a hospital's SuperNode.

Flower's own executor (``flower-superexec``) starts a fresh ``flwr-clientapp`` process for
every message, installs the app bundle (FAB) the run shipped and imports *its* ClientApp:
whoever can submit a run runs code at every hospital. ``fedcare site start`` therefore
runs the SuperNode with ``--isolation process`` (Flower launches nothing) and a SuperExec
shared secret, and runs this worker beside it, as the site's user:

- it takes the SuperNode's ClientApp tasks from its local Runtime API (127.0.0.1, each
  request signed with the secret in ``<state_dir>/superexec.secret``: no other local user
  can claim a task);
- it checks that the run's FAB is fedcare's thin app at this site's installed version
  (:func:`fedcare.common.flower_app.check_fab`) and **never installs or imports anything from
  it**: it runs the ClientApp fedcare installed (:func:`fedcare.client.app.handle_train`,
  :func:`fedcare.client.app.handle_evaluate`). Anything else is refused: an error reply whose reason
  the server records, one line here, and a ``refused`` entry in the site's audit log;
- it stays up between messages with torch, fedcare and the site's loaded and encoded data
  in memory (:class:`fedcare.client.warm.WarmSites`, invalidated when the data changes), so a round
  costs its training, not a Python start. The site's configuration, policy and ledger are
  read afresh for every message; a ledger charge is written before training starts, so a
  worker that dies loses none (``site start`` starts it again).

Run by ``fedcare site start``; by hand: ``python -m fedcare.client.worker SITE_CONFIG``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

from flwr.app import Context, Message
from flwr.common.constant import SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

from fedcare.client.app import handle_evaluate, handle_secagg, handle_train_message, refuse
from fedcare.client.deploy import secret_path
from fedcare.client.site_config import load_site_config
from fedcare.client.warm import WarmSites
from fedcare.common import keys
from fedcare.common.audit import running_code_hash, versions
from fedcare.common.errors import ConfigError, FedcareError, PolicyViolation, RoundFailed
from fedcare.common.flower_app import check_fab
from fedcare.common.superexec import (
    OBJECT_TRANSFERS,
    concurrent_object_transfers,
    read_secret,
    task_acquirer,
)

__all__ = ["SiteWorker", "main"]

log = logging.getLogger(__name__)


#: How much of a message type (chosen by the centre) goes into a refusal and the audit log.
_MAX_PHASE = 40

Handler = Callable[..., Message]
_HANDLERS: dict[str, Handler] = {
    "train": handle_train_message,  # handle_train, or secure aggregation's first stage
    "evaluate": handle_evaluate,
    keys.MT_SECAGG: handle_secagg,  # secure aggregation's later stages (client/secagg.py)
}

#: Waits between tries for a message object the SuperNode does not hold yet (it hands out
#: a task as soon as the message arrives, then fetches the message's objects from the
#: centre): first wait, and the longest. fedcare's SuperNode holds such a request until the
#: object is there (up to ``OBJECT_WAIT_S``, :mod:`fedcare.client.supernode`); these waits
#: come after it. Flower's own ClientApp process waits 1 s, then 2 s, 4 s...
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.25


def prompt_object_pulls() -> None:
    """Give Flower's ``pull_task_input`` and ``push_message`` (this process's) the waits of
    :data:`PULL_BACKOFF_S` and :data:`~fedcare.common.superexec.OBJECT_TRANSFERS` transfers
    at once.

    ``flwr.supernode.runtime.run_clientapp`` inflates the task's message through that
    module's ``pull_and_inflate_object_from_tree`` and pushes the reply's objects with its
    ``push_objects``; each is replaced by the same function with other keyword defaults.
    Idempotent. Refuses a Flower whose module no longer uses those functions (the waits
    would silently be Flower's again).
    """
    from flwr.supernode.runtime import run_clientapp

    concurrent_object_transfers()
    current = run_clientapp.pull_and_inflate_object_from_tree
    original = inflatable_utils.pull_and_inflate_object_from_tree
    pushes = run_clientapp.push_objects
    if isinstance(current, partial) and current.func is original:
        return
    if current is not original or pushes is not inflatable_utils.push_objects:
        raise RuntimeError(
            "flwr.supernode.runtime.run_clientapp no longer inflates messages with flwr's "
            "pull_and_inflate_object_from_tree or pushes them with its push_objects; "
            "fedcare's site worker needs updating"
        )
    run_clientapp.pull_and_inflate_object_from_tree = partial(  # type: ignore[assignment]
        original,
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
        # Shorter waits, not a shorter wait: Flower stops after 500 tries per object (80 min
        # at its own waits, 2 min at these); its overall limit (max_time, 2 h) still holds.
        max_tries_per_object=None,
        max_concurrent_pulls=OBJECT_TRANSFERS,
    )
    run_clientapp.push_objects = partial(  # type: ignore[assignment]
        pushes, max_concurrent_pushes=OBJECT_TRANSFERS
    )


class _Stop(BaseException):
    """SIGTERM/SIGINT: leave the loop (a task in progress is abandoned; its charge stands)."""


class SiteWorker:
    """Take the SuperNode's ClientApp tasks and run fedcare's installed ClientApp for them.

    Parameters
    ----------
    config_path : pathlib.Path
        The site's ``site-config.toml`` (read afresh for every message).
    runtime_address : str
        The SuperNode's local Runtime API, ``127.0.0.1:PORT``.
    secret : bytes
        The SuperExec shared secret the SuperNode was started with.
    """

    def __init__(self, *, config_path: Path, runtime_address: str, secret: bytes) -> None:
        self.config_path = Path(config_path).resolve()
        self.runtime_address = runtime_address
        # One site, whatever its size (an imaging site can pass any byte bound): it stays
        # warm while its files are unchanged, as it did before the bounds existed.
        self.warm = WarmSites(max_sites=1, max_bytes=sys.maxsize)
        self.tasks = 0
        # Loopback only; the secret authenticates each AcquireTask.
        self._acquirer = task_acquirer(runtime_address, secret)

    def close(self) -> None:
        self._acquirer.close()

    def poll(self) -> bool:
        """Take one task if the SuperNode has one and run it; ``True`` if there was one."""
        # Agent-app tasks too: the worker answers them with a refusal, where a task nobody
        # takes would leave the SuperNode waiting for its reply.
        res = self._acquirer.AcquireTask(
            AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP, TaskType.AGENT_APP],
                agentapp_fab_hashes=[],
            )
        )
        if not (res.HasField("task") and res.token):
            return False
        self.run_task(res.token, task_type=str(res.task.type) or TaskType.CLIENT_APP)
        return True

    def run_task(self, token: str, *, task_type: str = TaskType.CLIENT_APP) -> None:
        """Pull the task's message, answer it, push the reply and the task's end."""
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the site worker stopped during the task"
        try:
            message, context, run, fab = pull_task_input(client)
            reply, status, details = self.answer(
                message,
                context,
                fab_content=fab.content,
                fab_id=run.fab_id,
                fab_version=run.fab_version,
                task_type=task_type,
            )
            push_message(client, reply, context)
        finally:
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            finally:
                heartbeat.stop()
                client.close()
            self.tasks += 1

    def answer(
        self,
        message: Message,
        context: Context,
        *,
        fab_content: bytes,
        fab_id: str,
        fab_version: str,
        task_type: str = TaskType.CLIENT_APP,
    ) -> tuple[Message, str, str]:
        """The reply to ``message``, the task's status and its details.

        Every task gets a reply, whatever happens: a SuperNode whose task ends without one
        waits for it forever. The node config is this worker's own (the site's
        ``site-config.toml``), whatever the task carries.
        """
        context.node_config = {keys.NC_SITE_CONFIG: str(self.config_path)}
        kind = message.metadata.message_type
        phase = kind[:_MAX_PHASE] or "message"
        try:
            try:
                check_fab(fab_content, fab_id, fab_version)
            except PolicyViolation:
                raise
            except Exception as e:  # an archive its reader chokes on is not fedcare's app
                raise PolicyViolation(
                    f"the run's app bundle cannot be read ({type(e).__name__}); it is not "
                    "fedcare's thin app"
                ) from e
            if task_type != TaskType.CLIENT_APP:
                raise PolicyViolation(
                    f"a {str(task_type)[:_MAX_PHASE]} task is not one this site runs (it runs "
                    "fedcare's ClientApp only)"
                )
            handler = _HANDLERS.get(kind)
            if handler is None:
                raise PolicyViolation(
                    f"message type {phase!r} is not one fedcare's ClientApp answers "
                    f"({', '.join(sorted(_HANDLERS))})"
                )
        except PolicyViolation as e:
            reply = refuse(message, context, e, phase=phase)
            log.error("refused: %s", reply.error.reason)
            return reply, SubStatus.FAILED, reply.error.reason or "refused"
        try:
            reply = handler(message, context, warm=self.warm)
        except Exception as e:  # a bug, or an input fedcare did not foresee: never a jam
            log.exception("fedcare's ClientApp failed on a %s message", phase)
            failure = RoundFailed(
                f"fedcare's ClientApp failed on this {phase} message ({type(e).__name__}); "
                "the site's log has the details"
            )
            reply = refuse(message, context, failure, phase=phase)
            return reply, SubStatus.FAILED, reply.error.reason or "failed"
        if reply.has_error():
            log.warning("answered with a refusal: %s", reply.error.reason)
        return reply, SubStatus.COMPLETED, ""

    def serve(
        self,
        *,
        poll_s: float,
        stop: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Ask for a task until ``stop()`` (or SIGTERM in :func:`main`), at most once every
        ``poll_s`` seconds while there is none.

        fedcare's SuperNode holds each ask until it has a task (up to
        :data:`~fedcare.client.supernode.TASK_WAIT_S`): the worker asks again at once, and
        a message is taken the moment it arrives. A SuperNode that answers at once (one
        not started by fedcare's launcher) is asked every ``poll_s``.
        """
        while not stop():
            asked = clock()
            if self.poll():
                continue
            rest = poll_s - (clock() - asked)
            if rest > 0:
                sleep(rest)


def _orphaned(parent: int) -> Callable[[], bool]:
    """Whether ``fedcare site start`` (``parent``) is gone: a worker never outlives it."""

    def gone() -> bool:
        if os.getppid() != parent:
            log.error("fedcare site start (pid %d) is gone; stopping", parent)
            return True
        return False

    return gone


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signum)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fedcare.client.worker",
        description="fedcare's site worker (started by `fedcare site start`).",
    )
    parser.add_argument("config", type=Path, help="the site's site-config.toml")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.25,
        help="least seconds between asks for a task (0.01..5); the SuperNode holds each ask",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT; one clear line and exit 2 on a bad setup."""
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="site-worker: %(message)s", stream=sys.stderr)
    # httpx logs every request at INFO: an ask every 2 s would bury the site's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if not 0.01 <= args.poll <= 5:
            raise ConfigError(f"--poll {args.poll}: use a number of seconds in 0.01..5")
        site = load_site_config(args.config)
        secret = read_secret(
            secret_path(site), fix="start the site with `fedcare site start`, which writes it"
        )
        worker = SiteWorker(
            config_path=args.config,
            runtime_address=f"127.0.0.1:{site.supernode.port}",
            secret=secret,
        )
    except FedcareError as e:
        print(f"site-worker: error: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_stop)
    prompt_object_pulls()
    # The audit log records the running code's hash and versions, taken once per process:
    # take them now, as the worker starts with the code it imported, not at its first task.
    running_code_hash()
    versions()
    log.info("site %s: taking ClientApp tasks from 127.0.0.1:%d", site.site_id, site.supernode.port)
    try:
        worker.serve(poll_s=args.poll, stop=_orphaned(os.getppid()))
    except _Stop:
        log.info("stopped after %d task(s)", worker.tasks)
    finally:
        worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
