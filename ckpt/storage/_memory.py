"""In-memory storage (``memory://name``), for tests and tools.

It is backed by a tensorstore ``memory`` kvstore bound to one Context per name, so the
arrays tensorstore writes and the bytes ckpt reads are the same store. Contents live as
long as the process.
"""

from __future__ import annotations

import threading
from typing import Any

from ckpt.storage._base import Capabilities, ObjectInfo, Storage

_lock = threading.Lock()
_contexts: dict[str, Any] = {}


def _context_for(name: str) -> Any:
    import tensorstore as ts

    with _lock:
        if name not in _contexts:
            _contexts[name] = ts.Context({"memory_key_value_store": {}})
        return _contexts[name]


def drop(name: str) -> None:
    """Forget the store ``memory://name`` (tests use this for isolation)."""
    with _lock:
        _contexts.pop(name, None)


_create_lock = threading.Lock()


class MemoryStorage(Storage):
    capabilities = Capabilities(atomic_rename=False, retains_written_buffers=True)

    def __init__(self, name: str, prefix: str = "") -> None:
        import tensorstore as ts

        self.name = name
        self.prefix = prefix.strip("/")
        self.url = f"memory://{name}" + (f"/{self.prefix}" if self.prefix else "")
        self._ctx = _context_for(name)
        self._kv = ts.KvStore.open({"driver": "memory", "path": ""}, context=self._ctx).result()

    def _key(self, path: str) -> str:
        return self.join(self.prefix, path)

    def _dir_key(self, path: str) -> str:
        k = self._key(path)
        return k + "/" if k else ""

    def read_bytes(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        r = self._kv.read(self._key(path)).result()
        if r.state != "value":
            raise FileNotFoundError(2, "no such object", self.describe(path))
        data = bytes(r.value)
        if start is not None or end is not None:
            data = data[start or 0 : end]
        return data

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        self._kv.write(self._key(path), bytes(data)).result()

    def create_bytes(self, path: str, data: bytes | memoryview) -> None:
        with _create_lock:  # the store lives in this process: one lock makes it atomic
            super().create_bytes(path, data)

    def exists(self, path: str) -> bool:
        if self._kv.read(self._key(path)).result().state == "value":
            return True
        return bool(self._list_keys(self._dir_key(path)))

    def size(self, path: str) -> int:
        return len(self.read_bytes(path))

    def _list_keys(self, prefix: str) -> list[str]:
        import tensorstore as ts

        rng = ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)) if prefix else ts.KvStore.KeyRange()
        return sorted(k.decode() for k in self._kv.list(rng).result())

    def list_dirs(self, prefix: str = "") -> list[str]:
        p = self._dir_key(prefix)
        dirs = {k[len(p):].split("/", 1)[0] for k in self._list_keys(p) if "/" in k[len(p):]}
        return sorted(dirs)

    def list_files(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._key("")
        strip = len(base) + 1 if base else 0
        out = []
        for k in self._list_keys(self._dir_key(prefix)):
            r = self._kv.read(k).result()
            out.append(ObjectInfo(k[strip:], len(r.value) if r.state == "value" else 0))
        return out

    def delete(self, path: str) -> None:
        self._kv.delete_range(_exact(self._key(path))).result()

    def delete_dir(self, prefix: str) -> None:
        import tensorstore as ts

        p = self._dir_key(prefix)
        if not p:
            self._kv.delete_range(ts.KvStore.KeyRange()).result()
            return
        self._kv.delete_range(ts.KvStore.KeyRange(p, p[:-1] + chr(ord(p[-1]) + 1))).result()

    def kvstore_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "memory", "path": self._dir_key(path)}

    def ts_context(self) -> Any:
        return self._ctx


def _exact(key: str) -> Any:
    import tensorstore as ts

    return ts.KvStore.KeyRange(key, key + "\x00")
