"""The asynchronous engine and a distributed save + resharded load, on S3 (the local
moto server, or CKPT_TEST_S3_ENDPOINT): the same guarantees as on local disk."""

from __future__ import annotations

import pytest
import torch

import ckpt
from tests.dist._launch import launch

pytestmark = pytest.mark.s3


def test_optimizer_step_after_save_async_not_in_checkpoint_on_s3(s3_url, s3_options):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randn(32, 256)
    def step() -> None:
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    for _ in range(2):
        step()
    expected = {k: v.clone() for k, v in m.state_dict().items()}
    snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=2 << 20, max_shard_bytes=256 << 10))
    h = snap.save_async({"model": m, "optim": opt}, f"{s3_url}/run/step-2", storage_options=s3_options)
    step()  # waits in the optimizer's pre-step hook
    stats = h.result(timeout=120)
    assert stats.pool_peak_bytes <= 2 << 20
    m2 = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.BatchNorm1d(1024), torch.nn.Linear(1024, 64))
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    ckpt.load({"model": m2, "optim": opt2}, f"{s3_url}/run/step-2", storage_options=s3_options)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, expected[k]), k
    snap.close()


def _save_worker(url: str, options: dict) -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(4003 * 96, dtype=torch.float32).reshape(4003, 96)
    state = {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.arange(10.0)}
    ckpt.save(state, url, storage_options=options)
    return 0


def _load_worker(url: str, options: dict) -> bool:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(4003 * 96, dtype=torch.float32).reshape(4003, 96)
    w = distribute_tensor(torch.zeros_like(full), mesh, [Shard(0)])
    state = {"w": w, "b": torch.zeros(10)}
    stats = ckpt.load(state, url, storage_options=options)
    return bool(torch.equal(w.full_tensor(), full) and torch.equal(state["b"], torch.arange(10.0))
                and stats.bytes_fetched <= 2 * stats.bytes_read + (1 << 20))


@pytest.mark.slow
def test_distributed_save_on_3_ranks_resharded_load_on_2_on_s3(s3_url, s3_options):
    url = f"{s3_url}/dist/step-1"
    launch(_save_worker, 3, url, s3_options, timeout=150)
    assert ckpt.read_manifest(url, storage_options=s3_options).world_size == 3
    assert launch(_load_worker, 2, url, s3_options, timeout=150) == [True, True]
