"""Sharding by rule: a global tensor split over a device mesh, derived, never gathered.

A :class:`Sharding` says how a global tensor is cut over a mesh of ranks, the way
DTensor's ``Shard``/``Replicate`` placements do: each tensor dim is split, in mesh-dim
order, by the mesh dims listed for it (``torch.chunk`` semantics: ceil-sized chunks, the
last ones shorter or empty); mesh dims that split no tensor dim replicate. From it and
the global shape every rank derives, in O(ndim + mesh dims), the box any mesh coordinate
holds, how many distinct boxes there are, the storage alignment, and which replica of a
box writes it — so a save needs no list of every rank's pieces (DESIGN.md, "Built for
16,384 ranks").

The writer of box ``g`` (its flat index in the grid of per-dim intervals) among the
``n`` replicas is replica ``(g + crc32(key)) % n``: deterministic, and spread over the
replicas across boxes and tensors.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass
from functools import reduce

import numpy as np

Box = tuple[tuple[int, ...], tuple[int, ...]]

__all__ = ["Sharding", "split", "intervals"]


def split(size: int, k: int, i: int) -> tuple[int, int]:
    """(offset, length) of chunk ``i`` of ``k`` of a dim of ``size``, as torch's
    ``Shard`` placement cuts it (``torch.chunk``: ceil-sized; empty chunks sit at the end)."""
    if size % k == 0:
        c = size // k
        return c * i, c
    c = -(-size // k)
    start = c * i
    if start >= size:
        return size, 0
    return start, min(size, start + c) - start


def intervals(size: int, ks: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of every interval of a dim of ``size`` split by the nested chunk
    counts ``ks`` (first split first), in mixed-radix order of the coordinates."""
    starts = np.zeros(1, dtype=np.int64)
    lens = np.full(1, size, dtype=np.int64)
    for k in ks:
        j = np.arange(k, dtype=np.int64)
        even = lens % k == 0
        c = np.where(even, lens // k, -(-lens // k))  # per parent interval
        off = c[:, None] * j[None, :]
        ln = np.minimum(lens[:, None], off + c[:, None]) - off
        empty = off >= lens[:, None]
        off = np.where(empty, lens[:, None], off)
        ln = np.where(empty, 0, ln)
        starts = (starts[:, None] + off).reshape(-1)
        lens = ln.reshape(-1)
    return starts, lens


@functools.lru_cache(maxsize=4096)
def _replicate_dims(n: int, dims: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    used = {m for ms in dims for m in ms}
    return tuple(m for m in range(n) if m not in used)


@dataclass(frozen=True)
class Sharding:
    """How one tensor is cut over a mesh.

    ``mesh``: the mesh's shape. ``dims``: per tensor dim, the mesh dims that split it, in
    the order they apply. ``coord``: this rank's coordinate in the mesh (not part of the
    rule: :meth:`rule` is what every rank holding the tensor agrees on)."""

    mesh: tuple[int, ...]
    dims: tuple[tuple[int, ...], ...]
    coord: tuple[int, ...]

    def rule(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        return self.mesh, self.dims

    @property
    def replicate_dims(self) -> tuple[int, ...]:
        return _replicate_dims(len(self.mesh), self.dims)

    @property
    def replicas(self) -> int:
        """How many ranks hold each box."""
        return math.prod(self.mesh[m] for m in _replicate_dims(len(self.mesh), self.dims))

    @property
    def holders(self) -> int:
        """How many ranks hold some box (every mesh coordinate; boxes may be empty)."""
        return math.prod(self.mesh)

    def grid(self) -> tuple[int, ...]:
        """Intervals per tensor dim (empty ones included)."""
        return tuple(math.prod(self.mesh[m] for m in ms) for ms in self.dims)

    def grid_index(self, coord: tuple[int, ...] | None = None) -> tuple[int, ...]:
        c = self.coord if coord is None else coord
        out = []
        for ms in self.dims:
            i = 0
            for m in ms:
                i = i * self.mesh[m] + c[m]
            out.append(i)
        return tuple(out)

    def box(self, shape: tuple[int, ...], coord: tuple[int, ...] | None = None) -> Box:
        """The box mesh coordinate ``coord`` (default: this rank's) holds."""
        c = self.coord if coord is None else coord
        offs, sizes = [], []
        for n, ms in zip(shape, self.dims):
            o, s = 0, n
            for m in ms:
                lo, s = split(s, self.mesh[m], c[m])
                o += lo
            offs.append(o)
            sizes.append(s)
        return tuple(offs), tuple(sizes)

    def flat_box_index(self, coord: tuple[int, ...] | None = None) -> int:
        g = 0
        for i, n in zip(self.grid_index(coord), self.grid()):
            g = g * n + i
        return g

    def replica_index(self, coord: tuple[int, ...] | None = None) -> int:
        c = self.coord if coord is None else coord
        r = 0
        for m in self.replicate_dims:
            r = r * self.mesh[m] + c[m]
        return r

    def writes(self, key: str) -> bool:
        """Whether this rank is the one replica of its box that writes it."""
        n = self.replicas
        return n == 1 or (self.flat_box_index() + zlib.crc32(key.encode())) % n == self.replica_index()

    def is_lead(self) -> bool:
        """The rank at coordinate zero: it reports the tensor to the coordinator."""
        return not any(self.coord)

    def dim_intervals(self, shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [intervals(n, tuple(self.mesh[m] for m in ms)) for n, ms in zip(shape, self.dims)]

    def alignment(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """(per dim, the gcd of every interior box boundary — the dim size if none; the
        number of distinct non-empty boxes). O(ndim) for one split per dim, vectorised
        over the intervals where a dim is split by several mesh dims."""
        align, count = [], 1
        for n, ms in zip(shape, self.dims):
            ks = tuple(self.mesh[m] for m in ms)
            if not ks or math.prod(ks) == 1:
                align.append(n if n else 1)
                continue
            if len(ks) == 1:
                k = ks[0]
                c = n // k if n % k == 0 else -(-n // k)
                nonempty = -(-n // c) if c else 0
                align.append(c if nonempty > 1 else (n if n else 1))
                count *= nonempty
                continue
            starts, lens = intervals(n, ks)
            cuts = np.unique(np.concatenate([starts, starts + lens]))
            cuts = cuts[(cuts > 0) & (cuts < n)]
            align.append(int(reduce(math.gcd, cuts.tolist(), n)) if n else 1)
            count *= int(np.count_nonzero(lens))
        return tuple(align), (count if math.prod(shape) else 0)

    def boxes(self, shape: tuple[int, ...]) -> list[tuple[int, Box]]:
        """Every distinct non-empty box with its flat grid index (O(boxes): for the rare
        layouts stored box by box, and for tools)."""
        import itertools

        per_dim = [[(int(s), int(ln), i) for i, (s, ln) in enumerate(zip(st, lens)) if ln > 0]
                   for st, lens in self.dim_intervals(shape)]
        grid = self.grid()
        out = []
        for combo in itertools.product(*per_dim):
            g = 0
            for (_s, _l, i), n in zip(combo, grid):
                g = g * n + i
            out.append((g, (tuple(c[0] for c in combo), tuple(c[1] for c in combo))))
        return out
