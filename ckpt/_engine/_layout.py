"""The on-disk layout of a checkpoint's storage objects, in one place.

* Which objects a manifest implies: every zarr array (a tensor's array, one piece of a
  "pieces" tensor, or a pack of small tensors), its ``zarr.json``, the name, region and
  exact size of each shard object, and the pickled values' files (:func:`stored_arrays`,
  :func:`array_layout`, :func:`piece_layout`, :func:`pack_length`).
* The bytes of one object (:class:`ObjectImage`): inner chunks in C order, each followed
  by its crc32c, then the shard index and its crc32c (``docs/format.md`` §3–4).
* The reading of a shard index (:func:`parse_shard_index`).

The writer (direct and through tensorstore), the loader, the direct reader, ``verify``,
``info``, ``reshard`` and the pruning of a recycled tree all take these from here, so they
agree by construction.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt._engine._plan import (
    CRC_BYTES,
    PACK_ALIGN,
    ArrayLayout,
    pack_metadata,
    shard_index_bytes,
    shard_key,
    zarr_metadata,
)
from ckpt._format import (
    Box,
    Manifest,
    check_relpath,
    chunk_separator,
    rank_object_path,
    storage_dtype,
)
from ckpt.errors import CorruptCheckpointError

ABSENT = 2**64 - 1  # both fields of a shard index entry of an absent chunk
INDEX_DTYPE = "<u8"  # a shard index: (offset, nbytes) per inner chunk, little-endian uint64
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length are multiples of this
HINT_CHECKSUM = "the checkpoint is damaged; `ckpt verify` lists every bad chunk; load an earlier checkpoint"
HINT_DAMAGED = "the checkpoint is damaged; load an earlier checkpoint"


@dataclass
class ObjectImage:
    """The bytes of one storage object, as a pool block holds them for a direct write.

    ``chunks``: per stored inner chunk, (its offset in the object, the region of the shard
    it holds as slices, whether it is padded at the array's edge). ``index`` is the
    shard index (None for a pack: one chunk, its crc32c, no index)."""

    file: str  # the object's path relative to the storage root
    chunks: list[tuple[int, tuple[slice, ...], bool]]
    chunk_nbytes: int  # one stored chunk's data (its crc32c follows)
    chunk_shape: tuple[int, ...]
    index: np.ndarray | None
    nbytes: int  # the object's size

    @property
    def block_bytes(self) -> int:
        """Pool bytes the block needs: the object rounded up for O_DIRECT."""
        return -(-self.nbytes // ALIGN) * ALIGN


def put_crc(block: np.ndarray, at: int, value: int) -> None:
    """Store the crc32c ``value`` at byte ``at`` of a uint8 ``block`` (after the bytes it covers)."""
    block[at:at + CRC_BYTES] = np.frombuffer(value.to_bytes(CRC_BYTES, "little"), dtype=np.uint8)


def shard_image(file: str, layout: ArrayLayout, region: Box, itemsize: int) -> ObjectImage:
    """The object of the shard of array ``file`` whose region is ``region`` (offsets on
    the shard grid; sizes smaller than the shard shape only at the array's edge). Chunks
    wholly outside the array are absent, as zarr stores them."""
    offs, sizes = region
    shard, chunk = layout.shard_shape, layout.chunk_shape
    grid = [s // c for s, c in zip(shard, chunk)]
    chunk_nbytes = math.prod(chunk) * itemsize
    index = np.full((layout.chunks_per_shard, 2), ABSENT, dtype=INDEX_DTYPE)
    chunks: list[tuple[int, tuple[slice, ...], bool]] = []
    pos = 0
    for i, g in enumerate(itertools.product(*(range(n) for n in grid))):
        starts = [gi * c for gi, c in zip(g, chunk)]
        if any(st >= s for st, s in zip(starts, sizes)):
            continue
        ext = [min(c, s - st) for c, s, st in zip(chunk, sizes, starts)]
        chunks.append((pos, tuple(slice(st, st + e) for st, e in zip(starts, ext)), ext != list(chunk)))
        index[i] = (pos, chunk_nbytes + CRC_BYTES)
        pos += chunk_nbytes + CRC_BYTES
    key = layout.shard_key([o // s for o, s in zip(offs, shard)])
    return ObjectImage(f"{file}/{key}", chunks, chunk_nbytes, tuple(chunk), index,
                       pos + shard_index_bytes(len(index)))


def pack_image(file: str, nbytes: int, separator: str | None = None) -> ObjectImage:
    """A pack's object: its bytes, then their crc32c (a 1-D array of one chunk)."""
    key = shard_key([0]) if separator is None else shard_key([0], separator)
    return ObjectImage(f"{file}/{key}", [(0, (slice(0, nbytes),), False)], nbytes, (nbytes,), None,
                       nbytes + CRC_BYTES)


def parse_shard_index(tail: bytes, n_chunks: int, size: int, crc32c: Callable[[Any], int], *,
                      key: str | None, where: str) -> np.ndarray:
    """The index of a shard object of ``size`` bytes from its last
    ``shard_index_bytes(n_chunks)`` bytes ``tail``: (offset, nbytes) per inner chunk
    (``ABSENT`` twice for an absent chunk), its crc32c checked and every entry inside the
    object's data. A damaged index raises :class:`CorruptCheckpointError`."""
    need = shard_index_bytes(n_chunks)
    if len(tail) != need or size < need:
        raise CorruptCheckpointError(f"stored data cannot be decoded (the shard file holds {size} bytes, fewer than "
                                     f"its index of {n_chunks} chunks needs: truncated)",
                                     key=key, path=where, hint=HINT_DAMAGED)
    if crc32c(tail[:-CRC_BYTES]) != int.from_bytes(tail[-CRC_BYTES:], "little"):
        raise CorruptCheckpointError("stored data fails its checksum (the shard index's crc32c does not match: "
                                     "the shard is damaged or truncated)", key=key, path=where, hint=HINT_CHECKSUM)
    index = np.frombuffer(tail, dtype=INDEX_DTYPE, count=n_chunks * 2).reshape(n_chunks, 2)
    present = ~((index[:, 0] == ABSENT) & (index[:, 1] == ABSENT))
    limit = np.uint64(size - need)
    off, nb = index[present, 0], index[present, 1]
    if np.any(off > limit) or np.any(nb > limit - np.minimum(off, limit)):
        raise CorruptCheckpointError("stored data cannot be decoded (the shard index points past the shard's data)",
                                     key=key, path=where, hint=HINT_DAMAGED)
    return index


def array_layout(key: str, shape: tuple[int, ...], storage: Mapping[str, Any], separator: str) -> ArrayLayout:
    """The layout of a tensor stored as one array (manifest storage ``layout: array``)."""
    path = check_relpath(storage["path"], key=key)
    return ArrayLayout(path, shape, tuple(storage["shard_shape"]), tuple(storage["chunk_shape"]), separator)


def piece_layout(key: str, piece: Mapping[str, Any], separator: str) -> ArrayLayout:
    """The layout of one piece of a "pieces" tensor (an array of the piece's sizes)."""
    path = check_relpath(piece["path"], key=key)
    sizes = tuple(piece["sizes"])
    return ArrayLayout(path, sizes, tuple(piece.get("shard_shape") or sizes),
                       tuple(piece.get("chunk_shape") or sizes), separator)


def pack_length(entries: Mapping[str, Mapping[str, Any]], path: str) -> int:
    """Bytes of the pack at ``path``: its members' end, padded as packs are."""
    end = max((e["storage"]["offset"] + e["storage"]["nbytes"] for e in entries.values()
               if (e.get("storage") or {}).get("layout") == "packed" and e["storage"].get("path") == path),
              default=0)
    return -(-end // PACK_ALIGN) * PACK_ALIGN


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
            return pack_image(self.path, self.nbytes, self.layout.separator).nbytes
        return shard_image(self.path, self.layout, region, self.itemsize).nbytes


def stored_arrays(manifest: Manifest) -> list[StoredArray]:
    """Every zarr array the manifest refers to (each pack once), in path order."""
    out: dict[str, StoredArray] = {}
    pack_keys: dict[str, list[str]] = {}
    sep = chunk_separator(manifest.format_version)
    for key, e in manifest.entries.items():
        if e.get("kind") != "tensor":
            continue
        st = e["storage"]
        dt = storage_dtype(e["dtype"])
        if st["layout"] == "array":
            lay = array_layout(key, tuple(e["shape"]), st, sep)
            out[lay.path] = StoredArray("array", (key,), lay.path, lay, dt)
        elif st["layout"] == "pieces":
            for p in st["pieces"]:
                lay = piece_layout(key, p, sep)
                out[lay.path] = StoredArray("piece", (key,), lay.path, lay, dt)
        else:
            pack_keys.setdefault(check_relpath(st["path"], key=key), []).append(key)
    for path in pack_keys:
        n = pack_length(manifest.entries, path)
        lay = ArrayLayout(path, (n,), (max(1, n),), (max(1, n),), sep)
        out[path] = StoredArray("pack", tuple(sorted(pack_keys[path])), path, lay, "uint8")
    return [out[p] for p in sorted(out)]


def pickle_objects(manifest: Manifest) -> list[tuple[str, str]]:
    """(key, checkpoint-relative path) of every pickled value."""
    return sorted((k, check_relpath(e["path"], key=k)) for k, e in manifest.entries.items()
                  if e.get("kind") == "pickle")


class PieceIndex:
    """The pieces of a ``pieces`` tensor sorted by their dim-0 start: the ones a box
    meets in O(log pieces + those that share its dim-0 range), not a scan of every saved
    piece (a checkpoint of 16,384 ranks' fragments). Loads and the memory tier's needs
    both ask it."""

    def __init__(self, pieces: list[dict[str, Any]]) -> None:
        self.pieces = pieces
        self.order = sorted(pieces, key=lambda p: p["offsets"][0] if p["offsets"] else 0)
        self.starts = [p["offsets"][0] if p["offsets"] else 0 for p in self.order]
        self.longest = max((p["sizes"][0] if p["sizes"] else 1 for p in self.order), default=0)

    def meeting(self, box: Box) -> list[dict[str, Any]]:
        """Pieces whose dim-0 range meets ``box``'s (a superset of those that overlap it)."""
        if not box[0]:
            return self.pieces
        lo = bisect.bisect_left(self.starts, box[0][0] - self.longest + 1)
        hi = bisect.bisect_left(self.starts, box[0][0] + box[1][0])
        return self.order[lo:hi]


def expected_objects(manifest: Manifest) -> dict[str, int | None]:
    """Every object a checkpoint's manifest implies -> its exact size (None where only
    presence is fixed: ``zarr.json`` files and pickles)."""
    out: dict[str, int | None] = {}
    for a in stored_arrays(manifest):
        out[f"{a.path}/zarr.json"] = None
        for _idx, path, region in a.shards():
            out[path] = a.expected_size(region)
    for _key, path in pickle_objects(manifest):
        out[path] = None
    for path in rank_objects(manifest):
        out[path] = None
    return out


def rank_objects(manifest: Manifest) -> list[str]:
    """The per-rank values objects of a format-3 checkpoint (one per rank of the save)."""
    ro = manifest.rank_objects
    if ro is None:
        return []
    return [check_relpath(rank_object_path(r, ro["path"]), what="per-rank object") for r in range(manifest.world_size)]
