"""The v1 on-disk format: dtypes, safe paths, the manifest and its checksum.

docs/format.md is the normative description; this module is its implementation and
the only place that reads or writes manifest.json.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import torch

from ckpt.errors import FormatVersionError, ManifestError, UnsafePathError, UnsupportedDtypeError

FORMAT_VERSION = 3


def chunk_separator(format_version: int) -> str:
    """The zarr chunk key separator of a checkpoint's arrays (docs/format.md §3): "/" in
    format 1 (shard ``c/1/0``), "." since format 2 (shard ``c.1.0`` beside zarr.json)."""
    return "/" if format_version < 2 else "."


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of a region, in elements

MANIFEST = "manifest.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"

# Hard limits that keep an untrusted manifest from asking for absurd work.
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_DIMS = 32
MAX_ELEMENTS = 1 << 50  # 1 Pi elements: far above any real tensor
# The most bytes of one inner chunk (or one pack: a pack is one chunk). A reader decodes a
# chunk whole (its crc32c covers all of it), so this bounds what one read allocates; ckpt
# writes chunks of SaveOptions.chunk_bytes (4 MiB by default) and packs of pack_bytes.
MAX_CHUNK_BYTES = 1 << 30

# ---------------------------------------------------------------------------
# dtypes: torch name -> (zarr v3 data_type written on disk, itemsize)
# Dtypes that zarr v3's core spec lacks are stored as their raw little-endian bits in an
# unsigned integer of the same width; the logical dtype is kept in the manifest and in
# the array's attributes (``ckpt.dtype``), so any zarr reader can get the bits back and
# view them (numpy + ml_dtypes for bfloat16 / float8).
# ---------------------------------------------------------------------------
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "bool": (torch.bool, "bool"),
    "uint8": (torch.uint8, "uint8"),
    "int8": (torch.int8, "int8"),
    "int16": (torch.int16, "int16"),
    "int32": (torch.int32, "int32"),
    "int64": (torch.int64, "int64"),
    "float16": (torch.float16, "float16"),
    "float32": (torch.float32, "float32"),
    "float64": (torch.float64, "float64"),
    "complex64": (torch.complex64, "complex64"),
    "complex128": (torch.complex128, "complex128"),
    "bfloat16": (torch.bfloat16, "uint16"),
    "complex32": (torch.complex32, "uint32"),
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[_name] = (getattr(torch, _name), _name)
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        _DTYPES[_name] = (getattr(torch, _name), "uint8")

_BY_TORCH: dict[torch.dtype, str] = {t: n for n, (t, _) in _DTYPES.items()}
_STORAGE_TORCH: dict[str, torch.dtype] = {
    "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "float16": torch.float16,
    "float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64,
    "complex128": torch.complex128,
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _STORAGE_TORCH[_name] = getattr(torch, _name)


def dtype_name(dtype: torch.dtype, key: str | None = None) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise UnsupportedDtypeError(
            f"dtype {dtype} cannot be stored", key=key,
            hint=f"convert the tensor to one of: {', '.join(sorted(_DTYPES))}",
        ) from None


def torch_dtype(name: str, key: str | None = None) -> torch.dtype:
    try:
        return _DTYPES[name][0]
    except (KeyError, TypeError):  # TypeError: a non-string (unhashable) dtype in a hostile manifest
        raise ManifestError(f"unknown dtype {name!r} in the manifest", key=key,
                            hint="the checkpoint was written by a newer ckpt or is damaged") from None


def storage_dtype(name: str) -> str:
    """The zarr v3 ``data_type`` that holds a logical dtype's bits."""
    return _DTYPES[name][1]


def storage_torch_dtype(name: str) -> torch.dtype:
    """The torch dtype whose bits equal the stored zarr array's elements."""
    return _STORAGE_TORCH[storage_dtype(name)]


@functools.lru_cache(maxsize=64)
def itemsize(name: str) -> int:
    return torch.empty((), dtype=torch_dtype(name)).element_size()


def supported_dtypes() -> list[str]:
    return sorted(_DTYPES)


# ---------------------------------------------------------------------------
# keys and paths
# ---------------------------------------------------------------------------
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_.\-%~]+$")  # what key_to_path emits (quote keeps "~")


def key_to_path(key: str) -> str:
    """A state key -> a relative storage path that cannot leave its directory.

    ``/`` separates components; each component is percent-encoded (``%`` included, so
    the mapping is injective) and ``.``/``..``/empty components are encoded too.
    Over-long components are shortened with a hash.
    """
    return _key_to_path(key)


@functools.lru_cache(maxsize=1 << 16)  # every save validates every key: keys repeat
def _key_to_path(key: str) -> str:
    if not key:
        raise UnsafePathError("an empty key cannot be stored", key=key, hint="give the entry a name")
    parts = []
    for comp in key.split("/"):
        enc = quote(comp, safe="-_.")
        if comp in ("", ".", ".."):
            enc = "".join(f"%{ord(c):02X}" for c in comp) or "%00"
        if len(enc) > 120:
            enc = enc[:80] + "~" + hashlib.sha256(comp.encode()).hexdigest()[:32]
        parts.append(enc)
    return "/".join(parts)


def check_relpath(path: Any, *, what: str = "path", key: str | None = None) -> str:
    """Validate a path read from a manifest: relative, no ``..``, no odd characters."""
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise UnsafePathError(f"invalid {what} {path!r} in the manifest", key=key,
                              hint="the manifest is damaged or hostile; do not load it")
    if path.startswith("/") or "\\" in path or "\x00" in path or "://" in path:
        raise UnsafePathError(f"{what} {path!r} is not a relative path inside the checkpoint",
                              key=key, hint="the manifest is damaged or hostile; do not load it")
    for comp in path.split("/"):
        if comp in ("", ".", "..") or not _SAFE_COMPONENT.match(comp):
            raise UnsafePathError(f"{what} {path!r} would leave the checkpoint directory",
                                  key=key, hint="the manifest is damaged or hostile; do not load it")
    return path


def step_dirname(step: int) -> str:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    return f"{STEP_PREFIX}{step:09d}"


# Names whose number is the step: ours, and the Hugging Face Trainer's (integrations/hf.py).
STEP_NAME_PREFIXES = (STEP_PREFIX, "checkpoint-")


def parse_step_dirname(name: str) -> int | None:
    """The step in a checkpoint directory's name (``step-000000100``, ``checkpoint-100``), or None."""
    for prefix in STEP_NAME_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    return None




# ---------------------------------------------------------------------------
# the manifest
# ---------------------------------------------------------------------------
@dataclass
class Manifest:
    """What a committed checkpoint holds. ``entries`` maps key -> entry dict (see
    docs/format.md for each kind's fields)."""

    step: int | None
    entries: dict[str, dict[str, Any]]
    world_size: int = 1
    layout: dict[str, Any] = field(default_factory=dict)
    rank_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=dict)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # format 3: per-rank values live in one object per rank ({"path", "id", "keys"}), not in
    # ``rank_state`` (which grows with the world size)
    rank_objects: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        body = {
            "format": "ckpt",
            "format_version": self.format_version,
            "step": self.step,
            "created": self.created,
            "versions": self.versions or default_versions(),
            "world_size": self.world_size,
            "layout": self.layout,
            "entries": self.entries,
            "rank_state": self.rank_state,
            "user_metadata": self.user_metadata,
        }
        if self.rank_objects is not None:
            body["rank_objects"] = self.rank_objects
        canon = _canonical(body)
        body["checksum"] = "sha256:" + hashlib.sha256(canon).hexdigest()
        return _lines(body)

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError("manifest.json is larger than any real manifest", path=where,
                                hint="the file is damaged or hostile")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits, nesting
            raise ManifestError(f"manifest.json is not valid JSON ({e})", path=where,
                                hint="the checkpoint is damaged; load an earlier one "
                                     "(CheckpointManager.restore does so on its own)") from e
        if not isinstance(body, dict) or body.get("format") != "ckpt":
            raise ManifestError("not a ckpt manifest", path=where,
                                hint="point at a directory written by ckpt.save")
        version = body.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ManifestError(f"bad format_version {version!r}", path=where)
        if version > FORMAT_VERSION:
            raise FormatVersionError(
                f"checkpoint format version {version} is newer than this ckpt reads ({FORMAT_VERSION})",
                path=where, hint="upgrade ckpt (pip install -U ckpt)")
        checksum = body.pop("checksum", None)
        try:
            expect = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
        except (ValueError, RecursionError) as e:  # NaN/Infinity (never written), absurd nesting
            raise ManifestError(f"manifest.json holds values ckpt never writes ({e})", path=where) from None
        if checksum != expect:
            raise ManifestError("manifest.json fails its checksum", path=where,
                                hint="the manifest was modified or damaged; load an earlier checkpoint")
        entries = body.get("entries")
        if not isinstance(entries, dict):
            raise ManifestError("manifest has no entries table", path=where)
        for key, entry in entries.items():
            try:
                validate_entry(key, entry, where)
            except (UnsafePathError, ManifestError) as e:  # the validators may not know path or fix
                if e.path and e.hint:
                    raise
                raise type(e)(e.message, key=e.key, path=where,
                              hint=e.hint or "the manifest is damaged or hostile; load an earlier checkpoint") from None
        step = body.get("step")
        if step is not None and (not isinstance(step, int) or step < 0):
            raise ManifestError(f"bad step {step!r}", path=where)
        ws = body.get("world_size", 1)
        if not isinstance(ws, int) or ws < 1:
            raise ManifestError(f"bad world_size {ws!r}", path=where)
        rank_objects = body.get("rank_objects")
        if rank_objects is not None:
            _check_rank_objects(rank_objects, where)
        created = body.get("created") or 0.0
        if not isinstance(created, int | float) or isinstance(created, int) and abs(created) > 1e300:
            raise ManifestError(f"bad created time {created!r}", path=where)
        return cls(
            step=step, entries=entries, world_size=ws,
            layout=body.get("layout") or {}, rank_state=body.get("rank_state") or {},
            created=float(created), versions=body.get("versions") or {},
            user_metadata=body.get("user_metadata") or {}, format_version=version,
            rank_objects=rank_objects,
        )


def _check_rank_objects(ro: Any, where: str) -> None:
    if not isinstance(ro, dict) or not isinstance(ro.get("id"), str) or not isinstance(ro.get("keys"), list) \
            or not all(isinstance(k, str) for k in ro["keys"]):
        raise ManifestError(f"bad rank_objects {ro!r}"[:200], path=where, hint="the manifest is damaged or hostile")
    check_relpath(ro.get("path"), what="rank objects path")


# ---------------------------------------------------------------------------
# per-rank objects (format 3): ranks/r<6 digits>.json, one per rank of the save
# ---------------------------------------------------------------------------
RANKS_DIR = "ranks"


def rank_object_path(rank: int, base: str = RANKS_DIR) -> str:
    return f"{base}/r{rank:06d}.json"


def rank_object(rank: int, save_id: str, values: dict[str, Any]) -> bytes:
    """The bytes of rank ``rank``'s per-rank values object of save ``save_id``."""
    body = {"format": "ckpt-rank", "rank": rank, "id": save_id, "values": values}
    body["checksum"] = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body, allow_nan=False).encode()


def parse_rank_object(data: bytes, rank: int, save_id: str, *, where: str) -> dict[str, Any]:
    """The values of a per-rank object, checked: its own checksum, and that it is rank
    ``rank``'s object of this very save (no reader gets another save's bytes)."""
    from ckpt.errors import CorruptCheckpointError

    try:
        body = json.loads(data)
        checksum = body.pop("checksum")
        ok = checksum == "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    except (ValueError, RecursionError, AttributeError, KeyError, TypeError):
        ok = False
    if not ok or body.get("rank") != rank or body.get("id") != save_id or not isinstance(body.get("values"), dict):
        raise CorruptCheckpointError(f"rank {rank}'s per-rank values object is damaged or from another save",
                                     path=where, hint="load an earlier checkpoint (CheckpointManager.restore "
                                                      "falls back on its own)")
    return body["values"]


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _lines(body: dict[str, Any]) -> bytes:
    """The manifest's file: one line per top-level key and one per entry, each value
    compact JSON. Not sorted: dict values keep their key order on load (the checksum is
    over the sorted form). Not ``indent=``: that is json's pure-Python encoder, which
    holds the GIL for milliseconds in every save's background thread (the training
    thread waits for it); a compact ``dumps`` per line is its C encoder."""
    def dump(v: Any) -> str:
        return json.dumps(v, allow_nan=False)

    parts = []
    for k, v in body.items():
        if k == "entries" and isinstance(v, dict) and v:
            rows = ",\n".join(f"  {dump(ek)}: {dump(ev)}" for ek, ev in v.items())
            parts.append(f" {dump(k)}: {{\n{rows}\n }}")
        else:
            parts.append(f" {dump(k)}: {dump(v)}")
    return ("{\n" + ",\n".join(parts) + "\n}\n").encode()


def default_versions() -> dict[str, str]:
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    """Read once per process: the package metadata lookup scans ``sys.path`` (in every
    save's background thread, holding the GIL)."""
    from ckpt._version import __version__

    out = {"ckpt": __version__, "torch": torch.__version__}
    try:
        from importlib.metadata import version

        import tensorstore  # noqa: F401

        out["tensorstore"] = version("tensorstore")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return out


_KINDS = {"tensor", "json", "pickle"}


def _check_int_list(v: Any, n: int | None, what: str, key: str, where: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_DIMS or (n is not None and len(v) != n) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
    ):
        raise ManifestError(f"bad {what} {v!r}", key=key, path=where)
    return v


MAX_OBJECTS = 1 << 24  # shards of one array, or inner chunks of one shard: far above any real tensor's


def _check_grid(shape: list[int], shard: list[int], chunk: list[int], key: str, where: str,
                item: int = 1) -> None:
    """Shard and chunk dims are >= 1 (ckpt writes no others), their counts bounded, and an
    inner chunk at most MAX_CHUNK_BYTES, so a hostile manifest cannot ask for a division by
    zero, 2**50 storage objects, or a chunk buffer of 2**40 bytes."""
    if any(s < 1 for s in shard) or any(c < 1 for c in chunk):
        raise ManifestError(f"bad shard/chunk shape {shard}/{chunk}: every dim must be >= 1", key=key, path=where)
    if math.prod(chunk) * item > MAX_CHUNK_BYTES:
        raise ManifestError(f"inner chunk {chunk} holds {math.prod(chunk) * item} bytes, more than any checkpoint "
                            f"holds ({MAX_CHUNK_BYTES})", key=key, path=where, hint="the manifest is damaged or hostile")
    if (math.prod(-(-n // s) for n, s in zip(shape, shard)) > MAX_OBJECTS
            or math.prod(-(-s // c) for s, c in zip(shard, chunk)) > MAX_OBJECTS):
        raise ManifestError(f"shard/chunk shape {shard}/{chunk} of shape {shape} gives absurdly many objects",
                            key=key, path=where, hint="the manifest is damaged or hostile")


def validate_entry(key: Any, entry: Any, where: str) -> None:
    """Check one manifest entry's structure, sizes and paths before anything uses it."""
    if not isinstance(key, str) or not key or not isinstance(entry, dict):
        raise ManifestError("malformed entry", key=str(key), path=where)
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ManifestError(f"unknown entry kind {kind!r}", key=key, path=where)
    if kind == "pickle":
        check_relpath(entry.get("path"), what="object path", key=key)
        return
    if kind == "json":
        return
    torch_dtype(entry.get("dtype", ""), key=key)
    shape = _check_int_list(entry.get("shape"), None, "shape", key, where)
    if math.prod(shape) > MAX_ELEMENTS:
        raise ManifestError(f"shape {shape} is absurdly large", key=key, path=where,
                            hint="the manifest is damaged or hostile")
    sh = entry.get("sharding")
    if sh is not None:  # format 3: the placement rule (informational for readers: storage says where)
        mesh = sh.get("mesh") if isinstance(sh, dict) else None
        dims = sh.get("dims") if isinstance(sh, dict) else None
        if (not isinstance(mesh, list) or not isinstance(dims, list) or len(dims) != len(shape)
                or any(not isinstance(d, list) for d in dims)):
            raise ManifestError(f"bad sharding {sh!r}"[:200], key=key, path=where)
        _check_int_list(mesh, None, "sharding mesh", key, where)
        for d in dims:
            _check_int_list(d, None, "sharding dims", key, where)
            if any(m >= len(mesh) for m in d):
                raise ManifestError(f"bad sharding {sh!r}"[:200], key=key, path=where)
    st = entry.get("storage")
    if not isinstance(st, dict):
        raise ManifestError("tensor entry without storage", key=key, path=where)
    layout = st.get("layout")
    if layout == "array":
        check_relpath(st.get("path"), what="array path", key=key)
        _check_grid(shape, _check_int_list(st.get("shard_shape"), len(shape), "shard_shape", key, where),
                    _check_int_list(st.get("chunk_shape"), len(shape), "chunk_shape", key, where), key, where,
                    itemsize(entry["dtype"]))
    elif layout == "packed":
        check_relpath(st.get("path"), what="pack path", key=key)
        off, nb = st.get("offset"), st.get("nbytes")
        if not (isinstance(off, int) and isinstance(nb, int) and off >= 0 and nb >= 0):
            raise ManifestError("bad pack offset/nbytes", key=key, path=where)
        if nb != math.prod(shape) * itemsize(entry["dtype"]):
            raise ManifestError("pack nbytes disagrees with shape and dtype", key=key, path=where)
        if off + nb > MAX_CHUNK_BYTES:  # a pack is one chunk, read whole
            raise ManifestError(f"packed at bytes {off}..{off + nb}, beyond any pack ({MAX_CHUNK_BYTES} bytes)",
                                key=key, path=where, hint="the manifest is damaged or hostile")
    elif layout == "pieces":
        pieces = st.get("pieces")
        if not isinstance(pieces, list) or not pieces:
            raise ManifestError("pieces layout without pieces", key=key, path=where)
        for p in pieces:
            if not isinstance(p, dict):
                raise ManifestError("malformed piece", key=key, path=where)
            check_relpath(p.get("path"), what="piece path", key=key)
            offs = _check_int_list(p.get("offsets"), len(shape), "piece offsets", key, where)
            sizes = _check_int_list(p.get("sizes"), len(shape), "piece sizes", key, where)
            if any(o + s > d for o, s, d in zip(offs, sizes, shape)):
                raise ManifestError("piece lies outside the tensor", key=key, path=where)
            if p.get("shard_shape") or p.get("chunk_shape"):
                _check_grid(sizes, _check_int_list(p.get("shard_shape") or sizes, len(shape), "shard_shape", key,
                                                   where),
                            _check_int_list(p.get("chunk_shape") or sizes, len(shape), "chunk_shape", key, where),
                            key, where, itemsize(entry["dtype"]))
            elif math.prod(sizes) * itemsize(entry["dtype"]) > MAX_CHUNK_BYTES:  # the piece is one chunk
                raise ManifestError(f"a piece of {list(sizes)} stored as one chunk is larger than any checkpoint "
                                    f"holds ({MAX_CHUNK_BYTES} bytes)", key=key, path=where,
                                    hint="the manifest is damaged or hostile")
    else:
        raise ManifestError(f"unknown storage layout {layout!r}", key=key, path=where)
