"""A memory-tier restore moves only what each node's new ranks read and lack.

Eight nodes (one gloo rank each, its own CKPT_NODE_DIR) hold a tier step of an FSDP-like
state (DTensor Shard(0) tensors, uneven splits included, a replicated tensor, a value);
node 3's memory is lost and seven ranks restore. Every rank's shards come back bit for
bit, and each node received exactly the objects its new rank's boxes touch and that it
did not hold (computed here from the boxes, torch.chunk's rule and the files on disk),
far less than the old rule of giving every node the whole step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt import MemoryTierOptions
from tests.dist._launch import launch

pytestmark = pytest.mark.slow

SHAPES = {"w1": (2048, 48), "w2": (1000, 33), "norm": (300,), "emb": (777, 16)}


def _global(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(SHAPES[name], generator=g)


def _state(zeros: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ts = {n: distribute_tensor(torch.zeros(s) if zeros else _global(n), mesh, [Shard(0)], src_data_rank=None)
          for n, s in SHAPES.items()}
    ts["rep"] = distribute_tensor(torch.zeros(50) if zeros else torch.arange(50.0), mesh, [Replicate()],
                                  src_data_rank=None)
    return {"m": ts, "step": 0 if zeros else 7}


def _save(run: str, nodes: list[str]) -> None:
    import torch.distributed as dist

    from ckpt.elastic import MemoryTier

    tier = MemoryTier(run, MemoryTierOptions(node_dir=nodes[dist.get_rank()], replicas=1))
    tier.snapshot(0, _state(zeros=False))
    tier.wait()
    assert tier.stats.completed == 1
    tier.close(remove=False)


def _restore(run: str, nodes: list[str]) -> dict[str, Any]:
    import torch.distributed as dist

    from ckpt.elastic import MemoryTier

    tier = MemoryTier(run, MemoryTierOptions(node_dir=nodes[dist.get_rank()], replicas=1))
    state = _state(zeros=True)
    res = tier.restore(state)
    assert res is not None
    world, rank = dist.get_world_size(), dist.get_rank()
    for n in SHAPES:
        want = torch.chunk(_global(n), world)[rank] if rank < len(torch.chunk(_global(n), world)) else None
        got = state["m"][n].to_local()
        assert want is None and got.numel() == 0 or torch.equal(got, want), n
    assert torch.equal(state["m"]["rep"].to_local(), torch.arange(50.0)) and state["step"] == 7
    tier.close(remove=False)
    return res.to_dict()


def _files(d: Path) -> dict[str, int]:
    return {os.path.relpath(p, d): p.stat().st_size for p in d.rglob("*") if p.is_file()}


def _expected_lack(manifest: dict[str, Any], world: int, rank: int, held: dict[str, int],
                   sizes: dict[str, int]) -> tuple[set[str], int]:
    """Objects rank ``rank`` of ``world`` reads (torch.chunk rows of every Shard(0)
    tensor; the replicated tensor's pack) that its node does not hold, and their bytes."""
    need: set[str] = set()
    for e in manifest["entries"].values():
        st = e.get("storage")
        if st is None:
            continue
        if st["layout"] == "packed":
            need.add(f"{st['path']}/c.0")
            continue
        pieces = st["pieces"] if st["layout"] == "pieces" else [
            {"offsets": [0] * len(e["shape"]), "sizes": e["shape"], **st}]
        n = e["shape"][0]
        rows = -(-n // world)
        lo, hi = rank * rows, min(n, (rank + 1) * rows)
        for p in pieces:
            a, b = max(lo, p["offsets"][0]) - p["offsets"][0], min(hi, p["offsets"][0] + p["sizes"][0]) - p["offsets"][0]
            sh = (p.get("shard_shape") or p["sizes"])[0]
            tail = ".0" * (len(e["shape"]) - 1)
            need |= {f"{p['path']}/c.{i}{tail}" for i in range(a // sh, -(-b // sh))} if b > a else set()
    lack = need - set(held)
    return lack, sum(sizes[p] for p in lack)


def test_eight_nodes_to_seven_move_only_what_each_node_needs_and_lacks(tmp_path):
    from ckpt.elastic._tier import job_id

    run = str(tmp_path / "run")
    nodes = [str(tmp_path / f"node{i}") for i in range(8)]
    launch(_save, 8, run, nodes, timeout=120)
    step = "step-000000000"
    dirs = [Path(n) / job_id(run) / step for n in nodes]
    manifest = json.loads((dirs[0] / "manifest.json").read_text())
    sizes: dict[str, int] = {}
    for d in dirs:
        sizes.update(_files(d))
    whole = sum(s for p, s in sizes.items() if "/c." in p)
    shutil.rmtree(nodes[3])  # node 3 is gone; its files survive as node 4's replica
    survivors = nodes[:3] + nodes[4:]
    held = [_files(Path(n) / job_id(run) / step) for n in survivors]
    results = launch(_restore, 7, run, survivors, timeout=120)
    moved = 0
    for k, r in enumerate(results):
        lack, nbytes = _expected_lack(manifest, 7, k, held[k], sizes)
        assert r["lacked_bytes"] == nbytes and r["peer_bytes"] == nbytes, (k, r, sorted(lack))
        after = _files(Path(survivors[k]) / job_id(run) / step)
        assert lack <= set(after)
        moved += r["peer_bytes"]
    assert sum(r["sent_bytes"] for r in results) == moved
    # the old rule gave every node every object: about 7 x the step less what each held
    old_rule = sum(whole - sum(s for p, s in h.items() if "/c." in p) for h in held)
    assert 0 < moved < old_rule / 4, (moved, old_rule)
