"""What a load will read, found without reading: the storage objects one rank's load of
the current layout touches.

A checkpoint's objects are named here by *unit* and *shard*: a unit is one zarr array of
the manifest (a tensor's array, one piece of a "pieces" tensor, a pack) or one pickled
value, numbered in path order (:class:`Catalog`); a shard is an object of that array,
numbered in C order of its shard grid (a pack and a pickle have one). Sets of objects
travel as *runs* ``(unit, lo, hi)``: shards ``lo .. hi - 1`` of a unit, so a rank's
regular slice of every tensor is a handful of integers per tensor, whatever the world
size.

:func:`load_reads` runs the describe and schedule phase of ``ckpt.load`` (the state's
providers ask a :class:`Loader` for their boxes) and records the reads instead of doing
them; :meth:`Catalog.objects_of` turns those ``(key, box)`` reads into the shards they
touch by grid arithmetic: a rank's cost is its own boxes times the shards each touches,
never a scan of every saved object. ``zarr.json`` files are not needed: a load opens
every array from the manifest's metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckpt._engine._layout import PieceIndex, StoredArray, pickle_objects, stored_arrays
from ckpt._engine._load import Loader, LoadStats
from ckpt._engine._plan import CRC_BYTES, ArrayLayout, shard_index_bytes
from ckpt._format import Box, Manifest, check_relpath, rank_object_path
from ckpt.storage import Storage

__all__ = ["Catalog", "NeedsLoader", "load_reads", "runs_minus", "runs_of", "shards_of_runs", "shard_sizes"]


def runs_of(unit: int, shards: np.ndarray) -> np.ndarray:
    """Sorted distinct shard numbers of one unit -> runs ``(unit, lo, hi)`` (k x 3 int64)."""
    s = np.unique(np.asarray(shards, dtype=np.int64))
    if not s.size:
        return np.zeros((0, 3), dtype=np.int64)
    cut = np.flatnonzero(np.diff(s) != 1) + 1
    lo = s[np.r_[0, cut]]
    hi = s[np.r_[cut - 1, s.size - 1]] + 1
    return np.stack([np.full(lo.size, unit, dtype=np.int64), lo, hi], axis=1)


def shards_of_runs(runs: np.ndarray) -> dict[int, np.ndarray]:
    """Runs -> unit -> its sorted distinct shard numbers."""
    out: dict[int, list[np.ndarray]] = {}
    for u, lo, hi in np.asarray(runs, dtype=np.int64).reshape(-1, 3).tolist():
        out.setdefault(u, []).append(np.arange(lo, hi, dtype=np.int64))
    return {u: np.unique(np.concatenate(parts)) for u, parts in out.items()}


def runs_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Runs of the shards of ``a`` not in ``b``, merged and sorted."""
    have = shards_of_runs(b)
    parts = []
    for u, s in sorted(shards_of_runs(a).items()):
        if u in have:
            s = np.setdiff1d(s, have[u], assume_unique=True)
        if s.size:
            parts.append(runs_of(u, s))
    return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


def shard_sizes(layout: ArrayLayout, itemsize: int) -> np.ndarray:
    """Exact bytes of every shard object of an array, in C order of its shard grid (the
    closed form of :func:`~ckpt._engine._layout.shard_image`: every chunk that starts
    inside the array is stored, with its crc32c, then the index)."""
    chunk_bytes = math.prod(layout.chunk_shape) * itemsize + CRC_BYTES
    index = shard_index_bytes(layout.chunks_per_shard)
    per_dim = []
    for n, sh, c in zip(layout.shape, layout.shard_shape, layout.chunk_shape):
        starts = np.arange(0, n, sh, dtype=np.int64)
        ext = np.minimum(sh, n - starts)
        per_dim.append(-(-ext // c))  # chunks of the shard along this dim
    if not per_dim:
        return np.array([chunk_bytes + index], dtype=np.int64)
    count = per_dim[0]
    for d in per_dim[1:]:
        count = np.multiply.outer(count, d)
    return (np.asarray(count, dtype=np.int64).reshape(-1) * chunk_bytes + index).astype(np.int64)


@dataclass(frozen=True)
class _Unit:
    path: str
    kind: str  # "array" | "piece" | "pack" | "pickle" | "ranks" (the per-rank objects: one shard per rank)
    layout: ArrayLayout | None
    itemsize: int
    stored: StoredArray | None

    ranks: int = 0  # "ranks": the save's world size

    @property
    def grid(self) -> tuple[int, ...]:
        if self.kind == "ranks":
            return (self.ranks,)
        if self.layout is None or self.kind == "pack":
            return (1,)
        return tuple(-(-n // s) for n, s in zip(self.layout.shape, self.layout.shard_shape))


class Catalog:
    """The units of one manifest (O(arrays) to build): unit and shard numbers <-> object
    paths, object sizes by rule, and the shards a ``(key, box)`` read touches."""

    def __init__(self, manifest: Manifest) -> None:
        units: dict[str, _Unit] = {}
        for a in stored_arrays(manifest):
            units[a.path] = _Unit(a.path, a.kind, a.layout, a.itemsize, a)
        for _key, path in pickle_objects(manifest):
            units[path] = _Unit(path, "pickle", None, 1, None)
        if manifest.rank_objects is not None:  # format 3: per-rank values in one object per rank
            base = check_relpath(manifest.rank_objects["path"], what="per-rank object")
            units[base] = _Unit(base, "ranks", None, 1, None, manifest.world_size)
        self.paths = sorted(units)
        self.units = [units[p] for p in self.paths]
        self.number = {p: i for i, p in enumerate(self.paths)}
        self.entries = manifest.entries
        self._sizes: dict[int, np.ndarray] = {}
        self._piece_index: dict[str, PieceIndex] = {}

    def __len__(self) -> int:
        return len(self.units)

    def n_shards(self, unit: int) -> int:
        return math.prod(self.units[unit].grid)

    def object_path(self, unit: int, shard: int) -> str:
        u = self.units[unit]
        if u.kind == "ranks":
            return rank_object_path(shard, u.path)
        if u.layout is None:
            return u.path
        idx = np.unravel_index(shard, u.grid) if u.kind != "pack" else (0,)
        return f"{u.path}/{u.layout.shard_key([int(i) for i in idx])}"

    def sizes(self, unit: int) -> np.ndarray | None:
        """Exact size of each shard object of ``unit`` (None for a pickle: any size)."""
        u = self.units[unit]
        if u.layout is None or u.stored is None:
            return None
        if unit not in self._sizes:
            if u.kind == "pack":
                self._sizes[unit] = np.array([u.stored.expected_size(((0,), u.layout.shape))], dtype=np.int64)
            else:
                self._sizes[unit] = shard_sizes(u.layout, u.itemsize)
        return self._sizes[unit]

    def units_of(self, key: str) -> list[int]:
        """The units holding ``key``'s data."""
        return [i for i, u in enumerate(self.units) if u.stored is not None and key in u.stored.keys
                or u.kind == "pickle" and self.entries.get(key, {}).get("path") == u.path]

    def parse(self, rel: str) -> tuple[int, int] | None:
        """(unit, shard) of a checkpoint-relative object path; None if the manifest
        implies no such object (``zarr.json`` included)."""
        if rel in self.number and self.units[self.number[rel]].kind == "pickle":
            return self.number[rel], 0
        head, sep, key = rel, "", ""
        for _ in range(8):  # the shard key: "c.1.0" (format 2) or "c/1/0" (format 1)
            head, sep, last = head.rpartition("/")
            if not sep:
                return None
            key = f"{last}/{key}" if key else last
            unit = self.number.get(head)
            if unit is None:
                continue
            u = self.units[unit]
            if u.kind == "ranks":
                r = key[1:-5] if key.startswith("r") and key.endswith(".json") else ""
                if not r.isdigit() or int(r) >= u.ranks or rank_object_path(int(r), u.path) != rel:
                    return None
                return unit, int(r)
            if u.layout is None:
                return None
            parts = key.split(u.layout.separator)
            if parts[0] != "c" or not all(p.isdigit() for p in parts[1:]):
                return None
            idx = tuple(int(p) for p in parts[1:])
            grid = u.grid
            if len(idx) != len(grid) or any(i >= g for i, g in zip(idx, grid)):
                return None
            if u.layout.shard_key(list(idx)) != key:
                return None
            return unit, int(np.ravel_multi_index(idx, grid)) if grid else 0
        return None

    def _box_shards(self, unit: int, box: Box) -> np.ndarray:
        u = self.units[unit]
        assert u.layout is not None
        if u.kind == "pack" or not u.layout.shape:
            return np.zeros(1, dtype=np.int64)
        ranges = [np.arange(o // sh, -(-(o + s) // sh), dtype=np.int64)
                  for o, s, sh in zip(box[0], box[1], u.layout.shard_shape)]
        grids = np.meshgrid(*ranges, indexing="ij")
        return np.ravel_multi_index(tuple(g.reshape(-1) for g in grids), u.grid).astype(np.int64)

    def objects_of(self, reads: Iterable[tuple[str, Box]], pickles: Iterable[str] = (),
                   ranks: Iterable[int] = ()) -> np.ndarray:
        """Runs of every object that the reads ``(key, global box)``, the pickled values
        ``pickles`` (keys) and the per-rank values of the save's ``ranks`` touch."""
        per: dict[int, list[np.ndarray]] = {}
        for key, box in reads:
            if math.prod(box[1]) == 0:
                continue
            st = self.entries[key]["storage"]
            if st["layout"] == "array":
                unit = self.number[check_relpath(st["path"], key=key)]
                per.setdefault(unit, []).append(self._box_shards(unit, box))
            elif st["layout"] == "packed":
                per.setdefault(self.number[check_relpath(st["path"], key=key)], []).append(np.zeros(1, np.int64))
            else:
                index = self._piece_index.get(key)
                if index is None:
                    index = self._piece_index[key] = PieceIndex(st["pieces"])
                for p in index.meeting(box):  # as the loader's _piece_jobs: every piece the box overlaps
                    po, ps = p["offsets"], p["sizes"]
                    lo = [max(a, b) for a, b in zip(box[0], po)]
                    hi = [min(a + s, b + t) for a, s, b, t in zip(box[0], box[1], po, ps)]
                    if any(h <= lo_ for lo_, h in zip(lo, hi)):
                        continue
                    unit = self.number[check_relpath(p["path"], key=key)]
                    sub = (tuple(a - b for a, b in zip(lo, po)), tuple(h - lo_ for lo_, h in zip(lo, hi)))
                    per.setdefault(unit, []).append(self._box_shards(unit, sub))
        for key in pickles:
            per.setdefault(self.number[check_relpath(self.entries[key]["path"], key=key)], []).append(
                np.zeros(1, np.int64))
        rank_units = [i for i, u in enumerate(self.units) if u.kind == "ranks"]
        wanted = sorted(set(ranks))
        if rank_units and wanted:
            per.setdefault(rank_units[0], []).append(np.array(wanted, dtype=np.int64))
        parts = [runs_of(u, np.concatenate(v)) for u, v in sorted(per.items())]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)


class NeedsLoader(Loader):
    """A :class:`Loader` that records what it would read and reads nothing: ``reads``
    are the scheduled ``(key, box)``, ``pickles`` the pickled values asked for (given
    back as None: a provider's finaliser, which would use them, never runs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, Box]] = []
        self.pickles: list[str] = []
        self.ranks: set[int] = set()  # whose per-rank values were asked for

    def execute(self) -> LoadStats:
        reads, self._reads = self._reads, []
        self.reads.extend((r.key, r.box) for r in reads)
        return self.stats

    def rank_values(self, rank: int) -> Any:
        """Format 3: rank ``rank``'s object is recorded, not read; every key is there,
        with None (a value asked for only reaches a finaliser)."""
        if self.manifest.rank_objects is None:
            return super().rank_values(rank)
        if not 0 <= rank < self.manifest.world_size:
            return {}
        self.ranks.add(rank)
        return _AnyKey()

    def _unpickle(self, key: str) -> Any:
        self.entry(key)
        self._used.add(key)
        self.pickles.append(key)
        return None


class _AnyKey(dict):  # type: ignore[type-arg]
    def __contains__(self, key: object) -> bool:
        return True

    def __missing__(self, key: Any) -> None:
        return None


def load_reads(state: dict[str, Any], storage: Storage, name: str, manifest: Manifest, *,
               allow_pickle: bool = False, rank: int = 0, world_size: int = 1) -> NeedsLoader:
    """The reads ``ckpt.load(state, ...)`` would make on this rank, none made. The
    providers schedule into the live tensors, as a load does (an optimizer without state
    gets it created, which the load that follows would do anyway); their finalisers do
    not run, so ``state`` keeps its values."""
    from ckpt.providers import DescribeContext, describe

    ctx = DescribeContext(allow_pickle=allow_pickle, rank=rank, world_size=world_size)
    loader = NeedsLoader(storage, name, manifest, allow_pickle=allow_pickle, rank=rank, world_size=world_size)
    for p in describe(state, ctx):
        p.load(loader)
    loader.check_unexpected(asked={str(k) for k in state})
    loader.execute()
    return loader

