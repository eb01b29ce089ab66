"""Direct local writes: the writer's fast path on local disk, the twin of
:mod:`ckpt._engine._direct` (reads).

On local storage a write unit's pool block is laid out as the very bytes of its storage
object (``docs/format.md`` §3–4): the stager copies each inner chunk of a shard to its
place in the block (chunks in C order, each followed by room for its crc32c; chunks at
the array's edge zero-padded to the full chunk shape), and a writer thread then fills in
every chunk's crc32c and the shard index, and writes the block with one ``pwrite`` —
``O_DIRECT`` where the file system allows it, so the bytes go from the pool to the
device without the kernel's page-cache copy — then ``fsync``. Compared with handing the
block to tensorstore this removes two copies of every byte (tensorstore's encoded chunk
and the page cache) and most of the CPU a save costs, which on a CPU-bound training host
is exactly the time the training loop loses.

crc32c comes from google-crc32c's C library through ctypes (ctypes releases the GIL), so
a background write never holds the training thread's GIL for more than a call.

``CKPT_DIRECT_WRITES``: ``1`` (default: direct, with O_DIRECT where supported),
``buffered`` (direct, through the page cache), ``0`` (every write through tensorstore).
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ckpt._config import direct_writes, lower_this_thread
from ckpt._crc32c import crc32c_extend
from ckpt._engine._arrays import translate
from ckpt._engine._layout import ALIGN, ObjectImage, put_crc
from ckpt._engine._plan import CRC_BYTES
from ckpt.storage import Storage
from ckpt.storage._file import fsync_dir


class DirectWriter:
    """Writes objects of one save on local disk: a few threads, each object written with
    one pwrite and fsync'd; new directories are fsync'd before the save counts as
    durable (:meth:`finish`). ``durable=False`` (the memory tier's saves, whose
    durability is the node's memory's): no fsync of files or directories, and a
    directory is made only where a file's open finds none (a recycled tree has them all)
    -- every system call releases and takes back the GIL, which the training thread
    then waits for."""

    def __init__(self, storage: Storage, crc: Callable[[int, int, int], int], *, o_direct: bool,
                 threads: int = 4, nice: int = 0, durable: bool = True) -> None:
        self.storage, self.crc = storage, crc
        self.durable = durable
        self.o_direct = o_direct and hasattr(os, "O_DIRECT")
        self.threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckpt-write",
                                                           initializer=lower_this_thread, initargs=(nice,))
        self._dirs: set[str] = set()
        self._dirs_lock = threading.Lock()
        # host passes beyond the copy into the block (SaveStats): bytes written again
        # (pwrite), and bytes checksummed in a read of their own (not in the copy's pass)
        self.rewritten_bytes = self.crc_reread_bytes = 0

    @classmethod
    def for_storage(cls, storage: Storage, **kwargs: Any) -> DirectWriter | None:
        """A writer where direct writes apply: local storage, a little-endian host,
        google-crc32c's C implementation, not turned off. None elsewhere."""
        m = direct_writes()
        if m == "off" or not storage.capabilities.local \
                or sys.byteorder != "little" or not hasattr(os, "pwritev"):
            return None
        crc = crc32c_extend()
        if crc is None:
            return None
        return cls(storage, crc, o_direct=m == "direct", **kwargs)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        return self._pool.submit(fn, *args)

    # -- on the writer threads ------------------------------------------------
    def write_jsons(self, items: list[tuple[str, bytes]]) -> None:
        """zarr.json files of arrays this rank creates (their encoded bytes), one after
        another in one task (a task per file costs a future and a pool thread's wake-up
        each); inside the save's own directory, so no temporary name is needed: the
        commit makes the whole directory visible."""
        for rel, data in items:
            self._write_file(rel, memoryview(data), len(data), key=None, o_direct=False)

    def write_object(self, img: ObjectImage, block: np.ndarray, key: str, *, sealed: bool = False,
                     in_place: bool = False) -> None:
        """Write the object (first :meth:`seal` it, unless that was done); ``in_place``:
        the block is the file's own pages (:mod:`._mapped`), nothing more to write."""
        if not sealed:
            self.seal(img, block)
        if in_place:
            return
        with self._dirs_lock:
            self.rewritten_bytes += img.nbytes
        aligned = self.o_direct and block.ctypes.data % ALIGN == 0
        length = img.block_bytes if aligned else img.nbytes
        self._write_file(img.file, memoryview(block[:length]), img.nbytes, key=key, o_direct=aligned)  # type: ignore[arg-type]

    def seal(self, img: ObjectImage, block: np.ndarray, *, skip: int = 0) -> None:
        """Fill in the crc32c of every chunk (but the first ``skip``, whose crc32c the
        copy wrote), and the shard index with its crc32c."""
        base = block.ctypes.data
        crc = self.crc
        with self._dirs_lock:
            self.crc_reread_bytes += len(img.chunks[skip:]) * img.chunk_nbytes
        for off, _, _ in img.chunks[skip:]:
            put_crc(block, off + img.chunk_nbytes, crc(0, base + off, img.chunk_nbytes))
        if img.index is not None:
            at = img.nbytes - img.index.nbytes - CRC_BYTES
            raw = img.index.view(np.uint8).reshape(-1)
            block[at:at + raw.nbytes] = raw
            put_crc(block, at + raw.nbytes, crc(0, base + at, raw.nbytes))

    def _write_file(self, rel: str, data: memoryview, size: int, *, key: str | None, o_direct: bool) -> None:
        path = self.storage.local_path(rel)
        where = self.storage.describe(rel)
        parent = os.path.dirname(path)
        # No O_TRUNC: a file of a recycled tree is overwritten in place (its blocks stay
        # allocated), then cut to its size below.
        flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            if self.durable:
                self._makedirs(parent)  # new directories are recorded, for finish's fsync
            try:
                fd = self._open(path, parent, flags | (os.O_DIRECT if o_direct else 0))
            except OSError as e:
                if not (o_direct and e.errno == errno.EINVAL):
                    raise
                self.o_direct = o_direct = False  # this file system does not do O_DIRECT
                data, fd = data[:size], os.open(path, flags, 0o644)
            try:
                try:
                    _pwrite_full(fd, data, 0)
                except OSError as e:
                    if not (o_direct and e.errno == errno.EINVAL):
                        raise
                    self.o_direct = False  # O_DIRECT refused this buffer: write through the page cache
                    os.close(fd)
                    fd = os.open(path, flags, 0o644)
                    data = data[:size]
                    _pwrite_full(fd, data, 0)
                if len(data) != size or os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                if self.durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise translate(e, key=key, where=where, reading=False) from e

    def _open(self, path: str | os.PathLike[str], parent: str, flags: int) -> int:
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:
            if self.durable:  # its directory was made (and recorded) first
                raise
            os.makedirs(parent, exist_ok=True)  # not durable: made where it is missing
            return os.open(path, flags, 0o644)

    def _makedirs(self, d: str) -> None:
        with self._dirs_lock:
            if d in self._dirs:
                return
        os.makedirs(d, exist_ok=True)
        with self._dirs_lock:
            root = str(self.storage.local_path())
            while d.startswith(root) and d not in self._dirs and len(d) > len(root):
                self._dirs.add(d)
                d = os.path.dirname(d)

    def finish(self) -> None:
        """Make the new directories' entries durable (deepest first); the commit's rename
        then makes the checkpoint visible."""
        if not self.durable:
            return
        for d in sorted(self._dirs, key=len, reverse=True):
            fsync_dir(Path(d))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def encode_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()  # as tensorstore writes it


def _pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwritev(fd, [data], offset)
        if n <= 0:  # pragma: no cover - pwrite never returns 0 for a regular file
            raise OSError(errno.EIO, "short write")
        data, offset = data[n:], offset + n
