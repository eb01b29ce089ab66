"""The public surface: what ``import ckpt`` offers, and that it stays small (#37)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

PUBLIC = ["ckpt", "ckpt.providers", "ckpt.tools", "ckpt.elastic", "ckpt.errors", "ckpt.storage"]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_exported_name_exists(name: str) -> None:
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    assert exported, f"{name} declares no __all__"
    missing = [n for n in exported if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names what the module lacks: {missing}"


def test_built_in_providers_are_private() -> None:
    """Users extend with register_provider and the base classes; the concrete providers
    are an implementation detail (they may change shape between releases)."""
    providers = importlib.import_module("ckpt.providers")
    concrete = [n for n in providers.__all__ if n.endswith("Provider") and n != "Provider"]
    assert not concrete, concrete
    assert {"Provider", "register_provider", "Stateful", "RNGState"} <= set(providers.__all__)


def test_one_way_to_list_checkpoints(tmp_path: Path) -> None:
    """ckpt.list_checkpoints / ckpt.latest are the listing; the Hugging Face helper
    agrees with them on a Trainer output folder."""
    import torch

    import ckpt
    from ckpt.integrations.hf import latest_checkpoint

    for step in (3, 12):
        ckpt.save({"w": torch.ones(1)}, tmp_path / f"checkpoint-{step}", step=step)
    (tmp_path / "checkpoint-20").mkdir()  # not committed: neither lists it
    newest = ckpt.latest(tmp_path)
    assert newest is not None and newest.name == "checkpoint-12"
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-12")
