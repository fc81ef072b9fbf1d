"""Flower's SuperNode (``flower-supernode``), with shorter waits between its polls.

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
waits a whole second after they are there. Nothing else in Flower changes. Each idle poll
is one small HTTPS request to the centre.

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
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

__all__ = ["BUSY_WINDOW_S", "FLOWER_VERSION", "FasterPolls", "install", "main"]

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


class FasterPolls:
    """``time`` as the SuperNode module sees it: the two fixed waits shortened, and the idle
    wait shorter still for :data:`BUSY_WINDOW_S` after the site answered a message."""

    def __init__(
        self,
        *,
        poll_s: float,
        reply_poll_s: float,
        busy_poll_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_s = poll_s
        self.reply_poll_s = reply_poll_s
        self.busy_poll_s = poll_s if busy_poll_s is None else min(busy_poll_s, poll_s)
        self._clock = clock
        self._busy_until = -math.inf

    def idle_wait(self) -> float:
        """The wait after a poll that found no message."""
        return self.busy_poll_s if self._clock() < self._busy_until else self.poll_s

    def sleep(self, seconds: float) -> None:
        if seconds == _IDLE_WAIT_S:
            seconds = self.idle_wait()
        elif seconds == _REPLY_WAIT_S:
            # Flower waits for the executor's reply only when it took a message: a run is on.
            self._busy_until = self._clock() + BUSY_WINDOW_S
            seconds = self.reply_poll_s
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(*, poll_s: float, reply_poll_s: float, busy_poll_s: float | None = None) -> FasterPolls:
    """Give Flower's SuperNode loop the shorter waits; refuse an unknown Flower."""
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
    faster = FasterPolls(poll_s=poll_s, reply_poll_s=reply_poll_s, busy_poll_s=busy_poll_s)
    loop.time = faster  # type: ignore[assignment]
    loop.pull_objects = partial(  # type: ignore[assignment]
        inflatable_utils.pull_objects,
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
        # Shorter waits, not a shorter wait, but not an endless one either: a centre that
        # announces objects it never serves holds the SuperNode ~10 min (at the 1 s cap),
        # not Flower's whole 2 h limit.
        max_tries_per_object=PULL_MAX_TRIES,
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
    parser.add_argument("--reply-poll", type=_seconds, default=0.1, help="reply check (s)")
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
