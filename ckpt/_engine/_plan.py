"""Storage planning: how each global tensor is laid out in zarr arrays and packs.

Rules (docs/format.md, "Arrays"):

* One zarr v3 array per global tensor, with the ``sharding_indexed`` codec. A *shard*
  is one storage object; shard boundaries fall on every writer's box boundary, so no
  object ever has two writers. Shards are at most ``max_shard_bytes`` so staging can
  stream a tensor larger than the host pool, one whole-shard write at a time.
* Inner chunks (the read unit of a partial, resharded load) are about
  ``chunk_bytes``, each with its own crc32c.
* Tensors up to ``pack_threshold`` bytes are packed into per-rank byte arrays so a state
  of hundreds of biases is a handful of objects.
* When writer boxes share no useful alignment (shards would be tiny), each box is its
  own array ("pieces" layout).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from functools import reduce

from ckpt._format import FORMAT_VERSION, Box, chunk_separator

CRC_BYTES = 4  # a crc32c, after every stored chunk, pack and shard index
INDEX_ENTRY_BYTES = 16  # per inner chunk in a shard index: (offset, nbytes) as two uint64


def shard_index_bytes(n_chunks: int) -> int:
    """Bytes of a shard's index (at its end), its crc32c included."""
    return n_chunks * INDEX_ENTRY_BYTES + CRC_BYTES

SEPARATOR = chunk_separator(FORMAT_VERSION)  # the chunk key separator this version writes


def shard_key(index: tuple[int, ...] | list[int], separator: str = SEPARATOR) -> str:
    """The key of the shard (or pack chunk) at grid ``index``, relative to its array's
    directory: zarr v3's "default" chunk key encoding."""
    return separator.join(["c", *map(str, index)])


@dataclass(frozen=True)
class PlanConfig:
    max_shard_bytes: int = 64 << 20
    chunk_bytes: int = 4 << 20
    pack_threshold: int = 256 << 10
    pack_bytes: int = 32 << 20


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is <= ``limit`` (at least 1)."""
    if limit >= n:
        return n
    if limit <= 1:
        return 1
    best = 1
    i = 1
    while i * i <= n:
        if n % i == 0:
            if i <= limit:
                best = max(best, i)
            j = n // i
            if j <= limit:
                best = max(best, j)
        i += 1
    return best


def choose_block(align: tuple[int, ...], itemsize: int, target: int) -> tuple[int, ...]:
    """A block shape whose every dim divides ``align`` (so blocks tile any region whose
    boundaries are multiples of ``align``) and whose bytes are at most ``target`` where
    possible. Leading dims shrink first so blocks stay contiguous in C order."""
    block = [max(1, a) for a in align]
    for d in range(len(block)):
        rest = math.prod(block[d + 1:]) * itemsize
        if block[d] * rest <= target:
            break
        block[d] = largest_divisor_at_most(block[d], max(1, target // max(1, rest)))
        if block[d] * rest <= target:
            break
    return tuple(block)


def box_alignment(shape: tuple[int, ...], boxes: list[Box]) -> tuple[int, ...]:
    """Per dim, the gcd of every interior box boundary (the dim size if there is none):
    shards of that size never straddle a boundary (the last one may be short)."""
    out = []
    for d, n in enumerate(shape):
        cuts = {o[d] for o, _ in boxes} | {o[d] + s[d] for o, s in boxes}
        cuts.discard(0)
        cuts.discard(n)
        out.append((reduce(math.gcd, cuts) if cuts else n) if n else 1)
    return tuple(out)


@dataclass(frozen=True)
class ArrayLayout:
    """One zarr array: where it lives and how it is cut."""

    path: str
    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    # zarr "default" chunk key encoding: "." (format 2: shard "c.1.0" beside zarr.json)
    # or "/" (format 1: "c/1/0", two directories more per array)
    separator: str = SEPARATOR

    def shard_key(self, index: tuple[int, ...] | list[int]) -> str:
        """The key of the shard at grid ``index``, relative to the array's directory."""
        return shard_key(index, self.separator)

    @property
    def chunks_per_shard(self) -> int:
        """Entries of a shard's index: inner chunks of a whole shard (the shard shape is
        a multiple of the chunk shape)."""
        return math.prod(-(-s // c) for s, c in zip(self.shard_shape, self.chunk_shape))

    def shards_in(self, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> list[Box]:
        """The shard regions inside one box (whose boundaries are shard-aligned)."""
        ranges = []
        for o, s, sh, n in zip(offsets, sizes, self.shard_shape, self.shape):
            starts = range(o, o + s, sh)
            ranges.append([(a, min(sh, o + s - a, n - a)) for a in starts])
        return [
            (tuple(a for a, _ in combo), tuple(b for _, b in combo))
            for combo in itertools.product(*ranges)
        ]


def plan_array(path: str, shape: tuple[int, ...], itemsize: int, boxes: list[Box],
               cfg: PlanConfig) -> ArrayLayout | None:
    """The array layout for a tensor written as ``boxes``; None if the boxes' alignment is
    too poor for one array (the caller then stores each box as its own array)."""
    return layout_for(path, shape, itemsize, box_alignment(shape, boxes), len(boxes), cfg)


SMALL_SHARD = 256 << 10  # shards under this, and 8x more of them than boxes: each box its own array
SMALL_SHARD_BY_RULE = 16 << 10  # the same, for a tensor placed by rule (its pieces are listed one per box)


def layout_for(path: str, shape: tuple[int, ...], itemsize: int, align: tuple[int, ...], n_boxes: int,
               cfg: PlanConfig, small_shard: int = SMALL_SHARD) -> ArrayLayout | None:
    """As :func:`plan_array`, from the boxes' alignment and count (a sharding rule gives
    both without listing the boxes)."""
    shard = choose_block(align, itemsize, cfg.max_shard_bytes)
    chunk = choose_block(shard, itemsize, cfg.chunk_bytes)
    shard_bytes = math.prod(shard) * itemsize
    n_shards = math.prod(-(-max(1, n) // s) for n, s in zip(shape, shard))
    if n_boxes > 1 and shard_bytes < small_shard and n_shards > 8 * n_boxes:
        return None
    return ArrayLayout(path, shape, shard, chunk)


def zarr_metadata(layout: ArrayLayout, storage_dtype: str, attributes: dict) -> dict:
    """The zarr v3 array metadata (zarr.json body) for a layout."""
    bytes_codec = {"name": "bytes", "configuration": {"endian": "little"}}
    inner = [bytes_codec, {"name": "crc32c"}]
    if storage_dtype in ("bool", "uint8", "int8"):
        inner = [{"name": "bytes"}, {"name": "crc32c"}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(layout.shape),
        "data_type": storage_dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(layout.shard_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": layout.separator}},
        "fill_value": False if storage_dtype == "bool" else [0.0, 0.0] if storage_dtype.startswith("complex") else 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": list(layout.chunk_shape),
                    "codecs": inner,
                    "index_codecs": [bytes_codec, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": attributes,
    }


def pack_metadata(nbytes: int, attributes: dict, separator: str = SEPARATOR) -> dict:
    """zarr.json of a pack: a 1-D uint8 array in a single chunk with a crc32c
    (``separator``: as :attr:`ArrayLayout.separator`)."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [max(1, nbytes)]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": 0,
        "codecs": [{"name": "bytes"}, {"name": "crc32c"}],
        "attributes": attributes,
    }


PACK_ALIGN = 64


@dataclass
class PackPlan:
    """Small tensors of one rank grouped into packs: (pack index, offset) per member."""

    sizes: list[int] = field(default_factory=list)            # bytes of each pack
    placement: list[tuple[int, int]] = field(default_factory=list)  # per member

    @classmethod
    def build(cls, nbytes: list[int], pack_bytes: int) -> PackPlan:
        plan = cls()
        for n in nbytes:
            if not plan.sizes or (plan.sizes[-1] + n > pack_bytes and plan.sizes[-1] > 0):
                plan.sizes.append(0)
            off = plan.sizes[-1]
            plan.placement.append((len(plan.sizes) - 1, off))
            plan.sizes[-1] = off + -(-n // PACK_ALIGN) * PACK_ALIGN
        return plan
