"""Loads that behave like the ecosystem's: a state may ask for a subset of a checkpoint's
top-level objects (a model alone from a training checkpoint); inside an object it asks
for, missing and unexpected keys stay errors unless allowed (each direction on its own, or
both with ``strict=False``); a dtype change is an error unless ``cast=True``; a load that
matches nothing is an error; what was skipped, missing, left over or cast is reported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckpt
from ckpt.errors import MissingKeyError, UnexpectedKeyError


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    o = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    o.step()
    return m, o


@pytest.fixture
def saved(tmp_path: Path) -> tuple[str, torch.nn.Module]:
    m, o = _trained(0)
    url = str(tmp_path / "s")
    ckpt.save({"model": m, "optim": o, "step": 3}, url)
    return url, m


def test_a_model_alone_loads_from_a_training_checkpoint(saved: tuple[str, torch.nn.Module]) -> None:
    url, m = saved
    m2, _ = _trained(1)
    stats = ckpt.load({"model": m2}, url)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert stats.skipped == ["optim", "step"] and stats.unexpected == []


def test_unexpected_keys_inside_an_asked_for_object_stay_errors(saved: tuple[str, torch.nn.Module]) -> None:
    url, m = saved
    small = torch.nn.Sequential(torch.nn.Linear(4, 8))  # the checkpoint's model has a second layer
    with pytest.raises(UnexpectedKeyError) as ei:
        ckpt.load({"model": small}, url)
    assert "model/1." in str(ei.value)
    stats = ckpt.load({"model": small}, url, strict=False)
    assert torch.equal(small[0].weight, m[0].weight)
    assert stats.unexpected == ["model/1.bias", "model/1.weight"] and stats.skipped == ["optim", "step"]


def test_missing_keys_stay_errors_and_name_the_checkpoints_objects(saved: tuple[str, torch.nn.Module]) -> None:
    url, _ = saved
    big = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(MissingKeyError) as ei:
        ckpt.load({"model": big}, url)
    msg = str(ei.value)
    assert "model/2." in msg and "'optim'" in msg and "--prefix" in msg


def test_a_load_that_matches_nothing_is_an_error(saved: tuple[str, torch.nn.Module]) -> None:
    url, _ = saved
    for strict in (True, False):
        with pytest.raises(MissingKeyError) as ei:
            ckpt.load({"weights": torch.nn.Linear(4, 8)}, url, strict=strict)
        assert "'model'" in str(ei.value) and "--prefix" in str(ei.value)


def test_an_optimizer_without_its_module_says_to_add_the_module(saved: tuple[str, torch.nn.Module]) -> None:
    url, _ = saved
    _, o2 = _trained(1)
    with pytest.raises(UnexpectedKeyError) as ei:
        ckpt.load({"optim": o2}, url)
    assert "put the module in the same state" in str(ei.value)


def test_missing_and_unexpected_are_allowed_separately(saved: tuple[str, torch.nn.Module]) -> None:
    url, m = saved
    big = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(MissingKeyError):  # allowing the other direction does not allow this one
        ckpt.load({"model": big}, url, allow_unexpected=True)
    before = big[2].weight.detach().clone()
    stats = ckpt.load({"model": big}, url, allow_missing=True)
    assert sorted(stats.missing) == ["model/2.bias", "model/2.weight"] and stats.unexpected == []
    assert torch.equal(big[1].weight, m[1].weight) and torch.equal(big[2].weight, before)  # left as it was

    small = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(UnexpectedKeyError):
        ckpt.load({"model": small}, url, allow_missing=True)
    stats = ckpt.load({"model": small}, url, allow_unexpected=True)
    assert stats.unexpected == ["model/1.bias", "model/1.weight"] and stats.missing == []
    assert torch.equal(small[0].weight, m[0].weight)


def test_a_dtype_change_is_an_error_unless_cast_and_is_reported(saved: tuple[str, torch.nn.Module]) -> None:
    from ckpt.errors import DtypeMismatchError

    url, m = saved
    half, _ = _trained(1)
    half = half.to(torch.bfloat16)
    with pytest.raises(DtypeMismatchError) as ei:
        ckpt.load({"model": half}, url)
    assert "cast=True" in str(ei.value)
    stats = ckpt.load({"model": half}, url, cast=True)
    assert sorted(stats.cast) == ["model/0.bias", "model/0.weight", "model/1.bias", "model/1.weight"]
    for a, b in zip(m.parameters(), half.parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.detach().to(torch.bfloat16), b.detach())
