"""The global save plan: from every rank's tensor pieces to manifest entries and to each
rank's write assignments.

Every rank computes the same plan from the same all-gathered piece lists, so no plan
has to be broadcast. Replicated pieces are written once, by the holder with the fewest
bytes assigned so far (largest pieces first), which spreads bytes over ranks.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ckpt._engine._plan import ArrayLayout, PackPlan, PlanConfig, plan_array
from ckpt._format import Box, itemsize, key_to_path
from ckpt.errors import ReshardError, ShapeMismatchError


@dataclass(frozen=True)
class PieceMeta:
    """What a rank holds of one tensor (cheap to gather)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class Assignment:
    """One piece a rank must write: into an array region, a pack, or a piece array."""

    key: str
    box: Box
    kind: str  # "array" | "pack" | "piece"
    path: str
    layout: ArrayLayout | None = None
    create: bool = False  # this rank writes the array's zarr.json
    pack_offset: int = 0


@dataclass
class GlobalPlan:
    entries: dict[str, dict[str, Any]]
    per_rank: dict[int, list[Assignment]] = field(default_factory=dict)
    packs: dict[int, list[tuple[str, int]]] = field(default_factory=dict)  # rank -> [(path, nbytes)]
    bytes_per_rank: dict[int, int] = field(default_factory=dict)


def array_path(key: str) -> str:
    return f"arrays/{key_to_path(key)}.zarr"


def piece_path(key: str, i: int) -> str:
    return f"arrays/{key_to_path(key)}.pieces/{i:05d}.zarr"


def signature(metas: list[list[PieceMeta]]) -> str:
    return hashlib.sha256(pickle.dumps(metas)).hexdigest()


def _overlap(a: Box, b: Box) -> bool:
    return all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a[0], a[1], b[0], b[1]))


def build_plan(metas: list[list[PieceMeta]], cfg: PlanConfig) -> GlobalPlan:
    """``metas[r]`` is rank r's pieces. Raises ReshardError / ShapeMismatchError when the
    ranks disagree about a tensor or its pieces do not tile it."""
    world = len(metas)
    by_key: dict[str, dict[Box, list[int]]] = defaultdict(dict)
    info: dict[str, tuple[str, tuple[int, ...]]] = {}
    for rank, pieces in enumerate(metas):
        for p in pieces:
            if math.prod(p.sizes) == 0 and math.prod(p.shape) > 0:
                info.setdefault(p.key, (p.dtype, p.shape))
                continue  # an empty shard of a non-empty tensor holds nothing to write
            seen = info.setdefault(p.key, (p.dtype, p.shape))
            if seen != (p.dtype, p.shape):
                raise ShapeMismatchError(
                    f"ranks disagree about this tensor: {seen[0]}{list(seen[1])} vs "
                    f"{p.dtype}{list(p.shape)} on rank {rank}", key=p.key,
                    hint="every rank must describe the same global shape and dtype")
            by_key[p.key].setdefault((p.offsets, p.sizes), []).append(rank)

    load = dict.fromkeys(range(world), 0)
    writer: dict[tuple[str, Box], int] = {}
    # Largest pieces first, each to its least-loaded holder: balances replicated bytes.
    order = sorted(((math.prod(b[1]) * itemsize(info[k][0]), k, b) for k, boxes in by_key.items() for b in boxes),
                   key=lambda t: (-t[0], t[1], t[2]))
    for nbytes, key, box in order:
        holders = by_key[key][box]
        r = min(holders, key=lambda h: (load[h], h))
        writer[(key, box)] = r
        load[r] += nbytes

    plan = GlobalPlan(entries={}, per_rank={r: [] for r in range(world)}, bytes_per_rank=load)
    small: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for key in sorted(by_key):
        dtype, shape = info[key]
        isz = itemsize(dtype)
        boxes = sorted(by_key[key])
        _check_tiling(key, shape, boxes)
        total = math.prod(shape) * isz
        written = [{"offsets": list(b[0]), "sizes": list(b[1]), "rank": writer[(key, b)]} for b in boxes]
        entry: dict[str, Any] = {"kind": "tensor", "dtype": dtype, "shape": list(shape), "boxes": written}
        plan.entries[key] = entry
        if len(boxes) == 1 and total <= cfg.pack_threshold:
            small[writer[(key, boxes[0])]].append((key, total))
            continue
        layout = plan_array(array_path(key), shape, isz, boxes, cfg)
        if layout is not None:
            entry["storage"] = {"layout": "array", "path": layout.path,
                                "shard_shape": list(layout.shard_shape), "chunk_shape": list(layout.chunk_shape)}
            for i, b in enumerate(boxes):
                plan.per_rank[writer[(key, b)]].append(
                    Assignment(key, b, "array", layout.path, layout, create=(i == 0)))
        else:
            piece_entries: list[dict[str, Any]] = []
            for i, b in enumerate(boxes):
                path = piece_path(key, i)
                lay = plan_array(path, b[1], isz, [((0,) * len(shape), b[1])], cfg)
                assert lay is not None
                piece_entries.append({"offsets": list(b[0]), "sizes": list(b[1]), "path": path,
                                      "shard_shape": list(lay.shard_shape), "chunk_shape": list(lay.chunk_shape)})
                plan.per_rank[writer[(key, b)]].append(Assignment(key, b, "piece", path, lay, create=True))
            entry["storage"] = {"layout": "pieces", "pieces": piece_entries}

    for rank, members in sorted(small.items()):
        packs = PackPlan.build([n for _, n in members], cfg.pack_bytes)
        paths = [f"packs/r{rank:05d}-{i:04d}" for i in range(len(packs.sizes))]
        plan.packs[rank] = list(zip(paths, packs.sizes))
        for (key, n), (pi, off) in zip(members, packs.placement):
            plan.entries[key]["storage"] = {"layout": "packed", "path": paths[pi], "offset": off, "nbytes": n}
            box = (tuple(0 for _ in info[key][1]), tuple(info[key][1]))
            plan.per_rank[rank].append(Assignment(key, box, "pack", paths[pi], pack_offset=off))
    return plan


def _check_tiling(key: str, shape: tuple[int, ...], boxes: list[Box]) -> None:
    """Every box inside the tensor, no two distinct boxes overlapping, every element
    covered: a sweep line over dim 0 (O(n log n) plus the pairs that share a dim-0 range,
    as DCP's validation since pytorch#166820), not a comparison of every pair."""
    vol = 0
    for o, s in boxes:
        if len(o) != len(shape) or len(s) != len(shape) or any(a + b > d for a, b, d in zip(o, s, shape)):
            raise ReshardError(f"a piece {list(o)}+{list(s)} lies outside the tensor {list(shape)}", key=key,
                               hint="the provider's offsets/global shape are wrong")
        vol += math.prod(s)
    nonempty = sorted(b for b in boxes if math.prod(b[1])) if shape else []
    active: list[tuple[int, int, Box]] = []  # heap of (dim-0 end, index, box) still open at the sweep
    for i, b in enumerate(nonempty):
        start = b[0][0]
        while active and active[0][0] <= start:
            heapq.heappop(active)
        for _end, _i, a in active:
            if _overlap(a, b):
                raise ReshardError(f"pieces {a} and {b} overlap without being equal",
                                   key=key, hint="replicated pieces must have identical boxes")
        heapq.heappush(active, (start + b[1][0], i, b))
    if vol < math.prod(shape):
        raise ReshardError(f"the pieces of all ranks cover {vol} of {math.prod(shape)} elements", key=key,
                           hint="every element of a global tensor must be held by some rank")
