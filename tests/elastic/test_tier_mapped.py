"""The memory tier stages straight into its files' pages (issue #34): one copy of each
byte, its crc32c in the same pass, no second write; a retired step's files are the next
step's pages; SIGKILL during such a copy leaves the previous step whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckpt
from ckpt import MemoryTierOptions, tools
from ckpt.elastic import MemoryTier

MIB = 1 << 20


def _state(step: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every byte tells the step it belongs to: a torn step shows two values."""
    return {"w": torch.full((512, 1024), float(step), device=device),  # 2 MiB, whole-row chunks
            "b": torch.full((1000,), float(step), device=device),  # a pack member
            "e": torch.full((333, 77), float(step), device=device)}  # edge chunks


def _files(step_dir: Path) -> dict[str, int]:
    return {os.fspath(p.relative_to(step_dir)): p.stat().st_ino for p in step_dir.rglob("*")
            if p.is_file() and p.name not in ("manifest.json", "complete.json")}


def test_a_tier_step_is_one_copy_into_its_files_and_steady_steps_reuse_their_pages(tmp_path):
    tier = MemoryTier(os.fspath(tmp_path / "run"), MemoryTierOptions(node_dir=os.fspath(tmp_path / "node"), replicas=0))
    try:
        files = []
        for s in range(4):
            h = tier.snapshot(s, {"m": _state(s)})
            assert h is not None
            st = h.result()
            tier.wait()
            assert st.rewritten_bytes == 0  # nothing written again from a pool block
            assert st.crc_reread_bytes < st.bytes // 4  # only edge chunks are checksummed apart
            files.append(_files(tier.root / f"step-{s:09d}"))
        assert tier.stats.rewritten_bytes == 0 and tier.stats.staged_bytes > 4 * 2 * MIB
        assert files[2] == files[0] and files[3] == files[1]  # the retired steps' files (inodes): their pages
        step3 = os.fspath(tier.root / "step-000000003")
        assert tools.verify(step3).ok
        out = {"m": {k: torch.zeros_like(v) for k, v in _state(0).items()}}
        ckpt.load(out, step3)
        assert all(torch.equal(out["m"][k], v) for k, v in _state(3).items())
    finally:
        tier.close()


def test_a_save_elsewhere_writes_its_pool_blocks_as_before(tmp_path):
    """The counters the bench reports: a plain local save copies into the pool and writes again."""
    st = ckpt.save({"m": _state(1)}, tmp_path / "ck")
    assert st.rewritten_bytes >= st.bytes > 0


_CHILD = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {root!r})
    from ckpt import MemoryTierOptions
    from ckpt.elastic import MemoryTier
    from tests.elastic.test_tier_mapped import _state
    tier = MemoryTier({run!r}, MemoryTierOptions(node_dir={node!r}, replicas=0))
    for s in range(10**6):
        tier.snapshot(s, {{"m": _state(s)}})
        tier.wait()
        print(s, flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_while_staging_into_the_files_leaves_the_previous_step_whole(tmp_path, seed):
    run, node = os.fspath(tmp_path / "run"), os.fspath(tmp_path / "node")
    code = _CHILD.format(root=os.fspath(Path(__file__).parents[2]), run=run, node=node)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    done = 0
    for line in proc.stdout:  # a few steps in, so the next ones write into retired steps' files
        done = int(line)
        if done >= 3 + seed:
            break
    # killed at some point of a later step: its copy into the recycled files, its commit, retention
    torch.manual_seed(seed)
    for _ in range(int(torch.randint(0, 3, ()).item())):
        proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    tier = MemoryTier(run, MemoryTierOptions(node_dir=node, replicas=0))
    try:
        out = {"m": {k: torch.zeros_like(v) for k, v in _state(0).items()}}
        got = tier.restore(out)
        assert got is not None and got.step >= done
        assert all(torch.equal(out["m"][k], v) for k, v in _state(got.step).items())
        assert tools.verify(os.fspath(tier.root / f"step-{got.step:09d}")).ok
    finally:
        tier.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_state_is_copied_by_dma_into_the_tier_files(tmp_path):
    """The tier files' mappings are registered with CUDA: the device-to-host copy lands in them."""
    tier = MemoryTier(os.fspath(tmp_path / "run"), MemoryTierOptions(node_dir=os.fspath(tmp_path / "node"), replicas=0))
    try:
        for s in range(3):
            h = tier.snapshot(s, {"m": _state(s, "cuda")})
            assert h is not None
            st = h.result()
            tier.wait()
            assert st.rewritten_bytes == 0
        out = {"m": {k: torch.zeros_like(v) for k, v in _state(0).items()}}
        ckpt.load(out, os.fspath(tier.root / "step-000000002"))
        assert all(torch.equal(out["m"][k], v) for k, v in _state(2).items())
    finally:
        tier.close()
