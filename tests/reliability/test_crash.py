"""Crash consistency with real processes: a child saving (or deleting) is SIGKILLed at
seeded-random instants or right before a chosen file-system operation. After each kill:
the listing shows only committed checkpoints, the newest one loads bit-exactly, gc
leaves no debris and a following save succeeds."""

from __future__ import annotations

import os
import random
import shutil

import pytest

import ckpt
from ckpt import PreemptionOptions
from tests._helpers import Tally
from tests.reliability import (
    assert_bit_exact,
    check_after_crash,
    committed_steps,
    debris,
    gc_clean,
    gc_worker,
    make_state,
    recycled_save_worker,
    retention_worker,
    run_child,
    save_kill_worker,
    save_worker,
)

SEED = 20240601
TALLY = Tally("crash")  # cases tried and passed, by family


def _measure(run: str, opts: dict | None = None, env: dict | None = None) -> float:
    """Duration of one child save, from 'started' to exit (the span kills are spread on)."""
    from tests.reliability import ctx

    q = ctx().Queue()
    code, _ = run_child(save_worker, run, 7, env, opts, False, q)
    assert code == 0
    status, seconds, msg = q.get(timeout=10)
    assert status == "ok", msg
    return seconds


def _after(run: str, allowed: set[int], next_step: int, **opts) -> int:
    newest = check_after_crash(run, allowed, **opts)
    gc_clean(run, **opts)
    assert newest in committed_steps(run, **opts)  # gc never removes a committed checkpoint
    kw = {"storage_options": opts} if opts else {}
    ckpt.save(make_state(next_step), f"{run}/step-{next_step:09d}", step=next_step, **kw)
    assert_bit_exact(f"{run}/step-{next_step:09d}", next_step, **kw)
    return newest


def test_kill_during_save_local(tmp_path):
    duration = _measure(str(tmp_path / "calib"))
    rng = random.Random(SEED)
    delays = sorted(rng.uniform(0, duration * 1.1) for _ in range(12))
    outcomes = []
    for n, delay in enumerate(delays):
        run = str(tmp_path / f"run{n}")
        ckpt.save(make_state(1), f"{run}/step-000000001", step=1)
        _, killed = run_child(save_worker, run, 2, kill_after=delay)
        newest = _after(run, {1, 2}, 3)
        outcomes.append((round(delay, 3), killed, newest))
        TALLY.count("save-local-random-delay", True)
    print(f"\n[reliability] save duration {duration:.3f}s; (delay, killed, newest committed): {outcomes}")
    assert any(k for _, k, _ in outcomes), "no kill landed during a save"


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_kill_at_commit_steps(tmp_path, kill_at):
    """Right before: 1 the manifest write, 2 its rename into place, 3 the directory rename."""
    run = str(tmp_path / "run")
    ckpt.save(make_state(1), f"{run}/step-000000001", step=1)
    code, _ = run_child(save_kill_worker, run, 2, kill_at)
    assert code == -9, f"the save ended ({code}) before mutation {kill_at}"
    _after(run, {1}, 3)  # killed before the rename: step 2 must not be listed
    TALLY.count("save-local-commit-point", True)


def _template(tmp_path, n: int) -> str:
    tpl = tmp_path / "tpl"
    if not tpl.exists():
        for s in range(1, n + 1):
            ckpt.save(make_state(s), f"{tpl}/step-{s:09d}", step=s)
    return str(tpl)


def _copy(tpl: str, dst: str, with_debris: bool = False) -> str:
    shutil.copytree(tpl, dst)
    if with_debris:  # what crashed saves leave: a temp dir and a step dir without manifest
        shutil.copytree(f"{tpl}/step-000000001", f"{dst}/.tmp-step-000000009-0123456789ab")
        os.remove(f"{dst}/.tmp-step-000000009-0123456789ab/manifest.json")
        shutil.copytree(f"{tpl}/step-000000002", f"{dst}/step-000000008")
        os.remove(f"{dst}/step-000000008/manifest.json")
    return dst


KILL_POINTS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 400]


def test_kill_during_retention(tmp_path):
    tpl = _template(tmp_path, 4)
    completed = 0
    for k in KILL_POINTS:
        run = _copy(tpl, str(tmp_path / f"ret{k}"))
        code, _ = run_child(retention_worker, run, 1, k)
        completed += code == 0
        # every listed checkpoint is whole (manifest first, then data)
        for s in committed_steps(run):
            assert_bit_exact(f"{run}/step-{s:09d}", s)
        _after(run, {1, 2, 3, 4}, 5)
        assert 4 in committed_steps(run)  # retention never removes the newest
        TALLY.count("retention-kill-point", True)
    print(f"\n[reliability] retention: {len(KILL_POINTS) - completed} killed mid-way, {completed} finished")


def test_kill_during_a_save_into_a_recycled_tree(tmp_path):
    """A save that recycles the retired tree (take it, overwrite in place, prune, commit,
    retire the next one), killed at every stage: what is listed loads bit-exact, the rest
    is debris gc removes, and the run saves again."""
    tpl = tmp_path / "rtpl"
    mgr = ckpt.CheckpointManager(tpl, keep=1, preemption=PreemptionOptions(signals=()), save_on_close=False,
                                 recycle=True)
    mgr.save(1, make_state(1)).result()
    mgr.save(2, make_state(2)).result()
    mgr.wait()
    mgr.snapshotter.close()  # not close(): that would delete the slot
    assert committed_steps(str(tpl)) == [2]
    assert [d for d in os.listdir(tpl) if d.startswith(".tmp-recycle-")]  # step 1's tree, kept
    completed = 0
    for k in KILL_POINTS:
        run = _copy(str(tpl), str(tmp_path / f"rec{k}"))
        code, _ = run_child(recycled_save_worker, run, k)
        completed += code == 0
        for s in committed_steps(run):
            assert_bit_exact(f"{run}/step-{s:09d}", s)
        _after(run, {2, 3}, 4)
        TALLY.count("recycled-save-kill-point", True)
    assert completed < len(KILL_POINTS)  # the kill points reach into the save
    print(f"\n[reliability] recycled save: {len(KILL_POINTS) - completed} killed mid-way, {completed} finished")


def test_kill_during_gc(tmp_path):
    tpl = _template(tmp_path, 4)
    completed = 0
    for k in KILL_POINTS:
        run = _copy(tpl, str(tmp_path / f"gc{k}"), with_debris=True)
        code, _ = run_child(gc_worker, run, 2, k)
        completed += code == 0
        for s in committed_steps(run):
            assert_bit_exact(f"{run}/step-{s:09d}", s)
        _after(run, {1, 2, 3, 4}, 5)
        assert {3, 4} <= set(committed_steps(run))
        TALLY.count("gc-kill-point", True)
    print(f"\n[reliability] gc: {len(KILL_POINTS) - completed} killed mid-way, {completed} finished")


def test_kill_during_save_s3(s3_url, s3_options):
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k.lower() == "no_proxy"}
    duration = _measure(f"{s3_url}/calib", s3_options, env)
    rng = random.Random(SEED + 1)
    delays = sorted(rng.uniform(0, duration) for _ in range(5))
    outcomes = []
    for n, delay in enumerate(delays):
        run = f"{s3_url}/run{n}"
        ckpt.save(make_state(1), f"{run}/step-000000001", step=1, storage_options=s3_options)
        _, killed = run_child(save_worker, run, 2, env, s3_options, kill_after=delay)
        newest = _after(run, {1, 2}, 3, **s3_options)
        assert not debris(run, **s3_options)
        outcomes.append((round(delay, 3), killed, newest))
        TALLY.count("save-s3-random-delay", True)
    print(f"\n[reliability] s3 save duration {duration:.3f}s; (delay, killed, newest): {outcomes}")


def test_overwrite_interrupted_between_renames_is_recovered(tmp_path):
    """An overwrite moves the old checkpoint aside before renaming the new one in: a
    crash in between must not lose the old one (gc and restore put it back)."""
    import torch

    from ckpt import tools
    from ckpt.storage import open_storage

    run = tmp_path / "run"
    w = torch.arange(1000.0)
    ckpt.save({"w": w}, run / "step-000000005", step=5)
    storage = open_storage(run)
    storage.rename_dir("step-000000005", ".tmp-trash-step-000000005-deadbeef")  # the crash point
    assert ckpt.list_checkpoints(run) == []
    tools.gc(str(run), grace=0)
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["step-000000005"]
    storage.rename_dir("step-000000005", ".tmp-trash-step-000000005-deadbeef")
    out = {"w": torch.empty(1000)}
    mgr = ckpt.CheckpointManager(run, preemption=PreemptionOptions(signals=()))
    with pytest.warns(RuntimeWarning, match="recovered"):
        assert mgr.restore(out) == 6
    assert torch.equal(out["w"], w)
    mgr.close()
