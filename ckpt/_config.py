"""Configuration from the environment: every ``CKPT_*`` variable ckpt reads, declared once.

:data:`KNOBS` is the table: name, parser, default, one line of documentation and the
group it belongs to. :func:`read` is the only reader of ``CKPT_*`` variables: an explicit
argument beats the variable, which beats the default; a value the parser refuses raises
:class:`~ckpt.errors.ConfigError` naming the variable. :class:`~ckpt.SaveOptions` takes
its fields' defaults and ``CKPT_<FIELD>`` variables from here, and so do the S3 storage
and the switches below. ``docs/configuration.md`` is generated from the table
(:func:`markdown`; a test compares them) and ``ckpt config`` prints every knob's value in
effect and where it came from (:func:`effective`). This module imports nothing of ckpt
but its errors, so storage and engine modules alike may use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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


def _write_mode(text: str) -> str:
    t = text.strip().lower()
    if t == "buffered":
        return t
    return "direct" if parse_flag(t) else "off"


def default_pool_bytes() -> int:
    """1/8 of physical memory, between 256 MiB and 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        total = 16 << 30
    return int(min(4 << 30, max(256 << 20, total // 8)))


@dataclass(frozen=True)
class Knob:
    """One ``CKPT_*`` variable. ``default`` may be a callable (computed when read);
    ``shown`` is how the documentation writes the default."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str
    group: str
    shown: str = ""

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def default_text(self) -> str:
        return self.shown or repr(self.default_value())


_K = Knob
_SAVE = "Saving (SaveOptions fields; an explicit SaveOptions beats the variable)"
_IO = "Local storage and loading"
_TIER = "Memory tier and checkpoint manager"
_S3 = "S3 storage (explicit S3Storage arguments beat the variable)"
_CLI = "Command line"

KNOBS: dict[str, Knob] = {k.name: k for k in [
    _K("CKPT_POOL_BYTES", parse_bytes, default_pool_bytes, "ceiling of host staging memory (pinned on CUDA); "
       "the pool may be smaller than the largest tensor", _SAVE, "1/8 of RAM, 256 MiB to 4 GiB"),
    _K("CKPT_MAX_SHARD_BYTES", parse_bytes, 64 << 20, "largest storage object of an array (capped at a "
       "quarter of the pool)", _SAVE, "64 MiB"),
    _K("CKPT_CHUNK_BYTES", parse_bytes, 4 << 20, "inner chunk, the unit of a partial read", _SAVE, "4 MiB"),
    _K("CKPT_PACK_THRESHOLD", parse_bytes, 256 << 10, "tensors up to this size are packed together",
       _SAVE, "256 KiB"),
    _K("CKPT_PACK_BYTES", parse_bytes, 16 << 20, "size of a pack object", _SAVE, "16 MiB"),
    _K("CKPT_COPY_STREAMS", int, 2, "CUDA streams used for device-to-host copies", _SAVE),
    _K("CKPT_IF_BUSY", choice("wait", "skip", "error"), "wait", "a snapshot requested while the previous "
       "one still runs: wait for it, skip this one with a warning, or raise", _SAVE),
    _K("CKPT_CPU_STAGING", choice("background", "inline"), "background", "where a state of CPU tensors is "
       "copied into the pool: a stager thread, or in the save_async call (it returns with every copy done)",
       _SAVE),
    _K("CKPT_HUGE_PAGES", parse_flag, True, "back an unpinned pool with transparent huge pages "
       "(MADV_HUGEPAGE)", _SAVE),
    _K("CKPT_CHECK_SNAPSHOT", parse_flag, False, "debug: a crc32 of every tensor at the call and once "
       "staged; a mismatch (a write torch's version counter missed) fails the save", _SAVE),
    _K("CKPT_DIRECT_READS", parse_flag, True, "local loads read chunks with os.preadv instead of "
       "tensorstore", _IO),
    _K("CKPT_DIRECT_WRITES", _write_mode, "direct", "local array writes: direct (1: O_DIRECT where "
       "supported), buffered (through the page cache) or off (0: through tensorstore)", _IO),
    _K("CKPT_LOAD_ROLLBACK", parse_flag, True, "a failed ckpt.load puts back the old values of the "
       "tensors it loaded into (costs host memory equal to the bytes loaded)", _IO),
    _K("CKPT_IO_CONCURRENCY", int, 32, "tensorstore's file I/O threads", _IO),
    _K("CKPT_RECYCLE", parse_flag, False, "CheckpointManager(recycle=...): retention keeps one retired "
       "tree for the next save to overwrite in place (only for runs nobody reads while they train)", _TIER),
    _K("CKPT_NODE_DIR", str, lambda: f"/dev/shm/ckpt-{os.getuid()}", "this node's memory-tier directory; "
       "ranks that name one directory form one node", _TIER, "/dev/shm/ckpt-<uid>"),
    _K("CKPT_BACKGROUND_NICE", int, 10, "how much lower (nice, 0 to 19; 0: off) the memory tier's "
       "background threads run than the training loop", _TIER),
    _K("CKPT_S3_DEADLINE_S", float, 120.0, "the most time one storage operation may take, retries "
       "included", _S3),
    _K("CKPT_S3_MAX_ATTEMPTS", int, 5, "botocore's attempts per request", _S3),
    _K("CKPT_S3_RETRY_MODE", choice("standard", "adaptive", "legacy"), "standard", "botocore's retry mode",
       _S3),
    _K("CKPT_S3_RETRIES", int, None, "tensorstore's S3 retries (default: as many as fit in the deadline)",
       _S3, "from the deadline"),
    _K("CKPT_S3_CONCURRENCY", int, 32, "tensorstore's concurrent S3 requests", _S3),
    _K("CKPT_S3_MULTIPART_THRESHOLD", parse_bytes, 256 << 20, "objects from this size are uploaded in "
       "parts", _S3, "256 MiB"),
    _K("CKPT_S3_PART_BYTES", parse_bytes, 64 << 20, "size of a multipart upload's parts (5 MiB to 5 GiB)",
       _S3, "64 MiB"),
    _K("CKPT_S3_UPLOAD_CONCURRENCY", int, 8, "parts of one object uploaded at a time", _S3),
    _K("CKPT_DEBUG", parse_flag, False, "the ckpt command shows tracebacks", _CLI),
]}


def read(name: str, explicit: Any = None) -> Any:
    """The value of knob ``name``: ``explicit`` if given, else the variable, else the default."""
    k = KNOBS[name]
    return setting(name, k.default_value(), k.parse, explicit)


def effective() -> list[tuple[Knob, Any, str]]:
    """Every knob with its value in effect here and where it came from (``environment``
    or ``default``); a refused value raises ConfigError naming it."""
    out = []
    for k in KNOBS.values():
        raw = os.environ.get(k.name)
        source = "environment" if raw is not None and raw.strip() else "default"
        out.append((k, read(k.name), source))
    return out


def markdown() -> str:
    """docs/configuration.md, generated from the table."""
    lines = ["# Configuration", "",
             "<!-- generated from ckpt/_config.py (KNOBS) by `python -m ckpt config --markdown`; "
             "tests/test_config.py fails when they differ -->", "",
             "Every `CKPT_*` environment variable ckpt reads. An explicit argument beats the variable, "
             "which beats the default; a value ckpt cannot parse raises `ckpt.errors.ConfigError` naming "
             "the variable. `ckpt config` prints the value of each in effect and where it came from.", ""]
    groups: dict[str, list[Knob]] = {}
    for k in KNOBS.values():
        groups.setdefault(k.group, []).append(k)
    for group, knobs in groups.items():
        lines += [f"## {group}", "", "| variable | default | what it does |", "|---|---|---|"]
        lines += [f"| `{k.name}` | {k.default_text()} | {k.doc} |" for k in knobs]
        lines.append("")
    return "\n".join(lines)


def env_flag(name: str) -> bool:
    """A non-ckpt variable read as a flag the way its owner does (unset or unknown: off)."""
    return (os.environ.get(name) or "").strip().lower() in _TRUE


# -- the switches ----------------------------------------------------------------
def direct_reads() -> bool:
    return bool(read("CKPT_DIRECT_READS"))


def direct_writes() -> str:
    return str(read("CKPT_DIRECT_WRITES"))


def load_rollback() -> bool:
    return bool(read("CKPT_LOAD_ROLLBACK"))


def io_concurrency() -> int:
    return max(1, int(read("CKPT_IO_CONCURRENCY")))


def recycle(explicit: bool | None = None) -> bool:
    return bool(read("CKPT_RECYCLE", explicit))


def node_dir(explicit: str | None = None) -> str:
    return str(read("CKPT_NODE_DIR", explicit))


def background_nice() -> int:
    """How much lower the memory tier's background threads run (``CKPT_BACKGROUND_NICE``):
    where cores are short the training loop keeps its core and the tier takes what is left
    (a tier step that finds the previous one unfinished is skipped, never waited for).
    Persistent saves keep the loop's priority: the next one waits for the previous one, so
    slowing its writes only moves the wait (docs/bench/knobs.md). The copies an optimizer
    step waits for are never lowered."""
    return min(19, max(0, int(read("CKPT_BACKGROUND_NICE"))))


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
    return bool(read("CKPT_DEBUG"))
