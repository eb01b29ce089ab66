"""The restore's planning parts without processes: object sizes by rule, the shards a
read touches, and the moves planned from holdings and lacks."""

from __future__ import annotations

import itertools

import numpy as np

from ckpt._engine._layout import shard_image
from ckpt._engine._needs import Catalog, runs_minus, runs_of, shard_sizes
from ckpt._engine._plan import ArrayLayout
from ckpt._format import Manifest
from ckpt.elastic._moves import plan_moves


def test_shard_sizes_match_the_written_objects():
    for shape, shard, chunk in [((10, 6), (4, 6), (2, 3)), ((7,), (4,), (2,)), ((5, 5, 3), (2, 5, 3), (1, 5, 1))]:
        lay = ArrayLayout("a", shape, shard, chunk)
        grid = [-(-n // s) for n, s in zip(shape, shard)]
        want = []
        for idx in itertools.product(*(range(g) for g in grid)):
            offs = tuple(i * s for i, s in zip(idx, shard))
            ext = tuple(min(s, n - o) for s, n, o in zip(shard, shape, offs))
            want.append(shard_image("a", lay, (offs, ext), 4).nbytes)
        assert shard_sizes(lay, 4).tolist() == want


def _catalog() -> Catalog:
    entries = {"w": {"kind": "tensor", "dtype": "float32", "shape": [10, 6],
                     "storage": {"layout": "array", "path": "arrays/w.zarr", "shard_shape": [2, 3],
                                 "chunk_shape": [1, 3]}}}
    return Catalog(Manifest(step=0, entries=entries))


def test_a_box_touches_the_shards_it_overlaps_and_paths_round_trip():
    cat = _catalog()
    runs = cat.objects_of([("w", ((3, 2), (4, 2)))])  # rows 3..6, cols 2..3: shard rows 1..3, cols 0..1
    assert runs.tolist() == [[0, 2, 8]]
    for s in range(cat.n_shards(0)):
        assert cat.parse(cat.object_path(0, s)) == (0, s)
    assert cat.parse("arrays/w.zarr/zarr.json") is None and cat.parse("arrays/w.zarr/c.9.0") is None


def test_moves_come_from_a_holder_spread_over_holders_and_missing_is_named():
    sizes = np.full(8, 100, dtype=np.int64)
    held = [runs_of(0, np.array([0, 1, 2, 3])), runs_of(0, np.array([2, 3, 4, 5])), runs_of(0, np.array([4, 5]))]
    need = [runs_of(0, np.array([4, 5, 6])), runs_of(0, np.array([2, 3])), runs_of(0, np.arange(6))]
    lacks = [runs_minus(n, h) for n, h in zip(need, held)]
    mv = plan_moves(held, lacks, lambda u: sizes)
    got = {(s, d, lo, hi) for s, d, _u, lo, hi in mv.moves.tolist()}
    # node 0 gets 4, 5 from nodes 1/2 (spread); node 2 gets 0..3 from nodes 0/1 (spread)
    assert {d for _s, d, _lo, _hi in got} == {0, 2}
    assert all(s != d for s, d, _lo, _hi in got)
    assert mv.received(3).tolist() == [200, 0, 400] and sorted(mv.sent(3).tolist()) == [100, 200, 300]
    assert mv.missing.tolist() == [[0, 0, 6, 7]]  # shard 6 is held by no node


def test_per_rank_objects_are_one_unit_with_a_shard_per_rank():
    from ckpt._format import rank_object_path

    m = Manifest(step=0, entries={}, world_size=5, rank_objects={"path": "ranks"})
    cat = Catalog(m)
    (unit,) = [u for u in range(len(cat)) if cat.n_shards(u) == 5]
    assert cat.object_path(unit, 3) == rank_object_path(3, "ranks")
    assert cat.parse(rank_object_path(3, "ranks")) == (unit, 3) and cat.parse(rank_object_path(7, "ranks")) is None
    assert cat.objects_of([], ranks=[0, 2, 2]).tolist() == [[unit, 0, 1], [unit, 2, 3]]
