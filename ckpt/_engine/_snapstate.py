"""What the threads of one snapshot share: the stager, the inline copy threads and the
writer get a :class:`SnapshotState` (cancel flag, staged event, copy events, pool,
stats), never the whole :class:`~ckpt._engine._save.SnapshotJob`. :class:`Completion` is
the future part of a job (the engine's and a drained checkpoint's)."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckpt._engine._direct_write import DirectWriter
from ckpt._engine._mapped import MappedFiles
from ckpt._engine._pool import HostPool
from ckpt.storage import Storage


@dataclass
class SaveStats:
    """Figures of one snapshot (seconds and bytes, this rank)."""

    bytes: int = 0  # bytes this rank wrote (tensor data)
    total_bytes: int = 0  # bytes of the whole checkpoint (all ranks), known once committed
    plan_s: float = 0.0  # planning the save (agreement with the other ranks included)
    plan_reused: bool = False  # the plan of the previous save was reused (same structure)
    blocked_s: float = 0.0  # time the training loop waited: the call + optimizer-hook waits
    call_s: float = 0.0
    hook_wait_s: float = 0.0
    copied_s: float = 0.0  # call -> every copy into the pool done (CUDA: issued); what the hook waits for
    staging_s: float = 0.0  # from the call until every write was issued
    write_s: float = 0.0  # until every write is durable
    commit_s: float = 0.0
    total_s: float = 0.0  # from the call to committed
    pool_wait_s: float = 0.0
    pool_peak_bytes: int = 0
    objects: int = 0
    inline: bool = False  # the copy ran in the call (SaveOptions.cpu_staging)
    # host passes over memory beyond the one copy (direct writes): bytes written again
    # after the copy (pwrite from the pool), bytes checksummed in a read of their own
    rewritten_bytes: int = 0
    crc_reread_bytes: int = 0

    @property
    def throughput_gbps(self) -> float:
        """Persisted GB/s of this rank: bytes / (time from the call to durable)."""
        t = self.staging_s + self.write_s if self.write_s else self.total_s
        return self.bytes / t / 1e9 if t > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["throughput_gbps"] = self.throughput_gbps
        return d


@dataclass
class SnapshotState:
    """The part of one snapshot its background threads read and write.

    ``cancel``: set by whichever thread fails first; the others stop at their next unit
    and pool waits give up. ``staged``: every unit has been handed to the copy engines
    (set once, also on failure). ``copy_events``: (device, CUDA event) of every copy
    issued, which the training stream waits on. ``direct``: the direct local writer
    (None where writes go through tensorstore); ``mapped``: direct units are staged into
    their files' own pages (:mod:`._mapped`). ``inline``: CPU units are copied in the
    call, on several threads (``SaveOptions.cpu_staging``)."""

    storage: Storage
    url: str  # the checkpoint, for messages
    pool: HostPool
    t_call: float  # perf_counter() of the save call
    streams: dict[Any, list[Any]]  # CUDA device -> copy streams
    ready_events: dict[Any, Any]  # CUDA device -> event recorded on the producing stream
    versions: dict[tuple[str, Any], int]  # (key, box) -> the source's _version at the call
    inline: bool = False
    stats: SaveStats = field(default_factory=SaveStats)
    cancel: threading.Event = field(default_factory=threading.Event)
    staged: threading.Event = field(default_factory=threading.Event)
    copy_events: list[tuple[Any, Any]] = field(default_factory=list)
    direct: DirectWriter | None = None
    mapped: MappedFiles | None = None  # direct units staged into their files' own pages (the tier)
    nice: int = 0  # how much lower the background threads run (the memory tier's saves)
    # SaveOptions.check_snapshot: (key, box) -> (source tensor, its digest at the call)
    digests: dict[tuple[str, Any], tuple[Any, int]] = field(default_factory=dict)
    digest_left: dict[tuple[str, Any], int] = field(default_factory=dict)  # per source: units not yet copied


_IN_FLIGHT: set[Completion] = set()  # begun, not complete (strong references: the work must finish)
_IN_FLIGHT_LOCK = threading.Lock()
_HOOKED = False


def _hook_exit() -> None:
    """Run :func:`wait_at_exit` when the interpreter exits, before ``concurrent.futures``
    stops taking work (its exit hook is one of threading's, run before non-daemon threads
    are joined; a plain ``atexit`` hook would run after it, when a save's thread pools
    refuse new writes). Falls back to ``atexit`` where threading has no such hook."""
    global _HOOKED
    with _IN_FLIGHT_LOCK:
        if _HOOKED:
            return
        _HOOKED = True
    import concurrent.futures.thread  # noqa: F401 - its exit hook first registered, so ours runs before it

    try:
        threading._register_atexit(wait_at_exit)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # another Python; or exit has begun already
        import atexit

        atexit.register(wait_at_exit)


def wait_at_exit() -> None:
    """Block until every save in flight has committed or failed, saying so on stderr (a
    daemon thread would otherwise be killed mid-write at exit: nothing written, or an
    abort); a failure nobody retrieved is printed."""
    import sys

    with _IN_FLIGHT_LOCK:
        jobs = [j for j in _IN_FLIGHT if not j.done()]
    if not jobs:
        return
    urls = ", ".join(str(getattr(j, "url", "?")) for j in jobs)
    print(f"ckpt: waiting for {len(jobs)} checkpoint save(s) in flight before exiting: {urls}",
          file=sys.stderr, flush=True)
    for j in jobs:
        j.wait()
        if j.error is not None and not j.error_retrieved:
            print(f"ckpt: checkpoint {getattr(j, 'url', '?')} failed: {j.error!r}", file=sys.stderr, flush=True)


class Completion:
    """Done once, with an error or none; callbacks run once done, on the finishing thread
    (or at once when added later). ``error_retrieved``: a caller has seen the outcome."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.error_retrieved = False
        self._callbacks: list[Callable[[Any], None]] = []
        self._cb_lock = threading.Lock()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def begin(self) -> None:
        """The work has started: until it completes, interpreter exit waits for it
        (:func:`wait_at_exit`), so a script that ends right after ``save_async`` still
        gets its checkpoint."""
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.add(self)
        _hook_exit()

    def _complete(self, error: BaseException | None) -> None:
        """Finish (once: a second call changes nothing) and run the callbacks."""
        with self._cb_lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(self)
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # pragma: no cover - user callback
                traceback.print_exc()
