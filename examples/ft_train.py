"""One rank of one torchft replica group, for `make demo-ft` (examples/demo_ft.py).

``python examples/ft_train.py --out DIR --lighthouse URL --group G --rank R --world W
--port P --steps N``: FSDP2 over the group's W ranks (gloo, its own process group), a
torchft ``Manager`` across replica groups (sync quorum), ckpt's transport for heals, and
persistent checkpoints through ``ckpt.integrations.torchft.CommittedCheckpoints`` (only
committed steps, written by one replica group).

Gradients are averaged across replica groups on the group's *full* gradient, at group rank
0, then handed back to the group's ranks: torchft 0.2.0 pairs rank r of one group with
rank r of the others, which has no meaning when groups hold different shard counts (a
group that came back with fewer ranks). Every record the driver reads is one JSON line in
``DIR/g{G}r{R}.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ckpt  # noqa: E402

ROWS = 8  # a replica group's batch per step, split over its ranks


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--samples", type=int, default=200, help="the dataset's size (a multiple of ROWS)")
    ap.add_argument("--transport", choices=["ckpt", "http"], default="ckpt")
    ap.add_argument("--run", default="", help="persistent checkpoints (CommittedCheckpoints)")
    ap.add_argument("--save-every", type=int, default=5)
    ap.add_argument("--leave-after", type=int, default=-1, help="reference run: exit once this step is done")
    ap.add_argument("--gate", type=int, default=-1, help="reference run: before this step's quorum, wait for "
                    "OUT/gate-open (the driver opens it once the returning group is up)")
    ap.add_argument("--step-sleep", type=float, default=0.05, help="seconds of 'compute' per step")
    ap.add_argument("--timeout", type=float, default=3.0, help="torchft's process-group timeout, s")
    return ap.parse_args()


class Log:
    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1)

    def __call__(self, event: str, **kw: Any) -> None:
        self._f.write(json.dumps({"event": event, "t": time.time(), **kw}) + "\n")


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state, for the driver's bit-exact comparisons."""
    out = {f"model.{k}": v.full_tensor().clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{pid}.{k}"] = (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
    return out


def main() -> None:
    a = parse()
    from torchft import Manager
    from torchft.checkpointing.http_transport import HTTPTransport
    from torchft.process_group import ProcessGroupDummy, ProcessGroupGloo

    from ckpt.elastic import ElasticSampler
    from ckpt.integrations.torchft import CkptTransport, CommittedCheckpoints, group_batch

    out = Path(a.out)
    log = Log(out / f"g{a.group}r{a.rank}.jsonl")
    log("start", world=a.world, pid=os.getpid())
    store = dist.TCPStore("127.0.0.1", a.port, a.world, is_master=a.rank == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("fsdp", store), rank=a.rank, world_size=a.world)
    mesh = init_device_mesh("cpu", (a.world,))
    torch.manual_seed(0)  # every group builds the same initial model (torchft heals it anyway)
    model = torch.nn.Sequential(torch.nn.Linear(16, a.width), torch.nn.Tanh(), torch.nn.Linear(a.width, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's state exists before any heal: the template names every tensor a heal fills
    opt.zero_grad(set_to_none=False)
    load_s: list[float] = []
    data = torch.Generator().manual_seed(7)  # the same dataset in every group
    xs, ys = torch.randn(a.samples, 16, generator=data), torch.randn(a.samples, 8, generator=data)
    # one sampler rank per participating replica group: each sample once however the quorum changes
    sampler = ElasticSampler(a.samples, ROWS, rank=0, world_size=1, seed=3)

    def state_dict() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": opt.state_dict(), "sampler": sampler.state_dict()}

    def load_state_dict(sd: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        sampler.load_state_dict(sd["sampler"])
        load_s.append(time.perf_counter() - t0)

    timeout = timedelta(seconds=a.timeout)
    transport: Any
    if a.transport == "ckpt":
        transport = CkptTransport(template=state_dict, group_rank=a.rank, group_world_size=a.world,
                                  store_addr="127.0.0.1", store_port=a.port, timeout=timedelta(seconds=30))
    else:
        transport = HTTPTransport(timeout=timedelta(seconds=30), num_chunks=0)
    # cross-group traffic goes through group rank 0 (the module docstring says why)
    pg = ProcessGroupGloo(timeout=timeout) if a.rank == 0 else ProcessGroupDummy(0, 1)
    manager = Manager(pg=pg, load_state_dict=load_state_dict, state_dict=state_dict, min_replica_size=1,
                      use_async_quorum=False, timeout=timeout, quorum_timeout=timedelta(seconds=60),
                      rank=a.rank, world_size=a.world, store_addr="127.0.0.1", store_port=a.port,
                      lighthouse_addr=a.lighthouse, replica_id=f"group{a.group}", checkpoint_transport=transport,
                      init_sync=False)  # every group builds the same initial model
    saves = (CommittedCheckpoints(manager, ckpt.CheckpointManager(a.run, save=a.save_every, keep=None))
             if a.run else None)
    # A whole-job restart would resume here, `saves.restore({"model": model, "optim": opt})`; the
    # demo's groups start fresh, and one that joins a live job heals from its peers instead.
    log("up")
    while not (out / "go").exists():  # the first groups start together (the driver says go)
        time.sleep(0.02)
    params = list(model.parameters())
    while manager.current_step() < a.steps:
        if manager.current_step() == a.gate:
            log("gate", step=a.gate)
            state = full_state(model, opt)  # the state the returning group must heal to
            if a.rank == 0:
                torch.save(state, out / f"gate-g{a.group}.pt")
            while not (out / "gate-open").exists():
                time.sleep(0.02)
            time.sleep(1.0)  # the returning group's quorum request reaches the lighthouse first
        if a.leave_after >= 0 and manager.current_step() == a.leave_after + 1:
            break
        t0 = time.perf_counter()
        n_loads = len(load_s)
        manager.start_quorum()  # sync quorum: a heal's transfer and load happen in here
        quorum_s = time.perf_counter() - t0
        step = manager.current_step()
        healed = torch.tensor([len(load_s) > n_loads], dtype=torch.int32)
        dist.all_reduce(healed, op=dist.ReduceOp.MAX)  # a group-wide answer: what follows is collective
        if healed.item():
            stats = transport.last_heal.as_dict() if a.transport == "ckpt" else {}
            log("healed", step=step, quorum_s=quorum_s, load_s=load_s[-1] if len(load_s) > n_loads else 0.0,
                **stats)
            state = full_state(model, opt)
            if a.rank == 0:
                torch.save(state, out / f"healed-g{a.group}.pt")
        samples = group_batch(sampler, manager)  # the group's batch of this step; its ranks split it
        log("batch", step=step, samples=samples, participants=manager.num_participants())
        mine = torch.tensor(samples[a.rank::a.world], dtype=torch.long)
        (model(xs[mine]) - ys[mine]).square().sum().div(ROWS).backward()  # FSDP averages over the ranks
        with torch.no_grad():
            flat = torch.cat([p.grad.full_tensor().reshape(-1) for p in params])
            if a.rank == 0:
                manager.allreduce(flat).wait()  # the mean over the participating groups
            dist.broadcast(flat, src=0)
            off = 0
            for p in params:
                full = flat[off:off + p.numel()].view(p.shape)
                off += p.numel()
                p.grad.to_local().copy_(full.chunk(a.world)[a.rank])
        committed = manager.should_commit()
        if committed:
            opt.step()
            sampler.advance()
            log("step", step=step, participants=manager.num_participants(),
                replica_rank=manager.participating_rank())
            if saves is not None:
                handle = saves.step(committed, {"model": model, "optim": opt, "sampler": sampler})
                if handle is not None:
                    log("save", step=step)
        else:
            log("rollback", step=step)
        opt.zero_grad(set_to_none=False)
        time.sleep(a.step_sleep)
    if saves is not None:
        saves.checkpoints.close()
    final = manager.current_step() - 1
    state = full_state(model, opt)
    if a.rank == 0:
        torch.save(state, out / f"final-g{a.group}.pt")
    log("end", step=final, sampler=sampler.state_dict())
    manager.shutdown(wait=False)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
