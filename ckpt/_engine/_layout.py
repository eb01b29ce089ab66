"""The storage objects a manifest implies: every zarr array of a checkpoint (a tensor's
array, one piece of a "pieces" tensor, or a pack of small tensors), its ``zarr.json``, the
name, region and exact size of each shard object, and the pickled values' files.

The manifest alone describes them; the engine (pruning a recycled tree), ``verify``,
``info`` and ``reshard`` all read them from here, and the writer builds its objects from
the same ``ArrayLayout`` (``_plan``), so they agree by construction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt._engine._plan import (
    CRC_BYTES,
    PACK_ALIGN,
    ArrayLayout,
    pack_metadata,
    shard_index_bytes,
    zarr_metadata,
)
from ckpt._format import Box, Manifest, check_relpath, chunk_separator, storage_dtype


@dataclass(frozen=True)
class StoredArray:
    """One zarr array of a checkpoint, as the manifest describes it.

    ``kind`` is ``array`` (a whole tensor), ``piece`` (one box of a "pieces" tensor) or
    ``pack`` (small tensors side by side in a 1-D uint8 array); ``keys`` are the state
    keys whose data lives in it. A pack is one chunk: its layout's shard and chunk shapes
    are its whole length.
    """

    kind: str
    keys: tuple[str, ...]
    path: str
    layout: ArrayLayout
    data_type: str  # zarr data_type on disk

    @property
    def key_label(self) -> str:
        return ", ".join(self.keys)

    @property
    def itemsize(self) -> int:
        return np.dtype(self.data_type).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.layout.shape) * self.itemsize

    def metadata(self) -> dict[str, Any]:
        """The zarr.json body this array must have (attributes left empty)."""
        if self.kind == "pack":
            return pack_metadata(self.layout.shape[0], {}, self.layout.separator)
        return zarr_metadata(self.layout, self.data_type, {})

    def shards(self) -> Iterator[tuple[tuple[int, ...], str, Box]]:
        """(grid index, object path relative to the checkpoint, region) of every shard."""
        lay = self.layout
        if math.prod(lay.shape) == 0:
            return
        grid = [range(-(-n // s)) for n, s in zip(lay.shape, lay.shard_shape)]
        for idx in itertools.product(*grid):
            offs = tuple(i * s for i, s in zip(idx, lay.shard_shape))
            sizes = tuple(min(s, n - o) for s, n, o in zip(lay.shard_shape, lay.shape, offs))
            yield idx, f"{self.path}/{lay.shard_key(idx)}", (offs, sizes)

    def chunks(self, region: Box) -> Iterator[tuple[tuple[int, ...], Box]]:
        """(global chunk index, region) of every inner chunk inside a shard's region."""
        offs, sizes = region
        cs = self.layout.chunk_shape
        grid = [range(o // c, -(-(o + s) // c)) for o, s, c in zip(offs, sizes, cs)]
        for idx in itertools.product(*grid):
            lo = tuple(i * c for i, c in zip(idx, cs))
            hi = tuple(min((i + 1) * c, o + s) for i, c, o, s in zip(idx, cs, offs, sizes))
            yield idx, (lo, tuple(h - lo_ for lo_, h in zip(lo, hi)))

    def expected_size(self, region: Box) -> int:
        """Exact bytes of the object holding one shard (every chunk stored, uncompressed)."""
        if self.kind == "pack":
            return self.nbytes + CRC_BYTES
        cs = self.layout.chunk_shape
        per_shard = math.prod(s // c for s, c in zip(self.layout.shard_shape, cs))
        stored = math.prod(-(-s // c) for s, c in zip(region[1], cs))
        return stored * (math.prod(cs) * self.itemsize + CRC_BYTES) + shard_index_bytes(per_shard)


def stored_arrays(manifest: Manifest) -> list[StoredArray]:
    """Every zarr array the manifest refers to (each pack once), in path order."""
    out: dict[str, StoredArray] = {}
    pack_end: dict[str, int] = {}
    pack_keys: dict[str, list[str]] = {}
    sep = chunk_separator(manifest.format_version)
    for key, e in manifest.entries.items():
        if e.get("kind") != "tensor":
            continue
        st = e["storage"]
        dt = storage_dtype(e["dtype"])
        shape = tuple(e["shape"])
        if st["layout"] == "array":
            path = check_relpath(st["path"], key=key)
            lay = ArrayLayout(path, shape, tuple(st["shard_shape"]), tuple(st["chunk_shape"]), sep)
            out[path] = StoredArray("array", (key,), path, lay, dt)
        elif st["layout"] == "pieces":
            for p in st["pieces"]:
                path = check_relpath(p["path"], key=key)
                sizes = tuple(p["sizes"])
                lay = ArrayLayout(path, sizes, tuple(p.get("shard_shape") or sizes),
                                  tuple(p.get("chunk_shape") or sizes), sep)
                out[path] = StoredArray("piece", (key,), path, lay, dt)
        else:
            path = check_relpath(st["path"], key=key)
            pack_end[path] = max(pack_end.get(path, 0), st["offset"] + st["nbytes"])
            pack_keys.setdefault(path, []).append(key)
    for path, end in pack_end.items():
        n = -(-end // PACK_ALIGN) * PACK_ALIGN
        lay = ArrayLayout(path, (n,), (max(1, n),), (max(1, n),), sep)
        out[path] = StoredArray("pack", tuple(sorted(pack_keys[path])), path, lay, "uint8")
    return [out[p] for p in sorted(out)]


def pickle_objects(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, checkpoint-relative path) of every pickled value."""
    return sorted((k, check_relpath(e["path"], key=k)) for k, e in manifest.entries.items()
                  if e.get("kind") == "pickle")
