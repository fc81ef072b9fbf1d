"""The coordinating centre's public port: a TLS-terminating forwarder of Flower's Fleet API.

Flower 1.42's SuperLink serves three APIs on one HTTP port: Fleet (``/v1/fleet/*``, what
SuperNodes call), Control (``/v1/control/*``: ``flwr run``, ``flwr ls``, ``flwr stop``,
``flwr supernode register``; no authentication in open-source Flower) and Runtime
(``/v1/runtime/*``, what ServerApp processes call). fedcare binds the SuperLink to
127.0.0.1 and puts this gateway on the public address: it answers TLS with the centre's
``server.crt``/``server.key`` and forwards *only* Fleet requests to the SuperLink, over TLS
verified with the federation's CA. Everything else is answered 404 by the gateway itself,
without reaching the SuperLink.

What is forwarded, exactly:

* a ``POST`` whose request target, as it arrived on the wire, is ``/v1/fleet/NAME`` with
  ``NAME`` made of lower-case letters, digits and ``-`` (Flower's Fleet route names). The
  test is on the raw target, before any decoding, so ``..``, ``%2e``, ``%2f``, double
  slashes, a query string, a trailing slash or an absolute-form target naming another path
  are all 404; the upstream request is built from that checked path alone, so the Host
  header, an absolute-form authority or ``X-Forwarded-*`` headers choose nothing;
* its headers, except hop-by-hop ones (``Connection`` and the names it lists,
  ``Keep-Alive``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``, ``Proxy-*``),
  ``Host`` and ``Content-Length`` (set again for the upstream request), ``Expect``, and any
  ``Forwarded``/``X-Forwarded-*``/``X-Real-IP`` the client sent: the SuperLink's uvicorn
  trusts ``X-Forwarded-For`` from 127.0.0.1, so the gateway sets it to the real peer.
  SuperNode authentication headers pass unchanged: Flower signs only their timestamp
  (``flwr/supernode/node_auth_http_interceptor.py``), not the host or URL, so a
  forwarded request verifies as a direct one would;
* its body, as bytes, read completely (at most ``max_body`` bytes, else 413) before one
  upstream request is made with its own ``Content-Length``: one request in, one request
  out, so nothing a client frames can be read by the SuperLink as a second request;
* the upstream answer: status, headers less hop-by-hop ones, ``Server`` and ``Date``, and
  the body as the SuperLink sent it (not decompressed).

``GET``/``HEAD /health`` is answered by the gateway: 200 when the SuperLink's own
``/health`` answers 200, else 503.

Run it as ``python -m fedcare.server.gateway --listen HOST:PORT --upstream 127.0.0.1:PORT --certs
DIR`` (``fedcare.server.deploy.gateway_command`` builds that line); ``--insecure`` serves and
forwards plain text (tests on one machine only).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedcare.common.errors import ConfigError
from fedcare.server.deploy import certificate_files

__all__ = [
    "FLEET_PATH",
    "FLEET_ROUTES",
    "GatewaySettings",
    "FleetGateway",
    "fleet_path",
    "parse_host_port",
    "url_host",
    "serve",
    "main",
]

log = logging.getLogger(__name__)

#: The only request targets forwarded: Flower 1.42's Fleet routes by name (its SuperNode's
#: client, ``flwr/supernode/fleet_http_client.py``), on the raw target. A route Flower adds
#: later stays closed until it is listed here.
FLEET_ROUTES = (
    "activate-node",
    "confirm-message-received",
    "deactivate-node",
    "get-fab",
    "get-run",
    "pull-messages",
    "pull-object",
    "push-messages",
    "push-object",
    "register-node",
    "send-node-heartbeat",
    "unregister-node",
)
FLEET_PATH = re.compile(rb"/v1/fleet/(?:" + b"|".join(r.encode() for r in FLEET_ROUTES) + rb")")

#: Largest request body forwarded. Flower sends arrays in 5 MiB chunks
#: (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``); a Fleet message body is far below this.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
#: Seconds a client may take to send a request body (slow senders hold a connection).
BODY_TIMEOUT_S = 60.0
#: Connections served at once; beyond, uvicorn answers 503 (a flood cannot exhaust files).
MAX_CONNECTIONS = 512

#: Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
    }
)
_CLIENT_FORWARDING = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
)
_RESPONSE_DROPPED = frozenset({b"server", b"date"})

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


def fleet_path(scope: _Scope) -> str | None:
    """The Fleet path a request targets, or ``None`` if it targets anything else.

    Decided on the raw request target as it arrived (``raw_path``), not on the decoded
    path: a target is a Fleet route only if it *is* ``/v1/fleet/NAME`` byte for byte.

    Examples
    --------
    >>> fleet_path({"raw_path": b"/v1/fleet/pull-messages", "path": "/v1/fleet/pull-messages",
    ...             "query_string": b""})
    '/v1/fleet/pull-messages'
    >>> fleet_path({"raw_path": b"/v1/fleet/%2e%2e/control/list-runs",
    ...             "path": "/v1/fleet/../control/list-runs", "query_string": b""}) is None
    True
    """
    raw = scope.get("raw_path")
    if not isinstance(raw, bytes) or scope.get("query_string"):
        return None
    if FLEET_PATH.fullmatch(raw) is None:
        return None
    path = raw.decode("ascii")
    if scope.get("path") != path:  # the server decoded it into something else
        return None
    return path


def _forwarded_headers(
    headers: Iterable[tuple[bytes, bytes]], client: Sequence[Any] | None
) -> list[tuple[bytes, bytes]]:
    """The request headers to send upstream: hop-by-hop and forwarding ones dropped."""
    headers = list(headers)
    listed = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed |= {v.strip().lower() for v in value.split(b",") if v.strip()}
    drop = _HOP_BY_HOP | _CLIENT_FORWARDING | listed
    kept = [(n, v) for n, v in headers if n.lower() not in drop]
    if not any(n.lower() == b"accept-encoding" for n, _ in kept):
        kept.append((b"accept-encoding", b"identity"))  # not httpx's default gzip
    if client:
        kept.append((b"x-forwarded-for", str(client[0]).encode("ascii", "replace")))
    return kept


def _returned_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(headers)
    listed = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed |= {v.strip().lower() for v in value.split(b",") if v.strip()}
    drop = _HOP_BY_HOP | _RESPONSE_DROPPED | listed
    return [(n, v) for n, v in headers if n.lower() not in drop]


async def _respond(send: _Send, status: int, body: bytes, *, head: bool = False) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _read_body(receive: _Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class FleetGateway:
    """ASGI app forwarding Fleet requests to ``upstream`` (see the module docstring).

    Parameters
    ----------
    upstream : str
        Base URL of the SuperLink, e.g. ``https://127.0.0.1:9093``.
    verify : ssl.SSLContext or bool
        How the upstream's certificate is verified (a context holding the federation's
        CA); ``False`` only for a plain-text upstream.
    max_body : int
        Largest request body forwarded (413 beyond).
    timeout_s : float
        Read timeout of one upstream call (Flower's own clients wait 30 s).
    """

    def __init__(
        self,
        *,
        upstream: str,
        verify: ssl.SSLContext | bool,
        max_body: int = DEFAULT_MAX_BODY,
        timeout_s: float = 60.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.max_body = max_body
        self._verify = verify
        self._timeout = httpx.Timeout(timeout_s, connect=10.0)
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                verify=self._verify,
                timeout=self._timeout,
                follow_redirects=False,
                trust_env=False,  # never a proxy from the environment for the loopback hop
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets are off in uvicorn; refuse anything else
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        method = scope["method"]
        raw = scope.get("raw_path", b"")
        if raw == b"/health" and not scope.get("query_string") and method in ("GET", "HEAD"):
            await self._health(send, head=method == "HEAD")
            return
        path = fleet_path(scope)
        if path is None or method != "POST":
            log.info("refused %s %r from %s", method, raw, _peer(scope))
            await _respond(send, 404, b"not found\n", head=method == "HEAD")
            return
        try:
            body = await asyncio.wait_for(_read_body(receive, self.max_body), BODY_TIMEOUT_S)
        except _Disconnected:
            return
        except TimeoutError:
            await _respond(send, 408, b"request body not received in time\n")
            return
        except _BodyTooLarge:
            await _respond(send, 413, b"request body too large\n")
            return
        headers = _forwarded_headers(scope.get("headers", []), scope.get("client"))
        client = self._http()
        request = client.build_request("POST", self.upstream + path, content=body, headers=headers)
        try:
            response = await client.send(request, stream=True)
            try:
                # The body as the SuperLink sent it: ``aiter_raw`` does not decompress.
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            await _respond(send, 504, b"the SuperLink did not answer in time\n")
            return
        except httpx.HTTPError as e:
            log.warning("upstream %s failed: %s", self.upstream, e)
            await _respond(send, 502, b"the SuperLink is not reachable\n")
            return
        out = _returned_headers(response.headers.raw)
        out.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": response.status_code, "headers": out})
        await send({"type": "http.response.body", "body": content})

    async def _health(self, send: _Send, *, head: bool) -> None:
        try:
            response = await self._http().get(self.upstream + "/health")
            healthy = response.status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            await _respond(send, 200, b"ok\n", head=head)
        else:
            await _respond(send, 503, b"the SuperLink is not healthy\n", head=head)

    async def _lifespan(self, receive: _Receive, send: _Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _peer(scope: _Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens and forwards to.

    Attributes
    ----------
    listen_host, listen_port:
        The public address (sites dial it).
    upstream_host, upstream_port:
        The SuperLink on the loopback interface.
    certs:
        Folder with ``ca.crt``, ``server.crt``, ``server.key`` (``fedcare certs init``);
        ``None`` with ``insecure``.
    insecure:
        Plain text both ways (a test on one machine).
    """

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    certs: Path | None
    insecure: bool = False

    def cert_files(self) -> dict[str, Path]:
        """``ca``, ``cert`` and ``key``: each must exist."""
        return certificate_files(self.certs, who="the gateway")

    @property
    def upstream_url(self) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{url_host(self.upstream_host)}:{self.upstream_port}"


def url_host(host: str) -> str:
    """``host`` as it stands before ``:PORT`` in an address (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def parse_host_port(value: str, *, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as ``(host, port)``.

    Raises
    ------
    ConfigError
        Not of that form, or the port is not 1..65535.

    Examples
    --------
    >>> parse_host_port("[::1]:9092", what="--listen")
    ('::1', 9092)
    """
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            host = ""
    elif ":" in host:
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {value!r} is not HOST:PORT (e.g. 0.0.0.0:9092, [::]:9092)")
    return host, int(port)


def serve(settings: GatewaySettings, *, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Run the gateway in the foreground until SIGTERM/SIGINT (uvicorn's own handling)."""
    import uvicorn

    certfile = keyfile = None
    if settings.insecure:
        verify: ssl.SSLContext | bool = False
    else:
        files = settings.cert_files()
        verify = ssl.create_default_context(cafile=str(files["ca"]))
        certfile, keyfile = str(files["cert"]), str(files["key"])
    app = FleetGateway(upstream=settings.upstream_url, verify=verify, max_body=max_body)
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        http="h11",  # strict HTTP/1.1 parsing
        ws="none",
        lifespan="on",
        proxy_headers=False,  # the gateway faces the network: trust no X-Forwarded-*
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=30,
        limit_concurrency=MAX_CONNECTIONS,
        h11_max_incomplete_event_size=64 * 1024,  # headers larger than this: 400
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    asyncio.run(uvicorn.Server(config).serve())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedcare.server.gateway``: one clear line and exit 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m fedcare.server.gateway",
        description="Forward only Flower's Fleet API from the public port to the SuperLink.",
    )
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--certs", type=Path, help="folder with ca.crt, server.crt, server.key")
    parser.add_argument("--insecure", action="store_true", help="plain text (tests only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(message)s")
    for noisy in ("httpx", "httpcore"):  # a line per forwarded request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        listen = parse_host_port(args.listen, what="--listen")
        upstream = parse_host_port(args.upstream, what="--upstream")
        settings = GatewaySettings(
            listen_host=listen[0],
            listen_port=listen[1],
            upstream_host=upstream[0],
            upstream_port=upstream[1],
            certs=args.certs,
            insecure=args.insecure,
        )
        if not args.insecure:
            settings.cert_files()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "forwarding only /v1/fleet/* from %s:%d to %s",
        settings.listen_host,
        settings.listen_port,
        settings.upstream_url,
    )
    serve(settings)  # uvicorn logs a port it cannot bind and exits 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
