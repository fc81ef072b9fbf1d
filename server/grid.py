"""A Flower Grid that collects replies promptly and asks the SuperLink no more than it must.

Flower's deployment grid (the one a ServerApp gets from a real SuperLink) checks for replies
every 3 seconds, so every message round trip waits 1.5 s on average after the last site has
answered. :class:`PromptGrid` wraps any grid and polls every ``poll_s`` instead (default
0.1 s, only while a round waits for replies). The SuperLink offers no way to be told that a
reply arrived, and each poll costs it about as much CPU as any other request (its SQLite
state through SQLAlchemy: ~12 ms per request on the 2-core benchmark machine, where the
SuperLink, not the sites' training, is most of a deployed round's CPU), so it is not polled
faster: a poll every 0.02 s would cost it more than half a core while the sites train.

Flower's strategies ask for the node list twice in a row when they configure a round
(``FedAvg.configure_train``: once to size the sample, once in ``sample_nodes``). The second
ask within :data:`NODE_LIST_REUSE_S` of the first, with no message pushed in between, gets
the first's answer; the one after it asks the SuperLink again, so a loop that waits for
nodes to connect (``sample_nodes``, fedcare's ``_wait_for_sites``) still sees every change.
Everything else is the wrapped grid's own behaviour. The simulation's in-memory grid
already polls quickly and is used as is (:func:`prompt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

__all__ = ["NODE_LIST_REUSE_S", "DelegatingGrid", "PromptGrid", "prompt"]

#: How long a node list may answer the next ask for it (when no message was pushed since).
NODE_LIST_REUSE_S = 0.2


class DelegatingGrid(Grid):
    """A Grid that passes every call to the grid it wraps; subclasses override what they
    change (:class:`PromptGrid`'s polling, ``server.secagg.SecureGrid``'s train rounds)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(DelegatingGrid):
    """Delegates to ``grid``; :meth:`send_and_receive` polls every ``poll_s`` seconds, and
    :meth:`get_node_ids` answers the ask right after another from its answer (module
    docstring)."""

    def __init__(
        self,
        grid: Grid,
        *,
        poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s}")
        super().__init__(grid)
        self.poll_s = poll_s
        self._clock = clock
        #: The last node list asked for and when, until it answered one more ask.
        self._nodes: tuple[list[int], float] | None = None

    def get_node_ids(self) -> Iterable[int]:
        """The SuperLink's node list; the ask right after another reuses its answer."""
        kept, self._nodes = self._nodes, None
        if kept is not None and self._clock() - kept[1] <= NODE_LIST_REUSE_S:
            return list(kept[0])
        nodes = list(self._grid.get_node_ids())
        self._nodes = (nodes, self._clock())
        return list(nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._nodes = None  # a new exchange asks the SuperLink afresh
        return self._grid.push_messages(messages)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``; pull replies until all arrived or ``timeout`` seconds passed."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting -= {m.metadata.reply_to_message_id for m in got}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


def prompt(grid: Grid) -> Grid:
    """``grid`` itself when it already polls quickly (the simulation's), else wrapped."""
    if hasattr(grid, "pull_interval"):  # flwr's InMemoryGrid: its own short interval
        return grid
    return PromptGrid(grid)
