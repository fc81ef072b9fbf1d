"""The ServerApp task's grid collects the sites' replies side by side (issue 11), each
exactly as Flower's ``HttpGrid`` would: same messages, same ids, same drop-out error for a
reply whose objects never come, every collected reply confirmed.

The SuperLink's Runtime API is a stand-in holding real Flower messages and their objects.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.run import Run
from flwr.superlink.grid import http_grid

from fedcare.server import executor
from tests._flower import task_identity

#: Bound on an awaited condition; only collection one reply after the other reaches it.
AWAIT_S = 30.0


def _reply(site: int) -> Message:
    with task_identity(run_id=3, node_id=1):
        ins = Message(
            RecordDict({"c": ConfigRecord({"r": 1})}), dst_node_id=site, message_type="train"
        )
        ins.metadata.__dict__["_message_id"] = ins.object_id
    with task_identity(run_id=3, node_id=site):
        reply = Message(RecordDict({"m": MetricRecord({"site": float(site)})}), reply_to=ins)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


class Runtime:
    """The SuperLink's Runtime API for one ``PullMessages``: ``replies`` and their objects.

    ``meet`` makes each reply's first object pull wait until another reply's objects were
    asked for too (both replies in flight at once); ``missing`` names a reply whose objects
    never come.
    """

    def __init__(self, replies: list[Message], *, meet: bool, missing: int | None = None) -> None:
        self.replies = replies
        self.owner: dict[str, int] = {}
        self.content: dict[str, bytes] = {}
        for i, reply in enumerate(replies):
            for oid, obj in get_all_nested_objects(reply).items():
                self.owner[oid] = i
                self.content[oid] = obj.deflate()
        self.asked = [threading.Event() for _ in replies]
        self.meet, self.missing = meet, missing
        self.met_alone: list[int] = []
        self.confirmed: list[str] = []
        self.lock = threading.Lock()

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # noqa: N802 - Flower's
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(m)) for m in self.replies],
            message_object_trees=[get_object_tree(m) for m in self.replies],
        )

    def PullObject(self, request: Any) -> PullObjectResponse:  # noqa: N802
        i = self.owner[request.object_id]
        self.asked[i].set()
        if self.meet:
            others = [e for j, e in enumerate(self.asked) if j != i]
            if not all(e.wait(AWAIT_S) for e in others):
                with self.lock:
                    self.met_alone.append(i)
        if i == self.missing:
            return PullObjectResponse(object_found=True, object_available=False)
        content = self.content[request.object_id]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request: Any) -> object:  # noqa: N802
        with self.lock:
            self.confirmed.append(request.message_object_id)
        return object()


def _grid(runtime: Runtime) -> executor.CollectingGrid:
    grid = executor.CollectingGrid(runtime_api_address="127.0.0.1:9", insecure=True, token="ab")
    grid.set_run(Run.create_empty(run_id=3))
    grid._client = runtime  # type: ignore[assignment] # noqa: SLF001 - the stand-in
    return grid


@pytest.fixture(autouse=True)
def _quick_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply whose objects never come is given up after 3 tries, 0.01 s apart."""
    monkeypatch.setattr(
        http_grid,
        "pull_objects",
        lambda **kw: inflatable_utils.pull_objects(
            **kw, initial_backoff=0.01, backoff_cap=0.01, max_tries_per_object=3
        ),
    )


def test_three_sites_replies_are_collected_side_by_side_as_flower_would() -> None:
    replies = [_reply(site) for site in (11, 12, 13)]
    runtime = Runtime(replies, meet=True)
    got = list(_grid(runtime).pull_messages([r.metadata.reply_to_message_id for r in replies]))
    assert runtime.met_alone == [], "a reply's objects were pulled while no other's were"
    assert [m.metadata.message_id for m in got] == [r.metadata.message_id for r in replies]
    assert [m.content["m"]["site"] for m in got] == [11.0, 12.0, 13.0]
    assert [m.metadata.src_node_id for m in got] == [11, 12, 13]
    assert sorted(runtime.confirmed) == sorted(r.metadata.message_id for r in replies)


def test_a_reply_whose_objects_never_come_is_flower_s_drop_out_and_the_others_arrive() -> None:
    replies = [_reply(site) for site in (11, 12)]
    runtime = Runtime(replies, meet=False, missing=0)
    got = list(_grid(runtime).pull_messages([r.metadata.reply_to_message_id for r in replies]))
    lost, arrived = got
    assert lost.has_error() and lost.error.code == ErrorCode.MESSAGE_UNAVAILABLE
    assert lost.metadata.reply_to_message_id == replies[0].metadata.reply_to_message_id
    assert arrived.content["m"]["site"] == 12.0
    assert runtime.confirmed == [replies[1].metadata.message_id]  # never the lost one


def test_a_single_reply_is_collected_as_flower_would() -> None:
    reply = _reply(11)
    runtime = Runtime([reply], meet=False)
    (got,) = _grid(runtime).pull_messages([reply.metadata.reply_to_message_id])
    assert got.metadata.message_id == reply.metadata.message_id
    assert got.content["m"]["site"] == 11.0


class Upload:
    """A reply's objects as the SuperLink holds them while the site's SuperNode uploads
    them: none is there until the message itself (the last in Flower's post-order) has been
    asked for ``until`` times (0: all there from the start); counts every ``PullObject``."""

    def __init__(self, reply: Message, *, until: int, children_first: bool = False) -> None:
        self.ids = [t.object_id for t in iterate_object_tree(get_object_tree(reply))]
        objects = get_all_nested_objects(reply)
        self.content = {oid: objects[oid].deflate() for oid in self.ids}
        self.root = self.ids[-1]
        self.until = until
        self.there = set(self.ids[:-1]) if children_first else set()
        if until <= 0:
            self.there = set(self.ids)
        self.asked: list[str] = []
        self.lock = threading.Lock()

    def pull(self, object_id: str) -> bytes:
        with self.lock:
            self.asked.append(object_id)
            if object_id not in self.content:
                raise inflatable_utils.ObjectPullError(object_id, "the object could not be found.")
            if object_id == self.root and self.asked.count(self.root) >= self.until:
                self.there = set(self.ids)
            if object_id not in self.there:
                raise inflatable_utils.ObjectUnavailableError(object_id)
            return self.content[object_id]


def test_a_reply_still_uploading_is_waited_for_by_its_message_alone() -> None:
    """Flower's pull retries each missing object on its own (a reply of 9 objects: up to 9
    requests per wait, each a request the SuperLink serves); fedcare's asks for each once,
    then waits on the message itself, which the SuperNode uploads last."""
    reply = _reply(11)
    upload = Upload(reply, until=3)
    n = len(upload.ids)
    contents = executor.pull_reply_objects(upload.ids, upload.pull)
    assert contents == upload.content
    # once each, two more asks for the message, then the others once more
    assert len(upload.asked) == n + 2 + (n - 1)
    assert upload.asked.count(upload.root) == 3
    got = inflatable_utils.inflate_object_from_contents(upload.root, contents)
    assert got.content["m"]["site"] == 11.0


def test_a_complete_reply_costs_one_request_per_object() -> None:
    reply = _reply(12)
    upload = Upload(reply, until=0)
    assert executor.pull_reply_objects(upload.ids, upload.pull) == upload.content
    assert sorted(upload.asked) == sorted(upload.ids)


def test_only_the_message_missing_is_one_more_wait() -> None:
    reply = _reply(13)
    upload = Upload(reply, until=2, children_first=True)
    assert executor.pull_reply_objects(upload.ids, upload.pull) == upload.content
    assert len(upload.asked) == len(upload.ids) + 1


def test_an_object_the_superlink_does_not_know_fails_as_flower_s_pull_would() -> None:
    reply = _reply(11)
    upload = Upload(reply, until=0)
    with pytest.raises(inflatable_utils.ObjectPullError):
        executor.pull_reply_objects([*upload.ids[:-1], "f" * 64, upload.root], upload.pull)


def test_a_reply_whose_message_never_comes_is_given_up() -> None:
    reply = _reply(11)
    upload = Upload(reply, until=10**9)
    with pytest.raises(inflatable_utils.ObjectPullError):
        executor.pull_reply_objects(upload.ids, upload.pull)


def test_all_waits_for_one_reply_share_one_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message came (on its second ask), one of its records never does: the wait for
    the records gets what is left of REPLY_OBJECTS_MAX_S (here nothing: one more ask each),
    not a limit of its own after the message's wait."""
    monkeypatch.setattr(executor, "REPLY_OBJECTS_MAX_S", 0.0)
    upload = Upload(_reply(11), until=2)
    lost = upload.ids[0]

    def pull(object_id: str) -> bytes:
        content = upload.pull(object_id)
        if object_id == lost:
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return content

    with pytest.raises(inflatable_utils.ObjectPullError):
        executor.pull_reply_objects(upload.ids, pull)
    # the first pass, then one ask in the records' wait (Flower's pull gave up at once);
    # a wait with a limit of its own would have asked 3 more times (max_tries_per_object)
    assert upload.asked.count(lost) == 2
    assert upload.asked.count(upload.root) == 2
