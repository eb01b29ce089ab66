"""A persistent save due on a memory-tier step is drained from the tier (its files copied
to storage, the manifest committed last) instead of staging the state a second time: the
checkpoint is the same as a staged one, loads and verifies on local disk and on S3, and a
drain that fails loses nothing committed and never stops training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import MemoryTierOptions, PreemptionOptions, tools
from ckpt._format import step_dirname
from ckpt.elastic._tier import META_KEY
from tests.dist._launch import launch
from tests.elastic.test_tier import _dirs, _flat, _model, _train_step, digest, logged, train


def _loop(mgr: ckpt.CheckpointManager, steps: range, m: torch.nn.Module, opt: torch.optim.Optimizer,
          digests: dict[int, str]) -> list[ckpt.SaveHandle]:
    state = {"model": m, "optim": opt}
    handles = []
    for s in steps:
        _train_step(m, opt, s)
        digests[s] = digest(_flat(m, opt))
        h = mgr.step(s, state)
        if h is not None:
            handles.append(h)
        assert mgr.tier is not None
        mgr.tier.wait()
    return handles


def _loaded(url: str, options: dict | None = None) -> str:
    m, opt = _model()
    _train_step(m, opt, 0)  # the optimizer's state exists before the load fills it
    ckpt.load({"model": m, "optim": opt}, url, storage_options=options)
    return digest(_flat(m, opt))


def test_a_persistent_save_on_a_tier_step_is_drained_not_staged_again(run_place, tmp_path):
    m, opt = _model()
    digests: dict[int, str] = {}
    mgr = ckpt.CheckpointManager(run_place.url, save=3,
                                 memory=MemoryTierOptions(every=1, replicas=0, node_dir=str(tmp_path / "node")),
                                 preemption=PreemptionOptions(signals=()), storage_options=run_place.options)
    handles = _loop(mgr, range(6), m, opt, digests)
    mgr.wait()
    assert mgr.tier is not None and mgr.tier.stats.drained == 2 and not mgr.failures
    assert [i.step for i in mgr.checkpoints()] == [5, 2]
    assert handles and all(h.result().total_bytes == h.result().bytes > 0 for h in handles)
    for step in (2, 5):
        url = f"{run_place.url}/{step_dirname(step)}"
        assert _loaded(url, run_place.options) == digests[step]
        report = tools.verify(url, storage_options=run_place.options)
        assert report.ok, report.problems
        meta = json.loads(run_place.storage().read_bytes(f"{step_dirname(step)}/manifest.json"))
        assert META_KEY not in meta["user_metadata"]  # the tier's bookkeeping stays in the tier
    mgr.close()


def test_a_failing_drain_loses_nothing_committed_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    m, opt = _model()
    digests: dict[int, str] = {}
    mgr = ckpt.CheckpointManager(run, save=2,
                                 memory=MemoryTierOptions(every=1, replicas=0,
                                 node_dir=str(tmp_path / "node")), preemption=PreemptionOptions(signals=()))
    _loop(mgr, range(2), m, opt, digests)  # step 1 drained
    mgr.wait()
    assert (run / "step-000000001" / "manifest.json").exists()
    aside = tmp_path / "aside"
    os.rename(run, aside)
    run.write_text("not a directory")  # the run's storage breaks under the job
    _loop(mgr, range(2, 4), m, opt, digests)  # step 3's drain fails
    mgr.wait()
    assert [s for s, _ in mgr.failures] == [3]
    assert mgr.tier is not None and mgr.tier.stats.last_complete == 3  # the tier step itself is held
    run.unlink()
    os.rename(aside, run)
    _loop(mgr, range(4, 6), m, opt, digests)  # the next due step drains again
    mgr.wait()
    names = sorted(p.name for p in run.iterdir() if (p / "manifest.json").exists())
    assert names == ["step-000000001", "step-000000005"]
    assert _loaded(str(run / "step-000000001")) == digests[1]
    assert _loaded(str(run / "step-000000005")) == digests[5]
    mgr.close()


def test_a_drained_checkpoint_of_three_nodes_is_the_staged_one_byte_for_byte(tmp_path):
    """Three ranks, each its own node: every node's files go to storage from its own tier;
    the result equals the checkpoint a staged save of the same step writes, object for
    object, and loads bit-exact on one rank."""
    runs = {}
    for drain in (True, False):
        run, nodes = str(tmp_path / f"run-{drain}"), _dirs(tmp_path / f"n-{drain}", 3)
        out = launch(train, 3, run, nodes, 6, 3, {"drain": drain}, timeout=180)
        assert all(r["stats"].drained == (2 if drain else 0) for r in out)
        runs[drain] = Path(run)
    drained, staged = (runs[d] / "step-000000005" for d in (True, False))

    def objects(root: Path) -> dict[str, bytes]:
        return {os.path.relpath(p, root): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and p.name != "manifest.json"}

    a, b = objects(drained), objects(staged)
    assert sorted(a) == sorted(b) and a == b
    ma, mb = (json.loads((d / "manifest.json").read_bytes()) for d in (drained, staged))
    assert ma["entries"] == mb["entries"] and ma["rank_state"] == mb["rank_state"]
    assert _loaded(str(drained)) == logged(str(runs[True]), 5)
    shutil.rmtree(tmp_path / "n-True", ignore_errors=True)


pytestmark = pytest.mark.slow
