"""Files of a memory-tier step moved between nodes over a gloo group.

A *bundle* is the list of files one node sends another: first the header's length, then
the header (JSON: checkpoint-relative paths and sizes), then the files' bytes as a stream
of messages of at most :data:`CHUNK` bytes (a file's last one shorter; empty files send
none). Each side moves them through :data:`WINDOW` reused buffers a side, in lockstep
*slots* (slot k: this side's k-th send and k-th receive; slot k is posted once slot
k - WINDOW is finished): the sender reads a chunk into its slot's buffer (``preadv``) and
sends it, the receiver writes each chunk that arrives into its file (``pwrite``); gloo's
threads move the bytes of the other slots meanwhile. One copy each side, but no page fault
per 4 KiB page (a memory map of a tmpfs file faults each page in), a bounded footprint
whatever the file sizes, and the receive overwrites the pages of a retired step's file in
place where one is given (``spare``: a new tmpfs page costs its first touch, far more
than a copy). Not memory maps of the files, though they would save the copy: a mapped
file that another process cuts short, or a write into a full tmpfs, is a SIGBUS that
kills the training process, where ``preadv`` and ``pwrite`` fail with an error the tier
reports.

A received file is written beside its final name (``.part``) and renamed into place once
whole, so a tier never holds a file cut short by a crash under its real name.

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

__all__ = ["CHUNK", "WINDOW", "Bundle", "swap", "bundle_of"]

CHUNK = 8 << 20  # bytes per message
WINDOW = 4  # buffers (messages in flight) each way


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


def _open_part(part: Path, spare: Path | None) -> int:
    """The ``.part`` file a received file is written into: a spare file's pages where one
    is given (renamed, not copied), else a new file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    if spare is not None:
        try:
            os.replace(spare, part)
        except FileNotFoundError:
            pass
    return os.open(part, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)


def _chunks(files: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(file index, offset, length) of every message, in order."""
    return [(i, off, min(CHUNK, n - off)) for i, n in files for off in range(0, n, CHUNK)]


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


def _write_full(fd: int, view: memoryview, off: int) -> None:
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _read_full(fd: int, view: memoryview, off: int, path: Path) -> None:
    while view:
        n = os.preadv(fd, [view], off)
        if n == 0:
            raise OSError(f"{path} is shorter than its size when the bundle was made")
        view, off = view[n:], off + n


def swap(group: Any, send: Bundle | None, dst: int | None, recv_root: Path | None,
         src: int | None, *, spare: Path | None = None) -> list[tuple[str, int]]:
    """Send ``send`` to rank ``dst`` and, at the same time, receive a bundle from rank
    ``src`` into ``recv_root``; returns the (path, size) of every file received. A file
    received as ``rel`` reuses ``spare / rel`` where that exists."""
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
    out_paths: list[Path] = []
    out_chunks: list[tuple[int, int, int]] = []
    if send is not None and sending:
        out_paths = [send.root / p for p in send.paths]
        out_chunks = _chunks(list(enumerate(send.sizes)))
    received: list[tuple[str, int]] = []
    in_chunks: list[tuple[int, int, int]] = []
    if head_in is not None and recv_root is not None:
        meta = json.loads(bytes(head_in.numpy()))
        received = list(zip(meta["paths"], meta["sizes"]))
        in_chunks = _chunks(list(enumerate(n for _p, n in received)))
    # where a file's chunks go: the open .part, and how many chunks are still to come
    in_fds: dict[int, int] = {}
    in_left = collections.Counter(i for i, _o, _n in in_chunks)
    out_fds: dict[int, int] = {}
    out_left = collections.Counter(i for i, _o, _n in out_chunks)

    def part_of(i: int) -> tuple[Path, Path]:
        assert recv_root is not None
        final = recv_root / received[i][0]
        return final.with_name(final.name + ".part"), final

    def finish_in(i: int) -> None:
        part, final = part_of(i)
        fd = in_fds.pop(i, None)
        if fd is None:  # an empty file
            fd = _open_part(part, None if spare is None else spare / received[i][0])
        try:
            os.ftruncate(fd, received[i][1])  # a spare file may have been longer
        finally:
            os.close(fd)
        os.replace(part, final)

    # Lockstep slots: slot k is this side's k-th send and k-th receive (either may be
    # absent once one bundle is exhausted). Slot k is posted only after slot k - WINDOW is
    # finished, on both sides alike, so every wait is on a message whose peer half is
    # already posted: no deadlock whatever the two bundles' sizes. Slot k uses buffer
    # k % WINDOW of each side.
    n_slots = max(len(out_chunks), len(in_chunks))
    bufs_out = [torch.empty(CHUNK, dtype=torch.uint8) for _ in range(min(WINDOW, len(out_chunks)))]
    bufs_in = [torch.empty(CHUNK, dtype=torch.uint8) for _ in range(min(WINDOW, len(in_chunks)))]
    views_out = [b.numpy().data for b in bufs_out]
    views_in = [b.numpy().data for b in bufs_in]
    inflight: collections.deque[tuple[int, Any, Any]] = collections.deque()

    def post(k: int) -> None:
        recv = send = None
        if k < len(in_chunks):
            recv = dist.irecv(bufs_in[k % WINDOW][:in_chunks[k][2]], src, group=group)
        if k < len(out_chunks):
            i, off, n = out_chunks[k]
            buf = bufs_out[k % WINDOW]
            if i not in out_fds:
                out_fds[i] = os.open(out_paths[i], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            _read_full(out_fds[i], views_out[k % WINDOW][:n], off, out_paths[i])
            out_left[i] -= 1
            if not out_left[i]:
                os.close(out_fds.pop(i))
            send = dist.isend(buf[:n], dst, group=group)
        inflight.append((k, recv, send))

    def finish() -> None:
        k, recv, send = inflight.popleft()
        if recv is not None:
            recv.wait()
            i, off, n = in_chunks[k]
            if i not in in_fds:
                in_fds[i] = _open_part(part_of(i)[0], None if spare is None else spare / received[i][0])
            _write_full(in_fds[i], views_in[k % WINDOW][:n], off)
            in_left[i] -= 1
            if not in_left[i]:
                finish_in(i)
        if send is not None:
            send.wait()

    try:
        for i, (_p, n) in enumerate(received):
            if n == 0:
                finish_in(i)
        for k in range(n_slots):
            if len(inflight) == WINDOW:
                finish()
            post(k)
        while inflight:
            finish()
    finally:
        for fd in [*in_fds.values(), *out_fds.values()]:
            os.close(fd)
        for i in in_fds:
            part_of(i)[0].unlink(missing_ok=True)
    return received
