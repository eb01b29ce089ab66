"""Shared fixtures for the whole test suite."""

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from tests._s3server import *  # noqa: F401,F403
from tests._s3server import fresh_place, server, server_params, stop_servers


@dataclasses.dataclass
class RunPlace:
    """Where a test keeps a run: ``url`` (a local path or ``s3://bucket/prefix``) and the
    ``options`` (storage_options) that reach it, with helpers that reach into its objects
    the same way on every backend."""

    url: str
    options: dict[str, Any] | None = None

    def storage(self) -> Any:
        from ckpt.storage import open_storage

        return open_storage(self.url, **(self.options or {}))

    def files(self, prefix: str) -> list[str]:
        return sorted(o.path for o in self.storage().list_files(prefix))

    def flip_byte(self, path: str, offset: int = 100) -> None:
        st = self.storage()
        data = bytearray(st.read_bytes(path))
        data[offset % len(data)] ^= 0xFF
        st.write_bytes(path, bytes(data))

    def write(self, path: str, data: bytes) -> None:
        self.storage().write_bytes(path, data)


@pytest.fixture(params=["file"] + [pytest.param(f"s3-{k}", marks=pytest.mark.s3) for k in server_params()])
def run_place(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunPlace]:
    """A fresh place for a run on local disk, then on each S3 server the tests start on
    127.0.0.1 (or the endpoint that CKPT_TEST_S3_* variables name)."""
    if request.param == "file":
        yield RunPlace(str(request.getfixturevalue("tmp_path") / "run"))
    else:
        srv = server(request.param.removeprefix("s3-"), tmp_path_factory)
        with fresh_place(srv) as url:
            yield RunPlace(url + "/run", srv.storage_options())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_servers()  # the S3 servers the tests started
