"""Direct local reads: the loader's fast path on local disk.

When inner chunks span whole trailing dims (each chunk one run of C-order bytes, as ckpt
writes them: ``bytes`` + ``crc32c`` codecs, ``docs/format.md`` §3) and the CPU
destination is C-contiguous, chunks are read with ``os.preadv``: those needed whole
straight into the destination's memory, those needed in part (a resharded rank's
boundary, a padded edge chunk) into a scratch buffer. The shard index and every chunk's
crc32c are checked before a chunk's rows count as loaded. Everything else goes through
tensorstore (see :mod:`ckpt._engine._load`). ``CKPT_DIRECT_READS=0`` turns this off.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ckpt._config import direct_reads
from ckpt._engine._arrays import translate
from ckpt._engine._layout import ABSENT, HINT_CHECKSUM, HINT_DAMAGED, parse_shard_index
from ckpt._engine._plan import CRC_BYTES, ArrayLayout, shard_index_bytes
from ckpt._format import Box, storage_torch_dtype, torch_dtype
from ckpt.errors import CheckpointError, CorruptCheckpointError, UnsafePathError
from ckpt.storage import Storage


class DirectReader:
    """Plans and runs direct reads for one load (a thread pool, shard indexes read once)."""

    def __init__(self, storage: Storage, name: str, crc32c: Callable[[Any], int]) -> None:
        self.storage, self.name, self.crc32c = storage, name, crc32c
        self._indexes = _IndexCache()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def for_storage(cls, storage: Storage, name: str) -> DirectReader | None:
        """A reader where direct reads apply: local storage, a little-endian host with
        ``os.preadv``, hardware crc32c, not turned off. None elsewhere."""
        if not direct_reads():
            return None
        if (not storage.capabilities.local or sys.byteorder != "little"
                or not hasattr(os, "preadv")):
            return None
        try:
            import google_crc32c
        except ImportError:
            return None
        if getattr(google_crc32c, "implementation", None) != "c":  # the pure-Python one is far too slow
            return None
        from ckpt._crc32c import crc32c_value

        # google_crc32c.value holds the GIL for the whole buffer; through ctypes, reads on
        # many threads check their chunks in parallel
        return cls(storage, name, crc32c_value() or google_crc32c.value)

    def plan(self, key: str, path: str, src: Box, lay: ArrayLayout, target: np.ndarray) -> list[Run] | None:
        """Cut the read of ``src`` (into ``target``, a numpy view of the destination) along
        dim 0 at inner-chunk boundaries into runs, one preadv each, grouped per shard.
        None where the layout or the destination does not allow direct reads."""
        nd = len(lay.shape)
        if (not nd or len(lay.chunk_shape) != nd or len(lay.shard_shape) != nd
                or tuple(lay.chunk_shape[1:]) != tuple(lay.shape[1:])
                or tuple(lay.shard_shape[1:]) != tuple(lay.shape[1:])
                or any(src[0][1:]) or tuple(src[1][1:]) != tuple(lay.shape[1:])):
            return None
        c, sh, n = lay.chunk_shape[0], lay.shard_shape[0], lay.shape[0]
        if c <= 0 or sh < c or not target.flags.c_contiguous or not target.flags.writeable:
            return None
        flat = target.reshape(-1).view(np.uint8)
        row_bytes = flat.nbytes // max(1, target.shape[0])
        chunk_bytes = c * row_bytes
        n_chunks = lay.chunks_per_shard  # one chunk across every other dim
        a, b = src[0][0], src[0][0] + src[1][0]
        runs: list[Run] = []
        row = a
        while row < b:
            k = row // sh
            s0 = k * sh
            j = (row - s0) // c
            c0 = s0 + j * c
            hi = min(c0 + c, n, b)
            # the rows [row, hi) of chunk j: the whole chunk straight into the destination, or
            # (a chunk only partly needed, or padded at the array's edge) the whole chunk into
            # a scratch buffer, checked, then the rows copied out: either way every chunk read
            # is verified, and no rows outside the request are read beyond its own chunks
            dst = flat[(row - a) * row_bytes:(hi - a) * row_bytes]
            part = (j, dst, (row - c0) * row_bytes)
            last = runs[-1] if runs else None
            if (last is not None and last.shard == k and last.chunks[-1][0] == j - 1
                    and last.nbytes + chunk_bytes <= _RUN_BYTES):
                last.chunks.append(part)
                last.nbytes += chunk_bytes
                last.dest_bytes += dst.nbytes
            else:
                rel = f"{self.name}/{path}/{lay.shard_key([k] + [0] * (nd - 1))}"
                runs.append(Run(key, k, str(self.storage.local_path(rel)),
                                self.storage.describe(rel), n_chunks, [part], chunk_bytes, chunk_bytes, dst.nbytes))
            row = hi
        return runs or None

    def submit(self, run: Run) -> concurrent.futures.Future[None]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                               thread_name_prefix="ckpt-read")
        return self._pool.submit(self._read_run, run)

    def close(self) -> None:
        """Wait for running reads (none may write into a destination after the load
        returns) and drop queued ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _read_run(self, run: Run) -> None:
        """Read one shard's run of whole chunks into the destination and check each crc32c
        (on a worker thread; os.preadv runs without the GIL)."""
        crc32c = self.crc32c
        try:
            fd = os.open(run.file, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"stored data is missing (shard file not found; needed for chunk "
                                         f"{run.chunks[0][0]} of shard {run.shard})",
                                         key=run.key, path=run.where, hint=_HINT_MISSING) from None
        except OSError as e:
            raise _os_error(e, run) from e
        try:
            index = self._indexes.get(run.file, lambda: _read_index(fd, run, crc32c))
            i = 0
            while i < len(run.chunks):
                group: list[tuple[int, np.ndarray, int, np.ndarray, bytearray]] = []
                start = end = 0
                while i < len(run.chunks) and len(group) < 256:
                    j, dst, lo = run.chunks[i]
                    off, nb = int(index[j, 0]), int(index[j, 1])
                    if off == ABSENT and nb == ABSENT:
                        if group:
                            break
                        raise CorruptCheckpointError(f"stored data is missing (chunk {j} of shard {run.shard} is "
                                                     "absent from the shard index)",
                                                     key=run.key, path=run.where, hint=_HINT_MISSING)
                    if nb != run.chunk_bytes + CRC_BYTES:
                        if group:
                            break
                        raise CorruptCheckpointError(
                            f"stored data cannot be decoded (chunk {j} of shard {run.shard} holds {nb} bytes, "
                            f"expected {run.chunk_bytes + CRC_BYTES})", key=run.key, path=run.where, hint=HINT_DAMAGED)
                    if group and off != end:
                        break
                    if not group:
                        start = end = off
                    whole = lo == 0 and dst.nbytes == run.chunk_bytes
                    buf = dst if whole else np.empty(run.chunk_bytes, dtype=np.uint8)
                    group.append((j, dst, lo, buf, bytearray(4)))
                    end += nb
                    i += 1
                bufs: list[Any] = []
                for _, _, _, buf, crc in group:
                    bufs += [buf, crc]
                if _preadv_full(fd, bufs, start) != end - start:
                    raise CorruptCheckpointError(
                        f"stored data cannot be decoded (shard truncated at chunk {group[0][0]} of shard {run.shard})",
                        key=run.key, path=run.where, hint=HINT_DAMAGED)
                for j, dst, lo, buf, crc in group:
                    if crc32c(buf) != int.from_bytes(crc, "little"):
                        raise CorruptCheckpointError(f"stored data fails its checksum (crc32c mismatch in chunk {j} "
                                                     f"of shard {run.shard})", key=run.key, path=run.where,
                                                     hint=HINT_CHECKSUM)
                    if buf is not dst:
                        np.copyto(dst, buf[lo:lo + dst.nbytes])
        except CheckpointError:
            raise
        except OSError as e:
            raise _os_error(e, run) from e
        finally:
            os.close(fd)


_RUN_BYTES = 16 << 20  # most bytes one direct read task covers
_HINT_MISSING = "an object of the checkpoint was deleted; load an earlier checkpoint"


@dataclass
class Run:
    """Inner chunks of one shard, consecutive along dim 0, read with one preadv: whole
    ones straight into the destination, partly needed ones through a scratch buffer."""

    key: str
    shard: int  # the shard's index along dim 0
    file: str  # local path of the shard file
    where: str  # the shard file for messages
    n_chunks: int  # entries of the shard's index
    chunks: list[tuple[int, np.ndarray, int]]  # (chunk index, destination bytes, their offset in the chunk)
    nbytes: int  # stored bytes of the chunks (what is fetched)
    chunk_bytes: int  # one whole chunk's data
    dest_bytes: int  # bytes delivered to the destination


class _IndexCache:
    """Shard indexes read so far in one load, each read once (threads may ask at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, list[Any]] = {}

    def get(self, file: str, read: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            ent = self._entries.setdefault(file, [threading.Lock(), None])
        with ent[0]:
            if ent[1] is None:
                ent[1] = read()
            return ent[1]  # type: ignore[no-any-return]


def _read_index(fd: int, run: Run, crc32c: Callable[[Any], int]) -> np.ndarray:
    """A shard's index (:func:`~ckpt._engine._layout.parse_shard_index`), read from the
    end of the open shard file."""
    need = shard_index_bytes(run.n_chunks)
    size = os.fstat(fd).st_size
    tail = os.pread(fd, need, size - need) if size >= need else b""
    return parse_shard_index(tail, run.n_chunks, size, crc32c, key=run.key, where=run.where)


def _preadv_full(fd: int, bufs: list[Any], offset: int) -> int:
    """Fill ``bufs`` from ``offset`` on (os.preadv, again after a short read); the bytes
    read, fewer than the buffers hold only at the end of the file."""
    views = [memoryview(b).cast("B") for b in bufs]
    total = 0
    while views:
        got = os.preadv(fd, views, offset + total)
        if got <= 0:
            break
        total += got
        while views and got >= len(views[0]):
            got -= len(views[0])
            views.pop(0)
        if got:
            views[0] = views[0][got:]
    return total


def _os_error(e: OSError, run: Run) -> BaseException:
    import errno

    if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
        return UnsafePathError("the checkpoint holds a symlink, which could lead outside it", key=run.key,
                               path=run.file, hint="copy the real files into the checkpoint; "
                                                   "ckpt does not follow symlinks inside checkpoints")
    return translate(e, key=run.key, where=run.where, reading=True)


def direct_target(dest: torch.Tensor, sub: Box, dtype: str) -> np.ndarray | None:
    """A numpy view of ``dest[sub]`` in the stored dtype, when tensorstore can fill the
    destination in place (CPU, same dtype); None where a copy is needed instead."""
    if dest.device.type != "cpu" or dest.dtype != torch_dtype(dtype) or dest.is_conj() or dest.is_neg():
        return None
    view = dest.detach()
    if view.dim():
        view = view[tuple(slice(o, o + s) for o, s in zip(sub[0], sub[1]))]
    sdt = storage_torch_dtype(dtype)
    try:
        return (view if view.dtype == sdt else view.view(sdt)).numpy()
    except (RuntimeError, TypeError):  # a dtype numpy lacks, a view torch refuses
        return None


def chunk_elements(lay: ArrayLayout, src: Box) -> int:
    """Elements of the inner chunks a read of region ``src`` decodes (each chunk is read
    whole: its checksum covers all of it)."""
    n = 1
    for o, s, c, d in zip(src[0], src[1], lay.chunk_shape, lay.shape):
        if s == 0:
            return 0
        n *= min(-(-(o + s) // c) * c, d) - o // c * c
    return n
