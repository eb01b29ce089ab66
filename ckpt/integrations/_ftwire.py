"""The pieces a torchft state dict is made of, and the HTTP wire that serves them.

A sender describes each tensor leaf of the state dict it was handed by its box in global
coordinates (a DTensor's local shard by its placements, a plain tensor as the whole
tensor) and serves sub-boxes of it, several to a response, each with the crc32c of its bytes. The
plain rest of the state dict (optimizer hyper-parameters, step counters, sampler
positions) travels as a skeleton: the nested structure with every tensor replaced by a
placeholder, serialized by ``torch.save`` and read back with ``weights_only=True`` (no
code runs on load). A sender's cost grows with its own share: its index lists only its
own pieces, and a receiver asks for exactly the sub-boxes it lacks.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import google_crc32c
import numpy as np
import torch

from ckpt._crc32c import crc32c_value
from ckpt.providers._dtensor import is_dtensor, local_box

Box = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Piece:
    """One tensor leaf as its holder has it: the path in the state dict, global shape,
    dtype and the box this holder owns."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def to_json(self) -> list[Any]:
        return [self.path, self.dtype, list(self.shape), list(self.offsets), list(self.sizes)]

    @staticmethod
    def from_json(v: list[Any]) -> Piece:
        return Piece(v[0], v[1], tuple(v[2]), tuple(v[3]), tuple(v[4]))


def leaves(tree: Any, prefix: str = "", *, is_leaf: Any = None) -> Iterator[tuple[str, Any]]:
    """(path, leaf) for every tensor leaf of a nested dict/list state dict (``is_leaf``:
    another test of what a leaf is, e.g. a skeleton's placeholder)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}/{_key(k)}", is_leaf=is_leaf)
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}/{i}", is_leaf=is_leaf)
    elif is_leaf(tree) if is_leaf is not None else isinstance(tree, torch.Tensor):
        yield prefix, tree


def _key(k: Any) -> str:
    return f"{type(k).__name__}:{k}".replace("/", "%2F")


def skeleton(tree: Any) -> Any:
    """``tree`` with each tensor leaf replaced by the string ``TENSOR``."""
    if isinstance(tree, dict):
        return {k: skeleton(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [skeleton(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(skeleton(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return TENSOR
    return tree


TENSOR = "<ckpt.tensor>"


def fill(tree: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """The skeleton ``tree`` with each placeholder replaced by ``tensors[path]``."""
    if isinstance(tree, dict):
        return {k: fill(v, tensors, f"{prefix}/{_key(k)}") for k, v in tree.items()}
    if isinstance(tree, list):
        return [fill(v, tensors, f"{prefix}/{i}") for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(fill(v, tensors, f"{prefix}/{i}") for i, v in enumerate(tree))
    if isinstance(tree, str) and tree == TENSOR:
        return tensors[prefix]
    return tree


def skeleton_paths(tree: Any) -> Iterator[str]:
    """The path of every placeholder of a skeleton (the same paths as :func:`leaves`)."""
    return (path for path, _ in leaves(tree, is_leaf=lambda v: isinstance(v, str) and v == TENSOR))


def user_prefix(key: str) -> str:
    """The path torchft gives the state registered under ``key``: it sends
    ``{"user": {key: state_dict()}, "torchft": {...}}``."""
    return f"/{_key('user')}/{_key(key)}"


def local_piece(path: str, t: torch.Tensor) -> tuple[Piece, torch.Tensor]:
    """This rank's piece of the leaf ``t`` and its local (CPU-visible) tensor."""
    if is_dtensor(t):
        local, shape, offsets = local_box(t, path)
    else:
        local, shape, offsets = t, tuple(t.shape), tuple(0 for _ in t.shape)
    local = local.detach()
    dtype = str(local.dtype).removeprefix("torch.")
    return Piece(path, dtype, tuple(int(s) for s in shape), offsets, tuple(int(s) for s in local.shape)), local


def dumps_skeleton(tree: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(skeleton(tree), buf)
    return buf.getvalue()


def loads_skeleton(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def crc(data: bytes | bytearray | memoryview | np.ndarray) -> int:
    """crc32c of a contiguous buffer, without the GIL and without a copy where the C
    library is found."""
    value = crc32c_value()
    if value is not None:
        return value(data)
    return int(google_crc32c.value(bytes(data)))


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor, as a uint8 array over its memory (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, dtype=np.uint8)


class Client:
    """HTTP/1.1 requests to the source ranks, one kept-alive connection per source and
    thread (threads fetch at once); box bodies are read straight into their destination's
    memory."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._conns: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def _request(self, url: str, path: str) -> http.client.HTTPResponse:
        key = (url, threading.get_ident())
        for attempt in (0, 1):  # a kept-alive connection the server had closed: once more
            conn = self._conns.get(key)
            if conn is None:
                u = urlparse(url)
                conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=self.timeout)
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns[key] = conn
            try:
                conn.request("GET", path)
                r = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.drop(url)
                if attempt:
                    raise
                continue
            if r.status != 200:
                r.read()
                self.drop(url)
                raise OSError(f"HTTP {r.status} {r.reason}")
            return r
        raise AssertionError("unreachable")

    def get(self, url: str, path: str) -> tuple[bytes, int | None]:
        r = self._request(url, path)
        value = r.headers.get("X-Crc32c")
        try:
            return r.read(), int(value) if value is not None else None
        except BaseException:
            self.drop(url)
            raise

    def get_boxes(self, url: str, path: str, dests: list[np.ndarray]) -> list[tuple[int, int]]:
        """Reads the bodies of a boxes request into ``dests`` (contiguous uint8 arrays of
        exactly their lengths), in order; (the crc32c of what landed, the sender's) each."""
        try:
            r = self._request(url, path)
            n = int(r.headers.get("Content-Length", -1))
            want = sum(d.nbytes for d in dests) + 4 * len(dests)  # the bodies, then their crc32cs
            if n != want:
                raise OSError(f"the response is {n} bytes, {want} expected")
            for dest in dests:
                view, got = dest.data.cast("B"), 0
                while got < dest.nbytes:
                    k = r.readinto(view[got:])
                    if not k:
                        raise OSError(f"the connection closed after {got} of {dest.nbytes} bytes")
                    got += k
            trailer = r.read(4 * len(dests))
            if len(trailer) != 4 * len(dests):
                raise OSError("the connection closed before the bodies' crc32cs")
            sent = np.frombuffer(trailer, dtype="<u4")
            return [(crc(d), int(v)) for d, v in zip(dests, sent)]
        except BaseException:
            self.drop(url)  # a half-read response leaves the connection unusable
            raise

    def drop(self, url: str) -> None:
        """Closes this thread's connection to ``url``."""
        conn = self._conns.pop((url, threading.get_ident()), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for key in list(self._conns):
            conn = self._conns.pop(key, None)
            if conn is not None:
                conn.close()


def sub_box(local: torch.Tensor, piece: Piece, want: Box) -> torch.Tensor:
    """The part ``want`` (global coordinates, inside ``piece``) of the local tensor."""
    view = local
    for d, (o, s) in enumerate(zip(*want)):
        view = view.narrow(d, o - piece.offsets[d], s)
    return view


@dataclass
class Served:
    """What a sender serves for one step (None: the step it is at, whichever the healer
    asks for): its pieces, their local tensors, the skeleton."""

    step: int | None
    pieces: list[Piece]
    tensors: list[torch.Tensor]
    skeleton: bytes


class Server:
    """One rank's HTTP server of the state it was asked to send (torchft calls
    ``send_checkpoint``, then ``disallow_checkpoint`` before the state may change)."""

    def __init__(self, host: str = "127.0.0.1", *, corrupt_once: set[int] | None = None) -> None:
        self._lock = threading.Condition()
        self._served: Served | Callable[[], Served] | None = None
        self._active = 0
        self._reading = 0  # healers that asked for the index and have not said done
        # a healer may ask before torchft's ``send_checkpoint`` replaced the live state: the
        # tensors are the same, but only the sent state's skeleton has torchft's own part
        self.skeleton_wait = 10.0
        self.corrupt_once = corrupt_once if corrupt_once is not None else set()
        self.bytes_sent = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # a healer keeps its connection for all its requests

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.handle(self)

        self._http = ThreadingHTTPServer((host, 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://{host}:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="ckpt-ft-server", daemon=True)
        self._thread.start()

    def allow(self, served: Served | Callable[[], Served]) -> None:
        """Serve ``served`` (or what the callable builds, at the first request)."""
        with self._lock:
            self._served = served
            self._lock.notify_all()

    def disallow(self, timeout: float) -> None:
        """Stop serving; returns once no response is being written and each healer that began
        reading has said it is done (or ``timeout`` seconds passed: a healer died)."""
        with self._lock:
            self._lock.wait_for(lambda: not self._reading, timeout=timeout)
            self._served = None
            self._reading = 0
            while self._active:
                self._lock.wait()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        parts = url.path.strip("/").split("/")
        with self._lock:
            if len(parts) >= 2 and parts[1] == "skeleton":
                self._lock.wait_for(lambda: not callable(self._served) and getattr(self._served, "step", 0)
                                    is not None, timeout=self.skeleton_wait)
            if callable(self._served):
                self._served = self._served()
            served = self._served
            if served is None or len(parts) < 2 or served.step not in (None, int(parts[0])):
                h.send_error(404, "step not served")
                return
            self._active += 1
            if parts[1] == "index":
                self._reading += 1
            elif parts[1] == "done":
                self._reading = max(0, self._reading - 1)
                self._lock.notify_all()
        try:
            if parts[1] == "boxes":
                self._send_boxes(h, served, url.query)
                return
            body = (b"" if parts[1] == "done" else served.skeleton if parts[1] == "skeleton"
                    else json.dumps([p.to_json() for p in served.pieces]).encode())
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("X-Crc32c", str(crc(body)))
            h.end_headers()
            h.wfile.write(body)
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    def _send_boxes(self, h: BaseHTTPRequestHandler, served: Served, query: str) -> None:
        """The sub-boxes a query names (``b=i:offsets:sizes;...``), one after the other, then
        their crc32cs (4 bytes each, little-endian). A body is one checksum call and one
        write: each call gives up the GIL, and the training thread holds it, so every
        extra call can wait a switch interval to get it back."""
        bodies = []
        for spec in parse_qs(query, keep_blank_values=True)["b"][0].split(";"):
            index, offs, sizes = spec.split(":")
            i = int(index)
            want = (tuple(int(x) for x in offs.split(",") if x), tuple(int(x) for x in sizes.split(",") if x))
            # the served state does not change before ``disallow`` (which waits for this
            # response): a body is the tensor's own memory, not a copy
            bodies.append((i, as_bytes(sub_box(served.tensors[i], served.pieces[i], want).contiguous().cpu())))
        h.send_response(200)
        h.send_header("Content-Length", str(sum(b.nbytes + 4 for _, b in bodies)))
        h.end_headers()
        crcs = np.empty(len(bodies), dtype="<u4")
        for k, (i, body) in enumerate(bodies):
            crcs[k] = crc(body)
            if i in self.corrupt_once:  # a test's flipped byte on the wire
                self.corrupt_once.discard(i)
                body = body.copy()
                body[0] ^= 0xFF
            h.wfile.write(body.data.cast("B"))
            self.bytes_sent += body.nbytes
        h.wfile.write(crcs.tobytes())

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def box_query(parts: list[tuple[int, Box]]) -> str:
    """The query of a boxes request for (piece index, box) parts."""
    return "b=" + ";".join(f"{i}:{','.join(map(str, o))}:{','.join(map(str, z))}" for i, (o, z) in parts)
