"""CommittedCheckpoints' one-writer rule across a quorum change, with real torchft (a
lighthouse, two replica groups of real processes from examples/ft_train.py sharing one
checkpoint root): the writer group (the lowest participating, group 0) is SIGKILLed
mid-run; group 1 trains on alone, becomes the lowest participating group and takes over
the persistent saves. Every scheduled step is saved exactly once, by a group that
committed it, and the newest checkpoint is group 1's final state."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
from demo_ft import Job, committed, whole_job_restart  # noqa: E402  (the demo's driver pieces)

import ckpt  # noqa: E402

pytestmark = pytest.mark.slow
STEPS, EVERY, WIDTH = 36, 4, 32


def test_killing_the_writer_group_hands_the_saves_to_the_survivor(tmp_path: Path) -> None:
    job = Job(tmp_path, STEPS, WIDTH)
    try:
        g0 = job.group(0, 1, "--save-every", str(EVERY), "--timeout", "2")
        job.group(1, 1, "--save-every", str(EVERY), "--timeout", "2")
        job.go({0: 1, 1: 1})
        job.wait_for("group 0 to save twice", lambda: len(job.records(0, 0, "save")) >= 2)
        os.kill(g0[0].pid, signal.SIGKILL)
        g0[0].wait()
        job.finish()
    finally:
        job.close()
    saved = {g: [r["step"] for r in job.records(g, 0, "save")] for g in (0, 1)}
    steps = {g: committed(job, g) for g in (0, 1)}
    kill_step = max(steps[0])  # group 0's last committed step
    assert saved[0] and saved[1], saved
    assert max(saved[0]) <= kill_step < min(saved[1]), (saved, kill_step)
    assert not set(saved[0]) & set(saved[1])  # no step written twice
    # each save is of a step its writer committed as the lowest participating group
    for g in (0, 1):
        for s in saved[g]:
            assert steps[g][s]["replica_rank"] == 0, (g, s, steps[g][s])
    # no scheduled step lost to the hand-over: group 1 saved every one it committed alone
    alone = [s for s, r in steps[1].items() if r["replica_rank"] == 0 and (s + 1) % EVERY == 0]
    assert alone and sorted(alone) == saved[1], (alone, saved[1])
    # on disk: every save that completed (group 0's last one may have died with it), atomically
    on_disk = sorted(int(c.step or 0) for c in ckpt.list_checkpoints(str(tmp_path / "run")))
    assert set(on_disk) <= set(saved[0] + saved[1]) and set(saved[1]) <= set(on_disk), on_disk
    assert set(saved[0]) - set(on_disk) <= {max(saved[0])}, (saved[0], on_disk)
    # a whole-job restart resumes from group 1's last save, bit-equal to its final state
    step, restored = whole_job_restart(tmp_path / "run", WIDTH)
    final = torch.load(tmp_path / "final-g1.pt")
    assert step == STEPS - 1
    assert all(torch.equal(v, final[k]) for k, v in restored.items())
