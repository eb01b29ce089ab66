"""Arrays of other libraries in the state: numpy here, cupy on a CUDA machine.

They are saved as tensor entries through DLPack (no pickle), captured at snapshot time,
and load back in place or as new arrays of the same library."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ckpt
from ckpt.errors import PickleNotAllowedError, ShapeMismatchError

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def _random(shape, dtype, rng):
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def _same(a, b):
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # bit for bit (NaN payloads, -0.0)


def test_numpy_arrays_roundtrip_bit_exact_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {dt: _random((3, 5), dt, rng) for dt in DTYPES}
    state = {
        "top": _random((64, 33), "float32", rng),
        "tree": {"by_dtype": arrays, "scalar": np.array(2.5), "empty": np.zeros((0, 4), np.int32),
                 "strided": np.arange(60.0).reshape(6, 10)[:, ::3], "reversed": np.arange(9)[::-1],
                 "n": 3, "pair": (np.ones(2, np.int16), "x")},
    }
    saved = {"top": state["top"].copy(),
             **{k: np.array(v, copy=True) for k, v in state["tree"].items() if isinstance(v, np.ndarray)},
             **{dt: a.copy() for dt, a in arrays.items()}}
    ckpt.save(state, tmp_path / "c")  # allow_pickle is off: arrays are tensor entries
    m = ckpt.read_manifest(tmp_path / "c")
    assert m.entries["top"]["kind"] == "tensor" and m.entries["tree/by_dtype/uint64"]["kind"] == "tensor"
    assert m.entries["top"]["dtype"] == "float32" and m.entries["top"]["shape"] == [64, 33]

    # in place: the same objects hold the saved bits again
    live_top, live_f16 = state["top"], arrays["float16"]
    for a in [state["top"], *arrays.values()]:
        a[...] = 0
    ckpt.load(state, tmp_path / "c")
    assert state["top"] is live_top and state["tree"]["by_dtype"]["float16"] is live_f16
    _same(state["top"], saved["top"])
    for dt in DTYPES:
        _same(arrays[dt], saved[dt])

    # into a state without them: new numpy arrays of the saved dtype and shape
    fresh = {"top": np.zeros((64, 33), np.float32), "tree": {}}
    ckpt.load(fresh, tmp_path / "c")
    t = fresh["tree"]
    for dt in DTYPES:
        _same(t["by_dtype"][dt], saved[dt])
    for k in ("scalar", "empty", "strided", "reversed"):
        _same(t[k], saved[k])
    assert t["n"] == 3 and t["pair"][1] == "x"
    _same(t["pair"][0], np.ones(2, np.int16))


def test_numpy_array_mutated_after_save_async_is_saved_as_it_was(tmp_path):
    """Arrays are copied in the save call: torch cannot see another library's writes,
    so a background copy could not tell that the array changed under it."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2048, 4096)).astype(np.float32)  # 32 MiB: far more than one copy chunk
    nested = {"ema": rng.standard_normal((1024, 1024))}
    expected, expected_ema = a.copy(), nested["ema"].copy()
    snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=8 << 20, chunk_bytes=1 << 20, cpu_staging="background"))
    h = snap.save_async({"a": a, "n": nested}, tmp_path / "c")
    a += 1.0
    nested["ema"] *= 0.5
    h.result(timeout=120)
    snap.close()
    out = {"a": np.zeros_like(a), "n": {}}
    ckpt.load(out, tmp_path / "c")
    _same(out["a"], expected)
    _same(out["n"]["ema"], expected_ema)


def test_read_only_and_unexportable_arrays(tmp_path):
    ro = np.arange(10, dtype=np.int64)
    ro.flags.writeable = False
    ckpt.save({"ro": ro}, tmp_path / "c")
    # a read-only live array is replaced in the state dict, not written through
    live = np.full(10, 7, dtype=np.int64)
    live.flags.writeable = False
    state = {"ro": live}
    ckpt.load(state, tmp_path / "c")
    assert state["ro"] is not live and (live == 7).all()
    _same(state["ro"], np.arange(10, dtype=np.int64))

    # strings, objects, byte-swapped data have no DLPack view: they are values that need pickle
    odd = {"s": np.array(["a", "bc"]), "o": np.array([1, None], dtype=object), "be": np.arange(4, dtype=">f4")}
    with pytest.raises(PickleNotAllowedError) as e:
        ckpt.save({"odd": odd}, tmp_path / "p")
    assert "odd/" in str(e.value)
    ckpt.save({"odd": odd}, tmp_path / "p", allow_pickle=True)
    back: dict = {"odd": {}}
    ckpt.load(back, tmp_path / "p", allow_pickle=True)
    assert back["odd"]["s"].tolist() == ["a", "bc"] and back["odd"]["be"].dtype == np.dtype(">f4")


def test_array_of_another_shape_is_refused_naming_the_key(tmp_path):
    ckpt.save({"a": np.zeros((4, 4), np.float32)}, tmp_path / "c")
    with pytest.raises(ShapeMismatchError) as e:
        ckpt.load({"a": np.zeros((4, 5), np.float32)}, tmp_path / "c")
    assert "'a'" in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cupy_arrays_snapshot_under_mutation_and_load(tmp_path):
    cupy = pytest.importorskip("cupy")
    cupy.random.seed(0)
    a = cupy.random.standard_normal((4096, 4096), dtype=cupy.float32)  # 64 MiB on the device
    nested = {"m": cupy.random.standard_normal((1000, 300)).astype(cupy.float16), "step": 5}
    expected, expected_m = cupy.asnumpy(a), cupy.asnumpy(nested["m"])
    snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=16 << 20, chunk_bytes=2 << 20))
    h = snap.save_async({"a": a, "n": nested}, tmp_path / "c")
    a += 1  # on cupy's stream, right after the call returns
    nested["m"] *= 0
    h.result(timeout=120)
    snap.close()
    live = cupy.zeros_like(a)
    out = {"a": live, "n": {}}
    ckpt.load(out, tmp_path / "c")
    assert out["a"] is live
    assert cupy.asnumpy(live).tobytes() == expected.tobytes()
    m = out["n"]["m"]
    assert isinstance(m, cupy.ndarray) and m.dtype == cupy.float16 and m.shape == (1000, 300)
    assert cupy.asnumpy(m).tobytes() == expected_m.tobytes() and out["n"]["step"] == 5


def test_numpy_scalars_are_json_values_of_their_own_type(tmp_path):
    """Trainer state is full of numpy numbers (metrics, counters from an index array):
    they need no pickle and load as the same numpy type, bit for bit."""
    vals = {"f32": np.float32(0.1), "f64": np.float64(1 / 3), "f16": np.float16(-0.0), "i64": np.int64(-5),
            "u64": np.uint64(2**64 - 1), "b": np.bool_(True), "c64": np.complex64(1 - 2j),
            "nan": np.float32("nan"), "inf": np.float64("-inf"), "in_list": [np.int8(-128), 2.5]}
    ckpt.save({"stats": vals}, tmp_path / "c")
    assert ckpt.read_manifest(tmp_path / "c").entries["stats"]["kind"] == "json"
    out: dict = {"stats": None}
    ckpt.load(out, tmp_path / "c")
    got = out["stats"]
    for k, v in vals.items():
        if k == "in_list":
            assert type(got[k][0]) is np.int8 and got[k][0] == -128 and got[k][1] == 2.5
            continue
        assert type(got[k]) is type(v), k
        assert got[k].tobytes() == v.tobytes() or (np.isnan(v) and np.isnan(got[k])), k
    with pytest.raises(PickleNotAllowedError):  # not a number: still a value that needs pickle
        ckpt.save({"when": np.datetime64("2026-12-02")}, tmp_path / "d")
