"""Files of a memory-tier step moved between nodes over a gloo group.

A *bundle* is the list of files one node sends another: first the header's length, then
the header (JSON: checkpoint-relative paths and sizes), then one
message per non-empty file. Each file goes over the wire straight from a memory map of
the sender's copy into a memory map of the receiver's (tmpfs pages in, tmpfs pages
out): no staging buffer, no copy beyond the socket's. A received file is written beside
its final name and renamed into place, so a tier never holds a file cut short by a
crash. At most :data:`WINDOW` files are in flight each way.

:func:`swap` sends one bundle and receives one in the same exchange (the replication
ring: every node sends to the next and receives from the previous at once); either side
may be absent. Ranks are global ranks of ``group``'s members.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["WINDOW", "Bundle", "swap", "bundle_of"]

WINDOW = 8


@dataclass
class Bundle:
    """Files under ``root``: checkpoint-relative ``paths`` and their ``sizes``."""

    root: Path
    paths: list[str]
    sizes: list[int]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)

    def header(self) -> bytes:
        return json.dumps({"paths": self.paths, "sizes": self.sizes}).encode()


def bundle_of(root: Path, paths: list[str]) -> Bundle:
    return Bundle(root, list(paths), [os.path.getsize(root / p) for p in paths])


def _map_read(path: Path, n: int) -> torch.Tensor:
    return torch.from_file(os.fspath(path), shared=False, size=n, dtype=torch.uint8)


def _map_write(path: Path, n: int) -> torch.Tensor:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(n)
    return torch.from_file(os.fspath(path), shared=True, size=n, dtype=torch.uint8)


def _exchange(dist: Any, group: Any, out: torch.Tensor | None, dst: int | None,
              into: torch.Tensor | None, src: int | None) -> None:
    works = []
    if out is not None and dst is not None:
        works.append(dist.isend(out, dst, group=group))
    if into is not None and src is not None:
        works.append(dist.irecv(into, src, group=group))
    for w in works:
        if w is not None:
            w.wait()


def swap(group: Any, send: Bundle | None, dst: int | None, recv_root: Path | None,
         src: int | None) -> list[tuple[str, int]]:
    """Send ``send`` to rank ``dst`` and, at the same time, receive a bundle from rank
    ``src`` into ``recv_root``; returns the (path, size) of every file received."""
    import torch.distributed as dist

    sending = send is not None and dst is not None
    receiving = recv_root is not None and src is not None
    head_out = lens_out = None
    if send is not None and sending:
        head_out = torch.frombuffer(bytearray(send.header()), dtype=torch.uint8)
        lens_out = torch.tensor([head_out.numel()], dtype=torch.int64)
    lens_in = torch.zeros(1, dtype=torch.int64) if receiving else None
    _exchange(dist, group, lens_out, dst, lens_in, src)
    head_in = torch.empty(int(lens_in[0]), dtype=torch.uint8) if lens_in is not None else None
    _exchange(dist, group, head_out, dst, head_in, src)
    outgoing: list[tuple[Path, int]] = []
    if send is not None and sending:
        outgoing = [(send.root / p, n) for p, n in zip(send.paths, send.sizes) if n]
    received: list[tuple[str, int]] = []
    incoming: list[tuple[Path, Path, int]] = []
    if head_in is not None and recv_root is not None:
        meta = json.loads(bytes(head_in.numpy()))
        received = list(zip(meta["paths"], meta["sizes"]))
        for rel, n in received:
            final = recv_root / rel
            part = final.with_name(final.name + ".part")
            if n:
                incoming.append((part, final, n))
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                final.write_bytes(b"")
    sends: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
    recvs: collections.deque[tuple[Any, torch.Tensor, Path, Path]] = collections.deque()
    si = ri = 0
    try:
        while si < len(outgoing) or ri < len(incoming) or sends or recvs:
            while si < len(outgoing) and len(sends) < WINDOW:
                t = _map_read(*outgoing[si])
                sends.append((dist.isend(t, dst, group=group), t))
                si += 1
            while ri < len(incoming) and len(recvs) < WINDOW:
                part, final, n = incoming[ri]
                t = _map_write(part, n)
                recvs.append((dist.irecv(t, src, group=group), t, part, final))
                ri += 1
            if sends:
                sends.popleft()[0].wait()
            if recvs:
                w, t, part, final = recvs.popleft()
                w.wait()
                del t  # unmapped: the bytes are in the file
                os.replace(part, final)
    finally:
        for _w, _t, part, _final in recvs:
            part.unlink(missing_ok=True)
    return received
