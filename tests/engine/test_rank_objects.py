"""Per-rank values live in one object per rank (format 3), checked on load: a damaged
object, or one from another save, is a CorruptCheckpointError, and verify names it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ckpt
import ckpt.tools
from ckpt.errors import CorruptCheckpointError


def _save(url: Path, seed: int) -> None:
    torch.manual_seed(seed)
    ckpt.save({"w": torch.arange(6.0), "rng": ckpt.RNGState()}, str(url))


def test_per_rank_values_are_an_object_of_their_own(tmp_path: Path) -> None:
    _save(tmp_path / "a", 1)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["format_version"] == 3 and m["rank_state"] == {}
    assert m["rank_objects"]["keys"] == ["rng"] and (tmp_path / "a" / "ranks" / "r000000.json").is_file()
    want = torch.rand(3)  # the stream after the save's state
    torch.manual_seed(99)
    ckpt.load({"w": torch.zeros(6), "rng": ckpt.RNGState()}, str(tmp_path / "a"))
    assert torch.equal(torch.rand(3), want)
    assert ckpt.tools.verify(str(tmp_path / "a")).ok


def test_a_damaged_or_foreign_rank_object_is_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a", 1)
    _save(tmp_path / "b", 2)
    obj = tmp_path / "a" / "ranks" / "r000000.json"
    good = obj.read_bytes()
    obj.write_bytes(good.replace(b'"rank": 0', b'"rank": 0 '))  # same content, re-spaced: still valid
    ckpt.load({"w": torch.zeros(6), "rng": ckpt.RNGState()}, str(tmp_path / "a"))
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="rank 0"):
        ckpt.load({"w": torch.zeros(6), "rng": ckpt.RNGState()}, str(tmp_path / "a"))
    report = ckpt.tools.verify(str(tmp_path / "a"))
    assert [p.what for p in report.problems] == ["corrupt"] and report.problems[0].path == "ranks/r000000.json"
    shutil.copy(tmp_path / "b" / "ranks" / "r000000.json", obj)  # a valid object of another save
    with pytest.raises(CorruptCheckpointError, match="another save"):
        ckpt.load({"w": torch.zeros(6), "rng": ckpt.RNGState()}, str(tmp_path / "a"))
    obj.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.load({"w": torch.zeros(6), "rng": ckpt.RNGState()}, str(tmp_path / "a"))
    assert [p.what for p in ckpt.tools.verify(str(tmp_path / "a")).problems] == ["missing"]
