"""Paths and argparse namespaces are JSON values (docs/format.md §6), not pickles."""

from __future__ import annotations

import argparse
import pathlib
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest

import ckpt
from ckpt._values import decode_value
from ckpt.errors import ManifestError


def test_paths_and_namespaces_round_trip_with_their_types(tmp_path: Path) -> None:
    values = {"data": Path("/data/set"), "rel": PurePosixPath("a/b"), "win": PureWindowsPath(r"C:\runs\x"),
              "args": argparse.Namespace(lr=0.1, out=Path("out"), sizes=(1, 2), nested=argparse.Namespace(k=1))}
    state = {"hp": dict(values), "top": Path("top")}
    ckpt.save(state, tmp_path / "c")
    manifest = ckpt.read_manifest(tmp_path / "c")
    assert all(e["kind"] == "json" for e in manifest.entries.values())
    back: dict = {"hp": None, "top": None}
    ckpt.load(back, tmp_path / "c")
    assert back["top"] == Path("top") and type(back["top"]) is type(Path())
    for k, v in values.items():
        assert back["hp"][k] == v and type(back["hp"][k]) is type(v), k
    assert type(back["hp"]["args"].sizes) is tuple


def test_a_path_of_another_os_loads_as_its_pure_path() -> None:
    other = "WindowsPath" if type(Path()) is pathlib.PosixPath else "PosixPath"
    p = decode_value({"__ckpt__": "path", "type": other, "v": "x"})
    assert type(p) is (PureWindowsPath if other == "WindowsPath" else PurePosixPath)


@pytest.mark.parametrize("bad", [{"__ckpt__": "path", "type": "Evil", "v": "x"},
                                 {"__ckpt__": "path", "type": "PosixPath", "v": 3},
                                 {"__ckpt__": "namespace", "v": [1]}])
def test_malformed_tags_are_manifest_errors(bad: dict) -> None:
    with pytest.raises(ManifestError):
        decode_value(bad)
