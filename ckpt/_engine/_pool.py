"""A bounded, reused pool of host staging memory.

One contiguous, page-aligned buffer (pinned when CUDA is in use, so device-to-host
copies are true DMA; aligned so direct writes can use O_DIRECT) is allocated on first
use and carved into blocks by a first-fit allocator with coalescing. ``acquire`` blocks
while the pool is full: that is the back-pressure that keeps host memory bounded by
configuration, never by model size.

With ``huge_pages``, an unpinned pool is an anonymous mapping aligned to 2 MiB and
advised ``MADV_HUGEPAGE`` (Linux, where transparent huge pages are ``madvise`` or
``always``): an O_DIRECT write pins its buffer's pages for the device, 512x fewer of them
with huge pages, which saves kernel CPU on every write; the first touch of each page
costs more (figures: docs/bench/knobs.md).
"""

from __future__ import annotations

import bisect
import mmap
import threading
import time

import numpy as np
import torch

_ALIGN = 4096
_HUGE = 2 << 20  # a transparent huge page (x86-64, and arm64 with 4 KiB pages)


class PoolClosedError(RuntimeError):
    pass


class Block:
    __slots__ = ("offset", "size", "tensor", "array")

    def __init__(self, offset: int, size: int, tensor: torch.Tensor, array: np.ndarray) -> None:
        self.offset = offset
        self.size = size
        self.tensor = tensor  # uint8 view of the block
        self.array = array  # the same memory as numpy uint8


class HostPool:
    """``capacity`` bytes of staging memory; ``pinned`` uses page-locked memory."""

    def __init__(self, capacity: int, *, pinned: bool = False, huge_pages: bool = True) -> None:
        if capacity < _ALIGN:
            raise ValueError(f"pool capacity must be at least {_ALIGN} bytes, got {capacity}")
        self.capacity = capacity
        self.pinned = pinned
        self._buf: torch.Tensor | None = None
        self._np: np.ndarray | None = None
        self.want_huge_pages = huge_pages
        self.huge_pages = False  # the buffer was advised MADV_HUGEPAGE
        self._free: list[tuple[int, int]] = [(0, capacity)]  # sorted (offset, size)
        self._used = 0
        self.peak = 0
        self.wait_s = 0.0
        self._cv = threading.Condition()
        self._closed = False

    def _ensure(self) -> None:
        if self._buf is None:
            if self.pinned:  # page-locked memory is page-aligned
                self._buf = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=True)
            else:
                self._buf, self.huge_pages = _anonymous(self.capacity, huge=self.want_huge_pages)
            self._np = self._buf.numpy()

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, nbytes: int, *, cancelled: threading.Event | None = None) -> Block:
        """A block of at least ``nbytes``; waits for space while the pool is full.
        Raises ValueError when the request can never fit."""
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        if size > self.capacity:
            raise ValueError(f"a staging block of {nbytes} bytes exceeds the pool ({self.capacity} bytes)")
        t0 = None
        with self._cv:
            self._ensure()
            while True:
                if self._closed:
                    raise PoolClosedError("staging pool closed")
                if cancelled is not None and cancelled.is_set():
                    raise PoolClosedError("snapshot cancelled")
                for i, (off, free) in enumerate(self._free):
                    if free >= size:
                        if free == size:
                            del self._free[i]
                        else:
                            self._free[i] = (off + size, free - size)
                        self._used += size
                        self.peak = max(self.peak, self._used)
                        if t0 is not None:
                            self.wait_s += time.perf_counter() - t0
                        assert self._buf is not None and self._np is not None
                        return Block(off, size, self._buf[off:off + size], self._np[off:off + size])
                if t0 is None:
                    t0 = time.perf_counter()
                self._cv.wait(timeout=0.5)

    def release(self, block: Block) -> None:
        with self._cv:
            off, size = block.offset, block.size
            i = bisect.bisect_left(self._free, (off, 0))
            # coalesce with the next and previous free ranges
            if i < len(self._free) and self._free[i][0] == off + size:
                size += self._free[i][1]
                del self._free[i]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == off:
                off, size = self._free[i - 1][0], self._free[i - 1][1] + size
                del self._free[i - 1]
                i -= 1
            self._free.insert(i, (off, size))
            self._used -= block.size
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._buf = None  # the mapping goes when its last view does
        self._np = None


def _anonymous(capacity: int, *, huge: bool = True) -> tuple[torch.Tensor, bool]:
    """``capacity`` bytes of private anonymous memory aligned to 2 MiB (so every block
    can be written with O_DIRECT, and huge pages line up), advised ``MADV_HUGEPAGE``
    (``huge``) where the platform has it; returns the tensor and whether the advice was
    taken. Pages are allocated on first touch, as with ``torch.empty``."""
    m = mmap.mmap(-1, capacity + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(m, dtype=torch.uint8)  # holds the mapping alive
    skip = -raw.data_ptr() % _HUGE
    advised = False
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if huge and advice is not None and hasattr(m, "madvise"):
        try:  # madvise wants a page-aligned start: the mapping's base is one
            m.madvise(advice, skip, capacity)
            advised = True
        except OSError:  # pragma: no cover - a kernel without transparent huge pages
            pass
    return raw[skip:skip + capacity], advised
