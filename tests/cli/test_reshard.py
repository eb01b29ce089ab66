"""`ckpt reshard`: an offline, streaming rewrite for another world size."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import tools
from ckpt._cli.main import main
from ckpt._engine._catalog import read_manifest
from ckpt._engine._load import Loader
from ckpt._tools._reshard import target_boxes
from ckpt.errors import CheckpointExistsError
from ckpt.storage import split_checkpoint_url


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(300, 1001), torch.nn.Linear(1001, 7))
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 300)).sum().backward()
    opt.step()
    return {"model": m, "optim": opt, "emb": torch.randn(4003, 64).to(torch.bfloat16), "step": 3,
            "rng": ckpt.RNGState()}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[str, dict]:
    state = _state()
    url = str(tmp_path / "run" / "step-000000003")
    ckpt.save(state, url, step=3)
    return url, state


@pytest.mark.parametrize("world", [1, 3, 4])
def test_reshard_then_each_rank_reads_its_own_objects(saved, tmp_path: Path, world: int) -> None:
    src, state = saved
    dst = str(tmp_path / f"w{world}" / "step-000000003")
    r = tools.reshard(src, dst, world, memory_bytes=8 << 20)
    assert r["world_size"] == world and len(r["bytes_per_rank"]) == world
    assert tools.verify(dst).ok
    man = ckpt.read_manifest(dst)
    assert man.world_size == world and man.layout["resharded_from"]["world_size"] == 1
    storage, name = split_checkpoint_url(dst)
    big = man.entries["emb"]
    shape = tuple(big["shape"])
    for rank, (offs, sizes) in enumerate(target_boxes(shape, world, "shard0")):
        if sizes[0] == 0:
            continue
        loader = Loader(storage, name, man, strict=False, rank=rank, world_size=world)
        out = torch.empty(sizes, dtype=torch.bfloat16)
        loader.read_into("emb", out, offs, global_shape=shape)
        stats = loader.execute()
        assert torch.equal(out.view(torch.int16), state["emb"][offs[0]:offs[0] + sizes[0]].view(torch.int16))
        assert stats.bytes_fetched <= 2 * stats.bytes_read  # this rank's own objects, not others'
    # a whole load (one process) is bit-exact, values and per-rank state included
    fresh = _state(seed=9)
    ckpt.load(fresh, dst)
    for k, v in state["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[k], v)
    assert torch.equal(fresh["emb"].view(torch.int16), state["emb"].view(torch.int16))
    assert fresh["step"] == 3


def test_reshard_replicate_layout_and_cli(saved, tmp_path: Path, capsys) -> None:
    src, _ = saved
    dst = str(tmp_path / "rep" / "step-000000003")
    assert main(["reshard", src, dst, "--world-size", "2", "--layout", "replicate", "--memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "resharded" in out and "for 2 ranks (replicate)" in out
    man = read_manifest(*split_checkpoint_url(dst))
    boxes = man.entries["emb"]["boxes"]
    assert len(boxes) == 1 and boxes[0]["sizes"] == [4003, 64]  # written once
    # destination exists -> exit 1 with a one-line error; --overwrite replaces it
    assert main(["reshard", src, dst, "--world-size", "2"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["reshard", src, dst, "--world-size", "2", "--overwrite"]) == 0


def test_interrupted_reshard_leaves_nothing_valid_and_rerun_finishes(saved, tmp_path: Path) -> None:
    src, state = saved
    dst = str(tmp_path / "int" / "step-000000003")
    seen = []

    def boom(n: int, total: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tools.reshard(src, dst, 3, memory_bytes=4 << 20, progress=boom)
    assert ckpt.list_checkpoints(tmp_path / "int", include_incomplete=True) == []
    tools.reshard(src, dst, 3, memory_bytes=4 << 20)
    fresh = _state(seed=5)
    ckpt.load(fresh, dst)
    assert torch.equal(fresh["emb"].view(torch.int16), state["emb"].view(torch.int16))
    with pytest.raises(CheckpointExistsError):
        tools.reshard(src, dst, 3)


def test_reshard_memory_stays_bounded(tmp_path: Path) -> None:
    """A 256 MiB checkpoint rewritten with a 16 MiB budget: peak RSS grows far less."""
    code = textwrap.dedent(f"""
        import resource, torch, ckpt
        from ckpt import tools
        ckpt.save({{"w": torch.randn(64 << 20)}}, {str(tmp_path / 'a' / 'step-1')!r})
        import gc; gc.collect()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tools.reshard({str(tmp_path / 'a' / 'step-1')!r}, {str(tmp_path / 'b' / 'step-1')!r}, 4,
                      memory_bytes=16 << 20)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    # the save's own peak comes first; measure the reshard in a process that saved nothing
    save = subprocess.run([sys.executable, "-c", code.split("import gc")[0]], capture_output=True, text=True,
                          timeout=300)
    assert save.returncode == 0, save.stderr
    only = textwrap.dedent(f"""
        import resource
        from ckpt import tools
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tools.reshard({str(tmp_path / 'a' / 'step-1')!r}, {str(tmp_path / 'b' / 'step-1')!r}, 4,
                      memory_bytes=16 << 20)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", only], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.split()[-1])
    assert grew < 128 << 20, f"peak RSS grew by {grew >> 20} MiB rewriting 256 MiB with a 16 MiB budget"
    assert tools.verify(str(tmp_path / "b" / "step-1")).ok


@pytest.mark.s3
def test_reshard_between_local_and_s3(saved, tmp_path: Path, s3_url: str, s3_options: dict) -> None:
    src, state = saved
    up = f"{s3_url}/w2/step-000000003"
    tools.reshard(src, up, 2, memory_bytes=4 << 20, dst_storage_options=s3_options, storage_options={})
    assert tools.verify(up, storage_options=s3_options).ok
    down = str(tmp_path / "back" / "step-000000003")
    tools.reshard(up, down, 3, memory_bytes=4 << 20, storage_options=s3_options, dst_storage_options={})
    fresh = _state(seed=4)
    ckpt.load(fresh, down)
    assert torch.equal(fresh["emb"].view(torch.int16), state["emb"].view(torch.int16))
    assert ckpt.read_manifest(down).world_size == 3
