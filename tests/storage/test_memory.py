"""The in-memory backend against the storage contract."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ckpt.storage import open_storage
from ckpt.storage._memory import MemoryStorage, drop
from tests.storage.conformance import StorageConformance, unique_name


class TestMemoryStorage(StorageConformance):
    @pytest.fixture
    def storage(self) -> Iterator[MemoryStorage]:
        name = unique_name("mem")
        yield MemoryStorage(name, "root/prefix")
        drop(name)


def test_same_name_is_the_same_store() -> None:
    name = unique_name("mem")
    try:
        open_storage(f"memory://{name}/run").write_bytes("x.bin", b"shared")
        assert open_storage(f"memory://{name}").read_bytes("run/x.bin") == b"shared"
    finally:
        drop(name)
