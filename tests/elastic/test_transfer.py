"""Tier files moved between ranks (``ckpt.elastic._transfer.swap``) over real gloo groups:
what a replica holds is byte-for-byte what its node wrote, whatever the two sides send,
and a retired step's files lend their pages without lending their bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ckpt.elastic._transfer import CHUNK
from tests.dist._launch import launch

pytestmark = pytest.mark.slow


def _content(rank: int, i: int, n: int) -> bytes:
    seed = hashlib.sha256(f"{rank}-{i}".encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def _sizes(rank: int) -> list[int]:
    """Per rank a different bundle: several multi-message files and an empty one on some
    ranks, a single small file or nothing on others (the two sides of one exchange then
    move very different numbers of messages)."""
    return {0: [3 * CHUNK + 17, 0, CHUNK, 5, 2 * CHUNK - 1], 1: [123], 2: []}[rank % 3]


def _ring(root: str, spare_sizes: dict[str, int] | None) -> dict[str, object]:
    """Every rank sends its bundle to the next rank and receives the previous one's; with
    ``spare_sizes``, into spare files (garbage bytes, some longer, some shorter) first."""
    import torch.distributed as dist

    from ckpt.elastic._transfer import bundle_of, swap

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = Path(root) / f"src{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(_sizes(rank)):
        p = mine / "sub" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_content(rank, i, n))
        paths.append(f"sub/f{i}")
    spare = None
    if spare_sizes is not None:
        spare = Path(root) / f"spare{rank}"
        for rel, n in spare_sizes.items():
            (spare / rel).parent.mkdir(parents=True, exist_ok=True)
            (spare / rel).write_bytes(b"\xee" * n)
    dst, src = (rank + 1) % world, (rank - 1) % world
    into = Path(root) / f"dst{rank}"
    got = swap(dist.group.WORLD, bundle_of(mine, paths), dst, into, src, spare=spare)
    dist.barrier()
    ok = all((into / rel).read_bytes() == _content(src, int(rel.rsplit("f", 1)[1]), n) for rel, n in got)
    return {"got": got, "ok": ok, "expected": [(f"sub/f{i}", n) for i, n in enumerate(_sizes(src))],
            "left": sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file()),
            "spare_left": [] if spare is None else sorted(str(p.relative_to(spare)) for p in spare.rglob("*")
                                                           if p.is_file())}


@pytest.mark.parametrize("world", [2, 3])
def test_a_ring_exchange_of_unequal_bundles_delivers_every_byte(tmp_path, world):
    results = launch(_ring, world, os.fspath(tmp_path), None, timeout=120)
    for r in results:
        assert r["got"] == r["expected"]
        assert r["ok"]
        assert r["left"] == sorted(p for p, _n in r["expected"])  # no .part left behind


def test_received_files_reuse_spare_files_of_any_size_and_hold_only_new_bytes(tmp_path):
    # rank 1 receives rank 0's bundle: f0 and f4 have longer spares, f2 a shorter one, f1
    # (empty) a non-empty one, f3 none; a spare the bundle does not name stays put
    spares = {"sub/f0": 4 * CHUNK, "sub/f1": 100, "sub/f2": 10, "sub/f4": 3 * CHUNK, "other": 7}
    results = launch(_ring, 2, os.fspath(tmp_path), spares, timeout=120)
    r = results[1]
    assert r["got"] == r["expected"] and r["ok"]
    assert r["spare_left"] == ["other"]  # every named spare was renamed into its replica
    assert r["left"] == sorted(p for p, _n in r["expected"])
