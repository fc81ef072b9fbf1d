"""SuperLinkHandle.wait/run_info/stop against a stand-in Control API: no Flower process starts.

The stand-in answers Flower's protobuf-over-HTTP ``ListRuns`` and ``StopRun`` the way the
SuperLink does (same paths, same messages), with a status the test scripts. What it checks:
each poll is one request in this process (no ``flwr`` CLI process), a proxy in the
environment is never used for the loopback SuperLink, and ``done`` ends the wait at once
unless Flower already says the run failed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    ListRunsResponse,
    StopRunRequest,
    StopRunResponse,
)
from flwr.proto.run_pb2 import Run, RunStatus

from fedcare.simulations import flower_driver
from fedcare.simulations.flower_driver import FlowerRunError, SuperLinkHandle

RUN_ID = 7


class _FakeControl:
    """The statuses ``ListRuns`` gives, one per request (the last one repeats)."""

    def __init__(self, statuses: list[tuple[str, str, str]]) -> None:
        self.statuses = statuses
        self.list_requests = 0
        self.stopped: list[int] = []

    def list_runs(self, request: ListRunsRequest) -> ListRunsResponse:
        status, sub_status, details = self.statuses[min(self.list_requests, len(self.statuses) - 1)]
        self.list_requests += 1
        run = Run(
            run_id=request.run_id,
            fab_id="fedcare/app",
            pending_at="2026-01-01T00:00:00.000000+00:00",
            running_at="2026-01-01T00:00:01.000000+00:00",
            status=RunStatus(status=status, sub_status=sub_status, details=details),
        )
        if status == "finished":
            run.finished_at = "2026-01-01T00:00:03.500000+00:00"
        return ListRunsResponse(
            run_dict={request.run_id: run}, now="2026-01-01T00:00:02.000000+00:00"
        )


@pytest.fixture()
def control() -> Iterator[tuple[_FakeControl, int]]:
    fake = _FakeControl([("running", "", "")])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["content-length"] or 0))
            if self.path == "/v1/control/list-runs":
                reply = fake.list_runs(ListRunsRequest.FromString(body)).SerializeToString()
            elif self.path == "/v1/control/stop-run":
                fake.stopped.append(StopRunRequest.FromString(body).run_id)
                reply = StopRunResponse(success=True).SerializeToString()
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("content-type", "application/protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake, int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def _handle(tmp_path: Path, port: int) -> SuperLinkHandle:
    return SuperLinkHandle(
        env={"FLWR_HOME": str(tmp_path / "home")}, work_dir=tmp_path, port=port, pid=1
    )


def _no_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a flwr CLI process was started: {args}")

    monkeypatch.setattr(flower_driver.subprocess, "run", refuse)


def test_run_info_is_one_request_in_process_and_bypasses_proxies(
    tmp_path: Path, control: tuple[_FakeControl, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, port = control
    _no_cli(monkeypatch)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    link = _handle(tmp_path, port)
    try:
        row = link.run_info(RUN_ID)
        assert row["run-id"] == RUN_ID
        assert row["status"] == "running"
        assert row["elapsed"] == pytest.approx(1.0)
        assert fake.list_requests == 1
        assert link.stop(RUN_ID) is True
        assert fake.stopped == [RUN_ID]
    finally:
        link.close()


def test_done_ends_the_wait_at_the_next_poll(
    tmp_path: Path, control: tuple[_FakeControl, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, port = control
    _no_cli(monkeypatch)
    link = _handle(tmp_path, port)
    asked = []

    def done() -> bool:
        asked.append(fake.list_requests)
        return len(asked) >= 3

    try:
        status = link.wait(RUN_ID, timeout_s=60, poll_s=0, done=done)
    finally:
        link.close()
    assert status.status == "running"  # Flower had not marked it finished yet
    assert asked == [0, 1, 2]  # done is asked before each status request
    assert fake.list_requests == 3
    assert fake.stopped == []


def test_a_finished_run_ends_the_wait_without_done(
    tmp_path: Path, control: tuple[_FakeControl, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, port = control
    fake.statuses = [("running", "", ""), ("finished", "completed", "")]
    _no_cli(monkeypatch)
    link = _handle(tmp_path, port)
    try:
        status = link.wait(RUN_ID, timeout_s=60, poll_s=0)
    finally:
        link.close()
    assert (status.status, status.elapsed) == ("finished:completed", pytest.approx(2.5))


def test_done_does_not_hide_a_failed_run(
    tmp_path: Path, control: tuple[_FakeControl, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, port = control
    fake.statuses = [("finished", "failed", "ServerApp failed with exception: boom")]
    monkeypatch.setattr(SuperLinkHandle, "logs", lambda self, run_id: "the whole log")
    link = _handle(tmp_path, port)
    try:
        with pytest.raises(FlowerRunError, match="ended finished:failed: boom") as failed:
            link.wait(RUN_ID, timeout_s=60, poll_s=0, done=lambda: True)
    finally:
        link.close()
    assert "\n" not in str(failed.value)
    assert (tmp_path / f"run-{RUN_ID}.log").read_text() == "the whole log"


def test_a_run_the_superlink_does_not_know_is_one_clear_error(tmp_path: Path) -> None:
    link = _handle(tmp_path, port=9)  # nothing listens on 127.0.0.1:9
    try:
        with pytest.raises(FlowerRunError, match="cannot ask the SuperLink on 127.0.0.1:9"):
            link.run_info(RUN_ID)
    finally:
        link.close()
