"""A load that fails part way leaves the caller's objects exactly as they were passed in
(issue #36, case 1): ``ckpt.load`` puts the destinations back before it raises, and
``CheckpointManager.restore`` that finds no good checkpoint returns 0 with the state
untouched."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import ckpt
from ckpt.errors import CorruptCheckpointError, StorageError
from tests._helpers import randn_state

N = 256 * 1024  # 1 MiB of float32 per tensor: an array of its own (not packed)


def _state(seed: int) -> dict:
    return randn_state(seed, a=N, z=N)


def _flip(path: str, at: float = 0.3) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(int(size * at))
        b = f.read(1)
        f.seek(int(size * at))
        f.write(bytes([b[0] ^ 0xFF]))


def _shard(ckdir: str, name: str) -> str:
    d = os.path.join(ckdir, "arrays", f"{name}.zarr")
    return os.path.join(d, sorted(p for p in os.listdir(d) if p.startswith("c."))[0])


def _two_damaged_checkpoints(run: str) -> None:
    with ckpt.CheckpointManager(run, save=1) as mgr:
        for step in (1, 2):
            mgr.step(step, _state(step))
    for step in (1, 2):
        _flip(_shard(f"{run}/step-{step:09d}", "z"))  # the last tensor read; "a" is fine


@pytest.mark.parametrize("direct", ["1", "0"])
def test_restore_without_a_good_checkpoint_leaves_state_as_passed(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CKPT_DIRECT_READS", direct)  # the direct local path and tensorstore's
    run = str(tmp_path / "run")
    _two_damaged_checkpoints(run)
    live = _state(99)
    before = {k: v.clone() for k, v in live.items()}
    ids = {k: id(v) for k, v in live.items()}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ckpt.CheckpointManager(run).restore(live) == 0
    assert sum("skipping checkpoint" in str(x.message) for x in w) == 2
    for k in live:
        assert id(live[k]) == ids[k] and torch.equal(live[k], before[k]), k


def test_failed_load_puts_every_tensor_back(tmp_path):
    run = str(tmp_path / "run")
    _two_damaged_checkpoints(run)
    live = _state(5)
    before = {k: v.clone() for k, v in live.items()}
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.load(live, f"{run}/step-000000002")
    assert ei.value.key == "z"
    assert all(torch.equal(live[k], before[k]) for k in live)


def test_missing_object_mid_load_leaves_model_and_fresh_optimizer_untouched(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 512)).sum().backward()
    opt.step()
    url = str(tmp_path / "ck")
    ckpt.save({"model": model, "optim": opt}, url)
    # the last array of the load is gone
    arrays = sorted(os.listdir(os.path.join(url, "arrays", "optim", "state")))
    last = os.path.join(url, "arrays", "optim", "state", arrays[-1])
    for root, _dirs, files in os.walk(last):
        for f in files:
            if f.startswith("c."):
                os.remove(os.path.join(root, f))
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    fresh_opt = torch.optim.Adam(fresh.parameters())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CorruptCheckpointError):
        ckpt.load({"model": fresh, "optim": fresh_opt}, url)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert not fresh_opt.state  # as fresh as it was passed in
    assert all(p.grad is None for p in fresh.parameters())


@pytest.mark.parametrize("direct", ["1", "0"])
def test_storage_error_mid_load_rolls_back(tmp_path, monkeypatch, direct):
    """A storage failure after the first tensor landed: the shard of "z" cannot be read
    (a directory where its file was: EISDIR)."""
    monkeypatch.setenv("CKPT_DIRECT_READS", direct)
    url = str(tmp_path / "ck")
    ckpt.save(_state(1), url)
    shard = _shard(url, "z")
    os.remove(shard)
    os.mkdir(shard)
    live = _state(7)
    before = {k: v.clone() for k, v in live.items()}
    with pytest.raises((StorageError, CorruptCheckpointError)):
        ckpt.load(live, url)
    assert all(torch.equal(live[k], before[k]) for k in live)


def test_rollback_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_LOAD_ROLLBACK", "0")
    run = str(tmp_path / "run")
    _two_damaged_checkpoints(run)
    live = _state(5)
    before = {k: v.clone() for k, v in live.items()}
    with pytest.raises(CorruptCheckpointError):
        ckpt.load(live, f"{run}/step-000000002")
    assert not torch.equal(live["a"], before["a"])  # "a" landed before "z" failed: no copy was kept


def test_a_load_reports_the_host_memory_its_copy_took(tmp_path):
    url = str(tmp_path / "ck")
    ckpt.save(_state(1), url)
    stats = ckpt.load(_state(2), url)
    assert stats.backup_bytes == 2 * N * 4
