"""``python -m bench.tier``: what the memory tier costs and gives, each against a baseline
of the same run.

* **Per-step cost**: the bench model (Linear stack + AdamW, fwd+bwd about 1.5x a memcpy
  of the state) trains ``steps`` steps without checkpoints, then with a tier snapshot
  every step, alternating (best of ``repeats``). Blocked per step = (loop with the tier -
  loop without) / steps: the call, the optimizer-hook waits and the slowdown of steps the
  snapshot overlaps. One process with one torch thread, so a core is free for the tier's
  background work. Goal: under 10% of the step (issue #34). Also the host passes over
  each tier byte (copies, crc32c reads apart from the copy), counted by the engine.
* **Replication**: two gloo ranks on loopback swap a bundle of tier files (the ring's
  pattern: each sends and receives at once) against the same bytes as one tensor with raw
  ``isend``/``irecv``; the first swap receives into new files, every later one into the
  previous one's files (the tier's steady state: a retired step's pages). Goal:
  replication GB/s (steady) >= 0.8x raw. Also against writing the same
  bytes as new files into the tier's file system, the receiver's floor (a new tmpfs page
  costs its first touch: on a VM whose memory was never touched, far more than a copy).
* **Drain**: the same loop through ``CheckpointManager`` with a tier step every step and a
  persistent checkpoint to the bench's disk every ``DRAIN_EVERY`` steps, the persistent
  checkpoints drained from the tier (the default) against staged again, alternating:
  loop time and the training loop's blocked time per persistent checkpoint.
* **Restore**: the same state restored from a tier step (``MemoryTier.restore``) and
  loaded from a persistent checkpoint on the bench's disk (page cache dropped, as after a
  node restart, and warm).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import ckpt
from bench._common import (
    MIB,
    Config,
    Progress,
    drop_page_cache,
    fmt,
    md_table,
    ratio,
    run_alone,
    standalone_parser,
)
from bench.train_loop import bench_model, build

STATE_GIB_CAP = 0.5  # the per-step scenario snapshots every step: keep it to a size a run affords
DRAIN_EVERY = 4


def _shm(tmp: Path) -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp
    return Path(tempfile.mkdtemp(prefix="ckpt-bench-tier-", dir=base))


def _loop(model: Any, opt: Any, x: torch.Tensor, steps: int, after: Any, first: int = 0) -> float:
    """``steps`` training steps numbered from ``first`` (a tier keeps its newest steps by
    number: numbers must grow from one loop to the next, as a job's do); ``after(step,
    state)`` (a tier's ``snapshot``, a manager's ``step``, or None) follows each."""
    t0 = time.perf_counter()
    for i in range(first, first + steps):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if after is not None:
            after(i, {"model": model, "optim": opt})
    return time.perf_counter() - t0


def per_step_cost(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    from ckpt.elastic import MemoryTier

    gib = min(cfg.state_gib, STATE_GIB_CAP)
    progress.step(f"tier per-step cost {gib:g} GiB: building the model")
    torch.set_num_threads(1)
    model, opt, shape, nbytes, _memcpy_s, batch, fb_s = bench_model(gib)
    x = torch.randn(batch, shape["d"])
    shm = _shm(tmp)
    tier = MemoryTier(os.fspath(tmp / "run"), ckpt.MemoryTierOptions(node_dir=os.fspath(shm)))
    try:
        _loop(model, opt, x, 3, tier.snapshot)  # warm-up: the tier's pool and plan
        tier.wait()
        base, with_tier = [], []
        taken = skipped = 0
        for rep in range(cfg.repeats):
            progress.step(f"tier per-step cost {gib:g} GiB: run {rep + 1}")
            gc.collect()
            base.append(_loop(model, opt, x, cfg.steps, None))
            t0, s0 = tier.stats.taken, tier.stats.skipped_busy
            b0 = (tier.stats.staged_bytes, tier.stats.rewritten_bytes, tier.stats.crc_reread_bytes)
            with_tier.append(_loop(model, opt, x, cfg.steps, tier.snapshot, first=3 + rep * cfg.steps))
            tier.wait()
            taken, skipped = tier.stats.taken - t0, tier.stats.skipped_busy - s0
            staged = tier.stats.staged_bytes - b0[0]
            rewritten, reread = tier.stats.rewritten_bytes - b0[1], tier.stats.crc_reread_bytes - b0[2]
        calls = tier.stats.call_s[-taken:] if taken else []
        iter_s = min(base) / cfg.steps
        blocked = (min(with_tier) - min(base)) / cfg.steps
        return {"state_bytes": nbytes, "steps": cfg.steps, "batch": batch, "fwd_bwd_s": fb_s, "iter_s": iter_s,
                "loop_base_s": base, "loop_tier_s": with_tier, "blocked_per_step_s": blocked,
                "blocked_over_step": blocked / iter_s, "taken": taken, "skipped_busy": skipped,
                "call_s_median": statistics.median(calls) if calls else None,
                "peak_held_bytes": tier.stats.peak_held_bytes,
                # host passes per tier byte (the last run): copies (the copy in, plus any write
                # again) and crc32c reads apart from the copy (the fused crc reads cache: not one)
                "copies_per_byte": (staged + rewritten) / staged if staged else None,
                "crc_rereads_per_byte": reread / staged if staged else None}
    finally:
        tier.close()
        shutil.rmtree(shm, ignore_errors=True)


def _mgr_loop(mgr: Any, model: Any, opt: Any, x: torch.Tensor, steps: int, first: int) -> tuple[float, list[Any]]:
    """The loop time (until every checkpoint is durable) and the persistent saves' handles."""
    handles: list[Any] = []

    def step(i: int, state: dict[str, Any]) -> None:
        h = mgr.step(i, state)
        if h is not None:
            handles.append(h)

    t0 = time.perf_counter()
    _loop(model, opt, x, steps, step, first)
    mgr.wait()
    mgr.tier.wait()
    return time.perf_counter() - t0, handles


def drain(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    import ckpt

    gib = min(cfg.state_gib, STATE_GIB_CAP)
    torch.set_num_threads(1)
    model, opt, shape, nbytes, _memcpy_s, batch, _fb_s = bench_model(gib)
    x = torch.randn(batch, shape["d"])
    steps = max(DRAIN_EVERY, cfg.steps - cfg.steps % DRAIN_EVERY)
    loops: dict[bool, list[float]] = {True: [], False: []}
    blocked: dict[bool, list[float]] = {True: [], False: []}
    persisted: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(cfg.repeats):
        for drained in (True, False):
            progress.step(f"tier drain {gib:g} GiB: run {rep + 1}, {'drained' if drained else 'staged'}")
            shm, run = _shm(tmp), tmp / f"drain-{drained}-{rep}"
            memory = ckpt.MemoryTierOptions(every=1, replicas=0, node_dir=os.fspath(shm), drain=drained)
            mgr = ckpt.CheckpointManager(run, save=DRAIN_EVERY, keep=1, memory=memory, save_on_close=False,
                                         preemption=ckpt.PreemptionOptions(signals=()))
            try:
                _mgr_loop(mgr, model, opt, x, DRAIN_EVERY, 0)  # warm-up: pools, plans, the first files
                gc.collect()
                b0, t0 = len(mgr.blocked_s), len(mgr.tier.stats.blocked_s)
                loop_s, handles = _mgr_loop(mgr, model, opt, x, steps, DRAIN_EVERY)
                loops[drained].append(loop_s)
                # the training loop's waits: every tier step's, plus the staged saves' own
                blocked[drained].append((sum(mgr.tier.stats.blocked_s[t0:]) + sum(mgr.blocked_s[b0:])) / steps)
                persisted[drained].append(statistics.mean(h.result().total_s for h in handles))
                assert not mgr.failures, mgr.failures
            finally:
                mgr.close()
                shutil.rmtree(shm, ignore_errors=True)
                shutil.rmtree(run, ignore_errors=True)
    return {"state_bytes": nbytes, "steps": steps, "every": DRAIN_EVERY,
            "loop_drained_s": min(loops[True]), "loop_staged_s": min(loops[False]),
            "loop_ratio": ratio(min(loops[True]), min(loops[False])),
            "blocked_per_step_drained_s": min(blocked[True]), "blocked_per_step_staged_s": min(blocked[False]),
            "to_durable_drained_s": min(persisted[True]), "to_durable_staged_s": min(persisted[False])}


def _repl_worker(rank: int, port: int, root: str, nbytes: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from ckpt.elastic._transfer import bundle_of, swap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    peer = 1 - rank
    mine = Path(root) / f"src{rank}"
    paths = sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file())
    t_swap, t_raw = [], []
    a, b = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    spare = None
    for rep in range(repeats):
        # as the tier does: the first step receives into new files, every later one into
        # the pages of the step it retired (the previous repeat's files)
        dst = Path(root) / f"dst{rank}-{rep}"
        dist.barrier()
        t0 = time.perf_counter()
        swap(dist.group.WORLD, bundle_of(mine, paths), peer, dst, peer, spare=spare)
        dist.barrier()
        t_swap.append(time.perf_counter() - t0)
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)
        spare = dst
        dist.barrier()
        t0 = time.perf_counter()
        works = [dist.isend(a, peer), dist.irecv(b, peer)]
        for w in works:
            w.wait()
        dist.barrier()
        t_raw.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({"swap_s": t_swap, "raw_s": t_raw}))
    dist.barrier()
    dist.destroy_process_group()


def replication(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nbytes = int(min(cfg.state_gib, STATE_GIB_CAP) * (1 << 30))
    progress.step(f"tier replication {nbytes / MIB:.0f} MiB each way: files vs raw gloo")
    root = _shm(tmp)
    try:
        n_files = 64
        piece = os.urandom(nbytes // n_files)
        t0 = time.perf_counter()
        for rank in range(2):  # files of the sizes a tier step holds: shards of up to 64 MiB
            d = root / f"src{rank}" / "arrays"
            d.mkdir(parents=True)
            for i in range(n_files):
                (d / f"c.{i}").write_bytes(piece)
        # The receiver's floor: new files in this file system (a new page costs its first
        # touch; on some VMs far more than a copy), the same bytes as the swap receives.
        write_gbps = len(piece) * n_files * 2 / (time.perf_counter() - t0) / 1e9
        out = root / "result.json"
        ctx = mp.start_processes(_repl_worker, args=(port, os.fspath(root), nbytes // n_files * n_files,
                                                     max(3, cfg.repeats + 1), os.fspath(out)),
                                 nprocs=2, start_method="spawn", join=True)
        del ctx
        r = json.loads(out.read_text())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    moved = nbytes // n_files * n_files * 2  # both directions
    swap_s, raw_s = min(r["swap_s"][1:]), min(r["raw_s"])
    return {"bytes_each_way": moved // 2, "files": n_files, "swap_s": swap_s, "raw_s": raw_s,
            "first_swap_s": r["swap_s"][0], "first_swap_gbps": moved / r["swap_s"][0] / 1e9,
            "swap_gbps": moved / swap_s / 1e9, "raw_gbps": moved / raw_s / 1e9, "over_raw": raw_s / swap_s,
            "new_file_write_gbps": write_gbps,
            "over_floor": moved / swap_s / 1e9 / min(write_gbps, moved / raw_s / 1e9)}


def restore(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    import ckpt
    from ckpt.elastic import MemoryTier

    gib = min(cfg.state_gib, STATE_GIB_CAP)
    progress.step(f"tier restore {gib:g} GiB: tier vs persistent")
    model, opt, _shape = build(gib)
    state = {"model": model, "optim": opt}
    shm = _shm(tmp)
    run = tmp / "restore-run"
    tier = MemoryTier(os.fspath(run), ckpt.MemoryTierOptions(node_dir=os.fspath(shm)))
    try:
        ckpt.save(state, run / "step-000000000", step=0)
        tier.snapshot(0, state)
        tier.wait()
        t_tier, t_cold, t_warm = [], [], []
        for _ in range(max(2, cfg.repeats)):
            t0 = time.perf_counter()
            got = tier.restore(state)
            t_tier.append(time.perf_counter() - t0)
            assert got is not None and got.step == 0
            cold = drop_page_cache(run)
            t0 = time.perf_counter()
            ckpt.load(state, run / "step-000000000")
            (t_cold if cold else t_warm).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpt.load(state, run / "step-000000000")
            t_warm.append(time.perf_counter() - t0)
    finally:
        tier.close()
        shutil.rmtree(shm, ignore_errors=True)
    return {"tier_s": min(t_tier), "persistent_cold_s": min(t_cold) if t_cold else None,
            "persistent_warm_s": min(t_warm)}


def steps(cfg: Config) -> int:
    return 1 + cfg.repeats + 2 + 2 * cfg.repeats


def run(cfg: Config, tmp: Path, progress: Progress) -> dict[str, Any]:
    r: dict[str, Any] = {"scenario": "tier"}
    r["step_cost"] = per_step_cost(cfg, tmp, progress)
    r["replication"] = replication(cfg, tmp, progress)
    r["drain"] = drain(cfg, tmp, progress)
    r["restore"] = restore(cfg, tmp, progress)
    r["markdown"] = render(r)
    return r


def render(r: dict[str, Any]) -> str:
    sc, rp, rs = r["step_cost"], r["replication"], r["restore"]
    rows = [["per-step cost: blocked / step", fmt(sc["blocked_over_step"], 3),
             f"{sc['blocked_per_step_s'] * 1e3:.1f} ms of a {sc['iter_s'] * 1e3:.0f} ms step, "
             f"{sc['state_bytes'] / MIB:.0f} MiB state; {sc['taken']} of {sc['steps']} steps taken "
             f"({sc['skipped_busy']} skipped: the previous one in flight); call median "
             f"{fmt(None if sc['call_s_median'] is None else sc['call_s_median'] * 1e3, 2)} ms; node peak "
             f"{sc['peak_held_bytes'] / MIB:.0f} MiB", "<= 0.10"],
            ["host passes per tier byte: copies + separate crc reads",
             fmt(None if sc.get("copies_per_byte") is None
                 else sc["copies_per_byte"] + sc["crc_rereads_per_byte"], 3),
             f"{fmt(sc.get('copies_per_byte'), 3)} copies (into the tier's files; a write again from a pool "
             f"would add 1) + {fmt(sc.get('crc_rereads_per_byte'), 3)} crc32c reads apart from the copy "
             "(the crc fused with the copy reads cache)", "<= 1 (+ the fused crc)"],
            ["replication / raw gloo", fmt(rp["over_raw"], 3),
             f"{rp['swap_gbps']:.2f} vs {rp['raw_gbps']:.2f} GB/s, {rp['bytes_each_way'] / MIB:.0f} MiB each way "
             f"in {rp['files']} files, 2 ranks on loopback, into a retired step's files (the first step, "
             f"into new files: {fmt(rp.get('first_swap_gbps'), 2)} GB/s)", ">= 0.8"],
            ["replication / min(raw gloo, new-file write)", fmt(rp.get("over_floor"), 3),
             f"writing the same bytes as new files into the tier's file system: "
             f"{fmt(rp.get('new_file_write_gbps'), 2)} GB/s (the receiver's floor)", ""],
            *_drain_rows(r.get("drain")),
            ["restore: persistent (cold) / tier", fmt(ratio(rs["persistent_cold_s"], rs["tier_s"]), 2),
             f"tier {rs['tier_s'] * 1e3:.0f} ms, persistent {fmt(rs['persistent_cold_s'], 3)} s cold, "
             f"{rs['persistent_warm_s'] * 1e3:.0f} ms warm (page cache)", ""]]
    return ("### Memory tier\n\nPer-step snapshots into node-local shared memory (one process, one torch "
            "thread, every step), replication between two ranks, and restore from the tier against a "
            "persistent checkpoint of the same state, all in this run.\n\n"
            + md_table(["what", "ratio", "figures", "goal"], rows, "lrll"))


def _drain_rows(d: dict[str, Any] | None) -> list[list[str]]:
    if not d:
        return []
    return [["persistent ckpt drained from the tier / staged: loop time", fmt(d["loop_ratio"], 3),
             f"{d['steps']} steps, tier every step, persistent every {d['every']}: "
             f"{d['loop_drained_s']:.2f} vs {d['loop_staged_s']:.2f} s; blocked per step (calls, hook waits) "
             f"{d['blocked_per_step_drained_s'] * 1e3:.1f} vs {d['blocked_per_step_staged_s'] * 1e3:.1f} ms; "
             f"persistent call to durable "
             f"{d['to_durable_drained_s']:.2f} vs {d['to_durable_staged_s']:.2f} s", "<= 1"]]


def main(argv: list[str] | None = None) -> int:
    p = standalone_parser("python -m bench.tier", __doc__.split("\n\n")[0], "small state, one repeat")
    return run_alone(run, steps, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
