"""Run a function on N fresh processes that form a real gloo process group (CPU).

    results = launch(fn, 4, arg1, arg2, timeout=120)

``fn(*args)`` runs on every rank after ``torch.distributed.init_process_group("gloo")``
(rank and world size from ``torch.distributed``); ``results[r]`` is what rank r
returned (it must pickle). A rank that raises fails the launch with that rank's
traceback (:class:`RankFailed`); a launch that runs past ``timeout`` is killed after
every rank dumped the stacks of all its threads to stderr (:class:`TimeoutError`).

``fn`` must be importable by name (a module-level function of a test module): the
workers are spawned, not forked, so each starts from a clean interpreter (forking a
process that already runs tensorstore or torch threads is unsafe).

Many ranks on few cores: ``launch(fn, 32, ..., start_method="forkserver",
preload=("torch", "ckpt"))`` forks every rank from one fresh server process that imported
those modules once (about 3 s of CPU per rank saved); the server is started by the first
such launch, with that launch's ``preload``, and serves the later ones too.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import pickle
import shutil
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["launch", "RankFailed", "free_port"]


class RankFailed(AssertionError):
    """One or more ranks raised; the message holds each failing rank's traceback."""

    def __init__(self, failures: dict[int, str], exitcodes: dict[int, int | None]) -> None:
        self.failures = failures
        self.exitcodes = exitcodes
        parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())]
        quiet = {r: c for r, c in exitcodes.items() if r not in failures and c not in (0, None)}
        if quiet:
            parts.append(f"ranks that died without a traceback (exit codes): {quiet}")
        super().__init__("distributed test failed on rank(s) "
                         f"{sorted(set(failures) | set(quiet))}:\n" + "\n".join(parts))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "GLOO_SOCKET_IFNAME": "lo",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "PYTHONFAULTHANDLER": "1",
}


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...],
            out_dir: str, timeout: float) -> None:
    # Dump every thread's stack shortly before the parent gives up on us.
    faulthandler.dump_traceback_later(max(1.0, timeout - 3.0), exit=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=max(10.0, timeout)))
        result = fn(*args)
        with open(os.path.join(out_dir, f"{rank}.tmp"), "wb") as f:
            pickle.dump(result, f)
        os.replace(os.path.join(out_dir, f"{rank}.tmp"), os.path.join(out_dir, f"{rank}.pkl"))
        dist.barrier()  # nobody leaves while a peer may still talk to it
    except BaseException:
        code = 1
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    faulthandler.cancel_dump_traceback_later()
    # Leave without interpreter finalisation: a gloo worker thread that drops its last
    # reference to a finished collective (tensors owned by Python) while the interpreter
    # finalises is killed inside a noexcept destructor, and the process aborts
    # ("terminate called without an active exception") after all work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           start_method: str = "spawn", preload: tuple[str, ...] = ()) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks of one gloo group; their results."""
    import multiprocessing

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"start_method must be 'spawn' or 'forkserver' (never 'fork'), got {start_method!r}")
    if start_method == "forkserver" and preload:
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(preload))

    out_dir = tempfile.mkdtemp(prefix="ckpt-dist-")
    try:
        port = free_port()
        with _env(_CHILD_ENV):
            ctx = mp.start_processes(_worker, args=(world_size, port, fn, args, out_dir, timeout),
                                     nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        failed = False
        try:
            while True:
                try:
                    if ctx.join(timeout=0.5):
                        break
                except ProcessException:
                    failed = True  # start_processes has terminated the other ranks
                    break
                if time.monotonic() > deadline:
                    _kill(ctx)
                    errs = _read_errors(out_dir, world_size)
                    raise TimeoutError(
                        f"distributed test {fn.__qualname__} on {world_size} ranks did not finish within "
                        f"{timeout} s (each rank's stacks are on stderr)"
                        + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errs.items())))
        finally:
            _kill(ctx)
        errs = _read_errors(out_dir, world_size)
        codes = {r: p.exitcode for r, p in enumerate(ctx.processes)}
        if failed or errs or any(c != 0 for c in codes.values()):
            raise RankFailed(errs, codes)
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _read_errors(out_dir: str, world_size: int) -> dict[int, str]:
    errs = {}
    for r in range(world_size):
        p = os.path.join(out_dir, f"{r}.err")
        if os.path.exists(p):
            with open(p) as f:
                errs[r] = f.read()
    return errs


def _kill(ctx: Any) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + 5
    for p in ctx.processes:
        p.join(max(0.0, end - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1)
