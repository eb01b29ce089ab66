"""``verify``: is every byte of a checkpoint there and intact?

Quick mode lists the checkpoint's objects once and checks that every object the
manifest implies exists with its exact size (uncompressed zarr chunks make sizes
exact). Full mode does that, compares each array's ``zarr.json`` with the manifest,
then reads every shard whole with tensorstore (crc32c is checked by the codec),
a bounded number of bytes at a time. A shard that fails is re-read chunk by chunk so
the report names each bad chunk. Nothing stops at the first problem.
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ckpt._engine._catalog import read_manifest
from ckpt._engine._confine import refuse_symlinks
from ckpt._engine._layout import StoredArray, pickle_objects, rank_objects, stored_arrays
from ckpt._engine._recycle import reading
from ckpt._format import MANIFEST, parse_rank_object
from ckpt._tools._common import Checkpoint, object_sizes
from ckpt.errors import CheckpointError
from ckpt.storage import Storage, split_checkpoint_url

Progress = Callable[[int, int], None]  # (bytes just done, total bytes)
_WINDOW = 256 << 20  # bytes of shard reads in flight


@dataclass
class Problem:
    """One thing wrong with a checkpoint.

    ``what``: ``missing`` (an object is absent), ``size`` (wrong size), ``corrupt``
    (fails its checksum or cannot be decoded), ``metadata`` (zarr.json disagrees with
    the manifest), ``manifest`` (the manifest itself is bad). ``keys`` are the state keys
    whose data is affected, ``path`` the object (relative to the checkpoint), ``shard``
    / ``chunk`` the grid index of the shard / inner chunk when known, ``region`` the
    element range ``[[offsets], [sizes]]`` that is affected.
    """

    what: str
    message: str
    keys: list[str] = field(default_factory=list)
    path: str = ""
    shard: list[int] | None = None
    chunk: list[int] | None = None
    region: list[list[int]] | None = None
    detail: str = ""  # the storage layer's own words, when there are any

    def __str__(self) -> str:
        where = self.path
        if self.chunk is not None:
            where += f" chunk {tuple(self.chunk)}"
        if self.region is not None:
            offs, sizes = self.region
            where += " [" + ", ".join(f"{o}:{o + s}" for o, s in zip(offs, sizes)) + "]"
        keys = ", ".join(self.keys[:3]) + (f" and {len(self.keys) - 3} more" if len(self.keys) > 3 else "")
        return f"{self.what.upper()} {keys or '-'} {where}: {self.message}"


@dataclass
class VerifyReport:
    """The result of :func:`verify`; ``ok`` when ``problems`` is empty."""

    url: str
    quick: bool
    problems: list[Problem] = field(default_factory=list)
    entries: int = 0
    arrays: int = 0
    objects: int = 0  # objects checked for presence and size
    shards_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def verify(ckpt_url: str | os.PathLike[str], quick: bool = False, progress: Progress | None = None, *,
           storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Check the checkpoint at ``ckpt_url``; returns a report of every problem found.

    Raises only when there is no checkpoint at all (CheckpointNotFoundError,
    IncompleteCheckpointError) or it holds a symlink (UnsafePathError: nothing is read
    through one); a bad manifest is reported as a problem.
    """
    storage, name = split_checkpoint_url(ckpt_url, **(storage_options or {}))
    return verify_checkpoint(storage, name, quick=quick, progress=progress)


def verify_checkpoint(storage: Storage, name: str, *, quick: bool = False,
                      progress: Progress | None = None) -> VerifyReport:
    """:func:`verify` for the checkpoint ``name`` of an open storage."""
    with reading(storage, name):  # retention cannot recycle it under the check
        return _verify(storage, name, quick, progress)


def _verify(storage: Storage, name: str, quick: bool, progress: Progress | None) -> VerifyReport:
    t0 = time.perf_counter()
    report = VerifyReport(storage.describe(name), quick)
    refuse_symlinks(storage, name, MANIFEST)  # raised, not reported: nothing is read through a link
    try:
        manifest = read_manifest(storage, name)
    except CheckpointError as e:
        if isinstance(e, FileNotFoundError):
            raise
        report.problems.append(Problem("manifest", e.message, [e.key] if e.key else [], MANIFEST))
        report.seconds = time.perf_counter() - t0
        return report
    refuse_symlinks(storage, name)  # verify reads every object: none through a link
    ck = Checkpoint(storage, name, manifest)
    report.entries = len(manifest.entries)
    arrays = stored_arrays(manifest)
    report.arrays = len(arrays)
    present = _check_presence(ck, arrays, report)
    if not quick:
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="ckpt-verify") as pool:
            list(pool.map(lambda a: _check_metadata(ck, a, report, present), arrays))
        _read_all(ck, arrays, present, report, progress)
    report.problems.sort(key=lambda p: (p.path, p.shard or [], p.chunk or []))
    report.seconds = time.perf_counter() - t0
    return report


_MAX_MISSING = 64  # missing objects of one array named one by one; then one summary
_HOPELESS = "\x00hopeless:"  # marks, among the stored objects' sizes, an array not to read


def _shard_count(a: StoredArray) -> int:
    return _prod(tuple(-(-n // s) for n, s in zip(a.layout.shape, a.layout.shard_shape)))


def _check_presence(ck: Checkpoint, arrays: list[StoredArray], report: VerifyReport) -> dict[str, int]:
    sizes = object_sizes(ck.storage, ck.name)
    for a in arrays:
        missing = 0
        for idx, path, region in a.shards():
            report.objects += 1
            if path not in sizes:
                missing += 1
                if missing > _MAX_MISSING:  # a hostile manifest may imply 2**24 objects: stop naming them
                    stored = sum(1 for p in sizes if p.startswith(f"{a.path}/"))
                    report.problems.append(Problem(
                        "missing", f"more than {_MAX_MISSING} objects of this array are missing: it has "
                                   f"{_shard_count(a)} shards, {stored} objects are stored under it",
                        list(a.keys), a.path))
                    sizes[_HOPELESS + a.path] = 0  # not read: most of it is missing
                    break
                report.problems.append(Problem("missing", "the object is missing", list(a.keys), path,
                                               shard=list(idx), region=_region(region)))
            elif sizes[path] != a.expected_size(region):
                report.problems.append(Problem(
                    "size", f"{sizes[path]} bytes, expected {a.expected_size(region)} (truncated or overwritten)",
                    list(a.keys), path, shard=list(idx), region=_region(region)))
        report.objects += 1
        if f"{a.path}/zarr.json" not in sizes:
            report.problems.append(Problem("missing", "zarr.json is missing", list(a.keys), f"{a.path}/zarr.json"))
    for key, path in pickle_objects(ck.manifest):
        report.objects += 1
        if path not in sizes:
            report.problems.append(Problem("missing", "the pickled object is missing", [key], path))
        elif sizes[path] == 0:
            report.problems.append(Problem("size", "the pickled object is empty", [key], path))
    ro = ck.manifest.rank_objects
    for rank, path in enumerate(rank_objects(ck.manifest)):
        report.objects += 1
        if path not in sizes:
            report.problems.append(Problem("missing", f"rank {rank}'s per-rank values object is missing",
                                           list(ro["keys"]) if ro else [], path))
        elif not report.quick:
            try:
                parse_rank_object(ck.storage.read_bytes(f"{ck.name}/{path}"), rank, ro["id"] if ro else "",
                                  where=ck.storage.describe(f"{ck.name}/{path}"))
            except CheckpointError as e:
                report.problems.append(Problem("corrupt", e.message, list(ro["keys"]) if ro else [], path))
    return sizes


def _check_metadata(ck: Checkpoint, a: StoredArray, report: VerifyReport, present: dict[str, int]) -> None:
    """Report where zarr.json disagrees with the manifest. Data is read with the
    manifest's metadata either way, as ckpt.load does."""
    path = f"{a.path}/zarr.json"
    if path not in present:
        return  # reported as missing
    try:
        meta = json.loads(ck.storage.read_bytes(ck.obj(path)))
    except (OSError, ValueError) as e:
        report.problems.append(Problem("metadata", f"zarr.json is unreadable ({e})", list(a.keys), path))
        return
    if not isinstance(meta, dict):
        report.problems.append(Problem("metadata", "zarr.json is not a JSON object", list(a.keys), path))
        return
    diffs = []
    attrs = (meta.get("attributes") or {}).get("ckpt") or {}
    if a.kind == "pack":
        if sorted(attrs.get("keys") or []) != sorted(a.keys):
            diffs.append("its ckpt attributes name other keys")
    elif attrs.get("key") != a.keys[0] or attrs.get("dtype") != ck.manifest.entries[a.keys[0]]["dtype"]:
        diffs.append("its ckpt attributes name another key or dtype")
    import tensorstore as ts

    want = a.metadata()
    want.pop("attributes")
    spec = {"driver": "zarr3", "kvstore": ck.storage.kvstore_spec(ck.obj(a.path)), "metadata": want}
    try:  # tensorstore compares the stored metadata with the manifest's, normalised
        ts.open(spec, open=True, context=ck.storage.ts_context()).result()
    except Exception as e:  # noqa: BLE001
        diffs.append(_clean(e).removeprefix("FAILED_PRECONDITION: "))
    for d in diffs:
        report.problems.append(Problem("metadata", f"zarr.json disagrees with the manifest: {d}", list(a.keys), path))


def _region(box: tuple[tuple[int, ...], tuple[int, ...]]) -> list[list[int]]:
    return [list(box[0]), list(box[1])]


def _open(ck: Checkpoint, a: StoredArray) -> Any:
    import tensorstore as ts

    spec = {"driver": "zarr3", "kvstore": ck.storage.kvstore_spec(ck.obj(a.path)), "metadata": a.metadata(),
            "fill_missing_data_reads": False}
    return ts.open(spec, open=True, assume_metadata=True, context=ck.storage.ts_context())


def _read_all(ck: Checkpoint, arrays: list[StoredArray], present: dict[str, int], report: VerifyReport,
              progress: Progress | None) -> None:
    # Only objects of exactly the size the manifest implies are read (the others are
    # reported already): what a read allocates is then bounded by what storage holds. A
    # shard larger than the window is read chunk by chunk (each at most MAX_CHUNK_BYTES).
    jobs: list[tuple[StoredArray, tuple[int, ...], str, Any, tuple[int, ...] | None]] = []
    for a in arrays:
        if _HOPELESS + a.path in present:
            continue  # most of it is missing: reported, not read
        for idx, path, region in a.shards():
            if present.get(path) != a.expected_size(region):
                continue
            if a.kind == "pack" or a.itemsize * _prod(region[1]) <= _WINDOW:
                jobs.append((a, idx, path, region, None))
            else:
                jobs.extend((a, idx, path, box, cidx) for cidx, box in a.chunks(region))
    total = sum(a.itemsize * _prod(region[1]) for a, _, _, region, _ in jobs)
    window: collections.deque[tuple[Any, StoredArray, tuple[int, ...], str, Any, int]] = collections.deque()
    inflight = 0
    opened: dict[str, Any] = {}
    for a, idx, path, region, cidx in jobs:
        nbytes = a.itemsize * _prod(region[1])
        while window and inflight + nbytes > _WINDOW:
            inflight -= _finish(window.popleft(), report, progress, total)
        if a.path not in opened:
            try:
                opened[a.path] = _open(ck, a).result()
            except Exception as e:  # noqa: BLE001 - reported, the others go on
                opened[a.path] = None
                report.problems.append(Problem("corrupt", "cannot open the array", list(a.keys), a.path,
                                               detail=_clean(e)))
        arr = opened[a.path]
        if arr is None:
            continue
        fut = arr[tuple(slice(o, o + s) for o, s in zip(*region))].read()
        window.append((fut, a, idx, path, (arr, region, cidx), nbytes))
        inflight += nbytes
    while window:
        _finish(window.popleft(), report, progress, total)


def _prod(sizes: tuple[int, ...]) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def _finish(item: tuple[Any, StoredArray, tuple[int, ...], str, Any, int], report: VerifyReport,
            progress: Progress | None, total: int) -> int:
    fut, a, idx, path, (arr, region, cidx), nbytes = item
    try:
        fut.result()
    except Exception as e:  # noqa: BLE001
        if cidx is not None:  # one chunk of a large shard
            report.problems.append(_failure(e, a, path, idx, region, cidx))
        else:
            _locate(arr, a, idx, path, region, e, report)
    else:
        report.bytes_read += nbytes
    report.shards_read += 1
    if progress is not None:
        progress(nbytes, total)
    return nbytes


def _kind(e: BaseException) -> str:
    low = str(e).lower()
    return "missing" if "not_found" in low or "missing" in low else "corrupt"


def _clean(e: BaseException) -> str:
    return str(e).split("[source locations=", 1)[0].strip()


def _summary(e: BaseException) -> str:
    """A short message for a failed read (the full text goes to ``detail``)."""
    low = str(e).lower()
    where = " of the shard index" if "shard index" in low else ""
    if "digest mismatch" in low or "checksum" in low:
        return f"crc32c checksum mismatch{where}"
    if _kind(e) == "missing":
        return "data is missing"
    return f"cannot be decoded{where}"


def _failure(e: BaseException, a: StoredArray, path: str, idx: tuple[int, ...], box: Any,
             chunk: tuple[int, ...] | None = None) -> Problem:
    return Problem(_kind(e), _summary(e), list(a.keys), path, shard=list(idx),
                   chunk=None if chunk is None else list(chunk), region=_region(box), detail=_clean(e))


def _locate(arr: Any, a: StoredArray, idx: tuple[int, ...], path: str, region: Any, err: BaseException,
            report: VerifyReport) -> None:
    """A shard failed to read: find which of its chunks are bad (or blame the whole shard)."""
    bad = []
    chunks = list(a.chunks(region)) if a.kind != "pack" else []
    for cidx, box in chunks:
        try:
            arr[tuple(slice(o, o + s) for o, s in zip(*box))].read().result()
        except Exception as e:  # noqa: BLE001
            bad.append((cidx, box, e))
    if not bad or len(bad) == len(chunks) > 1:  # e.g. a broken shard index: every chunk fails
        report.problems.append(_failure(err, a, path, idx, region))
        return
    for cidx, box, why in bad:
        report.problems.append(_failure(why, a, path, idx, box, cidx))
