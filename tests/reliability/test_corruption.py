"""Damaged checkpoints: flipped bytes, truncated and deleted objects, a tampered
manifest. ``ckpt.load`` raises a typed error naming the key, ``tools.verify`` reports
each case (with the chunk where it can tell), and ``CheckpointManager.restore`` falls
back to the previous good checkpoint."""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings

import pytest

import ckpt
from ckpt import PreemptionOptions, tools
from ckpt.errors import CorruptCheckpointError, ManifestError
from tests._helpers import Tally
from tests.reliability import assert_bit_exact, blank_state, make_state

SEED = 7
TALLY = Tally("corruption", "")  # cases tried and passed


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Steps 1 and 2; "w" is 4 shards x 4 inner chunks of 256 KiB."""
    run = tmp_path_factory.mktemp("corrupt") / "tpl"
    snap = ckpt.Snapshotter(ckpt.SaveOptions(max_shard_bytes=1 << 20, chunk_bytes=256 << 10))
    for s in (1, 2):
        snap.save_async(make_state(s), f"{run}/step-{s:09d}", step=s).result()
    snap.close()
    shards = sorted(p for p in os.listdir(run / "step-000000002/arrays/w.zarr") if p.startswith("c."))
    assert len(shards) == 4, shards
    return run


def _damage_cases():
    rng = random.Random(SEED)
    cases = []
    for _ in range(8):  # random byte flips in random shards (data or index)
        shard = rng.randrange(4)
        where = rng.choice(["data", "data", "data", "index"])
        cases.append(("flip", f"arrays/w.zarr/c.{shard}.0", where, rng.random(), "w"))
    cases += [
        ("flip", "packs/u00000-0000/c.0", "data", 0.3, "b"),
        ("truncate", "arrays/w.zarr/c.1.0", "data", 0.5, "w"),
        ("truncate", "arrays/w.zarr/c.3.0", "data", 0.999, "w"),
        ("truncate", "packs/u00000-0000/c.0", "data", 0.5, "b"),
        ("delete", "arrays/w.zarr/c.2.0", "", 0, "w"),
        ("delete", "packs/u00000-0000/c.0", "", 0, "b"),
    ]
    return cases


CASES = _damage_cases()


def _damage(ck, kind, rel, where, frac):
    p = ck / rel
    data = bytearray(p.read_bytes())
    if kind == "flip":
        if where == "index":  # the shard index: 4 chunks x 16 bytes + crc32c at the end
            pos = len(data) - 1 - int(frac * 67)
        else:
            pos = int(frac * (len(data) - 72))
        data[pos] ^= 1 << (int(frac * 1000) % 8)
        p.write_bytes(bytes(data))
        return pos
    if kind == "truncate":
        p.write_bytes(bytes(data[: int(frac * len(data))]))
        return None
    p.unlink()
    return None


def _copy(template, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(template, run)
    return run


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{i}"
                                             for i, c in enumerate(CASES)])
def test_damaged_object(template, tmp_path, case):
    kind, rel, where, frac, key = case
    TALLY.tried()
    run = _copy(template, tmp_path)
    ck = run / "step-000000002"
    pos = _damage(ck, kind, rel, where, frac)

    with pytest.raises(CorruptCheckpointError) as ei:
        ckpt.load(blank_state(), str(ck))
    assert key in str(ei.value) and rel.split("/c.")[0] in str(ei.value), (case, pos, str(ei.value))

    rep = tools.verify(str(ck))
    assert not rep.ok, (case, pos)
    p = rep.problems[0]
    assert key in p.keys or any(key in k for k in p.keys), (case, p)
    assert p.path.startswith(rel.split("/c.")[0]), (case, p)
    if kind == "flip" and where == "data" and key == "w":
        assert p.chunk is not None, (case, p)  # a flipped data byte is pinned to its inner chunk
    quick = tools.verify(str(ck), quick=True)
    if kind in ("truncate", "delete"):
        assert not quick.ok, case  # sizes and presence alone catch these

    mgr = ckpt.CheckpointManager(str(run), preemption=PreemptionOptions(signals=()), save_on_close=False)
    st = blank_state()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert mgr.restore(st) == 2  # fell back to step 1
    assert any("step-000000002" in str(x.message) for x in w)
    assert mgr.restored_step == 1
    assert_bit_exact(str(run / "step-000000001"), 1)
    mgr.close()
    TALLY.passed()


@pytest.mark.parametrize("how", ["tamper-value", "tamper-shape", "truncate", "delete-checksum", "garbage"])
def test_damaged_manifest(template, tmp_path, how):
    TALLY.tried()
    run = _copy(template, tmp_path)
    mpath = run / "step-000000002/manifest.json"
    raw = mpath.read_bytes()
    body = json.loads(raw)
    if how == "tamper-value":
        body["entries"]["step"]["value"] = 99
        mpath.write_text(json.dumps(body))
    elif how == "tamper-shape":
        body["entries"]["w"]["shape"] = [512, 1024]
        mpath.write_text(json.dumps(body))
    elif how == "truncate":
        mpath.write_bytes(raw[: len(raw) // 2])
    elif how == "delete-checksum":
        body.pop("checksum")
        mpath.write_text(json.dumps(body))
    else:
        mpath.write_bytes(os.urandom(256))
    with pytest.raises(ManifestError) as ei:
        ckpt.load(blank_state(), str(run / "step-000000002"))
    assert "manifest" in str(ei.value)
    rep = tools.verify(str(run / "step-000000002"))
    assert [p.what for p in rep.problems] == ["manifest"]
    mgr = ckpt.CheckpointManager(str(run), preemption=PreemptionOptions(signals=()), save_on_close=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.restore(blank_state()) == 2
    mgr.close()
    TALLY.passed()


def test_zarr_json_deleted_is_reported_but_data_loads(template, tmp_path):
    """The reader rebuilds metadata from the manifest: a lost zarr.json loses nothing,
    but verify reports it (other zarr readers need it)."""
    TALLY.tried()
    run = _copy(template, tmp_path)
    (run / "step-000000002/arrays/w.zarr/zarr.json").unlink()
    assert_bit_exact(str(run / "step-000000002"), 2)
    rep = tools.verify(str(run / "step-000000002"))
    assert [(p.what, p.path) for p in rep.problems] == [("missing", "arrays/w.zarr/zarr.json")]
    TALLY.passed()


def test_every_committed_checkpoint_corrupt_restores_nothing(template, tmp_path):
    TALLY.tried()
    run = _copy(template, tmp_path)
    for s in (1, 2):
        os.unlink(run / f"step-{s:09d}/packs/u00000-0000/c.0")
    mgr = ckpt.CheckpointManager(str(run), preemption=PreemptionOptions(signals=()), save_on_close=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.restore(blank_state()) == 0  # a fresh start, never a half-loaded state
    mgr.close()
    TALLY.passed()
