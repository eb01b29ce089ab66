"""Crash consistency of a distributed save: three gloo ranks (forked from the forkserver
of tests.reliability, so a rank costs a fork, not an interpreter start) save step 1
(committed), then save step 2 (a few MiB in 256 KiB shards) and are SIGKILLed at seeded
random delays: one rank (the others then fail or hang in collectives and are killed
after a short timeout), or all three at once. After each kill: the listing shows only
committed checkpoints, the newest loads bit-exactly in this (single) process, a new
3-rank save of step 3 succeeds, and gc(grace=0) leaves no debris."""

from __future__ import annotations

import datetime
import os
import queue
import random
import sys
import time
from typing import Any

import pytest
import torch

import ckpt
from tests._helpers import Tally
from tests.dist._launch import free_port
from tests.reliability import committed_steps, ctx, debris

pytestmark = pytest.mark.slow

WORLD = 3
SEED = 20240611
TALLY = Tally("crash-dist")  # cases tried and passed, by family


def dist_state(step: int) -> dict[str, Any]:
    """Replicated on every rank (each rank writes a part); ~6 MiB, derived from step."""
    g = torch.Generator().manual_seed(5000 + step)
    st: dict[str, Any] = {f"w{i}": torch.randn(256 + 32 * i, 1024, generator=g) for i in range(5)}
    st["b"] = torch.randn(300, generator=g).to(torch.bfloat16)  # packed
    st["i"] = torch.randint(-(2**40), 2**40, (40,), generator=g)  # packed int64
    st["step"] = step
    return st


def blank_dist_state() -> dict[str, Any]:
    ref = dist_state(0)
    return {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1) for k, v in ref.items()}


def assert_dist_bit_exact(url: str, step: int, opts: dict[str, Any] | None = None) -> None:
    st = blank_dist_state()
    ckpt.load(st, url, storage_options=opts)
    want = dist_state(step)
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert st[k].dtype == v.dtype and torch.equal(st[k].view(torch.uint8), v.view(torch.uint8)), (url, k)
        else:
            assert st[k] == v, (url, k, st[k])


def rank_worker(run: str, step: int, started: Any, rank: int, port: int, result: Any,
                opts: dict[str, Any] | None = None) -> None:
    """One rank: join the gloo group, build the state, signal ``started``, save."""
    os.environ.update(GLOO_SOCKET_IFNAME="lo", TORCH_CPP_LOG_LEVEL="ERROR")
    import torch.distributed as dist

    torch.set_num_threads(1)
    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        state = dist_state(step)
        snap = ckpt.Snapshotter(ckpt.SaveOptions(pool_bytes=4 << 20, max_shard_bytes=256 << 10))
        dist.barrier()
        started.set()
        t0 = time.perf_counter()
        snap.save_async(state, f"{run}/step-{step:09d}", step=step, storage_options=opts).result()
        dt = time.perf_counter() - t0
        snap.close()
        dist.barrier()
        result.put(("ok", rank, dt))
        code = 0
    except BaseException as e:  # noqa: BLE001
        result.put(("error", rank, repr(e)))
    result.close()
    result.join_thread()  # flush the queue's feeder thread before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown with gloo alive (see tests/dist/_launch.py)


def run_ranks(run: str, step: int, kill: tuple[int, ...] = (), delay: float = 0.0,
              grace: float = 2.0, timeout: float = 40.0, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start 3 ranks saving ``step``. Without ``kill``: wait for all and require success.
    With ``kill``: SIGKILL those ranks ``delay`` s after every rank signalled started,
    then give the survivors ``grace`` s and SIGKILL whatever is left."""
    c = ctx()
    port = free_port()
    q = c.Queue()
    evs = [c.Event() for _ in range(WORLD)]
    procs = [c.Process(target=rank_worker, args=(run, step, evs[r], r, port, q, opts), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    out: dict[str, Any] = {"killed": [], "codes": None}
    try:
        for e in evs:
            assert e.wait(timeout), "a rank never started its save"
        t_start = time.perf_counter()
        if kill:
            for p in procs:  # wait until the delay, unless everybody finished earlier
                p.join(max(0.0, delay - (time.perf_counter() - t_start)))
            for r in kill:
                if procs[r].is_alive():
                    procs[r].kill()
                    out["killed"].append(r)
            end = time.perf_counter() + grace
            for p in procs:
                p.join(max(0.0, end - time.perf_counter()))
        else:
            for p in procs:
                p.join(max(0.0, timeout - (time.perf_counter() - t_start)))
        out["wall"] = time.perf_counter() - t_start
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    out["codes"] = [p.exitcode for p in procs]
    msgs: list[Any] = []
    try:  # every rank that got that far put a message; a killed one may have put none
        while len(msgs) < WORLD:
            msgs.append(q.get(timeout=0.2 if kill else 5))
    except queue.Empty:
        pass
    out["msgs"] = msgs
    if not kill:
        assert out["codes"] == [0] * WORLD, (out["codes"], msgs)
    return out


def _measure(base: str, opts: dict[str, Any] | None = None) -> float:
    """Duration of a 3-rank save (slowest rank, save call to commit), median of 3."""
    run = f"{base}/calib"
    times = []
    for step in (1, 2, 3):
        r = run_ranks(run, step, opts=opts)
        times.append(max(m[2] for m in r["msgs"] if m[0] == "ok"))
    assert_dist_bit_exact(f"{run}/step-000000003", 3, opts)
    return sorted(times)[1]


def _case(base: str, family: str, n: int, kill: tuple[int, ...], delay: float,
          opts: dict[str, Any] | None = None) -> tuple[Any, ...]:
    from ckpt import tools

    o = opts or {}
    run = f"{base}/{family}{n}"
    run_ranks(run, 1, opts=opts)
    r = run_ranks(run, 2, kill=kill, delay=delay, opts=opts)
    steps = committed_steps(run, **o)
    assert steps and set(steps) <= {1, 2}, steps
    newest = steps[0]
    assert_dist_bit_exact(f"{run}/step-{newest:09d}", newest, opts)
    if 1 in steps:
        assert_dist_bit_exact(f"{run}/step-000000001", 1, opts)
    run_ranks(run, 3, opts=opts)  # a fresh 3-rank save after the crash
    assert_dist_bit_exact(f"{run}/step-000000003", 3, opts)
    # object stores: ages come from the server's clock, so force (as gc_clean does) rather than trust grace=0
    tools.gc(run, grace=0, force=bool(opts), storage_options=opts)
    left = debris(run, **o)
    assert not left, left
    assert {newest, 3} <= set(committed_steps(run, **o))  # gc never removes a committed checkpoint
    assert_dist_bit_exact(f"{run}/step-000000003", 3, opts)
    TALLY.count(family)
    return round(delay, 3), kill, r["codes"], newest


def _kill_cases(base: str, cases: list[tuple[str, tuple[int, ...]]], seed: int,
                opts: dict[str, Any] | None = None, spread: float = 1.0) -> None:
    duration = _measure(base, opts)
    rng = random.Random(seed)
    outcomes = []
    for n, (family, kill) in enumerate(cases):
        delay = rng.uniform(0, duration * spread * (1.1 if len(kill) == 1 else 1.0))
        try:
            outcomes.append((family, *_case(base, family, n, kill, delay, opts)))
        except BaseException:
            TALLY.tried(family)
            raise
    mid = sum(o[4] == 1 for o in outcomes)  # step 2 never committed: the kill landed mid-save
    print(f"\n[reliability] 3-rank save duration {duration:.3f}s; {mid} of {len(outcomes)} kills landed "
          f"before the commit; (family, delay, victims, exit codes, newest committed): {outcomes}")
    assert mid, "no kill landed during a save"


def test_kill_ranks_during_dist_save(tmp_path):
    # 4 cases killing one rank (victim rotates), 2 killing all three
    cases = [("kill-one-rank", (v,)) for v in (0, 1, 2, 1)] + [("kill-all-ranks", (0, 1, 2))] * 2
    _kill_cases(str(tmp_path), cases, SEED)


@pytest.mark.s3
def test_kill_ranks_during_dist_save_s3(s3_url, s3_options):
    """The same on S3: no atomic rename there, the manifest written last is the commit."""
    cases = [("s3-kill-one-rank", (v,)) for v in (0, 2, 1)] + [("s3-kill-all-ranks", (0, 1, 2))]
    _kill_cases(s3_url, cases, SEED + 1, s3_options, spread=0.7)  # a rank's own clock ends before the commit
