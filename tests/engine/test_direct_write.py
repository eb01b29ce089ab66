"""Direct local writes (ckpt/_engine/_direct_write.py): the objects ckpt writes itself on
local disk must be the very bytes tensorstore writes for the same arrays, readable by
zarr-python and tensorstore, and written with O_DIRECT from an aligned pool."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import ckpt
import ckpt.errors
from ckpt._engine._direct_write import DirectWriter
from ckpt._engine._layout import ALIGN, pack_image, shard_image
from ckpt._engine._options import SaveOptions
from ckpt._engine._plan import ArrayLayout
from ckpt._engine._pool import HostPool
from ckpt.storage._file import FileStorage
from tests.test_errors import snapshot

# small chunks and shards, so every case below has many shards, edge chunks and packs
OPTS = SaveOptions(chunk_bytes=64 << 10, max_shard_bytes=1 << 20, pack_threshold=4 << 10, pool_bytes=8 << 20)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "edge": torch.randn(1000, 300, generator=g),  # 1000 rows: padded edge chunks and a short edge shard
        "bf16": torch.randn(7, 33, 129, generator=g).to(torch.bfloat16),
        "bool": torch.randint(0, 2, (5000, 77), generator=g).bool(),
        "c64": torch.randn(64, 5000, generator=g, dtype=torch.complex64),
        "wide": torch.randn(3, 100000, generator=g).double(),  # a row exceeds a chunk: chunks cut dim 1
        "int8": torch.randint(-128, 127, (70000,), generator=g, dtype=torch.int8),
        "strided": torch.randn(2000, 64, generator=g)[:, ::2],  # a non-contiguous source
        "small": torch.arange(10).float(),  # packed
        "scalar": torch.tensor(3.0),  # packed
    }


_objects = snapshot  # every file under a root: relative path -> bytes


def _save(state: dict, url: Path, mode: str, monkeypatch: pytest.MonkeyPatch, staging: str = "background") -> None:
    monkeypatch.setenv("CKPT_DIRECT_WRITES", mode)
    snap = ckpt.Snapshotter(dataclasses.replace(OPTS, cpu_staging=staging))
    try:
        snap.save_async(state, url).result(timeout=120)
    finally:
        snap.close()


def test_objects_are_the_bytes_tensorstore_writes(tmp_path, monkeypatch):
    """Whichever way the block is filled: staged in the background and sealed by the writer,
    or copied in the call with each whole-row chunk checksummed as it is copied."""
    from ckpt._engine import _staging

    fused, packs = [], []
    real, real_pack = _staging._copy_rows_sealed, _staging._copy_pack_sealed
    monkeypatch.setattr(_staging, "_copy_rows_sealed", lambda *a: (fused.append(a[2]), real(*a)))
    monkeypatch.setattr(_staging, "_copy_pack_sealed", lambda *a: (packs.append(len(a[2])), real_pack(*a)))
    state = _state()
    _save(state, tmp_path / "ts", "0", monkeypatch)
    _save(state, tmp_path / "direct", "1", monkeypatch, "background")
    assert not fused and not packs
    _save(state, tmp_path / "inline", "1", monkeypatch, "inline")
    assert sum(fused) >= 10  # whole-row chunks took the fused copy + crc32c
    assert packs == [2]  # and so did the pack ("small", "scalar": each followed by a gap of zeros)
    _save(state, tmp_path / "buffered", "buffered", monkeypatch)
    ts, direct, inline, buffered = (_objects(tmp_path / n) for n in ("ts", "direct", "inline", "buffered"))
    assert set(ts) == set(direct) == set(inline) == set(buffered)
    data = [k for k in ts if "/c." in k]
    assert len(data) >= 12  # every array, several with more than one shard, and the pack
    for k in data:
        assert direct[k] == ts[k], f"{k} differs from what tensorstore writes"
        assert inline[k] == ts[k], f"{k} (inline staging) differs from what tensorstore writes"
        assert buffered[k] == ts[k], k
    for k in ts:
        if k.endswith("zarr.json"):  # the same metadata (tensorstore drops defaults when it stores it)
            import json

            a, b = json.loads(ts[k]), json.loads(direct[k])
            assert a["shape"] == b["shape"] and a["data_type"] == b["data_type"] and a["attributes"] == b["attributes"]
            assert a["chunk_grid"] == b["chunk_grid"], k


@pytest.mark.parametrize("mode", ["1", "buffered"])
def test_direct_checkpoint_loads_bit_exact_in_ckpt_zarr_and_tensorstore(tmp_path, monkeypatch, mode):
    import tensorstore as ts
    import zarr

    state = _state()
    _save(state, tmp_path / "c", mode, monkeypatch)
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(back, tmp_path / "c")
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    for key in ("edge", "wide", "bool", "c64"):
        path = tmp_path / "c" / "arrays" / f"{key}.zarr"
        expect = state[key].numpy()
        assert np.array_equal(zarr.open_array(str(path), mode="r")[...], expect), key
        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path) + "/"}}, read=True).result()
        assert np.array_equal(arr.read().result(), expect), key


@pytest.mark.parametrize("staging", ["inline", "background"])
def test_checkpoint_bytes_do_not_depend_on_what_the_pool_held(tmp_path, monkeypatch, staging):
    """Pack gaps and chunk padding are zeros, never stale bytes of an earlier snapshot,
    whether the copy seals the pack (inline) or the writer does (background)."""
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "1")
    snap = ckpt.Snapshotter(dataclasses.replace(OPTS, cpu_staging=staging))
    try:
        small = {f"b{i}": torch.full((i + 1,), float(i)) for i in range(20)}
        small["edge"] = torch.randn(1000, 300)
        snap.save_async(small, tmp_path / "first").result(timeout=60)
        snap.save_async({"noise": torch.randn(2, 1 << 20)}, tmp_path / "noise").result(timeout=60)  # dirty the pool
        snap.save_async(small, tmp_path / "second").result(timeout=60)
    finally:
        snap.close()
    a, b = _objects(tmp_path / "first"), _objects(tmp_path / "second")
    assert {k: v for k, v in a.items() if "/c." in k} == {k: v for k, v in b.items() if "/c." in k}


def test_pool_is_aligned_for_o_direct():
    pool = HostPool(1 << 20)
    blocks = [pool.acquire(n) for n in (1, 5000, 123457)]
    for blk in blocks:
        assert blk.array.ctypes.data % ALIGN == 0
        assert blk.tensor.data_ptr() == blk.array.ctypes.data
    pool.close()


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages on this kernel")
def test_unpinned_pool_is_advised_huge_pages():
    """O_DIRECT writes pin their buffer's pages: the pool asks for 2 MiB pages (the kernel's
    VmFlags ``hg`` on its mapping); its blocks stay O_DIRECT-aligned and hold what is
    written to them."""
    pool = HostPool(8 << 20)
    blk = pool.acquire(3 << 20)
    blk.array[:] = 5
    assert pool.huge_pages and blk.array.ctypes.data % (2 << 20) == 0
    addr = blk.array.ctypes.data
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("VmFlags:"):
            flags = line.split()[1:]
            break
    assert flags is not None and "hg" in flags, flags
    assert int(blk.array.sum()) == 5 * (3 << 20)
    pool.release(blk)
    pool.close()
    again = HostPool(4 << 20)
    assert again.acquire(4 << 20).array.ctypes.data % ALIGN == 0
    again.close()


def _writer(root: Path) -> DirectWriter:
    w = DirectWriter.for_storage(FileStorage(root))
    assert w is not None, "direct writes apply to local storage"
    return w


def _crc(data: bytes) -> bytes:
    import google_crc32c

    return google_crc32c.value(data).to_bytes(4, "little")


@pytest.mark.parametrize("aligned", [True, False])
def test_shard_object_layout(tmp_path, aligned):
    """The shard layout of docs/format.md §3, written from an aligned block (O_DIRECT) and
    from an unaligned one (the page cache): chunks in C order with their crc32c, edge
    chunks padded, chunks wholly outside the array absent, the index crc32c'd at the end."""
    lay = ArrayLayout("arrays/x.zarr", (10, 6), (8, 6), (4, 3))
    img = shard_image("arrays/x.zarr", lay, ((8, 0), (2, 6)), 4)  # the edge shard: rows 8..9
    assert img.file == "arrays/x.zarr/c.1.0"
    assert len(img.chunks) == 2  # chunks (0,0) (0,1); rows 4..7 are outside the array
    raw = np.zeros(img.block_bytes + ALIGN, dtype=np.uint8)
    skip = (-raw.ctypes.data) % ALIGN + (0 if aligned else 8)
    block = raw[skip:skip + img.block_bytes]
    rows = np.arange(12, dtype="<f4").reshape(2, 6)
    for off, region, padded in img.chunks:
        assert padded
        chunk = block[off:off + img.chunk_nbytes].view("<f4").reshape(4, 3)
        chunk[:2] = rows[region]
    w = _writer(tmp_path)
    try:
        w.write_object(img, block, "x")
        w.finish()
    finally:
        w.close()
    got = (tmp_path / img.file).read_bytes()
    assert len(got) == img.nbytes
    c0 = np.zeros((4, 3), "<f4")
    c0[:2] = rows[:, :3]
    c1 = np.zeros((4, 3), "<f4")
    c1[:2] = rows[:, 3:]
    d0, d1 = c0.tobytes(), c1.tobytes()
    absent = (2**64 - 1).to_bytes(8, "little") * 2
    index = b"".join(int(v).to_bytes(8, "little") for v in (0, 52, 52, 52)) + absent * 2
    assert got == d0 + _crc(d0) + d1 + _crc(d1) + index + _crc(index)


def test_pack_object_layout(tmp_path):
    img = pack_image("packs/r00000-0000", 128)
    raw = np.zeros(img.block_bytes + ALIGN, dtype=np.uint8)
    block = raw[(-raw.ctypes.data) % ALIGN:][:img.block_bytes]
    block[:128] = np.arange(128, dtype=np.uint8)
    w = _writer(tmp_path)
    try:
        w.write_object(img, block, "pack")
    finally:
        w.close()
    payload = bytes(range(128))
    assert (tmp_path / "packs/r00000-0000/c.0").read_bytes() == payload + _crc(payload)


def test_direct_writes_off_and_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "0")
    assert DirectWriter.for_storage(FileStorage(tmp_path)) is None
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "1")
    from ckpt.storage import open_storage

    assert DirectWriter.for_storage(open_storage("memory://direct-writes-test")) is None


def test_a_failing_object_write_names_the_key_and_object(tmp_path, monkeypatch):
    """A write that cannot happen (here: a file where the array's directory should be)
    is a typed StorageError naming the key and the object; earlier checkpoints stay."""
    monkeypatch.setenv("CKPT_DIRECT_WRITES", "1")
    state = {"w": torch.randn(512, 512)}
    ckpt.save(state, tmp_path / "step-1")
    w = _writer(tmp_path)
    (tmp_path / "bad").write_text("not a directory")
    img = shard_image("bad/w.zarr", ArrayLayout("bad/w.zarr", (4,), (4,), (4,)), ((0,), (4,)), 4)
    block = np.zeros(img.block_bytes, dtype=np.uint8)
    try:
        with pytest.raises(ckpt.errors.StorageError) as ei:
            w.write_object(img, block, "w")
    finally:
        w.close()
    assert ei.value.key == "w"
    assert "bad/w.zarr/c.0" in str(ei.value)
    back = {"w": torch.zeros(512, 512)}
    ckpt.load(back, tmp_path / "step-1")
    assert torch.equal(back["w"], state["w"])


def test_file_systems_without_o_direct_get_buffered_writes(tmp_path, monkeypatch):
    """Where open(O_DIRECT) fails with EINVAL (file systems without direct I/O), the
    object is written through the page cache instead, with the same bytes, and later
    objects of the save do not try O_DIRECT again."""
    import errno

    real_open = os.open
    tried = []

    def no_direct_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            tried.append(path)
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct_open)
    w = _writer(tmp_path)
    img = pack_image("packs/r00000-0000", 256)
    raw = np.zeros(img.block_bytes + ALIGN, dtype=np.uint8)
    block = raw[(-raw.ctypes.data) % ALIGN:][:img.block_bytes]
    block[:256] = np.arange(256, dtype=np.uint8)
    try:
        w.write_object(img, block, "pack")
        img2 = pack_image("packs/r00000-0001", 256)
        w.write_object(img2, block, "pack")
    finally:
        w.close()
    payload = bytes(range(256))
    for name in ("r00000-0000", "r00000-0001"):
        assert (tmp_path / "packs" / name / "c.0").read_bytes() == payload + _crc(payload)
    assert len(tried) == 1 and not w.o_direct


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.bfloat16, torch.bool, torch.int8])
def test_device_chunk_copies_match_cpu_ones_at_unaligned_offsets(dtype):
    """Device sources are copied as raw bytes (_copy_chunk_bytes): a chunk's offset in the
    block is a multiple of chunk bytes + 4, unaligned for 8- and 16-byte dtypes. The byte
    copy, run here on CPU tensors, must fill the block exactly as the numpy path does,
    for whole, padded and non-contiguous chunks."""
    from ckpt._engine._staging import _copy_chunk, _copy_chunk_bytes
    from ckpt._format import dtype_name, storage_torch_dtype

    g = torch.Generator().manual_seed(1)
    full = torch.randn(30, 14, generator=g).to(dtype) if dtype != torch.complex128 else \
        torch.randn(30, 14, generator=g, dtype=torch.complex128)
    if dtype in (torch.bool, torch.int8):
        full = torch.randint(0, 2 if dtype == torch.bool else 100, (30, 14), generator=g).to(dtype)
    sdt = storage_torch_dtype(dtype_name(dtype))
    src_c = full.view(sdt)  # contiguous source
    src_t = full.t().contiguous().t().view(sdt)  # same values, column-major: non-contiguous
    lay = ArrayLayout("arrays/x.zarr", (30, 14), (16, 14), (4, 4))  # chunks cut both dims
    img = shard_image("arrays/x.zarr", lay, ((16, 0), (14, 14)), full.element_size())  # edge shard
    if full.element_size() >= 8:  # the case a wide-dtype torch view of the block cannot take
        assert any(off % full.element_size() for off, _, _ in img.chunks)
    pool = HostPool(1 << 20)
    a, b = pool.acquire(img.block_bytes), pool.acquire(img.block_bytes)
    try:
        a.array[:] = 7
        b.array[:] = 9
        for src in (src_c, src_t):
            region_src = src[16:30]
            for off, region, padded in img.chunks:
                _copy_chunk(a, off, img, region_src[region], padded, False)  # numpy path (CPU)
                if padded:
                    b.array[off:off + img.chunk_nbytes].fill(0)
                _copy_chunk_bytes(b, off, img, region_src[region], False)
            for off, _, _ in img.chunks:
                assert bytes(a.array[off:off + img.chunk_nbytes]) == bytes(b.array[off:off + img.chunk_nbytes])
    finally:
        pool.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_state_writes_the_same_objects_as_the_cpu_state(tmp_path, monkeypatch):
    """CUDA tensors go through the pinned pool, copy streams and byte copies into the
    objects' layout; the objects must be the bytes the same state on CPU writes."""
    cpu = _state()
    gpu = {k: v.cuda() for k, v in cpu.items()}
    _save(cpu, tmp_path / "cpu", "1", monkeypatch)
    _save(gpu, tmp_path / "gpu", "1", monkeypatch)
    a, b = _objects(tmp_path / "cpu"), _objects(tmp_path / "gpu")
    assert {k: v for k, v in a.items() if "/c." in k} == {k: v for k, v in b.items() if "/c." in k}
    back = {k: torch.zeros_like(v) for k, v in gpu.items()}
    ckpt.load(back, tmp_path / "gpu")
    for k, v in gpu.items():
        assert torch.equal(back[k], v), k
