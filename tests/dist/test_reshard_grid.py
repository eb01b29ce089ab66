"""The resharding grid: save on W ranks, load on M ranks, every layout into every layout.

For each save world size W in 1..4 (one launch each), known global tensors (several
dtypes, bfloat16 included, dims that do and do not divide W) are saved in one
checkpoint under every layout: DTensor Shard(0), Shard(1), Replicate on a 1-D mesh,
(Shard(0), Shard(1)) and (Replicate, Shard(0)) on a 2x2 mesh when W == 4, a plain tensor
on every rank (DDP-like) and a user provider that declares irregular boxes (so the
"pieces" layout is used). For each load world size M in 1..4 (one launch each), every
saved tensor of every checkpoint is loaded into every target layout, and each local
shard is compared bit for bit with the known global tensor.

A Hypothesis test (one 3-rank launch) draws random shapes, random box splits on save
(with replicas and idle ranks) and random many-box reads on load.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests._boxes import entry_boxes
from tests._helpers import same_bits
from tests.dist._launch import launch

pytestmark = pytest.mark.slow

Box = tuple[tuple[int, ...], tuple[int, ...]]

# name -> (shape, dtype). Dims chosen so that some divide every W and some divide none.
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "f32": ((12, 8), torch.float32),        # Shard(1) uneven for W=3
    "bf16": ((10, 6), torch.bfloat16),      # Shard(0) uneven for W=3, 4
    "i64": ((7, 5), torch.int64),           # uneven for every W > 1
    "f16": ((3,), torch.float16),           # 1-D, fewer rows than ranks for W=4 (an empty shard)
    "f64": ((4, 6, 5), torch.float64),      # 3-D
    "bool": ((5, 9), torch.bool),
    "irr": ((11, 13), torch.int32),         # user boxes cut it with gcd 1: the "pieces" layout
    "big": ((300, 260), torch.float32),     # > pack threshold: a multi-shard array even when replicated
}


def global_tensor(name: str) -> torch.Tensor:
    shape, dtype = TENSORS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return (torch.randperm(n, generator=gen) - n // 3).to(dtype).reshape(shape)


def layouts(world: int) -> list[str]:
    out = ["plain", "shard0", "shard1", "rep", "user"]
    if world == 4:
        out += ["s0s1", "rs0"]
    return out


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(*box))


# -- a user provider that declares its own boxes ------------------------------------------
class UserBoxes:
    """A provider object placed directly in the state: on save it yields this rank's
    pieces as TensorItems with explicit global shape and offsets; on load it reads each of
    its (possibly many, possibly overlapping) boxes into its own tensor."""

    def __init__(self, key: str, global_shape: tuple[int, ...], pieces: list[tuple[Box, torch.Tensor]]) -> None:
        self.key = key
        self.global_shape = tuple(global_shape)
        self.pieces = pieces

    def items(self) -> Iterator[Any]:
        from ckpt.providers import TensorItem

        for (offs, _sizes), t in self.pieces:
            yield TensorItem(self.key, t, self.global_shape, offs)

    def load(self, src: Any) -> None:
        for (offs, _sizes), t in self.pieces:
            src.read_into(self.key, t, offs, global_shape=self.global_shape)
        return None


def split_boxes(shape: tuple[int, ...], n: int, rng: random.Random) -> list[Box]:
    """Up to ``n`` boxes tiling ``shape``, by guillotine cuts at irregular positions."""
    boxes: list[Box] = [((0,) * len(shape), tuple(shape))]
    while len(boxes) < n:
        cands = [(i, d) for i, (_o, s) in enumerate(boxes) for d in range(len(shape)) if s[d] >= 2]
        if not cands:
            break
        i, d = rng.choice(cands)
        o, s = boxes.pop(i)
        cut = rng.randint(1, s[d] - 1)
        a = (o, s[:d] + (cut,) + s[d + 1:])
        b = (o[:d] + (o[d] + cut,) + o[d + 1:], s[:d] + (s[d] - cut,) + s[d + 1:])
        boxes += [a, b]
    return sorted(boxes)


def user_save_boxes(name: str, shape: tuple[int, ...], world: int) -> list[Box]:
    """Each rank's box (one per rank; fewer distinct boxes than ranks makes replicas)."""
    if name == "irr" and world >= 3:
        # cuts at row 1 (or rows 3 and 10: gcd 1) and column 5, so aligned shards would
        # be 1x5 elements, far more shards than boxes: each box is stored as its own piece
        if world == 3:
            return [((0, 0), (1, 13)), ((1, 0), (10, 5)), ((1, 5), (10, 8))]
        return [((0, 0), (3, 13)), ((3, 0), (7, 5)), ((3, 5), (7, 8)), ((10, 0), (1, 13))]
    rng = random.Random(f"save-{name}-{world}")
    distinct = split_boxes(shape, world if world < 4 else 3, rng)
    return [distinct[r % len(distinct)] for r in range(world)]


def user_load_boxes(name: str, shape: tuple[int, ...], world: int, rank: int) -> list[Box]:
    """Many boxes per rank: this rank's cells of a random grid plus one random box."""
    rng = random.Random(f"load-{name}-{world}")
    cuts = []
    for n in shape:
        inner = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 2)))) if n > 1 else []
        cuts.append([0, *inner, n])
    cells = []
    for idx in itertools.product(*(range(len(c) - 1) for c in cuts)):
        cells.append((tuple(cuts[d][i] for d, i in enumerate(idx)),
                      tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(idx))))
    mine = [c for i, c in enumerate(cells) if i % world == rank]
    o = tuple(rng.randrange(n) for n in shape)
    extra = (o, tuple(rng.randint(1, n - a) for a, n in zip(o, shape)))
    return [*mine, extra]


# -- building states -------------------------------------------------------------------------
class Meshes:
    def __init__(self, world: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.world = world
        self.flat = init_device_mesh("cpu", (world,))
        self.grid = init_device_mesh("cpu", (2, 2)) if world == 4 else None


def placements_of(layout: str, ndim: int) -> tuple[str, tuple[Any, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    d1 = min(1, ndim - 1)
    return {
        "shard0": ("flat", (Shard(0),)),
        "shard1": ("flat", (Shard(d1),)),
        "rep": ("flat", (Replicate(),)),
        "s0s1": ("grid", (Shard(0), Shard(d1))),
        "rs0": ("grid", (Replicate(), Shard(0))),
    }[layout]


def build(name: str, layout: str, meshes: Meshes, *, zeros: bool, key: str) -> Any:
    """The object of the state for tensor ``name`` in ``layout`` (with data, or zeros)."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    g = global_tensor(name)
    src = torch.zeros_like(g) if zeros else g
    rank = dist.get_rank()
    if layout == "plain":
        return src.clone()
    if layout == "user":
        if zeros:
            boxes = user_load_boxes(name, g.shape, meshes.world, rank)
        else:
            boxes = [user_save_boxes(name, g.shape, meshes.world)[rank]]
        return UserBoxes(key, tuple(g.shape), [(b, src[box_slices(b)].clone()) for b in boxes])
    mesh_name, pl = placements_of(layout, g.dim())
    mesh = meshes.flat if mesh_name == "flat" else meshes.grid
    # src_data_rank=None: every rank cuts its shard from its own copy (no communication),
    # by torch's own splitting rules (independent of the offsets ckpt computes).
    return distribute_tensor(src, mesh, pl, src_data_rank=None)


def expected_and_actual(name: str, layout: str, obj: Any, meshes: Meshes) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    from torch.distributed.tensor import distribute_tensor

    g = global_tensor(name)
    if layout == "plain":
        yield "full", g, obj
    elif layout == "user":
        for b, t in obj.pieces:
            yield f"box {b}", g[box_slices(b)], t
    else:
        mesh_name, pl = placements_of(layout, g.dim())
        mesh = meshes.flat if mesh_name == "flat" else meshes.grid
        want = distribute_tensor(g, mesh, pl, src_data_rank=None).to_local()
        yield "local shard", want, obj.to_local()


# -- workers (run on every rank) -------------------------------------------------------------
def save_worker(root: str, world: int) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    meshes = Meshes(world)
    state: dict[str, Any] = {}
    for name in TENSORS:
        for layout in layouts(world):
            key = f"{name}.{layout}"
            state[key] = build(name, layout, meshes, zeros=False, key=key)
    stats = ckpt.save(state, f"{root}/w{world}")
    out: dict[str, Any] = {"bytes": stats.bytes, "keys": sorted(state)}
    if dist.get_rank() == 0:
        m = ckpt.read_manifest(f"{root}/w{world}")
        out["manifest"] = {"world_size": m.world_size, "layout": m.layout, "entries": m.entries}
    return out


def load_worker(root: str, world: int, saved: dict[int, list[str]]) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    meshes = Meshes(world)
    rank = dist.get_rank()
    bad: list[str] = []
    loads = 0
    for save_world, keys in sorted(saved.items()):
        url = f"{root}/w{save_world}"
        for target in layouts(world):
            state = {key: build(key.split(".")[0], target, meshes, zeros=True, key=key) for key in keys}
            stats = ckpt.load(state, url)
            loads += 1
            need = 0
            for key, obj in state.items():
                name = key.split(".")[0]
                for what, want, got in expected_and_actual(name, target, obj, meshes):
                    need += want.numel() * want.element_size()
                    if not same_bits(want, got):
                        bad.append(f"W={save_world} {key} -> {target} on rank {rank}/{world}: {what} differs")
            if stats.bytes_read != need:
                bad.append(f"W={save_world} -> {target}: read {stats.bytes_read} bytes, needed {need}")
    return {"bad": bad, "loads": loads}


# -- the tests -------------------------------------------------------------------------------
WORLDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Saves run lazily, once per W, shared by the save and load tests."""
    return {"root": str(tmp_path_factory.mktemp("grid")), "saves": {}}


def saved(grid: dict[str, Any], world: int) -> list[dict[str, Any]]:
    if world not in grid["saves"]:
        grid["saves"][world] = None  # a failed save is not retried
        grid["saves"][world] = launch(save_worker, world, grid["root"], world, timeout=120)
    res = grid["saves"][world]
    if res is None:
        pytest.fail(f"the save on {world} ranks failed (see the first failure)")
    return res


@pytest.mark.parametrize("world", WORLDS)
def test_save_grid(grid: dict[str, Any], world: int) -> None:
    res = saved(grid, world)
    m = res[0]["manifest"]
    assert m["world_size"] == world
    entries = m["entries"]
    keys = res[0]["keys"]
    assert sorted(k for k, e in entries.items() if e["kind"] == "tensor") == keys
    per_rank = [out["bytes"] for out in res]  # what each rank wrote (SaveStats.bytes)
    total = packed = 0
    for key in keys:
        e = entries[key]
        name, layout = key.split(".")
        g = global_tensor(name)
        assert e["shape"] == list(g.shape), key
        boxes = entry_boxes(e)
        covered = sum(math.prod(s) for _o, s in boxes)
        assert covered == g.numel(), f"{key}: boxes cover {covered} of {g.numel()} elements (replicas written twice?)"
        total += covered * g.element_size()
        packed += e["storage"]["layout"] == "packed"
        if layout in ("plain", "rep"):
            assert len(boxes) == 1, f"{key}: a replicated tensor must be written once"
    # every tensor written once (packs round each member up to 64 bytes)
    assert total <= sum(per_rank) <= total + 64 * packed, (per_rank, total)
    assert m["layout"]["bytes"] == sum(per_rank)
    if world > 1:
        # replicated tensors are spread over the ranks, not all written by rank 0
        assert all(per_rank), f"some rank wrote nothing: {per_rank}"
    if world >= 3:
        assert entries["irr.user"]["storage"]["layout"] == "pieces", entries["irr.user"]["storage"]


@pytest.mark.parametrize("world", WORLDS)
def test_load_grid(grid: dict[str, Any], world: int) -> None:
    keys = {w: saved(grid, w)[0]["keys"] for w in WORLDS}
    res = launch(load_worker, world, grid["root"], world, keys, timeout=150)
    bad = [b for r in res for b in r["bad"]]
    assert not bad, f"{len(bad)} mismatches:\n" + "\n".join(bad[:40])
    assert all(r["loads"] == len(WORLDS) * len(layouts(world)) for r in res)


# -- Hypothesis: random shapes, random save boxes, random load boxes --------------------------
def hypothesis_worker(root: str, max_examples: int) -> int:
    import torch.distributed as dist
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import ckpt

    rank, world = dist.get_rank(), dist.get_world_size()
    dtypes = [torch.float32, torch.bfloat16, torch.int16, torch.uint8, torch.float64, torch.bool]
    counter = [0]

    @st.composite
    def cases(draw: Any) -> dict[str, Any]:
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(dtypes))
        seed = draw(st.integers(0, 2**16))
        n_boxes = draw(st.integers(1, world))
        # ranks perm[:n] hold the n distinct boxes; the others a replica of one (extra >= 0)
        # or nothing (-1)
        perm = draw(st.permutations(range(world)))
        extra = draw(st.lists(st.integers(-1, world - 1), min_size=world, max_size=world))
        load_seed = draw(st.integers(0, 2**16))
        return {"shape": shape, "dtype": dtype, "seed": seed, "n_boxes": n_boxes, "perm": perm,
                "extra": extra, "load_seed": load_seed}

    # derandomize: every rank draws the same examples in the same order (the save is
    # collective); a failure on any rank fails every rank, so shrinking stays in lockstep.
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(cases())
    def check(case: dict[str, Any]) -> None:
        counter[0] += 1
        err: BaseException | None = None
        try:
            _hyp_example(case, f"{root}/ex{counter[0]:04d}", rank, world, ckpt)
        except BaseException as e:  # noqa: BLE001 - reported collectively below
            err = e
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, None if err is None else repr(err))
        if err is not None:
            raise err
        failed = {r: f for r, f in enumerate(flags) if f is not None}
        assert not failed, f"failed on other ranks: {failed}"

    check()
    return counter[0]


def _hyp_example(case: dict[str, Any], url: str, rank: int, world: int, ckpt: Any) -> None:
    shape, dtype = case["shape"], case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    if dtype == torch.bool:
        g = torch.randint(0, 2, shape, generator=gen).bool()
    elif dtype.is_floating_point:
        g = torch.randn(shape, generator=gen).to(dtype)
    else:
        g = torch.randint(0, 250, shape, generator=gen).to(dtype)
    boxes = split_boxes(shape, case["n_boxes"], random.Random(case["seed"]))
    owners = [-1] * world
    for j, r in enumerate(case["perm"]):
        e = case["extra"][j]
        owners[r] = j if j < len(boxes) else (e % len(boxes) if e >= 0 else -1)
    mine = [] if owners[rank] < 0 else [(boxes[owners[rank]], g[box_slices(boxes[owners[rank]])].clone())]
    ckpt.save({"t": UserBoxes("t", shape, mine)}, url)

    rng = random.Random(case["load_seed"] * 31 + rank)
    want: list[Box] = split_boxes(shape, rng.randint(1, 6), rng) if shape else [((), ())]
    want = [b for b in want if rng.random() < 0.7] or want[:1]
    dests = UserBoxes("t", shape, [(b, torch.zeros(b[1], dtype=dtype)) for b in want])
    ckpt.load({"t": dests}, url)
    for b, t in dests.pieces:
        assert same_bits(g[box_slices(b)], t), f"box {b} of {shape} {dtype} differs (saved as {boxes}, owners {owners})"


def test_hypothesis_random_boxes(tmp_path: Any) -> None:
    n = launch(hypothesis_worker, 3, str(tmp_path), 25, timeout=150)
    assert n[0] >= 25
