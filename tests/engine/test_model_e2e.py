"""End to end: a small GPT trained a few steps, saved, loaded into a fresh copy, resumed.

The resumed copy must be bit-identical to the original: parameters, every optimizer
state tensor, param_groups, scheduler state, RNG streams, and so the loss of the next
training step. The asynchronous variant checks that an optimizer step taken right after
``save_async`` returns cannot leak into the checkpoint (the optimizer pre-step hook).
"""

from __future__ import annotations

import copy
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ckpt
from tests._helpers import assert_same_state_dict

VOCAB, DIM, HEADS, SEQ, BATCH, LAYERS = 64, 32, 4, 16, 4, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, dropout=0.0, batch_first=True)
        self.ln2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln_f(x))


def warmup_cosine(step: int) -> float:
    """LR multiplier: 2 warmup steps, then cosine decay over 20 steps."""
    if step < 2:
        return (step + 1) / 2
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - 2) / 20)))


def build(seed: int, tied: bool) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = GPT(tied)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    return {"model": model, "optim": opt, "sched": sched, "step": 0, "rng": ckpt.RNGState()}


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1))


def train_step(state: dict[str, Any], tokens: torch.Tensor) -> torch.Tensor:
    model, opt, sched = state["model"], state["optim"], state["sched"]
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.detach()


def train(state: dict[str, Any], steps: int) -> None:
    for _ in range(steps):
        train_step(state, batch())
        state["step"] += 1


def capture(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of everything the checkpoint should hold."""
    return {
        "model": {k: v.detach().clone() for k, v in state["model"].state_dict().items()},
        "optim": copy.deepcopy(state["optim"].state_dict()),
        "sched": copy.deepcopy(state["sched"].state_dict()),
        "step": state["step"],
    }


def assert_bit_identical(state: dict[str, Any], ref: dict[str, Any]) -> None:
    assert_same_state_dict(state["model"].state_dict(), ref["model"], "model")
    assert_same_state_dict(state["optim"].state_dict(), ref["optim"], "optim")  # state and param_groups
    assert state["sched"].state_dict() == ref["sched"]
    assert state["step"] == ref["step"]


def assert_differs(state: dict[str, Any], ref: dict[str, Any]) -> None:
    sd = state["model"].state_dict()
    assert any(not torch.equal(sd[k], v) for k, v in ref["model"].items())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_load_resume_bit_identical(run_place: Any, tied: bool) -> None:
    a = build(seed=0, tied=tied)
    if tied:
        assert a["model"].head.weight is a["model"].tok.weight
    train(a, 3)
    assert a["step"] == 3
    url, opts = f"{run_place.url}/step-000000003", run_place.options  # local disk, then S3
    ref = capture(a)
    ckpt.save({"model": a["model"], "optim": a["optim"], "sched": a["sched"], "step": 3,
               "rng": a["rng"]}, url, step=3, storage_options=opts)
    # the original takes its next step straight away
    tokens_a = batch()
    loss_a = train_step(a, tokens_a)
    after_a = capture(a)

    b = build(seed=1234, tied=tied)  # a different initialisation, and RNG stream
    assert_differs(b, ref)
    stats = ckpt.load(b, url, storage_options=opts)
    assert stats.bytes_read > 0
    if tied:
        assert b["model"].head.weight is b["model"].tok.weight  # tying survives the load
    assert b["rng"].restored_from == "saved"
    assert_bit_identical(b, ref)
    assert [g["lr"] for g in b["optim"].param_groups] == [g["lr"] for g in ref["optim"]["param_groups"]]

    # the next step: same batch drawn from the restored RNG, same loss, same parameters
    tokens_b = batch()
    assert torch.equal(tokens_a, tokens_b), "the RNG was not restored"
    loss_b = train_step(b, tokens_b)
    assert torch.equal(loss_a, loss_b), (loss_a.item(), loss_b.item())
    b["step"] += 1
    a["step"] += 1
    assert_bit_identical(b, {**after_a, "step": 4})


@pytest.mark.parametrize("staging", ["background", "inline"])
def test_save_async_excludes_the_next_optimizer_step(tmp_path: Path, monkeypatch, staging: str) -> None:
    """Background staging: the optimizer's pre-step hook holds the step until the copy is
    done. Inline staging (SaveOptions.cpu_staging): the call itself returns only then."""
    import ckpt._engine._staging as staging_mod

    a = build(seed=0, tied=True)
    train(a, 3)
    url = tmp_path / "run" / "step-000000003"

    # Make staging slow, so the optimizer step below really arrives while the snapshot
    # still reads the live tensors: only the pre-step hook keeps it out. copy_unit is the
    # one copy of a write unit (array shard or pack) that both staging modes call.
    orig_copy = staging_mod.copy_unit
    calls = []
    first = threading.Event()

    def slow_copy(*args: Any, **kwargs: Any) -> int:
        if not first.is_set():
            first.set()
            time.sleep(1.5)  # longer than a forward/backward, even on a loaded machine
        done = orig_copy(*args, **kwargs)
        calls.append(time.perf_counter())
        return done

    monkeypatch.setattr(staging_mod, "copy_unit", slow_copy)

    ref = capture(a)  # the state right before the step
    snap = ckpt.Snapshotter(ckpt.SaveOptions(cpu_staging=staging))
    handle = snap.save_async({"model": a["model"], "optim": a["optim"], "sched": a["sched"], "step": 3,
                              "rng": a["rng"]}, url, step=3)
    returned_at = time.perf_counter()
    tokens_a = batch()
    loss_a = train_step(a, tokens_a)  # forward/backward overlap the copy; step waits for it
    stepped_at = time.perf_counter()
    stats = handle.result(timeout=60)
    after_a = capture(a)

    snap.close()
    assert calls and max(calls) < stepped_at, "the step ran before staging finished"
    if staging == "background":
        assert stats.hook_wait_s > 0
    else:
        assert max(calls) < returned_at and stats.hook_wait_s == 0 and stats.call_s > 1.0
    assert_differs({"model": a["model"]}, ref)  # the step did change the live model

    c = build(seed=99, tied=True)
    ckpt.load(c, url)
    assert_bit_identical(c, ref)  # exactly the pre-step values

    # and it resumes exactly as the original went on
    tokens_c = batch()
    assert torch.equal(tokens_a, tokens_c)
    loss_c = train_step(c, tokens_c)
    assert torch.equal(loss_a, loss_c)
    c["step"] += 1
    assert_bit_identical(c, {**after_a, "step": 4})
