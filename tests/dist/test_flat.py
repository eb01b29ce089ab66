"""ZeRO-style flat fragments (ckpt.providers.FlatShard): flat -> DTensor / full, and back.

A fragment is a rank's contiguous 1-D range of the concatenation of flattened
parameters; it crosses parameter boundaries and starts/ends mid-row. Each rank's
fragment is decomposed into boxes of the parameters' own coordinates (views of the flat
tensor), so the checkpoint holds ordinary global tensors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._helpers import same_bits
from tests.dist._launch import launch

pytestmark = pytest.mark.slow

# the small model's parameters, in flat-buffer order: (fqn, shape); 68 elements in all
PARAMS: list[tuple[str, tuple[int, ...]]] = [
    ("a.weight", (5, 3)),    # [0, 15)
    ("a.bias", (5,)),        # [15, 20)
    ("b.weight", (4, 5)),    # [20, 40)
    ("b.bias", (4,)),        # [40, 44)
    ("c", (2, 3, 4)),        # [44, 68): 3-D
]
TOTAL = sum(math.prod(s) for _, s in PARAMS)
# fragment boundaries per world size: uneven, mid-row, across parameters
SAVE_CUTS = [0, 7, 50, TOTAL]  # 3 ranks saving fragments
LOAD_CUTS = [0, 13, 47, TOTAL]  # 3 ranks loading fragments


def full_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(shape, generator=gen)


def full_flat() -> torch.Tensor:
    return torch.cat([full_tensor(n, s).reshape(-1) for n, s in PARAMS])


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 5)
        self.b = torch.nn.Linear(5, 4)
        self.c = torch.nn.Parameter(torch.empty(2, 3, 4))


def my_fragment(cuts: list[int], zeros: bool) -> Any:
    import torch.distributed as dist

    from ckpt.providers import FlatShard

    r = dist.get_rank()
    lo, hi = cuts[r], cuts[r + 1]
    flat = full_flat()[lo:hi].clone()
    if zeros:
        flat.zero_()
    return FlatShard(flat, lo, PARAMS, key_prefix="model")


def model_with(layout: str, zeros: bool) -> torch.nn.Module:
    """The model's parameters as full tensors or DTensor Shard(0) on a 1-D mesh."""
    import torch.distributed as dist

    m = Model()
    mesh = None
    if layout == "shard0":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name, shape in PARAMS:
        g = full_tensor(name, shape)
        t = torch.zeros_like(g) if zeros else g
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor

            t = distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)
        owner, _, attr = name.rpartition(".")
        sub = m.get_submodule(owner) if owner else m
        setattr(sub, attr, torch.nn.Parameter(t, requires_grad=False))
    return m


def check_model(m: torch.nn.Module) -> list[str]:
    bad = []
    for name, p in m.named_parameters():
        g = full_tensor(name, tuple(p.shape))
        if type(p).__name__ == "DTensor":
            from torch.distributed.tensor import distribute_tensor

            want = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None).to_local()
            got = p.to_local()
        else:
            want, got = g, p.data
        if not same_bits(got, want):
            bad.append(name)
    return bad


# -- workers (module level: spawned) ------------------------------------------------------
def save_flat_worker(url: str) -> int:
    import ckpt

    frag = my_fragment(SAVE_CUTS, zeros=False)
    n = len(list(frag.items()))
    ckpt.save({"optim_flat": frag}, url)
    return n


def load_model_worker(url: str, layout: str) -> list[str]:
    import ckpt

    m = model_with(layout, zeros=True)
    ckpt.load({"model": m}, url)
    return check_model(m)


def save_model_worker(url: str) -> None:
    import ckpt

    ckpt.save({"model": model_with("shard0", zeros=False)}, url)


def load_flat_worker(url: str) -> bool:
    import torch.distributed as dist

    import ckpt

    cuts = LOAD_CUTS
    frag = my_fragment(cuts, zeros=True)
    assert not frag.flat.any()
    ckpt.load({"optim_flat": frag}, url)
    r = dist.get_rank()
    return same_bits(frag.flat, full_flat()[cuts[r]:cuts[r + 1]])


# -- tests --------------------------------------------------------------------------------
@st.composite
def shape_and_range(draw: Any) -> tuple[tuple[int, ...], int, int]:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=4)))
    n = math.prod(shape)
    a = draw(st.integers(0, n))
    b = draw(st.integers(a, n))
    return shape, a, b


@settings(max_examples=300, deadline=None)
@given(shape_and_range())
def test_range_boxes_tile_the_range(case: tuple[tuple[int, ...], int, int]) -> None:
    from ckpt.providers._flat import range_boxes

    shape, a, b = case
    idx = torch.arange(math.prod(shape)).reshape(shape)
    boxes = range_boxes(shape, a, b)
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    got = [idx[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].reshape(-1) for offs, sizes in boxes]
    flat = torch.cat(got) if got else torch.empty(0, dtype=torch.long)
    assert torch.equal(flat, torch.arange(a, b))  # exactly the range, in order, once each
    assert all(math.prod(s) > 0 for _, s in boxes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=4).map(tuple), min_size=1, max_size=4),
       st.data())
def test_flat_shard_items_are_views(shapes: list[tuple[int, ...]], data: Any) -> None:
    from ckpt.providers import FlatShard

    params = [(f"p{i}", s) for i, s in enumerate(shapes)]
    fulls = [torch.randn(s) for s in shapes]
    total = sum(math.prod(s) for s in shapes)
    a = data.draw(st.integers(0, total))
    b = data.draw(st.integers(a, total))
    flat = torch.cat([f.reshape(-1) for f in fulls])[a:b].clone()
    items = list(FlatShard(flat, a, params, key_prefix="opt/m").items())
    assert sum(it.tensor.numel() for it in items) == b - a
    base = flat.untyped_storage().data_ptr()
    end = base + flat.numel() * flat.element_size()
    for it in items:
        i = int(it.key.rsplit("/p", 1)[1])
        assert it.key.startswith("opt/m/") and it.global_shape == shapes[i]
        assert it.tensor.untyped_storage().data_ptr() == base  # a view: no copy
        if it.tensor.numel():
            assert base <= it.tensor.data_ptr() < end
        offs, sizes = it.box
        assert same_bits(it.tensor, fulls[i][tuple(slice(o, o + s) for o, s in zip(offs, sizes))])
    flat.add_(1)  # aliasing: writes through the flat tensor show in every item
    for it in items:
        i = int(it.key.rsplit("/p", 1)[1])
        offs, sizes = it.box
        assert torch.equal(it.tensor, fulls[i][tuple(slice(o, o + s) for o, s in zip(offs, sizes))] + 1)


def test_flat_to_dtensor_and_full(tmp_path: Any) -> None:
    url = str(tmp_path / "flat")
    counts = launch(save_flat_worker, 3, url, timeout=60)
    assert all(n >= 2 for n in counts)  # fragments cross parameters and rows
    assert launch(load_model_worker, 2, url, "shard0", timeout=60) == [[], []]
    assert launch(load_model_worker, 1, url, "plain", timeout=60) == [[]]


def test_dtensor_to_flat(tmp_path: Any) -> None:
    url = str(tmp_path / "dt")
    launch(save_model_worker, 4, url, timeout=60)
    assert launch(load_flat_worker, 3, url, timeout=60) == [True, True, True]


def test_duplicate_box_still_rejected() -> None:
    from ckpt._engine._save import prepare
    from ckpt.errors import UnsafePathError
    from ckpt.providers import TensorItem

    t = torch.zeros(4)
    ok = [TensorItem("k", t[:2], (4,), (0,)), TensorItem("k", t[2:], (4,), (2,))]
    assert len(prepare(ok, allow_pickle=False, rank=0).tensors) == 2
    for bad in ([TensorItem("k", t[:2], (4,), (0,)), TensorItem("k", t[:2], (4,), (0,))],
                [TensorItem("k", t), TensorItem("k", t[:2], (4,), (0,))],
                [TensorItem("k", t[:2], (4,), (0,)), TensorItem("k", t[:2], (6,), (2,))]):
        with pytest.raises(UnsafePathError):
            prepare(bad, allow_pickle=False, rank=0)
