"""Issue #36, case 5: writes that torch's version counter does not see (``t.data.add_``,
``t.numpy()[:] +=``) while a background snapshot is staging. The version counter catches
``t.add_``; ``SaveOptions(check_snapshot=True)`` (``CKPT_CHECK_SNAPSHOT=1``) checksums
every tensor at the call and again once it is staged, and fails the save on a mismatch."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.errors import SnapshotFailedError

MIB = 1 << 20


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {f"t{i:02d}": torch.randn(2 * MIB, generator=g) for i in range(12)}  # 12 x 8 MiB


def _mutate(how: str, t: torch.Tensor) -> None:
    if how == "add_":
        t.add_(100)
    elif how == "data":
        t.data.add_(100)
    else:
        t.numpy()[:] += 100


@pytest.mark.parametrize("how", ["add_", "data", "numpy"])
def test_check_snapshot_fails_a_torn_save(tmp_path, how):
    state = _state()
    snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=32 * MIB, check_snapshot=True))
    try:
        h = snap.save_async(state, str(tmp_path / "ck"))
        _mutate(how, state["t11"])  # before staging reaches the last tensor (the pool holds 4)
        with pytest.raises(SnapshotFailedError) as ei:
            h.result()
        assert ei.value.key == "t11"
        assert not (tmp_path / "ck").exists()  # nothing committed
    finally:
        snap.close()


def test_version_counter_catches_add_without_the_option(tmp_path):
    state = _state()
    snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=32 * MIB))
    try:
        h = snap.save_async(state, str(tmp_path / "ck"))
        state["t11"].add_(100)
        with pytest.raises(SnapshotFailedError):
            h.result()
    finally:
        snap.close()


def test_check_snapshot_passes_an_untouched_save_and_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_CHECK_SNAPSHOT", "1")
    assert ckpt.SaveOptions.resolve().check_snapshot
    state = _state()
    snap = ckpt.Snapshotter(ckpt.SaveOptions.resolve(pool_bytes=32 * MIB))
    try:
        snap.save_async(state, str(tmp_path / "ck")).result()
    finally:
        snap.close()
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(back, str(tmp_path / "ck"))
    assert all(torch.equal(back[k], state[k]) for k in state)
