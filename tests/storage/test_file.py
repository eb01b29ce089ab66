"""The local file-system backend against the storage contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt.storage import open_storage
from ckpt.storage._file import FileStorage
from tests.storage.conformance import StorageConformance


class TestFileStorage(StorageConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> FileStorage:
        return FileStorage(tmp_path / "root")

    def test_deleting_the_last_object_keeps_the_root(self, storage: FileStorage) -> None:
        storage.write_bytes("a/b/c.bin", b"x")
        storage.write_bytes("top.bin", b"y")
        storage.delete("a/b/c.bin")
        storage.delete("top.bin")
        assert storage.root.is_dir() and list(storage.root.iterdir()) == []
        storage.write_bytes("a/b/c.bin", b"z")  # and writes recreate what went
        assert storage.read_bytes("a/b/c.bin") == b"z"


def test_open_storage_maps_paths_and_file_urls(tmp_path: Path) -> None:
    assert open_storage(tmp_path).url == str(tmp_path)
    assert open_storage(f"file://{tmp_path}/run").url == str(tmp_path / "run")
