"""The centre's public port forwards Flower's Fleet API and nothing else (``server/gateway.py``).

The gateway runs as ``fedcare server start`` runs it (``python -m fedcare.server.gateway``, TLS with
the centre's certificate) in front of a stand-in SuperLink that records every request it
gets. Requests are written byte for byte on a TLS socket, so path tricks reach the gateway
exactly as an attacker would send them (no client library normalises them first).
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from flwr.common.constant import TIMESTAMP_HEADER
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER

from fedcare.common.certs import CertPaths, init_certificates
from fedcare.common.processes import free_port, stop_family
from fedcare.server.deploy import SuperLinkSettings, gateway_command
from fedcare.server.gateway import FleetGateway

pytestmark = pytest.mark.integration


@dataclass
class Recorder:
    """A stand-in SuperLink: answers 200 to everything and records what it got."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.seen.append(
            {
                "method": scope["method"],
                "raw_path": scope["raw_path"],
                "headers": [(k.decode(), v.decode()) for k, v in scope["headers"]],
                "body": body,
            }
        )
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/protobuf"),
                    (b"content-encoding", b"gzip"),  # must reach the client still compressed
                    (b"x-echo", b"1"),
                    (b"connection", b"keep-alive, x-echo-private"),
                    (b"x-echo-private", b"hop-by-hop by name"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": gzip.compress(body, mtime=0)})

    def paths(self) -> list[bytes]:
        return [r["raw_path"] for r in self.seen]


@dataclass
class Centre:
    certs: CertPaths
    port: int
    upstream: Recorder
    upstream_port: int


def _serve_in_thread(app: Any, port: int, certs: CertPaths) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        ssl_certfile=str(certs.server_cert),
        ssl_keyfile=str(certs.server_key),
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the stand-in SuperLink did not start"
        time.sleep(0.02)
    return server


def _start_gateway(certs: CertPaths, port: int, upstream_port: int) -> subprocess.Popen[bytes]:
    settings = SuperLinkSettings(
        certs=certs.ca_cert.parent, host="127.0.0.1", port=port, control_port=upstream_port
    )
    return subprocess.Popen(
        gateway_command(settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _context(certs: CertPaths) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_cert))


def _health(certs: CertPaths, port: int) -> int | None:
    try:
        with httpx.Client(verify=_context(certs), trust_env=False) as client:
            return client.get(f"https://127.0.0.1:{port}/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


def _wait_for_health(certs: CertPaths, port: int, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the gateway exited"
        status = _health(certs, port)
        if status is not None:
            return status
        time.sleep(0.1)
    raise AssertionError("the gateway did not answer /health")


@pytest.fixture(scope="module")
def centre(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Centre]:
    certs = init_certificates(out=tmp_path_factory.mktemp("pki") / "certs", hosts=["127.0.0.1"])
    upstream = Recorder()
    upstream_port, port = free_port(), free_port()
    server = _serve_in_thread(upstream, upstream_port, certs)
    proc = _start_gateway(certs, port, upstream_port)
    try:
        assert _wait_for_health(certs, port, proc) == 200
        yield Centre(certs, port, upstream, upstream_port)
    finally:
        stop_family(proc, grace_s=5)
        server.should_exit = True


def _raw(centre: Centre, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is over TLS; the status, headers and body of the first answer."""
    with (
        socket.create_connection(("127.0.0.1", centre.port), timeout=10) as tcp,
        _context(centre.certs).wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), value.strip())
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return status, headers, body


def _request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if method in ("POST", "PUT") or body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


#: Request targets that must never reach the SuperLink, however they are spelled.
REFUSED_TARGETS = [
    "/v1/control/list-runs",
    "/v1/control/stop-run",
    "/v1/control/start-run",
    "/v1/runtime/acquire-task",
    "/v1/fleet/../control/list-runs",
    "/v1/fleet/./../control/list-runs",
    "/v1/fleet/pull-messages/../../control/list-runs",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs",
    "/v1/fleet%2f..%2fcontrol/list-runs",
    "/v1/fleet/%70ull-messages",  # an encoded Fleet name is not the Fleet name
    "//v1/control/list-runs",
    "//v1/fleet/pull-messages",
    "/v1/fleet//pull-messages",
    "/v1/fleet/pull-messages/",
    "/v1/fleet/pull-messages?next=/v1/control/list-runs",
    "/v1/fleet/pull-messages;/v1/control/list-runs",
    "/v1/fleet/pull-messages%00",
    "/V1/FLEET/pull-messages",
    "/v1/fleet/",
    "/v1/fleet",
    "/docs",
    "/openapi.json",
    "https://127.0.0.1/v1/control/list-runs",  # absolute form
    "http://evil.example/v1/runtime/acquire-task",
    "*",
]


@pytest.mark.parametrize("target", REFUSED_TARGETS)
def test_anything_but_a_fleet_route_is_404_and_never_forwarded(centre: Centre, target: str) -> None:
    before = len(centre.upstream.seen)
    status, _, _ = _raw(centre, _request("POST", target, b"\x08\x01"))
    assert status in (400, 404), (target, status)  # 400: the HTTP parser refused it first
    assert len(centre.upstream.seen) == before, centre.upstream.seen[before:]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
def test_only_post_is_forwarded(centre: Centre, method: str) -> None:
    before = len(centre.upstream.seen)
    status, _, _ = _raw(centre, _request(method, "/v1/fleet/pull-messages"))
    assert status == 404
    assert len(centre.upstream.seen) == before


def test_host_header_chooses_nothing(centre: Centre) -> None:
    before = len(centre.upstream.seen)
    upstream_host = f"127.0.0.1:{centre.upstream_port}"  # the SuperLink's own address
    status, _, _ = _raw(
        centre,
        b"POST /v1/control/list-runs HTTP/1.1\r\nHost: "
        + upstream_host.encode()
        + b"\r\nX-Forwarded-Host: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status == 404
    assert len(centre.upstream.seen) == before


def test_a_fleet_request_passes_with_its_headers_and_binary_body(centre: Centre) -> None:
    body = bytes(range(256)) * 64 + b"\r\n\r\nPOST /v1/control/list-runs HTTP/1.1\r\n\r\n"
    auth = {
        FLEET_HTTP_PUBLIC_KEY_HEADER: "cHVibGljLWtleQ==",
        FLEET_HTTP_SIGNATURE_HEADER: "c2lnbmF0dXJl",
        TIMESTAMP_HEADER: "2026-01-01T00:00:00+00:00",
    }
    before = len(centre.upstream.seen)
    status, headers, answer = _raw(
        centre,
        _request(
            "POST",
            "/v1/fleet/pull-messages",
            body,
            **{"Content-Type": "application/protobuf", "Accept-Encoding": "gzip"},
            **auth,
            **{
                "X-Forwarded-For": "6.6.6.6",
                "Forwarded": "for=6.6.6.6",
                "X-Real-IP": "6.6.6.6",
                "Keep-Alive": "timeout=5",
            },
        ),
    )
    assert status == 200
    got = centre.upstream.seen[before:]
    assert len(got) == 1, got  # one request in, one out: nothing in the body was parsed
    request = got[0]
    assert (request["method"], request["raw_path"], request["body"]) == (
        "POST",
        b"/v1/fleet/pull-messages",
        body,
    )
    sent = dict(request["headers"])
    for name, value in auth.items():
        assert sent[name.lower()] == value  # node authentication verifies as sent
    assert sent["content-type"] == "application/protobuf"
    assert sent["x-forwarded-for"] == "127.0.0.1"  # the real peer, not the claimed 6.6.6.6
    assert "forwarded" not in sent and "x-real-ip" not in sent and "keep-alive" not in sent
    assert sent["host"] == f"127.0.0.1:{centre.upstream_port}"
    # The answer: still compressed, hop-by-hop headers gone, the SuperLink's own kept.
    assert gzip.decompress(answer) == body
    assert headers["content-encoding"] == "gzip" and headers["x-echo"] == "1"
    assert "x-echo-private" not in headers


def test_a_smuggled_second_request_never_reaches_the_superlink(centre: Centre) -> None:
    """Content-Length and Transfer-Encoding together, and pipelining: whatever the client
    frames, the SuperLink sees only Fleet requests, each framed by the gateway."""
    smuggled = (
        b"POST /v1/control/list-runs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    )
    cl_te = (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: " + str(5 + len(smuggled)).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled
    )
    pipelined = (
        b"POST /v1/fleet/pull-messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
        + smuggled
    )
    before = len(centre.upstream.seen)
    for request in (cl_te, pipelined):
        _raw(centre, request)
    got = centre.upstream.paths()[before:]
    assert got and all(path == b"/v1/fleet/pull-messages" for path in got), got


def test_health_follows_the_superlink(tmp_path: Path) -> None:
    certs = init_certificates(out=tmp_path / "certs", hosts=["127.0.0.1"])
    port, nothing_there = free_port(), free_port()
    proc = _start_gateway(certs, port, nothing_there)
    try:
        assert _wait_for_health(certs, port, proc) == 503
    finally:
        stop_family(proc, grace_s=5)


def test_bad_arguments_are_one_clear_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "fedcare.server.gateway"]
    cases = [
        (
            ["--listen", "0.0.0.0", "--upstream", "127.0.0.1:1", "--certs", str(tmp_path)],
            "--listen",
        ),
        (
            ["--listen", "0.0.0.0:1", "--upstream", "127.0.0.1:1", "--certs", str(tmp_path)],
            "ca.crt",
        ),
        (["--listen", "0.0.0.0:1", "--upstream", "127.0.0.1:99999", "--insecure"], "--upstream"),
    ]
    for args, word in cases:
        out = subprocess.run(base + args, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], lines


def test_a_body_over_the_limit_is_413_and_not_forwarded() -> None:
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        return httpx.Response(200, stream=httpx.ByteStream(b"ok"))

    async def post(size: int) -> int:
        gateway = FleetGateway(upstream="https://superlink.invalid", verify=False, max_body=1000)
        gateway._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw")
        async with client:
            response = await client.post("/v1/fleet/push-object", content=b"x" * size)
        await gateway.aclose()
        return response.status_code

    assert asyncio.run(post(1000)) == 200
    assert asyncio.run(post(1001)) == 413
    assert seen == [b"x" * 1000]
