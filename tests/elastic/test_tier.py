"""The memory tier on real gloo process groups: one rank per node (each its own
CKPT_NODE_DIR), snapshots every step, replication to the next node, then a restart on
another world size with some nodes' memory gone.

Every "training step" is deterministic and independent of the world size (gradients are
a function of the step), so the state a restore must produce is known exactly: the
state of a one-process replay stopped at that step.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.dist._launch import launch

pytestmark = pytest.mark.slow


def _model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Linear(64, 300), torch.nn.Linear(300, 8))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train_step(m: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def reference(step: int) -> dict[str, torch.Tensor]:
    """Parameters and optimizer moments after ``step`` (inclusive), one process."""
    m, opt = _model()
    for s in range(step + 1):
        _train_step(m, opt, s)
    return _flat(m, opt)


def _flat(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"o.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


def _node_env(node_dirs: list[str]) -> None:
    import torch.distributed as dist

    os.environ["CKPT_NODE_DIR"] = node_dirs[dist.get_rank()]


def train(run: str, node_dirs: list[str], steps: int, every: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Restore (tier first), train to ``steps``, leave the tier as a crash would."""
    import ckpt

    _node_env(node_dirs)
    m, opt = _model()
    state = {"model": m, "optim": opt}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = ckpt.CheckpointManager(run, every_steps=every, memory_every_steps=1, save_on_signals=(), **kwargs)
        start = mgr.restore(state)
    restored = _flat(m, opt) if start else None
    assert mgr.tier is not None
    for s in range(start, steps):
        _train_step(m, opt, s)
        mgr.step(s, state)
        mgr.tier.wait()  # a step of real training outlasts a tier step of this tiny model
    mgr.wait()
    return {"start": start, "from": mgr.restored_from, "restored": restored,
            "tier": None if mgr.tier_restore is None else mgr.tier_restore.to_dict(),
            "stats": mgr.tier.stats, "warnings": [str(w.message) for w in caught],
            "node": mgr.tier.node, "nnodes": mgr.tier.nnodes}


def _dirs(tmp: Path, n: int) -> list[str]:
    return [str(tmp / f"node{i}") for i in range(n)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_node_loss_restores_from_memory_and_replicas_on_fewer_ranks(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    first = launch(train, 3, run, nodes, 6, 100, {}, timeout=180)
    assert all(r["stats"].completed >= 1 for r in first)
    assert first[0]["stats"].last_complete == 5
    shutil.rmtree(nodes[2])  # node 2 is gone; its files survive as node 0's replica
    second = launch(train, 2, run, nodes[:2], 8, 100, {}, timeout=180)
    ref = reference(5)
    for r in second:
        assert r["from"] == "memory" and r["start"] == 6, r["warnings"]
        assert _same(r["restored"], ref)
    # node 0 held node 2's files as a replica; what a node lacked came from its peer
    assert second[0]["tier"]["replica_bytes"] > 0
    assert sum(r["tier"]["peer_bytes"] for r in second) > 0


def test_grow_restores_from_memory_onto_more_nodes(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    launch(train, 2, run, nodes[:2], 4, 100, {}, timeout=180)
    second = launch(train, 3, run, nodes, 5, 100, {}, timeout=180)
    ref = reference(3)
    for r in second:
        assert r["from"] == "memory" and r["start"] == 4
        assert _same(r["restored"], ref)
    assert second[2]["tier"]["peer_bytes"] > 0 and second[2]["tier"]["own_bytes"] == 0


def test_losing_a_node_and_its_replica_falls_back_to_persistent(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    launch(train, 3, run, nodes, 7, 4, {}, timeout=180)  # persistent at step 3
    shutil.rmtree(nodes[1])
    shutil.rmtree(nodes[2])  # node 1's only replica was on node 2
    second = launch(train, 1, run, nodes[:1], 8, 100, {}, timeout=180)
    r = second[0]
    assert r["from"] == "persistent" and r["start"] == 4
    assert _same(r["restored"], reference(3))
    assert any("no tier step could be restored" in w and "held by no surviving node" in w for w in r["warnings"])
