"""Staging straight into the destination files' pages (the memory tier's saves).

Where a save's objects are written directly (:mod:`._direct_write`) into a directory that
*is* memory (the memory tier's node directory, tmpfs), a pool block followed by a
``pwrite`` moves every byte twice and reads it a third time for its crc32c. Here the
block of a unit is instead a shared mapping of the object's own file in the save's write
directory: the stager copies each chunk into the file's pages, checksumming it in the
same pass (:func:`._staging.copy_unit` with ``crc``), and the writer only fills in what
is left (an edge chunk's crc32c, the shard index) — no second write. A file of a retired
step (the recycle slot the save writes into) keeps its pages, so a steady-state step
allocates no new ones; its mapping is kept from the save that last used it
(:class:`MappedFiles`), so a steady step does not map them again either (a new mapping
of a tmpfs file costs a page-table entry per 4 KiB page, about 4x the copy itself). A
kept mapping of a file that retention deleted holds its pages until it is dropped, two
saves later: at most one step more than the tier holds.

A write into a mapping of a tmpfs file that has no room is a SIGBUS, not an error: every
file is first given its pages with ``posix_fallocate`` (an ``ENOSPC`` the save reports,
raised in the stager before a byte is copied; a no-op for a recycled file's own pages).
No other process writes or truncates a save's write directory while it is written (the
commit renames it into place once every rank is done), so a mapping is never cut short.

For device sources the mapping is registered with CUDA (``cudaHostRegister``, through
torch's cudart) so the device-to-host copy is DMA into the file's pages; it stays
registered as long as the mapping is kept (:class:`MappedFiles`). Durability is the node's memory's: no ``fsync``
(the tier never claims more; a crash of the process keeps the pages, the commit is the
rename).
"""

from __future__ import annotations

import mmap
import os
import sys
import threading

import torch

from ckpt._engine._layout import ObjectImage
from ckpt._engine._pool import Block
from ckpt.storage import Storage

__all__ = ["MappedBlock", "MappedFiles"]


class MappedBlock(Block):
    """A block that is a file's own pages (a shared mapping, held by :class:`MappedFiles`)."""

    __slots__ = ("mapping",)

    def __init__(self, size: int, mapping: _Mapping) -> None:
        super().__init__(-1, size, mapping.tensor, mapping.tensor.numpy())
        self.mapping = mapping


class _Mapping:
    __slots__ = ("mm", "tensor", "registered", "used")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8)
        self.registered = False
        self.used = 0  # the save that last used it

    def drop(self) -> None:
        if self.registered:
            self.registered = False
            try:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # noqa: BLE001 - CUDA torn down (exit): the unmap releases the pages anyway
                pass
        self.tensor = None  # type: ignore[assignment]
        self.mm = None  # type: ignore[assignment]  # munmap once no view is left


class MappedFiles:
    """The mappings of the files the last ``saves`` saves staged into, by file (device,
    inode, size): a recycled file keeps its mapping, whose pages are already mapped (a
    tmpfs mapping costs a page-table entry per 4 KiB page on its first use, about 4x
    its copy; a steady step pays it no more). A mapping of a file no save used in the
    last ``saves`` is dropped (a deleted file's pages are freed once it is); all go
    with :meth:`close`."""

    def __init__(self, saves: int = 2) -> None:
        self.saves = saves
        self._maps: dict[tuple[int, int, int], _Mapping] = {}
        self._lock = threading.Lock()
        self._save = 0
        self.new_maps = 0  # mappings made (not reused), for tests and the bench

    def begin(self) -> None:
        """A save starts: drop the mappings no save of the last ``saves`` used."""
        with self._lock:
            self._save += 1
            for k in [k for k, m in self._maps.items() if m.used <= self._save - 1 - self.saves]:
                self._maps.pop(k).drop()

    def acquire(self, storage: Storage, img: ObjectImage, *, cuda: bool = False) -> MappedBlock | None:
        """The file of ``img`` created (or a recycled one reused) at its size, its pages
        allocated, and mapped; None for an empty object (nothing to map)."""
        size = img.nbytes
        if size <= 0:
            return None
        path = storage.local_path(img.file)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:  # no O_TRUNC: a recycled file keeps its pages
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:  # its directory is new (a recycled tree has them all: no mkdir per file)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, size)
            with self._lock:
                m = self._maps.get(key) if st.st_size == size else self._maps.pop(key, None)
            if st.st_size != size:
                if m is not None:  # its pages beyond a cut were freed: map (and allocate) anew
                    m.drop()
                    m = None
                os.ftruncate(fd, size)
            os.utime(fd)  # rewritten: not a stale file of the recycled tree (a mapping's writes may not touch it)
            if m is None:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)  # ENOSPC here, never a SIGBUS in the copy
                m = _Mapping(mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE))
                _populate(m.mm, size)
                with self._lock:
                    self._maps[key] = m
                    self.new_maps += 1
        finally:
            os.close(fd)
        with self._lock:
            m.used = self._save
        if cuda and not m.registered:
            _register(m, size)
        return MappedBlock(size, m)

    @staticmethod
    def release(block: MappedBlock) -> None:
        """The block is written: its views go (the mapping stays, for the next save)."""
        block.tensor = block.array = None  # type: ignore[assignment]
        block.mapping = None  # type: ignore[assignment]

    def close(self) -> None:
        with self._lock:
            maps, self._maps = list(self._maps.values()), {}
        for m in maps:
            m.drop()


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; Python 3.11 lacks the name


def _populate(m: mmap.mmap, size: int) -> None:
    """Map every page writable in one call (``MADV_POPULATE_WRITE``), not one page fault
    per 4 KiB page during the copy; where the kernel refuses, the copy faults them in."""
    if sys.platform.startswith("linux") and hasattr(m, "madvise"):
        try:
            m.madvise(_MADV_POPULATE_WRITE, 0, size)
        except OSError:  # an older kernel (EINVAL): page faults, as without it
            pass


def _register(m: _Mapping, size: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(m.tensor.data_ptr(), size, 1)  # cudaHostRegisterPortable
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of a tier file's mapping failed: {err}")
    m.registered = True
