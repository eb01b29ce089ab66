"""Distributed saves on real gloo process groups: who writes what, failures, async commits.

One 4-rank launch runs every save scenario and returns what each rank observed; the
tests below check those observations (and the files on disk). A 2-rank launch then loads
a 4-rank checkpoint resharded and measures what each rank read.

(a) replicated pieces are written once, spread over the ranks;
(b) no two ranks write the same storage object (every shard object lies in exactly one
    writer box, and every rank wrote exactly the bytes the plan gave it);
(c) a rank failing mid-save (its provider raises, or its storage fails) means no commit
    and an error from every rank's handle, and the previous checkpoint still loads;
(d) a resharded load (4 -> 2 ranks) reads about what each rank needs, not whole tensors;
(e) save_async commits over the side gloo group while the training thread keeps running
    collectives on the default group (also when that group is passed as ``process_group``);
(f) saves on sub-groups (``process_group=``) of the job.
"""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._boxes import entry_boxes
from tests.dist._launch import launch
from tests.dist.test_reshard_grid import UserBoxes, same_bits

pytestmark = pytest.mark.slow

WORLD = 4
SHARD_BYTES = 1 << 20  # small shards so a writer box holds several storage objects


def _g(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


# replicated (DDP-like) tensors: every rank holds them whole
REPLICATED = {f"rep{i}": ((n, 256), torch.float32) for i, n in enumerate([900, 700, 520, 400, 300, 260, 20, 3])}
# sharded DTensors: name -> (shape, dtype, mesh, placements)
SHARDED = {
    "s0": ((2000, 600), torch.float32, "flat", "S0"),       # 1.2 MB boxes -> 2 shard objects each
    "s0u": ((1001, 300), torch.float32, "flat", "S0"),      # uneven rows: cuts with gcd 1 -> "pieces"
    "s1": ((64, 4100), torch.bfloat16, "flat", "S1"),       # column boxes
    "grid": ((1100, 1000), torch.float32, "grid", "S0S1"),  # 2x2 boxes of 2.2 MB
    "rs0": ((1000, 500), torch.float32, "grid", "RS0"),     # two boxes, each held by two ranks
    "dtrep": ((300, 300), torch.float32, "flat", "R"),      # a replicated DTensor
}


def _placements(code: str) -> tuple[Any, ...]:
    from torch.distributed.tensor import Replicate, Shard

    return {"S0": (Shard(0),), "S1": (Shard(1),), "R": (Replicate(),), "S0S1": (Shard(0), Shard(1)),
            "RS0": (Replicate(), Shard(0))}[code]


def _sharded_state(meshes: dict[str, Any], *, zeros: bool = False) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    state: dict[str, Any] = {}
    for i, (name, (shape, dtype)) in enumerate(REPLICATED.items()):
        g = _g(shape, dtype, i)
        state[name] = torch.zeros_like(g) if zeros else g
    for i, (name, (shape, dtype, mesh, code)) in enumerate(SHARDED.items()):
        g = _g(shape, dtype, 100 + i)
        state[name] = distribute_tensor(torch.zeros_like(g) if zeros else g, meshes[mesh], _placements(code),
                                        src_data_rank=None)
    return state


def _check_state(state: dict[str, Any]) -> list[str]:
    bad = []
    for i, (name, (shape, dtype)) in enumerate(REPLICATED.items()):
        if not same_bits(state[name], _g(shape, dtype, i)):
            bad.append(name)
    for i, (name, (shape, dtype, _m, _c)) in enumerate(SHARDED.items()):
        from torch.distributed.tensor import distribute_tensor

        dt = state[name]
        want = distribute_tensor(_g(shape, dtype, 100 + i), dt.device_mesh, dt.placements, src_data_rank=None)
        if not same_bits(want.to_local(), dt.to_local()):
            bad.append(name)
    return bad


class Boom:
    """A provider whose items() raises on one rank."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def items(self) -> Any:
        if self.fail:
            raise ValueError("boom: this rank's state cannot be described")
        yield from ()

    def load(self, src: Any) -> None:
        return None


def _outcome(fn: Any) -> dict[str, Any]:
    """Run a save (call + result); how it ended on this rank."""
    from ckpt.errors import DistributedSaveError

    where = "call"
    try:
        h = fn()
        where = "result"
        h.result(timeout=60)
    except BaseException as e:  # noqa: BLE001
        dse = e if isinstance(e, DistributedSaveError) else e.__cause__
        return {"where": where, "type": type(e).__name__, "msg": str(e),
                "distributed": isinstance(e, DistributedSaveError),
                "failures": sorted(dse.failures) if isinstance(dse, DistributedSaveError) else None}
    return {"where": where, "type": None}


# -- the 4-rank launch -------------------------------------------------------------------
def scenarios_worker(root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import ckpt
    import ckpt._engine._staging as save_mod

    rank = dist.get_rank()
    meshes = {"flat": init_device_mesh("cpu", (WORLD,)), "grid": init_device_mesh("cpu", (2, 2))}
    opts = ckpt.SaveOptions(max_shard_bytes=SHARD_BYTES, pool_bytes=8 << 20)
    snap = ckpt.Snapshotter(opts)
    out: dict[str, Any] = {"rank": rank}

    # (a), (b): one checkpoint of replicated and sharded tensors
    state = _sharded_state(meshes)
    stats = snap.save_async(state, f"{root}/layout").result(timeout=60)
    out["layout_bytes"] = stats.bytes
    out["layout_objects"] = stats.objects

    # (c) failures: a good checkpoint, then two failed ones, then a good one again
    run = f"{root}/run"
    snap.save_async(state, f"{run}/step-000000001").result(timeout=60)
    bad_state = {**state, "boom": Boom(rank == 1)}
    out["fail_items"] = _outcome(lambda: snap.save_async(bad_state, f"{run}/step-000000002"))
    real_copy = save_mod.copy_unit  # the copy of every write unit, in either staging mode

    def broken_copy(*args: Any, **kwargs: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (injected on rank 1)")

    if rank == 1:
        save_mod.copy_unit = broken_copy
    try:
        out["fail_write"] = _outcome(lambda: snap.save_async(state, f"{run}/step-000000003"))
    finally:
        save_mod.copy_unit = real_copy
    dist.barrier()
    if rank == 0:
        out["committed"] = [c.name for c in ckpt.list_checkpoints(run)]
        out["incomplete"] = [c.name for c in ckpt.list_checkpoints(run, include_incomplete=True)
                             if not c.committed]
        out["run_dirs"] = sorted(os.listdir(run))
    fresh = _sharded_state(meshes, zeros=True)
    ckpt.load(fresh, f"{run}/step-000000001")
    out["previous_loads"] = _check_state(fresh)
    out["after_failure"] = _outcome(lambda: snap.save_async(state, f"{run}/step-000000004"))

    # (d) the checkpoint that a 2-rank job loads resharded
    big = {name: _dtensor_big(name, meshes["flat"]) for name in BIG}
    snap.save_async(big, f"{root}/big").result(timeout=60)

    # (e) async saves while training collectives run on the default group
    out["async"] = _train_while_saving(snap, f"{root}/train", None)
    # ... also when the training's own (gloo) group is passed as process_group: the commit
    # must still not share that group with the training thread's collectives
    out["async_world"] = _train_while_saving(snap, f"{root}/train_world", dist.group.WORLD)

    # (f) sub-groups: ranks {0, 1} and {2, 3} save and load separately
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    out["subgroup"] = _subgroup_roundtrip(mine, f"{root}/sub{rank // 2}")
    snap.close()
    return out


BIG = {"a": ((1024, 1024), torch.float32), "b": ((2048, 1000), torch.bfloat16), "c": ((1003, 777), torch.float32)}


def _dtensor_big(name: str, mesh: Any, *, zeros: bool = False) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    shape, dtype = BIG[name]
    g = _g(shape, dtype, sum(map(ord, name)))
    return distribute_tensor(torch.zeros_like(g) if zeros else g, mesh, (Shard(0),), src_data_rank=None)


def _train_while_saving(snap: Any, run: str, group: Any) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    torch.manual_seed(0)  # the same model on every rank (DDP-like)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handles, snapshots, collectives = [], [], 0
    gen = torch.Generator().manual_seed(1234)
    for step in range(4):
        x = torch.randn(8, 512, generator=gen)
        model(x).square().mean().backward()
        for p in model.parameters():  # "DDP": gradients averaged on the default group
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
            collectives += 1
        opt.step()  # waits (through the hook) only for staging of the snapshot in flight
        opt.zero_grad()
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        handles.append(snap.save_async({"model": model, "optim": opt}, f"{run}/step-{step:09d}",
                                       process_group=group))
        # more training-thread collectives while the snapshot commits in the background
        for _ in range(10):
            t = torch.ones(1000)
            dist.all_reduce(t)
            collectives += 1
    for h in handles:
        h.result(timeout=60)
    dist.barrier()
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    ckpt.load({"model": fresh, "optim": torch.optim.AdamW(fresh.parameters(), lr=1e-3)},
              f"{run}/step-{3:09d}", process_group=group)
    same = all(same_bits(v, snapshots[3][k]) for k, v in fresh.state_dict().items())
    return {"collectives": collectives, "saves": len(handles), "loaded_equal": same}


def _subgroup_roundtrip(group: Any, url: str) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    r = dist.get_rank(group)
    g = _g((37, 11), torch.float32, 7)
    boxes = [((0, 0), (12, 11)), ((12, 0), (25, 11))]
    b = boxes[r]
    ckpt.save({"t": UserBoxes("t", (37, 11), [(b, g[b[0][0]:b[0][0] + b[1][0]].clone())])}, url,
              process_group=group)
    want = [((5, 3), (30, 4)), ((0, 0), (37, 11))][r]
    dest = UserBoxes("t", (37, 11), [(want, torch.zeros(want[1]))])
    ckpt.load({"t": dest}, url, process_group=group)
    m = ckpt.read_manifest(url)
    ok = same_bits(dest.pieces[0][1], g[want[0][0]:want[0][0] + want[1][0], want[0][1]:want[0][1] + want[1][1]])
    return {"world_size": m.world_size, "writers": sorted(x["rank"] for x in m.entries["t"]["boxes"]), "ok": ok}


# -- the 2-rank resharded load -------------------------------------------------------------
def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reshard_load_worker(url: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    import ckpt

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {name: _dtensor_big(name, mesh, zeros=True) for name in BIG}
    need = sum(dt.to_local().numel() * dt.to_local().element_size() for dt in state.values())
    before = _rchar()
    stats = ckpt.load(state, url)
    after = _rchar()
    bad = []
    for name, dt in state.items():
        shape, dtype = BIG[name]
        want = distribute_tensor(_g(shape, dtype, sum(map(ord, name))), mesh, dt.placements, src_data_rank=None)
        if not same_bits(want.to_local(), dt.to_local()):
            bad.append(name)
    total = sum(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in BIG.values())
    return {"need": need, "total": total, "bytes_read": stats.bytes_read, "bytes_fetched": stats.bytes_fetched,
            "rchar": None if before is None or after is None else after - before, "bad": bad}


# -- tests -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("dist_save")
    return root, launch(scenarios_worker, WORLD, str(root), timeout=150)


def _manifest(path: Path) -> Any:
    import ckpt

    return ckpt.read_manifest(str(path))


def test_replicated_written_once_and_balanced(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    root, res = scenarios
    m = _manifest(root / "layout")
    assert m.world_size == WORLD
    per_rank = [out["layout_bytes"] for out in res]  # what each rank wrote (its SaveStats.bytes)
    total = largest = packed = 0
    for key, e in m.entries.items():
        size = torch.empty((), dtype=getattr(torch, e["dtype"])).element_size()
        boxes = entry_boxes(e)
        total += sum(math.prod(s) for _o, s in boxes) * size
        largest = max([largest] + [math.prod(s) * size for _o, s in boxes])
        packed += e["storage"]["layout"] == "packed"
        if key in REPLICATED or key == "dtrep":
            assert len(boxes) == 1, f"{key}: a replicated tensor is one box, got {boxes}"
    assert len(entry_boxes(m.entries["rs0"])) == 2  # two halves, each held by two ranks
    # s0u's uneven rows (251, 251, 251, 248) align on 251-row shards: one array, not pieces
    assert m.entries["s0u"]["storage"]["layout"] == "array"
    # every tensor written exactly once (packs pad members to 64 bytes), by rule, not by a list
    assert total <= sum(per_rank) <= total + 64 * packed, (per_rank, total)
    assert m.layout["bytes"] == sum(per_rank)
    assert "boxes" not in m.entries["s0"] and m.entries["s0"]["sharding"] == {"mesh": [WORLD], "dims": [[0], []]}
    # replicated pieces spread over their holders: within one piece (plus padding) of even
    assert max(per_rank) - min(per_rank) <= largest + 64 * packed, per_rank
    assert min(per_rank) > 0, per_rank


def test_no_two_ranks_write_one_object(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    root, res = scenarios
    ckpt_dir = root / "layout"
    m = _manifest(ckpt_dir)
    n_array_objects = 0
    for key, e in m.entries.items():
        st = e["storage"]
        if st["layout"] != "array":
            continue
        boxes = entry_boxes(e)
        shard = st["shard_shape"]
        files = [f for f in (ckpt_dir / st["path"]).glob("c.*") if f.is_file()]
        expected = math.prod(-(-n // s) for n, s in zip(e["shape"], shard))
        assert len(files) == expected, f"{key}: {len(files)} shard objects, expected {expected}"
        if key in ("s0", "grid"):
            assert all(math.prod(b[1]) * 4 > SHARD_BYTES for b in boxes)
            assert expected > len(boxes)  # multi-shard boxes were really cut
        for f in files:
            idx = [int(x) for x in f.name.split(".")[1:]]  # c.<i>.<j>: the shard's grid index
            lo = [i * s for i, s in zip(idx, shard)]
            hi = [min(a + s, n) for a, s, n in zip(lo, shard, e["shape"])]
            holders = [b for b in boxes
                       if all(o <= a and c <= o + s for o, s, a, c in zip(b[0], b[1], lo, hi))]
            touching = [b for b in boxes if all(a < o + s and o < c for o, s, a, c in zip(b[0], b[1], lo, hi))]
            assert len(holders) == 1 and len(touching) == 1, \
                f"{key}: shard object {idx} ({lo}..{hi}) lies in {len(holders)} boxes, touches {len(touching)}"
            n_array_objects += 1
    # every data object on disk was written by exactly one rank: the ranks' object counts add
    # up to the objects there (two writers of one object would count it twice)
    on_disk = [f for f in ckpt_dir.rglob("c*") if f.is_file() and (f.name == "c" or f.name.startswith("c."))]
    assert sum(out["layout_objects"] for out in res) == len(on_disk) > n_array_objects


def test_rank_failure_means_no_commit_and_errors_everywhere(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    root, res = scenarios
    for case, original in (("fail_items", "ValueError"), ("fail_write", "OSError")):
        for out in res:
            o = out[case]
            assert o["type"] is not None, f"{case}: rank {out['rank']} saw no error"
            assert o["where"] == "result", f"{case}: rank {out['rank']} raised from the call, not the handle: {o}"
            if out["rank"] == 1:
                assert o["type"] == original, (case, o)
            else:
                assert o["distributed"], (case, out["rank"], o)
            assert o["failures"] is not None and 1 in o["failures"], (case, out["rank"], o)
    r0 = res[0]
    assert r0["committed"] == ["step-000000001"], r0["committed"]
    assert r0["incomplete"] == [], f"debris of failed saves left behind: {r0['incomplete']} ({r0['run_dirs']})"
    assert r0["run_dirs"] == ["step-000000001"], r0["run_dirs"]
    for out in res:
        assert out["previous_loads"] == [], f"rank {out['rank']}: previous checkpoint differs: {out['previous_loads']}"
        assert out["after_failure"]["type"] is None, out["after_failure"]


def test_resharded_load_reads_what_it_needs(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    root, _ = scenarios
    res = launch(reshard_load_worker, 2, str(root / "big"), timeout=90)
    for r, out in enumerate(res):
        assert out["bad"] == [], f"rank {r}: {out['bad']} differ"
        need = out["need"]
        assert need < 0.6 * out["total"]
        assert out["bytes_read"] == need
        assert need <= out["bytes_fetched"] <= 2 * need, out
        if out["rchar"] is not None:  # bytes the process really read from files (no page-cache excuse)
            assert out["rchar"] <= 2 * need + (1 << 20), f"rank {r} read {out['rchar']} bytes for {need} needed"


def test_async_commit_beside_training_collectives(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    _, res = scenarios
    for out in res:
        for case in ("async", "async_world"):
            a = out[case]
            assert a["saves"] == 4 and a["collectives"] == 4 * (4 + 10)
            assert a["loaded_equal"], f"{case}, rank {out['rank']}: the last checkpoint does not match the model"


def test_subgroup_saves(scenarios: tuple[Path, list[dict[str, Any]]]) -> None:
    _, res = scenarios
    for out in res:
        s = out["subgroup"]
        assert s["world_size"] == 2 and s["writers"] == [0, 1] and s["ok"], (out["rank"], s)
