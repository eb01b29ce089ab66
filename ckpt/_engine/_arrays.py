"""tensorstore specs and error translation for ckpt's zarr arrays."""

from __future__ import annotations

from typing import Any

from ckpt.errors import (
    CorruptCheckpointError,
    StorageError,
    StorageFullError,
    StoragePermissionError,
)
from ckpt.storage import Storage


def array_spec(storage: Storage, path: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": storage.kvstore_spec(path)}
    if metadata is not None:
        spec["metadata"] = metadata
    return spec


def open_for_write(storage: Storage, path: str, metadata: dict[str, Any], *, create: bool,
                   reused: bool = False) -> Any:
    """Open (and, with ``create``, write zarr.json of) an array. Non-creating writers
    assume the metadata instead of reading it, so no writer touches another's objects.
    ``reused``: the directory may hold an older array (a recycled tree): its zarr.json
    goes first (tensorstore refuses to create over metadata, and ``delete_existing``
    would delete the chunks the write is about to overwrite in place)."""
    import tensorstore as ts

    kwargs: dict[str, Any] = {"context": storage.ts_context()}
    if create and reused:
        storage.delete(f"{path}/zarr.json")
    if create:
        kwargs.update(create=True, delete_existing=False)
    else:
        kwargs.update(assume_metadata=True)
    # store chunks equal to the fill value too: a missing object then always means data loss
    return ts.open({**array_spec(storage, path, metadata), "store_data_equal_to_fill_value": True}, **kwargs)


def translate(exc: BaseException, *, key: str | None, where: str, reading: bool) -> BaseException:
    """A tensorstore/OS failure -> the ckpt error a user can act on."""
    if isinstance(exc, StorageError | CorruptCheckpointError):
        return exc
    text = str(exc)
    low = text.lower()
    if reading and ("checksum" in low or "crc32c" in low or "digest mismatch" in low or "data_loss" in low):
        return CorruptCheckpointError(f"stored data fails its checksum ({text})", key=key, path=where,
                                      hint="the checkpoint is damaged; `ckpt verify` lists every bad chunk; "
                                           "load an earlier checkpoint")
    if reading and ("not found" in low or "does not exist" in low or "missing" in low):
        return CorruptCheckpointError(f"stored data is missing ({text})", key=key, path=where,
                                      hint="an object of the checkpoint was deleted; load an earlier checkpoint")
    if reading and ("error decoding" in low or "invalid" in low or "out of range" in low
                    or "failed to decode" in low or "truncated" in low or "unexpected end" in low
                    or "error reading shard index" in low or "shard index" in low
                    or "not enough data" in low):  # a truncated unsharded chunk (a pack)
        return CorruptCheckpointError(f"stored data cannot be decoded ({text})", key=key, path=where,
                                      hint="the checkpoint is damaged; load an earlier checkpoint")
    if "no space left" in low or "enospc" in low or "quota" in low:
        return StorageFullError(f"storage full ({text})", key=key, path=where,
                                hint="free space or choose a larger location; committed checkpoints are untouched")
    if ("permission denied" in low or "access denied" in low or "forbidden" in low
            or "permission_denied" in low or "read-only file system" in low):  # tensorstore's EACCES/EROFS
        return StoragePermissionError(f"permission denied ({text})", key=key, path=where,
                                      hint="check credentials and permissions of the location")
    verb = "reading" if reading else "writing"
    return StorageError(f"failed {verb} array data ({type(exc).__name__}: {text})", key=key, path=where)
