"""Manifests and checkpoints from an untrusted source: nothing outside the checkpoint is
read, no absurd allocation, no code runs, and only typed ckpt errors come out."""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckpt
from ckpt import tools
from ckpt._format import MAX_MANIFEST_BYTES, Manifest
from ckpt.errors import (
    CheckpointError,
    ManifestError,
    PickleNotAllowedError,
    ShapeMismatchError,
    UnsafePathError,
)
from tests._helpers import Tally
from tests.reliability import assert_bit_exact, blank_state, make_state, sign_manifest

TALLY = Tally("hostile")  # what each kind of hostile input came to


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid checkpoint (array + packed + json + pickle entries) and its manifest body."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    state = make_state(1)
    state["obj"] = Fraction(1, 3)  # needs pickle
    ckpt.save(state, f"{run}/step-000000001", step=1, allow_pickle=True)
    body = json.loads((run / "step-000000001" / "manifest.json").read_text())
    return run, body


def _clone(good, tmp_path, body=None):
    run, orig = good
    dst = tmp_path / "ck"
    shutil.copytree(run / "step-000000001", dst)
    if body is not None:
        (dst / "manifest.json").write_bytes(sign_manifest(body))
    return dst


def _state():
    st_ = blank_state()
    st_["obj"] = None
    return st_


BAD_PATHS = ["../x", "../../../../etc/passwd", "arrays/../../x", "/etc/passwd", "arrays\\..\\x",
             "file:///etc/passwd", "arrays//w.zarr", ".", "arrays/./w.zarr", "", "a\x00b", "arrays/w zarr",
             "s3://bucket/key", "x" * 5000, 7, None, ["arrays"]]


def _path_fields(body):
    """(description, setter) for every path field of the manifest."""
    e = body["entries"]
    yield "array", lambda v: e["w"]["storage"].__setitem__("path", v)
    yield "packed", lambda v: e["b"]["storage"].__setitem__("path", v)
    yield "pickle", lambda v: e["obj"].__setitem__("path", v)

    def pieces(v):
        w = e["w"]
        w["storage"] = {"layout": "pieces", "pieces": [
            {"offsets": [0, 0], "sizes": list(w["shape"]), "path": v,
             "shard_shape": list(w["shape"]), "chunk_shape": list(w["shape"])}]}
    yield "pieces", pieces


def test_path_traversal_every_field(good, tmp_path):
    n = 0
    for field, _ in _path_fields(copy.deepcopy(good[1])):
        for bad in BAD_PATHS:
            body = copy.deepcopy(good[1])
            dict(_path_fields(body))[field](bad)
            ck = tmp_path / f"c{n}"
            shutil.copytree(good[0] / "step-000000001", ck)
            (ck / "manifest.json").write_bytes(sign_manifest(body))
            with pytest.raises((UnsafePathError, ManifestError)):
                ckpt.load(_state(), str(ck), allow_pickle=True)
            rep = tools.verify(str(ck))
            assert not rep.ok and rep.problems[0].what == "manifest", (field, bad)
            n += 1
    TALLY.note("path-traversal manifests rejected", n)


def _outside_copy(tmp_path, src):
    out = tmp_path / "outside" / os.path.basename(src)
    shutil.copytree(src, out) if os.path.isdir(src) else (out.parent.mkdir(parents=True, exist_ok=True),
                                                         shutil.copy(src, out))
    return out


@pytest.mark.parametrize("target", ["arrays/w.zarr", "arrays/w.zarr/c.0.0", "packs/u00000-0000",
                                    "packs/u00000-0000/c.0", "objects/obj.pkl", "arrays"])
def test_symlink_out_of_checkpoint_refused(good, tmp_path, target):
    """A symlink inside the checkpoint whose target lies outside must not be followed,
    even when the bytes outside are a perfectly valid copy."""
    ck = _clone(good, tmp_path)
    src = ck / target
    out = _outside_copy(tmp_path, str(src))
    shutil.rmtree(src) if src.is_dir() else src.unlink()
    os.symlink(out, src)
    with pytest.raises(CheckpointError) as ei:
        ckpt.load(_state(), str(ck), allow_pickle=True)
    assert "symlink" in str(ei.value).lower(), ei.value
    TALLY.add("symlinks refused")


def test_symlinked_checkpoint_dir_itself_is_fine(good, tmp_path):
    """The user may point a run at a symlinked checkpoint; only links *inside* are refused."""
    ck = _clone(good, tmp_path)
    link = tmp_path / "link"
    os.symlink(ck, link)
    st_ = _state()
    ckpt.load(st_, str(link), allow_pickle=True)
    assert st_["obj"] == Fraction(1, 3)


def _with_shape(body, shape, shard, chunk=None):
    body = copy.deepcopy(body)
    w = body["entries"]["w"]
    w["shape"] = shape
    w["storage"]["shard_shape"] = shard
    w["storage"]["chunk_shape"] = chunk if chunk is not None else shard
    return body


def _bounded(fn, seconds=10.0):
    """Run fn in a thread; fail if it does not finish in time (no unbounded work)."""
    box: dict = {}

    def run():
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "unbounded work on a hostile manifest"
    return box


@pytest.mark.parametrize("shape,shard", [
    ([2**25, 2**25], [1, 1]),  # 2**50 elements: at the limit, 2**50 shards
    ([2**26, 2**26], [2**26, 2**26]),  # over the limit
    ([1024, 1024], [0, 1024]),  # zero shard dim
    ([1024, 1024], [1024]),  # wrong rank
    ([1024] * 33, [1] * 33),  # too many dims
    ([-1, 1024], [1, 1024]),
    ([True, 1024], [1, 1024]),
])
def test_absurd_shapes(good, tmp_path, shape, shard):
    ck = _clone(good, tmp_path, _with_shape(good[1], shape, shard))
    box = _bounded(lambda: ckpt.load(_state(), str(ck), allow_pickle=True))
    assert isinstance(box.get("e"), CheckpointError), box
    if isinstance(box["e"], ShapeMismatchError):
        # a state that asks for whatever the manifest says must not allocate it
        box = _bounded(lambda: ckpt.load({"w": torch.zeros(1)}, str(ck), strict=False))
        assert isinstance(box.get("e"), CheckpointError), box
    box = _bounded(lambda: tools.verify(str(ck), quick=True))
    assert "e" in box and isinstance(box["e"], CheckpointError) or not box["v"].ok, box
    TALLY.add("absurd shapes")


def test_huge_manifest_refused_without_parsing():
    with pytest.raises(ManifestError):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1), where="x")


def test_large_valid_manifest_is_fine(good):
    body = copy.deepcopy(good[1])
    for i in range(50_000):
        body["entries"][f"v/{i}"] = {"kind": "json", "value": i}
    m = Manifest.from_json(sign_manifest(body), where="x")
    assert len(m.entries) == 50_000 + len(good[1]["entries"])


@pytest.mark.parametrize("depth", [500, 5_000, 200_000])
def test_deeply_nested_json(good, depth):
    raw = b"[" * depth + b"]" * depth
    with pytest.raises(ManifestError):
        Manifest.from_json(raw, where="x")
    body = copy.deepcopy(good[1])
    nested: object = 1
    for _ in range(min(depth, 20_000)):
        nested = [nested]
    body["user_metadata"] = {"n": nested}
    try:
        data = sign_manifest(body)
    except RecursionError:
        data = (b'{"format":"ckpt","format_version":1,"checksum":"sha256:0","user_metadata":'
                + b"[" * depth + b"]" * depth + b"}")
    try:
        Manifest.from_json(data, where="x")
    except CheckpointError:
        pass


def test_pickle_refused_unless_allowed(good, tmp_path):
    ck = _clone(good, tmp_path)
    with pytest.raises(PickleNotAllowedError):
        ckpt.load(_state(), str(ck))
    # a hostile pickle (runs code when loaded) is never opened without allow_pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    import pickle

    (ck / "objects" / "obj.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PickleNotAllowedError):
        ckpt.load(_state(), str(ck))
    assert not marker.exists()
    st_ = _state()
    ckpt.load(st_, str(_clone(good, tmp_path / "again")), allow_pickle=True)
    assert st_["obj"] == Fraction(1, 3)


# -- fuzz ----------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.sampled_from([10**400, -1, 0, 2**64, 1e300, "..", "/etc/passwd", "float32", "array"]),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=20)
FUZZED = [0]


def _from_json(data: bytes) -> None:
    FUZZED[0] += 1
    try:
        Manifest.from_json(data, where="fuzz")
    except CheckpointError:
        pass  # the only thing allowed to escape


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(json_value.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64),
                 st.sampled_from([b"NaN", b'{"format":"ckpt","format_version":1,"x":NaN}',
                                  b"1" * 5000, b'{"format":"ckpt","format_version":1,"created":"x"}'])))
def test_fuzz_random_json(data):
    _from_json(data)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, (*prefix, i))


_BASE: list = []


def _base_body():
    if not _BASE:
        run = ckpt.__file__  # any: we only need a manifest body
        del run
        m = Manifest(step=3, entries={
            "w": {"kind": "tensor", "dtype": "float32", "shape": [4, 8],
                  "boxes": [{"offsets": [0, 0], "sizes": [4, 8], "rank": 0}],
                  "storage": {"layout": "array", "path": "arrays/w.zarr", "shard_shape": [4, 8],
                              "chunk_shape": [2, 8]}},
            "b": {"kind": "tensor", "dtype": "bfloat16", "shape": [3],
                  "boxes": [{"offsets": [0], "sizes": [3], "rank": 0}],
                  "storage": {"layout": "packed", "path": "packs/r00000-0000", "offset": 0, "nbytes": 6}},
            "p": {"kind": "tensor", "dtype": "int64", "shape": [4],
                  "boxes": [{"offsets": [0], "sizes": [2], "rank": 0}, {"offsets": [2], "sizes": [2], "rank": 1}],
                  "storage": {"layout": "pieces", "pieces": [
                      {"offsets": [0], "sizes": [2], "path": "arrays/p.pieces/00000.zarr", "shard_shape": [2],
                       "chunk_shape": [2]},
                      {"offsets": [2], "sizes": [2], "path": "arrays/p.pieces/00001.zarr", "shard_shape": [2],
                       "chunk_shape": [2]}]}},
            "o": {"kind": "pickle", "path": "objects/o.pkl", "format": "pickle"},
            "v": {"kind": "json", "value": {"__ckpt__": "tuple", "v": [1, 2]}},
        }, world_size=2, rank_state={"0": {"r": 1}, "1": {"r": 2}}, user_metadata={"a": 1})
        _BASE.append(json.loads(m.to_json()))
        Manifest.from_json(m.to_json(), where="base")  # the base itself is valid
    return copy.deepcopy(_BASE[0])


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzz_mutated_valid_manifest(data):
    body = _base_body()
    body.pop("checksum")
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(body) if p]
        path = data.draw(st.sampled_from(paths))
        parent = body
        for k in path[:-1]:
            parent = parent[k]
        op = data.draw(st.sampled_from(["replace", "delete", "wrap"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "wrap":
            parent[path[-1]] = [parent[path[-1]]]
        else:
            parent[path[-1]] = data.draw(json_value)
    _from_json(sign_manifest(body))


def test_fuzz_count():
    TALLY.note("fuzzed from_json inputs", FUZZED[0])
    assert FUZZED[0] >= 500


def test_roundtrip_still_loads(good, tmp_path):
    st_ = _state()
    ckpt.load(st_, str(_clone(good, tmp_path)), allow_pickle=True)
    assert_bit_exact(str(_clone(good, tmp_path / "b")), 1, strict=False)
