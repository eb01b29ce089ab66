"""A GPT-style model trained data-parallel with ckpt checkpoints; elastic under torchrun.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    torchrun --nnodes=2:3 --nproc-per-node=1 --rdzv-backend=c10d \
        --rdzv-endpoint=127.0.0.1:29400 examples/train_gpt.py --run-dir /tmp/run --steps 60

Every rank holds the full model (gradients are summed with all_reduce, DDP-style);
samples come from a synthetic token dataset through ``ElasticSampler``, so a job that
loses or gains a node continues the epoch on the new world size, each sample once. The
loss is the mean over the *global* batch, so the update does not depend on the world
size. Runs unchanged on GPUs (NCCL) and on CPUs (gloo).

Each rank appends JSON lines to ``<run>/log/rank<R>.jsonl`` (steps, samples consumed,
checkpoint stats); examples/demo.py reads them for its report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

# ckpt reads through tensorstore, whose first import takes about half a second (it loads
# ml_dtypes): paid here with the other imports, so restore times below are reads alone.
import tensorstore  # noqa: E402, F401
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ckpt  # noqa: E402
from ckpt.elastic import ElasticSampler  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 2, heads: int = 4, ctx: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def sample(i: int, ctx: int, vocab: int) -> torch.Tensor:
    """Sample i of the synthetic dataset: a noisy arithmetic token sequence."""
    g = torch.Generator().manual_seed(i)
    start, stride = int(torch.randint(vocab, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
    seq = (start + stride * torch.arange(ctx + 1)) % vocab
    noise = torch.rand(ctx + 1, generator=g) < 0.1
    return torch.where(noise, torch.randint(vocab, (ctx + 1,), generator=g), seq)


def process_start_time() -> float:
    """Wall-clock time this process was created (Linux /proc), else now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def main() -> None:
    t_main = time.time()
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", dest="run", required=True, help="checkpoint run directory or URL")
    ap.add_argument("--steps", type=int, default=60, help="stop after this global step")
    ap.add_argument("--stop-at", type=int, default=None, help="save at this step and exit (planned resize)")
    ap.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    ap.add_argument("--keep-last", type=int, default=3)
    ap.add_argument("--dataset", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="seconds of extra work per step")
    ap.add_argument("--width", dest="d", type=int, default=128, help="model width")
    ap.add_argument("--memory-every", type=int, default=0,
                    help="memory-tier snapshot every N steps (0: off); CKPT_NODE_DIR names the node")
    ap.add_argument("--time-persistent-restore", action="store_true",
                    help="on a restore from memory, also time a load of the newest persistent checkpoint")
    ap.add_argument("--log", default=None, help="log directory (default <run>/log when local)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: rank i of a host on GPU LOCAL_RANK, NCCL (needs a GPU per local rank)")
    args = ap.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    # CPU unless asked: the demo and the tests run several agents of one host side by side,
    # which NCCL refuses on one GPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    t_init = time.time()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.set_num_threads(1)

    ctx, vocab = 32, 256

    def build() -> dict[str, object]:
        torch.manual_seed(1234)  # same initial weights on every rank
        model = GPT(vocab=vocab, d=args.d, ctx=ctx).to(device)
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 10))
        sampler = ElasticSampler(args.dataset, args.batch, rank=rank, world_size=world, seed=7)
        return {"model": model, "optim": optim, "sched": sched, "sampler": sampler}

    state = build()
    state["rng"] = ckpt.RNGState()
    model, optim, sched, sampler = state["model"], state["optim"], state["sched"], state["sampler"]
    assert isinstance(model, GPT) and isinstance(optim, torch.optim.AdamW) and isinstance(sampler, ElasticSampler)

    log_dir = args.log or os.path.join(args.run, "log")
    os.makedirs(log_dir, exist_ok=True)
    logf = open(os.path.join(log_dir, f"rank{rank}.jsonl"), "a", buffering=1)

    def emit(**rec: object) -> None:
        rec.update(t=time.time(), rank=rank, world=world, pid=os.getpid())
        logf.write(json.dumps(rec) + "\n")

    memory = ckpt.MemoryTierOptions(every=args.memory_every) if args.memory_every else None
    mgr = ckpt.CheckpointManager(args.run, save=args.every or None, keep=args.keep_last or None, memory=memory)
    t_mgr = time.time()
    latest = ckpt.latest(args.run) if args.time_persistent_restore else None
    t0 = time.perf_counter()
    start = mgr.restore(state)
    tier = mgr.tier_restore.to_dict() if mgr.tier_restore is not None else None
    emit(event="start", start_step=start, restore_s=time.perf_counter() - t0,
         restored_from=mgr.restored_step, source=mgr.restored_from, tier=tier,
         persistent_step=latest.step if latest is not None else None,
         proc_start=process_start_time(), main_t=t_main, init_t=t_init, mgr_t=t_mgr,
         epoch=sampler.epoch, consumed=sampler.consumed)
    if latest is not None and mgr.tier_restore is not None and mgr.tier is not None:
        # For the report only: the same state (RNG aside) loaded into fresh objects from the
        # persistent checkpoint and from the tier step just restored, both now warm
        t0 = time.perf_counter()
        ckpt.load(build(), latest.url)
        t1 = time.perf_counter()
        ckpt.load(build(), str(mgr.tier.root / mgr.tier_restore.name))
        emit(event="restore_probe", step=latest.step, persistent_s=t1 - t0, tier_s=time.perf_counter() - t1)

    params = [p for p in model.parameters()]
    it = iter(sampler)
    step = start
    local_loss = 0.0  # a worker restarted after the last step runs no step at all
    while step < args.steps:
        global_count = min(sampler.dataset_len - sampler.consumed, world * args.batch)
        if global_count <= 0:
            it = iter(sampler)  # next epoch
            continue
        ids = next(it)
        t_step = time.perf_counter()
        optim.zero_grad(set_to_none=False)
        if ids:
            batch = torch.stack([sample(i, ctx, vocab) for i in ids]).to(device)
            logits = model(batch[:, :-1])
            loss_sum = F.cross_entropy(logits.reshape(-1, vocab), batch[:, 1:].reshape(-1), reduction="sum")
            (loss_sum / (global_count * ctx)).backward()
            local_loss = float(loss_sum) / ctx
        else:
            local_loss = 0.0
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        if distributed:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            off = 0
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off:off + n].view_as(p))
                off += n
        if args.step_sleep:
            time.sleep(args.step_sleep)  # stands in for a longer forward/backward
        t_opt = time.perf_counter()
        optim.step()  # waits here (hook) only if the previous snapshot is still copying
        opt_s = time.perf_counter() - t_opt
        sched.step()
        handle = mgr.step(step, state)
        emit(event="step", step=step, ids=ids, loss=local_loss, step_s=time.perf_counter() - t_step,
             opt_s=opt_s, saved=handle is not None,
             save_call_s=handle.stats.call_s if handle is not None else 0.0)
        step += 1
        if args.stop_at is not None and step > args.stop_at:
            break
    mgr.close()  # saves the last step if it was not saved (a planned stop)
    for h in mgr.handles:
        if h.done() and h.exception() is None and h.stats.total_bytes:
            emit(event="checkpoint", step=h.step, blocked_s=h.stats.blocked_s, total_s=h.stats.total_s,
                 bytes=h.stats.bytes, total_bytes=h.stats.total_bytes)
    emit(event="checkpoints", blocked_s=mgr.blocked_s, failures=[repr(e) for _, e in mgr.failures],
         tier=dataclasses.asdict(mgr.tier.stats) if mgr.tier is not None else None)
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(log_dir, "final.pt"))
    emit(event="end", step=step)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    logf.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is committed and logged. Exit without interpreter teardown: with gloo
    # groups alive, teardown sometimes aborts in a C++ destructor ("terminate called
    # without an active exception"), which torchrun would count as a failure.
    os._exit(3 if math.isnan(local_loss) else 0)


if __name__ == "__main__":
    main()
