"""Many ranks: save on 32 gloo ranks, load that checkpoint on 24 and on 7 (fresh groups).

The state is small (about 0.5 MB) so that the ranks, not the bytes, are what is tested:
DTensors with FSDP-style Shard(0) on a 1-D mesh of 32 (uneven splits, more ranks than
rows: empty shards), (Replicate, Shard(0)) and (Shard(0), Shard(1)) on a (4, 8) mesh, and
a plain tensor that every rank holds whole. Each load reads every tensor into DTensor
layouts of the new world (other shard dims, other mesh shapes) and compares every rank's
local shard bit for bit with the known global tensor; every rank reads exactly the bytes
of its own shards, and the save wrote each byte once (replicas included).

Only ``ckpt.save`` and ``ckpt.load``: the test holds across planner rewrites. The ranks
are forked from one server that imported torch and ckpt once (``start_method=
"forkserver"``): 63 spawned interpreters would spend minutes of CPU on imports alone.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dist._launch import launch
from tests.dist.test_reshard_grid import same_bits

pytestmark = pytest.mark.slow

SAVE_WORLD = 32
LOAD_WORLDS = (24, 7)
# what a rank would otherwise import after the fork: DTensor's first op pulls in
# torch._dynamo (~2 s of CPU), ckpt's first save tensorstore and crc32c
PRELOAD = ("torch", "torch.distributed.tensor", "torch._dynamo", "tensorstore", "google_crc32c",
           "ckpt", "ckpt.providers", "ckpt.storage")

# name -> (shape, dtype)
TENSORS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "emb": ((1000, 64), torch.float32),     # 1000 rows over 32: 31 x 32 rows + 8
    "wq": ((96, 128), torch.bfloat16),      # even: 3 rows each
    "norm": ((20, 16), torch.float32),      # 20 rows over 32: 12 empty shards
    "bias": ((301,), torch.int64),          # 1-D, uneven
    "hsdp": ((256, 96), torch.float32),     # (Replicate, Shard(0)) on (4, 8): 4 replicas of 8 boxes
    "tp": ((64, 203), torch.float16),       # (Shard(0), Shard(1)) on (4, 8): 203 columns over 8, uneven
    "rep": ((50, 33), torch.float64),       # a plain tensor on every rank
}

# world -> name -> (mesh shape, placements as codes); None: a plain tensor
SAVE_LAYOUT: dict[str, Any] = {
    "emb": ((32,), "S0"), "wq": ((32,), "S0"), "norm": ((32,), "S0"), "bias": ((32,), "S0"),
    "hsdp": ((4, 8), "R,S0"), "tp": ((4, 8), "S0,S1"), "rep": None,
}
LOAD_LAYOUTS: dict[int, dict[str, Any]] = {
    24: {"emb": ((24,), "S0"), "wq": ((24,), "S1"), "norm": ((3, 8), "S0,R"), "bias": ((24,), "S0"),
         "hsdp": ((3, 8), "R,S0"), "tp": ((3, 8), "S1,S0"), "rep": ((24,), "S1")},
    7: {"emb": ((7,), "S1"), "wq": ((7,), "S0"), "norm": ((7,), "R"), "bias": ((7,), "S0"),
        "hsdp": ((7,), "S0"), "tp": ((7,), "S1"), "rep": None},
}


def global_tensor(name: str) -> torch.Tensor:
    shape, dtype = TENSORS[name]
    gen = torch.Generator().manual_seed(1000 + sum(map(ord, name)))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    n = math.prod(shape)
    return (torch.randperm(n, generator=gen) - n // 2).to(dtype).reshape(shape)


def _placements(code: str) -> tuple[Any, ...]:
    from torch.distributed.tensor import Replicate, Shard

    return tuple(Replicate() if c == "R" else Shard(int(c[1:])) for c in code.split(","))


class Meshes:
    """init_device_mesh once per mesh shape (each 2-D mesh makes its sub-groups)."""

    def __init__(self) -> None:
        self._meshes: dict[tuple[int, ...], Any] = {}

    def get(self, shape: tuple[int, ...]) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        if shape not in self._meshes:
            self._meshes[shape] = init_device_mesh("cpu", shape)
        return self._meshes[shape]


def build(name: str, layout: Any, meshes: Meshes, *, zeros: bool) -> Any:
    from torch.distributed.tensor import distribute_tensor

    g = global_tensor(name)
    src = torch.zeros_like(g) if zeros else g
    if layout is None:
        return src.clone()
    mesh_shape, code = layout
    # src_data_rank=None: each rank cuts its shard from its own copy, by torch's rules
    return distribute_tensor(src, meshes.get(mesh_shape), _placements(code), src_data_rank=None)


def local_of(obj: Any) -> torch.Tensor:
    return obj.to_local() if hasattr(obj, "to_local") else obj


def save_worker(url: str) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    t0 = time.perf_counter()
    meshes = Meshes()
    state = {name: build(name, SAVE_LAYOUT[name], meshes, zeros=False) for name in TENSORS}
    t1 = time.perf_counter()
    stats = ckpt.save(state, url)
    t2 = time.perf_counter()
    return {"rank": dist.get_rank(), "bytes": stats.bytes, "setup_s": t1 - t0, "save_s": t2 - t1}


def load_worker(url: str) -> dict[str, Any]:
    import torch.distributed as dist

    import ckpt

    world, rank = dist.get_world_size(), dist.get_rank()
    t0 = time.perf_counter()
    meshes = Meshes()
    layouts = LOAD_LAYOUTS[world]
    state = {name: build(name, layouts[name], meshes, zeros=True) for name in TENSORS}
    t1 = time.perf_counter()
    stats = ckpt.load(state, url)
    t2 = time.perf_counter()
    bad, need = [], 0
    for name, obj in state.items():
        want = local_of(build(name, layouts[name], meshes, zeros=False))
        got = local_of(obj)
        need += want.numel() * want.element_size()
        if not same_bits(want, got):
            bad.append(f"{name} ({layouts[name]}) on rank {rank}/{world}: local shard {tuple(got.shape)} differs")
    return {"rank": rank, "bad": bad, "bytes_read": stats.bytes_read, "need": need,
            "setup_s": t1 - t0, "load_s": t2 - t1}


def _unique_bytes() -> int:
    return sum(math.prod(s) * d.itemsize for s, d in TENSORS.values())


def test_save_32_load_24_and_7(tmp_path: Path) -> None:
    url = str(tmp_path / "run" / "step-1")
    t0 = time.perf_counter()
    saved = launch(save_worker, SAVE_WORLD, url, timeout=150, start_method="forkserver", preload=PRELOAD)
    t_save = time.perf_counter() - t0
    assert [r["rank"] for r in saved] == list(range(SAVE_WORLD))
    written = sum(r["bytes"] for r in saved)
    # every byte written once: the 31 other copies of "rep" and the 3 other replicas of
    # "hsdp" are not (packs round each member up to 64 bytes)
    assert _unique_bytes() <= written <= _unique_bytes() + 64 * len(TENSORS) * SAVE_WORLD, written

    times = {"save": t_save}
    for world in LOAD_WORLDS:
        t = time.perf_counter()
        res = launch(load_worker, world, url, timeout=150, start_method="forkserver", preload=PRELOAD)
        times[f"load{world}"] = time.perf_counter() - t
        bad = [b for r in res for b in r["bad"]]
        assert not bad, f"{len(bad)} mismatches after 32 -> {world}:\n" + "\n".join(bad[:20])
        for r in res:  # each rank reads its own shards, no more
            assert r["bytes_read"] == r["need"], (world, r)
    print("launches (s):", {k: round(v, 1) for k, v in times.items()},
          "slowest save call (s):", round(max(r["save_s"] for r in saved), 2), "bytes written:", written)
