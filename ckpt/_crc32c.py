"""crc32c without the GIL: google-crc32c's C library called through ctypes (ctypes
releases the GIL), so a background checksum never holds the training thread's GIL for
more than a call. One home for the engine, the tools and the integrations."""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np


def _crc32c_function() -> Callable[[int, int, int], int] | None:
    """``extend(crc, address, nbytes)`` from google-crc32c's C library, called through
    ctypes so the GIL is released; None where the library is not found."""
    try:
        import google_crc32c
    except ImportError:
        return None
    if getattr(google_crc32c, "implementation", None) != "c":
        return None
    here = os.path.dirname(os.path.dirname(os.path.abspath(google_crc32c.__file__)))
    for lib in sorted(glob.glob(os.path.join(here, "google_crc32c.libs", "libcrc32c*.so*"))):
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        fn = dll.crc32c_extend
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return fn  # type: ignore[no-any-return]

    def extend(crc: int, address: int, nbytes: int) -> int:  # holds the GIL, still C speed
        buf = (ctypes.c_char * nbytes).from_address(address)
        return int(google_crc32c.extend(crc, memoryview(buf)))

    return extend


_CRC: list[Callable[[int, int, int], int] | None] = []
_CRC_LOCK = threading.Lock()


def crc32c_extend() -> Callable[[int, int, int], int] | None:
    with _CRC_LOCK:
        if not _CRC:
            _CRC.append(_crc32c_function())
        return _CRC[0]


def crc32c_value() -> Callable[[Any], int] | None:
    """``value(buffer)``: the crc32c of a contiguous buffer (numpy array, bytes,
    bytearray), computed without the GIL; None where the C library is not found."""
    extend = crc32c_extend()
    if extend is None:
        return None

    def value(buf: Any) -> int:
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        if not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr)
        return extend(0, arr.ctypes.data, arr.nbytes) if arr.nbytes else 0

    return value
