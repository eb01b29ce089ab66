"""ckpt's torchft CheckpointTransport with real torchft: a lighthouse process, two replica
groups of real processes (FSDP2 on gloo inside a group, torchft across groups). A group
that joins late heals from the live one through ckpt — with the same and with a changed
shard count — and what torchft applied equals the source's state at that step, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from tests.dist._launch import free_port  # noqa: E402

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("_ft_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _lighthouse() -> tuple[subprocess.Popen, str]:
    exe = Path(sys.executable).with_name("torchft_lighthouse")
    port = free_port()
    proc = subprocess.Popen([str(exe), "--min_replicas", "1", "--bind", f"127.0.0.1:{port}",
                             "--join_timeout_ms", "200", "--quorum_tick_ms", "50",
                             "--heartbeat_timeout_ms", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def _group(out: Path, lighthouse: str, group: int, world: int, role: str, kind: str,
           extra_env: dict[str, str]) -> list[subprocess.Popen]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", **extra_env)
    return [subprocess.Popen([sys.executable, str(WORKER), str(out), lighthouse, str(group), str(r),
                              str(world), str(port), role, kind], env=env,
                             stdout=open(out / f"log-{role}-{r}.txt", "w"), stderr=subprocess.STDOUT)
            for r in range(world)]


def _wait_for(path: Path, procs: list[subprocess.Popen], limit: float = 120) -> None:
    end = time.monotonic() + limit  # a bound on a hang, not a timed assertion
    while not path.exists():
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > end:
            raise AssertionError(f"{path.name} never appeared")
        time.sleep(0.05)


def _logs(out: Path) -> str:
    return "\n".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.glob("log-*.txt")))


def _heal(out: Path, source_world: int, healer_world: int, kind: str = "ckpt",
          source_env: dict[str, str] | None = None) -> list[dict]:
    light, addr = _lighthouse()
    procs: list[subprocess.Popen] = []
    try:
        procs += _group(out, addr, 0, source_world, "source", kind, source_env or {})
        for r in range(source_world):  # the source group is training before the healer starts
            _wait_for(out / f"src-step-{r}", procs)
        while min(int((out / f"src-step-{r}").read_text() or 0) for r in range(source_world)) < 3:
            time.sleep(0.05)
        procs += _group(out, addr, 1, healer_world, "healer", kind, {})
        for p in procs:
            assert p.wait(timeout=180) == 0, _logs(out)
    finally:
        for p in procs + [light]:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((out / f"heal-{r}.json").read_text()) for r in range(healer_world)]


def _check_bit_exact(out: Path, stats: list[dict]) -> None:
    step = stats[0]["step"]
    assert step >= 3 and all(s["step"] == step for s in stats)
    src = torch.load(out / f"src-0-{step}.pt")
    for r in range(len(stats)):
        healed = torch.load(out / f"healed-{r}-{step}.pt")
        assert healed.keys() == src.keys()
        for k in src:
            assert torch.equal(healed[k], src[k]), k


@pytest.mark.parametrize("source_world,healer_world", [(2, 2), (2, 1)], ids=["same", "2to1"])
def test_heal_through_ckpt_is_bit_exact(tmp_path: Path, source_world: int, healer_world: int) -> None:
    stats = _heal(tmp_path, source_world, healer_world)
    _check_bit_exact(tmp_path, stats)
    # each healing rank moved its own share: no more bytes than its own layout holds
    for s in stats:
        assert 0 < s["bytes"] <= 1.1 * s["share_bytes"], s
        assert s["requests"] > 1  # chunked (chunk_bytes=256): never one whole-state response
        # the same layout asks its own group rank's source alone; a reshard asks those it needs
        assert s["sources"] == (1 if source_world == healer_world else source_world), s


def test_torchft_http_transport_heals_same_shape(tmp_path: Path) -> None:
    """The reference the ckpt transport is compared with (same harness, torchft's own)."""
    _check_bit_exact(tmp_path, _heal(tmp_path, 2, 2, kind="http"))


def test_a_corrupted_box_is_detected_and_fetched_again(tmp_path: Path) -> None:
    stats = _heal(tmp_path, 2, 1, source_env={"FT_TEST_CORRUPT": "1"})
    _check_bit_exact(tmp_path, stats)
    assert stats[0]["refetched"] >= 2, stats  # one bad reply per source rank at least
