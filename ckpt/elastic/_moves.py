"""The moves of a memory-tier restore, planned from holdings and needs alone (pure).

Inputs are *runs* (``(unit, lo, hi)``: shards ``lo .. hi - 1`` of one array of the step,
:mod:`ckpt._engine._needs`): what each node holds, and what each node's new ranks will
read but the node does not hold (its *lack*). Output: for every lacked shard, the node it
comes from, as moves ``(src, dst, unit, lo, hi)`` with their bytes, and the lacked
shards that no node holds (the step cannot be assembled).

A shard comes from the holder with the fewest bytes to send so far, the nearest on the
ring after the receiver breaking ties (its own node never: a node's lack excludes what it
holds). In a restore every node runs this for the units it is the *directory* of
(``unit % nodes``), with what the holders and the needers sent it; ``bench/_scale_tier.py``
runs the same function over a simulated job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Moves", "directory", "plan_moves", "split_by_directory"]

_EMPTY3 = np.zeros((0, 3), dtype=np.int64)


def directory(unit: int | np.ndarray, nnodes: int) -> int | np.ndarray:
    """The node that plans the moves of ``unit``."""
    return unit % nnodes


def split_by_directory(runs: np.ndarray, nnodes: int) -> list[np.ndarray]:
    """Runs -> one array of runs per directory node."""
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    d = directory(runs[:, 0], nnodes)
    return [runs[d == n] for n in range(nnodes)]


@dataclass
class Moves:
    """``moves``: (src, dst, unit, lo, hi) per row; ``nbytes``: each move's bytes;
    ``missing``: (dst, unit, lo, hi) lacked and held by no node."""

    moves: np.ndarray = field(default_factory=lambda: np.zeros((0, 5), dtype=np.int64))
    nbytes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    missing: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))

    def sent(self, nnodes: int) -> np.ndarray:
        return np.bincount(self.moves[:, 0], weights=self.nbytes, minlength=nnodes).astype(np.int64)

    def received(self, nnodes: int) -> np.ndarray:
        return np.bincount(self.moves[:, 1], weights=self.nbytes, minlength=nnodes).astype(np.int64)


def _expand(runs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one unit -> (run index, shard) of every shard they cover."""
    lens = runs[:, 2] - runs[:, 1]
    owner = np.repeat(np.arange(len(runs)), lens)
    start = np.repeat(runs[:, 1] - np.r_[0, np.cumsum(lens)[:-1]], lens)
    return owner, start + np.arange(int(lens.sum()), dtype=np.int64)


def plan_moves(held: Sequence[np.ndarray], lacks: Sequence[np.ndarray],
               sizes: Callable[[int], np.ndarray | None], *, sent: np.ndarray | None = None) -> Moves:
    """``held[n]`` / ``lacks[n]``: runs node ``n`` holds / lacks (only the units this
    planner is the directory of). ``sizes(unit)``: bytes of each of its shards (None:
    not known, counted as 0). ``sent``: bytes each node is already to send (updated)."""
    nnodes = len(held)
    sent = np.zeros(nnodes, dtype=np.int64) if sent is None else sent
    hold = _tagged(held)
    need = _tagged(lacks)
    moves: list[tuple[int, int, int, int, int, int]] = []
    missing: list[tuple[int, int, int, int]] = []
    for unit in np.unique(need[:, 1]).tolist():
        n_rows = need[need[:, 1] == unit]
        h_rows = hold[hold[:, 1] == unit]
        dst_of, shard = _expand(n_rows[:, 1:])
        dst = n_rows[dst_of, 0]
        wanted = np.unique(shard)
        # holders of each wanted shard: (position in ``wanted``, node), sorted by position
        h_pos: list[np.ndarray] = []
        h_node: list[np.ndarray] = []
        for node, _u, lo, hi in h_rows.tolist():
            a, b = np.searchsorted(wanted, [lo, hi])
            if b > a:
                h_pos.append(np.arange(a, b))
                h_node.append(np.full(b - a, node, dtype=np.int64))
        pos = np.concatenate(h_pos) if h_pos else np.zeros(0, np.int64)
        nodes = np.concatenate(h_node) if h_node else np.zeros(0, np.int64)
        order = np.argsort(pos, kind="stable")
        pos, nodes = pos[order], nodes[order]
        starts = np.searchsorted(pos, np.arange(len(wanted) + 1))
        holders = [nodes[starts[i]:starts[i + 1]].tolist() for i in range(len(wanted))]
        size = sizes(unit)
        sz = np.zeros(len(wanted), np.int64) if size is None else size[wanted]
        at = np.searchsorted(wanted, shard)
        for d, s, i in zip(dst.tolist(), shard.tolist(), at.tolist()):
            hs = holders[i]
            if not hs:
                missing.append((d, unit, s, s + 1))
                continue
            src = min(hs, key=lambda h: (sent[h], (h - d) % nnodes, h))
            sent[src] += sz[i]
            moves.append((src, d, unit, s, s + 1, int(sz[i])))
    return Moves(*_merge(moves), _merge_missing(missing))


def _tagged(per_node: Sequence[np.ndarray]) -> np.ndarray:
    """Runs per node -> rows (node, unit, lo, hi)."""
    parts = [np.column_stack([np.full(len(r), n, dtype=np.int64), np.asarray(r, np.int64).reshape(-1, 3)])
             for n, r in enumerate(per_node) if len(r)]
    return np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)


def _merge(moves: list[tuple[int, int, int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Moves of single shards -> runs of consecutive shards between the same nodes."""
    if not moves:
        return np.zeros((0, 5), dtype=np.int64), np.zeros(0, dtype=np.int64)
    a = np.array(sorted(moves), dtype=np.int64)
    key_change = np.any(a[1:, :3] != a[:-1, :3], axis=1) | (a[1:, 3] != a[:-1, 4])
    cut = np.r_[0, np.flatnonzero(key_change) + 1]
    end = np.r_[cut[1:], len(a)] - 1
    out = np.column_stack([a[cut, 0], a[cut, 1], a[cut, 2], a[cut, 3], a[end, 4]])
    return out, np.add.reduceat(a[:, 5], cut)


def _merge_missing(missing: list[tuple[int, int, int, int]]) -> np.ndarray:
    if not missing:
        return np.zeros((0, 4), dtype=np.int64)
    return np.array(sorted(missing), dtype=np.int64)
