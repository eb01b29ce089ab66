"""The tensorstore Context shared by ckpt's arrays.

One process-wide context, so every array shares tensorstore's I/O and copy thread
pools instead of each creating its own. Durability (``file_io_sync``) is on: a write
is acknowledged only after fsync.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ckpt._config import io_concurrency


@functools.cache
def default_context() -> Any:
    import tensorstore as ts

    io = io_concurrency()
    return ts.Context(
        {
            "file_io_sync": True,
            "file_io_concurrency": {"limit": io},
            "data_copy_concurrency": {"limit": max(2, os.cpu_count() or 2)},
            "cache_pool": {"total_bytes_limit": 0},
        }
    )
