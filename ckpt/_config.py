"""Configuration from the environment: one parser, and every ``CKPT_*`` switch ckpt reads
that is not a :class:`~ckpt.SaveOptions` field, in one place.

:func:`setting` is the only reader of ``CKPT_*`` variables: an explicit argument beats the
variable, which beats the default; a value the parser refuses raises
:class:`~ckpt.errors.ConfigError` naming the variable. ``SaveOptions.resolve`` reads its
fields through it (``CKPT_<FIELD>``), and so do the switches below and the S3 storage's
settings. This module imports nothing of ckpt but its errors, so storage and engine
modules alike may use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from ckpt.errors import ConfigError

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bytes(text: str) -> int:
    """``"64MiB"``, ``"5M"``, ``"1G"`` or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def parse_flag(text: str) -> bool:
    """``1``/``true``/``yes``/``on`` or ``0``/``false``/``no``/``off``."""
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


def choice(*values: str) -> Callable[[str], str]:
    """A parser accepting exactly ``values`` (case-insensitive)."""
    def parse(text: str) -> str:
        t = text.strip().lower()
        if t not in values:
            raise ValueError(f"expected one of {', '.join(values)}")
        return t
    return parse


def setting(name: str, default: T, parse: Callable[[str], T], explicit: T | None = None) -> T:
    """``explicit`` if given, else the environment variable ``name`` parsed, else
    ``default`` (an unset or blank variable). A refused value raises ConfigError."""
    if explicit is not None:
        return explicit
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return parse(raw.strip())
    except ValueError as e:
        raise ConfigError(f"{name}={raw!r}: {e}", hint=f"set {name} to a valid value, or unset it") from None


# -- the switches (README, "Configuration") ------------------------------------
def direct_reads() -> bool:
    """``CKPT_DIRECT_READS`` (default on): local loads read chunks with ``os.preadv``."""
    return setting("CKPT_DIRECT_READS", True, parse_flag)


def _write_mode(text: str) -> str:
    t = text.strip().lower()
    if t == "buffered":
        return t
    return "direct" if parse_flag(t) else "off"


def direct_writes() -> str:
    """``CKPT_DIRECT_WRITES``: ``direct`` (default, ``1``: O_DIRECT where supported),
    ``buffered`` (through the page cache) or ``off`` (``0``: through tensorstore)."""
    return setting("CKPT_DIRECT_WRITES", "direct", _write_mode)


def load_rollback() -> bool:
    """``CKPT_LOAD_ROLLBACK`` (default on): ``ckpt.load`` keeps the old values of the
    tensors it loads into in host memory and puts them back when the load fails part
    way (all or nothing); ``0`` saves that memory and copy, and a failed load may leave
    tensors half loaded."""
    return setting("CKPT_LOAD_ROLLBACK", True, parse_flag)


def io_concurrency() -> int:
    """``CKPT_IO_CONCURRENCY`` (default 32): tensorstore's file I/O threads."""
    return max(1, setting("CKPT_IO_CONCURRENCY", 32, int))


def recycle(explicit: bool | None = None) -> bool:
    """``CKPT_RECYCLE`` (default off): ``CheckpointManager(recycle=...)``."""
    return setting("CKPT_RECYCLE", False, parse_flag, explicit)


def node_dir(explicit: str | None = None) -> str:
    """``CKPT_NODE_DIR`` (default ``/dev/shm/ckpt-<uid>``): this node's memory-tier
    directory. Ranks that name one directory form one node; set it per torchrun agent to
    make agents of one machine separate nodes."""
    return setting("CKPT_NODE_DIR", f"/dev/shm/ckpt-{os.getuid()}", str, explicit)


def background_nice() -> int:
    """``CKPT_BACKGROUND_NICE`` (default 10, 0 turns it off): how much lower than the
    training loop's the scheduling priority of the memory tier's background threads (its
    file writes and crc32c, replication, drains) is, so that where cores are short the
    training loop keeps its core and the tier takes what is left (a tier step that finds
    the previous one unfinished is skipped, never waited for). Persistent saves keep the
    loop's priority: the next one waits for the previous one, so slowing its writes only
    moves the wait (measured: docs/bench/knobs.md). The copies that an optimizer step
    waits for are never lowered."""
    return min(19, max(0, setting("CKPT_BACKGROUND_NICE", 10, int)))


def lower_this_thread(nice: int | None = None) -> None:
    """Run the calling (background) thread ``nice`` (default :func:`background_nice`; 0:
    nothing) lower than the process's main thread; Linux schedules threads one by one
    (elsewhere: nothing). Idempotent: a thread started by a lowered one (which inherits
    its priority) is not lowered twice. Raising a nice value needs no privilege; a
    failure changes nothing."""
    n = background_nice() if nice is None else nice
    if not n or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return
    import threading

    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + n)  # the main thread's, + n
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except OSError:
        pass


def debug() -> bool:
    """``CKPT_DEBUG`` (default off): the ``ckpt`` command shows tracebacks."""
    return setting("CKPT_DEBUG", False, parse_flag)
