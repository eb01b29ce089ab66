"""The memory tier's coordination does not grow with the world (DESIGN.md, "Built for
16,384 ranks"): finding the nodes, taking and replicating steps, and a restore — one that
finds a damaged object and plans again — make no all-gather, and no rank holds a list of
every rank or every node.

Four gloo ranks on three "nodes" (node directories), interleaved so that the numbering
by lowest rank is visible: node 0 = ranks 0 and 2, node 1 = rank 1, node 2 = rank 3.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt import MemoryTierOptions
from tests.dist._launch import launch

pytestmark = pytest.mark.slow

LAYOUT = [0, 1, 0, 2]  # the node directory of each rank


def _state(fill: float) -> dict[str, Any]:
    return {"m": {"a": torch.full((300_000,), fill), "b": torch.arange(5000.0) + fill}}


def _job(run: str, node_dirs: list[str]) -> dict[str, Any]:
    import warnings

    import torch.distributed as dist

    from ckpt.elastic import MemoryTier
    from ckpt.elastic._tier import own_files

    calls: dict[str, int] = {}
    real = {n: getattr(dist, n) for n in ("all_gather_object", "all_gather", "all_gather_into_tensor")}

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return real[name](*args, **kwargs)
        return call

    for n in real:
        setattr(dist, n, counting(n))
    rank = dist.get_rank()
    node_dir = node_dirs[LAYOUT[rank]]
    try:
        tier = MemoryTier(run, MemoryTierOptions(node_dir=node_dir, replicas=1))
        topology = {"node": tier.node, "nnodes": tier.nnodes, "leader": tier.leader,
                    "members": list(getattr(tier.nodes, "members", ()))}  # (the old NodeGroup: every node's)
        for s in range(2):
            tier.snapshot(s, _state(float(s)))
            tier.wait()
        completed = tier.stats.completed
        tier.close(remove=False)
        if rank == 1:  # node 1 damages its own copy of its largest object
            step_dir = Path(node_dir) / tier.job / "step-000000001"
            victim = max(own_files(step_dir), key=lambda p: (step_dir / p).stat().st_size)
            raw = bytearray((step_dir / victim).read_bytes())
            raw[10] ^= 0xFF
            (step_dir / victim).write_bytes(bytes(raw))
        dist.barrier()
        again = MemoryTier(run, MemoryTierOptions(node_dir=node_dir, replicas=1))  # a second tier, same store
        state = _state(-1.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = again.restore(state)
        ok = res is not None and all(torch.equal(state["m"][k], v) for k, v in _state(1.0)["m"].items())
        again_topology = {"node": again.node, "nnodes": again.nnodes, "members": list(getattr(again.nodes, "members", ()))}
        again.close()
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    return {"calls": calls, "topology": topology, "again": again_topology, "completed": completed,
            "step": None if res is None else res.step, "ok": ok, "warnings": [str(w.message) for w in caught],
            "pid": os.getpid()}


def test_tier_nodes_and_restore_make_no_all_gather(tmp_path):
    run = str(tmp_path / "run")
    node_dirs = [str(tmp_path / f"node{i}") for i in range(3)]
    results = launch(_job, 4, run, node_dirs, timeout=240)
    members = {0: [0, 2], 1: [1], 2: [3]}
    for rank, r in enumerate(results):
        assert r["calls"] == {}, (rank, r["calls"])  # the old node_group and restore all-gathered
        node = LAYOUT[rank]
        assert r["topology"] == {"node": node, "nnodes": 3, "leader": rank == members[node][0],
                                 "members": members[node]}
        assert r["again"] == {"node": node, "nnodes": 3, "members": members[node]}
        assert r["completed"] == 2
        assert r["step"] == 1 and r["ok"], r["warnings"]
    assert any("is damaged" in w for w in results[1]["warnings"]), results[1]["warnings"]
