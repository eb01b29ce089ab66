"""Issue #36, case 7: a module and its ``state_dict()`` hold the same tensor keys, so each
form loads a checkpoint saved in the other."""

from __future__ import annotations

import torch

import ckpt
from tests._helpers import assert_same_module, mlp


def _model(seed: int) -> torch.nn.Module:
    return mlp(seed, 8, 16, 4, norm=True)


def test_saved_module_loads_into_its_state_dict(tmp_path):
    src, dst = _model(1), _model(2)
    url = str(tmp_path / "ck")
    ckpt.save({"model": src}, url)
    ckpt.load({"model": dst.state_dict()}, url)  # in place: the state dict's tensors are the module's
    assert_same_module(dst, src)


def test_saved_state_dict_loads_into_the_module(tmp_path):
    src, dst = _model(1), _model(2)
    url = str(tmp_path / "ck")
    ckpt.save({"model": src.state_dict()}, url)
    ckpt.load({"model": dst}, url)
    assert_same_module(dst, src)
