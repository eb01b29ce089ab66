"""`make demo-ft`: survivors keep training under torchft; a replica group that comes back
with fewer ranks heals from its peers through ckpt, resharded.

1. A torchft lighthouse and 2 replica groups x 2 ranks (FSDP2 inside a group, gloo/CPU,
   examples/ft_train.py) train with persistent checkpoints (ckpt, committed steps only,
   written by the lowest participating group).
2. One rank of group 1 is killed (SIGKILL), and its group torn down, as an agent would.
   Group 0 never restarts: it trains on alone. Group 1 comes back with 1 rank and heals
   from group 0's 2 ranks through ckpt's transport (2 shards -> 1).
3. A reference run makes the same change at the same steps without a crash (group 1
   leaves cleanly after the last step it shared, comes back with 1 rank at the step the
   heal happened) and the two runs' final states must be equal bit for bit.
4. The same-shape heal (a 2-rank group joining late) through torchft's own HTTP
   transport and through ckpt's, same harness, for the comparison.
5. The report: survivors' stall, the heal split (quorum, transfer, load), bytes moved
   against the healing rank's share, the persistent checkpoints and who wrote them, and a
   whole-job restart from the newest one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from demo import free_port  # noqa: E402  (examples/demo.py, beside this file)

import ckpt  # noqa: E402

WORKER = str(ROOT / "examples" / "ft_train.py")
SAMPLES = 200  # the workers' dataset (--samples), a multiple of their batch per group


class Job:
    """A lighthouse and the replica groups' processes of one run."""

    def __init__(self, out: Path, steps: int, width: int, transport: str = "ckpt") -> None:
        self.out, self.steps, self.width, self.transport = out, steps, width, transport
        out.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("torchft_lighthouse")
        port = free_port()
        self.lighthouse = f"http://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = [subprocess.Popen(
            [str(exe), "--min_replicas", "1", "--bind", f"127.0.0.1:{port}", "--join_timeout_ms", "200",
             "--quorum_tick_ms", "20", "--heartbeat_timeout_ms", "1000"],
            stdout=open(out / "lighthouse.log", "w"), stderr=subprocess.STDOUT)]
        self.groups: dict[int, list[subprocess.Popen]] = {}

    def group(self, g: int, world: int, *extra: str, run: bool = True) -> list[subprocess.Popen]:
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        procs = [subprocess.Popen(
            [sys.executable, WORKER, "--out", str(self.out), "--lighthouse", self.lighthouse, "--group", str(g),
             "--rank", str(r), "--world", str(world), "--port", str(port), "--steps", str(self.steps),
             "--width", str(self.width), "--samples", str(SAMPLES), "--transport", self.transport,
             *(["--run", str(self.out / "run")] if run else []), *extra],
            env=env, stdout=open(self.out / f"g{g}r{r}.log", "a"), stderr=subprocess.STDOUT, cwd=ROOT)
            for r in range(world)]
        self.groups[g] = procs
        self.procs += procs
        return procs

    def go(self, groups: dict[int, int]) -> None:
        """Start training once every rank of ``groups`` ({group: world}) is up."""
        self.wait_for("the groups to start", lambda: all(self.records(g, r, "up") for g, w in groups.items()
                                                         for r in range(w)))
        (self.out / "go").write_text("1")

    def records(self, g: int, r: int, event: str | None = None) -> list[dict[str, Any]]:
        f = self.out / f"g{g}r{r}.jsonl"
        if not f.exists():
            return []
        recs = [json.loads(line) for line in f.read_text().split("\n")[:-1] if line.strip()]
        return [x for x in recs if event is None or x["event"] == event]

    def wait_for(self, what: str, test: Any, limit: float = 180) -> Any:
        end = time.monotonic() + limit  # a bound on a hang
        while time.monotonic() < end:
            got = test()
            if got:
                return got
            for p in self.procs[1:]:
                if p.poll() not in (None, 0, -signal.SIGKILL):
                    raise SystemExit(f"[demo-ft] a worker failed (exit {p.returncode}); logs in {self.out}")
            time.sleep(0.05)
        raise SystemExit(f"[demo-ft] timed out waiting for {what}; logs in {self.out}")

    def finish(self, limit: float = 240) -> None:
        end = time.monotonic() + limit
        for p in self.procs[1:]:
            if p.poll() is None:
                p.wait(timeout=max(1.0, end - time.monotonic()))
        self.close()

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def committed(job: Job, g: int) -> dict[int, dict[str, Any]]:
    """Group ``g``'s committed steps (its rank 0's records; the last incarnation wins)."""
    return {r["step"]: r for r in job.records(g, 0, "step")}


def faulty_run(out: Path, a: argparse.Namespace) -> dict[str, Any]:
    job = Job(out, a.steps, a.width)
    try:
        g0 = job.group(0, 2)
        g1 = job.group(1, 2)
        job.go({0: 2, 1: 2})
        job.wait_for(f"group 1 to reach step {a.kill_at}",
                     lambda: any(r["step"] >= a.kill_at for r in job.records(1, 1, "step")))
        os.kill(g1[1].pid, signal.SIGKILL)
        kill_t = time.time()
        os.kill(g1[0].pid, signal.SIGKILL)  # the group's agent tears the rest of the group down
        for p in g1:
            p.wait()
        print(f"[demo-ft] killed group 1's rank 1 (SIGKILL) at step ~{a.kill_at}; group 1 comes back with 1 rank",
              flush=True)
        job.group(1, 1)
        job.finish()
        if any(p.returncode != 0 for p in g0):
            raise SystemExit(f"[demo-ft] a survivor exited with {[p.returncode for p in g0]}; logs in {out}")
        return {"job": job, "kill_t": kill_t, "survivor_pids": [p.pid for p in g0]}
    finally:
        job.close()


def participation(steps: dict[int, dict[str, Any]]) -> tuple[int, int]:
    """(the last step group 1 shared before it died, the step it healed at)."""
    both = sorted(s for s, r in steps.items() if r["participants"] == 2)
    alone = sorted(s for s, r in steps.items() if r["participants"] == 1 and both and s > both[0])
    if not alone or both[0] != 0:
        raise SystemExit(f"[demo-ft] not the schedule the demo makes: {sorted(steps.items())}")
    back = [s for s, r in steps.items() if s > alone[0] and r["participants"] == 2]
    if not back:
        raise SystemExit("[demo-ft] group 1 never came back before the end: raise --steps")
    return alone[0] - 1, min(back)


def reference_run(out: Path, a: argparse.Namespace, last_shared: int, heal_at: int) -> Job:
    job = Job(out, a.steps, a.width)
    try:
        job.group(0, 2, "--gate", str(heal_at))
        g1 = job.group(1, 2, "--leave-after", str(last_shared))
        job.go({0: 2, 1: 2})
        for p in g1:
            p.wait(timeout=180)
        job.wait_for("group 0 at the heal step", lambda: job.records(0, 0, "gate") and job.records(0, 1, "gate"))
        job.group(1, 1)
        job.wait_for("the returning group's manager", lambda: len(job.records(1, 0, "up")) >= 2)
        (out / "gate-open").write_text("1")
        job.finish()
        return job
    finally:
        job.close()


def same_shape_heal(out: Path, a: argparse.Namespace, transport: str) -> dict[str, Any]:
    job = Job(out, a.steps, a.heal_width, transport)
    try:
        job.group(0, 2, run=False)
        job.go({0: 2})
        job.wait_for("group 0 training", lambda: len(job.records(0, 0, "step")) >= 3)
        job.group(1, 2, run=False)
        job.finish()
        healed = job.records(1, 0, "healed")
        if not healed:
            raise SystemExit(f"[demo-ft] the {transport} heal did not happen; logs in {out}")
        return healed[0]
    finally:
        job.close()


def exactly_once(job: Job, samples: int) -> tuple[bool, int, int]:
    """Whether the committed steps' batches (group 0 commits every step; group 1's batch
    counts where it took part) hold each sample of each finished epoch once and none of
    the last epoch twice; the samples and the finished epochs."""
    steps0 = committed(job, 0)
    planned = [{r["step"]: r["samples"] for r in job.records(g, 0, "batch")} for g in (0, 1)]  # a retry: the last
    seen: list[int] = []
    for s in sorted(steps0):
        seen += planned[0][s] + (planned[1][s] if steps0[s]["participants"] == 2 else [])
    epochs = len(seen) // samples
    tail = seen[epochs * samples:]
    ok = all(sorted(seen[e * samples:(e + 1) * samples]) == list(range(samples)) for e in range(epochs))
    return ok and len(set(tail)) == len(tail), len(seen), epochs


def equal_states(x: Path, y: Path) -> tuple[bool, str]:
    a, b = torch.load(x), torch.load(y)
    if a.keys() != b.keys():
        return False, "different keys"
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).contiguous().view(torch.uint8)

    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(raw(a[k]), raw(b[k]))]
    return not bad, (f"{len(bad)} tensors differ, first {bad[0]}" if bad else "")


def whole_job_restart(run: Path, width: int) -> tuple[int, dict[str, torch.Tensor]]:
    """The newest persistent checkpoint, loaded on one process without FSDP (as a
    whole-job restart on another world size would)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 8))
    last = max(ckpt.list_checkpoints(str(run)), key=lambda c: c.step or 0)
    ckpt.load({"model": model}, last.url)
    return int(last.step or 0), {f"model.{k}": v for k, v in model.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--kill-at", type=int, default=12)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--heal-width", type=int, default=1 << 16, help="the model of the transport comparison")
    ap.add_argument("--out", default="")
    ap.add_argument("--json", default="", help="also write the report's figures here")
    a = ap.parse_args()
    t_start = time.time()
    out = Path(a.out or tempfile.mkdtemp(prefix="ckpt-demo-ft-"))
    print(f"[demo-ft] lighthouse + 2 replica groups x 2 ranks (FSDP2, gloo), {a.steps} steps; logs in {out}",
          flush=True)
    run = faulty_run(out / "faulty", a)
    job: Job = run["job"]
    steps0 = committed(job, 0)
    last_shared, heal_at = participation(steps0)
    print(f"[demo-ft] faulty run done (group 1 last shared step {last_shared}, healed at {heal_at}); reference "
          "run...", flush=True)
    ref = reference_run(out / "reference", a, last_shared, heal_at)
    print("[demo-ft] reference done; same-shape heals through torchft's HTTP transport and ckpt's...", flush=True)
    http = same_shape_heal(out / "http", a, "http")
    same = same_shape_heal(out / "same", a, "ckpt")

    # --- the checks and figures -------------------------------------------------------------
    ref0 = committed(ref, 0)
    same_schedule = {s: r["participants"] for s, r in steps0.items()} == \
        {s: r["participants"] for s, r in ref0.items()}
    finals = [equal_states(job.out / f"final-g{g}.pt", ref.out / f"final-g{g}.pt") for g in (0, 1)]
    healed_eq = equal_states(job.out / "healed-g1.pt", ref.out / "healed-g1.pt")
    source_eq = equal_states(job.out / "healed-g1.pt", ref.out / "gate-g0.pt")
    replicas_eq = equal_states(job.out / "final-g0.pt", job.out / "final-g1.pt")
    kill_t = run["kill_t"]
    times0 = sorted(r["t"] for r in steps0.values())
    before = [b - a_ for a_, b in zip(times0, times0[1:]) if b < kill_t]
    step_s = sorted(before)[len(before) // 2] if before else float("nan")
    # the survivors' stall: the longest wait between two of their commits from the kill to
    # the heal (a commit already in flight at the kill does not end it); the heal's pause apart
    heal_t = steps0[heal_at]["t"]
    gaps = [(b - a_, b) for a_, b in zip(times0, times0[1:]) if b > kill_t]
    stall = max(g for g, b in gaps if b < heal_t)
    heal_pause = next(g for g, b in gaps if b == heal_t)
    pids_ok = {r["pid"] for r in job.records(0, 0, "start") + job.records(0, 1, "start")} == set(run["survivor_pids"])
    heal = job.records(1, 0, "healed")[-1]
    saves = {g: sorted({r["step"] for rr in (0, 1) for r in job.records(g, rr, "save")}) for g in (0, 1)}
    on_disk = sorted(int(c.step or 0) for c in ckpt.list_checkpoints(str(job.out / "run")))
    all_committed = set(steps0) | set(committed(job, 1))
    restart_step, restart = whole_job_restart(job.out / "run", a.width)
    final0 = torch.load(job.out / "final-g0.pt")
    restart_ok = restart_step == a.steps - 1 and all(torch.equal(v, final0[k]) for k, v in restart.items())
    once, n_seen, epochs = exactly_once(job, SAMPLES)
    ok = once and same_schedule and all(f[0] for f in finals) and healed_eq[0] and source_eq[0] and pids_ok and restart_ok \
        and not saves[1] and set(on_disk) <= all_committed and on_disk

    print()
    print("ckpt demo-ft report")
    print("===================")
    n = sum(v.numel() for k, v in final0.items() if k.startswith("model."))
    print(f"job                      MLP ({n / 1e3:.1f} k params) + Adam; 2 replica groups x 2 ranks, FSDP2 inside, "
          f"torchft across; {a.steps} steps")
    print(f"failure                  SIGKILL of group 1 rank 1 at step ~{a.kill_at}; group 1 back with 1 rank")
    print(f"survivors                {'never restarted' if pids_ok else 'RESTARTED'} (same 2 processes); stall "
          f"{stall:.2f} s (the longest wait between two of group 0's commits after the kill; step time "
          f"{step_s * 1e3:.0f} ms, lighthouse heartbeat timeout 1 s, pg timeout 3 s); paused {heal_pause:.2f} s at "
          "the heal")
    print(f"schedule                 steps 0-{last_shared} both groups, {last_shared + 1}-{heal_at - 1} group 0 alone,"
          f" {heal_at}-{a.steps - 1} both again (group 1 on 1 rank)")
    fetch = heal.get("fetch_s", 0.0)
    print(f"heal (2 shards -> 1)     quorum+transfer {heal['quorum_s']:.3f} s = transfer {fetch:.3f} s "
          f"+ quorum/rest {heal['quorum_s'] - fetch - heal['load_s']:.3f} s + load {heal['load_s']:.3f} s; "
          f"{heal['bytes'] / 2**10:.1f} KiB = {heal['bytes'] / heal['share_bytes']:.3f} x its share, "
          f"{heal['requests']} requests")
    print(f"same-shape heal, {a.heal_width}-wide   torchft HTTP: quorum+transfer {http['quorum_s']:.3f} s, load "
          f"{http['load_s']:.3f} s | ckpt: quorum+transfer {same['quorum_s']:.3f} s (transfer "
          f"{same['fetch_s']:.3f} s), load {same['load_s']:.3f} s, {same['bytes'] / 2**20:.1f} MiB = "
          f"{same['bytes'] / same['share_bytes']:.3f} x share")
    print(f"exactly-once             {'PASS' if once else 'FAIL'} ({n_seen} samples of the committed steps, "
          f"{epochs} whole epochs of {SAMPLES}: each once, the last epoch's so far none twice, across the "
          "rollback, the quorum changes and the heal)")
    print(f"persistent checkpoints   steps {on_disk} on disk; saved by group 0 {saves[0]}, by group 1 {saves[1]} "
          f"({'PASS' if not saves[1] and set(on_disk) <= all_committed else 'FAIL'}: committed steps only, one writer)")
    print(f"whole-job restart        newest checkpoint (step {restart_step}) loads on 1 process without FSDP: "
          f"{'PASS (bit-equal to the final state)' if restart_ok else 'FAIL'}")
    print(f"reference schedule       {'PASS (same steps, same participants)' if same_schedule else 'FAIL'}")
    print(f"healed state             {'PASS' if healed_eq[0] else 'FAIL ' + healed_eq[1]} (bit-exact vs the "
          f"reference's heal); {'PASS' if source_eq[0] else 'FAIL ' + source_eq[1]} (bit-exact vs group 0's "
          f"state at step {heal_at})")
    for g, (eq, why) in enumerate(finals):
        print(f"final state, group {g}     {'PASS (bit-exact vs reference)' if eq else 'FAIL ' + why}")
    print(f"replicas agree           {'yes' if replicas_eq[0] else 'no: ' + replicas_eq[1]} (group 0 on 2 shards, "
          "group 1 on 1: same bits)")
    print(f"wall time                {time.time() - t_start:.1f} s; logs in {out}")
    print(f"result                   {'PASS' if ok else 'FAIL'}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "ok": ok, "stall_s": stall, "heal_pause_s": heal_pause, "step_s": step_s, "survivors_restarted": not pids_ok,
            "heal": heal, "http": http, "same": same, "saves": saves, "on_disk": on_disk,
            "same_schedule": same_schedule, "finals": [f[0] for f in finals], "healed_eq": healed_eq[0], "source_eq": source_eq[0],
            "restart_ok": restart_ok, "replicas_agree": replicas_eq[0],
            "exactly_once": once, "samples_seen": n_seen}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
