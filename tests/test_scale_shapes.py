"""bench._shapes: the model states that bench.scale simulates, and the boxes of each layout,
checked against torch's own DTensor rule (``_compute_local_shape_and_global_offset``, the
function DCP and ckpt call on a real DTensor) for every rank of small and real meshes."""

from __future__ import annotations

import math
from typing import Any

import pytest
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

from bench._shapes import (
    LAYOUTS,
    MODELS,
    layout_boxes,
    mesh_coordinate,
    mesh_shape,
    model_tensors,
    placements,
    replicas,
)


def torch_box(shape: tuple[int, ...], role: str, layout: str, W: int, rank: int) -> tuple[Any, Any]:
    plc = [Replicate() if d is None else Shard(d) for d in placements(shape, role, layout, W)]
    coord = list(mesh_coordinate(layout, W, rank))
    sizes, offs = _compute_local_shape_and_global_offset(shape, mesh_shape(layout, W), coord, plc)
    return tuple(int(o) for o in offs), tuple(int(s) for s in sizes)


def test_counts_and_keys() -> None:
    counts = {m: len(model_tensors(m)) for m in MODELS}
    assert counts == {"llama3-70b": 2169, "llama3-405b": 3411, "moe": 1689}
    for m in MODELS:
        t = model_tensors(m)
        keys = [k for k, *_ in t]
        assert len(set(keys)) == len(keys)
        params = [(k, s, d, r) for k, s, d, r in t if k.startswith("model/")]
        assert len(params) * 3 == len(t)
        assert {d for _k, _s, d, _r in params} == {"bfloat16"}
        by_key = {k: (s, d, r) for k, s, d, r in t}
        for k, s, _d, r in params:  # each parameter's two moments: same shape and role, float32
            fqn = k.removeprefix("model/")
            for moment in ("exp_avg", "exp_avg_sq"):
                assert by_key[f"optim/state/{fqn}/{moment}"] == (s, "float32", r)
    billions = {m: sum(math.prod(s) for k, s, _d, _r in model_tensors(m) if k.startswith("model/")) / 1e9
                for m in MODELS}
    assert billions["llama3-70b"] == pytest.approx(70.55, abs=0.01)
    assert billions["llama3-405b"] == pytest.approx(405.85, abs=0.01)
    assert billions["moe"] == pytest.approx(140.63, abs=0.01)  # Mixtral-8x22B: 141 B
    t = {k: (s, r) for k, s, _d, r in model_tensors("llama3-70b")}
    assert t["model/layers.0.attention.wq.weight"] == ((8192, 8192), "colwise")
    assert t["model/layers.79.attention.wk.weight"] == ((1024, 8192), "colwise")
    assert t["model/layers.3.attention.wo.weight"] == ((8192, 8192), "rowwise")
    assert t["model/layers.3.feed_forward.w2.weight"] == ((8192, 28672), "rowwise")
    assert t["model/layers.3.ffn_norm.weight"] == ((8192,), "replicate")
    assert t["model/tok_embeddings.weight"] == ((128256, 8192), "colwise")
    moe = {k: (s, r) for k, s, _d, r in model_tensors("moe")}
    assert moe["model/layers.0.moe.experts.w1"] == ((8, 16384, 6144), "expert")
    assert moe["model/layers.55.moe.experts.w2"] == ((8, 6144, 16384), "expert")
    assert moe["model/layers.0.moe.router.gate.weight"] == ((8, 6144), "replicate")


def test_placements_per_layout() -> None:
    assert mesh_shape("fsdp_tp", 64) == (8, 8) and mesh_shape("hsdp", 64) == (2, 32)
    assert mesh_coordinate("fsdp_tp", 64, 13) == (1, 5)
    assert placements((8192, 8192), "colwise", "fsdp_tp", 64) == (0, 0)
    assert placements((8192, 8192), "rowwise", "fsdp_tp", 64) == (0, 1)
    assert placements((8192,), "replicate", "fsdp_tp", 64) == (0, None)
    assert placements((8192, 8192), "rowwise", "hsdp", 64) == (None, 0)
    assert placements((8, 16, 6), "expert", "moe", 64) == (1, 0)  # torchtitan: FSDP on dim 1 once W > E
    assert placements((8, 16, 6), "expert", "moe", 8) == (0, 0)
    assert placements((8192, 8192), "colwise", "moe", 64) == (0, None)
    assert replicas((8192,), "replicate", "fsdp_tp", 64) == 8
    assert replicas((8192, 8192), "colwise", "hsdp", 64) == 2
    assert replicas((8192, 8192), "colwise", "fsdp_tp", 64) == 1
    for layout, W in (("fsdp_tp", 12), ("moe", 20), ("hsdp", 7)):
        with pytest.raises(ValueError, match="divisible"):
            mesh_shape(layout, W)


SMALL = [((10, 6), "colwise"), ((3, 6), "colwise"), ((7, 5), "rowwise"), ((7,), "replicate"),
         ((17, 9), "rowwise"), ((1, 4), "colwise"), ((8, 5, 3), "expert"), ((3, 9, 2), "expert"),
         ((), "replicate")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("W", [8, 16, 24, 48])
def test_boxes_match_torch_small(layout: str, W: int) -> None:
    """Uneven and empty shards, nested splits of one dim: every rank's box is torch's."""
    for shape, role in SMALL:
        volume = math.prod(shape)
        seen: set[Any] = set()
        held = 0
        for rank in range(W):
            (box,) = layout_boxes(shape, role, layout, W, rank)
            assert box == torch_box(shape, role, layout, W, rank), (shape, role, layout, W, rank)
            held += math.prod(box[1])
            seen.add(box)
        # the distinct boxes tile the tensor; each is held by `replicas` ranks
        assert sum(math.prod(s) for _o, s in seen) == volume, (shape, role, layout, W)
        assert held == volume * replicas(shape, role, layout, W)


@pytest.mark.parametrize("model", list(MODELS))
def test_boxes_match_torch_models(model: str) -> None:
    """Every distinct (shape, role) of the real models, every rank of a 64-rank mesh."""
    kinds = sorted({(s, r) for _k, s, _d, r in model_tensors(model)})
    for layout in LAYOUTS:
        for shape, role in kinds:
            for rank in range(64):
                assert layout_boxes(shape, role, layout, 64, rank) == [torch_box(shape, role, layout, 64, rank)]
