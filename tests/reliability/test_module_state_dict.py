"""Issue #36, case 7: a module and its ``state_dict()`` hold the same tensor keys, so each
form loads a checkpoint saved in the other."""

from __future__ import annotations

import torch

import ckpt


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_module_loads_into_its_state_dict(tmp_path):
    src, dst = _model(1), _model(2)
    url = str(tmp_path / "ck")
    ckpt.save({"model": src}, url)
    ckpt.load({"model": dst.state_dict()}, url)  # in place: the state dict's tensors are the module's
    assert _same(src, dst)


def test_saved_state_dict_loads_into_the_module(tmp_path):
    src, dst = _model(1), _model(2)
    url = str(tmp_path / "ck")
    ckpt.save({"model": src.state_dict()}, url)
    ckpt.load({"model": dst}, url)
    assert _same(src, dst)
