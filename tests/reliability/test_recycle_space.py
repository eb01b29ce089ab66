"""Issue #36, case 8: with ``recycle=True`` a save's peak disk use is that of a save
without recycling, also when the state's tensor names change from step to step (the
slot's files the new plan will not overwrite are deleted before the save writes)."""

from __future__ import annotations

import os

import pytest
import torch

import ckpt
from tests.reliability import small_tmpfs

MIB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "fs", "5m") as d:
        yield d


def _state(step: int) -> dict:
    return {f"w{step}": torch.full((2 * MIB // 4,), float(step))}  # 2 MiB, a new name each step


@pytest.mark.parametrize("recycle", [False, True])
def test_changing_names_fit_where_they_fit_without_recycling(tmpfs, recycle, monkeypatch):
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "buffered")  # tmpfs has no O_DIRECT
    run = str(tmpfs / "run")
    mgr = ckpt.CheckpointManager(run, save=1, keep=1, recycle=recycle)
    for step in range(5):
        mgr.step(step, _state(step))
        mgr.wait()
    mgr.close()
    assert mgr.failures == []
    assert [c.step for c in ckpt.list_checkpoints(run)] == [4]
    back = {"w4": torch.zeros(2 * MIB // 4)}
    ckpt.load(back, f"{run}/step-000000004")
    assert torch.equal(back["w4"], _state(4)["w4"])
    assert not [d for d in os.listdir(run) if d.startswith(".tmp-")]
