"""The local fast path of loading ("direct reads"): whole inner chunks read with
os.preadv straight into CPU destinations, crc32c checked there; everything else
(boxes cut along trailing dims, non-contiguous destinations) through tensorstore;
chunks needed in part or padded at the edge go through a checked scratch buffer.

Round trips are bit-exact and say (``LoadStats.bytes_direct``) exactly how many bytes
took the fast path; damaged shards raise CorruptCheckpointError naming the key, the shard
file and the chunk."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckpt
from ckpt._engine._arrays import open_for_write
from ckpt._engine._load import Loader
from ckpt._engine._plan import ArrayLayout, zarr_metadata
from ckpt._format import storage_dtype, storage_torch_dtype
from ckpt.errors import CorruptCheckpointError
from ckpt.storage import split_checkpoint_url
from tests._helpers import same_bits
from tests.test_errors import rewrite_manifest

google_crc32c = pytest.importorskip("google_crc32c")
pytestmark = pytest.mark.skipif(google_crc32c.implementation != "c", reason="no hardware crc32c: no fast path")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64, "bool": torch.bool}
# small shards and chunks so a tensor of a few hundred KiB has several of each
OPTS = ckpt.SaveOptions(max_shard_bytes=64 << 10, chunk_bytes=16 << 10, pack_threshold=1 << 10,
                        pool_bytes=16 << 20)


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t.view(storage_torch_dtype(str(t.dtype)[6:]))


def _save(state: dict[str, Any], url: Path, opts: ckpt.SaveOptions = OPTS) -> None:
    snap = ckpt.Snapshotter(opts)
    try:
        snap.save_async(state, str(url)).result()
    finally:
        snap.close()


def _storage_of(url: Path, key: str) -> dict[str, Any]:
    return json.loads((url / "manifest.json").read_bytes())["entries"][key]["storage"]


def _relayout(url: Path, key: str, t: torch.Tensor, shard_rows: int, chunk_rows: int) -> None:
    """Rewrite ``key``'s array with shards / inner chunks of the given rows, which need not
    divide the shape (edge shards and chunks padded with the fill value), as another
    writer might."""
    st = _storage_of(url, key)
    storage, name = split_checkpoint_url(str(url))
    shutil.rmtree(url / st["path"])
    shape = tuple(t.shape)
    lay = ArrayLayout(st["path"], shape, (shard_rows,) + shape[1:], (chunk_rows,) + shape[1:])
    dt = str(t.dtype)[6:]
    arr = open_for_write(storage, f"{name}/{st['path']}", zarr_metadata(lay, storage_dtype(dt), {}),
                         create=True).result()
    arr.write(_bits(t).numpy() if t.dtype != torch.bool else t.numpy()).result()

    def mutate(body: dict[str, Any]) -> None:
        s = body["entries"][key]["storage"]
        s["shard_shape"], s["chunk_shape"] = list(lay.shard_shape), list(lay.chunk_shape)

    rewrite_manifest(url, mutate)


def _expected_direct(n: int, shard: int, chunk: int, lo: int, hi: int, row_bytes: int) -> int:
    """Bytes of rows [lo, hi) delivered by direct reads: all of them (chunks needed only in
    part, or padded at the array's edge, go through a scratch buffer, still direct)."""
    return (min(hi, n) - lo) * row_bytes


def _expected_fetched(n: int, shard: int, chunk: int, lo: int, hi: int, row_bytes: int) -> int:
    """Stored bytes of the whole chunks overlapping rows [lo, hi)."""
    total = 0
    for s0 in range(0, n, shard):
        for c0 in range(s0, s0 + shard, chunk):
            if c0 < min(hi, n) and lo < c0 + chunk:
                total += chunk * row_bytes
    return total


def _load_box(url: Path, key: str, offs: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype,
              shape: tuple[int, ...], dest: torch.Tensor | None = None) -> tuple[torch.Tensor, ckpt.LoadStats]:
    storage, name = split_checkpoint_url(str(url))
    loader = Loader(storage, name, ckpt.read_manifest(str(url)), strict=False)
    out = torch.empty(sizes, dtype=dtype) if dest is None else dest
    loader.read_into(key, out, offs, global_shape=shape)
    return out, loader.execute()


SHAPES = {
    "1d": (40_000,),
    "3d": (96, 10, 30),
    "3d-prime-rows": (97, 7, 11),  # 1-row chunks where the planner must divide 97
}


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("edges", [False, True], ids=["aligned", "edge-chunks"])
def test_round_trip_takes_the_fast_path(tmp_path: Path, dt: str, shape: str, edges: bool) -> None:
    dtype, shp = DTYPES[dt], SHAPES[shape]
    t = _tensor(shp, dtype)
    url = tmp_path / "step-000000001"
    _save({"w": t}, url)
    st = _storage_of(url, "w")
    assert st["layout"] == "array", st
    n = shp[0]
    if edges:  # shards and chunks that do not divide the rows: the last ones are padded
        chunk_rows = 3001 if n > 1000 else 7  # (zarr's inner chunks always divide the shard)
        _relayout(url, "w", t, 3 * chunk_rows, chunk_rows)
        assert n % (3 * chunk_rows) and n % chunk_rows
    st = _storage_of(url, "w")
    shard_rows, chunk_rows = st["shard_shape"][0], st["chunk_shape"][0]
    row_bytes = t[0].numel() * t.element_size() if t.dim() > 1 else t.element_size()

    # a whole load through the public API
    dest = torch.zeros_like(t) if dtype != torch.bool else torch.zeros(shp, dtype=torch.bool)
    stats = ckpt.load({"w": dest}, str(url))
    assert same_bits(dest, t)
    direct = _expected_direct(n, shard_rows, chunk_rows, 0, n, row_bytes)
    assert direct > 0
    assert stats.bytes_direct == direct
    assert stats.bytes_read == t.numel() * t.element_size()
    assert stats.bytes_read <= stats.bytes_fetched

    # partial loads along dim 0, as a resharded rank would ask for
    for lo, hi in [(0, n), (1, n - 1), (n // 3, 2 * n // 3 + 1), (chunk_rows, n), (n - 1, n), (5, 6)]:
        offs = (lo,) + (0,) * (len(shp) - 1)
        sizes = (hi - lo,) + shp[1:]
        out, stats = _load_box(url, "w", offs, sizes, dtype, shp)
        assert same_bits(out, t[lo:hi]), (lo, hi)
        assert stats.bytes_direct == _expected_direct(n, shard_rows, chunk_rows, lo, hi, row_bytes), (lo, hi)
        assert stats.bytes_fetched == _expected_fetched(n, shard_rows, chunk_rows, lo, hi, row_bytes), (lo, hi)
        assert stats.bytes_read == out.numel() * out.element_size()
        assert stats.bytes_read <= stats.bytes_fetched


def test_partial_trailing_dims_and_strided_destinations_use_tensorstore(tmp_path: Path) -> None:
    t = _tensor((64, 8, 100), torch.float32)
    url = tmp_path / "step-000000001"
    _save({"w": t}, url)
    # a box cut along a trailing dim: no chunk is a whole run of bytes of it
    out, stats = _load_box(url, "w", (0, 2, 0), (64, 3, 100), torch.float32, tuple(t.shape))
    assert torch.equal(out, t[:, 2:5]) and stats.bytes_direct == 0
    # a destination that is not C-contiguous
    dest = torch.empty(100, 8, 64).permute(2, 1, 0)
    out, stats = _load_box(url, "w", (0, 0, 0), tuple(t.shape), torch.float32, tuple(t.shape), dest=dest)
    assert torch.equal(out, t) and stats.bytes_direct == 0
    # a contiguous slice of a larger tensor (a view) still reads directly
    big = torch.zeros(80, 8, 100)
    dest = big[8:72]
    stats = ckpt.load({"w": dest}, str(url))
    assert torch.equal(big[8:72], t) and big[:8].eq(0).all() and big[72:].eq(0).all()
    assert stats.bytes_direct == t.numel() * 4


def test_turned_off_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = _tensor((64, 1000), torch.float32)
    url = tmp_path / "step-000000001"
    _save({"w": t}, url)
    monkeypatch.setenv("CKPT_DIRECT_READS", "0")
    dest = torch.zeros_like(t)
    stats = ckpt.load({"w": dest}, str(url))
    assert torch.equal(dest, t) and stats.bytes_direct == 0


def test_many_runs_with_a_small_window(tmp_path: Path) -> None:
    """More direct reads than the in-flight window holds at once: all land, in order."""
    t = _tensor((4096, 256), torch.float32)  # 4 MiB; 64 KiB shards, 16 KiB chunks
    url = tmp_path / "step-000000001"
    _save({"w": t}, url)
    storage, name = split_checkpoint_url(str(url))
    loader = Loader(storage, name, ckpt.read_manifest(str(url)), inflight_bytes=100 << 10)
    dest = torch.zeros_like(t)
    loader.read_into("w", dest)
    stats = loader.execute()
    assert torch.equal(dest, t) and stats.bytes_direct == t.numel() * 4
    shard_rows = _storage_of(url, "w")["shard_shape"][0]
    assert stats.reads == 4096 // shard_rows > 1  # one run per shard


# -- damage -----------------------------------------------------------------------
ROWS, COLS = 1024, 1024  # float32: 4 MiB = 4 shards of 1 MiB, 4 chunks of 256 KiB each
DAMAGE_OPTS = ckpt.SaveOptions(max_shard_bytes=1 << 20, chunk_bytes=256 << 10, pool_bytes=16 << 20)


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, torch.Tensor, Path]:
    t = _tensor((ROWS, COLS), torch.float32, seed=3)
    url = tmp_path / "step-000000001"
    _save({"w": t}, url, DAMAGE_OPTS)
    st = _storage_of(url, "w")
    assert st["shard_shape"] == [256, COLS] and st["chunk_shape"] == [64, COLS], st
    return url, t, url / st["path"] / "c.2.0"


def _index(shard: Path) -> tuple[bytes, np.ndarray]:
    raw = shard.read_bytes()
    idx = np.frombuffer(raw[-(4 * 16 + 4):-4], dtype="<u8").reshape(4, 2).copy()
    return raw, idx


def _write_index(shard: Path, raw: bytes, idx: np.ndarray) -> None:
    body = idx.astype("<u8").tobytes()
    shard.write_bytes(raw[:-(4 * 16 + 4)] + body + struct.pack("<I", google_crc32c.value(body)))


def _load_fails(url: Path, *words: str) -> str:
    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.load({"w": torch.zeros(ROWS, COLS)}, str(url))
    msg = str(ei.value)
    assert ei.value.key == "w" and "'w'" in msg, msg
    assert "arrays/w.zarr/c.2.0" in msg and ei.value.hint, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_shard_format_matches_what_tensorstore_writes(saved) -> None:
    url, t, shard = saved
    raw, idx = _index(shard)
    assert google_crc32c.value(raw[-68:-4]) == struct.unpack("<I", raw[-4:])[0]
    for j, (off, nb) in enumerate(idx):
        assert nb == 64 * COLS * 4 + 4
        data = raw[off:off + nb - 4]
        assert google_crc32c.value(data) == struct.unpack("<I", raw[off + nb - 4:off + nb])[0]
        assert data == t[512 + 64 * j:512 + 64 * (j + 1)].numpy().tobytes()


def test_flipped_data_byte(saved) -> None:
    url, _, shard = saved
    raw, idx = _index(shard)
    b = bytearray(raw)
    b[int(idx[1, 0]) + 1000] ^= 0x10
    shard.write_bytes(bytes(b))
    msg = _load_fails(url, "checksum", "chunk 1")
    assert "crc32c" in msg


def test_flipped_chunk_crc(saved) -> None:
    url, _, shard = saved
    raw, idx = _index(shard)
    b = bytearray(raw)
    b[int(idx[3, 0] + idx[3, 1]) - 2] ^= 0x01
    shard.write_bytes(bytes(b))
    _load_fails(url, "checksum", "chunk 3")


def test_flipped_index_byte(saved) -> None:
    url, _, shard = saved
    b = bytearray(shard.read_bytes())
    b[-20] ^= 0x04
    shard.write_bytes(bytes(b))
    _load_fails(url, "checksum", "index")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.0])
def test_truncated_shard(saved, keep: float) -> None:
    url, _, shard = saved
    raw = shard.read_bytes()
    shard.write_bytes(raw[:int(keep * len(raw))])
    _load_fails(url)


def test_deleted_shard(saved) -> None:
    url, _, shard = saved
    shard.unlink()
    _load_fails(url, "missing")


def test_absent_chunk(saved) -> None:
    url, _, shard = saved
    raw, idx = _index(shard)
    idx[2] = [2**64 - 1, 2**64 - 1]
    _write_index(shard, raw, idx)
    _load_fails(url, "missing", "chunk 2")


def test_wrong_chunk_size_in_index(saved) -> None:
    url, _, shard = saved
    raw, idx = _index(shard)
    idx[0, 1] -= 8
    _write_index(shard, raw, idx)
    _load_fails(url, "chunk 0")


def test_index_pointing_past_the_data(saved) -> None:
    url, _, shard = saved
    raw, idx = _index(shard)
    idx[1, 0] = len(raw) - 10
    _write_index(shard, raw, idx)
    _load_fails(url)


def test_damage_outside_the_requested_rows_is_not_read(saved) -> None:
    url, t, shard = saved
    raw, idx = _index(shard)
    b = bytearray(raw)
    b[int(idx[3, 0]) + 5] ^= 0xFF  # rows 704..767
    shard.write_bytes(bytes(b))
    out, stats = _load_box(url, "w", (0, 0), (704, COLS), torch.float32, (ROWS, COLS))
    assert torch.equal(out, t[:704]) and stats.bytes_direct == 704 * COLS * 4


def test_damage_in_a_chunk_needed_only_in_part_is_caught(saved) -> None:
    """A resharded rank needing a few rows of a damaged chunk: the whole chunk is read
    and checked (through the scratch buffer), never just the rows."""
    url, t, shard = saved
    raw, idx = _index(shard)
    b = bytearray(raw)
    b[int(idx[3, 0]) + 4 * COLS * 40] ^= 0xFF  # row 744 of chunk 3 (rows 704..767); rows 704..709 are intact
    shard.write_bytes(bytes(b))
    with pytest.raises(CorruptCheckpointError) as ei:
        _load_box(url, "w", (700, 0), (10, COLS), torch.float32, (ROWS, COLS))
    assert "checksum" in str(ei.value) and "chunk 3" in str(ei.value), str(ei.value)
    out, stats = _load_box(url, "w", (600, 0), (104, COLS), torch.float32, (ROWS, COLS))  # ends before chunk 3
    assert torch.equal(out, t[600:704]) and stats.bytes_direct == 104 * COLS * 4


def test_a_symlinked_shard_is_refused(saved, tmp_path: Path) -> None:
    url, _, shard = saved
    outside = tmp_path / "elsewhere"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    with pytest.raises(ckpt.errors.UnsafePathError):
        ckpt.load({"w": torch.zeros(ROWS, COLS)}, str(url))
