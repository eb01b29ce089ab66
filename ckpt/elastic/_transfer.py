"""Files of a memory-tier step moved between nodes over a gloo group.

A *bundle* is the list of files one node sends another: first two lengths (header and
data bytes), then the header (JSON: checkpoint-relative paths and sizes), then the
files' bytes in blocks of :data:`BLOCK` bytes. Both sides know every block boundary
from the header, so a block is read (sender) or written (receiver) while the next one
is on the wire: two buffers per direction. A received file is written beside its final
name and renamed into place, so a tier never holds a file cut short by a crash.

:func:`swap` sends one bundle and receives one in the same exchange (the replication
ring: every node sends to the next and receives from the previous at once); either side
may be absent. Ranks are global ranks of ``group``'s members.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["BLOCK", "Bundle", "swap", "bundle_of"]

BLOCK = 32 << 20


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


def _blocks(total: int) -> Iterator[tuple[int, int]]:
    for off in range(0, total, BLOCK):
        yield off, min(BLOCK, total - off)


def _spans(sizes: list[int], off: int, n: int) -> Iterator[tuple[int, int, int]]:
    """(file index, offset in the file, offset in the block) of every file piece in
    bytes ``[off, off + n)`` of the concatenated files."""
    start = 0
    for i, size in enumerate(sizes):
        end = start + size
        if end > off and start < off + n:
            lo = max(off, start)
            yield i, lo - start, lo - off
        if end >= off + n:
            return
        start = end


class _Reader:
    def __init__(self, b: Bundle) -> None:
        self.b = b
        self.fds: dict[int, int] = {}

    def fill(self, buf: torch.Tensor, off: int, n: int) -> None:
        view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]
        for i, foff, boff in _spans(self.b.sizes, off, n):
            want = min(self.b.sizes[i] - foff, n - boff)
            fd = self.fds.get(i)
            if fd is None:
                fd = self.fds[i] = os.open(self.b.root / self.b.paths[i], os.O_RDONLY)
            got = 0
            while got < want:
                k = os.preadv(fd, [view[boff + got:boff + want]], foff + got)
                if k <= 0:
                    raise OSError(f"{self.b.root / self.b.paths[i]} shrank while it was sent")
                got += k
            if foff + want == self.b.sizes[i]:
                os.close(self.fds.pop(i))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


class _Writer:
    def __init__(self, root: Path, paths: list[str], sizes: list[int]) -> None:
        self.root, self.paths, self.sizes = root, paths, sizes
        self.fds: dict[int, int] = {}
        for i, size in enumerate(sizes):
            if size == 0:
                self._open(i)
                self._finish(i)

    def _part(self, i: int) -> Path:
        return self.root / f"{self.paths[i]}.part"

    def _open(self, i: int) -> int:
        part = self._part(i)
        part.parent.mkdir(parents=True, exist_ok=True)
        fd = self.fds[i] = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        return fd

    def _finish(self, i: int) -> None:
        os.close(self.fds.pop(i))
        os.replace(self._part(i), self.root / self.paths[i])

    def drain(self, buf: torch.Tensor, off: int, n: int) -> None:
        view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]
        for i, foff, boff in _spans(self.sizes, off, n):
            want = min(self.sizes[i] - foff, n - boff)
            fd = self.fds.get(i)
            if fd is None:
                fd = self._open(i)
            done = 0
            while done < want:
                done += os.pwrite(fd, view[boff + done:boff + want], foff + done)
            if foff + want == self.sizes[i]:
                self._finish(i)

    def close(self) -> None:
        for i in list(self.fds):
            os.close(self.fds.pop(i))
            self._part(i).unlink(missing_ok=True)


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


def _buffers(total: int) -> list[torch.Tensor]:
    return [torch.empty(min(BLOCK, total), dtype=torch.uint8) for _ in range(2)] if total else []


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
        lens_out = torch.tensor([head_out.numel(), send.nbytes], dtype=torch.int64)
    lens_in = torch.zeros(2, dtype=torch.int64) if receiving else None
    _exchange(dist, group, lens_out, dst, lens_in, src)
    head_in = torch.empty(int(lens_in[0]), dtype=torch.uint8) if lens_in is not None else None
    _exchange(dist, group, head_out, dst, head_in, src)
    received: list[tuple[str, int]] = []
    writer = reader = None
    out_blocks: list[tuple[int, int]] = []
    in_blocks: list[tuple[int, int]] = []
    if head_in is not None and lens_in is not None and recv_root is not None:
        meta = json.loads(bytes(head_in.numpy()))
        received = list(zip(meta["paths"], meta["sizes"]))
        writer = _Writer(recv_root, meta["paths"], meta["sizes"])
        in_blocks = list(_blocks(int(lens_in[1])))
    if send is not None and sending:
        reader = _Reader(send)
        out_blocks = list(_blocks(send.nbytes))
    bufs_out = _buffers(send.nbytes if reader is not None and send is not None else 0)
    bufs_in = _buffers(int(lens_in[1]) if writer is not None and lens_in is not None else 0)
    try:
        if reader is not None and out_blocks:
            reader.fill(bufs_out[0], *out_blocks[0])
        for k in range(max(len(out_blocks), len(in_blocks))):
            out = bufs_out[k % 2][:out_blocks[k][1]] if k < len(out_blocks) else None
            into = bufs_in[k % 2][:in_blocks[k][1]] if k < len(in_blocks) else None
            w_out = dist.isend(out, dst, group=group) if out is not None else None
            w_in = dist.irecv(into, src, group=group) if into is not None else None
            if reader is not None and k + 1 < len(out_blocks):  # the next block while this one travels
                reader.fill(bufs_out[(k + 1) % 2], *out_blocks[k + 1])
            if w_out is not None:
                w_out.wait()
            if w_in is not None and into is not None and writer is not None:
                w_in.wait()
                writer.drain(into, in_blocks[k][0], in_blocks[k][1])
    finally:
        if reader is not None:
            reader.close()
        if writer is not None:
            writer.close()
    return received
