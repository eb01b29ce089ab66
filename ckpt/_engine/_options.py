"""Save options: a plain frozen dataclass; explicit arguments beat ``CKPT_<FIELD>``
environment variables, which beat defaults; both declared once, in ckpt._config.KNOBS."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ckpt._config import KNOBS, setting
from ckpt._engine._plan import PlanConfig
from ckpt._format import MAX_CHUNK_BYTES

_UNSET: Any = object()


def _knob(field: str) -> Any:
    """A field whose default (and ``CKPT_<FIELD>`` variable) the knob table declares."""
    knob = KNOBS[f"CKPT_{field.upper()}"]
    return dataclasses.field(default_factory=knob.default_value)


@dataclass(frozen=True)
class SaveOptions:
    """How snapshots are staged and written.

    ``pool_bytes``: ceiling of host staging memory (pinned on CUDA); the pool may be
    smaller than the largest tensor. ``max_shard_bytes``: largest storage object of an
    array (capped at a quarter of the pool). ``chunk_bytes``: inner chunk, the unit of
    a partial read. ``pack_threshold`` / ``pack_bytes``: tensors up to the threshold are
    packed into objects of about ``pack_bytes``. ``copy_streams``: CUDA streams used for
    device-to-host copies. ``if_busy``: what a snapshot requested while the previous one
    still runs does — ``"wait"`` for it, ``"skip"`` this one with a warning, or
    ``"error"``. ``cpu_staging``: where a state of CPU tensors is copied into the pool —
    ``"background"`` (default: a stager thread, while the loop runs on) or ``"inline"``
    (in the ``save_async`` call, on up to 4 threads, checksums included; the call returns
    with every copy done, so the state may change at once). States with CUDA tensors
    always stage in the background (their copies are DMA). ``huge_pages``: back an
    unpinned pool with transparent huge pages (``MADV_HUGEPAGE``; default on): O_DIRECT
    writes pin fewer pages, and the first touch of each pool page costs more; turn it
    off for jobs that checkpoint only a few times (figures: docs/bench/knobs.md).
    ``check_snapshot`` (debug, default off; ``CKPT_CHECK_SNAPSHOT=1``): a crc32 of every
    tensor at the call and again once it is staged; a mismatch fails the save with
    ``SnapshotFailedError``. It catches writes that torch's version counter does not see
    (``t.data.add_()``, ``t.numpy()[:] = ...``, another library's writes through DLPack),
    at the cost of reading every tensor twice more (CUDA tensors through host memory).
    """

    pool_bytes: int = _knob("pool_bytes")
    max_shard_bytes: int = _knob("max_shard_bytes")
    chunk_bytes: int = _knob("chunk_bytes")
    pack_threshold: int = _knob("pack_threshold")
    pack_bytes: int = _knob("pack_bytes")
    copy_streams: int = _knob("copy_streams")
    if_busy: Literal["wait", "skip", "error"] = _knob("if_busy")
    cpu_staging: Literal["background", "inline"] = _knob("cpu_staging")
    huge_pages: bool = _knob("huge_pages")
    check_snapshot: bool = _knob("check_snapshot")

    def __post_init__(self) -> None:
        if self.if_busy not in ("wait", "skip", "error"):
            raise ValueError(f"if_busy must be 'wait', 'skip' or 'error', got {self.if_busy!r}")
        if self.cpu_staging not in ("background", "inline"):
            raise ValueError(f"cpu_staging must be 'background' or 'inline', got {self.cpu_staging!r} "
                             "(SaveOptions.cpu_staging / CKPT_CPU_STAGING)")
        if self.pool_bytes < (1 << 20):
            raise ValueError(f"pool_bytes must be at least 1 MiB, got {self.pool_bytes}")
        if self.copy_streams < 1:
            raise ValueError("copy_streams must be >= 1")

    @classmethod
    def resolve(cls, options: SaveOptions | None = None, **overrides: Any) -> SaveOptions:
        """Defaults, then ``CKPT_<FIELD>`` environment variables, then ``options``/overrides."""
        if options is not None:
            return dataclasses.replace(options, **overrides) if overrides else options
        env: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in overrides:
                env[f.name] = setting(f"CKPT_{f.name.upper()}", _UNSET, KNOBS[f"CKPT_{f.name.upper()}"].parse)
        env = {k: v for k, v in env.items() if v is not _UNSET}
        env.update(overrides)
        return cls(**env)

    def plan_config(self) -> PlanConfig:
        # at least 1 MiB, but never the whole pool: a block holds a shard plus its crc32c's
        # and index (direct writes), so a 1 MiB pool gets 512 KiB shards
        shard = max(min(1 << 20, self.pool_bytes // 2), min(self.max_shard_bytes, self.pool_bytes // 4))
        # a chunk (a pack is one) never above what a reader accepts (_format.MAX_CHUNK_BYTES)
        return PlanConfig(
            max_shard_bytes=shard,
            chunk_bytes=min(self.chunk_bytes, shard, MAX_CHUNK_BYTES),
            pack_threshold=min(self.pack_threshold, shard, MAX_CHUNK_BYTES // 2),
            pack_bytes=min(self.pack_bytes, shard, MAX_CHUNK_BYTES // 2),
        )
