"""Configuration: plain frozen dataclasses; explicit arguments beat ``CKPT_*`` environment
variables, which beat defaults."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from ckpt._engine._plan import PlanConfig


def _default_pool_bytes() -> int:
    """1/8 of physical memory, between 256 MiB and 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 16 << 30
    return int(min(4 << 30, max(256 << 20, total // 8)))


def parse_bytes(text: str) -> int:
    """``"64MiB"``, ``"5M"``, ``"1G"`` or a plain number of bytes (CKPT_* settings)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def parse_flag(text: str, name: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off`` (CKPT_* switches)."""
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r}: expected 1/true/yes/on or 0/false/no/off")


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
    ``"background"`` (a stager thread, while the loop runs on), ``"inline"`` (in the
    ``save_async`` call, on as many threads as there are cores, checksums included), or
    ``"auto"`` (default): inline when the training already fills every core this process
    may run on (torch's intra-op threads, times torchrun's ``LOCAL_WORLD_SIZE`` ranks when
    they share the host's cores). There a background copy can only take those cores from the
    training threads, and costs the loop several times its own duration (measured with
    ``python -m bench``); in the call it costs just its duration. States with CUDA
    tensors always stage in the background (their copies are DMA). ``huge_pages``: back
    an unpinned pool with transparent huge pages (``MADV_HUGEPAGE``; default on): an
    O_DIRECT write pins every page of its buffer, and with 2 MiB pages that took ~8 ms of
    kernel CPU per GiB instead of ~46 on the benchmark machine. The first touch of the
    pool costs more (there, a first 1 GiB save took 1.8 s instead of 0.43 s in the call);
    turn it off (``CKPT_HUGE_PAGES=0``) for jobs that checkpoint only a few times, or where
    the kernel compacts memory synchronously on that first touch (THP ``defrag``).
    """

    pool_bytes: int = dataclasses.field(default_factory=_default_pool_bytes)
    max_shard_bytes: int = 64 << 20
    chunk_bytes: int = 4 << 20
    pack_threshold: int = 256 << 10
    pack_bytes: int = 16 << 20
    copy_streams: int = 2
    if_busy: Literal["wait", "skip", "error"] = "wait"
    cpu_staging: Literal["auto", "background", "inline"] = "auto"
    huge_pages: bool = True

    def __post_init__(self) -> None:
        if self.if_busy not in ("wait", "skip", "error"):
            raise ValueError(f"if_busy must be 'wait', 'skip' or 'error', got {self.if_busy!r}")
        if self.cpu_staging not in ("auto", "background", "inline"):
            raise ValueError(f"cpu_staging must be 'auto', 'background' or 'inline', got {self.cpu_staging!r} "
                             "(SaveOptions.cpu_staging / CKPT_CPU_STAGING)")
        if self.pool_bytes < (1 << 20):
            raise ValueError(f"pool_bytes must be at least 1 MiB, got {self.pool_bytes}")
        if self.copy_streams < 1:
            raise ValueError("copy_streams must be >= 1")

    @classmethod
    def resolve(cls, options: SaveOptions | None = None, **overrides: Any) -> SaveOptions:
        """Defaults, then ``CKPT_*`` environment variables, then ``options``/overrides."""
        if options is not None:
            return dataclasses.replace(options, **overrides) if overrides else options
        env: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"CKPT_{f.name.upper()}")
            if raw is None:
                continue
            if f.name in ("if_busy", "cpu_staging"):
                env[f.name] = raw
            elif f.type in (bool, "bool"):
                env[f.name] = parse_flag(raw, f"CKPT_{f.name.upper()}")
            elif "bytes" in f.name or "threshold" in f.name:
                env[f.name] = parse_bytes(raw)
            else:
                env[f.name] = int(raw)
        env.update(overrides)
        return cls(**env)

    def plan_config(self) -> PlanConfig:
        # at least 1 MiB, but never the whole pool: a block holds a shard plus its crc32c's
        # and index (direct writes), so a 1 MiB pool gets 512 KiB shards
        shard = max(min(1 << 20, self.pool_bytes // 2), min(self.max_shard_bytes, self.pool_bytes // 4))
        return PlanConfig(
            max_shard_bytes=shard,
            chunk_bytes=min(self.chunk_bytes, shard),
            pack_threshold=min(self.pack_threshold, shard),
            pack_bytes=min(self.pack_bytes, shard),
        )
