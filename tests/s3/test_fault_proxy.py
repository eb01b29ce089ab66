"""ckpt over a misbehaving S3: a fault-injecting proxy (tests/s3/_proxy.py) sits between
ckpt and the local moto server and, on a seeded share of requests, delays them, answers
500 / 503 / SlowDown, or resets the connection. Saves and loads must still be bit-exact;
with the server gone, a save must fail clearly within its deadline and leave the last
committed checkpoint loadable."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch

import ckpt
from ckpt.errors import StorageError
from ckpt.storage._s3 import S3Storage
from tests._s3server import S3Server
from tests.s3._proxy import FAULTS, FaultProxy

pytestmark = pytest.mark.s3

SHARE = 0.10
OPTIONS = ckpt.SaveOptions(pool_bytes=8 << 20, max_shard_bytes=1 << 20)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    if s3_server.external:
        pytest.skip("the fault proxy sits in front of the local moto server only")
    port = urlsplit(s3_server.endpoint_url).port
    assert urlsplit(s3_server.endpoint_url).hostname == "127.0.0.1"
    p = FaultProxy(port)
    yield p
    p.stop()


def _opts(p: FaultProxy, server_options: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """``server_options`` (the test's s3_options) with the proxy as the endpoint."""
    return {**server_options, "endpoint_url": p.endpoint_url, **extra}


def make_state(seed: int) -> dict[str, Any]:
    """A few MiB in several array-layout tensors (several 1 MiB shards each), many small
    tensors (packs) and plain values."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {
        "w1": torch.randn(768, 1024, generator=g),  # 3 MiB float32
        "w2": torch.randn(512, 1024, generator=g).to(torch.bfloat16),  # 1 MiB
        "emb": torch.randint(-2**31, 2**31 - 1, (300, 1000), generator=g, dtype=torch.int32),
        "f64": torch.randn(130, 1025, generator=g, dtype=torch.float64),  # odd shape, ~1 MiB
        "step": seed,
        "name": f"run-{seed}",
    }
    for i in range(40):  # small: packed together
        state[f"bias{i}"] = torch.randn(17 + i, generator=g)
    state["mask"] = torch.rand(1000, generator=g) > 0.5
    return state


def zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def assert_bit_exact(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        g = got[k]
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and g.shape == w.shape, k
            if w.dtype == torch.bool:
                assert torch.equal(g, w), k
            else:
                assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), k
        else:
            assert g == w, k


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_save_and_load_survive_ten_percent_faults(proxy: FaultProxy, s3_url: str, s3_options: dict[str, Any], seed: int) -> None:
    proxy.configure(share=SHARE, seed=seed)
    opts = _opts(proxy, s3_options, deadline_s=60)
    run = f"{s3_url}/run"
    snap = ckpt.Snapshotter(OPTIONS)
    try:
        states = [make_state(seed * 10 + i) for i in range(3)]
        for i, state in enumerate(states):
            stats = snap.save_async(state, f"{run}/step-{i:09d}", step=i, storage_options=opts).result()
            assert stats.objects > 8  # several shards and packs, not one object
        for i, state in enumerate(states):
            got = zeros_like(state)
            ckpt.load(got, f"{run}/step-{i:09d}", storage_options=opts)
            assert_bit_exact(got, state)
        assert [c.step for c in ckpt.list_checkpoints(run, storage_options=opts)] == [2, 1, 0]
    finally:
        snap.close()
    counts = proxy.injected()
    print(f"\n[fault proxy] seed {seed}: {proxy.counts['requests']} requests, injected {counts}")
    assert proxy.counts["requests"] > 100
    for kind in FAULTS:
        assert counts[kind] > 0, (kind, counts)
    total = sum(counts.values())
    assert 0.04 * proxy.counts["requests"] < total < 0.2 * proxy.counts["requests"]


def test_server_gone_fails_within_the_deadline(proxy: FaultProxy, s3_url: str, s3_options: dict[str, Any]) -> None:
    deadline = 4.0
    opts = _opts(proxy, s3_options, deadline_s=deadline)
    run = f"{s3_url}/run"
    first = make_state(7)
    snap = ckpt.Snapshotter(OPTIONS)
    try:
        snap.save_async(first, f"{run}/step-000000001", step=1, storage_options=opts).result()

        # 1. The server dies in the middle of a save: every request is reset.
        proxy.configure(share=0.0)
        calls = {"n": 0}

        def die_after_some(method: str, path: str) -> str | None:
            calls["n"] += 1
            if calls["n"] == 8:
                proxy.down()
            return None

        proxy.rules.append(die_after_some)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            snap.save_async(make_state(8), f"{run}/step-000000002", step=2, storage_options=opts).result()
        elapsed = time.monotonic() - t0
        print(f"\n[fault proxy] died mid-save: {type(info.value).__name__} after {elapsed:.1f} s: "
              f"{str(info.value)[:300]}")
        assert proxy.counts["down"] > 0
        assert elapsed < 2 * deadline + 5  # the writes give up, then the cleanup, each bounded
        assert "s3://" in str(info.value)

        # 2. Nothing listens any more: connections are refused.
        proxy.stop()
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            snap.save_async(make_state(9), f"{run}/step-000000003", step=3, storage_options=opts).result()
        elapsed = time.monotonic() - t0
        print(f"[fault proxy] server gone: {type(info.value).__name__} after {elapsed:.1f} s: "
              f"{str(info.value)[:300]}")
        # The failing operation (checking the target) gives up at the deadline; the
        # engine's cleanup of the failed save then makes one more bounded attempt.
        assert elapsed < 2 * deadline + 3
        assert not isinstance(info.value, FileNotFoundError)
        assert info.value.hint and "endpoint" in info.value.hint
    finally:
        snap.close()

    # The committed checkpoint is intact, read straight from the server.
    direct = s3_options
    got = zeros_like(first)
    ckpt.load(got, f"{run}/step-000000001", storage_options=direct)
    assert_bit_exact(got, first)
    assert [c.step for c in ckpt.list_checkpoints(run, storage_options=direct)] == [1]


def test_closed_port_is_a_clear_error_within_the_deadline(proxy: FaultProxy, s3_url: str, s3_options: dict[str, Any]) -> None:
    proxy.stop()  # its port is now closed
    bucket, prefix = urlsplit(s3_url).netloc, urlsplit(s3_url).path.strip("/")
    st = S3Storage(bucket, prefix, **_opts(proxy, s3_options, deadline_s=2.0))
    for op in (lambda: st.write_bytes("m.json", b"{}"), lambda: st.read_bytes("m.json"), st.list_dirs):
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            op()
        assert time.monotonic() - t0 < 2.0 + 1.5
        assert "deadline" in str(info.value) and st.endpoint_url in str(info.value.hint)


def test_multipart_upload_survives_faults(proxy: FaultProxy, s3_url: str, s3_options: dict[str, Any]) -> None:
    import os

    proxy.configure(share=0.2, seed=5)
    bucket, prefix = urlsplit(s3_url).netloc, urlsplit(s3_url).path.strip("/")
    st = S3Storage(bucket, prefix, **_opts(proxy, s3_options, deadline_s=60, part_bytes=5 << 20,
                                          multipart_threshold=10 << 20, upload_concurrency=3))
    data = os.urandom((17 << 20) + 12345)  # 4 parts, the last one short
    st.write_bytes("big.bin", data)
    assert st.stats["multipart_uploads"] == 1
    assert st.size("big.bin") == len(data)
    assert st.read_bytes("big.bin") == data
    assert st.read_bytes("big.bin", 5 << 20, (5 << 20) + 100) == data[5 << 20:(5 << 20) + 100]


def test_failed_multipart_upload_is_aborted(proxy: FaultProxy, s3_url: str, s3_options: dict[str, Any], s3_server: S3Server) -> None:
    bucket, prefix = urlsplit(s3_url).netloc, urlsplit(s3_url).path.strip("/")
    st = S3Storage(bucket, prefix, **_opts(proxy, s3_options, deadline_s=3, part_bytes=5 << 20,
                                          multipart_threshold=10 << 20))
    # part 2 always fails (the server keeps answering 500): the upload cannot finish
    proxy.rules.append(lambda method, path: "500" if method == "PUT" and "partNumber=2&" in path + "&" else None)
    with pytest.raises(StorageError) as info:
        st.write_bytes("big.bin", bytes(11 << 20))
    assert "part 2/" in str(info.value)
    assert proxy.counts["forced"] >= 2  # it was retried
    assert st.stats["aborted_uploads"] == 1
    client = s3_server.client()
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert not st.exists("big.bin")
