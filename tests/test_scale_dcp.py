"""bench._scale_dcp: DCP's own coordinator accepts the simulated plans (its validation
checks that the boxes tile every tensor) and deduplicates replicas as DCP does."""

from __future__ import annotations

from bench._scale_dcp import dcp_global_plan, dcp_local_plan
from bench._shapes import model_tensors


def test_fsdp_every_rank_every_tensor() -> None:
    r = dcp_global_plan("llama3-70b", "fsdp", 4)
    n = len(model_tensors("llama3-70b"))
    assert r["W"] == 4 and r["tensors"] == n == 2169
    assert r["pieces"] == r["pieces_after_dedup"] == r["chunks"] == 4 * n
    assert r["seconds"] > 0 and r["per_piece_us"] == r["seconds"] / r["pieces"] * 1e6
    assert 0 < r["dedup_seconds"] < r["seconds"] and 0 < r["validate_seconds"] < r["seconds"]
    assert r["bytes_gathered_rank0"] > r["metadata_bytes"] > 0


def test_replicas_are_deduplicated() -> None:
    n = len(model_tensors("llama3-70b"))
    hsdp = dcp_global_plan("llama3-70b", "hsdp", 4)  # 2 replicas of 2 shards
    assert hsdp["pieces"] == 4 * n and hsdp["pieces_after_dedup"] == hsdp["chunks"] == 2 * n
    # fsdp_tp on (1, 8): norms are replicated over the 8 TP ranks, the rest cut in 8
    norms = sum(1 for _k, _s, _d, role in model_tensors("llama3-70b") if role == "replicate")
    assert norms == 3 * (2 * 80 + 1)
    tp = dcp_global_plan("llama3-70b", "fsdp_tp", 8)
    assert tp["pieces_after_dedup"] == 8 * n - 7 * norms


def test_local_plan_items() -> None:
    plan = dcp_local_plan("moe", "moe", 64, 9)  # mesh (8, 8): coordinate (1, 1)
    items = {i.index.fqn: i for i in plan.items}
    w1 = items["model.layers.0.moe.experts.w1"].tensor_data
    assert tuple(w1.size) == (8, 16384, 6144)
    assert (tuple(w1.chunk.offsets), tuple(w1.chunk.sizes)) == ((1, 2048, 0), (1, 2048, 6144))
    assert str(w1.properties.dtype) == "torch.bfloat16"
    m = items["optim.state.layers.0.moe.experts.w1.exp_avg"].tensor_data
    assert str(m.properties.dtype) == "torch.float32"
    assert plan.planner_data["optim.state.layers.0.moe.experts.w1.exp_avg"] == (
        "optim", "state", "layers.0.moe.experts.w1", "exp_avg")
