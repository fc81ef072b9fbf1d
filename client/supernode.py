"""Flower's SuperNode (``flower-supernode``), with shorter waits between its polls and none
between it and fedcare's site worker.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s
whenever it asked the SuperLink for a message and got none, and checks for its executor's
reply every 0.5 s. Each message of a round waits for both: about 3.5 s per round with an
evaluation on average, more than a warm round's training. ``fedcare site start`` runs the
SuperNode through this launcher, which gives that one module a ``time`` whose ``sleep``
turns those two fixed waits into ``--poll`` and ``--reply-poll`` seconds, the first
``--busy-poll`` seconds for :data:`BUSY_WINDOW_S` after the site answered a message (a
run's next message is seconds away; an idle site polls at ``--poll``). It also gives
that module's ``pull_objects`` a first wait of 0.05 s (doubling up to 1 s) between tries
for an object the centre does not hold yet, instead of Flower's 1 s, 2 s, 4 s...: a
SuperNode that takes a message while the ServerApp is still uploading its objects otherwise
waits a whole second after they are there. Each idle poll is one small HTTPS request to the
centre.

Inside the SuperNode process, waits for fedcare's own site worker are event-driven
(:class:`StateChanges`): the SuperNode's state announces every task it creates and every
message and object it stores, and

* a worker's ``AcquireTask`` is held (up to :data:`TASK_WAIT_S`) until the SuperNode has a
  task, so the worker learns of a message the moment it arrives, and an idle worker asks
  once per :data:`TASK_WAIT_S` instead of polling;
* a ``PullObject`` for an object the SuperNode is still fetching from the centre is held
  (up to :data:`OBJECT_WAIT_S`) until the object is there;
* the SuperNode's loop wakes when the worker's reply (and each of its objects) is stored,
  not at its next ``--reply-poll``.

Holding a request only delays its answer: the answer is Flower's, after Flower's own checks
(the secret's signature for ``AcquireTask``, the task token for ``PullObject``). Message
objects travel :data:`~fedcare.common.superexec.OBJECT_TRANSFERS` at a time each way
(Flower: at most one per CPU core, two on a 2-core machine). Nothing else in Flower
changes.

The launcher refuses to start when Flower is not the version whose loop it knows (the
waits would silently be something else); upgrade fedcare with Flower.

Usage (``fedcare site start`` builds it): ``python -m fedcare.client.supernode --poll 0.5
--reply-poll 0.1 -- <flower-supernode arguments>``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial, wraps
from typing import Any, TypeVar

from fedcare.common.superexec import OBJECT_TRANSFERS, concurrent_object_transfers

__all__ = [
    "BUSY_WINDOW_S",
    "FLOWER_VERSION",
    "OBJECT_WAIT_S",
    "TASK_WAIT_S",
    "FasterPolls",
    "StateChanges",
    "hold_until",
    "install",
    "main",
]

FLOWER_VERSION = "1.42."
"""The Flower release line whose SuperNode loop this launcher knows."""

#: Flower 1.42's fixed waits in ``start_client_internal``: no message came; no reply yet.
_IDLE_WAIT_S, _REPLY_WAIT_S = 3, 0.5

#: Waits between tries for a message object the centre does not hold yet: first, longest.
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 1.0
#: Tries per object before the SuperNode gives the message up (Flower's own default is 500
#: at waits of up to 10 s).
PULL_MAX_TRIES = 600

#: For this long after the site last answered a message, it polls every ``busy_poll_s``:
#: a run's next message (the evaluation after training, the next round) comes within
#: seconds, and an idle site soon falls back to ``poll_s``.
BUSY_WINDOW_S = 10.0

#: Longest the SuperNode holds its worker's ``AcquireTask`` while it has no task: an idle
#: worker asks this often (and a stopping SuperNode waits at most this for the request).
TASK_WAIT_S = 2.0
#: Longest it holds a ``PullObject`` for an object it is still fetching from the centre
#: (the worker's own retries take over after it).
OBJECT_WAIT_S = 1.0

_T = TypeVar("_T")


class StateChanges:
    """A count of the SuperNode's state changes (a task created, a message or an object
    stored) and a condition to wait for the next one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def bump(self) -> None:
        """Record a change and wake every waiter."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, since: int, timeout: float) -> int:
        """Until a change after generation ``since``, or ``timeout`` seconds; the
        generation then (pass it as the next ``since``: no change is missed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != since, timeout)
            return self._generation


def hold_until(
    changes: StateChanges,
    ask: Callable[[], _T],
    done: Callable[[_T], bool],
    *,
    hold_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """``ask()`` again at each state change until ``done`` says so or ``hold_s`` passed;
    the last answer."""
    since = changes.generation  # read before asking: a change in between wakes at once
    deadline = clock() + hold_s
    while True:
        answer = ask()
        left = deadline - clock()
        if done(answer) or left <= 0:
            return answer
        since = changes.wait(since, left)


def _announcing(method: Callable[..., _T], changes: StateChanges) -> Callable[..., _T]:
    @wraps(method)
    def announced(*args: Any, **kwargs: Any) -> _T:
        try:
            return method(*args, **kwargs)
        finally:
            changes.bump()

    announced.__fedcare_announces__ = True  # type: ignore[attr-defined]
    return announced


def _announce_changes(changes: StateChanges) -> None:
    """Make the SuperNode's state classes (this process's) bump ``changes``."""
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.supernode.nodestate import nodestate_factory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    if getattr(nodestate_factory, "InMemoryNodeState", None) is not InMemoryNodeState:
        raise RuntimeError(
            "flwr.supernode.nodestate no longer keeps its state in InMemoryNodeState as flwr "
            f"{FLOWER_VERSION}x did; fedcare's SuperNode launcher needs updating"
        )
    for cls, name in (
        (InMemoryNodeState, "create_task"),  # a message arrived: a task for the worker
        (InMemoryNodeState, "store_message"),  # a message, or the worker's reply
        (InMemoryObjectStore, "put"),  # an object from the centre, or of the reply
    ):
        method = getattr(cls, name)
        if not getattr(method, "__fedcare_announces__", False):
            setattr(cls, name, _announcing(method, changes))


def _hold_worker_requests(changes: StateChanges) -> None:
    """Hold the worker's ``AcquireTask`` and ``PullObject`` until they have an answer."""
    from flwr.supernode.servicer.runtime import runtime_handlers as handlers

    acquire, pull = handlers.acquire_task, handlers.pull_object
    if getattr(acquire, "__fedcare_holds__", False):
        return

    @wraps(acquire)
    def acquire_task(request: Any, state: Any) -> Any:
        return hold_until(
            changes,
            lambda: acquire(request, state),
            lambda res: res.HasField("task"),
            hold_s=TASK_WAIT_S,
        )

    @wraps(pull)
    def pull_object(request: Any, state: Any, task: Any) -> Any:
        return hold_until(
            changes,
            lambda: pull(request, state, task),
            lambda res: res.object_available or not res.object_found,
            hold_s=OBJECT_WAIT_S,
        )

    acquire_task.__fedcare_holds__ = True  # type: ignore[attr-defined]
    handlers.acquire_task = acquire_task  # type: ignore[assignment]
    handlers.pull_object = pull_object  # type: ignore[assignment]


class FasterPolls:
    """``time`` as the SuperNode module sees it: the two fixed waits shortened, and the idle
    wait shorter still for :data:`BUSY_WINDOW_S` after the site answered a message. With
    ``changes``, a wait for the worker's reply ends as soon as the state changes."""

    def __init__(
        self,
        *,
        poll_s: float,
        reply_poll_s: float,
        busy_poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        changes: StateChanges | None = None,
    ) -> None:
        self.poll_s = poll_s
        self.reply_poll_s = reply_poll_s
        self.busy_poll_s = poll_s if busy_poll_s is None else min(busy_poll_s, poll_s)
        self._clock = clock
        self._busy_until = -math.inf
        self._changes = changes
        self._seen = 0 if changes is None else changes.generation

    def idle_wait(self) -> float:
        """The wait after a poll that found no message."""
        return self.busy_poll_s if self._clock() < self._busy_until else self.poll_s

    def sleep(self, seconds: float) -> None:
        if seconds == _IDLE_WAIT_S:
            seconds = self.idle_wait()
        elif seconds == _REPLY_WAIT_S:
            # Flower waits for the executor's reply only when it took a message: a run is on.
            self._busy_until = self._clock() + BUSY_WINDOW_S
            if self._changes is not None:
                # Woken by the reply (or its next object); a change since the last wake,
                # before Flower looked, ends the wait at once.
                self._seen = self._changes.wait(self._seen, self.reply_poll_s)
                return
            seconds = self.reply_poll_s
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(*, poll_s: float, reply_poll_s: float, busy_poll_s: float | None = None) -> FasterPolls:
    """Give Flower's SuperNode loop the shorter waits, its state the change announcements,
    its worker-facing handlers the holds and its transfers more room; refuse an unknown
    Flower."""
    version = importlib.metadata.version("flwr")
    if not version.startswith(FLOWER_VERSION):
        raise RuntimeError(
            f"flwr {version} is installed, but fedcare's SuperNode launcher knows the loop of "
            f"flwr {FLOWER_VERSION}x; install the flwr version fedcare pins"
        )
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses the time module as flwr "
            f"{FLOWER_VERSION}x did; fedcare's SuperNode launcher needs updating"
        )
    from flwr.supercore.inflatable import inflatable_utils

    if getattr(loop, "pull_objects", None) is not inflatable_utils.pull_objects:
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer uses flwr's pull_objects as flwr "
            f"{FLOWER_VERSION}x did; fedcare's SuperNode launcher needs updating"
        )
    if (
        getattr(loop, "push_object_contents_from_iterable", None)
        is not inflatable_utils.push_object_contents_from_iterable
    ):
        raise RuntimeError(
            "flwr.supernode.start_client_internal no longer pushes replies with flwr's "
            f"push_object_contents_from_iterable as flwr {FLOWER_VERSION}x did; fedcare's "
            "SuperNode launcher needs updating"
        )
    changes = StateChanges()
    _announce_changes(changes)
    _hold_worker_requests(changes)
    concurrent_object_transfers()
    faster = FasterPolls(
        poll_s=poll_s, reply_poll_s=reply_poll_s, busy_poll_s=busy_poll_s, changes=changes
    )
    loop.time = faster  # type: ignore[assignment]
    loop.pull_objects = partial(  # type: ignore[assignment]
        inflatable_utils.pull_objects,
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
        # Shorter waits, not a shorter wait, but not an endless one either: a centre that
        # announces objects it never serves holds the SuperNode ~10 min (at the 1 s cap),
        # not Flower's whole 2 h limit.
        max_tries_per_object=PULL_MAX_TRIES,
        max_concurrent_pulls=OBJECT_TRANSFERS,
    )
    loop.push_object_contents_from_iterable = partial(  # type: ignore[assignment]
        inflatable_utils.push_object_contents_from_iterable,
        max_concurrent_pushes=OBJECT_TRANSFERS,
    )
    return faster


def _seconds(value: str) -> float:
    seconds = float(value)
    if not 0.05 <= seconds <= 3:
        raise argparse.ArgumentTypeError(f"{value}: use seconds in 0.05..3")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--poll``/``--reply-poll``, then run ``flower-supernode`` with the rest."""
    parser = argparse.ArgumentParser(prog="python -m fedcare.client.supernode")
    parser.add_argument("--poll", type=_seconds, default=0.5, help="idle poll (s), 0.05..3")
    parser.add_argument(
        "--reply-poll",
        type=_seconds,
        default=0.1,
        help="longest wait (s) between looks for the worker's reply, which wakes it sooner",
    )
    parser.add_argument(
        "--busy-poll",
        type=_seconds,
        default=0.1,
        help=f"idle poll (s) for {BUSY_WINDOW_S:g} s after answering a message, 0.05..3",
    )
    parser.add_argument("supernode_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    rest = list(args.supernode_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        install(poll_s=args.poll, reply_poll_s=args.reply_poll, busy_poll_s=args.busy_poll)
    except RuntimeError as e:
        print(f"fedcare SuperNode launcher: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
