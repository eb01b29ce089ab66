"""The memory tier on real gloo process groups: one rank per node (each its own
CKPT_NODE_DIR), snapshots every step, replication to the next node, then a restart on
another world size with some nodes' memory gone.

Every "training step" is deterministic and independent of the world size (gradients are
a function of the step), and every rank logs a digest of its state after each step, so
the state a restore must produce is known exactly: the one logged at that step. (A
one-process replay of the same steps is not a bit-exact reference: in about one run of
four, one weight of the replay differed from the workers' by ~3e-6.)
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt import MemoryTierOptions, PreemptionOptions
from tests.dist._launch import launch

pytestmark = pytest.mark.slow


def _model(width: int = 64) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(96, width), torch.nn.Linear(width, 300), torch.nn.Linear(300, 8))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train_step(m: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def _flat(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in m.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"o.{i}.{k}"] = torch.as_tensor(v).clone()
    return out


def digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def logged(run: str, step: int) -> str:
    """The digest the ranks logged after ``step`` (all ranks hold the same state)."""
    found = {line.split()[1] for f in Path(run).glob("digests-*.txt") for line in f.read_text().splitlines()
             if line.split()[0] == str(step)}
    assert len(found) == 1, f"step {step}: digests {found}"
    return found.pop()


def _node_env(node_dirs: list[str]) -> None:
    import torch.distributed as dist

    os.environ["CKPT_NODE_DIR"] = node_dirs[dist.get_rank()]


def train(run: str, node_dirs: list[str], steps: int, every: int, kwargs: dict[str, Any],
          width: int = 64, die_after: float | None = None) -> dict[str, Any]:
    """Restore (tier first), train to ``steps``, leave the tier as a crash would.
    ``kwargs``: more MemoryTierOptions.
    ``die_after``: rank 1 SIGKILLs itself that many seconds into training (and does not
    wait for tier steps, so the kill lands anywhere in a snapshot or a replication)."""
    import ckpt

    _node_env(node_dirs)
    m, opt = _model(width)
    state = {"model": m, "optim": opt}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mgr = ckpt.CheckpointManager(run, save=every, memory=MemoryTierOptions(every=1, **kwargs),
                                     preemption=PreemptionOptions(signals=()))
        start = mgr.restore(state)
    restored = digest(_flat(m, opt)) if start else None
    import torch.distributed as dist

    Path(run).mkdir(parents=True, exist_ok=True)
    assert mgr.tier is not None
    log = open(Path(run) / f"digests-{dist.get_rank()}-{os.getpid()}.txt", "a", buffering=1)
    for s in range(start, steps):
        _train_step(m, opt, s)
        log.write(f"{s} {digest(_flat(m, opt))}\n")
        mgr.step(s, state)
        if die_after is not None and s == start and dist.get_rank() == 1:
            import signal
            import threading

            mgr.tier.wait()  # one tier step is held before the kill
            threading.Timer(die_after, os.kill, (os.getpid(), signal.SIGKILL)).start()
        if die_after is None:
            mgr.tier.wait()  # a step of real training outlasts a tier step of this tiny model
    mgr.wait()
    return {"start": start, "from": mgr.restored_from, "restored": restored,
            "tier": None if mgr.tier_restore is None else mgr.tier_restore.to_dict(),
            "stats": mgr.tier.stats, "warnings": [str(w.message) for w in caught],
            "node": mgr.tier.node, "nnodes": mgr.tier.nnodes}


def _dirs(tmp: Path, n: int) -> list[str]:
    return [str(tmp / f"node{i}") for i in range(n)]


def _same(restored: str, run: str, step: int) -> bool:
    return restored == logged(run, step)


def test_node_loss_restores_from_memory_and_replicas_on_fewer_ranks(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    first = launch(train, 3, run, nodes, 6, 100, {}, timeout=180)
    assert all(r["stats"].completed >= 1 for r in first)
    assert first[0]["stats"].last_complete == 5
    shutil.rmtree(nodes[2])  # node 2 is gone; its files survive as node 0's replica
    second = launch(train, 2, run, nodes[:2], 8, 100, {}, timeout=180)
    for r in second:
        assert r["from"] == "memory" and r["start"] == 6, r["warnings"]
        assert _same(r["restored"], run, 5)
    # node 0 held node 2's files as a replica; what a node lacked came from its peer
    assert second[0]["tier"]["replica_bytes"] > 0
    assert sum(r["tier"]["peer_bytes"] for r in second) > 0


def test_grow_restores_from_memory_onto_more_nodes(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    launch(train, 2, run, nodes[:2], 4, 100, {}, timeout=180)
    second = launch(train, 3, run, nodes, 5, 100, {}, timeout=180)
    for r in second:
        assert r["from"] == "memory" and r["start"] == 4
        assert _same(r["restored"], run, 3)
    assert second[2]["tier"]["peer_bytes"] > 0 and second[2]["tier"]["own_bytes"] == 0


def test_losing_a_node_and_its_replica_falls_back_to_persistent(tmp_path):
    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 3)
    launch(train, 3, run, nodes, 7, 4, {}, timeout=180)  # persistent at step 3
    shutil.rmtree(nodes[1])
    shutil.rmtree(nodes[2])  # node 1's only replica was on node 2
    second = launch(train, 1, run, nodes[:1], 8, 100, {}, timeout=180)
    r = second[0]
    assert r["from"] == "persistent" and r["start"] == 4
    assert _same(r["restored"], run, 3)
    assert any("no tier step could be restored" in w and "held by no surviving node" in w for w in r["warnings"])


def test_a_damaged_piece_in_memory_is_detected_and_another_copy_used(tmp_path):
    from ckpt.elastic._tier import job_id, own_files

    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 2)
    launch(train, 2, run, nodes, 3, 100, {}, timeout=180)
    step_dir = Path(nodes[0]) / job_id(run) / "step-000000002"
    victim = max(own_files(step_dir), key=lambda p: (step_dir / p).stat().st_size)  # a data object
    raw = bytearray((step_dir / victim).read_bytes())
    raw[10] ^= 0xFF  # inside the first chunk: its crc32c no longer matches
    (step_dir / victim).write_bytes(bytes(raw))
    second = launch(train, 2, run, nodes, 4, 100, {}, timeout=180)
    for r in second:
        assert r["from"] == "memory" and r["start"] == 3, r["warnings"]
        assert _same(r["restored"], run, 2)
    assert any("is damaged" in w and victim in w for w in second[0]["warnings"]), second[0]["warnings"]
    assert second[0]["tier"]["peer_bytes"] >= len(raw)  # node 1's replica replaced it


def test_two_jobs_on_one_machine_never_read_each_others_tier(tmp_path):
    nodes = _dirs(tmp_path, 2)
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")
    launch(train, 2, run_a, nodes, 3, 100, {}, timeout=180)
    launch(train, 2, run_b, nodes, 5, 100, {}, timeout=180)  # same node directories
    for run, last in ((run_a, 2), (run_b, 4)):
        for r in launch(train, 2, run, nodes, last + 2, 100, {}, timeout=180):
            assert r["from"] == "memory" and r["start"] == last + 1
            assert _same(r["restored"], run, last)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_during_tier_snapshots_and_replication_recovers_a_whole_step(tmp_path, seed):
    from tests.dist._launch import RankFailed

    run, nodes = str(tmp_path / "run"), _dirs(tmp_path, 2)
    die_after = 0.1 * seed + torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() * 0.3
    with pytest.raises(RankFailed):
        launch(train, 2, run, nodes, 10_000, 10**6, {}, 256, die_after, timeout=120)
    second = launch(train, 2, run, nodes, 1, 10**6, {}, 256, timeout=120)  # restore only
    starts = {r["start"] for r in second}
    assert len(starts) == 1
    start = starts.pop()
    assert start > 0 and all(r["from"] == "memory" for r in second), second[0]["warnings"]
    for r in second:
        assert _same(r["restored"], run, start - 1)


def test_no_room_skips_tier_steps_with_a_warning_and_training_goes_on(tmp_path, monkeypatch):
    import ckpt
    from ckpt.elastic import MemoryTierWarning

    monkeypatch.setenv("CKPT_NODE_DIR", str(tmp_path / "node"))
    m, opt = _model()
    state = {"model": m, "optim": opt}
    mgr = ckpt.CheckpointManager(tmp_path / "run", save=3, memory=MemoryTierOptions(every=1, max_bytes=1),
                                 preemption=PreemptionOptions(signals=()))
    with pytest.warns(MemoryTierWarning, match="no room for step"):
        for s in range(6):
            _train_step(m, opt, s)
            last = digest(_flat(m, opt))
            mgr.step(s, state)
            assert mgr.tier is not None
            mgr.tier.wait()
    assert mgr.tier.stats.completed >= 1 and mgr.tier.stats.skipped_full >= 1
    mgr.close()
    assert [c.step for c in mgr.checkpoints()] == [5, 2]  # persistent checkpoints untouched
    assert not (tmp_path / "node" / mgr.tier.job).exists()  # a clean end removes the job's tier
    m2, opt2 = _model()
    assert ckpt.CheckpointManager(tmp_path / "run",
                                  preemption=PreemptionOptions(signals=())).restore({"model": m2,
                                  "optim": opt2}) == 6
    assert digest(_flat(m2, opt2)) == last


def test_a_tier_step_written_into_a_retired_steps_pages_holds_only_its_own_bytes(tmp_path):
    """The tier writes each step into the tree of the step it retired (its tmpfs pages);
    a file of the old step that the new one does not rewrite is deleted before the commit."""
    import ckpt
    from ckpt.elastic import MemoryTier

    tier = MemoryTier(os.fspath(tmp_path / "run"), MemoryTierOptions(node_dir=os.fspath(tmp_path / "node"), replicas=0))
    big = 1 << 20
    states = [{"a": torch.full((big,), 0.0), "b": torch.full((2 * big,), 0.0)},
              {"a": torch.full((big,), 1.0), "b": torch.full((2 * big,), 1.0)},
              {"a": torch.full((big,), 2.0)}]  # "b" is gone from the state
    inodes = []
    for s, st in enumerate(states):
        tier.snapshot(s, {"m": st})
        tier.wait()
        inodes.append((tier.root / f"step-{s:09d}" / "arrays/m/a.zarr/c.0").stat().st_ino)
    try:
        step2 = tier.root / "step-000000002"
        assert inodes[2] == inodes[0]  # step 2 took step 0's retired tree: its pages
        assert not (step2 / "arrays/m/b.zarr").exists()  # step 0's "b" did not survive in it
        assert all(p.stat().st_mtime > 0 for p in step2.rglob("*") if p.is_file())
        out = {"m": {"a": torch.zeros(big)}}
        stats = ckpt.load(out, os.fspath(step2))
        assert not stats.unexpected and torch.equal(out["m"]["a"], states[2]["a"])
        from ckpt import tools

        assert tools.verify(os.fspath(step2)).ok
    finally:
        tier.close()


def test_steps_of_a_timeline_the_job_left_are_dropped(tmp_path):
    """A job that goes back (restores an older checkpoint, or numbers its steps anew)
    must never be restored to a tier step of the timeline it left, though that step's
    number is higher."""
    from ckpt.elastic import MemoryTier

    tier = MemoryTier(os.fspath(tmp_path / "run"), MemoryTierOptions(node_dir=os.fspath(tmp_path / "node"), replicas=0))
    try:
        for s in (5, 6, 2, 3):
            tier.snapshot(s, {"m": {"w": torch.full((1000,), float(s))}})
            tier.wait()
        held = sorted(p.name for p in tier.root.iterdir() if p.name.startswith("step-"))
        assert held == ["step-000000003"]
    finally:
        tier.close()


def test_one_thread_finishes_every_tier_step_and_the_call_starts_none(tmp_path):
    """A step taken hands its finishing to the tier's one thread: the call starts no
    thread of its own (a new thread makes the call wait for its first turn on the GIL,
    behind the save's background work), the thread is the same from step to step, and
    ``busy``/``wait`` follow the step in flight; ``close`` ends it."""
    import threading

    from ckpt.elastic import MemoryTier
    from ckpt.elastic._tier import tree_sizes

    tier = MemoryTier(os.fspath(tmp_path / "run"), MemoryTierOptions(node_dir=os.fspath(tmp_path / "node"), replicas=0))
    workers = set()
    try:
        for s in range(3):
            tier.snapshot(s, {"m": {"w": torch.full((1000,), float(s))}})
            workers.update(t.ident for t in threading.enumerate() if t.name.startswith("ckpt-tier"))
            tier.wait()
            assert not tier.busy()
        assert len(workers) == 1
        assert tier.stats.completed == 3 and tier.stats.last_complete == 2
        sizes = tree_sizes(tier.root)  # the tier's bookkeeping: bytes by entry, in one walk
        assert sizes["step-000000002"] == sum(p.stat().st_size for p in (tier.root / "step-000000002").rglob("*")
                                              if p.is_file())
        assert tier.stats.held_bytes == sum(sizes.values())
    finally:
        tier.close()
    assert not any(t.name.startswith("ckpt-tier") for t in threading.enumerate())


def _count_groups(run: str, node_dirs: list[str]) -> int:
    """Gloo groups one job makes: a manager with a memory tier restores, saves, drains."""
    import torch.distributed as dist

    import ckpt

    _node_env(node_dirs)
    made = []
    real = dist.new_group

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    dist.new_group = counting
    try:
        m, opt = _model()
        state = {"model": m, "optim": opt}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr = ckpt.CheckpointManager(run, save=2, keep=1, memory=MemoryTierOptions(every=1, keep=2),
                                         preemption=PreemptionOptions(signals=()))
            mgr.restore(state)
            for s in range(4):
                _train_step(m, opt, s)
                mgr.step(s, state)
                assert mgr.tier is not None
                mgr.tier.wait()
            mgr.close()
    finally:
        dist.new_group = real
    return len(made)


def test_a_job_with_a_memory_tier_makes_three_gloo_groups(tmp_path):
    """The engine's side group, the training thread's agreement (the manager's and the
    tier's), the tier's own (its thread and its saves): no more, at any world size."""
    made = launch(_count_groups, 2, str(tmp_path / "run"), _dirs(tmp_path, 2), timeout=240)
    assert made == [3, 3]
