"""``torch.distributed.checkpoint`` with ckpt as its storage layer, on real gloo ranks.

FSDP2 model and AdamW state (``get_state_dict``: name-keyed) trained on 2 ranks are saved
with ``dcp.save`` and ``dcp.async_save`` through :class:`CkptWriter`; ``dcp.load``
through :class:`CkptReader` restores them bit-exact on 3 ranks, which save again for a
load on 1 rank (2 -> 3 -> 1). The DCP-written checkpoints are ordinary ckpt checkpoints:
``ckpt.load`` puts them into a live model and optimizer, ``ckpt verify`` checks them, and a
checkpoint written by ``ckpt.save`` loads through ``dcp.load``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._boxes import entry_boxes
from tests._s3server import *  # noqa: F401,F403  (the S3 fixtures)
from tests.dist._launch import launch
from tests.dist.test_fsdp2 import _full_state, _model, _sharded, _step
from tests.dist.test_reshard_grid import same_bits

pytestmark = pytest.mark.slow


def _dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "meta": {"epoch": 3, "run": Path("runs/a")}}


def _dcp_load(model: torch.nn.Module, opt: torch.optim.Optimizer, url: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from ckpt.integrations.dcp import CkptReader

    state = _dcp_state(model, opt)
    state["meta"] = {"epoch": 0, "run": Path(".")}
    dcp.load(state, storage_reader=CkptReader(url))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["meta"]


def _compare(model: torch.nn.Module, opt: torch.optim.Optimizer, want_file: str) -> list[str]:
    want = torch.load(want_file)
    got = _full_state(model, opt)
    return sorted(k for k in want if k not in got or not same_bits(want[k], got[k])) + sorted(set(got) - set(want))


def train_and_save(root: str) -> int:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ckpt.integrations.dcp import CkptWriter

    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    model, opt = _sharded(seed=0)
    for i in range(3):
        _step(model, opt, i)
    dcp.save(_dcp_state(model, opt), storage_writer=CkptWriter(f"{root}/sync/step-000000003"))
    full = _full_state(model, opt)
    # As DCP asks: an async save coordinates over a group of its own, never the training's
    side = dist.new_group(backend="gloo")
    fut = dcp.async_save(_dcp_state(model, opt), storage_writer=CkptWriter(f"{root}/async", process_group=side),
                         process_group=side)
    _step(model, opt, 3)  # training goes on while the save runs: the save has the state of its call
    fut.result()
    if dist.get_rank() == 0:
        torch.save(full, f"{root}/full.pt")
    return len(full)


def load_on_3_and_save(root: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from ckpt.integrations.dcp import CkptWriter

    out = {}
    for name in ("sync/step-000000003", "async"):
        model, opt = _sharded(seed=123)
        meta = _dcp_load(model, opt, f"{root}/{name}")
        out[name] = _compare(model, opt, f"{root}/full.pt")
    out["meta"] = meta
    dcp.save(_dcp_state(model, opt), storage_writer=CkptWriter(f"{root}/on3"))
    _step(model, opt, 99)  # training goes on after the load
    return out


def load_on_1(root: str) -> list[str]:
    model, opt = _sharded(seed=7)
    _dcp_load(model, opt, f"{root}/on3")
    return _compare(model, opt, f"{root}/full.pt")


def native_through_dcp(root: str) -> list[str]:
    """A checkpoint written by ckpt.save (on 2 ranks) loads through dcp.load on 3."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ckpt
    from ckpt.integrations.dcp import CkptReader

    if dist.get_world_size() == 2:
        model, opt = _sharded(seed=0)
        for i in range(3):
            _step(model, opt, i)
        ckpt.save({"model": model, "optim": opt}, f"{root}/native")
        full = _full_state(model, opt)  # a collective: every rank
        if dist.get_rank() == 0:
            torch.save(full, f"{root}/native.pt")
        return []
    model, opt = _sharded(seed=5)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=CkptReader(f"{root}/native"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return _compare(model, opt, f"{root}/native.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("dcp")
    n = launch(train_and_save, 2, str(root), timeout=150)[0]
    return root, n


def test_dcp_save_writes_ckpt_format_that_reshards_2_to_3_to_1(saved: tuple[Path, int]) -> None:
    import ckpt

    root, n = saved
    m = ckpt.read_manifest(str(root / "sync" / "step-000000003"))
    assert m.world_size == 2 and m.step == 3 and m.user_metadata["written_by"] == "torch.distributed.checkpoint"
    w = m.entries["model/2.weight"]  # the head's 7 rows, FSDP2-sharded over 2 ranks: one box each
    assert w["kind"] == "tensor" and w["shape"] == [7, 32] and len(entry_boxes(w)) == 2
    assert m.entries["optim/state/2.weight/step"]["kind"] == "tensor"  # replicated: written once
    assert len(entry_boxes(m.entries["optim/state/2.weight/step"])) == 1
    res = launch(load_on_3_and_save, 3, str(root), timeout=150)
    for r, out in enumerate(res):
        assert out["sync/step-000000003"] == [], f"rank {r}: {out['sync/step-000000003'][:10]}"
        assert out["async"] == [], f"rank {r}: async save differs in {out['async'][:10]}"
        assert out["meta"] == {"epoch": 3, "run": Path("runs/a")}  # values round-trip, Path included
    assert ckpt.read_manifest(str(root / "on3")).world_size == 3
    assert launch(load_on_1, 1, str(root), timeout=150) == [[]]


def test_dcp_checkpoint_loads_with_ckpt_and_the_cli(saved: tuple[Path, int]) -> None:
    import ckpt

    root, _ = saved
    url = str(root / "sync" / "step-000000003")
    model = _model(seed=9)  # a plain, unsharded model and its optimizer: same parameter names
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ckpt.load({"model": model, "optim": opt}, url)
    want = torch.load(root / "full.pt")
    for name, p in model.named_parameters():
        assert same_bits(want[f"param/{name}"], p.detach()), name
        for k, v in opt.state[p].items():
            assert same_bits(want[f"optim/{name}/{k}"], v), (name, k)
    out = subprocess.run([sys.executable, "-m", "ckpt", "verify", url, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True


def test_ckpt_save_loads_through_dcp_load(tmp_path: Path) -> None:
    launch(native_through_dcp, 2, str(tmp_path), timeout=150)
    assert launch(native_through_dcp, 3, str(tmp_path), timeout=150) == [[], [], []]


def _raised(call: Any) -> BaseException:
    """The error a DCP call failed with (DCP wraps each rank's in a CheckpointException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as e:
        call()
    first = next(iter(e.value.failures.values()))
    return first[0] if isinstance(first, tuple) else first


def test_writer_without_url_or_over_a_committed_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    import ckpt
    from ckpt.errors import CheckpointError, CheckpointExistsError
    from ckpt.integrations.dcp import CkptWriter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = _raised(lambda: dcp.save({"w": torch.ones(2)}, storage_writer=CkptWriter()))
        assert isinstance(err, CheckpointError) and "checkpoint_id=url" in str(err)
        url = tmp_path / "c"
        dcp.save({"w": torch.ones(2)}, storage_writer=CkptWriter(url))
        err = _raised(lambda: dcp.save({"w": torch.zeros(2)}, storage_writer=CkptWriter(url)))
        assert isinstance(err, CheckpointExistsError)  # a committed checkpoint is never replaced by accident
        got = {"w": torch.full((2,), 5.0)}
        ckpt.load(got, str(url))
        assert torch.equal(got["w"], torch.ones(2))
        dcp.save({"w": torch.zeros(2)}, checkpoint_id=url, storage_writer=CkptWriter(overwrite=True))
    ckpt.load(got, str(url))
    assert torch.equal(got["w"], torch.zeros(2))


@pytest.mark.s3
def test_dcp_save_and_load_on_s3(s3_url: str, s3_options: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    import ckpt
    from ckpt.integrations.dcp import CkptReader, CkptWriter

    model = _model(seed=1)
    url = f"{s3_url}/step-000000002"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "epoch": 2}, storage_writer=CkptWriter(url, storage_options=s3_options))
        fresh = _model(seed=2)
        state = {"model": fresh.state_dict(), "epoch": 0}
        dcp.load(state, storage_reader=CkptReader(url, storage_options=s3_options))
    assert state["epoch"] == 2
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert same_bits(a, b), name
    assert ckpt.read_manifest(url, storage_options=s3_options).step == 2


def test_a_dcp_load_holds_the_checkpoint_against_recycling(tmp_path: Path) -> None:
    """From its first manifest read to the end of read_data, CkptReader holds the
    checkpoint as ckpt.load does: a recycling retirement in between deletes it rather than
    overwriting its files; after the load it may be recycled."""
    import torch.distributed.checkpoint as dcp

    import ckpt
    from ckpt._engine._recycle import retire
    from ckpt.integrations.dcp import CkptReader
    from ckpt.storage import open_storage

    run = tmp_path / "run"
    for step in (0, 1):
        ckpt.save({"w": torch.full((1024,), float(step))}, run / f"step-00000000{step}", step=step)
    storage = open_storage(str(run))

    reader = CkptReader(run / "step-000000000")
    reader.read_metadata()  # a load under way
    assert retire(storage, "step-000000000") is False  # held: the caller deletes the tree instead

    state = {"w": torch.zeros(1024)}
    dcp.load(state, storage_reader=CkptReader(run / "step-000000001"), no_dist=True)
    assert torch.equal(state["w"], torch.ones(1024))
    assert retire(storage, "step-000000001") is True  # the load is over: nothing holds it
