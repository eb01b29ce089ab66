"""Staging: copying a write unit's sources into its pool block, and where that runs.

A unit's block holds either raw bytes (a pack; a shard written through tensorstore) or,
for direct local writes, the very bytes of its storage object (:mod:`._direct_write`):
each inner chunk at its place, whole-row chunks of a CPU shard in one strided copy.
CPU copies use numpy (GIL-free, and not torch's intra-op pool, which training needs);
device tensors are copied with ``copy_`` on the caller's current (copy) stream.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ckpt._engine._globalplan import Assignment
from ckpt._engine._layout import ObjectImage, put_crc
from ckpt._engine._mapped import MappedBlock
from ckpt._engine._plan import CRC_BYTES
from ckpt._engine._pool import Block
from ckpt._engine._snapstate import SnapshotState
from ckpt._engine._writer import WriteUnit, release_block
from ckpt.errors import SnapshotFailedError
from ckpt.providers._base import TensorItem


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def inline_staging(mode: str, tensors: list[TensorItem]) -> bool:
    """Whether a snapshot copies in the call: ``SaveOptions.cpu_staging="inline"`` and
    no CUDA tensor in the state."""
    return mode == "inline" and all(t.tensor.device.type == "cpu" for t in tensors)


def staging_threads(units: int) -> int:
    """Threads of an inline copy: the usable cores, at most 4 (memory bandwidth is the
    limit), never more than units to copy."""
    return max(1, min(4, usable_cores(), units))


def direct_ok(a: Assignment) -> bool:
    """Whether an array is written directly (when direct writes apply at all): every
    array with at least one dim (a 0-d one, rare above the pack threshold, stays on
    tensorstore)."""
    return a.layout is not None and len(a.layout.shape) > 0


# Fused copy + checksum: a chunk is copied in pieces that stay in a core's L2 cache, each
# checksummed right after its copy, so the crc32c reads cache and not memory again.
FUSE_BYTES = 512 << 10


def copy_unit(u: WriteUnit, *, non_blocking: bool, crc: Callable[[int, int, int], int] | None = None) -> int:
    """Copy a unit's sources into its block: at their offsets, or (an array shard written
    directly) chunk by chunk into the layout of the shard object.

    With ``crc`` (``crc32c_extend``), whole-row chunks of a CPU shard are checksummed as
    they are copied, their crc32c written after them; returns how many leading chunks of
    the image that sealed (the rest, and the index, are :meth:`DirectWriter.seal`'s)."""
    assert u.block is not None
    img = u.image
    if u.assignment is None:  # a pack (its image is its bytes, then their crc32c)
        members = sorted(u.members, key=lambda m: m[1])
        if img is not None and crc is not None and all(
                m.device.type == "cpu" and m.is_contiguous() for m, _, _ in members):
            _copy_pack_sealed(u.block.array, u.nbytes, members, crc)
            return 1
        _zero_pack_gaps(u.block.array, u.nbytes, members)  # zeros, never stale pool bytes
        for src, off, _ in members:
            _copy_to_block(u.block, off, src, non_blocking=non_blocking)
        return 0
    if img is None:  # raw bytes (tensorstore writes them)
        for src, off, _ in u.members:
            _copy_to_block(u.block, off, src, non_blocking=non_blocking)
        return 0
    assert u.storage_dtype is not None
    src = u.members[0][0].detach().view(u.storage_dtype)
    chunks = img.chunks
    whole = _whole_rows(img, src)
    cn = img.chunk_nbytes
    if whole and crc is not None:
        _copy_rows_sealed(u.block.array, _bytes_of(src), whole, cn, crc)
        chunks = chunks[whole:]
    elif whole:  # every whole chunk in one GIL-free copy: rows of the source into rows of the image
        dst = u.block.array[:whole * (cn + CRC_BYTES)].reshape(whole, cn + CRC_BYTES)[:, :cn]
        np.copyto(dst, _bytes_of(src)[:whole * cn].reshape(whole, cn))
        chunks = chunks[whole:]
    for off, region, padded in chunks:
        _copy_chunk(u.block, off, img, src[region], padded, non_blocking)
    return whole if crc is not None else 0


def _pack_gaps(nbytes: int, members: Sequence[tuple[torch.Tensor, int, object]]) -> list[tuple[int, int]]:
    """(start, end) of the bytes of a pack no member covers (members sorted by offset)."""
    gaps: list[tuple[int, int]] = []
    pos = 0
    for src, off, _ in members:
        if off > pos:
            gaps.append((pos, off))
        pos = max(pos, off + src.numel() * src.element_size())
    if pos < nbytes:
        gaps.append((pos, nbytes))
    return gaps


def _zero_pack_gaps(block: np.ndarray, nbytes: int, members: Sequence[tuple[torch.Tensor, int, object]]) -> None:
    for lo, hi in _pack_gaps(nbytes, members):
        block[lo:hi].fill(0)


def _copy_pack_sealed(block: np.ndarray, nbytes: int, members: Sequence[tuple[torch.Tensor, int, object]],
                      crc: Callable[[int, int, int], int]) -> None:
    """A pack of contiguous CPU members (sorted by offset, not overlapping): the gaps
    zeroed, then the ``nbytes`` checksummed in order — each gap, and each member piece by
    piece as it is copied (as :func:`_copy_rows_sealed`) — the crc32c after them."""
    _zero_pack_gaps(block, nbytes, members)
    base = block.ctypes.data
    c = pos = 0
    for src, off, _ in members:
        if off > pos:  # the gap before this member
            c = crc(c, base + pos, off - pos)
        data = _bytes_of(src)
        c = copy_crc(block, off, data, crc, c)
        pos = off + data.size
    if pos < nbytes:
        c = crc(c, base + pos, nbytes - pos)
    put_crc(block, nbytes, c)


def _copy_rows_sealed(block: np.ndarray, src: np.ndarray, rows: int, cn: int,
                      crc: Callable[[int, int, int], int]) -> None:
    """Chunk ``i`` of ``src`` (``cn`` bytes each) to ``i * (cn + CRC_BYTES)`` of ``block``,
    its crc32c after it; copy and crc piece by piece (both release the GIL)."""
    step = cn + CRC_BYTES
    for i in range(rows):
        put_crc(block, i * step + cn, copy_crc(block, i * step, src[i * cn:(i + 1) * cn], crc))


def copy_crc(dst: np.ndarray, at: int, src: np.ndarray, crc: Callable[[int, int, int], int], c: int = 0) -> int:
    """Copy the bytes ``src`` to ``dst[at:]`` in ``FUSE_BYTES`` pieces, extending the
    crc32c ``c`` over each piece while it is still in cache (both release the GIL);
    returns the crc32c."""
    base = dst.ctypes.data
    for lo in range(0, src.size, FUSE_BYTES):
        hi = min(src.size, lo + FUSE_BYTES)
        np.copyto(dst[at + lo:at + hi], src[lo:hi])
        c = crc(c, base + at + lo, hi - lo)
    return c


def _whole_rows(img: ObjectImage, src: torch.Tensor) -> int:
    """How many leading chunks of a CPU shard are consecutive whole runs of the (C-contiguous)
    source's bytes, in order: chunks that span every trailing dim. 0 where that does not hold."""
    if src.device.type != "cpu" or not src.is_contiguous() or src.dim() == 0:
        return 0
    if tuple(img.chunk_shape[1:]) != tuple(src.shape[1:]):
        return 0
    return sum(1 for _, _, padded in img.chunks if not padded)


def _copy_chunk(block: Block, off: int, img: ObjectImage, src: torch.Tensor, padded: bool,
                non_blocking: bool) -> None:
    n = img.chunk_nbytes
    if padded:  # an edge chunk is stored at full chunk shape, the rest filled with zeros
        block.array[off:off + n].fill(0)
    part = tuple(slice(0, s) for s in src.shape)
    if src.device.type == "cpu":
        values = src.numpy()  # the stored bits' dtype (bf16 as uint16...): numpy has them all
        dst: np.ndarray = block.array[off:off + n].view(values.dtype).reshape(img.chunk_shape)
        np.copyto(dst[part], values)  # GIL-free, and not torch's intra-op pool
        return
    _copy_chunk_bytes(block, off, img, src, non_blocking)


def _copy_chunk_bytes(block: Block, off: int, img: ObjectImage, src: torch.Tensor, non_blocking: bool) -> None:
    """A chunk copied with torch as raw bytes (device sources): a chunk's offset in the
    block is a multiple of chunk bytes + 4, which is not aligned for 8- and 16-byte
    dtypes, and torch views only aligned storage as a wider dtype."""
    isz = src.element_size()
    shape = img.chunk_shape
    dst = block.tensor[off:off + img.chunk_nbytes].view(*shape[:-1], shape[-1] * isz)
    if src.stride(-1) != 1:  # a byte view needs unit stride in the last dim
        # .contiguous() keeps a "contiguous" tensor's odd stride on a size-1 last dim
        # (e.g. randn(1, n).t()); through a flat view the same bytes get the usual strides
        src = src.contiguous().view(-1).view(src.shape)
    part = tuple(slice(0, e) for e in src.shape[:-1]) + (slice(0, src.shape[-1] * isz),)
    dst[part].copy_(src.view(torch.uint8), non_blocking=non_blocking)


def _copy_to_block(block: Block, offset: int, src: torch.Tensor, *, non_blocking: bool) -> None:
    nbytes = src.numel() * src.element_size()
    if nbytes == 0:
        return
    if src.device.type == "cpu" and src.is_contiguous():
        # numpy's copy releases the GIL and does not use torch's intra-op pool, which
        # the training thread needs.
        np.copyto(block.array[offset:offset + nbytes], _bytes_of(src))
        return
    dst = block.tensor[offset:offset + nbytes].view(src.dtype).view(src.shape)
    dst.copy_(src, non_blocking=non_blocking)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a numpy uint8 array (no copy)."""
    # as_strided, not reshape: a "contiguous" tensor may keep any stride on size-1 dims
    flat = t.detach().as_strided((t.numel(),), (1,))
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


# -- a snapshot's staging (the stager thread of SnapshotJob) -------------------
def stage(st: SnapshotState, units: list[WriteUnit], writer_q: queue.Queue[WriteUnit | None]) -> None:
    """Copy every unit of a snapshot into a pool block (waiting while the pool is full)
    and hand it to the writer: device units on the copy streams after the state's ready
    event, CPU units with numpy; inline staging (``st.inline``) on every core."""
    if st.digests:
        _count_units(st, units)
    if st.inline:
        _stage_inline(st, units, writer_q)
        return
    streams = st.streams
    n = 0
    for u in units:
        if st.cancel.is_set():
            return
        dev = next((m.device for m, _, _ in u.members if m.device.type == "cuda"), None)
        acquire_block(st, u, cuda=dev is not None)
        try:
            if dev is not None:
                ss = streams[dev]
                stream = ss[n % len(ss)]
                n += 1
                with torch.cuda.stream(stream):  # also makes the stream's device current
                    ready = st.ready_events.get(dev)
                    if ready is not None:
                        stream.wait_event(ready)
                    copy_unit(u, non_blocking=True)
                    ev = torch.cuda.Event(blocking=True)  # waiters sleep instead of spinning
                    ev.record(stream)
                u.event = ev
                st.copy_events.append((dev, ev))
                # Checked now, when the copy is issued: an in-place change enqueued before it
                # is not ordered with the copy. Not after the copy completes: once every copy
                # is issued, the optimizer step may run (its stream waits on these events)
                # and bump the versions while the copies are still landing.
                check_unchanged(st, u)
            elif isinstance(u.block, MappedBlock):  # into the file's pages, checksummed in the same pass
                copy_sealed(st, u)
            else:
                copy_unit(u, non_blocking=False)
                check_unchanged(st, u)
        except BaseException:
            if u.event is not None:  # the copy may still be landing in the block
                u.event.synchronize()
            release_block(st, u)
            raise
        st.stats.bytes += u.nbytes
        writer_q.put(u)
    st.stats.copied_s = time.perf_counter() - st.t_call
    st.staged.set()

def _stage_inline(st: SnapshotState, units: list[WriteUnit], writer_q: queue.Queue[WriteUnit | None]) -> None:
    """Copy (and checksum, for direct writes) CPU units on one thread per core while
    the caller waits in ``save_async``: the cores are the training's anyway."""
    todo = iter(units)
    lock = threading.Lock()

    def work() -> None:  # the caller waits for these threads: normal priority
        while not st.cancel.is_set():
            with lock:
                u = next(todo, None)
            if u is None:
                return
            acquire_block(st, u)
            try:
                copy_sealed(st, u)
            except BaseException:
                release_block(st, u)
                raise
            with lock:
                st.stats.bytes += u.nbytes
            writer_q.put(u)

    n = staging_threads(len(units))
    with concurrent.futures.ThreadPoolExecutor(max_workers=n - 1 or 1, thread_name_prefix="ckpt-stage") as ex:
        helpers = [ex.submit(work) for _ in range(n - 1)]
        try:
            work()
        except BaseException:
            st.cancel.set()  # the helpers stop at their next unit
            raise
        finally:  # every helper is done before anything reuses the pool
            errors = [e for e in (f.exception() for f in helpers) if e is not None]
        if errors:
            st.cancel.set()
            raise errors[0]
    st.stats.copied_s = time.perf_counter() - st.t_call
    st.staged.set()

def acquire_block(st: SnapshotState, u: WriteUnit, *, cuda: bool = False) -> None:
    """``u.block``: the unit's file's own pages where the save stages into its files
    (:mod:`._mapped`), else a pool block (waiting while the pool is full)."""
    if st.mapped is not None and u.image is not None:
        u.block = st.mapped.acquire(st.storage, u.image, cuda=cuda)
        if u.block is not None:
            return
    u.block = st.pool.acquire(u.image.block_bytes if u.image is not None else u.nbytes, cancelled=st.cancel)


def copy_sealed(st: SnapshotState, u: WriteUnit) -> None:
    """A CPU unit copied into its block, a direct one checksummed in the same pass and
    sealed (its remaining crc32c's and index filled in)."""
    assert u.block is not None
    direct = st.direct if u.image is not None else None
    done = copy_unit(u, non_blocking=False, crc=direct.crc if direct is not None else None)
    check_unchanged(st, u)
    if direct is not None and u.image is not None:
        direct.seal(u.image, u.block.array, skip=done)
        u.sealed = True


def check_unchanged(st: SnapshotState, u: WriteUnit) -> None:
    """Fail loudly if a source changed before its copy completed: a checkpoint must
    never hold a torn mix of two steps. With ``SaveOptions.check_snapshot``, also
    compare each tensor's digest with the call's once its last unit is copied."""
    for src, _, ident in u.members:
        key = ident[0]
        if src._version != st.versions.get(ident, src._version):
            raise SnapshotFailedError(
                "a tensor was modified in place before the snapshot had copied it", key=key,
                path=st.url,
                hint="mutate state only through the optimizer step (its hook waits), or call "
                     "handle.wait_staged() before changing tensors in place")
    if st.digests:
        _check_digests(st, u)


def tensor_digest(t: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (SaveOptions.check_snapshot; zlib releases the GIL)."""
    import zlib

    src = t.detach()
    if src.device.type != "cpu":
        src = src.to("cpu")
    flat = src.contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy().data)


def _count_units(st: SnapshotState, units: list[WriteUnit]) -> None:
    for u in units:
        for _, _, ident in u.members:
            st.digest_left[ident] = st.digest_left.get(ident, 0) + 1


def _check_digests(st: SnapshotState, u: WriteUnit) -> None:
    left = st.digest_left
    for _, _, ident in u.members:
        with _DIGEST_LOCK:
            left[ident] -= 1
            last = left[ident] == 0
        if not last or ident not in st.digests:
            continue
        if u.event is not None:
            u.event.synchronize()
        src, want = st.digests[ident]
        if tensor_digest(src) != want:
            raise SnapshotFailedError(
                "a tensor changed between the save call and the end of its copy (check_snapshot: its "
                "checksum differs), through a write torch's version counter does not see", key=ident[0],
                path=st.url,
                hint="do not write to state (t.data, t.numpy(), DLPack views) until the optimizer step "
                     "or handle.wait_staged(); ckpt.save blocks until it is safe")


_DIGEST_LOCK = threading.Lock()
