"""The asynchronous snapshot engine: snapshot semantics under mutation, the bounded pool,
back-pressure, and failures that surface from the handle without hurting training."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

import ckpt
from ckpt.errors import ConfigError, SaveInProgressError, SnapshotFailedError, StorageError
from ckpt.storage import register_storage
from ckpt.storage._file import FileStorage
from tests._helpers import assert_same_state_dict

# where CPU state is copied into the pool (SaveOptions.cpu_staging): both paths keep a
# snapshot exact under mutation
STAGINGS = ["background", "inline"]


def small_options(**kw):
    base = dict(pool_bytes=4 << 20, max_shard_bytes=1 << 20, chunk_bytes=256 << 10)
    base.update(kw)
    return ckpt.SaveOptions(**base)


def model_and_optim(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
                            torch.nn.Linear(512, 256))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    return m, opt


def train_step(m, opt, x):
    opt.zero_grad()
    m(x).square().mean().backward()
    opt.step()


def snapshot_of(state):
    m, opt = state["model"], state["optim"]
    return ({k: v.clone() for k, v in m.state_dict().items()},
            {i: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in s.items()}
             for i, s in opt.state_dict()["state"].items()})


def assert_state_equals(m, opt, expected):
    msd, osd = expected
    assert_same_state_dict(m.state_dict(), msd, "model")
    assert_same_state_dict(opt.state_dict()["state"], osd, "optim")


@pytest.mark.parametrize("staging", STAGINGS)
def test_optimizer_step_right_after_save_async_is_not_in_checkpoint(tmp_path, staging):
    m, opt = model_and_optim()
    x = torch.randn(64, 256)
    train_step(m, opt, x)
    snap = ckpt.Snapshotter(small_options(cpu_staging=staging))
    state = {"model": m, "optim": opt}
    expected = snapshot_of(state)
    handle = snap.save_async(state, tmp_path / "step-1")
    # forward/backward overlap the copy; the optimizer's pre-step hook waits for it
    train_step(m, opt, x)
    m(x)  # a BatchNorm forward changes running stats: they were captured eagerly
    handle.result(timeout=60)
    assert handle.stats.total_bytes > 0 and handle.stats.blocked_s >= 0
    m2, opt2 = model_and_optim(seed=1)
    ckpt.load({"model": m2, "optim": opt2}, tmp_path / "step-1")
    assert_state_equals(m2, opt2, expected)
    snap.close()


@pytest.mark.parametrize("staging", STAGINGS)
def test_in_place_change_after_wait_staged_is_not_in_checkpoint(tmp_path, staging):
    w = torch.randn(1024, 1024)
    before = w.clone()
    snap = ckpt.Snapshotter(small_options(cpu_staging=staging))
    h = snap.save_async({"w": w}, tmp_path / "c")
    h.wait_staged()
    w.mul_(2)
    h.result(timeout=60)
    out = torch.empty_like(w)
    ckpt.load({"w": out}, tmp_path / "c")
    assert torch.equal(out, before)
    snap.close()


@pytest.mark.parametrize("staging", STAGINGS)
def test_in_place_change_during_copy_fails_loudly_never_torn(tmp_path, staging):
    """Mutating without waiting either lands after the copy (checkpoint exact) or fails the
    snapshot with a clear error; it never commits a mix."""
    w = torch.zeros(4096, 1024)  # 16 MiB through a 2 MiB pool: the copy takes many rounds
    gate = threading.Event()
    snap = ckpt.Snapshotter(small_options(pool_bytes=2 << 20, max_shard_bytes=512 << 10, cpu_staging=staging))
    h = snap.save_async({"w": w}, tmp_path / "c")
    w.add_(1)  # not allowed: no wait_staged
    gate.set()
    err = h.exception(timeout=60)
    if err is None:
        out = torch.empty_like(w)
        ckpt.load({"w": out}, tmp_path / "c")
        assert torch.equal(out, torch.zeros_like(w)) or torch.equal(out, torch.ones_like(w))
    else:
        assert isinstance(err, SnapshotFailedError) and "wait_staged" in str(err)
        assert not (tmp_path / "c").exists()
    snap.close()


@pytest.mark.parametrize("staging", STAGINGS)
def test_pool_smaller_than_largest_tensor(tmp_path, staging):
    big = torch.randn(2048, 2048)  # 16 MiB
    snap = ckpt.Snapshotter(small_options(pool_bytes=2 << 20, max_shard_bytes=512 << 10, cpu_staging=staging))
    stats = snap.save_async({"big": big, "b": torch.randn(3)}, tmp_path / "c").result(timeout=120)
    assert stats.pool_peak_bytes <= 2 << 20
    assert stats.objects >= 16  # streamed shard by shard (1 MiB shards)
    out = {"big": torch.empty_like(big), "b": torch.empty(3)}
    ckpt.load(out, tmp_path / "c")
    assert torch.equal(out["big"], big)
    snap.close()


def test_inline_staging_through_a_pool_smaller_than_the_state(tmp_path, monkeypatch):
    """Inline staging with a pool of a third of the state: writes free blocks while the
    call copies (no deadlock), memory stays within the pool, the checkpoint is exact."""
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "1")
    state = {f"t{i}": torch.randn(256, 1024) for i in range(6)}  # 6 MiB
    snap = ckpt.Snapshotter(small_options(pool_bytes=2 << 20, cpu_staging="inline"))
    stats = snap.save_async(state, tmp_path / "tight").result(timeout=60)
    assert stats.pool_peak_bytes <= 2 << 20
    out = {k: torch.empty_like(v) for k, v in state.items()}
    ckpt.load(out, tmp_path / "tight")
    assert all(torch.equal(out[k], v) for k, v in state.items())
    snap.close()


def test_host_memory_stays_bounded_while_saving_more_than_the_pool(tmp_path):
    """Peak RSS during a 512 MiB save through a 32 MiB pool grows far less than the state."""
    code = textwrap.dedent(f"""
        import resource, torch, ckpt
        state = {{"t%d" % i: torch.randn(16 << 20) for i in range(8)}}  # 8 x 64 MiB
        for t in state.values(): t.add_(0)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=32 << 20, max_shard_bytes=8 << 20))
        stats = snap.save_async(state, {str(tmp_path / 'c')!r}).result()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024, stats.pool_peak_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, pool_peak = map(int, out.stdout.split())
    assert pool_peak <= 32 << 20
    assert grew < 256 << 20, f"RSS grew by {grew >> 20} MiB while saving 512 MiB through a 32 MiB pool"


class _FaultyStorage(FileStorage):
    """Real files, with faults on demand: array writes to an impossible place, or a
    manifest write that fails."""

    fail_arrays = False
    fail_manifest: BaseException | None = None

    def kvstore_spec(self, path):
        if type(self).fail_arrays:
            blocker = self.root / "blocker"
            blocker.parent.mkdir(parents=True, exist_ok=True)
            blocker.write_text("a file where a directory should be")
            return {"driver": "file", "path": str(blocker / path) + "/"}
        return super().kvstore_spec(path)

    def local_path(self, path=""):  # where direct writes put array data (ckpt/_engine/_direct_write.py)
        if type(self).fail_arrays and ("/arrays/" in path or "/packs/" in path):
            blocker = self.root / "blocker"
            blocker.write_text("a file where a directory should be")
            return blocker / path
        return super().local_path(path)

    def write_bytes(self, path, data):
        if path.endswith("manifest.json") and type(self).fail_manifest is not None:
            raise type(self).fail_manifest
        return super().write_bytes(path, data)


@pytest.fixture
def faulty(tmp_path):
    register_storage("faulty", lambda url, **kw: _FaultyStorage(url[len("faulty://"):]))
    _FaultyStorage.fail_arrays = False
    _FaultyStorage.fail_manifest = None
    yield f"faulty://{tmp_path}"
    _FaultyStorage.fail_arrays = False
    _FaultyStorage.fail_manifest = None


@pytest.mark.parametrize("writes", ["direct", "tensorstore"])
def test_write_error_surfaces_from_handle_training_continues(faulty, tmp_path, monkeypatch, writes):
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "1" if writes == "direct" else "0")
    m, opt = model_and_optim()
    x = torch.randn(32, 256)
    state = {"model": m, "optim": opt}
    snap = ckpt.Snapshotter(small_options())
    snap.save_async(state, f"{faulty}/step-1").result(timeout=60)
    good = snapshot_of(state)
    _FaultyStorage.fail_arrays = True
    h = snap.save_async(state, f"{faulty}/step-2")
    train_step(m, opt, x)  # the loop keeps running
    with pytest.raises(StorageError) as ei:
        h.result(timeout=60)
    assert "step-2" in str(ei.value)
    assert [c.name for c in ckpt.list_checkpoints(faulty)] == ["step-1"]
    m2, opt2 = model_and_optim(seed=3)
    ckpt.load({"model": m2, "optim": opt2}, tmp_path / "step-1")
    assert_state_equals(m2, opt2, good)
    snap.close()


@pytest.mark.parametrize("staging", ["inline", "background"])
def test_writer_failure_returns_every_block_to_the_pool(tmp_path, monkeypatch, staging):
    """An error raised in the writer's own loop (not by a write in flight) fails the save,
    and every staged block goes back to the pool: the same Snapshotter saves again."""
    from ckpt._engine import _writer

    state = {"w": torch.randn(1024, 1024), "v": torch.randn(512, 1024)}  # 6 MiB: many 1 MiB units
    snap = ckpt.Snapshotter(small_options(pool_bytes=16 << 20, cpu_staging=staging))
    real = _writer.Writer._write_direct
    calls = []

    def failing(self, u):
        calls.append(u)
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected writer failure")
        return real(self, u)

    monkeypatch.setattr(_writer.Writer, "_write_direct", failing)
    with pytest.raises(OSError, match="injected writer failure"):
        snap.save(state, tmp_path / "a")
    assert snap.pool.used == 0  # nothing leaked: the failing unit's block and the queued ones
    monkeypatch.setattr(_writer.Writer, "_write_direct", real)
    snap.save(state, tmp_path / "b")
    out = {"w": torch.zeros(1024, 1024), "v": torch.zeros(512, 1024)}
    ckpt.load(out, tmp_path / "b")
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["v"], state["v"])
    snap.close()


def test_commit_error_keeps_original_type_and_previous_checkpoint(faulty, tmp_path):
    w = torch.randn(300, 300)
    snap = ckpt.Snapshotter(small_options())
    snap.save_async({"w": w}, f"{faulty}/step-1").result(timeout=60)
    boom = OSError(errno.EIO, "injected manifest failure")
    _FaultyStorage.fail_manifest = boom
    h = snap.save_async({"w": w * 2}, f"{faulty}/step-2")
    assert h.exception(timeout=60) is boom
    assert [c.name for c in ckpt.list_checkpoints(faulty, include_incomplete=False)] == ["step-1"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # debris removed
    out = torch.empty_like(w)
    ckpt.load({"w": out}, tmp_path / "step-1")
    assert torch.equal(out, w)
    snap.close()


def test_unretrieved_failure_surfaces_from_next_save(faulty):
    snap = ckpt.Snapshotter(small_options())
    _FaultyStorage.fail_manifest = OSError(errno.EIO, "injected")
    h = snap.save_async({"w": torch.ones(10)}, f"{faulty}/step-1")
    h._job.wait(60)
    _FaultyStorage.fail_manifest = None
    with pytest.raises(OSError, match="injected"):
        snap.save_async({"w": torch.ones(10)}, f"{faulty}/step-2")
    snap.save_async({"w": torch.ones(10)}, f"{faulty}/step-2").result(timeout=60)  # reported once
    snap.close()


def test_back_pressure_policies(tmp_path):
    big = {"t": torch.randn(4 << 20)}  # 16 MiB through a 1 MiB pool: slow enough to overlap
    snap = ckpt.Snapshotter(small_options(pool_bytes=1 << 20, max_shard_bytes=256 << 10))
    h1 = snap.save_async(big, tmp_path / "a")
    if not h1.done():
        with pytest.raises(SaveInProgressError):
            snap.save_async(big, tmp_path / "b", if_busy="error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h2 = snap.save_async(big, tmp_path / "c", if_busy="skip")
    if h2.skipped:
        assert any("skipped" in str(w.message) for w in caught)
        assert not (tmp_path / "c").exists()
    h3 = snap.save_async(big, tmp_path / "d", if_busy="wait")
    assert h1.done()  # "wait" waited for the previous snapshot
    h3.result(timeout=120)
    assert {c.name for c in ckpt.list_checkpoints(tmp_path)} >= {"a", "d"}
    snap.close()


def test_handle_callbacks_and_stats(tmp_path):
    seen = []
    snap = ckpt.Snapshotter(small_options())
    h = snap.save_async({"w": torch.randn(512, 512)}, tmp_path / "c", step=7)
    h.add_done_callback(lambda hh: seen.append(hh.done()))
    stats = h.result(timeout=60)
    assert seen == [True] and h.done() and h.exception() is None
    assert stats.bytes == 512 * 512 * 4 and stats.total_s >= stats.call_s
    assert ckpt.read_manifest(tmp_path / "c").step == 7
    snap.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_snapshot_under_mutation(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048),
                            torch.nn.Linear(2048, 2048)).cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(256, 2048, device="cuda")
    train_step(m, opt, x)
    state = {"model": m, "optim": opt}
    expected = snapshot_of(state)
    snap = ckpt.Snapshotter(small_options(pool_bytes=8 << 20, max_shard_bytes=2 << 20))
    h = snap.save_async(state, tmp_path / "g")
    m(x)
    train_step(m, opt, x)
    h.result(timeout=120)
    m2 = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.BatchNorm1d(2048),
                             torch.nn.Linear(2048, 2048)).cuda()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    ckpt.load({"model": m2, "optim": opt2}, tmp_path / "g")
    assert_state_equals(m2, opt2, expected)
    assert h.stats.pool_peak_bytes <= 8 << 20
    snap.close()


def test_env_configures_options(monkeypatch):
    monkeypatch.setenv("CKPT_POOL_BYTES", "64M")
    monkeypatch.setenv("CKPT_IF_BUSY", "skip")
    opts = ckpt.SaveOptions.resolve()
    assert opts.pool_bytes == 64 << 20 and opts.if_busy == "skip"
    assert ckpt.SaveOptions.resolve(None, if_busy="error").if_busy == "error"  # explicit beats env
    with pytest.raises(ValueError):
        ckpt.SaveOptions(if_busy="sometimes")
    del os.environ["CKPT_POOL_BYTES"]


def test_huge_pages_switch(monkeypatch, tmp_path):
    """CKPT_HUGE_PAGES=0 gives a pool of ordinary pages that saves the same checkpoint;
    a switch that is not a boolean is refused, naming the variable."""
    assert ckpt.SaveOptions.resolve().huge_pages
    monkeypatch.setenv("CKPT_HUGE_PAGES", "0")
    opts = ckpt.SaveOptions.resolve()
    assert opts.huge_pages is False
    snap = ckpt.Snapshotter(dataclasses.replace(opts, pool_bytes=4 << 20))
    w = torch.randn(300, 700)
    snap.save({"w": w}, tmp_path / "c")
    assert snap.pool.huge_pages is False
    snap.close()
    out = {"w": torch.zeros_like(w)}
    ckpt.load(out, tmp_path / "c")
    assert torch.equal(out["w"], w)
    monkeypatch.setenv("CKPT_HUGE_PAGES", "maybe")
    with pytest.raises(ValueError, match="CKPT_HUGE_PAGES='maybe'"):
        ckpt.SaveOptions.resolve()


def test_cpu_staging_option(monkeypatch):
    """Background by default; inline only when asked, and only for a state of CPU tensors
    (no guessing from thread counts or LOCAL_WORLD_SIZE)."""
    from ckpt._engine._staging import inline_staging
    from ckpt.providers._base import TensorItem

    monkeypatch.delenv("CKPT_CPU_STAGING", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert ckpt.SaveOptions.resolve().cpu_staging == "background"
    monkeypatch.setenv("CKPT_CPU_STAGING", "inline")
    assert ckpt.SaveOptions.resolve().cpu_staging == "inline"
    monkeypatch.setenv("CKPT_CPU_STAGING", "auto")
    with pytest.raises(ConfigError, match="CKPT_CPU_STAGING='auto'"):
        ckpt.SaveOptions.resolve()
    with pytest.raises(ValueError, match="cpu_staging"):
        ckpt.SaveOptions(cpu_staging="auto")  # type: ignore[arg-type]
    cpu = [TensorItem("w", torch.zeros(4))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)  # a training that fills every core still stages in the background
        assert inline_staging("inline", cpu) and not inline_staging("background", cpu)
    finally:
        torch.set_num_threads(threads)
    meta = [TensorItem("w", torch.zeros(4, device="meta"))]
    assert not inline_staging("inline", meta)  # only CPU state is copied in the call


def test_inline_staging_copies_in_the_call(tmp_path):
    """With cpu_staging='inline' the call returns with every copy done: the tensors may
    change at once (no optimizer hook or wait_staged needed), and the checkpoint holds
    the values of the call."""
    w = torch.randn(2048, 1024)  # 8 MiB through a 4 MiB pool: copies wait for writes
    before = w.clone()
    snap = ckpt.Snapshotter(small_options(cpu_staging="inline"))
    h = snap.save_async({"w": w}, tmp_path / "c")
    assert h.stats.copied_s > 0 and h.stats.copied_s <= h.stats.call_s
    assert h.stats.hook_wait_s == 0.0
    w.mul_(3)
    h.result(timeout=60)
    out = torch.empty_like(w)
    ckpt.load({"w": out}, tmp_path / "c")
    assert torch.equal(out, before)
    snap.close()
