"""An agent JOINS a running elastic job: two torchrun agents (--nnodes=2:3, c10d
rendezvous) train examples/train_gpt.py; a third agent starts with the same rendezvous,
the running agents see the waiting node, restart their workers, and the job continues
at world size 3 from the last committed checkpoint. Checks: the run finishes, the steps
after the join ran on 3 ranks, every sample is consumed once over the final timeline,
and the final parameters equal a reference run resized 2 -> 3 at the same checkpoint
step without agents joining, bit for bit."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.demo import ROOT, TRAIN, agent_cmd, env, free_port, kill_tree, read_logs

pytestmark = pytest.mark.slow

STEPS, EVERY, BATCH, WIDTH = 40, 5, 8, 64


class _Args:
    steps, every, step_sleep, batch = STEPS, EVERY, 0.05, BATCH


# A pre-warmed agent: the interpreter imports torchrun first and waits for a trigger file,
# so the join happens when the test decides, not ~2-3 s of imports later (the whole
# 40-step run at world size 2 takes only ~3 s on a 2-core machine).
_WARM = ("import os, sys, time\nfrom torch.distributed.run import main\n"
         "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\nmain(sys.argv[2:])\n")


def _agent(port: int, run: Path, log: Path, trigger: Path | None = None) -> subprocess.Popen:
    cmd = agent_cmd(port, run, _Args(), "2:3") + ["--width", str(WIDTH)]  # type: ignore[arg-type]
    if trigger is not None:
        assert cmd[1:3] == ["-m", "torch.distributed.run"]
        cmd = [cmd[0], "-c", _WARM, str(trigger), *cmd[3:]]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(),
                            start_new_session=True, cwd=ROOT)


def _final_timeline(recs: list[dict]) -> tuple[dict[int, int], list[int]]:
    """For each step keep only its latest attempt (as examples/demo.py does)."""
    last: dict[tuple[int, int], list[int]] = {}
    world_at: dict[int, int] = {}
    for r in recs:
        if r["event"] == "step":
            if world_at.get(r["step"]) != r["world"]:
                for k in [k for k in last if k[0] == r["step"]]:
                    del last[k]
                world_at[r["step"]] = r["world"]
            last[(r["step"], r["rank"])] = r["ids"]
    return world_at, [i for k in sorted(last) for i in last[k]]


def test_agent_joins_and_job_grows_to_three(tmp_path):
    t_begin = time.time()
    run = tmp_path / "run"
    port = free_port()
    agents = [_agent(port, run, tmp_path / "agent0.log")]
    time.sleep(1.0)  # the first agent hosts the rendezvous store
    agents.append(_agent(port, run, tmp_path / "agent1.log"))
    trigger = tmp_path / "join-now"
    agents.append(_agent(port, run, tmp_path / "agent2.log", trigger))  # imports, then waits
    join_t = None
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            time.sleep(0.1)
            recs = read_logs(run / "log") if (run / "log").exists() else []
            steps2 = [r["step"] for r in recs if r.get("event") == "step" and r["world"] == 2]
            # join once a checkpoint (step 4) is committed at world size 2
            if join_t is None and steps2 and max(steps2) >= EVERY + 1:
                trigger.touch()
                join_t = time.time()
            if join_t is not None and all(a.poll() is not None for a in agents):
                break
            if join_t is None and any(a.poll() is not None for a in agents):
                break
        codes = [a.poll() for a in agents]
    finally:
        for a in agents:
            kill_tree(a.pid)
            a.wait()
    tail = "\n".join(f"--- agent{i} ---\n" + (tmp_path / f"agent{i}.log").read_text()[-2500:]
                     for i in range(len(agents)))
    assert join_t is not None, f"the job ended before the join point\n{tail}"
    assert codes == [0, 0, 0], f"agents exited with {codes}\n{tail}"

    recs = read_logs(run / "log")
    starts3 = [r for r in recs if r["event"] == "start" and r["world"] == 3]
    assert len(starts3) == 3, f"no restart at world size 3: {[r for r in recs if r['event'] == 'start']}\n{tail}"
    resumed = {r["restored_from"] for r in starts3}
    assert len(resumed) == 1 and None not in resumed, resumed
    resume_from = resumed.pop()
    assert resume_from >= EVERY - 1 and (resume_from + 1) % EVERY == 0, resume_from
    assert all(r["start_step"] == resume_from + 1 for r in starts3)
    first3 = min(r["t"] for r in recs if r["event"] == "step" and r["world"] == 3)

    world_at, ids = _final_timeline(recs)
    assert sorted(world_at) == list(range(STEPS)), sorted(world_at)
    assert all(world_at[s] == (2 if s <= resume_from else 3) for s in world_at), world_at
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} samples repeated"
    assert len(ids) == sum(BATCH * w for w in world_at.values())
    ends = [r for r in recs if r["event"] == "end"]
    assert {r["world"] for r in ends} == {3} and all(r["step"] == STEPS for r in ends)

    # reference: 2 ranks up to the checkpoint the job grew from, then 3 ranks from it
    ref = tmp_path / "ref"
    for nproc, extra in ((2, ["--stop-at", str(resume_from)]), (3, [])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               TRAIN, "--run-dir", str(ref), "--steps", str(STEPS), "--every", str(EVERY),
               "--batch", str(BATCH), "--width", str(WIDTH), *extra]
        r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"reference run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    a = torch.load(run / "log" / "final.pt")
    b = torch.load(ref / "log" / "final.pt")
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"final parameters differ from the reference run: {diff}"
    print(f"\n[elastic] grow 2 -> 3: join at t+{join_t - t_begin:.1f}s, first world-3 step "
          f"{first3 - join_t:.1f}s after the join, resumed from step {resume_from}, "
          f"{len(ids)} samples once each, bit-equal to reference; {time.time() - t_begin:.1f}s total")
