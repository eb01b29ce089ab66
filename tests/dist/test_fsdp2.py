"""FSDP2 end to end on CPU/gloo: train on 4 ranks, save, load on 2 and on 3 ranks.

A small transformer (two TransformerEncoderLayers and a Linear head), ``fully_shard`` on
each block and on the root, trained 5 steps with AdamW on 4 ranks and saved with
``ckpt.save({"model": m, "optim": opt}, url)``. Rank 0 also keeps full copies of every
parameter and optimizer state (gathered with ``DTensor.full_tensor()``) in a .pt file.
Fresh models and optimizers on 2 and on 3 ranks load the checkpoint; their full
parameters and optimizer states must equal the saved ones bit for bit, and one more
training step must run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._boxes import entry_boxes
from tests.dist._launch import launch
from tests.dist.test_reshard_grid import same_bits

pytestmark = pytest.mark.slow

D_MODEL, HEADS, FF, N_OUT = 32, 4, 80, 7  # 80 and 7 rows do not divide 3 or 4: uneven shards


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True),
        torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FF, dropout=0.0, batch_first=True),
        torch.nn.Linear(D_MODEL, N_OUT),
    )


def _sharded(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the head's output is a view
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = _model(seed)
    for block in list(model)[:2]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> float:
    import torch.distributed as dist

    # each rank its own batch (data parallel), deterministic
    gen = torch.Generator().manual_seed(1000 * i + dist.get_rank())
    x = torch.randn(4, 6, D_MODEL, generator=gen)
    y = torch.randint(0, N_OUT, (4, 6), generator=gen)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, N_OUT), y.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters and optimizer state by name; a collective."""
    out: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[f"param/{n}"] = p.detach().full_tensor().clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            full = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[f"optim/{names[id(p)]}/{k}"] = full.detach().clone()
    return out


def train_and_save(root: str) -> tuple[int, int]:
    import torch.distributed as dist

    import ckpt

    model, opt = _sharded(seed=0)
    for i in range(5):
        _step(model, opt, i)
    stats = ckpt.save({"model": model, "optim": opt}, f"{root}/fsdp")
    full = _full_state(model, opt)
    if dist.get_rank() == 0:
        torch.save(full, f"{root}/full.pt")
    return len(full), stats.bytes


def load_and_compare(root: str) -> dict[str, Any]:
    import ckpt

    model, opt = _sharded(seed=123)  # different initial values: the load must overwrite them
    stats = ckpt.load({"model": model, "optim": opt}, f"{root}/fsdp")
    want = torch.load(f"{root}/full.pt")
    got = _full_state(model, opt)
    bad = sorted(k for k in want if k not in got or not same_bits(want[k], got[k]))
    extra = sorted(set(got) - set(want))
    loss = _step(model, opt, 99)  # training goes on
    steps = {int(st["step"]) for st in opt.state.values()}
    return {"bad": bad, "extra": extra, "n": len(got), "loss": loss, "steps": sorted(steps),
            "bytes_read": stats.bytes_read}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[int]]:
    root = tmp_path_factory.mktemp("fsdp2")
    res = launch(train_and_save, 4, str(root), timeout=150)
    return root, res[0][0], [b for _n, b in res]


def test_fsdp2_save_on_4(saved: tuple[Path, int, list[int]]) -> None:
    import ckpt

    root, n, written = saved
    m = ckpt.read_manifest(str(root / "fsdp"))
    assert m.world_size == 4
    # 2 blocks x 12 parameters + 2 of the head; AdamW: exp_avg, exp_avg_sq, step each
    assert n == 26 * 4
    w = m.entries["model/2.weight"]  # 7 rows on 4 ranks: 2, 2, 2, 1
    assert w["shape"] == [N_OUT, D_MODEL] and len(entry_boxes(w)) == 4
    assert w["sharding"] == {"mesh": [4], "dims": [[0], []]}  # placed by rule: no per-rank list
    steps = [k for k in m.entries if k.endswith("/step")]
    assert len(steps) == 26 and all(len(entry_boxes(m.entries[k])) == 1 for k in steps)  # replicated: once
    per_rank = written  # what each rank wrote (SaveStats.bytes)
    assert max(per_rank) - min(per_rank) <= 4 * FF * D_MODEL, per_rank  # within one piece of even


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_load_resharded(saved: tuple[Path, int, list[int]], world: int) -> None:
    root, n, _written = saved
    res = launch(load_and_compare, world, str(root), timeout=150)
    for r, out in enumerate(res):
        assert out["bad"] == [], f"rank {r} of {world}: {len(out['bad'])} tensors differ: {out['bad'][:10]}"
        assert out["extra"] == [] and out["n"] == n
        assert out["steps"] == [6]  # 5 saved steps + the one after loading
        assert out["loss"] == out["loss"]  # not NaN
