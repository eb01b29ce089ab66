"""Reliability and security tests (crash consistency, corruption, resource faults,
concurrency, hostile input). Shared helpers live here so the forked worker processes
can import them by name.

Child processes come from a ``forkserver`` that has already imported torch, tensorstore
and ckpt: a crash case then costs a fork, not a 3 s interpreter start-up. Workers are
killed with SIGKILL (no cleanup, no atexit, no finally), the way a preempted node or the
OOM killer ends a process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt import PreemptionOptions
from ckpt._engine._catalog import list_run
from ckpt.storage import open_storage
from tests._helpers import same_bits

ROWS = 1024  # "w" is ROWS x 1024 float32 = 4 MiB per checkpoint (several shards)
OPTS = {"CKPT_MAX_SHARD_BYTES": str(1 << 20), "CKPT_CHUNK_BYTES": str(256 << 10)}

_CTX: Any = None


def ctx() -> Any:
    """The forkserver context (created once per test session)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "tensorstore", "ckpt", "ckpt.tools", "tests.reliability"])
    return _CTX


def make_state(step: int, rows: int = ROWS) -> dict[str, Any]:
    """The state saved at ``step``: every value derived from the step, so any later
    load can be compared bit for bit."""
    g = torch.Generator().manual_seed(1000 + step)
    return {
        "w": torch.randn(rows, 1024, generator=g),  # array layout, several shards
        "b": torch.randn(64, generator=g).to(torch.bfloat16),  # packed
        "i": torch.randint(-(2**40), 2**40, (16,), generator=g),  # packed int64
        "step": step,  # plain JSON value
    }


def blank_state(rows: int = ROWS) -> dict[str, Any]:
    return {"w": torch.zeros(rows, 1024), "b": torch.zeros(64, dtype=torch.bfloat16),
            "i": torch.zeros(16, dtype=torch.int64), "step": -1}


def assert_bit_exact(url: str, step: int, rows: int = ROWS, **kw: Any) -> None:
    """Load ``url`` and compare every value with what was saved at ``step``."""
    st = blank_state(rows)
    ckpt.load(st, url, **kw)
    want = make_state(step, rows)
    for k in ("w", "b", "i"):
        a, b = st[k], want[k]
        assert same_bits(a, b), (url, k)
    assert st["step"] == step, (url, st["step"], step)


def committed_steps(run: str, **opts: Any) -> list[int]:
    return [i.step for i in ckpt.list_checkpoints(run, storage_options=opts or None)]


def debris(run: str, **opts: Any) -> list[str]:
    """Everything in the run that is not a committed checkpoint."""
    storage = open_storage(run, **opts)
    out = [i.name for i in list_run(storage, include_incomplete=True) if not i.committed]
    if storage.capabilities.local:
        root = storage.local_path()
        if os.path.isdir(root):
            committed = {i.name for i in list_run(storage)}
            out += [n for n in os.listdir(root) if n not in committed and n not in out]
    return sorted(out)


def check_after_crash(run: str, allowed: set[int], **opts: Any) -> int:
    """The checks every crash case ends with; returns the newest committed step."""
    steps = committed_steps(run, **opts)
    assert set(steps) <= allowed, (steps, allowed)
    assert steps, "the last committed checkpoint was lost"
    kw = {"storage_options": opts} if opts else {}
    assert_bit_exact(f"{run}/step-{steps[0]:09d}", steps[0], **kw)
    return steps[0]


def gc_clean(run: str, **opts: Any) -> None:
    from ckpt import tools

    tools.gc(run, grace=0, force=not open_storage(run, **opts).capabilities.local,
             storage_options=opts or None)
    left = debris(run, **opts)
    assert not left, left


# -- worker processes ------------------------------------------------------------
def _setup_child(env: dict[str, str] | None) -> None:
    os.environ.update(OPTS)
    if env:
        os.environ.update(env)
    torch.set_num_threads(1)


def save_worker(run: str, step: int, started: Any, env: dict[str, str] | None = None,
                opts: dict[str, Any] | None = None, overwrite: bool = False, result: Any = None,
                name: str | None = None) -> None:
    """Save make_state(step) to run/step-N (or run/``name``); sets ``started`` right
    before the save."""
    _setup_child(env)
    state = make_state(step)
    started.set()
    t0 = time.perf_counter()
    try:
        ckpt.save(state, f"{run}/{name or f'step-{step:09d}'}", step=step, overwrite=overwrite,
                  storage_options=opts)
    except Exception as e:  # noqa: BLE001 - reported to the parent, typed or not
        if result is not None:
            result.put(("error", type(e).__name__, str(e)))
        return
    if result is not None:
        result.put(("ok", time.perf_counter() - t0, ""))


class _Gate:
    """``started`` for save_worker that, once set, waits for ``go``: the savers of a race
    build their states first, then start their saves together."""

    def __init__(self, started: Any, go: Any) -> None:
        self.started, self.go = started, go

    def set(self) -> None:
        self.started.set()
        self.go.wait(60)


def _gated_save(run: str, step: int, name: str | None, opts: dict[str, Any] | None,
                go: Any, started: Any, q: Any) -> None:
    save_worker(run, step, _Gate(started, go), None, opts, False, q, name=name)


def race_savers(run: str, steps: list[int], *, name: str | None = None,
                opts: dict[str, Any] | None = None) -> list[tuple[str, Any, str]]:
    """Save make_state(s) for each of ``steps`` in processes of their own, released
    together (to run/step-N, or all to run/``name``); their results, sorted:
    ``("ok", seconds, "")`` or ``("error", type name, message)``."""
    c = ctx()
    go, q = c.Event(), c.Queue()
    procs = []
    for s in steps:
        started = c.Event()
        p = c.Process(target=_gated_save, args=(run, s, name, opts, go, started, q), daemon=True)
        p.start()
        procs.append((p, started))
    for _p, started in procs:
        assert started.wait(60)
    go.set()
    for p, _ in procs:
        p.join(120)
        assert p.exitcode == 0
    return sorted(q.get(timeout=10) for _ in steps)


def inject_kill(at: int, *, direct_writes: bool = False) -> None:
    """SIGKILL this process right before its ``at``-th file-system mutation (storage
    writes, renames, deletes and every unlink/rmdir inside a recursive delete; with
    ``direct_writes`` also every object ckpt's direct writer writes itself)."""
    from ckpt._engine._direct_write import DirectWriter
    from ckpt.storage._file import FileStorage

    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn: Any) -> Any:
        def inner(*a: Any, **k: Any) -> Any:
            tick()
            return fn(*a, **k)
        return inner

    for name in ("write_bytes", "rename_dir", "delete"):
        setattr(FileStorage, name, wrap(getattr(FileStorage, name)))
    if direct_writes:
        DirectWriter._write_file = wrap(DirectWriter._write_file)  # type: ignore[method-assign]
    os.unlink = wrap(os.unlink)  # type: ignore[assignment]
    os.rmdir = wrap(os.rmdir)  # type: ignore[assignment]
    os.replace = wrap(os.replace)  # type: ignore[assignment]


def retention_worker(run: str, keep_last: int, started: Any, kill_at: int = 0) -> None:
    _setup_child(None)
    if kill_at:
        inject_kill(kill_at)
    mgr = ckpt.CheckpointManager(run, keep=keep_last, preemption=PreemptionOptions(signals=()), save_on_close=False)
    started.set()
    mgr.apply_retention()


def recycled_save_worker(run: str, kill_at: int, started: Any) -> None:
    """``CheckpointManager(keep=1, recycle=True)`` saves step 3 into ``run``'s recycle slot (then
    retires step 2), SIGKILLed right before its ``kill_at``-th file-system mutation."""
    _setup_child(None)
    inject_kill(kill_at, direct_writes=True)
    mgr = ckpt.CheckpointManager(run, keep=1, preemption=PreemptionOptions(signals=()), save_on_close=False,
                                 recycle=True)
    started.set()
    mgr.save(3, make_state(3)).result()
    mgr.wait()
    mgr.snapshotter.close()


def gc_worker(run: str, keep_last: int | None, started: Any, kill_at: int = 0) -> None:
    _setup_child(None)
    if kill_at:
        inject_kill(kill_at)
    from ckpt import tools

    started.set()
    tools.gc(run, keep_last=keep_last, grace=0)


def save_kill_worker(run: str, step: int, started: Any, kill_at: int, overwrite: bool = False) -> None:
    """A save that SIGKILLs itself right before its ``kill_at``-th file-system mutation
    of the commit phase (tensorstore's writes go around FileStorage)."""
    _setup_child(None)
    inject_kill(kill_at)
    state = make_state(step)
    started.set()
    ckpt.save(state, f"{run}/step-{step:09d}", step=step, overwrite=overwrite)


def run_child(target: Any, *args: Any, kill_after: float | None = None, timeout: float = 60.0) -> tuple[int, bool]:
    """Start ``target(*args, started)`` in a forked child; SIGKILL it ``kill_after``
    seconds after it signalled ``started``. Returns (exitcode, killed_by_us)."""
    c = ctx()
    started = c.Event()
    p = c.Process(target=target, args=(*args[:2], started, *args[2:]), daemon=True)
    p.start()
    killed = False
    try:
        if not started.wait(timeout):
            raise AssertionError(f"child {target.__name__} never started")
        if kill_after is not None:
            p.join(kill_after)
            if p.is_alive():
                p.kill()
                killed = True
        p.join(timeout)
        assert not p.is_alive(), f"child {target.__name__} hung"
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    return p.exitcode, killed


def save_many_worker(run: str, first: int, started: Any, last: int) -> None:
    """Save steps first..last one after the other (each committed before the next)."""
    _setup_child(None)
    started.set()
    for s in range(first, last + 1):
        ckpt.save(make_state(s), f"{run}/step-{s:09d}", step=s)


def sign_manifest(body: dict[str, Any]) -> bytes:
    """A (tampered) manifest body with its checksum recomputed, so it passes the checksum
    and reaches the validators and readers behind it."""
    from ckpt._format import _canonical

    body = {k: v for k, v in body.items() if k != "checksum"}
    body["checksum"] = "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()
    return json.dumps(body).encode()


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (a volume that fills up); the test is
    skipped where mounting is not allowed."""
    import pytest

    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
