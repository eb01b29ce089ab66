"""The per-rank save planner (ckpt/_engine/_saveplan.py) driven for every rank of small
worlds through its phases, as the side group's collectives would run them; and the
sharding rule against torch's own placement arithmetic."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import pytest

from ckpt._engine._globalplan import PieceMeta, _check_tiling
from ckpt._engine._options import SaveOptions
from ckpt._engine._saveplan import LocalPieces, RankPlan, coordinate
from ckpt._sharding import Sharding
from ckpt.errors import ReshardError

CFG = SaveOptions(pool_bytes=1 << 30, max_shard_bytes=1 << 20).plan_config()


def _torch_box(shape: tuple[int, ...], mesh: tuple[int, ...], coord: tuple[int, ...],
               placements: tuple[int | None, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    pl = [Replicate() if d is None else Shard(d) for d in placements]
    size, offs = _compute_local_shape_and_global_offset(shape, mesh, list(coord), pl)
    return tuple(int(o) for o in offs), tuple(int(s) for s in size)


def _rule(shape: tuple[int, ...], mesh: tuple[int, ...], placements: tuple[int | None, ...],
          coord: tuple[int, ...]) -> Sharding:
    dims: list[list[int]] = [[] for _ in shape]
    for m, d in enumerate(placements):
        if d is not None:
            dims[d].append(m)
    return Sharding(mesh, tuple(tuple(d) for d in dims), coord)


@pytest.mark.parametrize("shape,mesh,placements", [
    ((10, 7), (4,), (0,)), ((3, 5), (4,), (0,)), ((10, 7), (2, 3), (0, 1)), ((17, 9), (2, 3), (0, 0)),
    ((11, 13), (3, 2), (None, 0)), ((8,), (2, 2, 2), (0, None, 0)), ((5, 6, 7), (2, 2), (2, 1)),
])
def test_rule_boxes_are_torchs(shape: tuple[int, ...], mesh: tuple[int, ...],
                               placements: tuple[int | None, ...]) -> None:
    """Every mesh coordinate's box is what DTensor itself computes (uneven and nested
    splits, empty trailing shards), and the distinct non-empty boxes tile the tensor."""
    boxes = set()
    for coord in itertools.product(*(range(m) for m in mesh)):
        sh = _rule(shape, mesh, placements, coord)
        want = _torch_box(shape, mesh, coord, placements)
        got = sh.box(shape)
        assert got[1] == want[1] and (not math.prod(got[1]) or got[0] == want[0]), (coord, got, want)
        if math.prod(got[1]):
            boxes.add(got)
    derived = {b for _g, b in _rule(shape, mesh, placements, (0,) * len(mesh)).boxes(shape)}
    assert derived == boxes
    _check_tiling("t", shape, sorted(boxes))
    assert _rule(shape, mesh, placements, (0,) * len(mesh)).alignment(shape)[1] == len(boxes)


def test_sweep_line_finds_overlaps_and_gaps() -> None:
    rng = random.Random(3)
    for _ in range(200):  # random guillotine tilings pass; a moved box is caught
        boxes = [((0, 0), (rng.randint(2, 30), rng.randint(2, 30)))]
        shape = boxes[0][1]
        for _ in range(rng.randint(1, 12)):
            i = rng.randrange(len(boxes))
            (o, s) = boxes[i]
            d = rng.randrange(2)
            if s[d] < 2:
                continue
            cut = rng.randint(1, s[d] - 1)
            boxes[i:i + 1] = [(o, s[:d] + (cut,) + s[d + 1:]),
                              (o[:d] + (o[d] + cut,) + o[d + 1:], s[:d] + (s[d] - cut,) + s[d + 1:])]
        _check_tiling("t", shape, sorted(boxes))
        if len(boxes) > 1:
            j = rng.randrange(len(boxes))
            o, s = boxes[j]
            grown = (o, (min(shape[0] - o[0], s[0] + 1), s[1])) if o[0] + s[0] < shape[0] else \
                ((o[0] - 1, o[1]), (s[0] + 1, s[1])) if o[0] > 0 else None
            if grown is not None:
                with pytest.raises(ReshardError, match="overlap"):
                    _check_tiling("t", shape, sorted(boxes[:j] + [grown] + boxes[j + 1:]))
            with pytest.raises(ReshardError, match="cover"):
                _check_tiling("t", shape, sorted(boxes[:j] + boxes[j + 1:]))


def _world_pieces(world: int, mesh: tuple[int, ...], tensors: dict[str, tuple[tuple[int, ...], tuple[int | None, ...]]],
                  plain: dict[str, tuple[int, ...]], coord_of: Any) -> list[list[tuple[PieceMeta, Sharding | None, bool]]]:
    out = []
    for r in range(world):
        pieces: list[tuple[PieceMeta, Sharding | None, bool]] = []
        for key, (shape, pl) in tensors.items():
            sh = _rule(shape, mesh, pl, coord_of(r))
            o, s = sh.box(shape)
            pieces.append((PieceMeta(key, "float32", shape, o, s), sh, False))
        for key, shape in plain.items():
            pieces.append((PieceMeta(key, "float32", shape, (0,) * len(shape), shape), None, True))
        out.append(pieces)
    return out


def _plan_world(held: list[list[tuple[PieceMeta, Sharding | None, bool]]], rank_keys: list[str] | None = None,
                cached: list[tuple[Any, RankPlan]] | None = None) -> tuple[list[RankPlan], list[LocalPieces], bool]:
    """Every rank through the phases, the collectives done by hand."""
    world = len(held)
    local = [LocalPieces(held[r], rank_keys or [], rank=r, world=world, cfg=CFG,
                         cached=cached[r] if cached else None) for r in range(world)]
    contrib = [lp.contribution() for lp in local]
    total = [sum(c[i] for c in contrib) for i in range(len(contrib[0]))]
    reused = [lp.reusable(total) for lp in local]
    if all(p is not None for p in reused):
        return [p for p in reused if p is not None], local, True
    payloads = [(r, p) for r, lp in enumerate(local) if (p := lp.payload(total)) is not None]
    outcome, per_rank, entries = coordinate(local[0], total, payloads)
    if outcome.get("error") is not None:
        raise outcome["error"]
    plans = [lp.finish(total, outcome, per_rank.get(r), entries if r == 0 else None) for r, lp in enumerate(local)]
    return plans, local, False


def test_hsdp_every_box_written_once_by_a_spread_of_replicas() -> None:
    world, mesh = 8, (2, 4)  # 2 replicas x 4 shards
    tensors = {f"w{i}": ((40 + i, 300), (None, 0)) for i in range(6)}
    held = _world_pieces(world, mesh, tensors, {"bias": (7,), "big": (300, 300)}, lambda r: (r // 4, r % 4))
    plans, local, reused = _plan_world(held)
    assert not reused
    written: dict[tuple[str, Any], int] = {}
    for r, p in enumerate(plans):
        for a in p.assignments:
            assert (a.key, a.box) not in written, f"{a.key} {a.box} written by ranks {written[(a.key, a.box)]} and {r}"
            written[(a.key, a.box)] = r
    for key, (shape, _pl) in tensors.items():
        boxes = {b for (k, b) in written if k == key}
        assert len(boxes) == 4 and sum(math.prod(b[1]) for b in boxes) == math.prod(shape)
    assert {(k, b) for k, b in written if k in ("bias", "big")} == {("bias", ((0,), (7,))), ("big", ((0, 0), (300, 300)))}
    replica_writers = {written[(k, b)] // 4 for k, b in written if k.startswith("w")}
    assert replica_writers == {0, 1}  # both replicas write: the rule spreads the bytes
    entries = plans[0].entries
    assert entries is not None and "boxes" not in entries["w0"]
    assert entries["w0"]["sharding"] == {"mesh": [2, 4], "dims": [[1], []]}
    assert entries["bias"]["storage"]["layout"] == "packed"
    # the manifest's entries are the same size at 8 ranks as at 512: nothing per rank
    held512 = _world_pieces(512, (2, 256), {"w": ((4096, 64), (None, 0))}, {}, lambda r: (r // 256, r % 256))
    plans512, _, _ = _plan_world(held512[:1] + held512[1:])
    assert set(plans512[0].entries["w"]) == {"kind", "dtype", "shape", "sharding", "storage"}


def test_cached_plan_is_reused_only_when_every_rank_is_unchanged() -> None:
    tensors = {"w": ((64, 8), (0,))}
    held = _world_pieces(4, (4,), tensors, {"b": (3,)}, lambda r: (r,))
    plans, local, _ = _plan_world(held, ["rng"])
    cache = [(lp.structure, p) for lp, p in zip(local, plans)]
    again, _, reused = _plan_world(held, ["rng"], cached=cache)
    assert reused and all(a is p for a, p in zip(again, plans))
    changed = [list(h) for h in held]
    changed[2].append((PieceMeta("extra", "float32", (2,), (0,), (2,)), None, True))  # rank 2 alone changed
    replanned, _, reused2 = _plan_world(changed, ["rng"], cached=cache)
    assert not reused2  # every rank plans again, not only rank 2
    assert [a.key for a in replanned[2].assignments if a.key == "extra"] == ["extra"]
    assert replanned[0].entries is not None and "extra" in replanned[0].entries


def test_a_rank_that_disagrees_about_a_sharding_is_caught_by_the_digest() -> None:
    tensors = {"w": ((64, 8), (0,))}
    held = _world_pieces(4, (4,), tensors, {}, lambda r: (r,))
    meta, sh, w = held[3][0]
    held[3][0] = (PieceMeta("w", "float32", (64, 9), meta.offsets, (meta.sizes[0], 9)),
                  Sharding(sh.mesh, sh.dims, sh.coord), w)  # rank 3 thinks the tensor is 64x9
    with pytest.raises(ReshardError, match="disagree"):
        _plan_world(held)


def test_plain_tensors_that_not_every_rank_holds_go_to_the_coordinator() -> None:
    held = _world_pieces(3, (3,), {}, {"shared": (5,)}, lambda r: (r,))
    held[1].append((PieceMeta("only1", "float32", (4, 4), (0, 0), (4, 4)), None, True))  # a pipeline stage's own
    plans, _local, _ = _plan_world(held)
    writers = {a.key: r for r, p in enumerate(plans) for a in p.assignments}
    assert writers["only1"] == 1 and "shared" in writers
    entries = plans[0].entries
    assert entries is not None and entries["only1"]["boxes"][0]["rank"] == 1
