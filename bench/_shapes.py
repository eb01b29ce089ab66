"""Shapes of large models' training state and the boxes each rank holds under a mesh layout.

Nothing here allocates a tensor: ``bench.scale`` (ckpt's planner) and ``bench._scale_dcp``
(DCP's) simulate W ranks from these descriptions alone.

    model_tensors("llama3-70b")   -> [(key, global shape, dtype, tp_role), ...]
    layout_boxes(shape, tp_role, "fsdp_tp", W, rank) -> [(offsets, sizes)]

**State.** The parameters of a torchtitan-style model (``model/<fqn>``, bfloat16: a pure
bf16 job; fp32 master parameters would double their bytes, not change a count or a box)
and AdamW's two moments per parameter (``optim/state/<fqn>/exp_avg``, ``.../exp_avg_sq``, float32). AdamW's
``step`` (one 0-d tensor per parameter) and the param groups are left out: the counts
below are parameters x 3. Per layer a dense model has 9 parameters (``attention.wq/wk/wv/
wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``), plus 3 outside the
layers (``tok_embeddings``, ``norm``, ``output``):

    llama3-70b   80 layers:  80 x 9 + 3 =  723 parameters, 2,169 tensors (70.6 B parameters)
    llama3-405b 126 layers: 126 x 9 + 3 = 1137 parameters, 3,411 tensors (405.8 B)
    moe          56 layers:  56 x 10 + 3 = 563 parameters, 1,689 tensors (140.6 B)

``moe`` is Mixtral-8x22B-shaped with torchtitan's names: per layer the attention, the two
norms, a router ``moe.router.gate.weight`` [E, dim] and the experts *stacked*, dim 0 = the
expert: ``moe.experts.w1`` / ``w3`` [E, ffn, dim] and ``w2`` [E, dim, ffn] (torchtitan's
``GroupedExperts``), so expert parallelism is a plain Shard(0).

**tp_role** says which dim of the stored weight tensor parallelism cuts: ``colwise`` dim 0
(``wq/wk/wv/w1/w3``, ``output``; and ``tok_embeddings``, whose torchtitan plan is
``RowwiseParallel`` on an ``nn.Embedding``, which shards the weight's dim 0, the vocab),
``rowwise`` dim 1 (``wo``, ``w2``), ``replicate`` (norms, the router), ``expert`` (stacked
experts: dim 0 over the expert-parallel mesh dim).

**Layouts** (W ranks, row-major rank -> mesh coordinate, as ``init_device_mesh`` numbers
them). Each gives one DTensor placement per mesh dim, ``None`` for Replicate or the tensor
dim of a Shard:

- ``fsdp``: mesh (W,), Shard(0) for every tensor (FSDP2's default, stacked experts too).
- ``fsdp_tp``: mesh (W//8, 8); mesh dim 0 FSDP Shard(0), mesh dim 1 TP by role (colwise
  Shard(0), rowwise Shard(1), replicate Replicate). When both cut dim 0 the split is nested
  left to right (FSDP's chunk of dim 0 is cut again by TP): plain ``Shard`` semantics, not
  the ``_StridedShard`` that FSDP2 uses on a TP-sharded parameter (same boxes when even,
  a different rank for each). Experts as in ``moe``.
- ``hsdp``: mesh (2, W//2); Replicate on mesh dim 0, Shard(0) on mesh dim 1.
- ``moe``: mesh (W//8, 8); mesh dim 1 is expert parallelism (EP = 8): experts Shard(0)
  there; FSDP on mesh dim 0 for everything. Non-expert tensors are (Shard(0), Replicate):
  8 replicas of each FSDP shard. Experts follow torchtitan's rule: once the FSDP x EP
  ranks outnumber the experts (W > E), FSDP shards the experts' dim 1 instead of dim 0
  (dim 0 is already down to E/EP = 1), i.e. (Shard(1), Shard(0)); (Shard(0), Shard(0))
  only while W <= E.

Boxes follow torch's ``_compute_local_shape_and_global_offset`` exactly (torch.chunk
sizes: ceil-division chunks, trailing ranks short or empty; an empty shard's offset is
the dim's size); ``tests/test_scale_shapes.py`` checks them against torch's function.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

__all__ = ["LAYOUTS", "MODELS", "Box", "TensorSpec", "layout_boxes", "mesh_coordinate", "mesh_shape",
           "model_tensors", "placements", "replicas"]

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) in global coordinates
TensorSpec = tuple[str, tuple[int, ...], str, str]  # (key, global shape, dtype, tp_role)

LAYOUTS = ("fsdp", "fsdp_tp", "hsdp", "moe")
TP = 8  # tensor-parallel degree of fsdp_tp
EP = 8  # expert-parallel degree of moe
HSDP_REPLICAS = 2
ROLES = ("colwise", "rowwise", "replicate", "expert")
PARAM_DTYPE = "bfloat16"
OPTIM_DTYPE = "float32"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    layers: int
    dim: int
    ffn: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int = 128
    experts: int = 0  # 0: a dense model


MODELS: dict[str, ModelShape] = {
    "llama3-70b": ModelShape(layers=80, dim=8192, ffn=28672, vocab=128256, n_heads=64, n_kv_heads=8),
    "llama3-405b": ModelShape(layers=126, dim=16384, ffn=53248, vocab=128256, n_heads=128, n_kv_heads=8),
    "moe": ModelShape(layers=56, dim=6144, ffn=16384, vocab=32768, n_heads=48, n_kv_heads=8, experts=8),
}


def _params(m: ModelShape) -> list[tuple[str, tuple[int, ...], str]]:
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    out: list[tuple[str, tuple[int, ...], str]] = [("tok_embeddings.weight", (m.vocab, m.dim), "colwise")]
    for i in range(m.layers):
        p = f"layers.{i}."
        out += [(p + "attention.wq.weight", (q, m.dim), "colwise"),
                (p + "attention.wk.weight", (kv, m.dim), "colwise"),
                (p + "attention.wv.weight", (kv, m.dim), "colwise"),
                (p + "attention.wo.weight", (m.dim, q), "rowwise")]
        if m.experts:
            e = m.experts
            out += [(p + "moe.router.gate.weight", (e, m.dim), "replicate"),
                    (p + "moe.experts.w1", (e, m.ffn, m.dim), "expert"),
                    (p + "moe.experts.w2", (e, m.dim, m.ffn), "expert"),
                    (p + "moe.experts.w3", (e, m.ffn, m.dim), "expert")]
        else:
            out += [(p + "feed_forward.w1.weight", (m.ffn, m.dim), "colwise"),
                    (p + "feed_forward.w2.weight", (m.dim, m.ffn), "rowwise"),
                    (p + "feed_forward.w3.weight", (m.ffn, m.dim), "colwise")]
        out += [(p + "attention_norm.weight", (m.dim,), "replicate"),
                (p + "ffn_norm.weight", (m.dim,), "replicate")]
    out += [("norm.weight", (m.dim,), "replicate"), ("output.weight", (m.vocab, m.dim), "colwise")]
    return out


@lru_cache(maxsize=8)
def _model_tensors(model: str) -> tuple[TensorSpec, ...]:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    params = _params(MODELS[model])
    out: list[TensorSpec] = [(f"model/{fqn}", shape, PARAM_DTYPE, role) for fqn, shape, role in params]
    for fqn, shape, role in params:
        out += [(f"optim/state/{fqn}/{s}", shape, OPTIM_DTYPE, role) for s in ("exp_avg", "exp_avg_sq")]
    return tuple(out)


def model_tensors(model: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(key, global shape, dtype, tp_role) of every tensor of ``model``'s training state:
    the parameters first, then each parameter's ``exp_avg`` and ``exp_avg_sq``."""
    return list(_model_tensors(model))


def mesh_shape(layout: str, W: int) -> tuple[int, ...]:
    """The device mesh of ``layout`` on ``W`` ranks (ValueError where W does not fit it)."""
    if W < 1:
        raise ValueError(f"W must be positive, got {W}")
    if layout == "fsdp":
        return (W,)
    if layout in ("fsdp_tp", "moe"):
        inner = TP if layout == "fsdp_tp" else EP
        if W % inner:
            raise ValueError(f"layout {layout!r} needs W divisible by {inner}, got {W}")
        return (W // inner, inner)
    if layout == "hsdp":
        if W % HSDP_REPLICAS:
            raise ValueError(f"layout 'hsdp' needs W divisible by {HSDP_REPLICAS}, got {W}")
        return (HSDP_REPLICAS, W // HSDP_REPLICAS)
    raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


def mesh_coordinate(layout: str, W: int, rank: int) -> tuple[int, ...]:
    """``rank``'s coordinate in ``mesh_shape(layout, W)`` (row-major, like init_device_mesh)."""
    mesh = mesh_shape(layout, W)
    if not 0 <= rank < W:
        raise ValueError(f"rank {rank} is not in 0..{W - 1}")
    coord = []
    for n in reversed(mesh):
        rank, c = divmod(rank, n)
        coord.append(c)
    return tuple(reversed(coord))


@lru_cache(maxsize=4096)
def placements(shape: tuple[int, ...], tp_role: str, layout: str, W: int) -> tuple[int | None, ...]:
    """One entry per mesh dim of ``layout``: the tensor dim it shards (``Shard(d)``), or
    ``None`` (``Replicate``). A 0-d tensor is replicated everywhere."""
    mesh = mesh_shape(layout, W)
    if tp_role not in ROLES:
        raise ValueError(f"unknown tp_role {tp_role!r}; choose from {', '.join(ROLES)}")
    if not shape:
        return (None,) * len(mesh)
    if layout == "fsdp":
        return (0,)
    if layout == "hsdp":
        return (None, 0)
    if tp_role == "expert":
        n_experts = shape[0]
        fsdp_dim = 1 if W > n_experts and len(shape) > 1 else 0  # torchtitan's rule
        return (fsdp_dim, 0)
    if layout == "moe":
        return (0, None)
    # fsdp_tp
    tp_dim = {"colwise": 0, "rowwise": min(1, len(shape) - 1), "replicate": None}[tp_role]
    return (0, tp_dim)


def _chunk(n: int, k: int, i: int) -> tuple[int, int]:
    """Size and start of chunk ``i`` of ``n`` cut in ``k`` (torch.chunk, as DTensor's Shard)."""
    if n % k == 0:
        return n // k, (n // k) * i
    full = -(-n // k)
    start = full * i
    return max(0, min(n, start + full) - start), min(n, start)


def layout_boxes(shape: tuple[int, ...], tp_role: str, layout: str, W: int, rank: int) -> list[Box]:
    """The box(es) ``rank`` of ``W`` holds of a tensor of global ``shape`` under ``layout``.

    One box for these layouts (every placement is a plain Shard or Replicate); an empty
    shard is returned too, as torch computes it (a zero size, the dim's size as offset),
    because DCP's local plan has an item for it. Replicas (hsdp, the Replicate dims of
    fsdp_tp and moe) get the same box on every rank of the replica set."""
    shape = tuple(shape)
    plc = placements(shape, tp_role, layout, W)
    mesh = mesh_shape(layout, W)
    coord = mesh_coordinate(layout, W, rank)
    sizes, offs = list(shape), [0] * len(shape)
    for md, d in enumerate(plc):
        if d is None:
            continue
        size, start = _chunk(sizes[d], mesh[md], coord[md])
        # torch: an empty shard's offset is the global size; else the previous offset + start
        offs[d] = shape[d] if size == 0 else offs[d] + start
        sizes[d] = size
    return [(tuple(offs), tuple(sizes))]


def replicas(shape: tuple[int, ...], tp_role: str, layout: str, W: int) -> int:
    """How many ranks hold each box (the product of the Replicate mesh dims' sizes)."""
    n = 1
    for size, d in zip(mesh_shape(layout, W), placements(tuple(shape), tp_role, layout, W)):
        n *= size if d is None else 1
    return n
