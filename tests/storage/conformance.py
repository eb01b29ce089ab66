"""The Storage contract, as one suite every backend's tests subclass.

A subclass provides a ``storage`` fixture: an empty storage rooted somewhere private to
the test. The tests use only the public interface, so what passes here holds for the
engine whichever backend it is given.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import hypothesis.strategies as hst
import numpy as np
import pytest
import tensorstore as ts
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from ckpt.errors import StorageError
from ckpt.storage import ObjectInfo, Storage

MIB = 1 << 20


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _paths(infos: list[ObjectInfo]) -> list[str]:
    return [o.path for o in infos]


def _open_array(storage: Storage, path: str, **kwargs) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": storage.kvstore_spec(path)}
    return ts.open(spec, context=storage.ts_context(), **kwargs).result()


class StorageConformance:
    """What every backend promises. Subclasses define the ``storage`` fixture."""

    # -- identity ---------------------------------------------------------------------
    def test_describe_names_the_url(self, storage: Storage) -> None:
        assert storage.url
        assert storage.describe() == storage.url.rstrip("/")
        assert storage.describe("a/b.bin") == storage.url.rstrip("/") + "/a/b.bin"
        assert storage.url in repr(storage)

    # -- bytes --------------------------------------------------------------------------
    @pytest.mark.parametrize("size", [0, 1, 1000])
    def test_round_trip(self, storage: Storage, size: int) -> None:
        data = _payload(size, seed=size)
        storage.write_bytes("obj.bin", data)
        assert storage.read_bytes("obj.bin") == data
        assert storage.size("obj.bin") == size

    def test_round_trip_8mib(self, storage: Storage) -> None:
        data = _payload(8 * MIB, seed=8)
        storage.write_bytes("big/obj.bin", data)
        assert storage.size("big/obj.bin") == len(data)
        assert storage.read_bytes("big/obj.bin") == data
        assert storage.read_bytes("big/obj.bin", 5 * MIB, 5 * MIB + 10) == data[5 * MIB: 5 * MIB + 10]

    def test_write_accepts_memoryview(self, storage: Storage) -> None:
        buf = bytearray(b"0123456789")
        storage.write_bytes("mv.bin", memoryview(buf)[2:8])
        assert storage.read_bytes("mv.bin") == b"234567"

    def test_write_creates_parents(self, storage: Storage) -> None:
        storage.write_bytes("a/b/c/d/e.bin", b"deep")
        assert storage.read_bytes("a/b/c/d/e.bin") == b"deep"
        assert storage.exists("a/b/c")

    def test_ranged_reads(self, storage: Storage) -> None:
        data = bytes(range(100))
        storage.write_bytes("r.bin", data)
        assert storage.read_bytes("r.bin", 10, 20) == data[10:20]
        assert storage.read_bytes("r.bin", 0, 1) == data[:1]
        assert storage.read_bytes("r.bin", 90) == data[90:]
        assert storage.read_bytes("r.bin", None, 5) == data[:5]
        assert storage.read_bytes("r.bin", 95, 200) == data[95:]  # clipped at the end
        assert storage.read_bytes("r.bin", 99, 100) == data[99:]
        assert storage.read_bytes("r.bin", 100) == b""
        assert storage.read_bytes("r.bin", 30, 30) == b""

    def test_overwrite_replaces_the_whole_object(self, storage: Storage) -> None:
        storage.write_bytes("o.bin", b"a much longer first version")
        storage.write_bytes("o.bin", b"short")
        assert storage.read_bytes("o.bin") == b"short"
        assert storage.size("o.bin") == 5
        assert _paths(storage.list_files()) == ["o.bin"]

    def test_create_bytes_writes_only_where_nothing_is(self, storage: Storage) -> None:
        storage.create_bytes("c/manifest.json", b"first")
        with pytest.raises(FileExistsError):
            storage.create_bytes("c/manifest.json", b"second")
        assert storage.read_bytes("c/manifest.json") == b"first"
        assert _paths(storage.list_files("c")) == ["c/manifest.json"]

    def test_concurrent_creates_of_one_object_exactly_one_wins(self, storage: Storage) -> None:
        # the commit of object stores rests on this: of two savers of one checkpoint
        # name, exactly one creates the manifest
        for round_ in range(3):
            path = f"race-{round_}/manifest.json"
            bodies = [_payload(2000, seed=100 * round_ + i) for i in range(6)]

            def create(body: bytes, path: str = path) -> bool:
                try:
                    storage.create_bytes(path, body)
                    return True
                except FileExistsError:
                    return False

            with ThreadPoolExecutor(len(bodies)) as pool:
                won = list(pool.map(create, bodies))
            assert won.count(True) == 1, won
            assert storage.read_bytes(path) == bodies[won.index(True)]

    def test_unusual_key_characters(self, storage: Storage) -> None:
        path = "dir with space/k=v+x~y,z@é.bin"
        storage.write_bytes(path, b"ok")
        assert storage.read_bytes(path) == b"ok"
        assert storage.list_files() == [ObjectInfo(path, 2)]
        assert storage.list_dirs() == ["dir with space"]

    def test_missing_object(self, storage: Storage) -> None:
        storage.write_bytes("present.bin", b"x")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("absent.bin")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("absent.bin", 0, 4)
        with pytest.raises(FileNotFoundError):
            storage.size("absent.bin")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("no/such/dir/x.bin")

    def test_missing_object_error_names_the_location(self, storage: Storage) -> None:
        with pytest.raises(FileNotFoundError) as info:
            storage.read_bytes("nowhere/x.bin")
        assert "nowhere/x.bin" in str(info.value)

    # -- exists ---------------------------------------------------------------------------
    def test_exists_objects_and_prefixes(self, storage: Storage) -> None:
        assert not storage.exists("a")
        storage.write_bytes("a/b/c.bin", b"1")
        assert storage.exists("a/b/c.bin")
        assert storage.exists("a/b")
        assert storage.exists("a")
        assert not storage.exists("a/b/c")  # a name prefix of an object is not an object
        assert not storage.exists("a/b/c.bin/x")
        assert not storage.exists("a/x")

    def test_exists_is_not_fooled_by_a_common_name_prefix(self, storage: Storage) -> None:
        storage.write_bytes("abc/x.bin", b"1")
        assert not storage.exists("ab")
        assert not storage.exists("abc/x")

    # -- listing --------------------------------------------------------------------------
    def test_empty_storage_lists_nothing(self, storage: Storage) -> None:
        assert storage.list_files() == []
        assert storage.list_dirs() == []
        assert storage.list_dirs("missing") == []
        assert storage.list_files("missing") == []

    def test_list_dirs_immediate_and_sorted(self, storage: Storage) -> None:
        for p in ["run/step-2/m.json", "run/step-10/m.json", "run/step-1/a/b.bin",
                  "run/file.bin", "other/x.bin"]:
            storage.write_bytes(p, b"x")
        assert storage.list_dirs() == ["other", "run"]
        assert storage.list_dirs("run") == ["step-1", "step-10", "step-2"]
        assert storage.list_dirs("run/step-1") == ["a"]
        assert storage.list_dirs("run/step-2") == []
        assert storage.list_dirs("ru") == []  # prefixes are directories, not name prefixes

    def test_list_files_recursive_sorted_with_sizes(self, storage: Storage) -> None:
        files = {"z.bin": 3, "a/2.bin": 2, "a/10.bin": 10, "a/b/c/d.bin": 0, "b.bin": 1}
        for p, n in files.items():
            storage.write_bytes(p, b"x" * n)
        assert storage.list_files() == [ObjectInfo(p, files[p]) for p in sorted(files)]
        assert storage.list_files("a") == [ObjectInfo(p, files[p])
                                           for p in ["a/10.bin", "a/2.bin", "a/b/c/d.bin"]]
        assert storage.list_files("a/b") == [ObjectInfo("a/b/c/d.bin", 0)]

    def test_list_files_prefix_is_a_directory(self, storage: Storage) -> None:
        storage.write_bytes("a/b/x.bin", b"1")
        storage.write_bytes("a/bc/y.bin", b"2")
        storage.write_bytes("a/b.bin", b"3")
        assert _paths(storage.list_files("a/b")) == ["a/b/x.bin"]
        assert storage.list_dirs("a") == ["b", "bc"]

    def test_listing_many_objects(self, storage: Storage) -> None:
        # More than one page of an S3 listing (1000 keys).
        names = [f"many/{i:05d}.bin" for i in range(1005)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: storage.write_bytes(p, b"."), names))
        storage.write_bytes("many/sub/last.bin", b".")
        assert _paths(storage.list_files("many")) == names + ["many/sub/last.bin"]
        assert storage.list_dirs("many") == ["sub"]
        storage.delete_dir("many")
        assert storage.list_files() == []

    # -- deletion -------------------------------------------------------------------------
    def test_delete_object_is_idempotent(self, storage: Storage) -> None:
        storage.write_bytes("d/x.bin", b"1")
        storage.write_bytes("d/y.bin", b"2")
        storage.delete("d/x.bin")
        assert not storage.exists("d/x.bin")
        with pytest.raises(FileNotFoundError):
            storage.read_bytes("d/x.bin")
        storage.delete("d/x.bin")
        storage.delete("never/was.bin")
        assert _paths(storage.list_files()) == ["d/y.bin"]

    def test_delete_dir_removes_everything_below(self, storage: Storage) -> None:
        for p in ["ck/step-1/manifest.json", "ck/step-1/arr/zarr.json", "ck/step-1/arr/c/0/0",
                  "ck/step-2/manifest.json"]:
            storage.write_bytes(p, b"x")
        storage.delete_dir("ck/step-1")
        assert _paths(storage.list_files()) == ["ck/step-2/manifest.json"]
        assert not storage.exists("ck/step-1")
        assert storage.list_dirs("ck") == ["step-2"]
        storage.delete_dir("ck/step-1")  # again: not an error
        storage.delete_dir("never/existed")

    def test_delete_dir_leaves_siblings_with_a_common_name_prefix(self, storage: Storage) -> None:
        for p in ["a/b/1.bin", "a/b/sub/2.bin", "a/bc/3.bin", "a/b.json", "a/b-old/4.bin"]:
            storage.write_bytes(p, b"x")
        storage.delete_dir("a/b")
        assert _paths(storage.list_files()) == ["a/b-old/4.bin", "a/b.json", "a/bc/3.bin"]

    # -- no stale views -------------------------------------------------------------------
    def test_listing_sees_writes_at_once(self, storage: Storage) -> None:
        storage.write_bytes("run/step-1/m.json", b"1")
        assert storage.list_dirs("run") == ["step-1"]
        assert _paths(storage.list_files("run")) == ["run/step-1/m.json"]
        storage.write_bytes("run/step-2/m.json", b"2")
        assert storage.list_dirs("run") == ["step-1", "step-2"]
        assert _paths(storage.list_files("run")) == ["run/step-1/m.json", "run/step-2/m.json"]
        assert storage.exists("run/step-2/m.json")

    def test_listing_sees_deletes_at_once(self, storage: Storage) -> None:
        storage.write_bytes("run/step-1/m.json", b"1")
        storage.write_bytes("run/step-2/m.json", b"2")
        assert storage.list_dirs("run") == ["step-1", "step-2"]
        storage.delete("run/step-1/m.json")
        assert _paths(storage.list_files("run")) == ["run/step-2/m.json"]
        assert not storage.exists("run/step-1/m.json")
        storage.delete_dir("run/step-2")
        assert "step-2" not in storage.list_dirs("run")
        assert storage.list_files("run") == []
        assert not storage.exists("run/step-2")

    def test_a_directory_is_there_while_an_object_is_under_it(self, storage: Storage) -> None:
        # exists(): "directories: whether anything lies under it"; the same for list_dirs.
        storage.write_bytes("run/step-1/m.json", b"1")
        storage.write_bytes("run/step-2/m.json", b"2")
        storage.delete("run/step-1/m.json")
        assert storage.list_dirs("run") == ["step-2"]
        assert not storage.exists("run/step-1")
        storage.delete("run/step-2/m.json")
        assert storage.list_dirs() == []
        assert not storage.exists("run")

    def test_concurrent_writers_of_distinct_objects(self, storage: Storage) -> None:
        blobs = {f"rank-{r}/part.bin": _payload(1000 + r, seed=r) for r in range(8)}
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: storage.write_bytes(*kv), blobs.items()))
        for p, data in blobs.items():
            assert storage.read_bytes(p) == data

    def test_agrees_with_a_dict_model(self, storage: Storage) -> None:
        run_state_machine_as_test(
            _model_machine(storage),
            settings=settings(max_examples=5, stateful_step_count=12, deadline=None, database=None),
        )

    # -- tensorstore sees the same bytes ----------------------------------------------------
    def test_tensorstore_writes_are_visible_as_objects(self, storage: Storage) -> None:
        data = np.arange(48, dtype=np.float32).reshape(6, 8)
        arr = _open_array(storage, "ck/w", create=True, dtype=ts.float32, shape=data.shape,
                          chunk_layout=ts.ChunkLayout(chunk_shape=[3, 4]))
        arr.write(data).result()
        files = _paths(storage.list_files("ck/w"))
        assert "ck/w/zarr.json" in files
        assert sum(p.startswith("ck/w/c/") for p in files) == 4
        meta = json.loads(storage.read_bytes("ck/w/zarr.json"))
        assert meta["shape"] == [6, 8] and meta["data_type"] == "float32"
        assert storage.list_dirs("ck") == ["w"]
        np.testing.assert_array_equal(_open_array(storage, "ck/w").read().result(), data)

    def test_objects_written_as_bytes_are_visible_to_tensorstore(self, storage: Storage) -> None:
        storage.write_bytes("kv/one", b"first")
        storage.write_bytes("kv/sub/two", b"second")
        kv = ts.KvStore.open(storage.kvstore_spec("kv"), context=storage.ts_context()).result()
        assert kv.read("one").result().value == b"first"
        assert kv.read("sub/two").result().value == b"second"
        assert sorted(kv.list().result()) == [b"one", b"sub/two"]

    def test_array_copied_object_by_object_opens_again(self, storage: Storage) -> None:
        data = np.arange(30, dtype=np.int64).reshape(5, 6)
        src = _open_array(storage, "src/x", create=True, dtype=ts.int64, shape=data.shape,
                          chunk_layout=ts.ChunkLayout(chunk_shape=[2, 3]))
        src.write(data).result()
        for info in storage.list_files("src"):
            storage.write_bytes("dst" + info.path[len("src"):], storage.read_bytes(info.path))
        np.testing.assert_array_equal(_open_array(storage, "dst/x").read().result(), data)
        storage.delete_dir("src")
        assert storage.list_dirs() == ["dst"]

    # -- capabilities: the local fast path, retained buffers -----------------------------------
    def test_local_path_is_the_file_where_the_backend_is_local(self, storage: Storage) -> None:
        storage.write_bytes("d/obj.bin", b"bytes")
        if not storage.capabilities.local:
            with pytest.raises(NotImplementedError) as ei:
                storage.local_path("d/obj.bin")
            assert isinstance(ei.value, StorageError) and ei.value.hint  # typed, with a fix
            return
        assert storage.local_path("d/obj.bin").read_bytes() == b"bytes"
        assert storage.local_path("d").is_dir() and storage.local_path().is_dir()

    def test_zero_copy_writes_are_safe_unless_the_backend_retains_buffers(self, storage: Storage) -> None:
        """A writer may reuse a buffer handed to tensorstore with
        can_reference_source_data_indefinitely=True once the write is done, unless the
        backend says it retains written buffers (the engine's pool blocks are reused)."""
        buf = np.arange(4096, dtype=np.uint8)
        arr = _open_array(storage, "z", create=True, dtype=ts.uint8, shape=[4096])
        arr.write(buf, can_reference_source_data_indefinitely=
                  not storage.capabilities.retains_written_buffers).result()
        buf[:] = 7  # the block goes back to the pool and is reused
        again = _open_array(storage, "z").read().result()
        np.testing.assert_array_equal(again, np.arange(4096, dtype=np.uint8))

    # -- rename (commit by rename) ------------------------------------------------------------
    def test_rename_dir(self, storage: Storage) -> None:
        if not storage.capabilities.atomic_rename:
            with pytest.raises(NotImplementedError) as ei:
                storage.rename_dir("tmp", "final")
            assert isinstance(ei.value, StorageError) and ei.value.hint  # typed, with a fix
            return
        storage.write_bytes(".tmp-1/manifest.json", b"{}")
        storage.write_bytes(".tmp-1/arr/c/0", b"chunk")
        storage.rename_dir(".tmp-1", "step-1")
        assert _paths(storage.list_files()) == ["step-1/arr/c/0", "step-1/manifest.json"]
        assert storage.read_bytes("step-1/arr/c/0") == b"chunk"
        assert not storage.exists(".tmp-1")

    def test_rename_dir_refuses_an_existing_destination(self, storage: Storage) -> None:
        if not storage.capabilities.atomic_rename:
            pytest.skip("no atomic rename on this backend")
        storage.write_bytes("a/x.bin", b"new")
        storage.write_bytes("b/x.bin", b"old")
        with pytest.raises(FileExistsError):
            storage.rename_dir("a", "b")
        assert storage.read_bytes("b/x.bin") == b"old"
        assert storage.read_bytes("a/x.bin") == b"new"


# Directory names and object names come from different sets, so no path is ever both;
# "a"/"ab" and "x"/"xy" share name prefixes on purpose.
_DIRS = hst.sampled_from(["a", "ab"]) | hst.sampled_from(["a/s", "a/sa", "ab/s"])
_OBJECTS = hst.tuples(_DIRS, hst.sampled_from(["x", "xy"])).map("/".join)


def _model_machine(storage: Storage) -> type[RuleBasedStateMachine]:
    roots = itertools.count()

    class Model(RuleBasedStateMachine):
        """Random writes and deletes; the storage must agree with a dict at every step."""

        def __init__(self) -> None:
            super().__init__()
            self.root = f"model-{next(roots)}"
            self.files: dict[str, bytes] = {}

        def at(self, name: str) -> str:
            return f"{self.root}/{name}"

        @rule(name=_OBJECTS, data=hst.binary(max_size=16))
        def write(self, name: str, data: bytes) -> None:
            storage.write_bytes(self.at(name), data)
            self.files[name] = data

        @rule(name=_OBJECTS)
        def delete(self, name: str) -> None:
            storage.delete(self.at(name))
            self.files.pop(name, None)

        @rule(name=_DIRS)
        def delete_dir(self, name: str) -> None:
            storage.delete_dir(self.at(name))
            self.files = {k: v for k, v in self.files.items() if not k.startswith(name + "/")}

        @rule(name=_OBJECTS)
        def read(self, name: str) -> None:
            if name in self.files:
                assert storage.read_bytes(self.at(name)) == self.files[name]
                assert storage.exists(self.at(name))
            else:
                with pytest.raises(FileNotFoundError):
                    storage.read_bytes(self.at(name))
                assert not storage.exists(self.at(name))

        @rule(name=_DIRS)
        def list_dirs(self, name: str) -> None:
            below = [k[len(name) + 1:] for k in self.files if k.startswith(name + "/")]
            expected = {k.split("/", 1)[0] for k in below if "/" in k}
            # Subset only: FileStorage keeps emptied directories (see its test file).
            assert expected <= set(storage.list_dirs(self.at(name)))
            if below:
                assert storage.exists(self.at(name))

        @invariant()
        def lists_what_the_model_holds(self) -> None:
            listed = storage.list_files(self.root)
            assert [o.path for o in listed] == [self.at(k) for k in sorted(self.files)]
            assert [o.size for o in listed] == [len(self.files[k]) for k in sorted(self.files)]

    return Model


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}-{os.urandom(6).hex()}"
