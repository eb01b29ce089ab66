"""DCP's coordinator on the plans of W simulated ranks: the reference of ``bench.scale``.

    dcp_global_plan("llama3-70b", "fsdp", 64) -> {"W": 64, "pieces": ..., "seconds": ..., ...}

For each of W ranks this builds the ``SavePlan`` that DCP's ``DefaultSavePlanner.
create_local_plan`` makes for that rank's DTensors (``bench._shapes``' boxes): one
``WriteItem`` of type SHARD per tensor, ``MetadataIndex(fqn, offsets)``, a
``TensorWriteData`` with the chunk, ``TensorProperties`` and the global size, and as
``planner_data`` the flattening map of the state dict (``{"model": ..., "optim": ...}``).
A rank whose DTensor is replicated on some mesh dim has the same item as its replicas
(DCP's local plan does not deduplicate); an empty shard has an item too. No tensor is
allocated. Each plan is pickled as DCP's ``gather_object`` pickles it:
``bytes_gathered_rank0`` is what rank 0 receives. Rank 0 then works on the plans as built
(distinct objects per rank, as its unpickled copies are); the unpickling itself, about
12 us per item on this machine, is not in the figures.

Then it times, on the one process that plays rank 0, what DCP's coordinator runs in
``save``'s ``global_step``: ``DefaultSavePlanner().create_global_plan(plans)``, i.e.
``dedup_save_plans`` (replicated items kept on the least loaded rank), then
``create_default_global_save_plan`` (every item re-indexed into one ``Metadata``), the
merge of the W flattening maps, and ``_validate_global_plan`` (bounds, the sweep-line
overlap check of pytorch PR #166820, the volume check). The dedup step is also timed on
its own, as the planner runs it.

How DCP's cost grows. Rank 0 gathers W plans of O(tensors) items each: bytes and memory
O(W x tensors), and the ``Metadata`` it writes holds one chunk per distinct box (O(W x
tensors) for fsdp; replicas deduplicated). Dedup, the global plan and the merge of the maps
touch every item once: O(W x tensors). Validation sorts each tensor's chunks and sweeps
along the tensor's *largest* dim: where that is not the sharded dim, every chunk spans the
whole sweep dim, none ever leaves the active list, and every pair is compared: O(W^2) per
such tensor. For Llama-3-70B under fsdp that is ``wk``, ``wv`` [1024, 8192] and ``w2``
[8192, 28672] with their moments: 720 of 2,169 tensors, W(W-1)/2 overlap checks each (the
quadratic of pytorch#163548 survives its sweep-line fix, PR #166820, for them). So
``per_piece_us`` is not constant: it grows linearly with W once validation dominates
(at W = 256, 23.5 M box checks; at W = 16,384, 9.7e10).

Measured (llama3-70b, fsdp; 2 cores shared with other jobs, so +-50 %; 2026-12-07):

    W     pieces   create_global_plan  of it: dedup  validate   metadata   gathered on rank 0
    8     17,352   0.28-0.79 s         0.13-0.26 s   0.11-0.17 s  1.1 MB     4.3 MB
    64    138,816  5.8-7.8 s           1.5-2.1 s     1.6-2.0 s    5.9 MB     34 MB
    256   555,264  63-73 s             9-11 s        34-44 s      22 MB      138 MB

Without validation about 30-50 us per piece, linear; 16,384 ranks x 2,169 tensors = 35.5 M
pieces would take rank 0 ~20-30 minutes for that part, ~1.5-2 days for the quadratic
validation, and gather ~8.8 GB of pickled plans (1.6 GB of peak RSS here at W = 256).
A call at W = 256 takes 100-120 s here: DCP's step, ~25 s to build and pickle the plans, and
the Metadata's pickling.
"""

from __future__ import annotations

import gc
import pickle
import time
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint import default_planner as _default_planner
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from bench._shapes import layout_boxes, model_tensors

__all__ = ["dcp_global_plan", "dcp_local_plan"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _fqn_and_path(key: str) -> tuple[str, tuple[str, ...]]:
    """DCP's flattened name of a ckpt key and its path in the nested state dict
    (``optim/state/<p>/exp_avg`` -> ``optim.state.<p>.exp_avg``, ``("optim", "state", <p>, "exp_avg")``)."""
    path = tuple(key.split("/"))
    return ".".join(path), path


def dcp_local_plan(model: str, layout: str, W: int, rank: int) -> SavePlan:
    """The SavePlan DCP's DefaultSavePlanner makes on ``rank`` of ``W`` (no tensor allocated)."""
    items: list[WriteItem] = []
    mapping: dict[str, tuple[str, ...]] = {}
    for key, shape, dtype, role in model_tensors(model):
        fqn, path = _fqn_and_path(key)
        mapping[fqn] = path
        size = torch.Size(shape)
        for offs, sizes in layout_boxes(shape, role, layout, W, rank):
            offsets = torch.Size(offs)
            items.append(WriteItem(
                index=MetadataIndex(fqn, offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=_DTYPES[dtype]),
                    size=size,
                ),
            ))
    return SavePlan(items, planner_data=mapping)


def dcp_global_plan(model: str, layout: str, W: int) -> dict[str, Any]:
    """DCP's coordinator cost on the plans of ``W`` simulated ranks (see the module doc).

    Returns ``W``, ``pieces`` (write items rank 0 receives, replicas included),
    ``seconds`` (``create_global_plan``), ``per_piece_us``, ``metadata_bytes`` (the pickled
    ``Metadata``, the ``.metadata`` file DCP writes), ``bytes_gathered_rank0`` (the W pickled
    plans), and on the side: ``model``, ``layout``, ``tensors``, ``pieces_after_dedup``,
    ``chunks`` (in the Metadata), ``dedup_seconds`` and ``validate_seconds`` (those two steps
    inside ``create_global_plan``), ``build_seconds`` (this simulation's own cost)."""
    t0 = time.perf_counter()
    plans: list[SavePlan] = []
    gathered = 0
    was_enabled = gc.isenabled()
    gc.disable()  # the simulation's own allocations; DCP's step below runs with the collector on
    try:
        for rank in range(W):
            plan = dcp_local_plan(model, layout, W, rank)
            gathered += len(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL))
            # rank 0 works on unpickled copies: distinct objects per rank, as these are
            plans.append(plan)
    finally:
        if was_enabled:
            gc.enable()
    build_s = time.perf_counter() - t0
    pieces = sum(len(p.items) for p in plans)
    gc.collect()  # the gathered plans are old objects by the time the coordinator runs

    planner = DefaultSavePlanner()
    steps = {"dedup": 0.0, "validate": 0.0}
    after_dedup = [0]

    def timed_dedup(all_plans: list[SavePlan]) -> list[SavePlan]:
        t = time.perf_counter()
        out = dedup_save_plans(all_plans, planner.dedup_save_to_lowest_rank)  # what _dedup_save_plans runs
        steps["dedup"] += time.perf_counter() - t
        after_dedup[0] = sum(len(p.items) for p in out)
        return out

    real_validate = _default_planner._validate_global_plan

    def timed_validate(global_plan: list[SavePlan], metadata: Metadata) -> list[str]:
        t = time.perf_counter()
        try:
            return real_validate(global_plan, metadata)
        finally:
            steps["validate"] += time.perf_counter() - t

    planner._dedup_save_plans = timed_dedup  # type: ignore[method-assign]
    _default_planner._validate_global_plan = timed_validate
    try:
        t = time.perf_counter()
        global_plan, metadata = planner.create_global_plan(plans)
        seconds = time.perf_counter() - t
    finally:
        _default_planner._validate_global_plan = real_validate
    chunks = sum(len(getattr(md, "chunks", ())) for md in metadata.state_dict_metadata.values())
    metadata_bytes = len(pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL))
    del global_plan, metadata, plans
    return {
        "model": model, "layout": layout, "W": W, "tensors": len(model_tensors(model)),
        "pieces": pieces, "pieces_after_dedup": after_dedup[0], "chunks": chunks,
        "seconds": seconds, "per_piece_us": seconds / pieces * 1e6,
        "dedup_seconds": steps["dedup"], "validate_seconds": steps["validate"], "build_seconds": build_s,
        "metadata_bytes": metadata_bytes, "bytes_gathered_rank0": gathered,
    }


if __name__ == "__main__":  # a quick look: python -m bench._scale_dcp [model] [layout] [W,...]
    import sys

    args = sys.argv[1:]
    m, lay = (args[0] if args else "llama3-70b"), (args[1] if len(args) > 1 else "fsdp")
    for w in (int(x) for x in (args[2] if len(args) > 2 else "8,64").split(",")):
        print(dcp_global_plan(m, lay, w), flush=True)
