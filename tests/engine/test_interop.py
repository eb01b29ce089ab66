"""A checkpoint is plain zarr v3: read it back without ckpt's reader.

Saves with ckpt, then opens every tensor by the path in manifest.json with zarr-python
and with tensorstore, and compares bit for bit (docs/format.md, "Reading a checkpoint
without ckpt"). Dtypes zarr lacks (bfloat16, float8, complex32) are read as their raw
bits and viewed with ml_dtypes / torch, as the format document says.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
import torch
import zarr

import ckpt
from ckpt.errors import CorruptCheckpointError
from tests._helpers import tensor_bytes

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

SMALL_SHARDS = ckpt.SaveOptions(pool_bytes=8 << 20, max_shard_bytes=1 << 20, chunk_bytes=256 << 10)

# key -> (dtype, shape of the array-layout tensor (> 256 KiB), shape of the packed one)
CASES: dict[str, tuple[torch.dtype, tuple[int, ...], tuple[int, ...]]] = {
    "float32": (torch.float32, (300, 400), (7, 5)),
    "int64": (torch.int64, (200, 300), (11,)),
    "bool": (torch.bool, (600, 600), (3, 3, 3)),
    "float16": (torch.float16, (400, 400), (13,)),
    "complex64": (torch.complex64, (200, 200), (4, 2)),
    "bfloat16": (torch.bfloat16, (400, 400), (9, 2)),
    "float8_e4m3fn": (torch.float8_e4m3fn, (700, 500), (17,)),
    "complex32": (torch.complex32, (300, 300), (5,)),
}
# logical dtype -> how a plain numpy user views the stored elements
NUMPY_VIEW: dict[str, Any] = {
    "float32": np.float32, "int64": np.int64, "bool": np.bool_, "float16": np.float16,
    "complex64": np.complex64, "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
}
MULTI_SHAPE = (768, 1024)  # float32, 3 MiB: 3 shards of 1 MiB with SMALL_SHARDS


def _make(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g, dtype=torch.int64)
    if dtype == torch.complex32:
        return torch.randn(shape, dtype=torch.complex64, generator=g).to(torch.complex32)
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    return (torch.randn(shape, generator=g) * 4).to(dtype)


def _same_bits(arr: np.ndarray, t: torch.Tensor) -> bool:
    """A numpy array read by another reader holds ``t``'s shape and bytes."""
    a = np.ascontiguousarray(arr)
    return a.shape == tuple(t.shape) and a.tobytes() == tensor_bytes(t).numpy().tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    state: dict[str, torch.Tensor] = {}  # flat keys as they appear in the manifest
    for i, (name, (dtype, big, small)) in enumerate(CASES.items()):
        state[f"array/{name}"] = _make(dtype, big, i)
        state[f"packed/{name}"] = _make(dtype, small, 100 + i)
    state["multi"] = _make(torch.float32, MULTI_SHAPE, 999)
    nested: dict[str, Any] = {"array": {}, "packed": {}}
    for key, t in state.items():
        group, _, name = key.partition("/")
        if name:
            nested[group][name] = t
        else:
            nested[group] = t
    run = tmp_path_factory.mktemp("interop")
    url = run / "step-000000100"
    snap = ckpt.Snapshotter(SMALL_SHARDS)
    try:
        snap.save_async(nested, str(url), step=100).result()
    finally:
        snap.close()
    manifest = json.loads((url / "manifest.json").read_text())
    return url, state, manifest


def _storage(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    return manifest["entries"][key]["storage"]


def test_layouts_are_as_planned(saved: tuple[Path, dict, dict]) -> None:
    url, state, manifest = saved
    for key in state:
        st = _storage(manifest, key)
        want = "packed" if key.startswith("packed/") else "array"
        assert st["layout"] == want, key
    multi = _storage(manifest, "multi")
    assert multi["shard_shape"] == [256, 1024]
    assert multi["chunk_shape"] == [64, 1024]
    shards = sorted(p.name for p in (url / multi["path"]).iterdir() if p.is_file())
    assert shards == ["c.0.0", "c.1.0", "c.2.0", "zarr.json"]  # one storage object per shard, no subdirectories


def test_zarr_json_has_crc32c(saved: tuple[Path, dict, dict]) -> None:
    url, state, manifest = saved
    for key in state:
        st = _storage(manifest, key)
        meta = json.loads((url / st["path"] / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["node_type"] == "array"
        if st["layout"] == "array":
            (codec,) = meta["codecs"]
            assert codec["name"] == "sharding_indexed"
            cfg = codec["configuration"]
            assert [c["name"] for c in cfg["codecs"]][-1] == "crc32c"
            assert [c["name"] for c in cfg["index_codecs"]][-1] == "crc32c"
            assert cfg["chunk_shape"] == st["chunk_shape"]
            assert meta["chunk_grid"]["configuration"]["chunk_shape"] == st["shard_shape"]
            assert meta["attributes"]["ckpt"]["dtype"] == manifest["entries"][key]["dtype"]
            assert meta["attributes"]["ckpt"]["key"] == key
        else:
            assert [c["name"] for c in meta["codecs"]] == ["bytes", "crc32c"]
            assert meta["data_type"] == "uint8"
            assert key in meta["attributes"]["ckpt"]["keys"]


def _view(raw: np.ndarray, dtype_name: str) -> torch.Tensor:
    """Stored elements (logical dtype or raw bits) -> a torch tensor of the logical dtype,
    the way docs/format.md tells a non-ckpt reader to do it."""
    raw = np.ascontiguousarray(raw)
    if dtype_name in NUMPY_VIEW:
        arr = raw.view(NUMPY_VIEW[dtype_name])
        if dtype_name in ("bfloat16", "float8_e4m3fn"):  # ml_dtypes -> torch through the bits
            return torch.from_numpy(arr.view(raw.dtype).copy()).view(getattr(torch, dtype_name))
        return torch.from_numpy(arr.copy())
    assert dtype_name == "complex32"  # nothing in numpy: view the uint32 bits with torch
    return torch.from_numpy(raw.copy()).view(torch.complex32)


ARRAY_KEYS = [f"array/{n}" for n in CASES] + ["multi"]
PACKED_KEYS = [f"packed/{n}" for n in CASES]
STORED_AS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "complex32": "uint32"}


@pytest.mark.parametrize("key", ARRAY_KEYS)
def test_zarr_python_reads_arrays(saved: tuple[Path, dict, dict], key: str) -> None:
    url, state, manifest = saved
    e = manifest["entries"][key]
    a = zarr.open_array(str(url / e["storage"]["path"]), mode="r")
    assert a.shape == tuple(e["shape"])
    assert str(a.dtype) == STORED_AS.get(e["dtype"], e["dtype"])
    assert a.shards == tuple(e["storage"]["shard_shape"])
    assert a.chunks == tuple(e["storage"]["chunk_shape"])
    raw = a[...]
    assert _same_bits(raw, state[key])
    assert torch.equal(_view(raw, e["dtype"]).view(torch.uint8), state[key].view(torch.uint8))


@pytest.mark.parametrize("key", ARRAY_KEYS)
def test_tensorstore_reads_arrays(saved: tuple[Path, dict, dict], key: str) -> None:
    url, state, manifest = saved
    e = manifest["entries"][key]
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(url / e["storage"]["path"])}},
                  read=True).result()
    assert tuple(arr.shape) == tuple(e["shape"])
    raw = arr.read().result()
    assert _same_bits(raw, state[key])
    # a partial read (for "multi": across the shard boundary at row 256)
    lo = min(250, e["shape"][0] - 50)
    part = arr[lo:lo + 50, 10:20].read().result()
    assert _same_bits(part, state[key][lo:lo + 50, 10:20])


@pytest.mark.parametrize("reader", ["zarr", "tensorstore"])
@pytest.mark.parametrize("key", PACKED_KEYS)
def test_packed_tensors_are_pack_slices(saved: tuple[Path, dict, dict], key: str, reader: str) -> None:
    url, state, manifest = saved
    e = manifest["entries"][key]
    st = e["storage"]
    assert st["offset"] % 64 == 0
    path = str(url / st["path"])
    if reader == "zarr":
        pack = zarr.open_array(path, mode="r")[...]
    else:
        pack = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}, read=True).result().read().result()
    assert pack.dtype == np.uint8 and pack.ndim == 1
    raw = pack[st["offset"]:st["offset"] + st["nbytes"]].view(np.dtype(STORED_AS.get(e["dtype"], e["dtype"])))
    raw = raw.reshape(e["shape"])
    assert _same_bits(raw, state[key])
    got = _view(raw, e["dtype"])
    assert got.dtype == state[key].dtype
    assert torch.equal(got.view(torch.uint8), state[key].view(torch.uint8))


def test_ml_dtypes_values(saved: tuple[Path, dict, dict]) -> None:
    """The documented recipe for bfloat16 / float8 gives the same numbers as torch."""
    url, state, manifest = saved
    for name in ("bfloat16", "float8_e4m3fn"):
        key = f"array/{name}"
        raw = zarr.open_array(str(url / _storage(manifest, key)["path"]), mode="r")[...]
        vals = raw.view(NUMPY_VIEW[name]).astype(np.float32)
        np.testing.assert_array_equal(vals, state[key].float().numpy())


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    state = {"w": _make(torch.float32, (300, 400), 1), "b": _make(torch.float32, (10,), 2)}
    url = tmp_path / "step-000000001"
    ckpt.save(dict(state), str(url))
    manifest = json.loads((url / "manifest.json").read_text())
    arr_path = url / manifest["entries"]["w"]["storage"]["path"]
    pack_path = url / manifest["entries"]["b"]["storage"]["path"]
    _flip(arr_path / "c.0.0", 100)  # inside the first inner chunk's data
    _flip(pack_path / "c.0", 3)

    for p in (arr_path, pack_path):
        with pytest.raises(ValueError, match="checksum"):
            zarr.open_array(str(p), mode="r")[...]
        with pytest.raises(ValueError, match="(?i)digest mismatch|checksum"):
            ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(p)}},
                    read=True).result().read().result()

    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load({"w": torch.empty(300, 400)}, str(url), strict=False)
    assert info.value.key == "w"
    assert "w" in str(info.value)
    with pytest.raises(CorruptCheckpointError) as info:
        ckpt.load({"b": torch.empty(10)}, str(url), strict=False)
    assert "b" in (info.value.key or "").split(", ")


def test_untouched_neighbour_still_loads(tmp_path: Path) -> None:
    """A bad chunk of one tensor does not stop another tensor from loading."""
    state = {"w": _make(torch.float32, (300, 400), 1), "v": _make(torch.float32, (300, 400), 2)}
    url = tmp_path / "step-000000001"
    ckpt.save(dict(state), str(url))
    manifest = json.loads((url / "manifest.json").read_text())
    _flip(url / manifest["entries"]["w"]["storage"]["path"] / "c.0.0", 100)
    dest = torch.empty(300, 400)
    ckpt.load({"v": dest}, str(url), strict=False)
    assert torch.equal(dest, state["v"])


def _to_format_1(url: Path) -> int:
    """Rewrite a checkpoint as format 1 wrote it: shards under ``c/<i>/<j>``, zarr.json's
    separator "/", ``format_version`` 1 (checksum recomputed). Returns the shards moved."""
    from ckpt._format import Manifest

    moved = 0
    for meta in url.rglob("zarr.json"):
        body = json.loads(meta.read_text())
        body["chunk_key_encoding"]["configuration"]["separator"] = "/"
        meta.write_text(json.dumps(body, sort_keys=True, separators=(",", ":")))
        for shard in meta.parent.glob("c.*"):
            dest = meta.parent.joinpath("c", *shard.name.split(".")[1:])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shard.rename(dest)
            moved += 1
    m = Manifest.from_json((url / "manifest.json").read_bytes(), where=str(url))
    m.format_version = 1
    (url / "manifest.json").write_bytes(m.to_json())
    return moved


@pytest.mark.parametrize("reads", ["direct", "tensorstore"])
def test_format_1_checkpoints_still_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: str) -> None:
    """Format 2 moved shards from ``c/1/0`` to ``c.1.0`` (two directories fewer per array);
    a checkpoint written by format 1 loads, verifies and reshards as before."""
    from ckpt import tools

    state = {"multi": _make(torch.float32, MULTI_SHAPE, 5), "b": _make(torch.float32, (10,), 6),
             "h": _make(torch.bfloat16, (400, 400), 7)}
    url = tmp_path / "step-000000001"
    snap = ckpt.Snapshotter(SMALL_SHARDS)
    try:
        snap.save(dict(state), str(url), step=1)
    finally:
        snap.close()
    from ckpt._engine._plan import SEPARATOR
    from ckpt._format import FORMAT_VERSION, chunk_separator

    assert chunk_separator(FORMAT_VERSION) == SEPARATOR  # what is written is what is read
    assert ckpt.read_manifest(str(url)).format_version == FORMAT_VERSION
    assert not list(url.rglob("c")), "format 2 writes no c/ directories"
    assert _to_format_1(url) == 3 + 1 + 1  # multi's 3 shards, h's one, the pack
    assert ckpt.read_manifest(str(url)).format_version == 1
    monkeypatch.setenv("CKPT_DIRECT_READS", "1" if reads == "direct" else "0")
    back = {k: torch.zeros_like(v) for k, v in state.items()}
    stats = ckpt.load(back, str(url))
    for k, v in state.items():
        assert torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k
    assert (stats.bytes_direct > 0) == (reads == "direct")
    tools.reshard(str(url), str(tmp_path / "step-000000002"), 3)  # reads format 1, writes the current format
    again = {k: torch.zeros_like(v) for k, v in state.items()}
    ckpt.load(again, str(tmp_path / "step-000000002"))
    assert all(torch.equal(again[k].view(torch.uint8), v.view(torch.uint8)) for k, v in state.items())
    assert ckpt.read_manifest(str(tmp_path / "step-000000002")).format_version == FORMAT_VERSION
    report = tools.verify(str(url))
    assert report.ok, report.problems
    (url / "arrays" / "multi.zarr" / "c" / "1" / "0").unlink()
    assert not tools.verify(str(url)).ok  # verify looks where format 1 put the shards
