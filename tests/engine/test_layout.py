"""The on-disk layout has one home (ckpt/_engine/_layout.py): the objects tensorstore
writes, the images the direct writer builds, the sizes verify expects and the shard
indexes the direct reader parses are the same, for every shard of a state full of edge
cases (padded edge chunks, short edge shards, chunks cutting dim 1, packs)."""

from __future__ import annotations

import google_crc32c
import numpy as np
import pytest

from ckpt._engine._catalog import read_manifest
from ckpt._engine._layout import (
    ABSENT,
    pack_image,
    parse_shard_index,
    shard_image,
    stored_arrays,
)
from ckpt._engine._plan import shard_index_bytes
from ckpt.errors import CorruptCheckpointError
from ckpt.storage._file import FileStorage
from tests.engine.test_direct_write import _save, _state


def _crc(b: bytes) -> int:
    return int(google_crc32c.value(b))


def test_tensorstore_objects_are_the_layout_s_images(tmp_path, monkeypatch):
    _save(_state(), tmp_path / "ck", "0", monkeypatch)  # every object written by tensorstore
    manifest = read_manifest(FileStorage(tmp_path), "ck")
    arrays = stored_arrays(manifest)
    assert {a.kind for a in arrays} == {"array", "pack"}
    shards = 0
    for a in arrays:
        for _, path, region in a.shards():
            raw = (tmp_path / "ck" / path).read_bytes()
            assert len(raw) == a.expected_size(region), path
            if a.kind == "pack":
                assert pack_image(a.path, a.nbytes).file == path
                continue
            img = shard_image(a.path, a.layout, region, a.itemsize)
            assert img.file == path and img.nbytes == len(raw)
            n = a.layout.chunks_per_shard
            tail = raw[-shard_index_bytes(n):]
            index = parse_shard_index(tail, n, len(raw), _crc, key=a.keys[0], where=path)
            assert img.index is not None
            np.testing.assert_array_equal(index, img.index)
            for off, _, _ in img.chunks:  # every stored chunk: its data, then its crc32c
                data = raw[off:off + img.chunk_nbytes]
                assert _crc(data) == int.from_bytes(raw[off + img.chunk_nbytes:off + img.chunk_nbytes + 4], "little")
            shards += 1
    assert shards >= 10


@pytest.mark.parametrize("damage, words", [
    ("index", "checksum"), ("short", "truncated"), ("past", "points past")])
def test_a_damaged_shard_index_is_a_typed_error(damage, words):
    n = 4
    index = np.full((n, 2), ABSENT, dtype="<u8")
    index[0] = (0, 100)
    size = 100 + shard_index_bytes(n)
    if damage == "past":
        index[1] = (90, 20)
    body = index.tobytes()
    tail = body + _crc(body).to_bytes(4, "little")
    if damage == "index":
        tail = b"\x01" + tail[1:]
    elif damage == "short":
        tail, size = tail[:10], 10
    with pytest.raises(CorruptCheckpointError) as ei:
        parse_shard_index(tail, n, size, _crc, key="w", where="ck/w.zarr/c.0")
    assert ei.value.key == "w" and "ck/w.zarr/c.0" in str(ei.value) and words in str(ei.value)
