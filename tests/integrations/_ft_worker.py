"""One rank of one torchft replica group (run as a process by test_torchft.py).

``python _ft_worker.py OUT LIGHTHOUSE GROUP RANK WORLD STORE_PORT ROLE TRANSPORT``: FSDP2
inside the group (gloo, its own mesh), a torchft Manager across groups (sync quorum). The
``source`` role trains and dumps its full state at the start of every step until the
healer says it is done; the ``healer`` joins, heals through the transport and dumps the
state torchft applied. ``TRANSPORT`` is ``ckpt`` or ``http`` (torchft's own).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from ft_train import full_state  # noqa: E402  (the demo's worker: the same whole-state dump)


def main() -> None:
    out, lighthouse, group, rank, world, port, role, kind = sys.argv[1:9]
    group_i, rank_i, world_i, port_i = int(group), int(rank), int(world), int(port)
    from torchft import Manager
    from torchft.checkpointing.http_transport import HTTPTransport
    from torchft.process_group import ProcessGroupGloo

    from ckpt.integrations.torchft import CkptTransport

    store = dist.TCPStore("127.0.0.1", port_i, world_i, is_master=rank_i == 0, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=dist.PrefixStore("fsdp", store), rank=rank_i, world_size=world_i)
    mesh = init_device_mesh("cpu", (world_i,))
    torch.manual_seed(0)
    width = int(os.environ.get("FT_WIDTH", "33"))  # bench/ft_heal.py heals a larger model
    model = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, 8))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # Adam's state exists before any heal (zero grads: the values do not move)
    opt.zero_grad()

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    def load_state_dict(sd: dict) -> None:
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    timeout = timedelta(seconds=10)
    transport = (CkptTransport(template=state_dict, group_rank=rank_i, group_world_size=world_i,
                               store_addr="127.0.0.1", store_port=port_i, timeout=timeout,
                               chunk_bytes=int(os.environ.get("FT_CHUNK", "256")))
                 if kind == "ckpt" else HTTPTransport(timeout=timeout, num_chunks=0))
    transfer_s = [0.0]
    recv = transport.recv_checkpoint

    def timed_recv(*a: object, **k: object) -> object:  # the transfer alone, either transport
        t = time.perf_counter()
        try:
            return recv(*a, **k)
        finally:
            transfer_s[0] = time.perf_counter() - t

    transport.recv_checkpoint = timed_recv  # type: ignore[method-assign]
    if kind == "ckpt" and role == "source" and os.environ.get("FT_TEST_CORRUPT"):
        transport.server.corrupt_once.update({0, 1})  # flip a byte of the first reply of pieces 0, 1
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=load_state_dict,
                      state_dict=state_dict, min_replica_size=1, use_async_quorum=False,
                      timeout=timeout, quorum_timeout=timedelta(seconds=30),
                      rank=rank_i, world_size=world_i, store_addr="127.0.0.1", store_port=port_i,
                      lighthouse_addr=lighthouse, replica_id=f"group{group_i}",
                      checkpoint_transport=transport)
    outdir = Path(out)
    done = outdir / "healed"
    for _ in range(400):
        t0 = time.perf_counter()
        manager.start_quorum()  # sync quorum: a heal's transfer happens in here
        quorum_s = time.perf_counter() - t0
        step = manager.current_step()
        if role == "source":
            if manager.num_participants() > 1:  # the healer is in: the state it heals from
                torch.save(full_state(model, opt), outdir / f"src-{rank_i}-{step}.pt")
            (outdir / f"src-step-{rank_i}").write_text(str(step))
        g = torch.Generator().manual_seed(1000 + step * 16 + rank_i)
        x = torch.randn(4, 16, generator=g)
        loss = model(x).square().mean()
        loss.backward()
        t1 = time.perf_counter()
        committed = manager.should_commit()  # a heal's state is applied in here
        apply_s = time.perf_counter() - t1
        if committed:
            if role == "healer":
                torch.save(full_state(model, opt), outdir / f"healed-{rank_i}-{step}.pt")
                stats = transport.last_heal.as_dict() if kind == "ckpt" else {}
                (outdir / f"heal-{rank_i}.json").write_text(json.dumps({"step": step, "quorum_s": quorum_s,
                                                                       "transfer_s": transfer_s[0],
                                                                       "apply_s": apply_s, **stats}))
                dist.barrier()
                if rank_i == 0:
                    done.write_text("1")
                break
            opt.step()
        opt.zero_grad()
        if role == "source" and done.exists():
            break
        time.sleep(0.02)
    manager.shutdown(wait=False)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
