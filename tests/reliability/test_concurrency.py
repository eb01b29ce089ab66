"""Two processes on one run. The rule: checkpoint names are step-unique, so savers of
different steps never touch each other's objects (each writes its own ``.tmp-*``
directory and commits by one rename / one manifest PUT). Two saves of the *same* step
race to the commit: one wins, the other raises ``CheckpointExistsError`` and leaves
nothing behind. ``gc`` racing a save only removes debris older than its grace period,
so a save in progress is never touched (``grace=0`` is for when no save runs)."""

from __future__ import annotations

import ckpt
from ckpt import tools
from tests._helpers import Tally
from tests.reliability import (
    assert_bit_exact,
    committed_steps,
    ctx,
    gc_clean,
    make_state,
    race_savers,
    save_many_worker,
)

TALLY = Tally("concurrency")  # cases tried and passed, by kind


def test_two_savers_different_steps(tmp_path):
    for n in range(3):
        run = str(tmp_path / f"run{n}")
        res = race_savers(run, [2, 3])
        assert [r[0] for r in res] == ["ok", "ok"], res
        assert committed_steps(run) == [3, 2]
        assert_bit_exact(f"{run}/step-000000003", 3)
        assert_bit_exact(f"{run}/step-000000002", 2)
        gc_clean(run)
        TALLY.count("different-steps")


def test_two_savers_same_step(tmp_path):
    outcomes = []
    for n in range(5):
        run = str(tmp_path / f"run{n}")
        res = race_savers(run, [2, 2])
        kinds = [r[0] if r[0] == "ok" else r[1] for r in res]
        outcomes.append(tuple(sorted(kinds)))
        assert kinds.count("ok") >= 1, res
        assert all(k in ("ok", "CheckpointExistsError") for k in kinds), res
        assert committed_steps(run) == [2]
        assert_bit_exact(f"{run}/step-000000002", 2)
        gc_clean(run)
        TALLY.count("same-step")
    print(f"\n[reliability] same-step outcomes: {outcomes}")


def test_save_racing_gc(tmp_path):
    run = str(tmp_path / "run")
    ckpt.save(make_state(1), f"{run}/step-000000001", step=1)
    c = ctx()
    started = c.Event()
    p = c.Process(target=save_many_worker, args=(run, 2, started, 9), daemon=True)
    p.start()
    assert started.wait(30)
    rounds = 0
    while p.is_alive():
        tools.gc(run, keep_last=2)  # default grace: in-progress saves are left alone
        for s in committed_steps(run):
            try:
                assert_bit_exact(f"{run}/step-{s:09d}", s)
            except ckpt.errors.CheckpointNotFoundError:
                pass  # removed by retention between the listing and the load
        rounds += 1
    p.join()
    assert p.exitcode == 0, "the save failed while gc ran"
    tools.gc(run, keep_last=2)
    assert committed_steps(run) == [9, 8]
    for s in (8, 9):
        assert_bit_exact(f"{run}/step-{s:09d}", s)
    gc_clean(run)
    TALLY.count("save-vs-gc")
    print(f"\n[reliability] gc rounds during 8 saves: {rounds}")
