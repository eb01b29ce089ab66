"""A fault-injecting HTTP reverse proxy for S3 tests, on 127.0.0.1 only.

``FaultProxy(upstream_port)`` listens on a free port of 127.0.0.1 and forwards every
request to ``127.0.0.1:upstream_port`` (the moto server) over ``http.client``,
streaming request and response bodies. On a seeded, configurable share of requests it
injects a fault instead, the kinds taken in turn so every kind shows up:

- ``latency``: the request is delayed (``latency_s`` range), then forwarded;
- ``500``: an ``InternalError`` S3 XML error response;
- ``503``: a ``ServiceUnavailable`` S3 XML error response;
- ``slowdown``: a 503 ``SlowDown`` S3 XML error response (S3's throttling);
- ``reset``: the connection is closed with a TCP reset and no response at all.

``counts`` tells how many of each were injected (and ``requests``, ``forwarded``).
``rules`` (callables ``(method, path) -> fault kind or None``) force faults on chosen
requests, whatever the share; ``down()`` makes every request a reset (a server gone
while clients still connect). ``stop()`` closes the listening socket: new connections
are refused.
"""

from __future__ import annotations

import collections
import http.client
import http.server
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

FAULTS = ("latency", "500", "503", "slowdown", "reset")
_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_CHUNK = 1 << 16


class FaultProxy:
    def __init__(self, upstream_port: int, *, share: float = 0.0, seed: int = 0,
                 kinds: tuple[str, ...] = FAULTS, latency_s: tuple[float, float] = (0.02, 0.2)) -> None:
        for k in kinds:
            if k not in FAULTS:
                raise ValueError(f"unknown fault kind {k!r}")
        self.upstream = ("127.0.0.1", upstream_port)
        self.share = share
        self.kinds = kinds
        self.latency_s = latency_s
        self.rules: list[Callable[[str, str], str | None]] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._turn = 0
        self._lock = threading.Lock()
        self._down = False
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = self._server.server_address[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- control -----------------------------------------------------------------------
    def configure(self, *, share: float | None = None, seed: int | None = None) -> None:
        with self._lock:
            if share is not None:
                self.share = share
            if seed is not None:
                self._rng = random.Random(seed)
                self._turn = 0

    def down(self, flag: bool = True) -> None:
        self._down = flag

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def injected(self) -> dict[str, int]:
        return {k: self.counts[k] for k in FAULTS}

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- decisions ---------------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self._down:
                self.counts["down"] += 1
                return "reset"
            for rule in self.rules:
                forced = rule(method, path)
                if forced:
                    self.counts[forced] += 1
                    self.counts["forced"] += 1
                    return forced
            if self.share <= 0 or self._rng.random() >= self.share:
                return None
            kind = self.kinds[self._turn % len(self.kinds)]
            self._turn += 1
            self.counts[kind] += 1
            return kind

    def _latency(self) -> float:
        with self._lock:
            return self._rng.uniform(*self.latency_s)


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args: Any) -> None:
        pass

    # every method goes through one path
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET  # noqa: N815

    def _body_chunks(self) -> Any:
        """The request body, streamed (Content-Length or chunked)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    data = self.rfile.read(min(left, _CHUNK))
                    if not data:
                        raise ConnectionError("client went away")
                    left -= len(data)
                    yield data
                self.rfile.readline(16)
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                data = self.rfile.read(min(left, _CHUNK))
                if not data:
                    raise ConnectionError("client went away")
                left -= len(data)
                yield data

    def _reset(self) -> None:
        """Close the connection with a TCP RST and no response."""
        for _ in self._body_chunks():
            pass
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def _error(self, kind: str) -> None:
        for _ in self._body_chunks():
            pass
        status, code, message = _ERRORS[kind]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", "fault-proxy")
        self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        kind = self.owner._decide(self.command, self.path)
        if kind == "reset":
            self._reset()
            return
        if kind in _ERRORS:
            self._error(kind)
            return
        if kind == "latency":
            time.sleep(self.owner._latency())
        self._forward()

    def _forward(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            headers.pop("Transfer-Encoding", None)
            headers.pop("transfer-encoding", None)
            body = b"".join(self._body_chunks())  # rare: re-send with a length
            headers["Content-Length"] = str(len(body))
            chunks: Any = [body]
        else:
            chunks = self._body_chunks()
        # one upstream connection per request: a kept-alive one the server closed could
        # not be retried once part of a streamed body was sent
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
            for data in chunks:
                conn.send(data)
            resp = conn.getresponse()
            self._relay(resp)
        finally:
            conn.close()

    def _relay(self, resp: http.client.HTTPResponse) -> None:
        self.owner.counts["forwarded"] += 1
        self.send_response_only(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        out_headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in _HOP and k.lower() not in ("transfer-encoding", "content-length")]
        for k, v in out_headers:
            self.send_header(k, v)
        if self.command == "HEAD" or resp.status in (204, 304):
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            resp.read()
            return
        if length is None:
            data = resp.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_header("Content-Length", length)
        self.end_headers()
        while True:
            data = resp.read(_CHUNK)
            if not data:
                break
            self.wfile.write(data)
