"""Storage faults: a full file system (a real 8 MiB tmpfs: ckpt's small writes, its direct
array writes and, with CKPT_DIRECT_WRITES=0, tensorstore's array writes hit ENOSPC), a read-only file system, and the S3 server
going away. Each: a typed error from the handle, the training loop keeps running,
committed checkpoints stay intact, gc leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import time
import uuid

import pytest

import ckpt
from ckpt.errors import StorageError, StorageFullError, StoragePermissionError
from tests._helpers import Tally
from tests.reliability import assert_bit_exact, debris, gc_clean, make_state, small_tmpfs

SMALL, BIG = 256, 2048  # rows: 1 MiB and 8 MiB of "w"
TALLY = Tally("resource faults", "")  # cases tried and passed


@pytest.fixture
def tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "small", "8m") as d:
        yield d


def _train(mgr, steps, state_of):
    """A training loop: mgr.step never raises into it."""
    done = 0
    for s in range(steps):
        mgr.step(s, state_of(s))
        done += 1
    mgr.wait()
    return done


@pytest.mark.parametrize("what", ["array", "array-tensorstore", "manifest"])
def test_storage_full(tmpfs, what, monkeypatch):
    TALLY.tried()
    if what == "array-tensorstore":
        monkeypatch.setenv("CKPT_DIRECT_WRITES", "0")
    run = str(tmpfs / "run")
    ckpt.save(make_state(1, SMALL), f"{run}/step-000000001", step=1)
    if what == "manifest":  # fill the disk so that only ckpt's own small writes fail
        with open(tmpfs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        rows = 8  # everything packed: the pack then the manifest hit ENOSPC
    else:
        rows = BIG  # the shard writes (direct, or tensorstore's) hit ENOSPC
    h = ckpt.save_async(make_state(2, rows), f"{run}/step-000000002", step=2)
    with pytest.raises(StorageFullError) as ei:
        h.result(timeout=60)
    assert "space" in str(ei.value)
    # the training loop goes on; the manager records the failure
    mgr = ckpt.CheckpointManager(run, save=2, keep=2, preemption=ckpt.PreemptionOptions(signals=()),
                                 save_on_close=False)
    assert _train(mgr, 4, lambda s: make_state(10 + s, rows)) == 4
    assert mgr.failures and all(isinstance(e, StorageError) for _, e in mgr.failures)
    mgr.close()
    assert [i.step for i in ckpt.list_checkpoints(run)] == [1]
    assert_bit_exact(f"{run}/step-000000001", 1, SMALL)
    if what == "manifest":
        os.unlink(tmpfs / "filler")
    gc_clean(run)
    ckpt.save(make_state(3, SMALL), f"{run}/step-000000003", step=3)  # space again: saving works
    assert_bit_exact(f"{run}/step-000000003", 3, SMALL)
    TALLY.passed()


def test_read_only_filesystem(tmpfs):
    TALLY.tried()
    run = str(tmpfs / "run")
    ckpt.save(make_state(1, SMALL), f"{run}/step-000000001", step=1)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    try:
        for rows in (SMALL, 8):  # tensorstore arrays, and packs + manifest only
            h = ckpt.save_async(make_state(2, rows), f"{run}/step-000000002", step=2)
            with pytest.raises(StoragePermissionError):
                h.result(timeout=60)
        mgr = ckpt.CheckpointManager(run, save=1, preemption=ckpt.PreemptionOptions(signals=()), save_on_close=False)
        assert _train(mgr, 3, lambda s: make_state(10 + s, SMALL)) == 3
        assert len(mgr.failures) == 3
        assert all(isinstance(e, StoragePermissionError) for _, e in mgr.failures), mgr.failures
        mgr.close()
        assert_bit_exact(f"{run}/step-000000001", 1, SMALL)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert [i.step for i in ckpt.list_checkpoints(run)] == [1]
    gc_clean(run)
    TALLY.passed()


def test_s3_server_gone(s3_server, monkeypatch):
    """A moto server of this test only is stopped mid-run: saves fail fast and clearly."""
    pytest.importorskip("moto")
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    TALLY.tried()
    monkeypatch.setenv("CKPT_S3_RETRIES", "1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    opts = {"endpoint_url": f"http://{host}:{port}", "region": "us-east-1",
            "key": s3_server.key, "secret": s3_server.secret,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}}
    bucket = f"gone-{uuid.uuid4().hex[:12]}"
    import boto3

    boto3.client("s3", endpoint_url=opts["endpoint_url"], region_name="us-east-1",
                 aws_access_key_id=s3_server.key, aws_secret_access_key=s3_server.secret).create_bucket(Bucket=bucket)
    run = f"s3://{bucket}/run"
    ckpt.save(make_state(1, SMALL), f"{run}/step-000000001", step=1, storage_options=opts)
    server.stop()
    try:
        t0 = time.monotonic()
        h = ckpt.save_async(make_state(2, SMALL), f"{run}/step-000000002", step=2, storage_options=opts)
        with pytest.raises(StorageError) as ei:
            h.result(timeout=120)
        elapsed = time.monotonic() - t0
        assert elapsed < 120
        print(f"\n[reliability] S3 gone: {type(ei.value).__name__} after {elapsed:.1f}s: {str(ei.value)[:160]}")
        mgr = ckpt.CheckpointManager(run, save=2, preemption=ckpt.PreemptionOptions(signals=()),
                                     save_on_close=False, storage_options=opts)
        assert _train(mgr, 2, lambda s: make_state(10 + s, SMALL)) == 2
        assert mgr.failures
        mgr.close()
    finally:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()  # same in-process backend: the bucket's objects are still there
    try:
        assert [i.step for i in ckpt.list_checkpoints(run, storage_options=opts)] == [1]
        assert_bit_exact(f"{run}/step-000000001", 1, SMALL, storage_options=opts)
        gc_clean(run, **opts)
        assert not debris(run, **opts)
    finally:
        server.stop()
    TALLY.passed()
