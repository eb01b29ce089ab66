"""`make demo`: an elastic training job that loses a node and carries on.

1. Three torchrun agents (one worker each, CPU/gloo) train examples/train_gpt.py with
   asynchronous checkpoints to local disk.
2. Mid-run, one agent is killed (SIGKILL, agent and worker). The two survivors
   re-rendezvous, torchrun restarts their workers at world size 2, the workers restore
   the last committed checkpoint (resharded onto 2 ranks) and finish the run.
3. A reference run makes the same world-size change at the same step without a crash
   (3 ranks up to that checkpoint, then 2 ranks from it).
4. The report: steps, checkpoints, blocked time per checkpoint, time from the kill to
   the first step after resume (MTTR), restore time against torch.distributed.checkpoint,
   and the checks: every sample consumed exactly once; final parameters bit-equal to
   the reference run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ckpt  # noqa: E402

TRAIN = str(ROOT / "examples" / "train_gpt.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("TORCHELASTIC_ERROR_FILE", None)
    # torchrun's agents share one TCPStore with their workers across rendezvous rounds by
    # default; after a node dies, the next round's gloo init can read the dead worker's
    # address left in it and fail ("connectFullMesh ... Connection refused"). A fresh
    # store per round avoids that.
    e["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return e


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL an agent and its workers at once, as when a node dies."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def read_logs(log_dir: Path) -> list[dict]:
    recs = []
    for f in sorted(log_dir.glob("rank*.jsonl")):
        # the text after the last newline is a record still being written: not one yet
        for line in f.read_text().split("\n")[:-1]:
            if line.strip():
                recs.append(json.loads(line))
    return sorted(recs, key=lambda r: r["t"])


def agent_cmd(port: int, run: Path, args: argparse.Namespace, nnodes: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=ckpt-demo",
            "--rdzv-conf=last_call_timeout=3,join_timeout=120,close_timeout=10,keep_alive_interval=1,keep_alive_max_attempt=3",
            "--max-restarts=5", "--monitor-interval=0.2",
            TRAIN, "--run-dir", str(run), "--steps", str(args.steps), "--every", str(args.every),
            "--step-sleep", str(args.step_sleep), "--batch", str(args.batch),
            "--memory-every", str(getattr(args, "memory_every", 0)), "--time-persistent-restore"]


def node_dirs(out: Path) -> list[Path]:
    """One memory-tier directory per agent (CKPT_NODE_DIR): three "nodes" on one machine."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else out
    return [base / f"ckpt-demo-{os.getuid()}-{os.getpid()}" / f"node{i}" for i in range(3)]


def elastic_run(out: Path, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
    run = out / "run"
    port = free_port()
    logs = []
    agents = []
    nodes = node_dirs(out)
    for i in range(3):
        log = open(out / f"agent{i}.log", "w")
        logs.append(log)
        agents.append(subprocess.Popen(agent_cmd(port, run, args, "2:3"), stdout=log, stderr=subprocess.STDOUT,
                                       env={**env(), "CKPT_NODE_DIR": str(nodes[i])}, start_new_session=True,
                                       cwd=ROOT))
        if i == 0:
            time.sleep(1.0)  # the first agent hosts the rendezvous store; it must stay up
    print(f"[demo] 3 torchrun agents started (rendezvous 127.0.0.1:{port}); training...", flush=True)
    kill_t, kill_step = None, None
    deadline = time.time() + args.timeout
    while time.time() < deadline:
        time.sleep(0.2)
        recs = read_logs(run / "log") if (run / "log").exists() else []
        steps3 = [r for r in recs if r.get("event") == "step" and r["world"] == 3]
        if kill_t is None and steps3 and max(r["step"] for r in steps3) >= args.kill_at:
            victim = agents[2]
            kill_tree(victim.pid)
            kill_t = time.time()
            shutil.rmtree(nodes[2], ignore_errors=True)  # the node is gone, and its memory with it
            kill_step = max(r["step"] for r in steps3)
            print(f"[demo] killed agent 2 (pid {victim.pid}) and its worker at step {kill_step}; its node's memory "
                  "is gone", flush=True)
        if kill_t is not None and all(a.poll() is not None for a in agents[:2]):
            break
        if kill_t is None and all(a.poll() is not None for a in agents):
            break  # the job ended (or failed) before the kill point
    for a in agents:
        kill_tree(a.pid)
    for log in logs:
        log.close()
    shutil.rmtree(nodes[0].parent, ignore_errors=True)
    codes = [a.wait() for a in agents[:2]]
    if kill_t is None:
        tail = (out / "agent0.log").read_text()[-3000:]
        raise SystemExit(f"[demo] the job ended before the kill point (raise --steps?)\n{tail}")
    if any(codes):
        tail = (out / "agent0.log").read_text()[-3000:]
        raise SystemExit(f"[demo] surviving agents exited with {codes}\n{tail}")
    return kill_t, {"kill_step": kill_step}


def reference_run(out: Path, args: argparse.Namespace, resize_step: int) -> Path:
    """3 ranks up to the checkpoint the elastic run resumed from, then 2 ranks from it."""
    run = out / "ref"
    for nproc, extra in ((3, ["--stop-at", str(resize_step)]), (2, [])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               TRAIN, "--run-dir", str(run), "--steps", str(args.steps), "--every", str(args.every),
               "--batch", str(args.batch), *extra]
        r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"[demo] reference run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return run


def restore_vs_dcp(run: Path) -> tuple[float, float]:
    """Time ckpt.load and dcp.load of the same state (single process, same model)."""
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, str(ROOT / "examples"))
    from train_gpt import GPT

    latest = ckpt.latest(run)
    assert latest is not None
    model = GPT()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    state = {"model": model, "optim": optim}
    ckpt.load(state, latest.url, strict=False)
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-demo-dcp-"))
    try:
        sd = {"model": model.state_dict(), "optim": optim.state_dict()}
        dcp.save(sd, checkpoint_id=str(tmp / "dcp"))
        t_ck, t_dcp = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            ckpt.load(state, latest.url, strict=False)
            t_ck.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            dcp.load(sd, checkpoint_id=str(tmp / "dcp"))
            t_dcp.append(time.perf_counter() - t0)
        return min(t_ck), min(t_dcp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "demo-out"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--kill-at", type=int, default=22)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--step-sleep", type=float, default=0.05)
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--memory-every", type=int, default=1, help="memory-tier snapshot every N steps (0: off)")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t_start = time.time()

    kill_t, info = elastic_run(out, args)
    kill_step = info["kill_step"]
    recs = read_logs(out / "run" / "log")
    starts = [r for r in recs if r["event"] == "start"]
    resumed = [r for r in starts if r["t"] > kill_t]
    resume_from = max((r["restored_from"] for r in resumed if r["restored_from"] is not None), default=None)
    first_after = min((r["t"] for r in recs if r["event"] == "step" and r["t"] > kill_t and r["world"] == 2),
                      default=None)
    # exactly once: the last attempt of each step is what training kept
    last_attempt: dict[tuple[int, int], list[int]] = {}
    world_at: dict[int, int] = {}
    for r in recs:
        if r["event"] == "step":
            if world_at.get(r["step"]) != r["world"]:
                for k in [k for k in last_attempt if k[0] == r["step"]]:
                    del last_attempt[k]
                world_at[r["step"]] = r["world"]
            last_attempt[(r["step"], r["rank"])] = r["ids"]
    ids = [i for k in sorted(last_attempt) for i in last_attempt[k]]
    steps_done = len(world_at)
    exactly_once = len(ids) == len(set(ids)) and len(ids) == sum(
        min(args.batch * world_at[s], 10**9) for s in world_at)
    blocked = [b for r in recs if r["event"] == "checkpoints" for b in r["blocked_s"]]
    step_times = [r["step_s"] for r in recs if r["event"] == "step"]
    committed = ckpt.list_checkpoints(out / "run")

    print(f"[demo] elastic run done; reference run (3 ranks to step {resume_from}, then 2)...", flush=True)
    ref = reference_run(out, args, resume_from if resume_from is not None else 0)
    a = torch.load(out / "run" / "log" / "final.pt")
    b = torch.load(ref / "log" / "final.pt")
    bit_equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    t_ck, t_dcp = restore_vs_dcp(out / "run")

    restore_s = [r["restore_s"] for r in resumed]
    ok = exactly_once and bit_equal and resume_from is not None
    print()
    print("ckpt demo report")
    print("================")
    print(f"job                      GPT ({sum(v.numel() for v in a.values()) / 1e6:.2f} M params) + AdamW, "
          f"3 -> 2 ranks (torchrun elastic, gloo/CPU)")
    print(f"steps done               {steps_done} (killed one of 3 agents at step ~{args.kill_at})")
    print(f"checkpoints committed    {len(committed)} kept on disk (every {args.every} steps, keep last 3): "
          f"{', '.join(c.name for c in committed)}")
    tier_stats = [r["tier"] for r in recs if r["event"] == "checkpoints" and r.get("tier")]
    drained = sum(t["drained"] for t in tier_stats)
    step_med = sorted(step_times)[len(step_times) // 2] * 1e3
    if blocked:  # the persistent checkpoints that staged the state themselves
        print(f"blocked time / ckpt      median {sorted(blocked)[len(blocked) // 2] * 1e3:.2f} ms, "
              f"max {max(blocked) * 1e3:.2f} ms (step time median {step_med:.1f} ms)")
    tier_blocked = sorted(b for t in tier_stats for b in t["blocked_s"])
    if tier_blocked:
        print(f"blocked / tier step      median {tier_blocked[len(tier_blocked) // 2] * 1e3:.2f} ms, "
              f"max {tier_blocked[-1] * 1e3:.2f} ms (step time median {step_med:.1f} ms); {drained} "
              f"persistent checkpoint(s) over the ranks drained from the tier (staged once, not twice)")
    sources = sorted({r.get("source") for r in resumed if r.get("source")})
    print(f"resumed from             step {resume_from} on world size 2, from {' and '.join(sources) or '-'}")
    persistent_steps = [r["persistent_step"] for r in resumed if r.get("persistent_step") is not None]
    if kill_step is not None and resume_from is not None:
        lost_p = kill_step - max(persistent_steps) if persistent_steps else None
        print(f"steps lost               {kill_step - resume_from} (last step done {kill_step}, resumed after "
              f"{resume_from}); from the newest persistent checkpoint it would be "
              f"{'-' if lost_p is None else lost_p}")
    tiers = [r["tier"] for r in resumed if r.get("tier")]
    if tiers:
        mib = 1 << 20
        own, rep, peer = (sum(t[k] for t in tiers) / mib for k in ("own_bytes", "replica_bytes", "peer_bytes"))
        print(f"bytes restored from      own memory {own:.2f} MiB, replicas held in memory {rep:.2f} MiB, "
              f"peers over gloo {peer:.2f} MiB, persistent storage 0 MiB (each node's whole copy)")
    if restore_s:
        probes = [r for r in recs if r["event"] == "restore_probe" and r["t"] > kill_t]
        print(f"restore (ckpt.restore)   {max(restore_s):.3f} s on the slowest rank (agreement, transfers, load)")
        if probes:
            pers, tier = max(p["persistent_s"] for p in probes), max(p["tier_s"] for p in probes)
            print(f"load, tier vs persistent ckpt.load of the tier step {tier * 1e3:.1f} ms, of the persistent step "
                  f"{probes[0]['step']} {pers * 1e3:.1f} ms (same state, same run, both warm; {pers / tier:.2f}x)")
    if first_after is not None and resumed:
        born = min(r["proc_start"] for r in resumed if r.get("proc_start"))
        init = max(r["init_t"] for r in resumed if r.get("init_t"))
        mgr_t = max(r["mgr_t"] for r in resumed if r.get("mgr_t"))
        started = max(r["t"] for r in resumed)
        probe_s = max((p["persistent_s"] + p["tier_s"] for p in recs if p["event"] == "restore_probe"
                       and p["t"] > kill_t), default=0.0)
        print(f"MTTR (kill -> 1st step)  {first_after - kill_t:.2f} s = detection + rendezvous + restart "
              f"{born - kill_t:.2f} s, process start + group init {init - born:.2f} s, model + "
              f"CheckpointManager setup {mgr_t - init:.2f} s, restore {started - mgr_t:.2f} s, first step "
              f"{first_after - started - probe_s:.2f} s (without the comparison loads)")
    if tier_stats:
        calls = sorted(c for t in tier_stats for c in t["call_s"])
        mib = 1 << 20
        rep_b = sum(t["replicated_bytes"] for t in tier_stats)
        rep_s = sum(t["replicate_s"] for t in tier_stats)
        print(f"memory tier              {sum(t['completed'] for t in tier_stats)} steps held over the ranks "
              f"({sum(t['skipped_busy'] for t in tier_stats)} skipped busy, "
              f"{sum(t['skipped_full'] for t in tier_stats)} no room); call median "
              f"{calls[len(calls) // 2] * 1e3:.2f} ms; node memory peak "
              f"{max(t['peak_held_bytes'] for t in tier_stats) / mib:.1f} MiB; replicated "
              f"{rep_b / mib:.0f} MiB at {rep_b / rep_s / 1e6 if rep_s else 0:.0f} MB/s")
    print(f"restore vs dcp.load      ckpt.load {t_ck * 1e3:.1f} ms, dcp.load {t_dcp * 1e3:.1f} ms "
          f"(same state, 1 process; {t_dcp / t_ck:.2f}x)")
    print(f"exactly-once samples     {'PASS' if exactly_once else 'FAIL'} ({len(ids)} samples, "
          f"{len(ids) - len(set(ids))} repeated)")
    print(f"matches reference run    {'PASS (bit-exact)' if bit_equal else f'FAIL (max |diff| {max_diff:.3g})'}")
    print(f"wall time                {time.time() - t_start:.1f} s; logs in {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
