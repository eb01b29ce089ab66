"""``cp`` (copy a committed checkpoint between storages) and ``gc`` (debris and retention).

A copy follows the save's commit protocol (ckpt/_engine/_commit.py): objects first, in
parallel, then the manifest — byte for byte, so its checksum still holds — through the
destination's commit strategy. On local disk the objects land under ``.tmp-<name>-<id>/`` and
the rename is the commit; on object stores the manifest PUT is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckpt._engine._catalog import list_run, read_manifest
from ckpt._engine._commit import WriteTarget, commit_strategy
from ckpt._engine._confine import refuse_symlinks
from ckpt._format import MANIFEST, TMP_PREFIX, Manifest, parse_step_dirname
from ckpt._tools._verify import verify_checkpoint
from ckpt.errors import CheckpointExistsError, CorruptCheckpointError
from ckpt.storage import Storage, open_storage, split_checkpoint_url

Progress = Callable[[int, int], None]
_THREADS = 8


def _dst_url(src: str, dst: str) -> str:
    """``DST/`` (a trailing slash) means: into that run, under the source's name."""
    if dst.endswith("/") and not dst.endswith("://"):
        return dst + src.rstrip("/").rsplit("/", 1)[-1]
    return dst


def cp(src: str | os.PathLike[str], dst: str | os.PathLike[str], dry_run: bool = False, overwrite: bool = False,
       progress: Progress | None = None, *, storage_options: dict[str, Any] | None = None,
       dst_storage_options: dict[str, Any] | None = None, threads: int = _THREADS) -> dict[str, Any]:
    """Copy the committed checkpoint ``src`` to ``dst`` (any storages), then verify the
    copy (quick). ``dst`` ending in ``/`` is a run: the copy keeps the source's name.

    Refuses a committed destination unless ``overwrite``. Returns ``src``, ``dst``,
    ``objects``, ``bytes``, ``seconds``, ``dry_run`` and ``verified``.
    """
    t0 = time.perf_counter()
    src_s, dst_s = os.fspath(src), _dst_url(os.fspath(src), os.fspath(dst))
    s_store, s_name = split_checkpoint_url(src_s, **(storage_options or {}))
    d_opts = storage_options if dst_storage_options is None else dst_storage_options
    d_store, d_name = split_checkpoint_url(dst_s, **(d_opts or {}))
    refuse_symlinks(s_store, s_name, MANIFEST)
    try:
        raw = s_store.read_bytes(f"{s_name}/{MANIFEST}")
    except (FileNotFoundError, NotADirectoryError):
        read_manifest(s_store, s_name)  # raises the fitting "not found" / "incomplete" error
        raise
    Manifest.from_json(raw, where=s_store.describe(s_name))  # only committed, valid checkpoints travel
    refuse_symlinks(s_store, s_name)  # a link inside would copy some other file's bytes
    if s_store.describe(s_name) == d_store.describe(d_name):
        raise CheckpointExistsError("source and destination are the same checkpoint", path=d_store.describe(d_name),
                                    hint="give another destination")
    files = [f for f in s_store.list_files(s_name) if f.path != f"{s_name}/{MANIFEST}"]
    total = sum(f.size for f in files) + len(raw)
    result: dict[str, Any] = {"src": s_store.describe(s_name), "dst": d_store.describe(d_name),
                              "objects": len(files) + 1, "bytes": total, "dry_run": dry_run, "verified": False}
    if d_store.exists(f"{d_name}/{MANIFEST}") and not overwrite:
        raise CheckpointExistsError("a committed checkpoint already exists at the destination",
                                    path=d_store.describe(d_name), hint="pass --overwrite (overwrite=True) to replace it")
    if dry_run:
        result["seconds"] = time.perf_counter() - t0
        return result
    atomic = d_store.capabilities.atomic_rename
    if not atomic and d_store.exists(d_name):
        # No atomic swap on object stores: un-commit the old checkpoint first, then clear it.
        d_store.delete(f"{d_name}/{MANIFEST}")
        d_store.delete_dir(d_name)
    committer = commit_strategy(d_store)
    # The objects keep the source's paths (the manifest travels byte for byte): on object
    # stores they go straight under the destination (cleared above when overwriting).
    target = committer.target(d_name) if atomic else WriteTarget(d_name)
    write_dir = target.dir
    cut = len(s_name) + 1

    def one(path: str) -> int:
        data = s_store.read_bytes(path)
        d_store.write_bytes(f"{write_dir}/{path[cut:]}", data)
        if progress is not None:
            progress(len(data), total)
        return len(data)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="ckpt-cp") as pool:
            for _ in pool.map(one, [f.path for f in files]):
                pass
        committer.commit(target, d_name, raw, overwrite=overwrite)
        if progress is not None:
            progress(len(raw), total)
    except BaseException:
        if atomic:
            _quietly(d_store.delete_dir, write_dir)
        raise
    report = verify_checkpoint(d_store, d_name, quick=True)
    if not report.ok:
        raise CorruptCheckpointError(f"the copy fails verification: {report.problems[0]}",
                                     path=d_store.describe(d_name), hint="run `ckpt verify` on the source and the copy")
    result.update(verified=True, seconds=time.perf_counter() - t0)
    return result


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - gc removes what is left
        pass


def _newest_mtime(storage: Storage, name: str) -> float | None:
    """Newest modification time of anything under ``name`` (local storage only)."""
    if not storage.capabilities.local:
        return None
    root = storage.local_path(name)
    newest = 0.0
    for dirpath, _dirs, files in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            try:
                newest = max(newest, os.lstat(p).st_mtime)
            except OSError:
                continue
    return newest


def gc(run: str | os.PathLike[str], keep_last: int | None = None, dry_run: bool = False, *,
       grace: float = 3600.0, force: bool = False,
       storage_options: dict[str, Any] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Remove what crashed saves left in a run, and old checkpoints beyond ``keep_last``.

    Debris is every ``.tmp-*`` directory and every ``step-*`` directory without a
    manifest. A save may be writing one right now, so debris is removed only when its
    newest object is older than ``grace`` seconds (local storage), or, on storage that
    cannot tell ages (object stores), only with ``force``. Retention keeps the newest
    ``keep_last`` committed step checkpoints and deletes older ones, manifest first.
    Directories that are neither (other names) are never touched.

    Returns ``{"removed": [...], "kept": [...]}``; each item has ``name``, ``url``,
    ``reason`` and ``bytes``. With ``dry_run`` nothing is deleted and ``removed`` lists
    what would be.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last} (gc never deletes every checkpoint)")
    storage = open_storage(run, **(storage_options or {}))
    removed: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    now = time.time()

    def item(name: str, reason: str) -> dict[str, Any]:
        return {"name": name, "url": storage.describe(name), "reason": reason,
                "bytes": sum(f.size for f in storage.list_files(name))}

    if not dry_run:
        for name in commit_strategy(storage).recover():  # never delete a committed checkpoint in limbo
            kept.append(item(name, "recovered: an interrupted overwrite had moved it aside"))
    infos = list_run(storage, include_incomplete=True)
    for info in infos:
        if info.committed:
            continue
        if not info.name.startswith(TMP_PREFIX) and parse_step_dirname(info.name) is None:
            continue
        newest = _newest_mtime(storage, info.name)
        if newest is None and not force:
            kept.append(item(info.name, f"{info.reason}; its age is unknown on this storage "
                                        "(it may be a save in progress): pass --force to remove it"))
            continue
        if newest is not None and not force and now - newest < grace:
            kept.append(item(info.name, f"{info.reason}; written {now - newest:.0f} s ago, within the "
                                        f"grace period of {grace:.0f} s (it may be a save in progress)"))
            continue
        it = item(info.name, info.reason)
        if not dry_run:
            storage.delete_dir(info.name)
        removed.append(it)
    if keep_last is not None:
        # newest first; only names that carry a step (step-N, checkpoint-N): a checkpoint named
        # otherwise (``best/``) was named by hand and is never retired
        committed = [i for i in infos if i.committed and parse_step_dirname(i.name) is not None]
        for info in committed[keep_last:]:
            it = item(info.name, f"retention: older than the newest {keep_last}")
            if not dry_run:
                storage.delete(f"{info.name}/{MANIFEST}")  # un-commit first: never a half-deleted checkpoint
                storage.delete_dir(info.name)
            removed.append(it)
    return {"removed": removed, "kept": kept}
